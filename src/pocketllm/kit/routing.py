"""The router and route classes every router uses, and the request body size limits.

Each route has a body size limit. Routes that take a JSON body allow MAX_JSON_BODY_BYTES, and file uploads
allow the avatar limit plus MULTIPART_OVERHEAD_BYTES. Routes that take no body, and requests that reach no
JsonBodyRoute at all, allow DEFAULT_MAX_BODY_BYTES. The limit is enforced on the ASGI `receive` channel,
so a declared Content-Length over it is rejected before any of the body is read, and a chunked body
without Content-Length is cut off as soon as the bytes received pass it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi import Request, Response, params
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute, APIRouter
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Chat messages are the largest JSON bodies (100,000 characters, up to four bytes each in UTF-8).
MAX_JSON_BODY_BYTES = 1024 * 1024
# For routes that take no body. The shipped client sends `{}` to some of them.
DEFAULT_MAX_BODY_BYTES = 64 * 1024
# Added to the AVATAR_MAX_BYTES setting for an upload: the multipart boundaries, part headers and file name.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_JSON_DEPTH = 32
# NaN and Infinity as Python's parser reads them, and exponents of three digits, which may overflow a float.
_MAYBE_NOT_FINITE = re.compile(rb"NaN|Infinity|\d[eE][+-]?\d{3}")
_NOT_FINITE_MESSAGE = "Numbers must be finite: NaN, Infinity and numbers beyond about 1.8e308 are not JSON"
# The error types of the 422 for a body the databases cannot store.
_STRING_ERROR = "string_not_storable"
_NUMBER_ERROR = "number_not_storable"
_DEPTH_ERROR = "json_too_deep"
_DEPTH_MESSAGE = f"Nesting deeper than {MAX_JSON_DEPTH} levels is not accepted"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_BODY_LIMIT_SCOPE_KEY = "pocketllm.body_limit"


class PayloadTooLarge(HTTPException):
    """A request body over its route's limit: 413 with the code `payload_too_large`.

    It is an HTTPException because FastAPI re-raises those from body parsing, where any other exception
    becomes a 400 "error parsing the body".
    """

    def __init__(self, max_bytes: int) -> None:
        super().__init__(
            status_code=413,
            detail=f"The request body is larger than {format_bytes(max_bytes)}, the limit for this route. "
            "Send a smaller body.",
        )


@dataclass
class _BodyLimit:
    """The body size limit of one request and the body bytes received so far."""

    max_bytes: int
    declared_bytes: int | None
    received_bytes: int = 0

    def check(self) -> None:
        declared = self.declared_bytes or 0
        if declared > self.max_bytes or self.received_bytes > self.max_bytes:
            raise PayloadTooLarge(self.max_bytes)


def _start_body_limit(scope: Scope, receive: Receive, max_bytes: int) -> tuple[_BodyLimit, Receive]:
    """Store a body limit in the scope and return it with a `receive` that counts the body against it."""
    limit = _BodyLimit(max_bytes=max_bytes, declared_bytes=_declared_length(scope))
    # The scope stores the object itself, so a route that changes `max_bytes` through a copy of the scope
    # still changes the limit this `receive` checks.
    scope[_BODY_LIMIT_SCOPE_KEY] = limit

    async def receive_within_limit() -> Message:
        limit.check()
        message = await receive()
        if message["type"] == "http.request":
            limit.received_bytes += len(message.get("body", b""))
            limit.check()
        return message

    return limit, receive_within_limit


def _declared_length(scope: Scope) -> int | None:
    value = Headers(scope=scope).get("content-length", "")
    # isdigit alone accepts characters such as "²" that int() rejects.
    return int(value) if value.isascii() and value.isdigit() else None


def format_bytes(size: int) -> str:
    """Format a byte count as MiB or KiB when it is a whole number of them, else as bytes."""
    if size >= 1024 * 1024 and size % (1024 * 1024) == 0:
        return f"{size // (1024 * 1024)} MiB"
    if size >= 1024 and size % 1024 == 0:
        return f"{size // 1024} KiB"
    return f"{size:,} bytes"


class BodySizeLimitMiddleware:
    """Limits every request body to DEFAULT_MAX_BODY_BYTES unless the matched JsonBodyRoute sets its own limit.

    Exceeding the limit raises PayloadTooLarge from `receive`, which the app's HTTPException handler turns
    into a 413 response.
    """

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        _, limited_receive = _start_body_limit(scope, receive, self.max_bytes)
        await self.app(scope, limited_receive, send)


class PrefixRouter(APIRouter):
    """An APIRouter that rules itself out of a request in one search when the path lacks its prefix.

    FastAPI (0.165) tries every route of every included router in turn, with the regular expression and
    scope bookkeeping of each, so a request for the last router paid for the routes of all routers before
    it. The path of each of this router's routes contains its prefix, whatever prefix or root path it is
    included under, so a request path without it cannot match. A prefix with a path parameter matches
    paths it does not contain literally, so it gets the full check.
    """

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        prefix = self.prefix
        if prefix and "{" not in prefix and prefix not in scope["path"]:
            return Match.NONE, {}
        return super().matches(scope)


class JsonBodyRoute(APIRoute):
    """Applies the route's body size limit (413), and rejects JSON bodies with 422 when they contain
    strings with NUL characters or unpaired surrogates, numbers that are not finite, or nest deeper than
    MAX_JSON_DEPTH.

    PostgreSQL cannot store U+0000, neither database driver can encode an unpaired surrogate, and very
    deep nesting cannot be serialised back into a response. Python's JSON parser accepts NaN, Infinity
    and numbers too large for a float (as infinity), which are not JSON: PostgreSQL rejects them, and
    SQLite stores text that its JSON functions then fail to read. Stored, any of them would turn later
    reads into server errors, so every route rejects them up front with the same 422.
    """

    def max_body_bytes(self, scope: Scope) -> int:
        """Return this route's body size limit in bytes."""
        if self.body_field is None:
            return DEFAULT_MAX_BODY_BYTES
        if isinstance(self.body_field.field_info, params.Form):
            # NOTE: the avatar is the only upload (multipart form) route. A new upload route with another
            # size limit needs its own rule here.
            avatar_max_bytes: int = scope["app"].state.settings.avatar_max_bytes
            return avatar_max_bytes + MULTIPART_OVERHEAD_BYTES
        return MAX_JSON_BODY_BYTES

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        max_bytes = self.max_body_bytes(scope)
        limit = scope.get(_BODY_LIMIT_SCOPE_KEY)
        if isinstance(limit, _BodyLimit):
            # BodySizeLimitMiddleware already counts the body in the `receive` it passed on.
            limit.max_bytes = max_bytes
        else:
            limit, receive = _start_body_limit(scope, receive, max_bytes)
        # Rejects a declared Content-Length over the limit before the handler runs.
        limit.check()
        await super().handle(scope, receive, send)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def check_then_handle(request: Request) -> Response:
            if b"%00" in request.scope["query_string"]:
                _check_query(request)
            # Media types are case-insensitive, and FastAPI parses "Application/JSON" as JSON too.
            if request.method in _BODY_METHODS and "json" in request.headers.get("content-type", "").lower():
                await _check_json_body(request)
            return await handler(request)

        return check_then_handle


