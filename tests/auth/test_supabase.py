"""AUTH_BACKEND=supabase against a fake GoTrue server on 127.0.0.1, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI
from sqlalchemy import func, select, update

from pocketllm.app import create_app
from pocketllm.config import Settings
from pocketllm.db.engine import Database
from pocketllm.db.types import utcnow
from pocketllm.models import AuthSession, InviteCode, Profile, User
from pocketllm.referrals import service as referrals
from tests.conftest import make_settings
from tests.fakes.gotrue import FakeGoTrue, unused_local_url
from tests.helpers import auth_headers, bearer

ANON_KEY = "fake-anon-key-for-tests-0123456789abcdef"
GOTRUE_JWT_SECRET = "fake-gotrue-jwt-secret-long-enough-for-hs256-0123456789"
PASSWORD = "Corr3ct-Horse-Battery"
NEW_PASSWORD = "An0ther-Long-Passphrase"

OpenApp = Callable[..., AbstractAsyncContextManager[tuple[httpx.AsyncClient, Database]]]


@pytest.fixture(scope="module")
def gotrue_server() -> Iterator[FakeGoTrue]:
    fake = FakeGoTrue(jwt_secret=GOTRUE_JWT_SECRET, anon_key=ANON_KEY)
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def gotrue(gotrue_server: FakeGoTrue) -> FakeGoTrue:
    gotrue_server.reset()
    return gotrue_server


def supabase_settings(gotrue: FakeGoTrue, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "auth_backend": "supabase",
        "supabase_url": gotrue.url,
        "supabase_anon_key": ANON_KEY,
        "jwt_secret": GOTRUE_JWT_SECRET,
        "supabase_timeout_seconds": 5.0,
    }
    values.update(overrides)
    return values


@pytest.fixture
def settings_overrides(gotrue: FakeGoTrue) -> dict[str, Any]:
    return supabase_settings(gotrue)


@pytest.fixture
def database(app: FastAPI) -> Database:
    db: Database = app.state.database
    return db


@asynccontextmanager
async def serve(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, Database]]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://pocketllm.test") as http:
            yield http, application.state.database


@pytest.fixture
def open_app(database_url: str, tmp_path: Path, gotrue: FakeGoTrue) -> OpenApp:
    """Start an app with settings other than the module's defaults, as in `async with open_app(x=1) as (client, db)`."""

    def opener(**overrides: Any) -> AbstractAsyncContextManager[tuple[httpx.AsyncClient, Database]]:
        settings = make_settings(database_url, tmp_path / "data", **supabase_settings(gotrue, **overrides))
        return serve(settings)

    return opener


def token_claims(access_token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(access_token, options={"verify_signature": False})
    return claims


def assert_no_secrets(response: httpx.Response, *extra: str) -> None:
    for secret in (ANON_KEY, PASSWORD, NEW_PASSWORD, GOTRUE_JWT_SECRET, *extra):
        assert secret not in response.text, f"response body contains the secret {secret[:6]}..."


async def sign_up(client: httpx.AsyncClient, email: str, **extra: Any) -> dict[str, Any]:
    response = await client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD, **extra})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def sign_in(client: httpx.AsyncClient, email: str, password: str = PASSWORD) -> httpx.Response:
    return await client.post("/v1/auth/signin", json={"email": email, "password": password})


async def invite_uses(database: Database, invite_id: uuid.UUID) -> int:
    async with database.read_only() as session:
        uses = await session.scalar(select(InviteCode.uses_count).where(InviteCode.id == invite_id))
    assert uses is not None
    return uses


async def create_invite(database: Database, code: str) -> uuid.UUID:
    async with database.transaction() as session:
        invite = await referrals.create_invite_code(session, max_uses=2, code=code)
    return invite.id


# -- sign-up ---------------------------------------------------------------------------------------


