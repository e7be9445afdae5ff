"""App-wide behaviour: error bodies, request ids, OpenAPI, CORS and what reaches the logs."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy.engine import make_url

import pocketllm.db.engine as engine_module
from pocketllm.app import create_app
from pocketllm.config import Settings
from pocketllm.kit.memory import MemoryTrimmer, can_trim
from tests.helpers import DEFAULT_PASSWORD, auth_headers, sign_up

API_ROUTES = {
    ("GET", "/health"),
    ("GET", "/v1/health"),
    ("GET", "/health/ready"),
    ("POST", "/v1/auth/signup"),
    ("POST", "/v1/auth/signin"),
    ("POST", "/v1/auth/signout"),
    ("POST", "/v1/auth/refresh"),
    ("POST", "/v1/auth/password/change"),
    ("POST", "/v1/auth/validate-invite-code"),
    ("POST", "/v1/auth/signin/magic-link"),
    ("POST", "/v1/auth/signin/otp"),
    ("POST", "/v1/auth/signin/oauth"),
    ("GET", "/v1/users/profile"),
    ("GET", "/v1/providers"),
    ("GET", "/v1/providers/status"),
    ("POST", "/v1/providers/activate"),
    ("PATCH", "/v1/providers/{provider}"),
    ("DELETE", "/v1/providers/{provider}"),
    ("GET", "/v1/providers/{provider}/models"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/saved"),
    ("POST", "/v1/models/import"),
    ("GET", "/v1/models/{model_id}"),
    ("PATCH", "/v1/models/{model_id}"),
    ("DELETE", "/v1/models/{model_id}"),
    ("POST", "/v1/models/{model_id}/default"),
    ("POST", "/v1/waitlist"),
    ("GET", "/v1/referral/list"),
    ("POST", "/v1/referral/send"),
}


class TestErrors:
    async def test_unknown_route_is_json_404(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/does-not-exist")

        assert response.status_code == 404
        assert response.json() == {"detail": "Not Found", "code": "not_found"}

    async def test_wrong_method_is_json_405(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/auth/signup")

        assert response.status_code == 405
        assert response.json()["code"] == "method_not_allowed"

    async def test_malformed_json_is_422_with_message(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/v1/auth/signin",
            content=b'{"email": "a@example.com", "password": ',
            headers={"Content-Type": "application/json"},
        )

        assert response.status_code == 422
        body = response.json()
        assert body["code"] == "validation_error"
        assert isinstance(body["detail"], list)
        assert body["message"].startswith("Invalid request")

    async def test_validation_message_names_fields(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/auth/signup", json={"password": 12})

        message = response.json()["message"]
        assert "email: Field required" in message
        assert "password" in message

    async def test_unhandled_error_is_json_500_with_request_id(self, settings: Settings) -> None:
        app = create_app(settings)

        async def explode() -> None:
            raise RuntimeError("boom")

        # A route added by the test: the middleware under test must turn any bug into a clean 500.
        app.add_api_route("/test/explode", explode)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://pocketllm.test") as client:
                response = await client.get("/test/explode")

        assert response.status_code == 500
        assert response.json() == {
            "detail": "Internal server error; the request id is logged.",
            "code": "internal_error",
        }
        assert response.headers["x-request-id"]
        assert "boom" not in response.text


class TestRequestId:
    @pytest.mark.parametrize(
        ("method", "path", "status"),
        [
            ("GET", "/health", 200),
            ("GET", "/nowhere", 404),
            ("POST", "/v1/auth/signin", 422),
            ("GET", "/v1/users/profile", 401),
        ],
    )
    async def test_every_response_has_one(self, client: httpx.AsyncClient, method: str, path: str, status: int) -> None:
        response = await client.request(method, path, json={} if method == "POST" else None)

        assert response.status_code == status
        assert len(response.headers["x-request-id"]) >= 16

    async def test_plain_incoming_id_is_kept(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/health", headers={"X-Request-ID": "trace-1234.abc"})

        assert response.headers["x-request-id"] == "trace-1234.abc"

    async def test_unsafe_incoming_id_is_replaced(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/health", headers={"X-Request-ID": "evil id\tinjected"})

        assert response.headers["x-request-id"] != "evil id\tinjected"
        assert response.headers["x-request-id"].isalnum()

    async def test_ids_differ_between_requests(self, client: httpx.AsyncClient) -> None:
        first = await client.get("/health")
        second = await client.get("/health")

        assert first.headers["x-request-id"] != second.headers["x-request-id"]


class TestOpenApi:
    async def test_lists_every_route(self, client: httpx.AsyncClient) -> None:
        document = (await client.get("/openapi.json")).json()

        listed = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
        assert listed >= API_ROUTES

    async def test_documents_error_responses(self, client: httpx.AsyncClient) -> None:
        document = (await client.get("/openapi.json")).json()

        signup = document["paths"]["/v1/auth/signup"]["post"]["responses"]
        assert {"200", "400", "403", "422"} <= set(signup)
        assert "invite_required" in signup["403"]["description"]
        profile = document["paths"]["/v1/users/profile"]["get"]["responses"]
        assert "401" in profile
        assert "ErrorBody" in document["components"]["schemas"]
        assert "UserProfile" in document["components"]["schemas"]

    async def test_swagger_ui_is_served(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/docs")

        assert response.status_code == 200
        assert "swagger" in response.text.lower()


@pytest.mark.parametrize("settings_overrides", [{"cors_origins": ["https://app.example.com"]}])
async def test_cors_allows_configured_origin(client: httpx.AsyncClient) -> None:
    response = await client.options(
        "/v1/auth/signin",
        headers={"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"},
    )

    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://app.example.com"


async def test_cors_is_off_by_default(client: httpx.AsyncClient) -> None:
    response = await client.get("/health", headers={"Origin": "https://app.example.com"})

    assert "access-control-allow-origin" not in response.headers


async def test_logs_hold_no_secrets(
    client: httpx.AsyncClient, unique_email: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    body = await sign_up(client, unique_email)
    tokens: dict[str, Any] = body["tokens"]
    await client.post("/v1/auth/signin", json={"email": unique_email, "password": "Wr0ngPassword!"})
    await client.post("/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    await client.post(
        "/v1/auth/password/change", headers=auth_headers(body), json={"old": DEFAULT_PASSWORD, "new": "N3wSecret!!"}
    )

    logged = caplog.text
    assert "request.completed" in logged
    for secret in (DEFAULT_PASSWORD, "Wr0ngPassword!", "N3wSecret!!", tokens["access_token"], tokens["refresh_token"]):
        assert secret not in logged


class TestBodyChecks:
    @pytest.mark.parametrize(
        ("path", "payload", "location"),
        [
            ("/v1/auth/validate-invite-code", {"code": "AB\u0000CD"}, ["body", "code"]),
            (
                "/v1/auth/signup",
                {"email": "nul@example.com", "password": DEFAULT_PASSWORD, "full_name": "A\u0000B"},
                ["body", "full_name"],
            ),
            (
                "/v1/auth/signup",
                {"email": "nul@example.com", "password": DEFAULT_PASSWORD, "invite_code": "x", "extra": {"k\u0000": 1}},
                ["body", "extra"],
            ),
        ],
    )
    async def test_nul_characters_are_422(
        self, client: httpx.AsyncClient, path: str, payload: dict[str, Any], location: list[str]
    ) -> None:
        response = await client.post(path, json=payload)

        assert response.status_code == 422, response.text
        body = response.json()
        assert body["code"] == "validation_error"
        assert body["detail"][0]["loc"] == location
        assert "NUL" in body["message"]

    @pytest.mark.parametrize("query", ["job_type=%00", "job_type=image%00generation", "status=pending&job_type=a%00"])
    async def test_nul_in_query_is_422(self, client: httpx.AsyncClient, unique_email: str, query: str) -> None:
        headers = auth_headers(await sign_up(client, unique_email))

        response = await client.get(f"/v1/jobs?{query}", headers=headers)

        assert response.status_code == 422, response.text
        body = response.json()
        assert body["code"] == "validation_error"
        assert body["detail"][0]["loc"] == ["query", "job_type"]
        assert "NUL" in body["message"]

    async def test_escaped_backslash_is_not_nul(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/auth/validate-invite-code", json={"code": "AB\\u0000CD"})

        assert response.status_code == 400
        assert response.json()["code"] == "invite_code_not_found"

    async def test_oversized_body_is_413(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/v1/auth/signin", json={"email": "big@example.com", "password": "x" * (2 * 1024 * 1024)}
        )

        assert response.status_code == 413
        assert response.json()["code"] == "payload_too_large"


@pytest.mark.parametrize("settings_overrides", [{"database_pool_size": 1, "database_pool_timeout_seconds": 0.2}])
async def test_busy_pool_gives_503(app: FastAPI, client: httpx.AsyncClient, unique_email: str) -> None:
    headers = auth_headers(await sign_up(client, unique_email))

    # The test takes the only pooled connection, so the request finds none free.
    async with app.state.database.read_connection():
        busy = await client.get("/v1/users/profile", headers=headers)
    after = await client.get("/v1/users/profile", headers=headers)

    assert busy.status_code == 503
    assert busy.json()["code"] == "database_busy"
    assert busy.headers["Retry-After"] == "1"
    assert after.status_code == 200


@dataclass
class ShortBusyApp:
    """An app on SQLite whose connections wait 0.2 s for a locked database, with a signed-up user and a chat."""

    client: httpx.AsyncClient
    headers: dict[str, str]
    chat_id: str
    database_path: str


@pytest.fixture
async def short_busy_app(
    settings: Settings, unique_email: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ShortBusyApp]:
    if not settings.effective_database_url.startswith("sqlite"):
        pytest.skip("runs against SQLite only")
    # A shorter busy timeout than the 15 s of the server's connections, which read it when they open.
    monkeypatch.setattr(engine_module, "SQLITE_BUSY_TIMEOUT_MS", 200)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://pocketllm.test") as client:
            headers = auth_headers(await sign_up(client, unique_email))
            chat = (await client.post("/v1/chats", headers=headers, json={"title": "Locked"})).json()
            database_path = make_url(settings.effective_database_url).database or ""
            yield ShortBusyApp(client, headers, chat["id"], database_path)


async def test_locked_sqlite_database_gives_503(short_busy_app: ShortBusyApp) -> None:
    client, headers = short_busy_app.client, short_busy_app.headers
    # Another process holds the write lock, as `pocketllm worker` or a backup tool could. It is taken on a
    # thread, because a write of the app's own (the mail sender's) may hold the lock for a moment and needs
    # the event loop to finish.
    other = sqlite3.connect(short_busy_app.database_path, isolation_level=None, check_same_thread=False)
    await asyncio.to_thread(other.execute, "BEGIN IMMEDIATE")
    try:
        created = await client.post("/v1/chats", headers=headers, json={"title": "Waits"})
        posted = await client.post(
            f"/v1/chats/{short_busy_app.chat_id}/messages",
            headers=headers,
            json={"content": "Hello", "role": "system"},
        )
    finally:
        other.rollback()
        other.close()
    after = await client.post("/v1/chats", headers=headers, json={"title": "After"})

    for response in (created, posted):
        assert response.status_code == 503
        assert response.json()["code"] == "database_busy"
        assert response.headers["Retry-After"] == "1"
    assert after.status_code == 200


async def test_queued_sqlite_writes_wait_one_busy_timeout(short_busy_app: ShortBusyApp) -> None:
    locked = threading.Event()

    def hold_lock(seconds: float) -> None:
        other = sqlite3.connect(short_busy_app.database_path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            locked.set()
            # Another process keeps the write lock this long, then lets go.
            time.sleep(seconds)
            other.rollback()
        finally:
            other.close()

    holder = asyncio.create_task(asyncio.to_thread(hold_lock, 1.0))
    await asyncio.to_thread(locked.wait, 10)
    # Replies queue in this process for the write lock, one behind the other.
    responses = await asyncio.gather(
        *(
            short_busy_app.client.post(
                f"/v1/chats/{short_busy_app.chat_id}/messages",
                headers=short_busy_app.headers,
                json={"content": f"Hi {number}"},
            )
            for number in range(8)
        )
    )
    await holder

    # One after the other, eight waits of 0.2 s would outlast the 1 s lock. Each now waits 0.2 s at most in the
    # queue, and 0.2 s for the lock.
    assert [response.status_code for response in responses] == [503] * 8
    assert {response.json()["code"] for response in responses} == {"database_busy"}


@pytest.mark.skipif(not can_trim(), reason="needs glibc's malloc_trim")
async def test_lifespan_runs_memory_trimmer(settings: Settings) -> None:
    app = create_app(settings)

    async with app.router.lifespan_context(app):
        running = {task.get_name() for task in asyncio.all_tasks() if not task.done()}
        trimmer = app.state.memory_trimmer
    stopped = {task.get_name() for task in asyncio.all_tasks() if not task.done()}

    assert isinstance(trimmer, MemoryTrimmer)
    assert "memory-trimmer" in running
    assert "memory-trimmer" not in stopped
