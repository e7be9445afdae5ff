"""The async engine and session factory shared by the API, the CLI and background work."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from pocketllm.db.sqlite_driver import OneTripConnection, use_one_trip_connections

SQLITE_BUSY_TIMEOUT_MS = 15_000
# For a process that checkpoints in the background (`Database.checkpoint_wal()`): SQLite checkpoints in
# the commit that takes the WAL past this many pages, about 40 MB with 4 KiB pages. That happens when the
# background checkpoints fail, or during a sustained burst of writes (see db/wal.py). SQLite's own default
# is 1,000 pages.
SQLITE_BACKGROUND_AUTOCHECKPOINT_PAGES = 10_000
# With background checkpoints, the size that SQLite cuts the log file back to when it starts the log over.
# Without it the file keeps the largest size that a burst of writes gave it.
SQLITE_BACKGROUND_WAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024
SQLITE_BEGIN_OPTION = "sqlite_begin"
# An SQLITE_BEGIN_OPTION value: send no BEGIN, so that each statement is a transaction of its own.
SQLITE_NO_BEGIN = "NONE"
_READ_ONLY_OPTIONS = {SQLITE_BEGIN_OPTION: "DEFERRED"}
_SQLITE_SINGLE_READ_OPTIONS = {SQLITE_BEGIN_OPTION: SQLITE_NO_BEGIN}
_AUTOCOMMIT_OPTIONS = {"isolation_level": "AUTOCOMMIT"}


class DatabaseFileError(Exception):
    """The SQLite file that the database URL names does not exist and cannot be created."""


class WriterQueueTimeout(Exception):
    """An SQLite write waited longer than the busy timeout for this process's earlier writes to finish."""


def _configure_sqlite(engine: AsyncEngine, *, autocheckpoint_pages: int | None) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: ConnectionPoolEntry) -> None:
        # Take over transaction control from the driver so that BEGIN is emitted below, not lazily.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        if autocheckpoint_pages is not None:
            cursor.execute(f"PRAGMA wal_autocheckpoint={autocheckpoint_pages}")
            cursor.execute(f"PRAGMA journal_size_limit={SQLITE_BACKGROUND_WAL_SIZE_LIMIT_BYTES}")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # BEGIN IMMEDIATE takes the write lock up front and waits for it (busy_timeout). A deferred
        # transaction that reads and then writes fails at once with SQLITE_BUSY when another writer
        # committed in between, which would turn concurrent requests into errors. Read-only work asks
        # for a deferred BEGIN, which in WAL mode never waits for writers.
        mode = connection.get_execution_options().get(SQLITE_BEGIN_OPTION, "IMMEDIATE")
        if mode == SQLITE_NO_BEGIN:
            return
        statement = f"BEGIN {mode}"
        driver_connection = connection.connection.driver_connection
        if not isinstance(driver_connection, OneTripConnection):
            connection.exec_driver_sql(statement)
            return
        # Sent with the transaction's first statement, which saves a trip to the connection's thread.
        # Statement listeners still see the BEGIN here, as they would with exec_driver_sql.
        dispatch = connection.dispatch
        if dispatch.before_cursor_execute:
            dispatch.before_cursor_execute(connection, None, statement, (), None, False)
        driver_connection.defer_begin(statement)
        if dispatch.after_cursor_execute:
            dispatch.after_cursor_execute(connection, None, statement, (), None, False)


def is_in_memory_sqlite(url: URL) -> bool:
    """Tell whether `url` names an SQLite database that exists separately in each connection.

    That is an in-memory database (`:memory:`, `mode=memory`, the memdb VFS) or, for an empty file name,
    the temporary database that SQLite creates per connection.
    """
    if url.get_backend_name() != "sqlite":
        return False
    database = url.database or ""
    # A URI file name ("file:..."): what follows "file:" and any "//" is the path.
    path = database.removeprefix("file:").removeprefix("//") if database.startswith("file:") else database
    return (
        path in ("", ":memory:")
        or path.startswith(":memory:")
        or url.query.get("mode") == "memory"
        or url.query.get("vfs") == "memdb"
    )


