"""`DriverQuery` returns the rows that SQLAlchemy's own execution returns, with the same values and types,
on both databases."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import bindparam, event, insert, select, update

from pocketllm.db.driver_query import DriverQuery, OneTripSteps, run_in_one_trip
from pocketllm.db.engine import Database
from pocketllm.db.types import attribute_columns
from pocketllm.models import Chat, ModelConfig, User

# Microseconds included, so that a conversion that drops them shows in the comparisons.
BASE_TIME = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
SETTINGS = {"temperature": 0.2, "stop": ["\n\n"], "nested": {"name": "Zoë", "flag": True}}


async def insert_account(database: Database) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """Insert a user with a model configuration and three chats updated a second apart, and return their ids."""
    user = User(email=f"driver-{uuid.uuid4().hex[:10]}@example.com", last_sign_in_at=BASE_TIME)
    config = ModelConfig(provider="openai", model="gpt-4o-mini", display_name="Mini", settings=SETTINGS)
    async with database.transaction() as session:
        session.add(user)
        await session.flush()
        config.user_id = user.id
        session.add(config)
        await session.flush()
        chat_ids = [uuid.uuid4() for _ in range(3)]
        await session.execute(
            insert(Chat),
            [
                {
                    "id": chat_id,
                    "user_id": user.id,
                    "title": None if index == 0 else f"Chat {index}",
                    "model_config_id": config.id if index else None,
                    "last_sequence": index,
                    "created_at": BASE_TIME,
                    "updated_at": BASE_TIME + timedelta(seconds=index),
                }
                for index, chat_id in enumerate(chat_ids)
            ],
        )
    return user.id, chat_ids


CHATS_WITH_MODELS = (
    select(Chat.id, Chat.title, Chat.updated_at, *attribute_columns(ModelConfig), User.last_sign_in_at)
    .join(User, User.id == Chat.user_id)
    .outerjoin(ModelConfig, ModelConfig.id == Chat.model_config_id)
    .where(Chat.user_id == bindparam("p_user_id"), Chat.updated_at >= bindparam("p_since"))
    .order_by(Chat.updated_at.desc())
    .limit(bindparam("p_limit"))
)


async def read_chats_both_ways(database: Database, method: str) -> tuple[list[Any], list[Any]]:
    """Read CHATS_WITH_MODELS through SQLAlchemy and through DriverQuery's `method`, and return both results."""
    user_id, _ = await insert_account(database)
    parameters: dict[str, Any] = {"p_user_id": user_id, "p_since": datetime(2000, 1, 1, tzinfo=UTC), "p_limit": 10}

    async with database.read_connection() as connection:
        expected = list((await connection.execute(CHATS_WITH_MODELS, parameters)).all())
        rows = list(await getattr(DriverQuery(CHATS_WITH_MODELS), method)(connection, parameters))

    assert len(expected) == 3
    assert [tuple(row) for row in rows] == [tuple(row) for row in expected]
    for row, reference in zip(rows, expected, strict=True):
        assert [type(value) for value in row] == [type(value) for value in reference]
    return expected, rows


async def test_rows_match_sqlalchemy_execution(database: Database) -> None:
    _, rows = await read_chats_both_ways(database, "all")

    newest = rows[0]
    assert newest.settings == SETTINGS
    assert newest.is_active is True
    assert newest.updated_at.tzinfo is not None
    assert rows[-1].model is None


async def test_values_match_sqlalchemy_execution(database: Database) -> None:
    expected, rows = await read_chats_both_ways(database, "values")

    # The JSON column is decoded and the time has its zone on both databases, as in all().
    fields = list(expected[0]._fields)
    assert rows[0][fields.index("settings")] == SETTINGS
    assert rows[0][fields.index("updated_at")].tzinfo is not None


async def test_values_without_conversions_unpack_in_column_order(database: Database) -> None:
    user_id, _ = await insert_account(database)
    statement = (
        select(Chat.title, Chat.last_sequence)
        .where(Chat.user_id == bindparam("p_user_id"))
        .order_by(Chat.last_sequence)
    )

    async with database.read_connection() as connection:
        rows = await DriverQuery(statement).values(connection, {"p_user_id": user_id})

    assert [(title, sequence) for title, sequence in rows] == [(None, 0), ("Chat 1", 1), ("Chat 2", 2)]
    assert [row[1] for row in rows] == [0, 1, 2]


