"""Rate limits on the routes: sign-in, sign-up, password change, waitlist, referral invites, chat messages and
job creation."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from pocketllm.app import create_app
from tests.conftest import make_settings
from tests.helpers import DEFAULT_PASSWORD, auth_headers, sign_up
from tests.kit.test_ratelimit import REDIS_URL, require_redis

BASE_URL = "http://pocketllm.test"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {
        "rate_limit_enabled": True,
        "trusted_proxies": "10.0.0.2",
        "rate_limit_signin": "3/minute",
        "rate_limit_signin_per_email": "2/minute",
        "rate_limit_signup": "2/minute",
        "rate_limit_password_change": "1/minute",
        "rate_limit_waitlist": "1/minute",
        "rate_limit_referral_send": "1/hour",
        "rate_limit_chat_messages": "1/minute",
        "rate_limit_jobs": "1/minute",
    }


def _client_from(app: FastAPI, peer: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(peer, 1234))
    return httpx.AsyncClient(transport=transport, base_url=BASE_URL)


def _assert_rate_limited(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["code"] == "rate_limited"
    retry_after = response.headers["Retry-After"]
    assert retry_after.isdigit()
    assert int(retry_after) >= 1


async def _sign_in(client: httpx.AsyncClient, email: str, **kwargs: Any) -> httpx.Response:
    return await client.post("/v1/auth/signin", json={"email": email, "password": "wrong-password"}, **kwargs)


async def test_signin_address_limit(app: FastAPI) -> None:
    async with _client_from(app, "198.51.100.1") as client:
        for index in range(3):
            response = await _sign_in(client, f"nobody-{index}@example.com")
            assert response.status_code == 401, response.text

        _assert_rate_limited(await _sign_in(client, "nobody-4@example.com"))


async def test_signin_email_limit_across_addresses(app: FastAPI, unique_email: str) -> None:
    for peer in ("198.51.100.1", "198.51.100.2"):
        async with _client_from(app, peer) as client:
            response = await _sign_in(client, unique_email)
            assert response.status_code == 401, response.text

    # A spelling variant of the same address counts against the same account.
    async with _client_from(app, "198.51.100.3") as client:
        _assert_rate_limited(await _sign_in(client, f"  {unique_email.upper()} "))


async def test_signin_untrusted_peer_rotating_forwarded_for(app: FastAPI) -> None:
    async with _client_from(app, "198.51.100.1") as client:
        for index in range(3):
            headers = {"X-Forwarded-For": f"203.0.113.{index}"}
            response = await _sign_in(client, f"nobody-{index}@example.com", headers=headers)
            assert response.status_code == 401, response.text

        headers = {"X-Forwarded-For": "203.0.113.99"}
        _assert_rate_limited(await _sign_in(client, "nobody-4@example.com", headers=headers))


async def test_signin_trusted_proxy_forwarded_for(app: FastAPI) -> None:
    async with _client_from(app, "10.0.0.2") as client:
        for index in range(3):
            headers = {"X-Forwarded-For": "203.0.113.1"}
            response = await _sign_in(client, f"nobody-{index}@example.com", headers=headers)
            assert response.status_code == 401, response.text
        _assert_rate_limited(await _sign_in(client, "nobody-4@example.com", headers={"X-Forwarded-For": "203.0.113.1"}))

        # Another client behind the same proxy has its own count.
        other = await _sign_in(client, "nobody-5@example.com", headers={"X-Forwarded-For": "203.0.113.2"})
        assert other.status_code == 401, other.text


async def test_signup_limit(app: FastAPI) -> None:
    async with _client_from(app, "198.51.100.1") as client:
        for _ in range(2):
            await sign_up(client, f"user-{uuid.uuid4().hex[:10]}@example.com")

        response = await client.post(
            "/v1/auth/signup", json={"email": f"user-{uuid.uuid4().hex[:10]}@example.com", "password": DEFAULT_PASSWORD}
        )
        _assert_rate_limited(response)


async def test_password_change_limit(app: FastAPI, unique_email: str) -> None:
    async with _client_from(app, "198.51.100.1") as client:
        headers = auth_headers(await sign_up(client, unique_email))
        body = {"old": "wrong-password", "new": "An0ther-Secret!"}

        first = await client.post("/v1/auth/password/change", json=body, headers=headers)
        assert first.status_code != 429, first.text

        _assert_rate_limited(await client.post("/v1/auth/password/change", json=body, headers=headers))


async def test_waitlist_limit(app: FastAPI) -> None:
    async with _client_from(app, "198.51.100.1") as client:
        first = await client.post("/v1/waitlist", json={"email": "ada@example.com"})
        assert first.status_code == 201, first.text

        _assert_rate_limited(await client.post("/v1/waitlist", json={"email": "grace@example.com"}))


async def test_referral_send_limit(app: FastAPI, unique_email: str) -> None:
    async with _client_from(app, "198.51.100.1") as client:
        headers = auth_headers(await sign_up(client, unique_email))

        first = await client.post("/v1/referral/send", json={"email": "grace@example.com"}, headers=headers)
        assert first.status_code == 201, first.text

        second = await client.post("/v1/referral/send", json={"email": "alan@example.com"}, headers=headers)
        _assert_rate_limited(second)


async def test_chat_messages_limit_before_lookup(app: FastAPI, unique_email: str) -> None:
    async with _client_from(app, "198.51.100.1") as client:
        headers = auth_headers(await sign_up(client, unique_email))
        path = f"/v1/chats/{uuid.uuid4()}/messages"
        body = {"role": "user", "content": "Hello"}

        first = await client.post(path, json=body, headers=headers)
        assert first.status_code == 404, first.text

        # The limit is checked before the chat is looked up or a provider is called.
        _assert_rate_limited(await client.post(path, json=body, headers=headers))


async def test_job_creation_limit_per_user(app: FastAPI, unique_email: str) -> None:
    async with _client_from(app, "198.51.100.1") as client:
        headers = auth_headers(await sign_up(client, unique_email))
        other = auth_headers(await sign_up(client, f"other-{unique_email}"))
        body = {"job_type": "image_generation", "input_data": {"prompt": "A fox", "model": "dall-e-2"}}

        first = await client.post("/v1/jobs/image-generation", json=body, headers=headers)
        assert first.json()["code"] == "no_image_provider", first.text

        _assert_rate_limited(await client.post("/v1/jobs/image-generation", json=body, headers=headers))
        # The count is per user.
        other_response = await client.post("/v1/jobs/image-generation", json=body, headers=other)
        assert other_response.json()["code"] == "no_image_provider"


@pytest.mark.parametrize("settings_overrides", [{"rate_limit_enabled": False, "rate_limit_signin": "1/minute"}])
async def test_disabled_limiter_allows(app: FastAPI) -> None:
    async with _client_from(app, "198.51.100.1") as client:
        for index in range(4):
            response = await _sign_in(client, f"nobody-{index}@example.com")
            assert response.status_code == 401, response.text


@pytest.fixture
async def redis_apps(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[FastAPI, FastAPI]]:
    """Two app instances with their own memory but one Redis, as two server processes would run."""
    await require_redis()
    overrides: dict[str, Any] = {
        "rate_limit_enabled": True,
        "redis_url": REDIS_URL,
        "rate_limit_signin_per_email": "2/minute",
    }
    first = create_app(make_settings(database_url, tmp_path / "first", **overrides))
    second = create_app(make_settings(database_url, tmp_path / "second", **overrides))
    async with first.router.lifespan_context(first), second.router.lifespan_context(second):
        yield first, second


async def test_apps_share_redis_counts(redis_apps: tuple[FastAPI, FastAPI], unique_email: str) -> None:
    first, second = redis_apps

    async with _client_from(first, "198.51.100.1") as client:
        response = await _sign_in(client, unique_email)
        assert response.status_code == 401, response.text
    async with _client_from(second, "198.51.100.2") as client:
        response = await _sign_in(client, unique_email)
        assert response.status_code == 401, response.text

    async with _client_from(first, "198.51.100.3") as client:
        _assert_rate_limited(await _sign_in(client, unique_email))
