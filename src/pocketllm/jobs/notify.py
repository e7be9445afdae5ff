"""Wake workers in other processes when a job is queued, through PostgreSQL's LISTEN and NOTIFY.

Without it a worker learns of a new job at its next poll (JOB_POLL_SECONDS). The notice is sent in the
transaction that queues the job, so PostgreSQL delivers it at commit, when the job can be claimed, and
never for a job that was rolled back. Polling stays as it is: a notice lost while a listener reconnects
delays a job by one poll at most. SQLite has no notices; there the API wakes the worker of its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

log = structlog.get_logger(__name__)

JOBS_CHANNEL = "pocketllm_jobs"
_NOTIFY = select(func.pg_notify(JOBS_CHANNEL, ""))
# Waits between attempts to listen again after the connection failed: doubled up to the maximum.
FIRST_RECONNECT_SECONDS = 0.5
MAX_RECONNECT_SECONDS = 30.0


async def announce_job(session: AsyncSession) -> None:
    """Tell listening workers that a job is due once the session's transaction commits (PostgreSQL only)."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(_NOTIFY)


def listener_dsn(database_url: str) -> str | None:
    """Return the asyncpg connection string for a PostgreSQL SQLAlchemy URL, or None for other databases."""
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        return None
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class JobListener:
    """A listener on JOBS_CHANNEL: one connection that calls `on_notice` for every notice.

    When the connection fails it is opened again, after pauses that double up to MAX_RECONNECT_SECONDS,
    and `on_notice` is called once after each reconnection, since notices sent in between were lost.
    """

    def __init__(self, dsn: str, on_notice: Callable[[], None]) -> None:
        self._dsn = dsn
        self._on_notice = on_notice
        self.listening = asyncio.Event()
        # Set once the listener is listening again after a lost connection.
        self.reconnected = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        pause = FIRST_RECONNECT_SECONDS
        reconnected = False
        while not stop.is_set():
            lost = asyncio.Event()
            connection: Any = None
            try:
                connection = await asyncpg.connect(self._dsn, timeout=10)
                connection.add_termination_listener(lambda _connection, lost=lost: lost.set())
                await connection.add_listener(JOBS_CHANNEL, self._notice)
                self.listening.set()
                if reconnected:
                    log.info("worker.listening_again")
                    self.reconnected.set()
                    self._on_notice()
                pause = FIRST_RECONNECT_SECONDS
                await _first_of(stop, lost)
                if lost.is_set() and not stop.is_set():
                    log.warning("worker.listen_lost", retry_in=pause)
            except (OSError, asyncpg.PostgresError, TimeoutError) as error:
                # The error type only: connection errors can quote the connection string.
                log.warning("worker.listen_failed", error=type(error).__name__, retry_in=pause)
            finally:
                self.listening.clear()
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.close(timeout=5)
            if stop.is_set():
                return
            reconnected = True
            await _first_of(stop, timeout=pause)
            pause = min(pause * 2, MAX_RECONNECT_SECONDS)

    def _notice(self, *_details: Any) -> None:
        self._on_notice()


async def _first_of(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Wait until any of `events` is set, or `timeout` seconds have passed."""
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