async def test_sign_up_creates_local_profile(
    client: httpx.AsyncClient, database: Database, gotrue: FakeGoTrue, unique_email: str
) -> None:
    response = await client.post(
        "/v1/auth/signup", json={"email": unique_email, "password": PASSWORD, "full_name": "Ada Lovelace"}
    )

    assert response.status_code == 200, response.text
    body = response.json()
    gotrue_user = gotrue.user_by_email(unique_email)
    assert gotrue_user is not None
    assert body["user"]["id"] == str(gotrue_user.id)
    assert body["tokens"]["access_token"]
    assert body["tokens"]["refresh_token"]
    assert body["session"]["session_id"] == token_claims(body["tokens"]["access_token"])["session_id"]
    assert_no_secrets(response)

    profile = await client.get("/v1/users/profile", headers=auth_headers(body))
    assert profile.status_code == 200, profile.text
    assert profile.json()["id"] == str(gotrue_user.id)
    assert profile.json()["full_name"] == "Ada Lovelace"

    async with database.read_only() as session:
        password_hash = await session.scalar(select(User.password_hash).where(User.id == gotrue_user.id))
        user_count = await session.scalar(select(func.count()).select_from(User).where(User.id == gotrue_user.id))
    assert user_count == 1
    assert password_hash is None

    [request] = gotrue.requests_to("/auth/v1/signup")
    assert request.headers["apikey"] == ANON_KEY
    assert request.headers["authorization"] == f"Bearer {ANON_KEY}"
    assert request.body == {"email": unique_email, "password": PASSWORD, "data": {"full_name": "Ada Lovelace"}}


async def test_sign_up_needing_confirmation(client: httpx.AsyncClient, gotrue: FakeGoTrue, unique_email: str) -> None:
    gotrue.require_email_confirmation = True

    body = await sign_up(client, unique_email)

    gotrue_user = gotrue.user_by_email(unique_email)
    assert gotrue_user is not None
    assert body["user"]["id"] == str(gotrue_user.id)
    assert body["tokens"] is None
    assert body["session"] is None
    assert "confirm your e-mail" in body["message"]

    unconfirmed = await sign_in(client, unique_email)
    assert unconfirmed.status_code == 403, unconfirmed.text
    assert unconfirmed.json()["code"] == "email_not_confirmed"

    gotrue.confirm_email(unique_email)
    confirmed = await sign_in(client, unique_email)
    assert confirmed.status_code == 200, confirmed.text
    assert confirmed.json()["user"]["id"] == str(gotrue_user.id)


async def test_sign_up_duplicate_of_local_user(
    client: httpx.AsyncClient, gotrue: FakeGoTrue, unique_email: str
) -> None:
    await sign_up(client, unique_email)

    response = await client.post("/v1/auth/signup", json={"email": unique_email, "password": PASSWORD})

    assert response.status_code == 400, response.text
    assert response.json()["code"] == "user_already_exists"
    assert len(gotrue.requests_to("/auth/v1/signup")) == 1


@pytest.mark.parametrize("legacy_errors", [False, True], ids=["error_code", "legacy"])
async def test_sign_up_duplicate_only_in_gotrue(
    client: httpx.AsyncClient, database: Database, gotrue: FakeGoTrue, unique_email: str, legacy_errors: bool
) -> None:
    gotrue.create_user(unique_email, PASSWORD)
    gotrue.legacy_errors = legacy_errors

    response = await client.post("/v1/auth/signup", json={"email": unique_email, "password": PASSWORD})

    assert response.status_code == 400, response.text
    assert response.json()["code"] == "user_already_exists"
    async with database.read_only() as session:
        assert await session.scalar(select(User).where(User.email == unique_email)) is None


async def test_sign_up_duplicate_hidden_by_confirmation(
    client: httpx.AsyncClient, gotrue: FakeGoTrue, unique_email: str
) -> None:
    # With confirmation on, GoTrue responds 200 with a made-up user without identities.
    gotrue.create_user(unique_email, PASSWORD)
    gotrue.require_email_confirmation = True

    response = await client.post("/v1/auth/signup", json={"email": unique_email, "password": PASSWORD})

    assert response.status_code == 400, response.text
    assert response.json()["code"] == "user_already_exists"


@pytest.mark.parametrize("legacy_errors", [False, True], ids=["error_code", "legacy"])
async def test_sign_up_weak_password(
    client: httpx.AsyncClient, gotrue: FakeGoTrue, unique_email: str, legacy_errors: bool
) -> None:
    gotrue.min_password_length = 32
    gotrue.legacy_errors = legacy_errors

    response = await client.post("/v1/auth/signup", json={"email": unique_email, "password": PASSWORD})

    assert response.status_code == 400, response.text
    assert response.json()["code"] == "weak_password"
    assert "at least 32 characters" in response.json()["detail"]
    assert_no_secrets(response)


