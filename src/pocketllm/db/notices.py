"""Listen on a PostgreSQL notice channel (LISTEN and NOTIFY) from one connection that reopens itself.

Used by job workers (`jobs/notify.py`) and by the API's session-check cache (`auth/session_cache.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import asyncpg
import structlog
from sqlalchemy.engine import make_url

log = structlog.get_logger(__name__)

# Waits between attempts to listen again after the connection failed: doubled up to the maximum.
FIRST_RECONNECT_SECONDS = 0.5
MAX_RECONNECT_SECONDS = 30.0
# A connection that stops carrying data without closing (a network partition, a NAT that forgot it) sends
# no notices and raises nothing. A query every PING_SECONDS that must return within PING_TIMEOUT_SECONDS
# finds it, and the listener then reconnects.
PING_SECONDS = 5.0
PING_TIMEOUT_SECONDS = 2.0


# Options of SQLAlchemy's asyncpg dialect in DATABASE_URL that are not PostgreSQL connection parameters.
# asyncpg would send them to the server as settings, which the server rejects.
_DIALECT_ONLY_OPTIONS = ("prepared_statement_cache_size", "prepared_statement_name_func")


def listener_dsn(database_url: str) -> str | None:
    """Return the asyncpg connection string for a PostgreSQL SQLAlchemy URL, or None for other databases.

    The dialect's own options are left out, and its `ssl` option becomes asyncpg's `sslmode`.
    """
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        return None
    url = url.difference_update_query(_DIALECT_ONLY_OPTIONS)
    if "ssl" in url.query:
        ssl = url.query["ssl"]
        url = url.difference_update_query(["ssl"])
        if "sslmode" not in url.query:
            url = url.update_query_dict({"sslmode": ssl})
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class NoticeListener:
    """One connection listening on `channel`, which calls `on_notice` with the payload of every notice.

    When the connection fails it is opened again, after pauses that double up to MAX_RECONNECT_SECONDS.
    Notices sent while no connection listens are lost, so `on_listening` is called with `reconnected=True`
    each time listening starts again, and `on_lost` each time it stops. Log events are named
    `<log_prefix>.listen_failed`, `.listen_lost` and `.listening_again`.
    """

    def __init__(
        self,
        dsn: str,
        channel: str,
        on_notice: Callable[[str], None],
        *,
        log_prefix: str,
        on_listening: Callable[[bool], None] | None = None,
        on_lost: Callable[[], None] | None = None,
        ping_seconds: float = PING_SECONDS,
        ping_timeout_seconds: float = PING_TIMEOUT_SECONDS,
    ) -> None:
        self._ping_seconds = ping_seconds
        self._ping_timeout = ping_timeout_seconds
        self._dsn = dsn
        self._channel = channel
        self._on_notice = on_notice
        self._on_listening = on_listening
        self._on_lost = on_lost
        self._log_prefix = log_prefix
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
                await connection.add_listener(self._channel, self._notice)
                self.listening.set()
                if self._on_listening is not None:
                    self._on_listening(reconnected)
                if reconnected:
                    log.info(f"{self._log_prefix}.listening_again")
                    self.reconnected.set()
                pause = FIRST_RECONNECT_SECONDS
                await self._watch(connection, stop, lost)
                if lost.is_set() and not stop.is_set():
                    log.warning(f"{self._log_prefix}.listen_lost", retry_in=pause)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
                # The error type only: connection errors can quote the connection string.
                log.warning(f"{self._log_prefix}.listen_failed", error=type(error).__name__, retry_in=pause)
            finally:
                if self.listening.is_set():
                    self.listening.clear()
                    if self._on_lost is not None:
                        self._on_lost()
                if connection is not None:
                    if lost.is_set():
                        # A connection that stopped responding would not complete a graceful close either.
                        connection.terminate()
                    else:
                        with contextlib.suppress(Exception):
                            await connection.close(timeout=5)
            if stop.is_set():
                return
            reconnected = True
            await _first_of(stop, timeout=pause)
            pause = min(pause * 2, MAX_RECONNECT_SECONDS)

    async def _watch(self, connection: Any, stop: asyncio.Event, lost: asyncio.Event) -> None:
        """Return when `stop` or `lost` is set, pinging the connection meanwhile and setting `lost` if it fails."""
        while not stop.is_set() and not lost.is_set():
            await _first_of(stop, lost, timeout=self._ping_seconds)
            if stop.is_set() or lost.is_set():
                return
            try:
                await asyncio.wait_for(connection.fetchval("SELECT 1"), timeout=self._ping_timeout)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
                log.warning(f"{self._log_prefix}.ping_failed", error=type(error).__name__)
                lost.set()

    def _notice(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        self._on_notice(payload)


async def _first_of(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Wait until any of `events` is set, or `timeout` seconds have passed."""
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
