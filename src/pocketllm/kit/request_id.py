"""ASGI middleware that gives every request an id, logs it, and turns unhandled errors into JSON 500s.

It sits inside Starlette's ServerErrorMiddleware, so it is the last place that can still add the
`X-Request-ID` header to a 500 response.
"""

from __future__ import annotations

import re
import time
import uuid

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pocketllm.errors import error_json

REQUEST_ID_HEADER = "x-request-id"
# An incoming id is reused only when it is short and plain, so it cannot inject text into logs.
_ACCEPTED_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

log = structlog.get_logger("pocketllm.request")


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = _incoming_request_id(scope) or uuid.uuid4().hex
        header_value = request_id.encode("latin-1")
        status_code = 500
        response_started = False
        started = time.perf_counter()

        async def send_with_request_id(message: Message) -> None:
            nonlocal status_code, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status_code = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", header_value))
                message["headers"] = headers
            await send(message)

        structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_request_id)
        except Exception:
            log.exception("request.unhandled_error", method=scope["method"], path=_printable(scope["path"]))
            if response_started:
                raise
            response = error_json(500, "internal_error", "Internal server error; the request id is logged.")
            await response(scope, receive, send_with_request_id)
        finally:
            log.info(
                "request.completed",
                method=scope["method"],
                path=_printable(scope["path"]),
                status=status_code,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
            )
            structlog.contextvars.unbind_contextvars("request_id", "user_id")


def _printable(path: str) -> str:
    """Escape control characters, so a path cannot add raw bytes or line breaks to the log."""
    if path.isprintable():
        return path
    return path.encode("unicode_escape").decode("ascii")


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            return candidate if _ACCEPTED_REQUEST_ID.match(candidate) else None
    return None
