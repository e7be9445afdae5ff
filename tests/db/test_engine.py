"""The engine's pool on PostgreSQL: a pooled connection that the server closed is replaced at checkout."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from pocketllm.db.engine import create_engine


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
