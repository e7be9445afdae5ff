"""An aiosqlite connection that runs each statement in one trip to its thread.

aiosqlite runs every sqlite3 call on a thread of the connection, and SQLAlchemy's aiosqlite adapter makes
three or four such calls per statement: create a cursor, execute, fetch all rows, close the cursor. Each
call is a round trip between the event loop and that thread. `OneTripConnection` creates the cursor, runs
the statement, fetches its rows and closes the cursor in one call. The adapter's later calls (fetchall,
description, rowcount) return what that call stored. On a 2-core machine this cut the CPU time of a small
statement by 40 to 50% (see docs/benchmarks.md, "Fourth round").

The connection also skips the trip of a rollback when no transaction is open and no call is waiting for
the thread (see `OneTripConnection.rollback`), sends a transaction's BEGIN in the same trip as its first
statement (see `OneTripConnection.defer_begin`), and can send its COMMIT in the same trip as its last
call (see `OneTripConnection.run_and_commit`).

It relies on three private attributes of aiosqlite 0.22's Connection: `_execute` (queue a call for the
thread, which OneTripConnection overrides to count the calls), `_conn` (the sqlite3 connection) and
`_thread`. pyproject.toml keeps aiosqlite below 0.23.
"""

from __future__ import annotations

import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, TypeVar

import aiosqlite
from sqlalchemy import event
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import ConnectionPoolEntry

# aiosqlite's default, kept for its own iteration helpers.
_ITER_CHUNK_SIZE = 64

Description = tuple[tuple[str, None, None, None, None, None, None], ...] | None
T = TypeVar("T")


class _Outcome:
    """The rows and cursor attributes of one statement, read on the connection's thread."""

    __slots__ = ("description", "lastrowid", "rowcount", "rows")

    def __init__(self, cursor: sqlite3.Cursor, rows: list[Any]) -> None:
        self.rows = rows
        self.description: Description = cursor.description
        self.rowcount = cursor.rowcount
        self.lastrowid = cursor.lastrowid


def _execute(connection: OneTripConnection, sql: str, parameters: Any) -> _Outcome:
    cursor = connection._conn.cursor()
    try:
        cursor.execute(sql, parameters)
        rows = cursor.fetchall() if cursor.description else []
        return _Outcome(cursor, rows)
    finally:
        cursor.close()


def _execute_many(connection: OneTripConnection, sql: str, parameters: Iterable[Any]) -> _Outcome:
    cursor = connection._conn.cursor()
    try:
        cursor.executemany(sql, parameters)
        return _Outcome(cursor, [])
    finally:
        cursor.close()


def _begin(connection: sqlite3.Connection, statement: str) -> None:
    """Run a deferred BEGIN. Its error names it in a note, because SQLAlchemy reports the statement after it."""
    try:
        connection.execute(statement)
    except sqlite3.Error as error:
        error.add_note(f"Raised by {statement}, sent in the same call before this statement.")
        raise


class OneTripCursor:
    """The cursor interface SQLAlchemy's adapter uses, with the rows fetched when the statement runs."""

    arraysize = 1

    def __init__(self, connection: OneTripConnection) -> None:
        self._connection = connection
        self._rows: deque[Any] = deque()
        self.description: Description = None
        self.rowcount = -1
        self.lastrowid: int | None = None

    async def __aenter__(self) -> OneTripCursor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def execute(self, sql: str, parameters: Sequence[Any] | dict[str, Any] | None = None) -> OneTripCursor:
        self._take(await self._connection.run(_execute, sql, parameters or ()))
        return self

    async def executemany(self, sql: str, parameters: Iterable[Any]) -> OneTripCursor:
        self._take(await self._connection.run(_execute_many, sql, parameters))
        return self

    def _take(self, outcome: _Outcome) -> None:
        self._rows = deque(outcome.rows)
        self.description = outcome.description
        self.rowcount = outcome.rowcount
        self.lastrowid = outcome.lastrowid

    async def fetchone(self) -> Any:
        return self._rows.popleft() if self._rows else None

    async def fetchmany(self, size: int | None = None) -> list[Any]:
        count = min(size or self.arraysize, len(self._rows))
        return [self._rows.popleft() for _ in range(count)]

    async def fetchall(self) -> list[Any]:
        rows = list(self._rows)
        self._rows.clear()
        return rows

    async def close(self) -> None:
        self._rows.clear()


