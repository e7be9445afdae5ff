"""Errors raised when a provider call fails, each with the status and code the API returns."""

from __future__ import annotations

from pocketllm.errors import InvalidInput, RateLimited, UpstreamError


class ProviderNotConfigured(InvalidInput):
    code = "provider_not_configured"
    default_message = "The provider is not configured or not active; activate it with POST /v1/providers/activate."


class ProviderAuthFailed(InvalidInput):
    # 400, not 401: a provider refusing the user's key must not sign the user out of our API.
    code = "provider_auth_failed"
    default_message = "The provider rejected the API key; check the key and save it again."


class ProviderRateLimited(RateLimited):
    code = "provider_rate_limited"
    default_message = "The provider is rate-limiting requests with this key; try again later."


class ProviderRequestFailed(UpstreamError):
    """The provider could not be reached, responded with a 5xx status, or returned an invalid response."""

    code = "provider_unavailable"
    default_message = "The provider failed to respond to the request; try again later."


class ContextLengthExceeded(InvalidInput):
    code = "context_length_exceeded"
    default_message = "The conversation is too long for the model's context window; start a new chat."


class ProviderTimeout(UpstreamError):
    status_code = 504
    code = "provider_timeout"
    default_message = "The provider did not respond in time; try again later."
