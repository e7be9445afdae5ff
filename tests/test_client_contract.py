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
