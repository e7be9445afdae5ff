"""The SQLite connections of `create_engine`: one trip to the connection's thread per statement, with the
same results, errors and connection arguments as aiosqlite's own cursors."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, insert, select, text, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util import greenlet_spawn

from pocketllm.db import engine as engine_module
from pocketllm.db.engine import SQLITE_BEGIN_OPTION, SQLITE_NO_BEGIN, create_engine
from pocketllm.db.sqlite_driver import OneTripConnection

_METADATA = MetaData()
_NOTES = Table("notes", _METADATA, Column("id", Integer, primary_key=True), Column("body", String, unique=True))


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'driver.sqlite3'}")
    async with engine.begin() as connection:
        await connection.run_sync(_METADATA.create_all)
        await connection.execute(insert(_NOTES), [{"id": number, "body": f"note {number}"} for number in range(1, 6)])
    yield engine
    await engine.dispose()


async def test_statement_is_one_thread_trip(engine: AsyncEngine, thread_trips: list[str]) -> None:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
        thread_trips.clear()
        rows = (await connection.execute(select(_NOTES.c.body).where(_NOTES.c.id < 4))).all()
        changed = await connection.execute(update(_NOTES).where(_NOTES.c.id == 1).values(body="edited"))
        statement_trips = list(thread_trips)
        await connection.rollback()

    assert [row.body for row in rows] == ["note 1", "note 2", "note 3"]
    assert changed.rowcount == 1
    # aiosqlite's own cursors make four trips for the SELECT and three for the UPDATE.
    assert statement_trips == ["_execute", "_execute"]


async def test_results_match_sqlite3(engine: AsyncEngine) -> None:
    async with engine.begin() as connection:
        inserted = await connection.execute(insert(_NOTES).values(body="sixth"))
        many = await connection.execute(
            update(_NOTES).where(_NOTES.c.id == bindparam("p_id")).values(body=bindparam("p_body")),
            [{"p_id": 2, "p_body": "two"}, {"p_id": 3, "p_body": "three"}],
        )
        empty = await connection.execute(select(_NOTES.c.id, _NOTES.c.body).where(_NOTES.c.id > 100))
        returned = await connection.execute(
            update(_NOTES).where(_NOTES.c.id >= 5).values(body=_NOTES.c.body + "!").returning(_NOTES.c.id)
        )
        streamed = await connection.stream(select(_NOTES.c.id).order_by(_NOTES.c.id))
        streamed_ids = [row.id async for row in streamed]

        assert inserted.inserted_primary_key == (6,)
        assert many.rowcount == 2
        assert list(empty.keys()) == ["id", "body"]
        assert empty.all() == []
        assert sorted(row.id for row in returned) == [5, 6]
        assert streamed_ids == [1, 2, 3, 4, 5, 6]


async def test_failed_statement_keeps_connection(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        with pytest.raises(IntegrityError):
            await connection.execute(insert(_NOTES).values(body="note 1"))
        await connection.rollback()
        count = (await connection.execute(text("SELECT count(*) FROM notes"))).scalar_one()

    assert count == 5


async def test_url_arguments_reach_sqlite3(engine: AsyncEngine, tmp_path: Path) -> None:
    read_only = create_engine(f"sqlite+aiosqlite:///file:{tmp_path / 'driver.sqlite3'}?mode=ro&uri=true")
    try:
        async with read_only.connect() as connection:
            count = (await connection.execute(text("SELECT count(*) FROM notes"))).scalar_one()
            with pytest.raises(OperationalError, match="readonly"):
                await connection.execute(text("DELETE FROM notes"))
    finally:
        await read_only.dispose()

    assert count == 5


async def test_begin_shares_first_statement_trip(engine: AsyncEngine, thread_trips: list[str]) -> None:
    async with engine.begin() as connection:
        await connection.execute(update(_NOTES).where(_NOTES.c.id == 1).values(body="first edit"))
        await connection.execute(update(_NOTES).where(_NOTES.c.id == 2).values(body="second edit"))
    write_trips = list(thread_trips)
    thread_trips.clear()
    async with engine.connect() as connection:
        await connection.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})
        async with connection.begin():
            edited = (await connection.execute(select(_NOTES.c.id).where(_NOTES.c.body.like("% edit")))).all()

    assert write_trips == ["BEGIN IMMEDIATE; _execute", "_execute", "commit"]
    assert thread_trips == ["BEGIN DEFERRED; _execute", "commit"]
    assert [row.id for row in edited] == [1, 2]


async def test_empty_transaction_makes_no_trip(engine: AsyncEngine, thread_trips: list[str]) -> None:
    async with engine.begin():
        pass
    async with engine.connect() as connection:
        await connection.begin()
        await connection.rollback()

    assert thread_trips == []


async def test_locked_begin_fails_first_statement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "SQLITE_BUSY_TIMEOUT_MS", 100)
    path = tmp_path / "locked.sqlite3"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    async with engine.begin() as connection:
        await connection.run_sync(_METADATA.create_all)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(OperationalError, match="database is locked") as raised:
            async with engine.begin() as connection:
                await connection.execute(insert(_NOTES).values(body="blocked"))
        notes = getattr(raised.value.orig, "__notes__", [])
        other.execute("ROLLBACK")
        async with engine.begin() as connection:
            await connection.execute(insert(_NOTES).values(body="after the lock"))
        async with engine.connect() as connection:
            bodies = (await connection.execute(select(_NOTES.c.body))).scalars().all()
    finally:
        other.close()
        await engine.dispose()

    assert notes == ["Raised by BEGIN IMMEDIATE, sent in the same call before this statement."]
    assert bodies == ["after the lock"]


async def test_returning_a_connection_without_transaction_makes_no_trip(
    engine: AsyncEngine, thread_trips: list[str]
) -> None:
    async with engine.connect() as connection:
        await connection.execution_options(**{SQLITE_BEGIN_OPTION: SQLITE_NO_BEGIN})
        await connection.execute(text("SELECT 1"))
        thread_trips.clear()
    after_reads = list(thread_trips)
    async with engine.begin() as connection:
        await connection.execute(update(_NOTES).where(_NOTES.c.id == 1).values(body="edited"))
        thread_trips.clear()
    after_commit = list(thread_trips)

    # SQLAlchemy rolls back both connections on their return, and neither has a transaction open then.
    assert after_reads == []
    assert after_commit == ["commit"]


async def test_connection_returned_in_a_transaction_is_rolled_back(engine: AsyncEngine) -> None:
    def write_and_return_uncommitted() -> bool:
        # Below SQLAlchemy's Connection, which rolls back the transactions it began itself, so that only
        # the pool's reset can end this one.
        pooled = engine.sync_engine.raw_connection()
        cursor = pooled.cursor()
        cursor.execute("BEGIN IMMEDIATE")
        cursor.execute("INSERT INTO notes (id, body) VALUES (99, 'uncommitted')")
        cursor.close()
        assert pooled.driver_connection is not None
        was_open: bool = pooled.driver_connection.in_transaction
        pooled.close()
        return was_open

    assert await greenlet_spawn(write_and_return_uncommitted)
    # Had the returned connection kept its transaction, this write would fail or wait for its lock.
    async with engine.begin() as connection:
        await connection.execute(insert(_NOTES).values(id=100, body="after"))
        ids = (await connection.execute(select(_NOTES.c.id).where(_NOTES.c.id >= 99))).scalars().all()

    assert ids == [100]


async def test_rollback_waits_for_calls_still_queued(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        driver = (await connection.get_raw_connection()).driver_connection
        assert isinstance(driver, OneTripConnection)
        # The thread is held while a BEGIN is queued behind, as when a caller was cancelled mid-statement.
        gate = threading.Event()
        blocking = asyncio.create_task(driver.run(lambda _: gate.wait(10)))
        began = asyncio.create_task(driver.execute("BEGIN IMMEDIATE"))
        await asyncio.sleep(0)
        assert not driver.in_transaction
        rolled_back = asyncio.create_task(driver.rollback())
        gate.set()
        await asyncio.gather(blocking, began, rolled_back)

        assert not driver.in_transaction


def _edit_note(connection: OneTripConnection, note_id: int, body: str) -> int:
    cursor = connection.sqlite_connection.execute("UPDATE notes SET body = ? WHERE id = ?", (body, note_id))
    return cursor.rowcount


def _fail_after_edit(connection: OneTripConnection) -> None:
    _edit_note(connection, 1, "edited, then failed")
    raise LookupError("failed after the edit")


async def one_trip_driver(connection: AsyncConnection) -> OneTripConnection:
    """Return the driver connection under `connection`, which the engine opens as a OneTripConnection."""
    driver = (await connection.get_raw_connection()).driver_connection
    assert isinstance(driver, OneTripConnection)
    return driver


async def note_body(engine: AsyncEngine, note_id: int) -> str:
    async with engine.connect() as connection:
        return str((await connection.execute(select(_NOTES.c.body).where(_NOTES.c.id == note_id))).scalar_one())


async def test_run_and_commit_in_one_trip(engine: AsyncEngine, thread_trips: list[str]) -> None:
    async with engine.begin() as connection:
        driver = await one_trip_driver(connection)
        changed = await driver.run_and_commit(_edit_note, 1, "committed with the edit")
    trips = list(thread_trips)

    assert changed == 1
    # No trip for the block's own commit.
    assert trips == ["BEGIN IMMEDIATE; _call_then_commit"]
    assert await note_body(engine, 1) == "committed with the edit"


async def test_statement_after_run_and_commit_raises(engine: AsyncEngine) -> None:
    async def commit_then_write() -> None:
        async with engine.begin() as connection:
            driver = await one_trip_driver(connection)
            await driver.run_and_commit(_edit_note, 1, "committed first")
            # Outside a transaction, this would be committed on its own whatever the block does next.
            await connection.execute(update(_NOTES).where(_NOTES.c.id == 2).values(body="not in a transaction"))

    with pytest.raises(RuntimeError, match="committed by run_and_commit"):
        await commit_then_write()

    assert await note_body(engine, 1) == "committed first"
    assert await note_body(engine, 2) == "note 2"
    # The pooled connection works as before once the block has ended.
    async with engine.begin() as connection:
        await connection.execute(update(_NOTES).where(_NOTES.c.id == 2).values(body="next block"))
    assert await note_body(engine, 2) == "next block"


async def test_run_and_commit_failure_commits_nothing(engine: AsyncEngine) -> None:
    async def fail_in_the_call() -> None:
        async with engine.begin() as connection:
            driver = await one_trip_driver(connection)
            await driver.run_and_commit(_fail_after_edit)

    with pytest.raises(LookupError, match="after the edit"):
        await fail_in_the_call()

    assert await note_body(engine, 1) == "note 1"
