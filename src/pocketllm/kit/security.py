"""HTTP hardening: security headers on every response and request body size limits per route."""

from __future__ import annotations

from fastapi import FastAPI

from pocketllm.config import Settings


def install_security(app: FastAPI, settings: Settings) -> None:
    """Add the security-header and body-size middleware to `app`."""
