"""ASGI middleware that gives every request an id, logs and times it, and turns unhandled errors into JSON 500s.

It sits inside Starlette's ServerErrorMiddleware, so it is the last place that can still add the
`X-Request-ID` header to a 500 response.
"""

from __future__ import annotations

import re
import time
import uuid
from contextvars import ContextVar
from typing import TYPE_CHECKING

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.typing import EventDict, WrappedLogger

from pocketllm.errors import error_json

if TYPE_CHECKING:
    from pocketllm.kit.metrics import AppMetrics

REQUEST_ID_HEADER = "x-request-id"
# The route label of requests that matched no route, so that raw paths never become label values.
UNMATCHED_ROUTE = "unmatched"
# Longer paths are cut in the log, so a client cannot write lines of any length through the URL.
MAX_LOGGED_PATH_LENGTH = 256
# An incoming id is reused only when it is short and plain, so it cannot inject text into logs.
_ACCEPTED_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# The ASGI scope of the request being handled. The router adds the matched route to this same dict, so
# `add_route` can read it for every log line written after routing, including lines from tasks the
# request started.
_request_scope: ContextVar[Scope | None] = ContextVar("pocketllm_request_scope", default=None)

log = structlog.get_logger("pocketllm.request")


class RequestIdMiddleware:
    """Middleware that binds the request id to the log context and logs each request's outcome. With
    `metrics`, it also observes the request's duration in the histogram, so that no second middleware
    wraps every request."""

    def __init__(self, app: ASGIApp, metrics: AppMetrics | None = None) -> None:
        self.app = app
        self.metrics = metrics

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
        scope_token = _request_scope.set(scope)
        try:
            await self.app(scope, receive, send_with_request_id)
        except Exception:
            log.exception(
                "request.unhandled_error",
                method=scope["method"],
                path=_loggable_path(scope),
                route=route_template(scope),
            )
            if response_started:
                raise
            response = error_json(500, "internal_error", "Internal server error; the request id is logged.")
            await response(scope, receive, send_with_request_id)
        finally:
            seconds = time.perf_counter() - started
            route = route_template(scope)
            # user_id comes from the context: the auth dependency binds it there for authenticated requests.
            # NOTE: a BaseHTTPMiddleware between this one and the router runs the handler in a child task.
            # The user_id bound there never reaches this line, and the user id test in test_logging.py fails.
            log.info(
                "request.completed",
                method=scope["method"],
                route=route,
                path=_loggable_path(scope),
                status=status_code,
                duration_ms=round(seconds * 1000, 1),
            )
            if self.metrics is not None:
                self.metrics.observe_request(scope["method"], route, status_code, seconds)
            _request_scope.reset(scope_token)
            structlog.contextvars.unbind_contextvars("request_id", "user_id")


def route_template(scope: Scope) -> str:
    """Return the path template of the route that matched the request, such as `/v1/chats/{chat_id}`.

    Requests that matched no route, or were rejected before routing, get `unmatched`. A 405 response
    carries the template of the route that has the path but not the method.
    """
    path_format = getattr(scope.get("route"), "path_format", None)
    return path_format if isinstance(path_format, str) else UNMATCHED_ROUTE


def add_route(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """structlog processor: add the matched route template to lines written while a request is handled."""
    scope = _request_scope.get()
    if scope is not None and "route" in scope and "route" not in event_dict:
        event_dict["route"] = route_template(scope)
    return event_dict


def _loggable_path(scope: Scope) -> str:
    """Return the path without its query string, with control characters escaped so that it cannot add raw
    bytes or line breaks to the log, and cut to MAX_LOGGED_PATH_LENGTH characters."""
    path: str = scope["path"]
    if not path.isprintable():
        path = path.encode("unicode_escape").decode("ascii")
    return path[:MAX_LOGGED_PATH_LENGTH]


def _incoming_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            return candidate if _ACCEPTED_REQUEST_ID.match(candidate) else None
    return None
