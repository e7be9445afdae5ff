"""SQLite's write-ahead log in `pocketllm serve`: commits leave checkpoints to a background task, which
copies the log into the database file while requests go on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import Column, Integer, MetaData, Table, Text, event, insert, text

from pocketllm.db.engine import (
    SQLITE_BACKGROUND_AUTOCHECKPOINT_PAGES,
    SQLITE_BACKGROUND_WAL_SIZE_LIMIT_BYTES,
    Database,
    create_engine,
)
from pocketllm.db.wal import run_checkpoints

_METADATA = MetaData()
_PAGES = Table("pages", _METADATA, Column("id", Integer, primary_key=True), Column("body", Text))
# One row per 4 KiB page or more, in 15 commits: past SQLite's default checkpoint of 1,000 pages.
_ROWS = 1500
_PAGE_SIZE = 4096


@pytest.fixture
async def background_database(tmp_path: Path) -> AsyncIterator[tuple[Database, Path]]:
    path = tmp_path / "wal.sqlite3"
    database = Database(
        create_engine(f"sqlite+aiosqlite:///{path}", sqlite_autocheckpoint_pages=SQLITE_BACKGROUND_AUTOCHECKPOINT_PAGES)
    )
    async with database.engine.begin() as connection:
        await connection.run_sync(_METADATA.create_all)
    yield database, path
    await database.dispose()


async def fill(database: Database) -> None:
    for start in range(0, _ROWS, 100):
        async with database.transaction() as session:
            await session.execute(insert(_PAGES), [{"body": "x" * _PAGE_SIZE} for _ in range(start, start + 100)])


async def test_commits_skip_checkpoint(background_database: tuple[Database, Path]) -> None:
    database, path = background_database

    await fill(database)
    size_before = path.stat().st_size
    frames, copied = await database.checkpoint_wal()

    # No commit copied the log, so all of it is there and the database file contains little of it.
    assert frames > _ROWS
    assert copied == frames
    assert size_before < _ROWS * _PAGE_SIZE // 10
    assert path.stat().st_size > _ROWS * _PAGE_SIZE


async def test_log_file_shrinks_after_checkpoint(background_database: tuple[Database, Path]) -> None:
    database, path = background_database
    log_file = path.with_name(path.name + "-wal")
    await fill(database)
    size_after_burst = log_file.stat().st_size

    await database.checkpoint_wal()
    # The first write after a checkpoint that copied the whole log starts the log over.
    async with database.transaction() as session:
        await session.execute(insert(_PAGES).values(body="after"))

    assert size_after_burst > SQLITE_BACKGROUND_WAL_SIZE_LIMIT_BYTES
    assert log_file.stat().st_size <= SQLITE_BACKGROUND_WAL_SIZE_LIMIT_BYTES + 4 * _PAGE_SIZE


async def test_default_engine_checkpoints_in_commits(tmp_path: Path) -> None:
    path = tmp_path / "default.sqlite3"
    database = Database(create_engine(f"sqlite+aiosqlite:///{path}"))
    try:
        async with database.engine.begin() as connection:
            await connection.run_sync(_METADATA.create_all)
        await fill(database)
        size_after_commits = path.stat().st_size
    finally:
        await database.dispose()

    # SQLite's own checkpoint in a commit, at 1,000 pages, copied most of the rows into the file.
    assert size_after_commits > 1000 * _PAGE_SIZE


async def test_loop_checkpoints_then_stops(background_database: tuple[Database, Path]) -> None:
    database, path = background_database
    await fill(database)
    stop = asyncio.Event()

    def stop_after_checkpoint(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "wal_checkpoint" in statement:
            stop.set()

    event.listen(database.engine.sync_engine, "after_cursor_execute", stop_after_checkpoint)
    await asyncio.wait_for(run_checkpoints(database, stop, interval=0.01), timeout=10)

    assert path.stat().st_size > _ROWS * _PAGE_SIZE


@pytest.mark.postgres_only
async def test_checkpoint_on_postgresql_does_nothing(database: Database) -> None:
    assert await database.checkpoint_wal() == (0, 0)


async def test_serve_starts_checkpoint_task(app: FastAPI) -> None:
    database: Database = app.state.database
    tasks = {task.get_name() for task in asyncio.all_tasks()}
    if database.dialect != "sqlite":
        assert "sqlite-checkpoints" not in tasks
        return
    async with database.engine.connect() as connection:
        pages = (await connection.execute(text("PRAGMA wal_autocheckpoint"))).scalar_one()
        await connection.rollback()

    assert "sqlite-checkpoints" in tasks
    assert pages == SQLITE_BACKGROUND_AUTOCHECKPOINT_PAGES


async def test_in_memory_database_is_not_checkpointed() -> None:
    database = Database(create_engine("sqlite+aiosqlite:///:memory:"))
    try:
        async with database.transaction() as session:
            await session.execute(text("CREATE TABLE notes (body TEXT)"))
        async with database.engine.connect() as connection:
            await connection.execute(text("INSERT INTO notes VALUES ('open')"))
            # The pool shares its one connection, so a checkpoint here would end this transaction.
            assert await database.checkpoint_wal() == (0, 0)
            rows = (await connection.execute(text("SELECT body FROM notes"))).scalars().all()
            await connection.rollback()
    finally:
        await database.dispose()

    assert rows == ["open"]
