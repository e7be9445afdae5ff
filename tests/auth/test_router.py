"""The /v1/auth endpoints with the local backend, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from pocketllm.db.engine import Database
from pocketllm.models import InviteCode, Profile, User
from pocketllm.referrals import service as referrals
from tests.helpers import DEFAULT_PASSWORD, auth_headers, bearer, sign_up


async def create_code(database: Database, **options: Any) -> str:
    async with database.transaction() as session:
        invite = await referrals.create_invite_code(session, **options)
        return invite.code


async def count_users(database: Database) -> int:
    async with database.transaction() as session:
        return int(await session.scalar(select(func.count()).select_from(User)) or 0)


async def uses_of(database: Database, code: str) -> int:
    async with database.transaction() as session:
        return int(await session.scalar(select(InviteCode.uses_count).where(InviteCode.code == code)) or 0)


async def sign_in(client: httpx.AsyncClient, email: str, password: str = DEFAULT_PASSWORD) -> httpx.Response:
    return await client.post("/v1/auth/signin", json={"email": email, "password": password})


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


class TestSignUp:
    async def test_returns_user_tokens_session(self, client: httpx.AsyncClient, unique_email: str) -> None:
        body = await sign_up(client, unique_email, full_name="Ada Lovelace")

        assert body["user"]["email"] == unique_email
        assert body["user"]["full_name"] == "Ada Lovelace"
        assert body["tokens"]["token_type"] == "bearer"
        assert body["tokens"]["access_token"]
        assert body["tokens"]["refresh_token"]
        assert 3500 <= body["tokens"]["expires_in"] <= 3600
        assert body["session"]["session_id"]
        assert datetime.fromisoformat(body["session"]["expires_at"]) > datetime.now(UTC)
        assert body["account_status"]["deletion_scheduled"] is False
        assert body["account_status"]["deletion_canceled"] is False

    async def test_creates_profile(self, client: httpx.AsyncClient, unique_email: str) -> None:
        body = await sign_up(client, unique_email)

        response = await client.get("/v1/users/profile", headers=auth_headers(body))

        assert response.status_code == 200
        profile = response.json()
        assert profile["id"] == body["user"]["id"]
        assert profile["email"] == unique_email
        assert profile["survey_completed"] is False

    async def test_canonicalizes_email(self, client: httpx.AsyncClient) -> None:
        body = await sign_up(client, "  Ada.Lovelace@Bücher.Example ")

        assert body["user"]["email"] == "ada.lovelace@xn--bcher-kva.example"

    @pytest.mark.parametrize(
        "variant", ["ADA.LOVELACE@xn--bcher-kva.example", "ada.lovelace@BÜCHER.example", " ada.lovelace@bücher.example"]
    )
    async def test_email_variants_are_duplicates(self, client: httpx.AsyncClient, variant: str) -> None:
        await sign_up(client, "ada.lovelace@bücher.example")

        response = await client.post("/v1/auth/signup", json={"email": variant, "password": DEFAULT_PASSWORD})

        assert_error(response, 400, "user_already_exists")

    @pytest.mark.parametrize("email", ["not-an-address", "a@b", "ada@@example.com", "ada@exa mple.com"])
    async def test_rejects_invalid_email(self, client: httpx.AsyncClient, email: str) -> None:
        response = await client.post("/v1/auth/signup", json={"email": email, "password": DEFAULT_PASSWORD})

        assert response.status_code in (400, 422)
        assert response.json()["code"] in ("invalid_email", "validation_error")

    @pytest.mark.parametrize("password", ["Zq9!xY", "Zq9!xY" * 43])
    async def test_rejects_password_length(self, client: httpx.AsyncClient, unique_email: str, password: str) -> None:
        response = await client.post("/v1/auth/signup", json={"email": unique_email, "password": password})

        body = assert_error_validation(response)
        assert "password" in body["message"]
        assert password not in response.text

    async def test_duplicate_is_rejected(self, client: httpx.AsyncClient, unique_email: str) -> None:
        await sign_up(client, unique_email)

        response = await client.post("/v1/auth/signup", json={"email": unique_email, "password": "0therPassw0rd"})

        assert_error(response, 400, "user_already_exists")

    async def test_concurrent_duplicates_create_one_account(
        self, client: httpx.AsyncClient, database: Database, unique_email: str
    ) -> None:
        payload = {"email": unique_email, "password": DEFAULT_PASSWORD}

        responses = await asyncio.gather(*(client.post("/v1/auth/signup", json=payload) for _ in range(6)))

        statuses = sorted(response.status_code for response in responses)
        assert statuses == [200, 400, 400, 400, 400, 400]
        for response in responses:
            if response.status_code == 400:
                assert response.json()["code"] == "user_already_exists"
        assert await count_users(database) == 1

    async def test_trailing_slash_is_not_redirected(self, client: httpx.AsyncClient, unique_email: str) -> None:
        response = await client.post("/v1/auth/signup/", json={"email": unique_email, "password": DEFAULT_PASSWORD})

        assert response.status_code == 404


def assert_error_validation(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == "validation_error"
    assert isinstance(body["detail"], list)
    assert isinstance(body["message"], str)
    return body


@pytest.mark.parametrize("settings_overrides", [{"invite_code": True}])
class TestInviteGating:
    async def test_without_code_is_forbidden(
        self, client: httpx.AsyncClient, database: Database, unique_email: str
    ) -> None:
        response = await client.post("/v1/auth/signup", json={"email": unique_email, "password": DEFAULT_PASSWORD})

        body = assert_error(response, 403, "invite_required")
        assert "no invite code provided" in body["detail"].lower()
        assert await count_users(database) == 0

    async def test_unknown_code_is_forbidden(self, client: httpx.AsyncClient, unique_email: str) -> None:
        response = await client.post(
            "/v1/auth/signup", json={"email": unique_email, "password": DEFAULT_PASSWORD, "invite_code": "NOPE-NOPE"}
        )

        body = assert_error(response, 403, "invite_required")
        assert "invite code or approved waitlist application is required" in body["detail"]

    async def test_valid_code_is_used_once(
        self, client: httpx.AsyncClient, database: Database, unique_email: str
    ) -> None:
        code = await create_code(database, max_uses=2)

        body = await sign_up(client, unique_email, invite_code=code.lower())

        assert await uses_of(database, code) == 1
        profile = (await client.get("/v1/users/profile", headers=auth_headers(body))).json()
        assert profile["invite_code"] == code
        assert profile["invite_status"] == "accepted"

    async def test_referral_code_alias(self, client: httpx.AsyncClient, database: Database, unique_email: str) -> None:
        code = await create_code(database)

        await sign_up(client, unique_email, referral_code=code)

        assert await uses_of(database, code) == 1

    @pytest.mark.parametrize(
        "options",
        [
            pytest.param({"expires_in_days": -1}, id="expired"),
            pytest.param({"max_uses": 1, "exhaust": True}, id="exhausted"),
            pytest.param({"deactivate": True}, id="inactive"),
        ],
    )
    async def test_unusable_code_is_forbidden(
        self, client: httpx.AsyncClient, database: Database, unique_email: str, options: dict[str, Any]
    ) -> None:
        code = await create_code(database, **{k: v for k, v in options.items() if k == "expires_in_days"})
        async with database.transaction() as session:
            if options.get("exhaust"):
                await session.execute(update(InviteCode).where(InviteCode.code == code).values(uses_count=1))
            if options.get("deactivate"):
                await session.execute(update(InviteCode).where(InviteCode.code == code).values(is_active=False))

        response = await client.post(
            "/v1/auth/signup", json={"email": unique_email, "password": DEFAULT_PASSWORD, "invite_code": code}
        )

        assert_error(response, 403, "invite_required")
        assert await count_users(database) == 0

    async def test_approved_waitlist_needs_no_code(
        self, client: httpx.AsyncClient, database: Database, unique_email: str
    ) -> None:
        async with database.transaction() as session:
            await referrals.approve_application(session, unique_email)

        body = await sign_up(client, unique_email.upper())

        profile = (await client.get("/v1/users/profile", headers=auth_headers(body))).json()
        assert profile["waitlist_status"] == "approved"

    async def test_failed_sign_up_keeps_the_use(
        self, client: httpx.AsyncClient, database: Database, unique_email: str
    ) -> None:
        code = await create_code(database, max_uses=2)
        await sign_up(client, unique_email, invite_code=code)

        duplicate = await client.post(
            "/v1/auth/signup", json={"email": unique_email, "password": DEFAULT_PASSWORD, "invite_code": code}
        )

        assert_error(duplicate, 400, "user_already_exists")
        assert await uses_of(database, code) == 1

    async def test_concurrent_sign_ups_respect_max_uses(self, client: httpx.AsyncClient, database: Database) -> None:
        code = await create_code(database, max_uses=3)
        payloads = [
            {"email": f"racer-{index}@example.com", "password": DEFAULT_PASSWORD, "invite_code": code}
            for index in range(10)
        ]

        responses = await asyncio.gather(*(client.post("/v1/auth/signup", json=payload) for payload in payloads))

        statuses = sorted(response.status_code for response in responses)
        assert statuses == [200] * 3 + [403] * 7
        assert await count_users(database) == 3
        assert await uses_of(database, code) == 3


class TestSignIn:
    async def test_returns_tokens(self, client: httpx.AsyncClient, unique_email: str) -> None:
        await sign_up(client, unique_email)

        response = await sign_in(client, unique_email.upper())

        assert response.status_code == 200
        body = response.json()
        assert body["user"]["email"] == unique_email
        assert body["user"]["last_sign_in_at"] is not None
        assert body["tokens"]["access_token"]
        assert body["session"]["session_id"]
        assert body["account_status"]["deletion_canceled"] is False
        profile = await client.get("/v1/users/profile", headers=auth_headers(body))
        assert profile.status_code == 200

    async def test_wrong_password_and_unknown_email_look_alike(
        self, client: httpx.AsyncClient, unique_email: str
    ) -> None:
        await sign_up(client, unique_email)

        wrong_password = await sign_in(client, unique_email, "Wr0ngPassword!")
        unknown_email = await sign_in(client, "nobody@example.com")

        assert_error(wrong_password, 401, "invalid_credentials")
        assert wrong_password.json() == unknown_email.json()
        assert unknown_email.status_code == 401

    @pytest.mark.parametrize("email", ["not-an-address", "x" * 300 + "@example.com"])
    async def test_malformed_email_is_invalid_credentials(self, client: httpx.AsyncClient, email: str) -> None:
        response = await sign_in(client, email[:320])

        assert_error(response, 401, "invalid_credentials")

    async def test_short_password_is_invalid_credentials(self, client: httpx.AsyncClient, unique_email: str) -> None:
        await sign_up(client, unique_email)

        response = await sign_in(client, unique_email, "abc")

        assert_error(response, 401, "invalid_credentials")

    async def test_cancels_scheduled_deletion(
        self, client: httpx.AsyncClient, database: Database, unique_email: str
    ) -> None:
        body = await sign_up(client, unique_email)
        requested = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
        scheduled = requested + timedelta(days=30)
        async with database.transaction() as session:
            await session.execute(
                update(Profile)
                .where(Profile.id == uuid.UUID(body["user"]["id"]))
                .values(deletion_status="pending", deletion_requested_at=requested, deletion_scheduled_for=scheduled)
            )

        response = await sign_in(client, unique_email)

        status = response.json()["account_status"]
        assert status["deletion_canceled"] is True
        assert status["deletion_scheduled"] is False
        assert datetime.fromisoformat(status["previous_deletion_requested_at"]) == requested
        assert datetime.fromisoformat(status["previous_deletion_scheduled_for"]) == scheduled
        profile = (await client.get("/v1/users/profile", headers=auth_headers(response.json()))).json()
        assert profile["deletion_status"] != "pending"
        assert profile["deletion_scheduled_for"] is None


class TestRefresh:
    async def test_same_token_works_twice(self, client: httpx.AsyncClient, unique_email: str) -> None:
        body = await sign_up(client, unique_email)
        refresh_token = body["tokens"]["refresh_token"]

        first = await client.post("/v1/auth/refresh", json={"refresh_token": refresh_token})
        second = await client.post("/v1/auth/refresh", json={"refresh_token": refresh_token})

        for response in (first, second):
            assert response.status_code == 200, response.text
            tokens = response.json()["tokens"]
            assert tokens["refresh_token"] == refresh_token
            assert isinstance(tokens["expires_in"], int)
            assert (await client.get("/v1/users/profile", headers=bearer(tokens["access_token"]))).status_code == 200
        assert second.json()["session"]["session_id"] == body["session"]["session_id"]
        assert second.json()["user"]["id"] == body["user"]["id"]

    async def test_unknown_token_is_rejected(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/auth/refresh", json={"refresh_token": "not-a-token"})

        assert_error(response, 401, "refresh_token_invalid")

    async def test_empty_body_is_validation_error(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/auth/refresh", json={})

        assert_error_validation(response)

    async def test_signed_out_session_cannot_refresh(self, client: httpx.AsyncClient, unique_email: str) -> None:
        body = await sign_up(client, unique_email)
        await client.post("/v1/auth/signout", headers=auth_headers(body))

        response = await client.post("/v1/auth/refresh", json={"refresh_token": body["tokens"]["refresh_token"]})

        assert_error(response, 401, "refresh_token_invalid")

    async def test_expired_session_cannot_refresh(
        self, client: httpx.AsyncClient, database: Database, unique_email: str
    ) -> None:
        from pocketllm.models import AuthSession

        body = await sign_up(client, unique_email)
        async with database.transaction() as session:
            await session.execute(update(AuthSession).values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))

        response = await client.post("/v1/auth/refresh", json={"refresh_token": body["tokens"]["refresh_token"]})

        assert_error(response, 401, "refresh_token_invalid")
        profile = await client.get("/v1/users/profile", headers=auth_headers(body))
        assert_error(profile, 401, "session_expired")


@pytest.mark.parametrize(
    "settings_overrides", [{"refresh_token_rotation": True, "refresh_token_reuse_interval_seconds": 0}]
)
class TestRefreshRotation:
    async def test_rotates_token(self, client: httpx.AsyncClient, unique_email: str) -> None:
        body = await sign_up(client, unique_email)
        original = body["tokens"]["refresh_token"]

        first = await client.post("/v1/auth/refresh", json={"refresh_token": original})
        rotated = first.json()["tokens"]["refresh_token"]
        second = await client.post("/v1/auth/refresh", json={"refresh_token": rotated})

        assert first.status_code == 200
        assert rotated != original
        assert second.status_code == 200
        assert second.json()["tokens"]["refresh_token"] not in (original, rotated)

    async def test_reuse_revokes_session(self, client: httpx.AsyncClient, unique_email: str) -> None:
        body = await sign_up(client, unique_email)
        original = body["tokens"]["refresh_token"]
        rotated = (await client.post("/v1/auth/refresh", json={"refresh_token": original})).json()["tokens"]

        replay = await client.post("/v1/auth/refresh", json={"refresh_token": original})

        assert_error(replay, 401, "refresh_token_invalid")
        after = await client.post("/v1/auth/refresh", json={"refresh_token": rotated["refresh_token"]})
        assert_error(after, 401, "refresh_token_invalid")
        profile = await client.get("/v1/users/profile", headers=bearer(rotated["access_token"]))
        assert_error(profile, 401, "session_revoked")


@pytest.mark.parametrize(
    "settings_overrides", [{"refresh_token_rotation": True, "refresh_token_reuse_interval_seconds": 3600}]
)
async def test_rotation_reuse_within_interval_succeeds(client: httpx.AsyncClient, unique_email: str) -> None:
    body = await sign_up(client, unique_email)
    original = body["tokens"]["refresh_token"]

    first, second = await asyncio.gather(
        client.post("/v1/auth/refresh", json={"refresh_token": original}),
        client.post("/v1/auth/refresh", json={"refresh_token": original}),
    )

    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    first_token = first.json()["tokens"]["refresh_token"]
    second_token = second.json()["tokens"]["refresh_token"]
    assert first_token != second_token
    for token in (first_token, second_token):
        assert (await client.post("/v1/auth/refresh", json={"refresh_token": token})).status_code == 200


class TestSignOut:
    async def test_revokes_access_token_at_once(self, client: httpx.AsyncClient, unique_email: str) -> None:
        body = await sign_up(client, unique_email)

        response = await client.post("/v1/auth/signout", headers=auth_headers(body))

        assert response.status_code == 200
        assert response.json() == {"revoked_sessions": 1}
        profile = await client.get("/v1/users/profile", headers=auth_headers(body))
        assert_error(profile, 401, "session_revoked")

    async def test_local_scope_keeps_other_sessions(self, client: httpx.AsyncClient, unique_email: str) -> None:
        first = await sign_up(client, unique_email)
        second = (await sign_in(client, unique_email)).json()

        await client.post("/v1/auth/signout", headers=auth_headers(first))

        assert (await client.get("/v1/users/profile", headers=auth_headers(second))).status_code == 200

    async def test_global_scope_revokes_all(self, client: httpx.AsyncClient, unique_email: str) -> None:
        first = await sign_up(client, unique_email)
        second = (await sign_in(client, unique_email)).json()

        response = await client.post("/v1/auth/signout", headers=auth_headers(first), json={"scope": "global"})

        assert response.json() == {"revoked_sessions": 2}
        assert_error(await client.get("/v1/users/profile", headers=auth_headers(second)), 401, "session_revoked")

    async def test_others_scope_keeps_current(self, client: httpx.AsyncClient, unique_email: str) -> None:
        first = await sign_up(client, unique_email)
        second = (await sign_in(client, unique_email)).json()

        response = await client.post("/v1/auth/signout", headers=auth_headers(first), json={"scope": "others"})

        assert response.json() == {"revoked_sessions": 1}
        assert (await client.get("/v1/users/profile", headers=auth_headers(first))).status_code == 200
        assert_error(await client.get("/v1/users/profile", headers=auth_headers(second)), 401, "session_revoked")

    async def test_requires_token(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/auth/signout")

        assert_error(response, 401, "not_authenticated")
        assert response.headers["www-authenticate"] == "Bearer"

    async def test_invalid_scope_is_validation_error(self, client: httpx.AsyncClient, unique_email: str) -> None:
        body = await sign_up(client, unique_email)

        response = await client.post("/v1/auth/signout", headers=auth_headers(body), json={"scope": "everything"})

        assert_error_validation(response)


class TestPasswordChange:
    async def test_changes_password(self, client: httpx.AsyncClient, unique_email: str) -> None:
        body = await sign_up(client, unique_email)

        response = await client.post(
            "/v1/auth/password/change", headers=auth_headers(body), json={"old": DEFAULT_PASSWORD, "new": "N3wSecret!!"}
        )

        assert response.status_code == 200, response.text
        assert (await sign_in(client, unique_email, "N3wSecret!!")).status_code == 200
        assert_error(await sign_in(client, unique_email), 401, "invalid_credentials")

    async def test_signs_out_other_sessions_only(self, client: httpx.AsyncClient, unique_email: str) -> None:
        current = await sign_up(client, unique_email)
        other = (await sign_in(client, unique_email)).json()

        response = await client.post(
            "/v1/auth/password/change",
            headers=auth_headers(current),
            json={"old": DEFAULT_PASSWORD, "new": "N3wSecret!!"},
        )

        assert response.json()["revoked_sessions"] == 1
        assert (await client.get("/v1/users/profile", headers=auth_headers(current))).status_code == 200
        assert_error(await client.get("/v1/users/profile", headers=auth_headers(other)), 401, "session_revoked")

    async def test_wrong_old_password_is_not_401(self, client: httpx.AsyncClient, unique_email: str) -> None:
        body = await sign_up(client, unique_email)

        response = await client.post(
            "/v1/auth/password/change", headers=auth_headers(body), json={"old": "Wr0ngPassword", "new": "N3wSecret!!"}
        )

        assert_error(response, 400, "incorrect_password")
        assert (await sign_in(client, unique_email)).status_code == 200

    async def test_accepts_long_field_names(self, client: httpx.AsyncClient, unique_email: str) -> None:
        body = await sign_up(client, unique_email)

        response = await client.post(
            "/v1/auth/password/change",
            headers=auth_headers(body),
            json={"old_password": DEFAULT_PASSWORD, "new_password": "N3wSecret!!"},
        )

        assert response.status_code == 200, response.text

    async def test_short_new_password_is_rejected(self, client: httpx.AsyncClient, unique_email: str) -> None:
        body = await sign_up(client, unique_email)

        response = await client.post(
            "/v1/auth/password/change", headers=auth_headers(body), json={"old": DEFAULT_PASSWORD, "new": "short"}
        )

        assert_error_validation(response)

    async def test_same_password_is_rejected(self, client: httpx.AsyncClient, unique_email: str) -> None:
        body = await sign_up(client, unique_email)

        response = await client.post(
            "/v1/auth/password/change",
            headers=auth_headers(body),
            json={"old": DEFAULT_PASSWORD, "new": DEFAULT_PASSWORD},
        )

        assert_error(response, 400, "password_unchanged")

    async def test_requires_token(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/auth/password/change", json={"old": DEFAULT_PASSWORD, "new": "N3wSecret!!"})

        assert_error(response, 401, "not_authenticated")


class TestValidateInviteCode:
    async def test_valid_code(self, client: httpx.AsyncClient, database: Database) -> None:
        code = await create_code(database, max_uses=5, expires_in_days=7)

        response = await client.post("/v1/auth/validate-invite-code", json={"code": f"  {code.lower()} "})

        assert response.status_code == 200
        body = response.json()
        assert body["valid"] is True
        assert body["status"] == "valid"
        assert body["code"]["code"] == code
        assert body["code"]["max_uses"] == 5
        assert body["code"]["uses_count"] == 0
        assert body["code"]["remaining_uses"] == 5
        assert body["code"]["expires_at"] is not None
        assert await uses_of(database, code) == 0

    async def test_expired_code_is_not_valid(self, client: httpx.AsyncClient, database: Database) -> None:
        code = await create_code(database, expires_in_days=-1)

        body = (await client.post("/v1/auth/validate-invite-code", json={"code": code})).json()

        assert body["valid"] is False
        assert body["status"] == "expired"

    async def test_exhausted_code_is_not_valid(self, client: httpx.AsyncClient, database: Database) -> None:
        code = await create_code(database, max_uses=1)
        async with database.transaction() as session:
            await referrals.consume_invite_code(session, code)

        body = (await client.post("/v1/auth/validate-invite-code", json={"code": code})).json()

        assert body["valid"] is False
        assert body["status"] == "exhausted"
        assert body["code"]["remaining_uses"] == 0

    async def test_unknown_code(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/auth/validate-invite-code", json={"code": "ZZZZ-ZZZZ"})

        assert_error(response, 400, "invite_code_not_found")


class TestComingSoon:
    @pytest.mark.parametrize(
        ("path", "payload", "feature"),
        [
            ("/v1/auth/signin/magic-link", {"email": "ada@example.com"}, "magic_link"),
            ("/v1/auth/signin/otp", {"phone": "+441234567890"}, "sms_otp"),
            ("/v1/auth/signin/oauth", {"provider": "GitHub"}, "oauth:github"),
        ],
    )
    async def test_announces_feature(
        self, client: httpx.AsyncClient, path: str, payload: dict[str, str], feature: str
    ) -> None:
        response = await client.post(path, json=payload)

        assert response.status_code == 202
        body = response.json()
        assert body["feature"] == feature
        assert body["status"] == "coming_soon"
        assert body["message"]

    async def test_short_phone_is_rejected(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/auth/signin/otp", json={"phone": "123"})

        assert_error_validation(response)
