"""Alembic environment: runs on the connection handed over by `pocketllm.db.migrate`, or builds its own
engine from the settings when Alembic's own command line is used."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy import JSON
from sqlalchemy.engine import Connection

import pocketllm.models  # noqa: F401  (registers every table on the metadata)
from pocketllm.db.base import Base
from pocketllm.db.types import UTCDateTime

target_metadata = Base.metadata


def _render_item(kind: str, item: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Render the project's column types by name in new revisions, instead of their expanded form."""
    if kind != "type":
        return False
    if isinstance(item, UTCDateTime):
        autogen_context.imports.add("from pocketllm.db.types import UTCDateTime")
        return "UTCDateTime()"
    if isinstance(item, JSON):
        autogen_context.imports.add("from pocketllm.db.types import JSONType")
        return "JSONType"
    return False


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_own_engine() -> None:
    from pocketllm.config import load_settings
    from pocketllm.db.engine import create_engine

    engine = create_engine(load_settings().effective_database_url)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
        await connection.commit()
    await engine.dispose()


shared_connection = context.config.attributes.get("connection")
if shared_connection is not None:
    _run(shared_connection)
else:
    asyncio.run(_run_with_own_engine())