# -- invite gating -----------------------------------------------------------------------------


async def test_sign_up_without_invite_rejected(open_app: OpenApp, gotrue: FakeGoTrue, unique_email: str) -> None:
    async with open_app(invite_code=True) as (client, _):
        response = await client.post("/v1/auth/signup", json={"email": unique_email, "password": PASSWORD})

    assert response.status_code == 403, response.text
    assert response.json()["code"] == "invite_required"
    assert gotrue.requests_to("/auth/v1/signup") == []


async def test_sign_up_with_invite_counts_use(open_app: OpenApp, gotrue: FakeGoTrue, unique_email: str) -> None:
    async with open_app(invite_code=True) as (client, database):
        invite_id = await create_invite(database, "WELCOME-SUPA")

        body = await sign_up(client, unique_email, invite_code="welcome-supa")

        assert await invite_uses(database, invite_id) == 1
        async with database.read_only() as session:
            row = (
                await session.execute(
                    select(Profile.invite_code, Profile.invite_status).where(
                        Profile.id == uuid.UUID(body["user"]["id"])
                    )
                )
            ).one()
        assert row.invite_code == "WELCOME-SUPA"
        assert row.invite_status == "accepted"


@pytest.mark.parametrize("failure", ["server_error", "already_in_gotrue"])
async def test_sign_up_failure_releases_invite_use(
    open_app: OpenApp, gotrue: FakeGoTrue, unique_email: str, failure: str
) -> None:
    if failure == "server_error":
        gotrue.fail_with_status = 500
    else:
        gotrue.create_user(unique_email, PASSWORD)

    async with open_app(invite_code=True) as (client, database):
        invite_id = await create_invite(database, "GIVE-BACK")

        response = await client.post(
            "/v1/auth/signup", json={"email": unique_email, "password": PASSWORD, "invite_code": "GIVE-BACK"}
        )

        assert response.status_code in (400, 502), response.text
        assert len(gotrue.requests_to("/auth/v1/signup")) == 1
        assert await invite_uses(database, invite_id) == 0


async def test_cancelled_sign_up_releases_invite_use(open_app: OpenApp, gotrue: FakeGoTrue, unique_email: str) -> None:
    gotrue.delay_seconds = 30.0

    async with open_app(invite_code=True) as (client, database):
        invite_id = await create_invite(database, "CANCELLED")
        sign_up_task = asyncio.create_task(
            client.post(
                "/v1/auth/signup", json={"email": unique_email, "password": PASSWORD, "invite_code": "CANCELLED"}
            )
        )
        # The use is counted before GoTrue is called, so it is counted once the fake has the request.
        assert await anyio.to_thread.run_sync(gotrue.request_received.wait, 10)
        assert await invite_uses(database, invite_id) == 1

        sign_up_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sign_up_task

        assert await invite_uses(database, invite_id) == 0


# -- sign-in -----------------------------------------------------------------------------------


async def test_sign_in_returns_working_session(
    client: httpx.AsyncClient, gotrue: FakeGoTrue, unique_email: str
) -> None:
    signed_up = await sign_up(client, unique_email)

    response = await sign_in(client, unique_email)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user"]["id"] == signed_up["user"]["id"]
    assert body["user"]["last_sign_in_at"] is not None
    assert body["session"]["session_id"] == token_claims(body["tokens"]["access_token"])["session_id"]
    assert body["session"]["session_id"] != signed_up["session"]["session_id"]
    assert body["tokens"]["expires_in"] > 3000
    assert body["account_status"]["deletion_canceled"] is False
    assert_no_secrets(response)

    profile = await client.get("/v1/users/profile", headers=auth_headers(body))
    assert profile.status_code == 200, profile.text
    [password_grant] = gotrue.requests_to("/auth/v1/token")
    assert password_grant.query == {"grant_type": "password"}
    assert password_grant.headers["apikey"] == ANON_KEY


async def test_gotrue_cookie_not_sent_for_other_user(
    client: httpx.AsyncClient, gotrue: FakeGoTrue, unique_email: str
) -> None:
    other_email = "other-" + unique_email
    await sign_up(client, unique_email)
    await sign_up(client, other_email)
    gotrue.set_cookie = "affinity=first-user; Path=/"

    first = await sign_in(client, unique_email)
    second = await sign_in(client, other_email)

    assert first.status_code == second.status_code == 200
    assert [grant.headers.get("cookie") for grant in gotrue.requests_to("/auth/v1/token")] == [None, None]