async def test_parameters_use_column_types(database: Database) -> None:
    user_id, chat_ids = await insert_account(database)
    query = DriverQuery(CHATS_WITH_MODELS)
    async with database.read_connection() as connection:
        since = BASE_TIME + timedelta(seconds=1, microseconds=1)
        newest = await query.all(connection, {"p_user_id": user_id, "p_since": since, "p_limit": 10})
        later = await query.all(connection, {"p_user_id": user_id, "p_since": BASE_TIME, "p_limit": 2})

    # One microsecond after the second chat's update leaves only the third. The limit is a parameter too.
    assert [row.id for row in newest] == [chat_ids[2]]
    assert [row.id for row in later] == [chat_ids[2], chat_ids[1]]


async def test_literal_limit_is_sent(database: Database) -> None:
    user_id, _ = await insert_account(database)
    query = DriverQuery(select(Chat.id).where(Chat.user_id == bindparam("p_user_id")).limit(1))
    async with database.read_connection() as connection:
        rows = await query.all(connection, {"p_user_id": user_id})

    assert len(rows) == 1


async def test_no_row_gives_none(database: Database) -> None:
    query = DriverQuery(select(User.email).where(User.id == bindparam("p_user_id")))
    async with database.read_connection() as connection:
        assert await query.first(connection, {"p_user_id": uuid.uuid4()}) is None


async def test_reads_see_the_same_transaction(database: Database) -> None:
    user_id, _ = await insert_account(database)
    chat_id = uuid.uuid4()
    query = DriverQuery(select(Chat.title).where(Chat.id == bindparam("p_chat_id")))
    async with database.statements() as connection:
        await connection.execute(insert(Chat).values(id=chat_id, user_id=user_id, title="Written first"))
        row = await query.first(connection, {"p_chat_id": chat_id})

    assert row is not None
    assert row.title == "Written first"


async def test_duplicate_names_keep_positions(database: Database) -> None:
    user_id, chat_ids = await insert_account(database)
    query = DriverQuery(
        select(Chat.id, User.id).join(User, User.id == Chat.user_id).where(Chat.id == bindparam("p_chat_id"))
    )
    async with database.read_connection() as connection:
        row = await query.first(connection, {"p_chat_id": chat_ids[0]})

    assert row is not None
    assert tuple(row) == (chat_ids[0], user_id)


async def test_list_parameter_raises(database: Database) -> None:
    query = DriverQuery(select(User.id).where(User.id.in_([uuid.uuid4(), uuid.uuid4()])))
    async with database.read_connection() as connection:
        with pytest.raises(ValueError, match="does not compile to final SQL"):
            await query.all(connection, {})


RENAME_CHAT = DriverQuery(
    update(Chat)
    .where(Chat.id == bindparam("p_chat_id"))
    .values(title=bindparam("p_title"), updated_at=BASE_TIME)
    .returning(Chat.title)
)


async def read_title(database: Database, chat_id: uuid.UUID) -> str | None:
    async with database.read_connection() as connection:
        return await connection.scalar(select(Chat.title).where(Chat.id == chat_id))


async def test_write_returns_its_rows(database: Database) -> None:
    _, chat_ids = await insert_account(database)
    async with database.statements() as connection:
        row = await RENAME_CHAT.first(connection, {"p_chat_id": chat_ids[0], "p_title": "Renamed"})

    assert row is not None
    assert row.title == "Renamed"
    assert await read_title(database, chat_ids[0]) == "Renamed"


async def test_write_follows_block_transaction(database: Database) -> None:
    _, chat_ids = await insert_account(database)

    async def rename_then_fail() -> None:
        async with database.statements() as connection:
            await RENAME_CHAT.first(connection, {"p_chat_id": chat_ids[1], "p_title": "Renamed"})
            raise RuntimeError("failed after the write")

    with pytest.raises(RuntimeError, match="after the write"):
        await rename_then_fail()

    # SQLite's block is one transaction, so the write is undone. PostgreSQL's committed it on its own.
    expected = "Renamed" if database.dialect == "postgresql" else "Chat 1"
    assert await read_title(database, chat_ids[1]) == expected


async def test_write_outside_statements_raises(database: Database) -> None:
    _, chat_ids = await insert_account(database)
    async with database.engine.connect() as connection:
        with pytest.raises(ValueError, match="writes on"):
            await RENAME_CHAT.first(connection, {"p_chat_id": chat_ids[0], "p_title": "Renamed"})

    assert await read_title(database, chat_ids[0]) is None


async def test_missing_parameter_raises(database: Database) -> None:
    query = DriverQuery(select(User.email).where(User.id == bindparam("p_user_id")))
    async with database.read_connection() as connection:
        with pytest.raises(ValueError, match="missing a value for the parameter 'p_user_id'"):
            await query.all(connection, {})


