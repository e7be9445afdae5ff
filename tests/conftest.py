"""Shared fixtures: every API test runs once on SQLite and once on PostgreSQL, on a schema built by the
Alembic migrations.

PostgreSQL is the server on 127.0.0.1:5432 (override with POCKETLLM_TEST_POSTGRES_URL). When it is
unreachable the PostgreSQL half is skipped with the reason shown, except when CI=true or
POCKETLLM_REQUIRE_POSTGRES=1, where that is an error.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import httpx
import pytest
from cryptography.fernet import Fernet
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine import make_url

from pocketllm.app import create_app
from pocketllm.config import Environment, Settings
from pocketllm.db.base import Base
from pocketllm.db.engine import Database, create_engine
from pocketllm.db.migrate import upgrade_database
from pocketllm.providers.guard import OutboundGuard

pytest_plugins = ["tests.fakes.provider"]

POSTGRES_ADMIN_URL = os.environ.get(
    "POCKETLLM_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
TEST_JWT_SECRET = "test-jwt-secret-that-is-long-enough-for-hs256-0123456789"


def postgres_required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("POCKETLLM_REQUIRE_POSTGRES") == "1"


async def _postgres_reachable() -> str | None:
    """Return None when PostgreSQL answers, else the reason it does not."""
    engine = create_engine(POSTGRES_ADMIN_URL)
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return None
    except Exception as error:  # any failure means "not usable here"; the reason is shown in the skip
        return f"{type(error).__name__}: {error}"
    finally:
        await engine.dispose()


async def _create_postgres_database(name: str) -> str:
    engine = create_engine(POSTGRES_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
    async with engine.connect() as connection:
        await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        await connection.execute(text(f'CREATE DATABASE "{name}"'))
    await engine.dispose()
    return make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


async def _drop_postgres_database(name: str) -> None:
    engine = create_engine(POSTGRES_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
    async with engine.connect() as connection:
        await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    await engine.dispose()


@pytest.fixture(scope="session")
async def postgres_database() -> AsyncIterator[str]:
    """A migrated PostgreSQL database for the whole run; dropped at the end."""
    reason = await _postgres_reachable()
    if reason is not None:
        if postgres_required():
            pytest.fail(f"PostgreSQL is required (CI=true) but unreachable at {POSTGRES_ADMIN_URL}: {reason}")
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL}: {reason}")

    name = f"pocketllm_test_{os.getpid()}"
    url = await _create_postgres_database(name)
    engine = create_engine(url)
    await upgrade_database(engine)
    await engine.dispose()
    yield url
    await _drop_postgres_database(name)


@pytest.fixture(scope="session")
async def sqlite_database(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("sqlite") / "pocketllm-test.db"
    url = f"sqlite+aiosqlite:///{path}"
    engine = create_engine(url)
    await upgrade_database(engine)
    await engine.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def migrated_database(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres_database")
        return url
    if "postgres_only" in request.keywords:
        pytest.skip("runs against PostgreSQL only")
    url = request.getfixturevalue("sqlite_database")
    return url


@pytest.fixture
async def database_url(migrated_database: str) -> AsyncIterator[str]:
    """The URL of a migrated, empty database; every table is emptied again after the test."""
    yield migrated_database
    await _empty_all_tables(migrated_database)


async def _empty_all_tables(url: str) -> None:
    engine = create_engine(url)
    async with engine.begin() as connection:
        tables = [table.name for table in reversed(Base.metadata.sorted_tables)]
        if connection.dialect.name == "postgresql":
            await connection.execute(text(f"TRUNCATE {', '.join(tables)} CASCADE"))
        else:
            for table in tables:
                await connection.execute(text(f"DELETE FROM {table}"))  # noqa: S608  (table names from metadata)
    await engine.dispose()


def make_settings(database_url: str, data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test app. Argon2 runs with small costs so the suite stays fast; it is still Argon2id."""
    values: dict[str, Any] = {
        "environment": Environment.TEST,
        "data_dir": data_dir,
        "database_url": database_url,
        "migrate_on_start": False,
        "jwt_secret": TEST_JWT_SECRET,
        "encryption_key": Fernet.generate_key().decode(),
        "invite_code": False,
        # Many tests sign up and sign in repeatedly from the one ASGI client address; rate-limit tests
        # turn the limiter on through `settings_overrides`.
        "rate_limit_enabled": False,
        # Job tests run workers themselves, so that no other test has one polling its database.
        "run_worker": False,
        "password_hash_time_cost": 1,
        "password_hash_memory_kib": 1024,
        "password_hash_parallelism": 1,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Override in a test module (or parametrize) to change the app's settings."""
    return {}


@pytest.fixture
def settings(database_url: str, tmp_path: Path, settings_overrides: dict[str, Any]) -> Settings:
    return make_settings(database_url, tmp_path / "data", **settings_overrides)


async def loopback_only_resolver(host: str, port: int) -> list[str]:
    """DNS for tests: `localhost` is loopback and every other name fails, so no test reaches the internet,
    not even through a provider's default base URL."""
    del port
    if host == "localhost" or host.endswith(".localhost"):
        return ["127.0.0.1"]
    raise socket.gaierror(socket.EAI_NONAME, f"{host} is not resolvable in tests")


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        application.state.providers.http.guard = OutboundGuard(
            allow_private=settings.allow_private_provider_urls, resolver=loopback_only_resolver
        )
        yield application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://pocketllm.test") as http:
        yield http


@pytest.fixture
def unique_email() -> str:
    return f"user-{uuid.uuid4().hex[:10]}@example.com"


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    """Direct database access for arranging state (invite codes, deletion schedules) and checking rows."""
    db = Database(create_engine(database_url))
    yield db
    await db.dispose()


@pytest.fixture
def thread_trips(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every call that aiosqlite queues for a connection's thread, by the called function's name.

    OneTripConnection queues each call wrapped in its `_counted`, so the wrapped function is recorded, after
    the deferred BEGIN that runs before it in the same trip ("BEGIN IMMEDIATE; _execute").
    """
    trips: list[str] = []
    queue_call = aiosqlite.Connection._execute

    async def counted(connection: aiosqlite.Connection, function: Any, *args: Any, **kwargs: Any) -> Any:
        begin = None
        called = function
        if getattr(function, "__name__", None) == "_counted":
            begin, called = args[0], args[1]
        name = getattr(called, "__name__", repr(called))
        trips.append(f"{begin}; {name}" if begin else name)
        return await queue_call(connection, function, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    return trips
