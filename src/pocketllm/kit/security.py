"""HTTP hardening: security headers on every response, and the request body size limits.

The limits themselves live in `pocketllm.kit.routing`, beside the route class that sets each route's
limit.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pocketllm.config import Settings
from pocketllm.kit.routing import BodySizeLimitMiddleware

# API responses are JSON or event streams, never pages: nothing may load, run or frame them.
API_CONTENT_SECURITY_POLICY = "default-src 'none'; frame-ancestors 'none'"


class SecurityHeadersMiddleware:
    """Adds the security headers to every HTTP response, keeping any header that the route set itself.

    `paths_without_csp` lists the documentation pages. Their HTML runs an inline script and loads Swagger
    UI or ReDoc from a CDN, which the API's Content-Security-Policy forbids. They get the other headers.
    """

    def __init__(self, app: ASGIApp, *, hsts_max_age_seconds: int, paths_without_csp: Iterable[str]) -> None:
        self.app = app
        self.paths_without_csp = frozenset(paths_without_csp)
        common = [
            (b"x-content-type-options", b"nosniff"),
            (b"x-frame-options", b"DENY"),
            (b"referrer-policy", b"no-referrer"),
            # Sign-in and refresh responses carry tokens without the request carrying Authorization, so
            # every response is kept out of caches unless its route chose a Cache-Control of its own.
            (b"cache-control", b"no-store"),
        ]
        if hsts_max_age_seconds > 0:
            common.append((b"strict-transport-security", f"max-age={hsts_max_age_seconds}".encode("ascii")))
        self.page_headers = common
        self.api_headers = [*common, (b"content-security-policy", API_CONTENT_SECURITY_POLICY.encode("ascii"))]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        added = self.page_headers if _route_path(scope) in self.paths_without_csp else self.api_headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend((name, value) for name, value in added if name not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _route_path(scope: Scope) -> str:
    """Return the request path without the `root_path` prefix that a proxy mount adds."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path):
        return path[len(root_path) :] or "/"
    return path


def _documentation_paths(app: FastAPI) -> list[str]:
    paths = [app.docs_url, app.redoc_url]
    if app.docs_url:
        paths.append(app.swagger_ui_oauth2_redirect_url)
    return [path for path in paths if path]


def install_security(app: FastAPI, settings: Settings) -> None:
    """Add the body size limit middleware and the security-header middleware to `app`.

    The header middleware wraps the whole middleware stack, Starlette's ServerErrorMiddleware included,
    instead of joining `app.user_middleware`. Only from there does it see the 500 response that
    RequestIdMiddleware sends for an unhandled error, because that middleware sits outside all others
    added with `add_middleware`.
    """
    app.add_middleware(BodySizeLimitMiddleware)

    build_middleware_stack = app.build_middleware_stack
    documentation_paths = _documentation_paths(app)

    def build_middleware_stack_with_headers() -> ASGIApp:
        return SecurityHeadersMiddleware(
            build_middleware_stack(),
            hsts_max_age_seconds=settings.hsts_max_age_seconds,
            paths_without_csp=documentation_paths,
        )

    # Starlette builds the stack on the first request, so the wrapper is in place before any request.
    app.build_middleware_stack = build_middleware_stack_with_headers  # type: ignore[method-assign]
