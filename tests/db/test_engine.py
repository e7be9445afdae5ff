"""The engine and `Database`: which transaction statements each kind of session sends, and, on PostgreSQL,
a pooled connection that the server closed is replaced at checkout."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import pytest
from sqlalchemy import bindparam, event, select, text
from sqlalchemy.engine import make_url

from pocketllm.db.driver_query import DriverQuery
from pocketllm.db.engine import Database, create_engine
from pocketllm.models import User


@contextmanager
def sent_statements(database: Database) -> Iterator[list[str]]:
    """Collect the first word of each statement that `database` sends, and a BEGIN statement whole."""
    statements: list[str] = []

    def record(connection: Any, cursor: Any, statement: str, *args: Any) -> None:
        words = statement.upper().split()
        statements.append(" ".join(words) if words[0] == "BEGIN" else words[0])

    event.listen(database.engine.sync_engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", record)


async def test_single_reads_send_no_begin(database: Database) -> None:
    with sent_statements(database) as statements:
        async with database.read_connection() as connection:
            await connection.execute(text("SELECT 1"))
        async with database.read_only(snapshot=False) as session:
            await session.execute(select(User.id))

    assert statements == ["SELECT", "SELECT"]


async def test_driver_connection_sends_no_begin(database: Database) -> None:
    query = DriverQuery(select(User.id).where(User.email == bindparam("p_email")))
    with sent_statements(database) as statements:
        async with database.driver_connection() as connection:
            await query.all(connection, {"p_email": "nobody@example.com"})

    assert statements == ["SELECT"]
    # The connection went back to the pool.
    assert database.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kind", "sqlite_begin"),
    [("read_only", "BEGIN DEFERRED"), ("transaction", "BEGIN IMMEDIATE")],
)
async def test_transaction_begin_mode(database: Database, kind: str, sqlite_begin: str) -> None:
    open_session = database.read_only if kind == "read_only" else database.transaction
    with sent_statements(database) as statements:
        async with open_session() as session:
            await session.execute(select(User.id))

    # asyncpg starts PostgreSQL transactions itself, outside cursors, so only SQLite's BEGIN shows here.
    expected = [sqlite_begin, "SELECT"] if database.dialect == "sqlite" else ["SELECT"]
    assert statements == expected


@pytest.mark.postgres_only
async def test_closed_pooled_connection_is_replaced(database_url: str) -> None:
    engine = create_engine(database_url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as connection:
            first_pid = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()

        # Another session ends the pooled connection, as a server restart or an idle timeout would.
        plain_url = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
        admin = await asyncpg.connect(plain_url)
        try:
            # With a timeout, pg_terminate_backend returns once the backend has exited.
            assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", first_pid)
        finally:
            await admin.close()

        async with engine.connect() as connection:
            second_pid = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()
            assert (await connection.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()

    assert second_pid != first_pid
