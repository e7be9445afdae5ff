"""`DriverQuery`: a Core SELECT that SQLAlchemy compiles once and the database driver runs directly.

SQLAlchemy's execution layer (its execution context, result metadata and the greenlet hand-offs of its
asyncio extension) took about 160 µs of CPU per statement on PostgreSQL in-process, against about 80 µs
for the same query sent by asyncpg itself. The hottest reads, such as the session check and the list
routes, use this class instead. SQLAlchemy still checks out the pooled connection, writes the SQL and
converts every value with its column types. So the rows contain the values that `connection.execute()`
would return, and only the statement's execution skips SQLAlchemy.

It runs SELECT statements whose parameters are `bindparam`s or plain values, on PostgreSQL (asyncpg) and
SQLite (aiosqlite). A statement that SQLAlchemy finishes at execution time, such as `in_()` with a list,
raises ValueError when it first runs.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from sqlalchemy import Select
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

Processor = Callable[[Any], Any] | None
# A row read by attribute name or position, like a SQLAlchemy Row: a named tuple of the statement's columns.
DriverRow: TypeAlias = Any


@dataclass(frozen=True, slots=True)
class _Plan:
    """The statement compiled for one dialect, with the conversions of its parameters and columns."""

    sql: str
    parameter_names: tuple[str, ...]
    defaults: Mapping[str, Any]
    bind_processors: tuple[Processor, ...]
    row_type: Callable[..., tuple[Any, ...]]
    result_processors: tuple[tuple[int, Callable[[Any], Any]], ...]


class DriverQuery:
    """A SELECT run with the driver's own call on a connection that SQLAlchemy checked out.

    Rows are named tuples whose field names are the statement's column keys, so `row.email` reads as it
    does on a SQLAlchemy row.
    """

    def __init__(self, statement: Select[*tuple[Any, ...]]) -> None:
        self._statement = statement
        self._plans: dict[str, _Plan] = {}

    async def all(self, connection: AsyncConnection, parameters: Mapping[str, Any]) -> list[DriverRow]:
        """Run the statement and return every row."""
        plan = self._plans.get(connection.dialect.name) or self._plan(connection.dialect)
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
        return [_convert(plan, record) for record in records]

    async def first(self, connection: AsyncConnection, parameters: Mapping[str, Any]) -> DriverRow | None:
        """Run the statement and return its first row, or None when it returns no row."""
        rows = await self.all(connection, parameters)
        return rows[0] if rows else None

    def _plan(self, dialect: Dialect) -> _Plan:
        compiled = self._statement.compile(dialect=dialect)
        sql = compiled.string
        if "POSTCOMPILE" in sql or not compiled.positional or compiled.positiontup is None:
            raise ValueError(
                "DriverQuery cannot run this statement because it does not compile to final SQL with positional "
                "parameters (an in_() list, for example). Run it with connection.execute() instead."
            )
        names = tuple(compiled.positiontup)
        bind_processors = tuple(
            compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names
        )
        columns = list(self._statement.selected_columns)
        row_class: Any = namedtuple("Row", [str(column.key) for column in columns], rename=True)  # type: ignore[misc]
        result_processors = []
        for index, column in enumerate(columns):
            processor = column.type.dialect_impl(dialect).result_processor(dialect, None)
            if processor is not None:
                result_processors.append((index, processor))
        plan = _Plan(
            sql=sql,
            parameter_names=names,
            defaults=compiled.params,
            bind_processors=bind_processors,
            row_type=row_class._make,
            result_processors=tuple(result_processors),
        )
        self._plans[dialect.name] = plan
        return plan


def _arguments(plan: _Plan, parameters: Mapping[str, Any]) -> list[Any]:
    arguments = []
    for name, processor in zip(plan.parameter_names, plan.bind_processors, strict=True):
        value = parameters[name] if name in parameters else plan.defaults[name]
        arguments.append(value if processor is None else processor(value))
    return arguments


def _convert(plan: _Plan, record: Sequence[Any]) -> tuple[Any, ...]:
    if not plan.result_processors:
        return plan.row_type(record)
    values = list(record)
    for index, processor in plan.result_processors:
        values[index] = processor(values[index])
    return plan.row_type(values)
