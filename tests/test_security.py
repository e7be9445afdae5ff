"""HTTP hardening: security headers, request body size limits, CORS and the 500 response for unhandled errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Response
from starlette.types import Message

from pocketllm.app import create_app
from pocketllm.config import Settings
from pocketllm.kit.routing import DEFAULT_MAX_BODY_BYTES, MAX_JSON_BODY_BYTES, MULTIPART_OVERHEAD_BYTES
from pocketllm.kit.security import API_CONTENT_SECURITY_POLICY
from pocketllm.storage.router import PUBLIC_CACHE_CONTROL
from pocketllm.storage.router import SECURITY_HEADERS as FILE_SECURITY_HEADERS
from tests.asgi import parse_sse
from tests.fakes.provider import VALID_API_KEY, FakeProvider, make_png
from tests.helpers import auth_headers, sign_up
from tests.test_log_secrecy import capture_log_output

COMMON_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}
API_HEADERS = {
    **COMMON_HEADERS,
    "content-security-policy": API_CONTENT_SECURITY_POLICY,
    "cache-control": "no-store",
}
CHUNK_BYTES = 64 * 1024
ALLOWED_ORIGIN = "https://app.example.com"
OTHER_ORIGIN = "https://elsewhere.example.com"
BOUNDARY = "pocketllm-test-boundary"
MULTIPART_CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def assert_headers(headers: httpx.Headers, expected: dict[str, str]) -> None:
    for name, value in expected.items():
        assert headers.get_list(name) == [value], f"{name}: {headers.get_list(name)}"


@asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """Run the lifespan of an app built by a test and return a client for it."""
    async with app.router.lifespan_context(app):
        # The transport would raise an unhandled error, but the tests check the 500 response the app sends.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://pocketllm.test") as client:
            yield client


@dataclass
class RawResponse:
    status_code: int
    headers: httpx.Headers
    body: bytes
    body_bytes_read: int

    def json(self) -> Any:
        return json.loads(self.body)


async def send_raw(
    app: FastAPI,
    method: str,
    path: str,
    *,
    headers: dict[str, str],
    chunks: Iterable[bytes],
    disconnect_after_chunks: bool = False,
) -> RawResponse:
    """Send a request straight to the ASGI app, handing out the body one chunk per `receive` call.

    This shows how much of the body the app read before it responded. Without a `content-length` entry in
    `headers` the body arrives as a chunked one does, with no declared size. With `disconnect_after_chunks`
    the client disconnects after the last chunk instead of ending the body.
    """
    chunk_iterator: Iterator[bytes] = iter(chunks)
    body_bytes_read = 0
    body_complete = False
    response_complete = asyncio.Event()
    status = 0
    response_headers: list[tuple[bytes, bytes]] = []
    body_parts: list[bytes] = []

    async def receive() -> Message:
        nonlocal body_bytes_read, body_complete
        if not body_complete:
            chunk = next(chunk_iterator, None)
            if chunk is not None:
                body_bytes_read += len(chunk)
                return {"type": "http.request", "body": chunk, "more_body": True}
            if disconnect_after_chunks:
                return {"type": "http.disconnect"}
            body_complete = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await response_complete.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, response_headers
        if message["type"] == "http.response.start":
            status = message["status"]
            response_headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            body_parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                response_complete.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(name.lower().encode(), value.encode()) for name, value in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("pocketllm.test", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    decoded = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in response_headers]
    return RawResponse(status, httpx.Headers(decoded), b"".join(body_parts), body_bytes_read)


def endless_chunks(total_bytes: int, first: bytes = b"") -> Iterator[bytes]:
    """Yield `first`, then filler chunks of CHUNK_BYTES until `total_bytes` were handed out."""
    if first:
        yield first
    sent = len(first)
    while sent < total_bytes:
        yield b"a" * CHUNK_BYTES
        sent += CHUNK_BYTES


def multipart_file_head(file_name: str) -> bytes:
    """Return the start of a multipart body up to where the bytes of its `file` part begin."""
    return (
        f"--{BOUNDARY}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()


def assert_payload_too_large(response: RawResponse | httpx.Response, limit_text: str) -> None:
    assert response.status_code == 413
    body = response.json()
    assert body["code"] == "payload_too_large"
    assert limit_text in body["detail"]


@pytest.fixture
async def headers(client: httpx.AsyncClient, unique_email: str) -> dict[str, str]:
    return auth_headers(await sign_up(client, unique_email))


class TestSecurityHeaders:
    @pytest.mark.parametrize(
        ("method", "path", "status"),
        [
            ("GET", "/health", 200),
            ("GET", "/openapi.json", 200),
            ("GET", "/v1/does-not-exist", 404),
            ("GET", "/v1/auth/signup", 405),
            ("POST", "/v1/auth/signin", 422),
            ("GET", "/v1/users/profile", 401),
        ],
    )
    async def test_on_api_responses(self, client: httpx.AsyncClient, method: str, path: str, status: int) -> None:
        response = await client.request(method, path, json={} if method == "POST" else None)

        assert response.status_code == status
        assert_headers(response.headers, API_HEADERS)
        assert "strict-transport-security" not in response.headers

    async def test_on_authenticated_response(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        response = await client.get("/v1/users/profile", headers=headers)

        assert response.status_code == 200
        assert_headers(response.headers, API_HEADERS)

    @pytest.mark.parametrize("path", ["/docs", "/redoc", "/docs/oauth2-redirect"])
    async def test_docs_pages_have_no_csp(self, client: httpx.AsyncClient, path: str) -> None:
        response = await client.get(path)

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert_headers(response.headers, COMMON_HEADERS)
        assert "content-security-policy" not in response.headers

    @pytest.mark.parametrize("settings_overrides", [{"hsts_max_age_seconds": 31_536_000}])
    @pytest.mark.parametrize("path", ["/health", "/v1/does-not-exist", "/docs"])
    async def test_hsts_when_configured(self, client: httpx.AsyncClient, path: str) -> None:
        response = await client.get(path)

        assert response.headers.get_list("strict-transport-security") == ["max-age=31536000"]

    async def test_route_headers_are_kept(self, settings: Settings) -> None:
        app = create_app(settings)
        own_headers = {
            "X-Frame-Options": "SAMEORIGIN",
            "Cache-Control": "public, max-age=60",
            "Content-Security-Policy": "default-src 'self'",
        }

        async def framed_page() -> Response:
            return Response("<p>page</p>", media_type="text/html", headers=own_headers)

        app.add_api_route("/test/framed-page", framed_page)
        async with serve(app) as client:
            response = await client.get("/test/framed-page")

        assert response.status_code == 200
        assert_headers(response.headers, {name.lower(): value for name, value in own_headers.items()})
        assert_headers(response.headers, {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer"})

    async def test_file_route_keeps_its_headers(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        uploaded = await client.post(
            "/v1/users/profile/avatar", headers=headers, files={"file": ("me.png", make_png(4, 4), "image/png")}
        )
        assert uploaded.status_code == 200, uploaded.text

        response = await client.get(uploaded.json()["avatar_url"])

        assert response.status_code == 200
        assert_headers(response.headers, {name.lower(): value for name, value in FILE_SECURITY_HEADERS.items()})
        assert_headers(
            response.headers,
            {"cache-control": PUBLIC_CACHE_CONTROL, "x-frame-options": "DENY", "referrer-policy": "no-referrer"},
        )

    @pytest.mark.parametrize("settings_overrides", [{"allow_private_provider_urls": True}])
    async def test_on_event_stream(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        activated = await client.post(
            "/v1/providers/activate",
            headers=headers,
            json={"provider": "openai", "api_key": VALID_API_KEY, "base_url": fake_provider.openai_base_url},
        )
        assert activated.status_code == 200, activated.text
        imported = await client.post(
            "/v1/models/import", headers=headers, json={"provider": "openai", "models": ["gpt-4o-mini"]}
        )
        assert imported.status_code == 200, imported.text
        chat = await client.post("/v1/chats", headers=headers, json={"model_config_id": imported.json()[0]["id"]})
        assert chat.status_code == 200, chat.text

        response = await client.post(
            f"/v1/chats/{chat.json()['id']}/messages", headers=headers, json={"content": "Hello!", "stream": True}
        )

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "assistant_message" in [event for event, _ in parse_sse(response.text)]
        # The stream route sets its own Cache-Control, which is kept.
        assert_headers(response.headers, {**API_HEADERS, "cache-control": "no-store, no-transform"})


class TestUnhandledError:
    @pytest.mark.parametrize("settings_overrides", [{"log_format": "json"}])
    async def test_is_json_500_logged_once(self, settings: Settings) -> None:
        app = create_app(settings)
        internal_detail = "connection to db-internal.example:5432 refused"

        async def explode() -> None:
            raise RuntimeError(internal_detail)

        # A route added by the test: the middleware must turn any bug into a clean 500.
        app.add_api_route("/test/explode", explode)
        with capture_log_output() as output:
            async with serve(app) as client:
                response = await client.get("/test/explode", headers={"X-Request-ID": "unhandled-error-test-1"})

        assert response.status_code == 500
        assert response.json() == {
            "detail": "Internal server error; the request id is logged.",
            "code": "internal_error",
        }
        assert response.headers["x-request-id"] == "unhandled-error-test-1"
        assert_headers(response.headers, API_HEADERS)
        for leaked in (internal_detail, "RuntimeError", "Traceback", "explode"):
            assert leaked not in response.text

        records = [json.loads(line) for line in output.getvalue().splitlines() if line.strip()]
        errors = [record for record in records if record.get("event") == "request.unhandled_error"]
        assert len(errors) == 1, errors
        [error] = errors
        assert error["request_id"] == "unhandled-error-test-1"
        assert error["level"] == "error"
        assert "Traceback" in error["exception"]
        assert f"RuntimeError: {internal_detail}" in error["exception"]
        assert sum("Traceback" in str(record.get("exception", "")) for record in records) == 1


class TestClientDisconnect:
    @pytest.mark.parametrize("settings_overrides", [{"log_format": "json"}])
    async def test_disconnect_mid_body_is_400(
        self, app: FastAPI, client: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        chat = (await client.post("/v1/chats", headers=headers, json={})).json()
        path = f"/v1/chats/{chat['id']}/messages"

        with capture_log_output() as output:
            response = await send_raw(
                app,
                "POST",
                path,
                headers={**headers, "content-type": "application/json", "content-length": "100"},
                chunks=[b'{"content": "par'],
                disconnect_after_chunks=True,
            )

        assert response.status_code == 400
        assert response.json()["code"] == "bad_request"
        records = [json.loads(line) for line in output.getvalue().splitlines() if line.strip()]
        assert [record for record in records if record.get("level") == "error"] == []
        [completed] = [record for record in records if record.get("event") == "request.completed"]
        assert completed["status"] == 400
        assert (await client.get(path, headers=headers)).json() == []


class TestBodyLimits:
    async def test_declared_json_over_limit_is_not_read(self, app: FastAPI) -> None:
        response = await send_raw(
            app,
            "POST",
            "/v1/auth/signin",
            headers={"content-type": "application/json", "content-length": str(MAX_JSON_BODY_BYTES + 1)},
            chunks=endless_chunks(MAX_JSON_BODY_BYTES + 1),
        )

        assert response.status_code == 413
        assert_payload_too_large(response, "1 MiB")
        assert response.body_bytes_read == 0
        assert_headers(response.headers, API_HEADERS)
        assert response.headers["x-request-id"]

    async def test_chunked_json_is_cut_off(self, app: FastAPI) -> None:
        response = await send_raw(
            app,
            "POST",
            "/v1/auth/signin",
            headers={"content-type": "application/json"},
            chunks=endless_chunks(64 * 1024 * 1024, first=b'{"email": "a@example.com", "password": "'),
        )

        assert response.status_code == 413
        assert_payload_too_large(response, "1 MiB")
        assert response.body_bytes_read <= MAX_JSON_BODY_BYTES + CHUNK_BYTES

    async def test_json_at_limit_is_accepted(self, client: httpx.AsyncClient) -> None:
        prefix, suffix = b'{"code": "', b'"}'
        body = prefix + b"A" * (MAX_JSON_BODY_BYTES - len(prefix) - len(suffix)) + suffix
        assert len(body) == MAX_JSON_BODY_BYTES

        response = await client.post(
            "/v1/auth/validate-invite-code", content=body, headers={"Content-Type": "application/json"}
        )

        assert response.status_code != 413, response.text
        assert response.status_code < 500, response.text

    @pytest.mark.parametrize("content_type", ["application/json", "application/octet-stream"])
    async def test_body_on_route_without_body(self, client: httpx.AsyncClient, content_type: str) -> None:
        # The route reads no body, so only the declared Content-Length can reject the large one.
        small = await client.post("/v1/users/profile/deletion", content=b"{}", headers={"Content-Type": content_type})
        large = await client.post(
            "/v1/users/profile/deletion",
            content=b"{" + b" " * DEFAULT_MAX_BODY_BYTES + b"}",
            headers={"Content-Type": content_type},
        )

        assert small.status_code == 401
        assert_payload_too_large(large, "64 KiB")

    async def test_default_limit_for_other_routes(self, settings: Settings) -> None:
        app = create_app(settings)

        async def echo_size(payload: dict[str, Any]) -> dict[str, int]:
            return {"keys": len(payload)}

        # Added to the app's own router, so it is a plain APIRoute rather than a JsonBodyRoute.
        app.add_api_route("/test/echo-size", echo_size, methods=["POST"])
        async with serve(app) as client:
            small = await client.post("/test/echo-size", json={"text": "x" * 1024})
            large = await client.post("/test/echo-size", json={"text": "x" * DEFAULT_MAX_BODY_BYTES})

        assert small.status_code == 200, small.text
        assert large.status_code == 413
        assert_payload_too_large(large, "64 KiB")
        assert_headers(large.headers, API_HEADERS)


AVATAR_MAX_BYTES = 64 * 1024
AVATAR_ROUTE_LIMIT = AVATAR_MAX_BYTES + MULTIPART_OVERHEAD_BYTES


@pytest.mark.parametrize("settings_overrides", [{"avatar_max_bytes": AVATAR_MAX_BYTES}])
class TestAvatarBodyLimit:
    async def test_small_upload_is_accepted(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        response = await client.post(
            "/v1/users/profile/avatar", headers=headers, files={"file": ("me.png", make_png(4, 4), "image/png")}
        )

        assert response.status_code == 200, response.text

    async def test_file_over_avatar_limit_reaches_route(
        self, client: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        # Larger than the 64 KiB default and than AVATAR_MAX_BYTES, smaller than the route's body limit.
        content = make_png(4, 4) + bytes(AVATAR_MAX_BYTES)

        response = await client.post(
            "/v1/users/profile/avatar", headers=headers, files={"file": ("big.png", content, "image/png")}
        )

        assert response.status_code == 413
        assert response.json()["code"] == "avatar_too_large"

    async def test_declared_body_over_limit_is_not_read(self, app: FastAPI, headers: dict[str, str]) -> None:
        response = await send_raw(
            app,
            "POST",
            "/v1/users/profile/avatar",
            headers={
                **headers,
                "content-type": MULTIPART_CONTENT_TYPE,
                "content-length": str(AVATAR_ROUTE_LIMIT + 1),
            },
            chunks=endless_chunks(AVATAR_ROUTE_LIMIT + 1),
        )

        assert_payload_too_large(response, "128 KiB")
        assert response.body_bytes_read == 0

    async def test_chunked_upload_is_cut_off(self, app: FastAPI, headers: dict[str, str]) -> None:
        response = await send_raw(
            app,
            "POST",
            "/v1/users/profile/avatar",
            headers={**headers, "content-type": MULTIPART_CONTENT_TYPE},
            chunks=endless_chunks(64 * 1024 * 1024, first=multipart_file_head("huge.png") + make_png(4, 4)),
        )

        assert_payload_too_large(response, "128 KiB")
        assert response.body_bytes_read <= AVATAR_ROUTE_LIMIT + CHUNK_BYTES


class TestCors:
    @pytest.mark.parametrize("settings_overrides", [{"cors_origins": [ALLOWED_ORIGIN]}])
    async def test_listed_origin_is_allowed(self, client: httpx.AsyncClient) -> None:
        preflight = await client.options(
            "/v1/auth/signin",
            headers={"Origin": ALLOWED_ORIGIN, "Access-Control-Request-Method": "POST"},
        )
        simple = await client.get("/health", headers={"Origin": ALLOWED_ORIGIN})

        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert simple.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
        assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()

    @pytest.mark.parametrize("settings_overrides", [{"cors_origins": [ALLOWED_ORIGIN]}])
    async def test_other_origin_is_not_allowed(self, client: httpx.AsyncClient) -> None:
        preflight = await client.options(
            "/v1/auth/signin",
            headers={"Origin": OTHER_ORIGIN, "Access-Control-Request-Method": "POST"},
        )
        simple = await client.get("/health", headers={"Origin": OTHER_ORIGIN})

        assert preflight.status_code == 400
        assert "access-control-allow-origin" not in preflight.headers
        assert "access-control-allow-origin" not in simple.headers

    @pytest.mark.parametrize("origin", [ALLOWED_ORIGIN, "http://localhost:3000"])
    async def test_nothing_allowed_by_default(self, client: httpx.AsyncClient, origin: str) -> None:
        preflight = await client.options(
            "/v1/auth/signin",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST"},
        )
        simple = await client.get("/health", headers={"Origin": origin})

        assert preflight.status_code == 405
        assert "access-control-allow-origin" not in preflight.headers
        assert "access-control-allow-origin" not in simple.headers
