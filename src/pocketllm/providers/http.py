"""HTTP calls to providers: through the outbound guard, with provider failures turned into domain errors.

Provider error texts can quote part of the key ("Incorrect API key provided: sk-ab***cd"), so no
provider text reaches our responses or logs without `scrub_secret` first.
"""

from __future__ import annotations

import email.utils
import json as jsonlib
import math
import re
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import httpx
import structlog

from pocketllm.errors import PocketLLMError
from pocketllm.kit.metrics import ProviderCallTimer
from pocketllm.providers.errors import ProviderAuthFailed, ProviderRateLimited, ProviderRequestFailed, ProviderTimeout
from pocketllm.providers.guard import Clients, OutboundGuard

log = structlog.get_logger(__name__)

# Maps a provider's error response to a more specific domain error (for example ContextLengthExceeded), or
# returns None to keep the generic ProviderRequestFailed.
ErrorMapper = Callable[[httpx.Response], PocketLLMError | None]

MAX_PROVIDER_MESSAGE_LENGTH = 300
# The default limit of a JSON response body. Model lists of the largest catalogues are a few MiB.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
# How much of an error response's body is read for its message. Provider error bodies are usually a few
# hundred bytes.
MAX_ERROR_BODY_BYTES = 64 * 1024
# Key-shaped words: long runs of letters, digits, dashes and underscores, with or without a known prefix.
_KEY_LIKE = re.compile(r"\b(?:sk|pk|rk|gsk|xai|key|api)[-_][A-Za-z0-9_\-*.]{6,}|\b[A-Za-z0-9_\-]{32,}\b")


def scrub_secret(text: str, secret: str | None) -> str:
    """Remove `secret` and anything shaped like an API key from `text`, and shorten it."""
    if secret:
        text = re.sub(re.escape(secret), "[redacted]", text, flags=re.IGNORECASE)
    text = _KEY_LIKE.sub("[redacted]", text)
    return text[:MAX_PROVIDER_MESSAGE_LENGTH]


def provider_error_message(response: httpx.Response, secret: str | None) -> str:
    """Extract the human-readable error from an OpenAI- or Anthropic-shaped error body, scrubbed."""
    try:
        body: Any = response.json()
    except ValueError:
        return ""
    message: Any = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        message = message or body.get("message") or body.get("detail")
    return scrub_secret(message, secret) if isinstance(message, str) else ""


def encode_json(value: Any) -> bytes:
    """Encode a request body as httpx 0.29 encodes `json=` (httpx/_content.py): UTF-8, compact, no NaN."""
    return jsonlib.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


class JsonBody(httpx.AsyncByteStream):
    """A JSON request body, encoded with `encode_json`, that lets go of its bytes once they are sent.

    httpx keeps a request's body for as long as its response is open. For a reply stream that is the
    prompt, which can be large, for minutes. This body is sent once, because the provider clients neither
    retry nor follow redirects, and then is empty.
    """

    __slots__ = ("_data", "length")

    def __init__(self, value: Any) -> None:
        self._data = encode_json(value)
        self.length = len(self._data)

    @property
    def sent(self) -> bool:
        return not self._data and self.length > 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        data, self._data = self._data, b""
        yield data


