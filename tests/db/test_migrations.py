"""The Alembic migrations on fresh SQLite and PostgreSQL databases, and the portable column types.

Schema tests build a new database for each test, so they see exactly what the migrations create. Data
tests use the suite's migrated databases from tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, insert, inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.elements import ClauseElement

import pocketllm.models  # noqa: F401  (registers every table on Base.metadata)
from pocketllm.db.base import NAMING_CONVENTION, Base
from pocketllm.db.engine import create_engine
from pocketllm.db.migrate import alembic_config, current_revision, head_revision, upgrade_database
from pocketllm.models import Profile, User, WaitlistApplication
from tests.conftest import (
    POSTGRES_ADMIN_URL,
    _create_postgres_database,
    _drop_postgres_database,
    _postgres_reachable,
    postgres_required,
)

# An expression index: SQLite cannot reflect it, so schema comparisons leave it out and test it by behaviour.
USERNAME_INDEX = "uq_profiles_username_lower"
VERSION_TABLE = "alembic_version"
MODEL_TABLES = frozenset(Base.metadata.tables)

pytestmark = [
    pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index:Warning"),
    pytest.mark.filterwarnings("ignore:autogenerate skipping metadata-specified expression-based index:UserWarning"),
]


# Fresh databases


async def new_postgres_database() -> tuple[str, str]:
    """Create an empty PostgreSQL database and return its name and URL. Skip when the server is down."""
    reason = await _postgres_reachable()
    if reason is not None:
        if postgres_required():
            pytest.fail(f"PostgreSQL is required (CI=true) but unreachable at {POSTGRES_ADMIN_URL}: {reason}")
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_ADMIN_URL}: {reason}")
    name = f"pocketllm_migrations_{uuid.uuid4().hex[:12]}"
    url = await _create_postgres_database(name)
    return name, url


@pytest.fixture(params=["sqlite", "postgresql"])
async def fresh_engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    """An engine on a new, empty database of each kind. The PostgreSQL database is dropped afterwards."""
    if request.param == "sqlite":
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}")
        yield engine
        await engine.dispose()
        return

    name, url = await new_postgres_database()
    engine = create_engine(url)
    try:
        yield engine
    finally:
        await engine.dispose()
        await _drop_postgres_database(name)


@pytest.fixture
async def fresh_postgres_url() -> AsyncIterator[str]:
    name, url = await new_postgres_database()
    yield url
    await _drop_postgres_database(name)


# Reading the schema back


def _table_names(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


def _column_names(connection: Connection) -> dict[str, set[str]]:
    inspector = inspect(connection)
    return {table: {column["name"] for column in inspector.get_columns(table)} for table in MODEL_TABLES}


def _comparable(value: Any) -> Any:
    """Turn reflected schema data into plain values that compare equal when the schema is the same.

    SQL fragments (such as the WHERE clause of a partial index) are reflected as new clause objects on
    every call, so they are compared by their SQL text.
    """
    if isinstance(value, dict):
        return sorted((str(key), _comparable(item)) for key, item in value.items())
    if isinstance(value, list | tuple):
        return [_comparable(item) for item in value]
    if isinstance(value, ClauseElement):
        return str(value)
    return value


def _schema_snapshot(connection: Connection) -> dict[str, Any]:
    """Everything the inspector reports about every table, in comparable form."""
    inspector = inspect(connection)
    snapshot: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names()):
        snapshot[table] = {
            "columns": [
                (column["name"], str(column["type"]), column["nullable"]) for column in inspector.get_columns(table)
            ],
            "pk": _comparable(inspector.get_pk_constraint(table)),
            "unique": sorted(repr(_comparable(item)) for item in inspector.get_unique_constraints(table)),
            "foreign_keys": sorted(repr(_comparable(item)) for item in inspector.get_foreign_keys(table)),
            "checks": sorted(repr(_comparable(item)) for item in inspector.get_check_constraints(table)),
            "indexes": sorted(repr(_comparable(item)) for item in inspector.get_indexes(table)),
        }
    return snapshot


def _constraint_names(connection: Connection) -> dict[str, dict[str, list[Any]]]:
    """Per model table: the reflected names and columns of each kind of constraint and plain index."""
    inspector = inspect(connection)
    names: dict[str, dict[str, list[Any]]] = {}
    for table in MODEL_TABLES:
        names[table] = {
            "pk": [inspector.get_pk_constraint(table)["name"]],
            "unique": [(item["name"], item["column_names"]) for item in inspector.get_unique_constraints(table)],
            "foreign_keys": [
                (item["name"], item["constrained_columns"], item["referred_table"])
                for item in inspector.get_foreign_keys(table)
            ],
            "checks": [item["name"] for item in inspector.get_check_constraints(table)],
            # PostgreSQL also lists the index behind each unique constraint, which is checked as a constraint.
            "indexes": [
                (item["name"], item["column_names"], bool(item["unique"]))
                for item in inspector.get_indexes(table)
                if not item.get("duplicates_constraint") and item["name"] != USERNAME_INDEX
            ],
        }
    return names


def _include_in_comparison(item: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    if type_ == "table" and name == VERSION_TABLE:
        return False
    return not (type_ == "index" and name == USERNAME_INDEX)


def _schema_differences(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "include_object": _include_in_comparison}
    )
    differences: list[Any] = compare_metadata(context, Base.metadata)
    return differences


def _downgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.downgrade(config, revision)


async def run_on(engine: AsyncEngine, function: Any) -> Any:
    async with engine.connect() as connection:
        return await connection.run_sync(function)


async def downgrade_database(engine: AsyncEngine, revision: str) -> None:
    async with engine.connect() as connection:
        await connection.run_sync(_downgrade, revision)
        await connection.commit()


async def has_username_index(engine: AsyncEngine) -> bool:
    async with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            query = text("SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = :name")
        else:
            query = text("SELECT count(*) FROM pg_indexes WHERE indexname = :name")
        count = await connection.scalar(query, {"name": USERNAME_INDEX})
    return bool(count == 1)


# Schema built by the migrations


async def test_upgrade_creates_every_table(fresh_engine: AsyncEngine) -> None:
    await upgrade_database(fresh_engine)

    tables = await run_on(fresh_engine, _table_names)

    assert tables == MODEL_TABLES | {VERSION_TABLE}


async def test_upgrade_creates_every_column(fresh_engine: AsyncEngine) -> None:
    await upgrade_database(fresh_engine)

    columns = await run_on(fresh_engine, _column_names)

    for table_name, table in Base.metadata.tables.items():
        expected = {column.name for column in table.columns}
        assert columns[table_name] == expected, f"columns of {table_name}"


async def test_upgrade_creates_username_index(fresh_engine: AsyncEngine) -> None:
    await upgrade_database(fresh_engine)

    assert await has_username_index(fresh_engine)


async def test_upgrade_records_head(fresh_engine: AsyncEngine) -> None:
    await upgrade_database(fresh_engine)

    revision = await current_revision(fresh_engine)

    assert revision is not None
    assert revision == head_revision()


async def test_fresh_database_has_no_revision(fresh_engine: AsyncEngine) -> None:
    assert await current_revision(fresh_engine) is None


async def test_upgrade_twice_is_noop(fresh_engine: AsyncEngine) -> None:
    await upgrade_database(fresh_engine)
    before = await run_on(fresh_engine, _schema_snapshot)
    user_id = uuid.uuid4()
    async with fresh_engine.begin() as connection:
        await connection.execute(insert(User).values(id=user_id, email="kept@example.com"))

    await upgrade_database(fresh_engine)

    after = await run_on(fresh_engine, _schema_snapshot)
    assert after == before
    assert await current_revision(fresh_engine) == head_revision()
    async with fresh_engine.connect() as connection:
        email = await connection.scalar(select(User.email).where(User.id == user_id))
    assert email == "kept@example.com"


async def test_downgrade_to_base_drops_tables(fresh_engine: AsyncEngine) -> None:
    await upgrade_database(fresh_engine)

    await downgrade_database(fresh_engine, "base")

    tables = await run_on(fresh_engine, _table_names)
    assert tables & MODEL_TABLES == set()
    assert await current_revision(fresh_engine) is None


async def test_downgrade_then_upgrade(fresh_engine: AsyncEngine) -> None:
    await upgrade_database(fresh_engine)
    first = await run_on(fresh_engine, _schema_snapshot)
    await downgrade_database(fresh_engine, "base")

    await upgrade_database(fresh_engine)

    second = await run_on(fresh_engine, _schema_snapshot)
    assert second == first
    assert await current_revision(fresh_engine) == head_revision()
    assert await has_username_index(fresh_engine)


async def test_schema_matches_models(fresh_engine: AsyncEngine) -> None:
    await upgrade_database(fresh_engine)

    differences = await run_on(fresh_engine, _schema_differences)

    assert differences == []


async def test_schema_comparison_detects_drift(fresh_engine: AsyncEngine) -> None:
    # Guards the test above: a column the models do not declare must show up as a difference.
    await upgrade_database(fresh_engine)
    async with fresh_engine.begin() as connection:
        await connection.execute(text("ALTER TABLE users ADD COLUMN unexpected_column INTEGER"))

    differences = await run_on(fresh_engine, _schema_differences)

    assert [difference[0] for difference in differences] == ["remove_column"]


# Constraint names


async def test_known_constraint_names(fresh_engine: AsyncEngine) -> None:
    await upgrade_database(fresh_engine)

    names = await run_on(fresh_engine, _constraint_names)

    assert names["users"]["pk"] == ["pk_users"]
    assert ("uq_users_email", ["email"]) in names["users"]["unique"]
    assert ("fk_profiles_id_users", ["id"], "users") in names["profiles"]["foreign_keys"]
    assert ("fk_auth_sessions_user_id_users", ["user_id"], "users") in names["auth_sessions"]["foreign_keys"]
    assert "ck_invite_codes_max_uses_positive" in names["invite_codes"]["checks"]
    assert ("ix_auth_sessions_user_id", ["user_id"], False) in names["auth_sessions"]["indexes"]


async def test_primary_keys_follow_convention(fresh_engine: AsyncEngine) -> None:
    await upgrade_database(fresh_engine)

    names = await run_on(fresh_engine, _constraint_names)

    for table in MODEL_TABLES:
        assert names[table]["pk"] == [f"pk_{table}"], table


async def test_unique_constraints_follow_convention(fresh_engine: AsyncEngine) -> None:
    await upgrade_database(fresh_engine)

    names = await run_on(fresh_engine, _constraint_names)

    for table in MODEL_TABLES:
        for name, columns in names[table]["unique"]:
            assert name == f"uq_{table}_{'_'.join(columns)}", table


async def test_foreign_keys_follow_convention(fresh_engine: AsyncEngine) -> None:
    await upgrade_database(fresh_engine)

    names = await run_on(fresh_engine, _constraint_names)

    for table in MODEL_TABLES:
        for name, columns, referred_table in names[table]["foreign_keys"]:
            assert name == f"fk_{table}_{columns[0]}_{referred_table}", table


async def test_checks_follow_convention(fresh_engine: AsyncEngine) -> None:
    await upgrade_database(fresh_engine)

    names = await run_on(fresh_engine, _constraint_names)

    for table in MODEL_TABLES:
        for name in names[table]["checks"]:
            assert name is not None, table
            assert name.startswith(f"ck_{table}_"), name


async def test_indexes_follow_convention(fresh_engine: AsyncEngine) -> None:
    await upgrade_database(fresh_engine)

    names = await run_on(fresh_engine, _constraint_names)

    for table in MODEL_TABLES:
        for name, columns, unique in names[table]["indexes"]:
            if unique:
                # Unique indexes (partial or on expressions) carry an explicit name in the uq_ style.
                assert name.startswith(f"uq_{table}_"), name
            elif len(columns) == 1:
                assert name == f"ix_{table}_{columns[0]}", table
            else:
                # Composite indexes are named by hand: table, then their leading columns.
                assert name.startswith(f"ix_{table}_{columns[0]}_{columns[1]}"), name


async def test_constraint_names_match_models(fresh_engine: AsyncEngine) -> None:
    await upgrade_database(fresh_engine)

    names = await run_on(fresh_engine, _constraint_names)

    reflected: set[str] = set()
    for table in names.values():
        reflected.update(table["pk"])
        reflected.update(name for name, _ in table["unique"])
        reflected.update(name for name, _, _ in table["foreign_keys"])
        reflected.update(table["checks"])
        reflected.update(name for name, _, _ in table["indexes"])
    declared: set[str] = set()
    for model_table in Base.metadata.tables.values():
        declared.update(str(constraint.name) for constraint in model_table.constraints)
        declared.update(str(index.name) for index in model_table.indexes if index.name != USERNAME_INDEX)
    assert reflected == declared


def test_naming_convention_covers_every_kind() -> None:
    assert set(NAMING_CONVENTION) == {"ix", "uq", "ck", "fk", "pk"}


# Concurrent upgrades


async def test_concurrent_upgrades_succeed(fresh_postgres_url: str) -> None:
    engines = [create_engine(fresh_postgres_url), create_engine(fresh_postgres_url)]
    try:
        # gather raises the first error, so a lost race (duplicate table, duplicate version row) fails here.
        # Without the advisory lock the two upgrades can also block each other for good.
        # The timeout turns that into a failure instead of a hung run.
        async with asyncio.timeout(60):
            await asyncio.gather(*(upgrade_database(engine) for engine in engines))

        assert await current_revision(engines[0]) == head_revision()
        tables = await run_on(engines[0], _table_names)
        assert tables == MODEL_TABLES | {VERSION_TABLE}
        async with engines[0].connect() as connection:
            version_rows = await connection.scalar(text(f"SELECT count(*) FROM {VERSION_TABLE}"))  # noqa: S608
        assert version_rows == 1
    finally:
        for engine in engines:
            await engine.dispose()


# Column types: UTCDateTime


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on the suite's migrated database (emptied after each test)."""
    database_engine = create_engine(database_url)
    yield database_engine
    await database_engine.dispose()