async def test_sign_in_creates_missing_local_account(
    client: httpx.AsyncClient, database: Database, gotrue: FakeGoTrue, unique_email: str
) -> None:
    gotrue_user = gotrue.create_user(unique_email, PASSWORD, full_name="Grace Hopper")

    response = await sign_in(client, unique_email)

    assert response.status_code == 200, response.text
    assert response.json()["user"]["id"] == str(gotrue_user.id)
    async with database.read_only() as session:
        full_name = await session.scalar(select(Profile.full_name).where(Profile.id == gotrue_user.id))
    assert full_name == "Grace Hopper"


async def test_sign_in_cancels_scheduled_deletion(
    client: httpx.AsyncClient, database: Database, unique_email: str
) -> None:
    signed_up = await sign_up(client, unique_email)
    user_id = uuid.UUID(signed_up["user"]["id"])
    requested_at = utcnow()
    async with database.transaction() as session:
        await session.execute(
            update(Profile)
            .where(Profile.id == user_id)
            .values(
                deletion_status="pending",
                deletion_requested_at=requested_at,
                deletion_scheduled_for=requested_at + timedelta(days=30),
            )
        )

    response = await sign_in(client, unique_email)

    assert response.status_code == 200, response.text
    status = response.json()["account_status"]
    assert status["deletion_canceled"] is True
    assert status["previous_deletion_scheduled_for"] is not None
    async with database.read_only() as session:
        row = (
            await session.execute(
                select(Profile.deletion_status, Profile.deletion_scheduled_for).where(Profile.id == user_id)
            )
        ).one()
    assert row.deletion_status == "canceled"
    assert row.deletion_scheduled_for is None


@pytest.mark.parametrize("legacy_errors", [False, True], ids=["error_code", "legacy"])
async def test_sign_in_wrong_password(
    client: httpx.AsyncClient, gotrue: FakeGoTrue, unique_email: str, legacy_errors: bool
) -> None:
    await sign_up(client, unique_email)
    gotrue.legacy_errors = legacy_errors

    wrong = await sign_in(client, unique_email, "Wrong-Passw0rd-Here")
    unknown = await sign_in(client, f"nobody-{unique_email}", PASSWORD)

    for response in (wrong, unknown):
        assert response.status_code == 401, response.text
        assert response.json()["code"] == "invalid_credentials"
        assert_no_secrets(response, "Wrong-Passw0rd-Here")


# -- refresh -----------------------------------------------------------------------------------


async def test_refresh_returns_working_tokens(client: httpx.AsyncClient, gotrue: FakeGoTrue, unique_email: str) -> None:
    signed_up = await sign_up(client, unique_email)

    response = await client.post("/v1/auth/refresh", json={"refresh_token": signed_up["tokens"]["refresh_token"]})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tokens"]["refresh_token"] != signed_up["tokens"]["refresh_token"]
    assert body["session"]["session_id"] == signed_up["session"]["session_id"]
    assert body["user"]["id"] == signed_up["user"]["id"]
    profile = await client.get("/v1/users/profile", headers=auth_headers(body))
    assert profile.status_code == 200, profile.text
    [refresh_grant] = gotrue.requests_to("/auth/v1/token")
    assert refresh_grant.query == {"grant_type": "refresh_token"}
    assert refresh_grant.body == {"refresh_token": signed_up["tokens"]["refresh_token"]}


@pytest.mark.parametrize("legacy_errors", [False, True], ids=["error_code", "legacy"])
async def test_refresh_invalid_token_rejected(
    client: httpx.AsyncClient, gotrue: FakeGoTrue, legacy_errors: bool
) -> None:
    gotrue.legacy_errors = legacy_errors

    response = await client.post("/v1/auth/refresh", json={"refresh_token": "not-a-refresh-token"})

    assert response.status_code == 401, response.text
    assert response.json()["code"] == "refresh_token_invalid"


# -- sign-out ----------------------------------------------------------------------------------


