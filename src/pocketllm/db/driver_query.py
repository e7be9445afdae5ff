"""`DriverQuery`: a Core statement that SQLAlchemy compiles once and the database driver runs directly.

A one-row SELECT took about 220 µs of CPU on PostgreSQL in-process through SQLAlchemy's execution layer:
its execution context, result metadata and the greenlet hand-offs of its asyncio extension. The same
query sent by asyncpg itself took about 80 µs. The hottest statements, such as the session
check, the list routes and the reply path's, use this class instead. SQLAlchemy still checks out the
pooled connection, writes the SQL and converts every value with its column types. So the rows contain
the values that `connection.execute()` would return, and only the statement's execution skips SQLAlchemy.

It runs SELECT, INSERT and UPDATE statements whose parameters are `bindparam`s or plain values, on
PostgreSQL (asyncpg) and SQLite (aiosqlite). A statement that SQLAlchemy finishes at execution time, such
as `in_()` with a list, raises ValueError when it first runs. SQLAlchemy does not begin a transaction for
these statements. So a statement that writes runs only where that is what the caller expects: on an
autocommit connection on PostgreSQL, and inside a transaction that has begun on SQLite. Both are what
`Database.statements()` yields.

Errors come from the driver as they are (asyncpg's or sqlite3's exceptions), not wrapped in SQLAlchemy's
DBAPIError.

On SQLite, `run_in_one_trip` runs several of these statements, and the Python between them, in one trip
to the connection's thread (see `OneTripSteps`).
"""

from __future__ import annotations

import sqlite3
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

from sqlalchemy import Insert, Select, Update
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from pocketllm.db.engine import SQLITE_BEGIN_OPTION, SQLITE_NO_BEGIN
from pocketllm.db.sqlite_driver import OneTripConnection

Processor = Callable[[Any], Any] | None
# A row read by attribute name or position, like a SQLAlchemy Row: a named tuple of the statement's columns.
DriverRow: TypeAlias = Any
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Plan:
    """The statement compiled for one dialect, with the conversions of its parameters and columns."""

    sql: str
    parameter_names: tuple[str, ...]
    # Values written in the statement itself, such as a literal LIMIT. Names without one are required.
    defaults: Mapping[str, Any]
    bind_processors: tuple[Processor, ...]
    row_type: Callable[..., tuple[Any, ...]]
    result_processors: tuple[tuple[int, Callable[[Any], Any]], ...]