async def test_python_side_default_raises(database: Database) -> None:
    _, chat_ids = await insert_account(database)
    # Chat.updated_at has an `onupdate` default, which SQLAlchemy computes at execution time.
    query = DriverQuery(update(Chat).where(Chat.id == bindparam("p_chat_id")).values(title=bindparam("p_title")))
    async with database.statements() as connection:
        with pytest.raises(ValueError, match="fill in the columns updated_at"):
            await query.all(connection, {"p_chat_id": chat_ids[0], "p_title": "Renamed"})

    assert await read_title(database, chat_ids[0]) is None


READ_TITLE = DriverQuery(select(Chat.title).where(Chat.id == bindparam("p_chat_id")))


async def test_one_trip_runs_statements_together(database: Database, thread_trips: list[str]) -> None:
    _, chat_ids = await insert_account(database)
    seen: list[str] = []

    def rename_and_read(steps: OneTripSteps) -> tuple[Any, Any]:
        renamed = steps.first(RENAME_CHAT, {"p_chat_id": chat_ids[0], "p_title": "Renamed"})
        return renamed, steps.values(READ_TITLE, {"p_chat_id": chat_ids[0]})

    def record(connection: Any, cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement.split()[0])

    event.listen(database.engine.sync_engine, "before_cursor_execute", record)
    try:
        async with database.statements() as connection:
            if database.dialect == "postgresql":
                with pytest.raises(ValueError, match="needs an SQLite connection"):
                    await run_in_one_trip(connection, rename_and_read, writes=True)
                return
            thread_trips.clear()
            renamed, titles = await run_in_one_trip(connection, rename_and_read, writes=True)
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", record)

    assert thread_trips == ["BEGIN IMMEDIATE; _in_one_trip", "commit"]
    assert seen == ["BEGIN", "UPDATE", "SELECT"]
    assert renamed is not None
    assert renamed.title == "Renamed"
    assert titles == [("Renamed",)]
    assert await read_title(database, chat_ids[0]) == "Renamed"


async def test_one_trip_rows_match_sqlalchemy_execution(database: Database) -> None:
    if database.dialect == "postgresql":
        pytest.skip("runs against SQLite only")
    user_id, _ = await insert_account(database)
    parameters: dict[str, Any] = {"p_user_id": user_id, "p_since": datetime(2000, 1, 1, tzinfo=UTC), "p_limit": 10}
    query = DriverQuery(CHATS_WITH_MODELS)

    async with database.read_connection() as connection:
        expected = list((await connection.execute(CHATS_WITH_MODELS, parameters)).all())
        first, values = await run_in_one_trip(
            connection, lambda steps: (steps.first(query, parameters), steps.values(query, parameters))
        )

    assert len(expected) == 3
    assert tuple(first) == tuple(expected[0])
    assert first.title == expected[0].title
    assert [tuple(row) for row in values] == [tuple(row) for row in expected]
    assert [type(value) for value in values[0]] == [type(value) for value in expected[0]]


async def test_one_trip_error_undoes_its_writes(database: Database) -> None:
    if database.dialect == "postgresql":
        pytest.skip("runs against SQLite only")
    _, chat_ids = await insert_account(database)

    def rename_then_fail(steps: OneTripSteps) -> None:
        steps.first(RENAME_CHAT, {"p_chat_id": chat_ids[0], "p_title": "Renamed"})
        raise LookupError("failed after the write")

    with pytest.raises(LookupError, match="after the write"):
        async with database.statements() as connection:
            await run_in_one_trip(connection, rename_then_fail, writes=True)

    assert await read_title(database, chat_ids[0]) is None


async def test_one_trip_write_needs_writes(database: Database) -> None:
    if database.dialect == "postgresql":
        pytest.skip("runs against SQLite only")
    _, chat_ids = await insert_account(database)

    async with database.statements() as connection:
        with pytest.raises(ValueError, match="pass writes=True"):
            await run_in_one_trip(
                connection, lambda steps: steps.first(RENAME_CHAT, {"p_chat_id": chat_ids[0], "p_title": "Renamed"})
            )
        with pytest.raises(ValueError, match="commits only with writes=True"):
            await run_in_one_trip(connection, lambda steps: None, commit=True)
    async with database.engine.connect() as connection:
        with pytest.raises(ValueError, match="writes on SQLite only inside a transaction"):
            await run_in_one_trip(connection, lambda steps: None, writes=True)

    assert await read_title(database, chat_ids[0]) is None