async def test_sign_out_revokes_access_token_at_once(
    client: httpx.AsyncClient, gotrue: FakeGoTrue, unique_email: str
) -> None:
    signed_up = await sign_up(client, unique_email)
    headers = auth_headers(signed_up)
    assert (await client.get("/v1/users/profile", headers=headers)).status_code == 200

    response = await client.post("/v1/auth/signout", headers=headers)

    assert response.status_code == 200, response.text
    assert response.json() == {"revoked_sessions": 1}
    profile = await client.get("/v1/users/profile", headers=headers)
    assert profile.status_code == 401, profile.text
    assert profile.json()["code"] == "session_revoked"
    assert not gotrue.session_is_live(signed_up["session"]["session_id"])
    [logout] = gotrue.requests_to("/auth/v1/logout")
    assert logout.query == {"scope": "local"}
    assert logout.headers["authorization"] == headers["Authorization"]
    assert logout.headers["apikey"] == ANON_KEY

    refresh = await client.post("/v1/auth/refresh", json={"refresh_token": signed_up["tokens"]["refresh_token"]})
    assert refresh.status_code == 401, refresh.text


async def test_sign_out_holds_when_gotrue_fails(
    client: httpx.AsyncClient, gotrue: FakeGoTrue, unique_email: str
) -> None:
    signed_up = await sign_up(client, unique_email)
    headers = auth_headers(signed_up)
    gotrue.fail_with_status = 500
    gotrue.failing_paths = {"/auth/v1/logout"}

    response = await client.post("/v1/auth/signout", headers=headers)

    assert response.status_code == 200, response.text
    assert gotrue.session_is_live(signed_up["session"]["session_id"])
    profile = await client.get("/v1/users/profile", headers=headers)
    assert profile.status_code == 401, profile.text
    assert profile.json()["code"] == "session_revoked"
    refresh = await client.post("/v1/auth/refresh", json={"refresh_token": signed_up["tokens"]["refresh_token"]})
    assert refresh.status_code == 401, refresh.text
    assert refresh.json()["code"] == "refresh_token_invalid"


async def test_sign_out_global_revokes_other_sessions(
    client: httpx.AsyncClient, database: Database, unique_email: str
) -> None:
    first = await sign_up(client, unique_email)
    second = (await sign_in(client, unique_email)).json()

    response = await client.post("/v1/auth/signout", headers=auth_headers(first), json={"scope": "global"})

    assert response.status_code == 200, response.text
    assert response.json() == {"revoked_sessions": 2}
    for body in (first, second):
        profile = await client.get("/v1/users/profile", headers=auth_headers(body))
        assert profile.status_code == 401, profile.text
        assert profile.json()["code"] == "session_revoked"
    async with database.read_only() as session:
        reasons = (await session.scalars(select(AuthSession.revoked_reason))).all()
    assert reasons == ["signed_out", "signed_out"]


async def test_token_of_unknown_user_creates_account(
    client: httpx.AsyncClient, database: Database, gotrue: FakeGoTrue, unique_email: str
) -> None:
    # A user made in GoTrue and signed in there (for example by another app) calls this server first.
    gotrue_user = gotrue.create_user(unique_email, PASSWORD)
    session_body = gotrue.start_session(gotrue_user)

    profile = await client.get("/v1/users/profile", headers=bearer(session_body["access_token"]))

    assert profile.status_code == 200, profile.text
    assert profile.json()["id"] == str(gotrue_user.id)
    assert profile.json()["email"] == unique_email
    async with database.read_only() as session:
        email = await session.scalar(select(User.email).where(User.id == gotrue_user.id))
    assert email == unique_email


# -- password change ---------------------------------------------------------------------------