async def insert_user(engine: AsyncEngine, **values: Any) -> uuid.UUID:
    user_id = uuid.uuid4()
    email = values.pop("email", f"user-{user_id.hex[:10]}@example.com")
    async with engine.begin() as connection:
        await connection.execute(insert(User).values(id=user_id, email=email, **values))
    return user_id


async def read_user_column(engine: AsyncEngine, user_id: uuid.UUID, column: Any) -> Any:
    async with engine.connect() as connection:
        return await connection.scalar(select(column).where(User.id == user_id))


async def test_utc_datetime_round_trip(engine: AsyncEngine) -> None:
    stored = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)
    user_id = await insert_user(engine, last_sign_in_at=stored)

    loaded = await read_user_column(engine, user_id, User.last_sign_in_at)

    assert loaded == stored
    assert loaded.tzinfo is not None
    assert loaded.utcoffset() == timedelta(0)
    assert loaded.microsecond == 123456


async def test_utc_datetime_default_aware(engine: AsyncEngine) -> None:
    user_id = await insert_user(engine)

    created_at = await read_user_column(engine, user_id, User.created_at)

    assert created_at.tzinfo is not None
    assert created_at.utcoffset() == timedelta(0)


async def test_utc_datetime_converts_offset(engine: AsyncEngine) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    stored = datetime(2026, 3, 1, 12, 30, 15, tzinfo=india)
    user_id = await insert_user(engine, last_sign_in_at=stored)

    loaded = await read_user_column(engine, user_id, User.last_sign_in_at)

    assert loaded == stored
    assert loaded.utcoffset() == timedelta(0)
    assert (loaded.hour, loaded.minute) == (7, 0)


