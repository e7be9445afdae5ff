"""The session-check cache: PostgreSQL processes remember live sessions until a trigger's notice names them."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import event, text

from pocketllm.app import create_app
from pocketllm.auth.backends.base import ClientInfo
from pocketllm.auth.backends.local import LocalAuthBackend, SessionRevoked
from pocketllm.auth.passwords import PasswordHashing
from pocketllm.auth.schemas import SignInRequest, SignUpRequest
from pocketllm.auth.session_cache import SessionCheckCache
from pocketllm.config import Settings
from pocketllm.db.engine import Database, create_engine
from pocketllm.db.migrate import upgrade_database
from pocketllm.db.types import utcnow
from tests.chats.test_router import wait_for_lock_waiter
from tests.conftest import _drop_postgres_database, make_settings
from tests.db.test_migrations import new_postgres_database
from tests.helpers import DEFAULT_PASSWORD, auth_headers, sign_up

WAIT_SECONDS = 10
PROFILE = "/v1/users/profile"


def backend_of(app: FastAPI) -> LocalAuthBackend:
    backend = app.state.auth_backend
    assert isinstance(backend, LocalAuthBackend)
    return backend


@contextmanager
def counting_session_checks(app: FastAPI) -> Iterator[list[str]]:
    """Collect the session-check statements the app sends to its database while the block runs."""
    seen: list[str] = []

    def on_execute(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "FROM auth_sessions JOIN users" in statement:
            seen.append(statement)

    engine = app.state.database.engine.sync_engine
    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)


async def listening(app: FastAPI) -> SessionCheckCache:
    backend = backend_of(app)
    assert backend.session_listener is not None
    await asyncio.wait_for(backend.session_listener.listening.wait(), WAIT_SECONDS)
    return backend.session_cache


async def get_profile(client: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
    return await client.get(PROFILE, headers=headers)


async def test_session_queries_per_database(
    app: FastAPI, client: httpx.AsyncClient, unique_email: str, database: Database
) -> None:
    headers = auth_headers(await sign_up(client, unique_email))
    if database.dialect == "postgresql":
        await listening(app)

    with counting_session_checks(app) as checks:
        for _ in range(4):
            assert (await get_profile(client, headers)).status_code == 200

    assert len(checks) == (1 if database.dialect == "postgresql" else 4)


@pytest.mark.postgres_only
@pytest.mark.parametrize(
    "statement",
    ["UPDATE auth_sessions SET revoked_at = now()", "DELETE FROM users"],
    ids=["session-revoked", "user-deleted"],
)
async def test_change_in_psql_is_rejected(
    app: FastAPI, client: httpx.AsyncClient, unique_email: str, database: Database, statement: str
) -> None:
    cache = await listening(app)
    headers = auth_headers(await sign_up(client, unique_email))
    assert (await get_profile(client, headers)).status_code == 200
    before = cache.generation

    # As an operator would in psql: no code of this server runs for the change.
    async with database.engine.begin() as connection:
        await connection.execute(text(statement))
    await asyncio.wait_for(cache.wait_for_change(before), WAIT_SECONDS)

    response = await get_profile(client, headers)
    assert response.status_code == 401
    assert response.json()["code"] == "session_revoked"


@pytest.fixture
async def second_app(settings: Settings) -> AsyncIterator[FastAPI]:
    """Another app on the same database, standing in for a second server process."""
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.mark.postgres_only
@pytest.mark.parametrize("scope", ["local", "global"])
async def test_sign_out_reaches_other_process(
    app: FastAPI, second_app: FastAPI, client: httpx.AsyncClient, unique_email: str, scope: str
) -> None:
    other_cache = await listening(second_app)
    headers = auth_headers(await sign_up(client, unique_email))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=second_app), base_url="http://other.test") as other:
        assert (await get_profile(other, headers)).status_code == 200
        with counting_session_checks(second_app) as checks:
            assert (await get_profile(other, headers)).status_code == 200
        assert checks == [], "the second process should answer from memory before the sign-out"
        before = other_cache.generation

        signed_out = await client.post("/v1/auth/signout", headers=headers, json={"scope": scope})
        assert signed_out.status_code == 200, signed_out.text
        await asyncio.wait_for(other_cache.wait_for_change(before), WAIT_SECONDS)

        response = await get_profile(other, headers)
        assert response.status_code == 401
        assert response.json()["code"] == "session_revoked"


@pytest.mark.parametrize("revoke", ["sign_out", "change_password"])
async def test_revoke_drops_entry_without_notice(settings: Settings, unique_email: str, revoke: str) -> None:
    # The listener of this backend never runs, so no notice can arrive. Only the entries the backend drops
    # itself keep the revoked session from being returned from the cache.
    database = Database(create_engine(settings.effective_database_url))
    backend = LocalAuthBackend(settings, database, PasswordHashing(time_cost=1, memory_kib=1024, parallelism=1))
    backend.session_cache.listening(reconnected=False)
    client_info = ClientInfo(user_agent=None, ip_address=None)
    try:
        signed_up = await backend.sign_up(SignUpRequest(email=unique_email, password=DEFAULT_PASSWORD), client_info)
        first = await backend.sign_in(SignInRequest(email=unique_email, password=DEFAULT_PASSWORD), client_info)
        token = signed_up.tokens.access_token
        principal = await backend.authenticate(token)
        assert backend.session_cache.lookup(principal.session_id, principal.user_id, utcnow()) is not None

        if revoke == "sign_out":
            await backend.sign_out(principal, "local")
        else:
            # Ends every other session of the user: `first` here.
            principal = await backend.authenticate(first.tokens.access_token)
            await backend.change_password(principal, DEFAULT_PASSWORD, "another-Passw0rd")
            token = signed_up.tokens.access_token

        with pytest.raises(SessionRevoked):
            await backend.authenticate(token)
    finally:
        await database.dispose()


@pytest.mark.postgres_only
async def test_lost_listener_disables_cache_until_reconnect(
    app: FastAPI, client: httpx.AsyncClient, unique_email: str, database: Database
) -> None:
    cache = await listening(app)
    listener = backend_of(app).session_listener
    assert listener is not None
    headers = auth_headers(await sign_up(client, unique_email))
    assert (await get_profile(client, headers)).status_code == 200
    before = cache.generation

    async with database.engine.begin() as connection:
        terminated = await connection.scalar(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN %pocketllm_sessions%'"
            )
        )
    assert terminated == 1
    await asyncio.wait_for(cache.wait_for_change(before), WAIT_SECONDS)

    if not listener.reconnected.is_set():
        with counting_session_checks(app) as checks:
            for _ in range(2):
                assert (await get_profile(client, headers)).status_code == 200
        assert len(checks) == 2
    await asyncio.wait_for(listener.reconnected.wait(), WAIT_SECONDS)

    with counting_session_checks(app) as checks:
        for _ in range(3):
            assert (await get_profile(client, headers)).status_code == 200
    assert len(checks) == 1


async def session_checks_of_three_reads(settings: Settings, email: str) -> tuple[list[str], LocalAuthBackend]:
    """Start an app with `settings`, sign up and read the profile three times.

    Return the session-check statements the app sent to its database, and its auth backend.
    """
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://pocketllm.test") as client:
            headers = auth_headers(await sign_up(client, email))
            with counting_session_checks(application) as checks:
                for _ in range(3):
                    assert (await get_profile(client, headers)).status_code == 200
    return checks, backend_of(application)


@pytest.mark.postgres_only
async def test_zero_seconds_turns_the_cache_off(database_url: str, tmp_path: Path, unique_email: str) -> None:
    settings = make_settings(database_url, tmp_path / "data", session_cache_seconds=0)

    checks, backend = await session_checks_of_three_reads(settings, unique_email)

    assert backend.session_listener is None
    assert len(checks) == 3


async def test_missing_triggers_keep_cache_off(
    tmp_path: Path, unique_email: str, capfd: pytest.CaptureFixture[str]
) -> None:
    # A database migrated only up to the revision before the triggers, as after a deploy that skipped
    # `pocketllm migrate`: no notice would ever arrive.
    name, url = await new_postgres_database()
    try:
        engine = create_engine(url)
        await upgrade_database(engine, "0008")
        await engine.dispose()
        checks, _ = await session_checks_of_three_reads(make_settings(url, tmp_path / "data"), unique_email)
    finally:
        await _drop_postgres_database(name)

    assert len(checks) == 3
    # The app writes its log to the process's standard streams, as under `pocketllm serve`.
    captured = capfd.readouterr()
    assert "auth.session_cache_off" in captured.out + captured.err


@pytest.mark.postgres_only
async def test_write_after_account_deleted_is_401(
    client: httpx.AsyncClient, unique_email: str, database: Database
) -> None:
    signed_up = await sign_up(client, unique_email)
    headers = auth_headers(signed_up)
    assert (await get_profile(client, headers)).status_code == 200
    async with database.engine.connect() as deleting:
        # The delete holds the user's row lock until it commits below. The chat's insert waits for it
        # after the session check has passed, then fails its foreign key to the deleted user.
        await deleting.execute(text("DELETE FROM users WHERE id = :id"), {"id": signed_up["user"]["id"]})
        creating = asyncio.create_task(client.post("/v1/chats", headers=headers, json={"title": "late"}))
        await wait_for_lock_waiter(database)
        await deleting.commit()

    response = await creating
    assert response.status_code == 401
    assert response.json()["code"] == "session_revoked"


# The cache on its own, with a clock the test moves.

SESSION = uuid.UUID("00000000-0000-4000-8000-000000000001")
USER = uuid.UUID("00000000-0000-4000-8000-0000000000aa")
NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(days=30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def listening_cache(max_age: float = 60, clock: Clock | None = None) -> SessionCheckCache:
    cache = SessionCheckCache(max_age, clock=clock or Clock())
    cache.listening(reconnected=False)
    return cache


def remember(cache: SessionCheckCache, session_id: uuid.UUID = SESSION, user_id: uuid.UUID = USER) -> None:
    cache.remember(session_id, user_id, "ada@example.com", LATER, generation=cache.generation)


def test_entry_returned_for_its_user_only() -> None:
    cache = listening_cache()
    remember(cache)

    assert cache.lookup(SESSION, uuid.uuid4(), NOW) is None
    remember(cache)
    assert cache.lookup(SESSION, USER, NOW) == "ada@example.com"


def test_cache_disabled_before_listening() -> None:
    cache = SessionCheckCache(60)
    cache.remember(SESSION, USER, "ada@example.com", LATER, generation=cache.generation)

    assert cache.lookup(SESSION, USER, NOW) is None


def test_overlapping_check_not_remembered() -> None:
    cache = listening_cache()
    started = cache.generation

    cache.notice(f"s:{uuid.uuid4()}")
    cache.remember(SESSION, USER, "ada@example.com", LATER, generation=started)

    assert cache.lookup(SESSION, USER, NOW) is None


def test_entry_expires_with_age_or_session() -> None:
    clock = Clock()
    cache = listening_cache(max_age=60, clock=clock)
    remember(cache)

    clock.now += 61
    assert cache.lookup(SESSION, USER, NOW) is None

    remember(cache)
    assert cache.lookup(SESSION, USER, LATER) is None


@pytest.mark.parametrize(
    ("payload", "forgotten"),
    [
        (f"s:{SESSION}", True),
        (f"s:{uuid.uuid4()}", False),
        (f"u:{USER}", True),
        (f"u:{uuid.uuid4()}", False),
        ("*", True),
        ("s:not-a-uuid", True),
        ("something new", True),
    ],
)
def test_notice_forgets_what_it_names(payload: str, forgotten: bool) -> None:
    cache = listening_cache()
    remember(cache)

    cache.notice(payload)

    assert (cache.lookup(SESSION, USER, NOW) is None) is forgotten


def test_lost_listener_empties_cache() -> None:
    cache = listening_cache()
    remember(cache)

    cache.lost()
    remember(cache)

    assert cache.lookup(SESSION, USER, NOW) is None
    cache.listening(reconnected=True)
    assert cache.lookup(SESSION, USER, NOW) is None