async def test_password_change_with_correct_old_password(
    client: httpx.AsyncClient, gotrue: FakeGoTrue, unique_email: str
) -> None:
    current = await sign_up(client, unique_email)
    other = (await sign_in(client, unique_email)).json()
    headers = auth_headers(current)

    response = await client.post(
        "/v1/auth/password/change", headers=headers, json={"old": PASSWORD, "new": NEW_PASSWORD}
    )

    assert response.status_code == 200, response.text
    assert response.json()["revoked_sessions"] == 1
    assert_no_secrets(response)
    [update_request] = gotrue.requests_to("/auth/v1/user")
    assert update_request.method == "PUT"
    assert update_request.headers["authorization"] == headers["Authorization"]
    assert update_request.body == {"password": NEW_PASSWORD}
    # The password grant that checked the old password must not leave a session behind.
    assert gotrue.live_session_count(current["user"]["id"]) == 1
    logouts = gotrue.requests_to("/auth/v1/logout")
    assert [logout.query["scope"] for logout in logouts] == ["local", "others"]
    assert logouts[0].headers["authorization"] != headers["Authorization"]
    assert logouts[1].headers["authorization"] == headers["Authorization"]

    assert (await client.get("/v1/users/profile", headers=headers)).status_code == 200
    other_profile = await client.get("/v1/users/profile", headers=auth_headers(other))
    assert other_profile.status_code == 401, other_profile.text
    assert other_profile.json()["code"] == "session_revoked"
    assert (await sign_in(client, unique_email, NEW_PASSWORD)).status_code == 200
    assert (await sign_in(client, unique_email, PASSWORD)).status_code == 401


async def test_password_change_with_wrong_old_password(
    client: httpx.AsyncClient, gotrue: FakeGoTrue, unique_email: str
) -> None:
    current = await sign_up(client, unique_email)
    headers = auth_headers(current)

    response = await client.post(
        "/v1/auth/password/change", headers=headers, json={"old": "Wrong-Passw0rd-Here", "new": NEW_PASSWORD}
    )

    assert response.status_code == 400, response.text
    assert response.json()["code"] == "incorrect_password"
    assert gotrue.requests_to("/auth/v1/user") == []
    assert (await client.get("/v1/users/profile", headers=headers)).status_code == 200
    assert_no_secrets(response, "Wrong-Passw0rd-Here")


async def test_password_change_rejected_by_gotrue(
    client: httpx.AsyncClient, gotrue: FakeGoTrue, unique_email: str
) -> None:
    current = await sign_up(client, unique_email)
    gotrue.min_password_length = 32

    response = await client.post(
        "/v1/auth/password/change", headers=auth_headers(current), json={"old": PASSWORD, "new": NEW_PASSWORD}
    )

    assert response.status_code == 400, response.text
    assert response.json()["code"] == "weak_password"
    assert "at least 32 characters" in response.json()["detail"]
    # Only the caller's session remains, because the check of the old password ended its own session.
    assert gotrue.live_session_count(current["user"]["id"]) == 1
    assert (await sign_in(client, unique_email, PASSWORD)).status_code == 200


async def test_password_change_to_same_password(
    client: httpx.AsyncClient, gotrue: FakeGoTrue, unique_email: str
) -> None:
    current = await sign_up(client, unique_email)

    response = await client.post(
        "/v1/auth/password/change", headers=auth_headers(current), json={"old": PASSWORD, "new": PASSWORD}
    )

    assert response.status_code == 400, response.text
    assert response.json()["code"] == "password_unchanged"
    assert gotrue.requests_to("/auth/v1/user") == []


# -- GoTrue failures ---------------------------------------------------------------------------

_CALLS = {
    "sign_up": ("/v1/auth/signup", {"email": "someone@example.com", "password": PASSWORD}),
    "sign_in": ("/v1/auth/signin", {"email": "someone@example.com", "password": PASSWORD}),
    "refresh": ("/v1/auth/refresh", {"refresh_token": "any-refresh-token"}),
}


@pytest.mark.parametrize("call", sorted(_CALLS))
async def test_gotrue_server_error_returns_502(client: httpx.AsyncClient, gotrue: FakeGoTrue, call: str) -> None:
    gotrue.fail_with_status = 500
    path, payload = _CALLS[call]

    response = await client.post(path, json=payload)

    assert response.status_code == 502, response.text
    assert response.json()["code"] == "upstream_error"
    assert "HTTP 500" in response.json()["detail"]
    assert_no_secrets(response)


async def test_gotrue_timeout_returns_502(open_app: OpenApp, gotrue: FakeGoTrue, unique_email: str) -> None:
    gotrue.delay_seconds = 5.0

    async with open_app(supabase_timeout_seconds=0.2) as (client, _):
        response = await sign_in(client, unique_email)

    assert response.status_code == 502, response.text
    assert response.json()["code"] == "upstream_error"
    assert "did not respond within 0.2 seconds" in response.json()["detail"]
    assert_no_secrets(response)