class DriverQuery:
    """A statement run with the driver's own call on a connection that SQLAlchemy checked out.

    Rows are named tuples whose field names are the statement's column keys (its RETURNING columns for an
    INSERT or UPDATE), so `row.email` reads as it does on a SQLAlchemy row. Pass `writes=True` for a
    statement that changes rows, including a SELECT with a data-modifying CTE, so that the connection is
    checked as described in the module's docstring.
    """

    def __init__(self, statement: Select[*tuple[Any, ...]] | Insert | Update, *, writes: bool | None = None) -> None:
        self._statement = statement
        self._writes = not isinstance(statement, Select) if writes is None else writes
        self._plans: dict[str, _Plan] = {}

    async def all(self, connection: AsyncConnection, parameters: Mapping[str, Any]) -> list[DriverRow]:
        """Run the statement and return every row."""
        plan, records = await self._fetch(connection, parameters)
        return [_convert(plan, record) for record in records]

    async def values(self, connection: AsyncConnection, parameters: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        """Run the statement and return every row as a sequence of its values, in column order.

        For callers that unpack each row, such as the reply path's history of up to 200 messages: a
        named tuple per row cost about 0.2 µs each, and the driver's own rows index and unpack as well.
        Columns whose type converts values (JSON text on SQLite, for example) are converted as in all().
        """
        plan, records = await self._fetch(connection, parameters)
        if not plan.result_processors:
            return records
        return [_converted_values(plan, record) for record in records]

    async def _fetch(
        self, connection: AsyncConnection, parameters: Mapping[str, Any]
    ) -> tuple[_Plan, Sequence[Sequence[Any]]]:
        plan = self.plan_for(connection.dialect)
        if self._writes:
            _check_write_context(connection)
        arguments = _arguments(plan, parameters)
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        # Statement listeners (the tests' counters, the benchmarks' statement clock) see these statements
        # too, without a cursor or an execution context, which the driver call does not have.
        sync_connection = connection.sync_connection
        dispatch = sync_connection.dispatch if sync_connection is not None else None
        if dispatch is not None and dispatch.before_cursor_execute:
            dispatch.before_cursor_execute(sync_connection, None, plan.sql, arguments, None, False)
        if connection.dialect.name == "postgresql":
            records: Sequence[Sequence[Any]] = await driver.fetch(plan.sql, *arguments)  # type: ignore[union-attr]
        else:
            records = await driver.execute_fetchall(plan.sql, arguments)  # type: ignore[union-attr]
        if dispatch is not None and dispatch.after_cursor_execute:
            dispatch.after_cursor_execute(sync_connection, None, plan.sql, arguments, None, False)
        return plan, records

    async def first(self, connection: AsyncConnection, parameters: Mapping[str, Any]) -> DriverRow | None:
        """Run the statement and return its first row, or None when it returns no row."""
        rows = await self.all(connection, parameters)
        return rows[0] if rows else None

    def plan_for(self, dialect: Dialect) -> _Plan:
        """Return the statement compiled for `dialect`, compiling it on first use."""
        return self._plans.get(dialect.name) or self._plan(dialect)

    @property
    def writes(self) -> bool:
        return self._writes

    def _plan(self, dialect: Dialect) -> _Plan:
        compiled = self._statement.compile(dialect=dialect)
        sql = compiled.string
        if "POSTCOMPILE" in sql or not compiled.positional or compiled.positiontup is None:
            raise ValueError(
                "DriverQuery cannot run this statement because it does not compile to final SQL with positional "
                "parameters (an in_() list, for example). Run it with connection.execute() instead."
            )

        if compiled.insert_prefetch or compiled.update_prefetch:
            # SQLAlchemy computes these columns' Python-side defaults (such as an `onupdate` timestamp) in
            # its execution context, which this class skips, so they would be written as NULL.
            filled = ", ".join(sorted(column.key for column in [*compiled.insert_prefetch, *compiled.update_prefetch]))
            raise ValueError(
                f"DriverQuery cannot run this statement because SQLAlchemy would fill in the columns {filled} "
                "at execution time. Set them in the statement's values()."
            )

        names = tuple(compiled.positiontup)
        bind_processors = tuple(
            compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names
        )

        columns = list(self._statement.exported_columns)
        row_class: Any = namedtuple("Row", [str(column.key) for column in columns], rename=True)  # type: ignore[misc]
        result_processors = []
        for index, column in enumerate(columns):
            processor = column.type.dialect_impl(dialect).result_processor(dialect, None)
            if processor is not None:
                result_processors.append((index, processor))

        plan = _Plan(
            sql=sql,
            parameter_names=names,
            defaults={name: compiled.binds[name].value for name in names if not compiled.binds[name].required},
            bind_processors=bind_processors,
            row_type=row_class._make,
            result_processors=tuple(result_processors),
        )
        self._plans[dialect.name] = plan
        return plan


class OneTripSteps:
    """Runner of DriverQuery statements on an SQLite connection's thread, given to the function that
    `run_in_one_trip` calls there.

    Each statement runs as `DriverQuery.all()` or `values()` would run it, with the same conversions, but
    without a trip of its own between the event loop and the thread. Statement listeners see each statement
    as usual, except that they are called on the connection's thread.
    """

    __slots__ = ("_dialect", "_dispatch", "_may_write", "_sqlite", "_sync_connection")

    def __init__(self, connection: AsyncConnection, may_write: bool, sqlite_connection: sqlite3.Connection) -> None:
        self._may_write = may_write
        self._dialect = connection.dialect
        self._sync_connection = connection.sync_connection
        self._dispatch = self._sync_connection.dispatch if self._sync_connection is not None else None
        self._sqlite = sqlite_connection

    def first(self, query: DriverQuery, parameters: Mapping[str, Any]) -> DriverRow | None:
        """Run `query` and return its first row, or None when it returns no row."""
        plan, records = self._fetch(query, parameters)
        return _convert(plan, records[0]) if records else None

    def values(self, query: DriverQuery, parameters: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        """Run `query` and return every row as a sequence of its values, as `DriverQuery.values()` does."""
        plan, records = self._fetch(query, parameters)
        if not plan.result_processors:
            return records
        return [_converted_values(plan, record) for record in records]

    def _fetch(self, query: DriverQuery, parameters: Mapping[str, Any]) -> tuple[_Plan, list[Any]]:
        if query.writes and not self._may_write:
            raise ValueError("This statement writes, so pass writes=True to run_in_one_trip.")
        plan = query.plan_for(self._dialect)
        arguments = _arguments(plan, parameters)
        connection, dispatch = self._sync_connection, self._dispatch
        if dispatch is not None and dispatch.before_cursor_execute:
            dispatch.before_cursor_execute(connection, None, plan.sql, arguments, None, False)
        cursor = self._sqlite.execute(plan.sql, arguments)
        try:
            records = cursor.fetchall()
        finally:
            cursor.close()
        if dispatch is not None and dispatch.after_cursor_execute:
            dispatch.after_cursor_execute(connection, None, plan.sql, arguments, None, False)
        return plan, records


async def run_in_one_trip(
    connection: AsyncConnection, function: Callable[[OneTripSteps], T], *, writes: bool = False, commit: bool = False
) -> T:
    """Call `function` on the thread of an SQLite connection (sqlite+aiosqlite, opened as OneTripConnection)
    and return what it returns.

    `function` runs its statements through the OneTripSteps it is given. It runs on that thread, so it must
    not touch the event loop or anything that a coroutine could change at the same time. Its exceptions
    are raised here. With `writes`, its statements may write, where DriverQuery's may: inside a transaction
    that has begun, whose BEGIN then runs in the same trip. With `commit` (and `writes`), that transaction
    is committed in the same trip once `function` returns, so the caller's block must end after this call
    without another statement (see `OneTripConnection.run_and_commit`).
    """
    if commit and not writes:
        raise ValueError("run_in_one_trip commits only with writes=True.")
    if writes:
        _check_write_context(connection)
    raw = await connection.get_raw_connection()
    driver = raw.driver_connection
    if not isinstance(driver, OneTripConnection):
        raise ValueError("run_in_one_trip needs an SQLite connection of the engine's own (OneTripConnection).")
    run = driver.run_and_commit if commit else driver.run
    return await run(_in_one_trip, connection, writes, function)


def _in_one_trip(
    driver: OneTripConnection, connection: AsyncConnection, writes: bool, function: Callable[[OneTripSteps], T]
) -> T:
    return function(OneTripSteps(connection, writes, driver.sqlite_connection))


def _check_write_context(connection: AsyncConnection) -> None:
    sync_connection = connection.sync_connection
    options = sync_connection.get_execution_options() if sync_connection is not None else {}
    if connection.dialect.name == "postgresql":
        if options.get("isolation_level") != "AUTOCOMMIT":
            raise ValueError(
                "DriverQuery writes on PostgreSQL only in autocommit mode, because SQLAlchemy would not have "
                "begun the transaction for it. Use Database.statements() or connection.execute()."
            )
    elif not connection.in_transaction() or options.get(SQLITE_BEGIN_OPTION) == SQLITE_NO_BEGIN:
        raise ValueError(
            "DriverQuery writes on SQLite only inside a transaction that has begun. "
            "Use Database.statements() or connection.execute()."
        )


def _arguments(plan: _Plan, parameters: Mapping[str, Any]) -> list[Any]:
    arguments = []
    for name, processor in zip(plan.parameter_names, plan.bind_processors, strict=True):
        if name in parameters:
            value = parameters[name]
        elif name in plan.defaults:
            value = plan.defaults[name]
        else:
            raise ValueError(f"DriverQuery is missing a value for the parameter {name!r}. Pass it in `parameters`.")
        arguments.append(value if processor is None else processor(value))
    return arguments


def _convert(plan: _Plan, record: Sequence[Any]) -> tuple[Any, ...]:
    if not plan.result_processors:
        return plan.row_type(record)
    return plan.row_type(_converted_values(plan, record))


def _converted_values(plan: _Plan, record: Sequence[Any]) -> tuple[Any, ...]:
    values = list(record)
    for index, processor in plan.result_processors:
        values[index] = processor(values[index])
    return tuple(values)