def _create_private_file(database: str | None) -> None:
    """Create a new SQLite file readable by its owner only; SQLite gives its -wal and -shm files the same mode."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if path.exists():
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    except OSError as error:
        reason = f"{error.filename}: {error.strerror}" if error.filename and error.strerror else str(error)
        raise DatabaseFileError(f"cannot create the SQLite file {path} ({reason})") from error


def create_engine(
    database_url: str,
    *,
    pool_size: int = 20,
    max_overflow: int = 0,
    pool_timeout: float = 30.0,
    sqlite_autocheckpoint_pages: int | None = None,
) -> AsyncEngine:
    """Create the engine for `database_url`.

    `sqlite_autocheckpoint_pages` sets SQLite's `wal_autocheckpoint` on each connection, for a process that
    runs `Database.checkpoint_wal()` in the background; None keeps SQLite's default. Other databases ignore it.
    """
    url = make_url(database_url)
    pool: dict[str, Any] = {"pool_size": pool_size, "max_overflow": max_overflow, "pool_timeout": pool_timeout}
    if url.get_backend_name() == "sqlite":
        _create_private_file(url.database)
        # SQLAlchemy gives a file database a queue pool. Its own default of 5 connections, plus 10 that are
        # closed on return, opened a connection and its aiosqlite thread for each request past the fifth.
        # An in-memory database gets a static pool, which takes no size.
        if is_in_memory_sqlite(url):
            pool = {}
        engine = create_async_engine(url, hide_parameters=True, **pool)
        use_one_trip_connections(engine)
        _configure_sqlite(engine, autocheckpoint_pages=sqlite_autocheckpoint_pages)
        return engine
    engine = create_async_engine(
        url,
        # Error messages would otherwise quote bound values: encrypted keys, prompts, names.
        hide_parameters=True,
        pool_recycle=1800,
        **pool,
    )
    _skip_closed_connections(engine)
    return engine


def _skip_closed_connections(engine: AsyncEngine) -> None:
    """Replace pooled connections that the server has closed, without a round trip.

    SQLAlchemy's pool_pre_ping costs three round trips per checkout with asyncpg (BEGIN, an empty
    statement, ROLLBACK), and a request checks out a connection two or three times. asyncpg marks a
    connection closed as soon as the server ends it (a restart, an idle timeout), so asking it is free.
    A connection lost without the server closing it (a network partition) is found by the first
    statement instead, which fails that request, and SQLAlchemy then discards the whole pool.
    """

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, connection_record: ConnectionPoolEntry, proxy: Any) -> None:
        driver_connection = connection_record.driver_connection
        if driver_connection is not None and driver_connection.is_closed():
            # The pool discards this connection and checks out another (up to three tries).
            raise DisconnectionError("the database server closed this pooled connection")


class Database:
    """Owns the engine and hands out sessions; one instance per process."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sessionmaker = async_sessionmaker(engine, expire_on_commit=False, autoflush=False)
        # Queues this process's `statements()` blocks on SQLite; see there.
        self._sqlite_writer = asyncio.Lock()

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """Yield a session whose work is committed on success and rolled back on any exception."""
        async with self.sessionmaker() as session, session.begin():
            yield session

    @asynccontextmanager
    async def statements(self) -> AsyncIterator[AsyncConnection]:
        """Yield a connection for Core statements that are each atomic on their own.

        On PostgreSQL every statement commits by itself (autocommit): no BEGIN and COMMIT round trips, and
        no transaction spans two statements, so a failure leaves the earlier statements stored. On SQLite it
        is one write transaction, like `transaction()`, committed on success: there is no network round trip
        to save. A plain connection costs less than a session: about 0.2 ms of CPU less per block and 0.1 ms
        less per statement on PostgreSQL, measured in-process on a 2-core test machine.
        """
        if self.dialect != "postgresql":
            # SQLite runs one write transaction at a time, and a writer that finds the lock taken sleeps in
            # SQLite's busy handler, in steps of up to 100 ms. Replies queued here instead get the lock as
            # soon as the one before them commits. Writers elsewhere still wait in the busy handler.
            # NOTE: code inside a `statements()` block must not open another `statements()` block: it would
            # wait for this lock forever. The reply path, its only user, runs service calls on one connection.
            # The wait here counts against the same limit as SQLite's busy timeout, so that a write queued
            # behind others, while another process holds the lock, does not wait that long once per write
            # ahead of it.
            try:
                async with asyncio.timeout(SQLITE_BUSY_TIMEOUT_MS / 1000):
                    await self._sqlite_writer.acquire()
            except TimeoutError:
                raise WriterQueueTimeout() from None
            try:
                async with self.engine.begin() as connection:
                    yield connection
            finally:
                self._sqlite_writer.release()
            return
        async with self._plain_connection(_AUTOCOMMIT_OPTIONS) as connection:
            yield connection

    @asynccontextmanager
    async def read_only(self, *, snapshot: bool = True) -> AsyncIterator[AsyncSession]:
        """Yield a session for reads only; on SQLite it does not take the write lock.

        With `snapshot` False, each statement runs on its own: in autocommit mode on PostgreSQL, which saves
        the BEGIN and ROLLBACK round trips, and without BEGIN on SQLite, which saves a statement. Use it where
        the reads need not see one consistent state, such as a single query. Loaded objects stay usable
        after the block, detached, like objects from a committed transaction.

        NOTE: on PostgreSQL the transaction of `snapshot=True` runs at the server's default isolation level,
        READ COMMITTED, where each statement reads what was committed before it started. Only SQLite keeps
        one view for the whole block.
        """
        options = _READ_ONLY_OPTIONS if snapshot else self._single_read_options()
        async with self._session_with(options) as session:
            yield session

    @asynccontextmanager
    async def _session_with(self, options: dict[str, Any]) -> AsyncIterator[AsyncSession]:
        """Yield a session whose connection has `options`, rolled back at the end with its objects detached."""
        async with self.sessionmaker() as session:
            await session.connection(execution_options=options)
            try:
                yield session
            finally:
                # Detach first: a rollback would expire every loaded attribute.
                session.expunge_all()
                await session.rollback()

    @asynccontextmanager
    async def read_connection(self) -> AsyncIterator[AsyncConnection]:
        """Yield a plain connection for reads that need no ORM objects and no snapshot, such as the session
        check on every request.

        Like `read_only(snapshot=False)`, but without a session: a Core statement run this way costs about
        half the CPU of the same statement through an ORM session.
        """
        async with self._plain_connection(self._single_read_options()) as connection:
            yield connection

    @asynccontextmanager
    async def driver_connection(self) -> AsyncIterator[AsyncConnection]:
        """Yield a connection for reads with DriverQuery only.

        It sets no execution options, because the driver's own call ignores them, which saves setting and
        resetting them on every checkout. A statement run through SQLAlchemy here would begin a
        transaction (BEGIN IMMEDIATE on SQLite, which takes the write lock), so use `read_connection()`
        for those.
        """
        async with self._plain_connection({}) as connection:
            yield connection

    @asynccontextmanager
    async def _plain_connection(self, options: dict[str, Any]) -> AsyncIterator[AsyncConnection]:
        """Yield a connection with the execution `options`, for statements that leave no transaction open.

        SQLAlchemy's context manager closes a connection in a task of its own, so that a cancellation
        cannot interrupt the close, and with one request at a time that task costs a turn of the event
        loop. On PostgreSQL the close is made in the caller's task, because SQLAlchemy's asyncpg adapter
        sends a ROLLBACK only for a transaction it started, so closing a connection with no transaction
        open sends nothing and has no wait to interrupt. SQLite's close waits for a rollback on the
        connection's thread, so it keeps SQLAlchemy's task.
        """
        if self.dialect != "postgresql":
            async with self.engine.connect() as connection:
                if options:
                    await connection.execution_options(**options)
                yield connection
            return
        connection = await self.engine.connect()
        try:
            if options:
                await connection.execution_options(**options)
            yield connection
        finally:
            await connection.close()

    def _single_read_options(self) -> dict[str, Any]:
        return _AUTOCOMMIT_OPTIONS if self.dialect == "postgresql" else _SQLITE_SINGLE_READ_OPTIONS

    async def checkpoint_wal(self) -> tuple[int, int]:
        """Copy the pages in SQLite's write-ahead log into the database file, without waiting for readers or writers.

        Returns the frames in the log and the frames now copied (SQLite's PASSIVE checkpoint). SQLite
        otherwise checkpoints in the commit that takes the log past `wal_autocheckpoint` pages, and that
        commit, with its request, waits for the copy and its fsync calls: every few hundred replies in the
        benchmarks, and their p99. A checkpoint here runs on a connection's thread while requests go on.
        Returns (0, 0) on PostgreSQL and for an in-memory SQLite database, which have no such log.
        """
        if self.dialect != "sqlite" or is_in_memory_sqlite(self.engine.url):
            # An in-memory database keeps no log, and its one connection is shared by every checkout.
            return 0, 0
        async with self._plain_connection(_SQLITE_SINGLE_READ_OPTIONS) as connection:
            _, frames, copied = (await connection.execute(text("PRAGMA wal_checkpoint(PASSIVE)"))).one()
        return frames, copied

    async def dispose(self) -> None:
        await self.engine.dispose()
