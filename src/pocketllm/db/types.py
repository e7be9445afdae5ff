"""Column types that behave the same on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeAlias

from sqlalchemy import JSON, DateTime, Row, inspect
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

# A result row of any number of columns, read by attribute name where a mapped object would be too costly.
AnyRow: TypeAlias = Row[*tuple[Any, ...]]


def attribute_columns(model: type[Any]) -> list[Any]:
    """Return the mapped columns of `model`, each labelled with its attribute name.

    Selected this way, the rows of a Core statement read like the mapped objects: `extra_metadata`, not
    the column's name `metadata`.
    """
    return [getattr(model, column.key).label(column.key) for column in inspect(model).column_attrs]


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always returned timezone-aware.

    PostgreSQL stores `timestamptz`; SQLite has no time zones, so values are stored as UTC text and get
    their UTC zone back on load. Naive datetimes are rejected because their zone would be a guess.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given for a UTC column; attach a time zone")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# JSONB on PostgreSQL (indexable, compact), plain JSON text elsewhere.
JSONType: Any = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)
