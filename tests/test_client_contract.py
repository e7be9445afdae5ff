"""The shipped client's own request sequence, from first launch through token refreshes.

Each step sends what the client sends (JSON headers everywhere, a stale bearer token on calls that do not
need one) and checks only what the client reads.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from pocketllm.db.engine import Database
from pocketllm.referrals import service as referrals
from tests.fakes.provider import VALID_API_KEY, FakeProvider

JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


def with_token(token: str) -> dict[str, str]:
    return {**JSON_HEADERS, "Authorization": f"Bearer {token}"}


@pytest.mark.parametrize("settings_overrides", [{"invite_code": True}])
async def test_sign_up_profile_refresh_sequence(client: httpx.AsyncClient, database: Database) -> None:
    async with database.transaction() as session:
        await referrals.create_invite_code(session, code="HELLO-1234", max_uses=5)

    health = await client.get("/health", headers=JSON_HEADERS)
    assert health.status_code == 200
    assert health.json().get("success") is not False

    signup = await client.post(
        "/v1/auth/signup",
        headers=JSON_HEADERS,
        json={
            "email": "ada@example.com",
            "password": "Sup3rSecret!",
            "invite_code": "HELLO-1234",
            "referral_code": "HELLO-1234",
        },
    )
    assert signup.status_code == 200, signup.text
    body: dict[str, Any] = signup.json()
    assert isinstance(body["user"]["id"], str)
    assert body["user"]["email"] == "ada@example.com"
    access_token = body["tokens"]["access_token"]
    refresh_token = body["tokens"]["refresh_token"]
    assert isinstance(body["tokens"]["expires_in"], int)

    profile = await client.get("/v1/users/profile", headers=with_token(access_token))
    assert profile.status_code == 200
    assert isinstance(profile.json()["id"], str)
    assert isinstance(profile.json()["email"], str)
    assert profile.json()["survey_completed"] is False

    # The client's two refreshers can send the same refresh token back to back.
    for _ in range(2):
        refreshed = await client.post("/v1/auth/refresh", headers=JSON_HEADERS, json={"refresh_token": refresh_token})
        assert refreshed.status_code == 200, refreshed.text
        tokens = refreshed.json()["tokens"]
        assert tokens["access_token"]
        assert tokens["refresh_token"]
        assert isinstance(tokens["expires_in"], int)
        assert isinstance(refreshed.json()["session"]["expires_at"], str)
        access_token = tokens["access_token"]

    again = await client.get("/v1/users/profile", headers=with_token(access_token))
    assert again.status_code == 200

    invalid = await client.get("/v1/users/profile", headers=with_token(access_token + "x"))
    assert invalid.status_code == 401


async def test_sign_in_with_stale_bearer_and_password_change(client: httpx.AsyncClient) -> None:
    signup = await client.post(
        "/v1/auth/signup", headers=JSON_HEADERS, json={"email": "ada@example.com", "password": "Sup3rSecret!"}
    )
    stale_token = signup.json()["tokens"]["access_token"]
    await client.post("/v1/auth/signout", headers=with_token(stale_token))

    # The client keeps sending its stored (now revoked) token on sign-in and health checks.
    health = await client.get("/health", headers=with_token(stale_token))
    signin = await client.post(
        "/v1/auth/signin",
        headers=with_token(stale_token),
        json={"email": "ada@example.com", "password": "Sup3rSecret!"},
    )

    assert health.status_code == 200
    assert signin.status_code == 200, signin.text
    body = signin.json()
    assert isinstance(body["user"], dict)
    assert body["tokens"]["access_token"]
    assert body["account_status"]["deletion_canceled"] is False

    token = body["tokens"]["access_token"]
    wrong = await client.post(
        "/v1/auth/password/change", headers=with_token(token), json={"old": "not-my-password", "new": "N3wSecret!!"}
    )
    assert wrong.status_code in (400, 403)
    assert isinstance(wrong.json()["detail"], str)

    changed = await client.post(
        "/v1/auth/password/change", headers=with_token(token), json={"old": "Sup3rSecret!", "new": "N3wSecret!!"}
    )
    assert 200 <= changed.status_code < 300


@pytest.mark.parametrize("settings_overrides", [{"invite_code": True, "allow_private_provider_urls": True}])
async def test_first_launch_to_first_reply(
    client: httpx.AsyncClient, database: Database, fake_provider: FakeProvider
) -> None:
    """The app's requests from first launch to its first chat reply, in its order. The waitlist and
    onboarding steps are left out; the provider activation adds `base_url` so that it reaches the fake."""
    async with database.transaction() as session:
        await referrals.create_invite_code(session, code="HELLO-1234", max_uses=5)
    fake_provider.reply_text = "Hello! How can I help?"

    # Phase 1: not signed in.
    for _ in range(2):
        assert (await client.get("/v1/models/saved", headers=JSON_HEADERS)).status_code == 401
    assert (await client.get("/health", headers=JSON_HEADERS)).status_code == 200

    # Phase 2: sign-up and profile.
    signup = await client.post(
        "/v1/auth/signup",
        headers=JSON_HEADERS,
        json={
            "email": "ada@example.com",
            "password": "Sup3rSecret!",
            "invite_code": "HELLO-1234",
            "referral_code": "HELLO-1234",
        },
    )
    assert signup.status_code == 200, signup.text
    token = signup.json()["tokens"]["access_token"]
    refresh_token = signup.json()["tokens"]["refresh_token"]
    assert (await client.get("/v1/users/profile", headers=with_token(token))).json()["survey_completed"] is False

    # Phase 3: the home screen creates a chat before any model exists.
    assert (await client.get("/v1/chats", headers=with_token(token))).json() == []
    created = await client.post("/v1/chats", headers=with_token(token), json={})
    assert created.status_code == 200, created.text
    first_chat = created.json()
    detail = (await client.get(f"/v1/chats/{first_chat['id']}", headers=with_token(token))).json()
    assert detail["chat"]["id"] == first_chat["id"]
    assert detail["messages"] == []

    # Phase 4: provider and model.
    assert (await client.get("/v1/providers", headers=with_token(token))).json() == []
    statuses = (await client.get("/v1/providers/status", headers=with_token(token))).json()
    assert {"openai", "anthropic", "ollama"} <= {entry["provider"] for entry in statuses}
    activated = await client.post(
        "/v1/providers/activate",
        headers=with_token(token),
        json={"provider": "openai", "api_key": VALID_API_KEY, "base_url": fake_provider.openai_base_url},
    )
    assert activated.json()["provider"]["is_active"] is True
    assert isinstance((await client.get("/v1/models", headers=with_token(token))).json(), list)
    imported = await client.post(
        "/v1/models/import",
        headers=with_token(token),
        json={"provider": "openai", "models": ["gpt-4o-mini"], "sync": True},
    )
    assert isinstance(imported.json(), list)
    saved = (await client.get("/v1/models/saved", headers=with_token(token))).json()
    default = next(entry for entry in saved if entry["is_default"])
    assert (
        await client.post(f"/v1/models/{default['id']}/default", headers=with_token(token), json={})
    ).status_code == 200

    # Phase 5: restart: refresh, profile, chat list.
    refreshed = await client.post("/v1/auth/refresh", headers=JSON_HEADERS, json={"refresh_token": refresh_token})
    token = refreshed.json()["tokens"]["access_token"]
    assert (await client.get("/v1/users/profile", headers=with_token(token))).status_code == 200
    chats = (await client.get("/v1/chats", headers=with_token(token))).json()
    chat_id = chats[0]["id"]
    assert (await client.get(f"/v1/chats/{chat_id}", headers=with_token(token))).status_code == 200

    # Phase 6: select the model for the chat, send, read back twice.
    updated = await client.put(
        f"/v1/chats/{chat_id}", headers=with_token(token), json={"model_config_id": default["id"]}
    )
    assert updated.json()["model_config_id"] == default["id"]
    sent = await client.post(
        f"/v1/chats/{chat_id}/messages",
        headers=with_token(token),
        json={"content": "Hello!", "role": "user", "stream": False},
    )
    assert sent.status_code == 200, sent.text
    reply = sent.json()
    for field in ("id", "role", "content", "created_at"):
        assert field in reply
    for _ in range(2):
        messages = (await client.get(f"/v1/chats/{chat_id}", headers=with_token(token))).json()["messages"]
        assert [(m["role"], m["content"]) for m in messages] == [
            ("user", "Hello!"),
            ("assistant", "Hello! How can I help?"),
        ]

    # Phase 7: the same refresh token twice.
    for _ in range(2):
        again = await client.post("/v1/auth/refresh", headers=JSON_HEADERS, json={"refresh_token": refresh_token})
        assert again.status_code == 200
        assert again.json()["tokens"]["access_token"]