class ProviderHttp:
    """Sends provider requests through the guard on the process-wide HTTP client."""

    def __init__(self, client: Clients, guard: OutboundGuard) -> None:
        self.client = client
        self.guard = guard

    async def request_json(
        self,
        method: str,
        url: str,
        *,
        provider: str,
        secret: str | None,
        headers: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
        json: Any = None,
        timeout: float | httpx.Timeout | None = None,
        map_error: ErrorMapper | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> Any:
        """Send a request and return its decoded JSON body, raising a domain error on any failure.

        NOTE: `timeout` bounds each read, not the whole call. Callers that need a bound on the whole call
        wrap it in `io_deadline`. Chat replies do not yet, so a provider that sends a byte within every
        read timeout keeps the connection as long as it goes on.

        `map_error` is given error responses other than redirects, 401, 403 and 429 (see
        `raise_for_provider_status`). A body larger than `max_response_bytes` raises ProviderResponseTooLarge
        as soon as the limit is passed, so a provider cannot fill the server's memory.
        """
        with ProviderCallTimer(provider, "request"):
            with _TransportErrors(provider):
                async with self.guard.stream(
                    self.client,
                    method,
                    url,
                    headers=headers,
                    params=params,
                    json=json,
                    timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                ) as streamed:
                    response = await read_limited(streamed, provider=provider, max_bytes=max_response_bytes)

            raise_for_provider_status(response, provider=provider, secret=secret, map_error=map_error)
            try:
                return response.json()
            except ValueError as error:
                log.info("provider.malformed_response", provider=provider, status=response.status_code)
                raise ProviderRequestFailed(f"{provider} sent a response that is not valid JSON.") from error

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        url: str,
        *,
        provider: str,
        secret: str | None,
        headers: dict[str, str] | None = None,
        json_body: JsonBody | None = None,
        timeout: float | httpx.Timeout | None = None,
        map_error: ErrorMapper | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """Open a streaming request; the status is checked (and the body read for the error) before yielding.

        `json_body` is taken encoded, as a JsonBody, because the context manager keeps its arguments while
        the stream is open. A dict would keep the prompt, which can be large, and JsonBody lets go of it
        once it is sent.

        The duration metric of the call ends at the response headers, and its outcome is how the whole stream ended.
        """
        with ProviderCallTimer(provider, "stream") as timer, _TransportErrors(provider):
            if json_body is not None:
                # With Content-Length set, httpx sends the body as it is instead of chunked.
                headers = {
                    **(headers or {}),
                    "Content-Type": "application/json",
                    "Content-Length": str(json_body.length),
                }
            response = await self.guard.open_stream(
                self.client,
                method,
                url,
                headers=headers,
                content=json_body,
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
            try:
                timer.response_started()
                if response.status_code >= 300:
                    error_response = await _read_error_body(response, max_bytes=MAX_ERROR_BODY_BYTES)
                    raise_for_provider_status(error_response, provider=provider, secret=secret, map_error=map_error)
                yield response
            finally:
                await response.aclose()


class _TransportErrors:
    """Context manager that turns httpx timeouts, connection failures and undecodable bodies inside its block
    into ProviderTimeout and ProviderRequestFailed. A class rather than a @contextmanager generator, because
    one stays alive per open stream."""

    __slots__ = ("_provider",)

    def __init__(self, provider: str) -> None:
        self._provider = provider

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, error_type: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        provider = self._provider
        if isinstance(error, httpx.PoolTimeout):
            # Every connection that PROVIDER_MAX_CONNECTIONS allows was busy for the whole timeout.
            log.warning("provider.connections_exhausted", provider=provider)
            raise ProviderTimeout(
                f"The server had no free connection for this request to {provider} within the timeout, because "
                "its provider connections were all in use; try again later."
            ) from error
        if isinstance(error, httpx.TimeoutException):
            log.info("provider.timed_out", provider=provider, error=type(error).__name__)
            raise ProviderTimeout(f"{provider} did not respond in time; try again later.") from error
        if isinstance(error, httpx.DecodingError):
            raise undecodable_body(provider, error) from error
        if isinstance(error, httpx.RequestError):
            # The detail is for the operator.
            log.info(
                "provider.unreachable",
                provider=provider,
                error=type(error).__name__,
                detail=scrub_secret(str(error), None),
            )
            verification = _certificate_error(error)
            if verification is not None:
                # The reason is the first problem OpenSSL found (for example "self-signed certificate", or
                # a host name that a certificate from a trusted authority does not list), which the user
                # can act on.
                raise ProviderRequestFailed(
                    f"The TLS certificate of {provider} could not be verified "
                    f"({scrub_secret(verification.verify_message or verification.reason or '', None)}); "
                    "check the base URL and the server's certificate."
                ) from error
            raise ProviderRequestFailed(
                f"The connection to {provider} failed or closed before the response was complete; "
                "check its base URL and try again."
            ) from error


def _certificate_error(error: BaseException) -> ssl.SSLCertVerificationError | None:
    """Return the certificate verification failure that caused `error`, if one did.

    The network layer raises httpcore's ConnectError from it, and httpx its own ConnectError from that.
    """
    seen: BaseException | None = error
    for _ in range(5):
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def undecodable_body(provider: str, error: httpx.DecodingError) -> ProviderRequestFailed:
    """Log a body that failed its Content-Encoding and return the error to raise for it."""
    log.info("provider.undecodable_response", provider=provider, detail=scrub_secret(str(error), None))
    return ProviderRequestFailed(
        f"{provider} sent a response body that could not be decoded with its Content-Encoding."
    )


class ProviderResponseTooLarge(ProviderRequestFailed):
    code = "provider_response_too_large"
    default_message = "The provider's response is larger than the server accepts."


async def read_limited(response: httpx.Response, *, provider: str, max_bytes: int) -> httpx.Response:
    """Read a streamed response and return it with its body, raising ProviderResponseTooLarge past `max_bytes`.

    The limit applies to the decoded body, so a small compressed body cannot unpack into a large one.

    NOTE: httpx decodes each network read before its bytes are counted here, so a provider that compresses
    although the clients ask for `identity` can still make one read inflate to about a thousand times its
    size (a 64 KiB read of gzip-compressed zeros to about 64 MiB) before the limit applies.
    """
    if _declares_more_than(response, max_bytes):
        raise _too_large(provider, max_bytes)
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(provider, max_bytes)
        chunks.append(chunk)
    return _with_body(response, b"".join(chunks))


def _declares_more_than(response: httpx.Response, max_bytes: int) -> bool:
    """Tell whether the response's Content-Length header declares a body larger than `max_bytes`."""
    declared = response.headers.get("content-length", "")
    return declared.strip().isdigit() and int(declared) > max_bytes


def _with_body(response: httpx.Response, body: bytes) -> httpx.Response:
    """Return a copy of a streamed response with `body`, its decoded body or a part of it."""
    # The copy contains the decoded body, so the headers that describe the encoded body are left out.
    headers = [
        (name, value)
        for name, value in response.headers.multi_items()
        if name.lower() not in ("content-encoding", "content-length", "transfer-encoding")
    ]
    return httpx.Response(response.status_code, headers=headers, content=body, request=response.request)


async def _read_error_body(response: httpx.Response, *, max_bytes: int) -> httpx.Response:
    """Read at most `max_bytes` of an error response's body, and return a copy of the response with them.

    Only the error message in the body is used, so a longer body is cut instead of read to its end. A body
    declared longer than that is not read at all, so that a provider that declares more than it sends
    cannot hold the request until the read timeout.
    """
    if _declares_more_than(response, max_bytes):
        return _with_body(response, b"")
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        total += len(chunk)
        if total >= max_bytes:
            break
    return _with_body(response, b"".join(chunks)[:max_bytes])


def _too_large(provider: str, max_bytes: int) -> ProviderResponseTooLarge:
    log.info("provider.response_too_large", provider=provider, max_bytes=max_bytes)
    return ProviderResponseTooLarge(
        f"{provider} sent a response larger than {max_bytes:,} bytes, which is not accepted."
    )


def retry_after_seconds(value: str | None, *, now: datetime | None = None) -> int | None:
    """Return a Retry-After header as whole seconds from now: it is either seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return int(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0, math.ceil((moment - (now or datetime.now(UTC))).total_seconds()))


def raise_for_provider_status(
    response: httpx.Response, *, provider: str, secret: str | None, map_error: ErrorMapper | None = None
) -> None:
    """Raise the domain error for an unsuccessful response. The body must have been read.

    For a status other than a redirect, 401, 403 or 429, the error that `map_error` returns is raised
    when it returns one, and ProviderRequestFailed otherwise.
    """
    status = response.status_code
    if status < 300:
        return

    log.info("provider.request_failed", provider=provider, status=status)
    if 300 <= status < 400:
        raise ProviderRequestFailed(
            f"{provider} responded with a redirect ({status}), which is not followed; check the base URL."
        )
    if status in (401, 403):
        raise ProviderAuthFailed(f"{provider} rejected the API key ({status}); check the key and save it again.")
    if status == 429:
        seconds = retry_after_seconds(response.headers.get("retry-after"))
        headers = {"Retry-After": str(seconds)} if seconds is not None else None
        raise ProviderRateLimited(
            f"{provider} is rate-limiting requests with this key; try again later.", headers=headers
        )

    if map_error is not None:
        mapped = map_error(response)
        if mapped is not None:
            raise mapped

    detail = provider_error_message(response, secret)
    suffix = f": {detail}" if detail else "."
    raise ProviderRequestFailed(f"{provider} responded with HTTP {status}{suffix}")