async def test_utc_datetime_compares_in_sql(engine: AsyncEngine) -> None:
    # 12:00 UTC is later than 13:00+05:30 (07:30 UTC). SQLite compares text, so this holds only if both are UTC.
    user_id = await insert_user(engine, last_sign_in_at=datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    bound = datetime(2026, 3, 1, 13, 0, tzinfo=timezone(timedelta(hours=5, minutes=30)))

    async with engine.connect() as connection:
        later = await connection.scalar(select(func.count()).where(User.id == user_id, User.last_sign_in_at > bound))

    assert later == 1


async def test_utc_datetime_rejects_naive(engine: AsyncEngine) -> None:
    user_id = uuid.uuid4()

    with pytest.raises(StatementError, match="naive datetime"):
        async with engine.begin() as connection:
            await connection.execute(
                insert(User).values(id=user_id, email="naive@example.com", last_sign_in_at=datetime(2026, 3, 1, 12))
            )

    async with engine.connect() as connection:
        count = await connection.scalar(select(func.count()).select_from(User).where(User.id == user_id))
    assert count == 0


async def test_utc_datetime_rejects_naive_filter(engine: AsyncEngine) -> None:
    with pytest.raises(StatementError, match="naive datetime"):
        async with engine.connect() as connection:
            await connection.execute(select(User.id).where(User.created_at < datetime(2026, 3, 1, 12)))


# Column types: JSON


NESTED_DOCUMENT: dict[str, Any] = {
    "goals": ["learn", "write code"],
    "answers": {"experience": {"years": 3, "languages": ["python", "rust"]}, "skipped": None},
    "flags": {"beta": True, "newsletter": False},
    "score": 4.5,
    "big": 2**53,
    "empty": {"list": [], "object": {}},
    "text": 'naïve café ✓ 日本語 "quoted" \\ backslash',
}


async def test_json_round_trip_nested(engine: AsyncEngine) -> None:
    user_id = await insert_user(engine)
    preferences = {"appearance": {"theme": "dark", "accent": [255, 128, 0]}}
    async with engine.begin() as connection:
        await connection.execute(
            insert(Profile).values(id=user_id, onboarding=NESTED_DOCUMENT, preferences=preferences)
        )

    async with engine.connect() as connection:
        row = (await connection.execute(select(Profile.onboarding, Profile.preferences))).one()

    assert row.onboarding == NESTED_DOCUMENT
    assert row.preferences == preferences


async def test_json_round_trip_list(engine: AsyncEngine) -> None:
    links = ["https://example.com/a", "https://example.com/b?x=1&y=2"]
    metadata = {"referrer": {"campaign": "spring", "clicks": [1, 2, 3]}}
    async with engine.begin() as connection:
        await connection.execute(
            insert(WaitlistApplication).values(email="wait@example.com", links=links, extra_metadata=metadata)
        )

    async with engine.connect() as connection:
        row = (await connection.execute(select(WaitlistApplication.links, WaitlistApplication.extra_metadata))).one()
    loaded_links, loaded_metadata = row

    assert loaded_links == links
    assert loaded_metadata == metadata


# Case-insensitive usernames


async def insert_profile(engine: AsyncEngine, username: str | None) -> None:
    user_id = await insert_user(engine)
    async with engine.begin() as connection:
        await connection.execute(insert(Profile).values(id=user_id, username=username))


@pytest.mark.parametrize("variant", ["Ada", "ADA", "aDa"])
async def test_username_unique_ignoring_case(engine: AsyncEngine, variant: str) -> None:
    await insert_profile(engine, "ada")

    with pytest.raises(IntegrityError):
        await insert_profile(engine, variant)


async def test_username_exact_duplicate_rejected(engine: AsyncEngine) -> None:
    await insert_profile(engine, "ada")

    with pytest.raises(IntegrityError):
        await insert_profile(engine, "ada")


async def test_different_usernames_allowed(engine: AsyncEngine) -> None:
    await insert_profile(engine, "ada")
    await insert_profile(engine, "grace")

    async with engine.connect() as connection:
        count = await connection.scalar(select(func.count()).select_from(Profile))
    assert count == 2


async def test_many_null_usernames_allowed(engine: AsyncEngine) -> None:
    # Profiles start without a username, so the unique index must allow any number of NULLs.
    await insert_profile(engine, None)
    await insert_profile(engine, None)

    async with engine.connect() as connection:
        count = await connection.scalar(select(func.count()).select_from(Profile).where(Profile.username.is_(None)))
    assert count == 2