def _check_query(request: Request) -> None:
    """Reject query parameters with NUL characters, which PostgreSQL cannot take even as a filter value."""
    for name, value in request.query_params.multi_items():
        message = _string_problem(name) or _string_problem(value)
        if message:
            raise RequestValidationError([{"type": _STRING_ERROR, "loc": ("query", name), "msg": message}])


async def _check_json_body(request: Request) -> None:
    # Starlette keeps the body on the request, so the handler below does not read it again. The `receive`
    # from JsonBodyRoute.handle raises PayloadTooLarge once the body passes the route's limit.
    try:
        body = await request.body()
    except ClientDisconnect:
        # The client closed the connection before the whole body arrived. FastAPI rejects a body it cannot
        # read with this 400, and so does this check, so the log and the metrics record a client's failure.
        raise HTTPException(400, "The connection closed before the whole request body arrived.") from None

    # Cheap tests first, so that ordinary bodies are not parsed twice.
    suspicious = (
        b"\\u0000" in body or b"\x00" in body or b"\\ud" in body.lower() or _MAYBE_NOT_FINITE.search(body) is not None
    )
    if not suspicious and body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return
    try:
        document = json.loads(body)
    except RecursionError:
        # Python's parser gives up on nesting about a thousand levels deep, which is too deep anyway.
        raise RequestValidationError([{"type": _DEPTH_ERROR, "loc": ("body",), "msg": _DEPTH_MESSAGE}]) from None
    except ValueError:
        return  # not JSON: the handler's own parsing reports it
    problem = _find_problem(document, ("body",), depth=0)
    if problem is not None:
        location, kind, message = problem
        raise RequestValidationError([{"type": kind, "loc": location, "msg": message}])


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "Text must not contain NUL characters (U+0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "Text must not contain unpaired surrogates (invalid \\ud800-\\udfff escapes)"
    return None


def _find_problem(
    value: Any, location: tuple[str | int, ...], *, depth: int
) -> tuple[tuple[str | int, ...], str, str] | None:
    """Return the location, error type and message of the first value in `value` that cannot be stored."""
    if depth >= MAX_JSON_DEPTH and isinstance(value, dict | list):
        # The document itself is at depth 0, so this object or array is nested one level too deep.
        return location, _DEPTH_ERROR, _DEPTH_MESSAGE
    if isinstance(value, str):
        message = _string_problem(value)
        return (location, _STRING_ERROR, message) if message else None
    if isinstance(value, float) and not math.isfinite(value):
        return location, _NUMBER_ERROR, _NOT_FINITE_MESSAGE
    if isinstance(value, dict):
        for key, item in value.items():
            message = _string_problem(key)
            if message:
                return location, _STRING_ERROR, message
            found = _find_problem(item, (*location, key), depth=depth + 1)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _find_problem(item, (*location, index), depth=depth + 1)
            if found is not None:
                return found
    return None
