"""PocketLLM Server: the backend of the PocketLLM chat app."""

__version__ = "0.1.0"