async def test_gotrue_unreachable_returns_502(open_app: OpenApp, unique_email: str) -> None:
    async with open_app(supabase_url=unused_local_url()) as (client, _):
        response = await sign_in(client, unique_email)

    assert response.status_code == 502, response.text
    assert response.json()["code"] == "upstream_error"
    assert "could not be reached" in response.json()["detail"]


async def test_gotrue_rejects_api_key(open_app: OpenApp, unique_email: str) -> None:
    wrong_key = "wrong-anon-key-0123456789"

    async with open_app(supabase_anon_key=wrong_key) as (client, _):
        response = await sign_in(client, unique_email)

    assert response.status_code == 502, response.text
    assert response.json()["code"] == "upstream_error"
    assert_no_secrets(response, wrong_key)


@pytest.mark.parametrize("retry_after", ["17", None], ids=["retry_after", "no_retry_after"])
async def test_gotrue_rate_limit_returns_429(
    client: httpx.AsyncClient, gotrue: FakeGoTrue, unique_email: str, retry_after: str | None
) -> None:
    gotrue.rate_limited = True
    gotrue.retry_after = retry_after

    response = await sign_in(client, unique_email)

    assert response.status_code == 429, response.text
    assert response.json()["code"] == "rate_limited"
    assert response.headers.get("retry-after") == retry_after


async def test_unverifiable_gotrue_token_returns_502(open_app: OpenApp, gotrue: FakeGoTrue, unique_email: str) -> None:
    gotrue.create_user(unique_email, PASSWORD)

    async with open_app(jwt_secret="a-different-secret-than-gotrue-uses-0123456789") as (client, _):
        response = await sign_in(client, unique_email)

    assert response.status_code == 502, response.text
    assert response.json()["code"] == "upstream_error"
    assert_no_secrets(response)


# -- JWKS --------------------------------------------------------------------------------------


async def test_jwks_signed_token_accepted(open_app: OpenApp, gotrue: FakeGoTrue, unique_email: str) -> None:
    gotrue.signing_algorithm = "RS256"

    async with open_app(supabase_jwks_url=gotrue.jwks_url, jwt_algorithms=["RS256"]) as (client, _):
        body = await sign_up(client, unique_email)
        profile = await client.get("/v1/users/profile", headers=auth_headers(body))

        assert jwt.get_unverified_header(body["tokens"]["access_token"])["alg"] == "RS256"
        assert profile.status_code == 200, profile.text
        assert profile.json()["id"] == body["user"]["id"]

        gotrue_user = gotrue.user_by_email(unique_email)
        assert gotrue_user is not None
        claims = gotrue.access_token_claims(gotrue_user, uuid.UUID(body["session"]["session_id"]))
        other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        forged = await client.get("/v1/users/profile", headers=bearer(gotrue.sign_token(claims, private_key=other_key)))
        assert forged.status_code == 401, forged.text
        assert forged.json()["code"] == "token_signature_invalid"

        gotrue.signing_algorithm = "HS256"
        symmetric = await client.get("/v1/users/profile", headers=bearer(gotrue.sign_token(claims)))
        assert symmetric.status_code == 401, symmetric.text
        assert symmetric.json()["code"] == "token_algorithm_rejected"


# -- secrets -----------------------------------------------------------------------------------


async def test_secrets_absent_from_logs(
    client: httpx.AsyncClient,
    gotrue: FakeGoTrue,
    unique_email: str,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    signed_up = await sign_up(client, unique_email)
    await sign_in(client, unique_email, "Wrong-Passw0rd-Here")
    await client.post(
        "/v1/auth/password/change",
        headers=auth_headers(signed_up),
        json={"old": PASSWORD, "new": NEW_PASSWORD},
    )
    gotrue.fail_with_status = 500
    await sign_in(client, unique_email, NEW_PASSWORD)

    captured = capfd.readouterr()
    output = captured.out + captured.err + caplog.text
    # The events prove that the log output was captured at all.
    assert "auth.signed_up" in output
    assert "auth.gotrue.failed" in output
    for secret in (ANON_KEY, PASSWORD, NEW_PASSWORD, "Wrong-Passw0rd-Here", signed_up["tokens"]["refresh_token"]):
        assert secret not in output, f"log output contains the secret {secret[:6]}..."