class OneTripConnection(aiosqlite.Connection):
    """An aiosqlite connection whose cursors run each statement in one trip to the connection's thread."""

    def __init__(self, connector: Callable[[], sqlite3.Connection], iter_chunk_size: int) -> None:
        super().__init__(connector, iter_chunk_size)
        # Calls queued for the thread, and calls it has finished: equal when nothing is queued or running.
        # Each is changed by one thread only (the event loop's and the connection's).
        self._queued = 0
        self._finished = 0
        # A BEGIN statement that runs on the thread just before the next call (see defer_begin).
        self._pending_begin: str | None = None
        # Whether a call committed the transaction that SQLAlchemy still considers open (see run_and_commit).
        self._committed_by_call = False

    def cursor(self) -> OneTripCursor:  # type: ignore[override]
        return OneTripCursor(self)

    async def run(self, function: Callable[..., T], *arguments: Any) -> T:
        """Call `function(self, *arguments)` on the connection's thread and return what it returns."""
        outcome: T = await self._execute(function, self, *arguments)
        return outcome

    async def run_and_commit(self, function: Callable[..., T], *arguments: Any) -> T:
        """Like `run`, then commit the open transaction in the same trip once `function` has returned.

        The transaction must end after this call: the caller's commit then makes no trip, and any other
        call before it raises RuntimeError, because its statements would run outside a transaction. When
        `function` raises, nothing is committed, and the caller's rollback ends the transaction as usual.
        """
        outcome: T = await self._execute(_call_then_commit, self, function, *arguments)
        self._committed_by_call = True
        return outcome

    @property
    def sqlite_connection(self) -> sqlite3.Connection:
        """The sqlite3 connection, for functions that `run` calls on the connection's thread (only there)."""
        return self._conn

    def defer_begin(self, statement: str) -> None:
        """Send `statement` (a BEGIN) in the same trip as the next call, instead of in a trip of its own.

        An error of the BEGIN, such as SQLITE_BUSY after the busy timeout, is then raised by that call. A
        transaction that ends before any call sends neither its BEGIN nor its COMMIT or ROLLBACK.
        """
        self._pending_begin = statement

    async def _execute(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self._committed_by_call:
            raise RuntimeError(
                "The transaction was committed by run_and_commit. End the block before running anything else."
            )
        self._queued += 1
        begin, self._pending_begin = self._pending_begin, None
        return await super()._execute(self._counted, begin, fn, *args, **kwargs)  # type: ignore[no-untyped-call]

    def _counted(self, begin: str | None, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            if begin is not None:
                _begin(self._conn, begin)
            return fn(*args, **kwargs)
        finally:
            self._finished += 1

    async def commit(self) -> None:
        """Commit the open transaction. One whose BEGIN was never sent, or that `run_and_commit` committed,
        has nothing to commit."""
        if self._committed_by_call:
            self._committed_by_call = False
            return
        if self._pending_begin is not None:
            self._pending_begin = None
            return
        await super().commit()

    async def rollback(self) -> None:
        """Roll back the open transaction; when the connection is idle with none open, skip the trip.

        SQLAlchemy rolls back every connection it returns to the pool, and a connection whose statements ran
        through it also at close: after a commit, after reads without BEGIN and after DriverQuery reads,
        where no transaction is open. sqlite3 then sends nothing, but the call still made a trip to the
        thread and back. A call still queued or running (one whose caller was cancelled, say) could begin
        a transaction after the state is read, so the rollback is queued behind it as before.
        """
        self._pending_begin = None
        self._committed_by_call = False
        if self._queued == self._finished and not self._conn.in_transaction:
            return
        await super().rollback()

    async def close(self) -> None:
        self._pending_begin = None
        self._committed_by_call = False
        await super().close()


def _call_then_commit(connection: OneTripConnection, function: Callable[..., T], *arguments: Any) -> T:
    outcome = function(connection, *arguments)
    sqlite_connection = connection.sqlite_connection
    if sqlite_connection.in_transaction:
        sqlite_connection.commit()
    return outcome


async def _connect(connector: Callable[[], sqlite3.Connection]) -> OneTripConnection:
    connection = OneTripConnection(connector, _ITER_CHUNK_SIZE)
    # As SQLAlchemy does for aiosqlite's own connections: the thread must not keep the process alive.
    connection._thread.daemon = True
    await connection
    return connection


def use_one_trip_connections(engine: AsyncEngine) -> None:
    """Make `engine` (sqlite+aiosqlite) open OneTripConnection objects, with the arguments its URL gives."""

    @event.listens_for(engine.sync_engine, "do_connect")
    def _on_do_connect(
        dialect: Dialect, connection_record: ConnectionPoolEntry, arguments: list[Any], options: dict[str, Any]
    ) -> Any:
        # As aiosqlite.connect does: the first argument is the database, the rest go to sqlite3.connect.
        database, *rest = arguments
        connector = partial(sqlite3.connect, str(database), *rest, **options)
        return dialect.loaded_dbapi.connect(async_creator_fn=partial(_connect, connector))
