"""NoticeListener against a connection that stops carrying data without closing, through a TCP proxy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.engine import make_url

from pocketllm.db.notices import NoticeListener, listener_dsn

WAIT_SECONDS = 10


class StallingProxy:
    """Forwards TCP connections on 127.0.0.1 to PostgreSQL until `stall` is called.

    After `stall`, the connections open at that moment carry no more bytes in either direction but stay
    open, as behind a network partition. Connections opened later are forwarded again.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._stalled: list[asyncio.Event] = []
        self._pipes: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stall(self) -> None:
        for stalled in self._stalled:
            stalled.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in self._pipes:
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _connect(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self._target)
        stalled = asyncio.Event()
        self._stalled.append(stalled)
        for reader, writer in ((client_reader, server_writer), (server_reader, client_writer)):
            pipe = asyncio.create_task(self._pipe(reader, writer, stalled))
            self._pipes.add(pipe)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stalled: asyncio.Event) -> None:
        try:
            while data := await reader.read(65536):
                if stalled.is_set():
                    # Hold the connection open and drop everything, until the test ends.
                    await asyncio.Event().wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


@pytest.fixture
async def proxy(database_url: str) -> AsyncIterator[StallingProxy]:
    url = make_url(database_url)
    running = StallingProxy(url.host or "127.0.0.1", url.port or 5432)
    await running.start()
    yield running
    await running.close()


@pytest.mark.postgres_only
async def test_stalled_connection_counts_as_lost(database_url: str, proxy: StallingProxy) -> None:
    dsn = listener_dsn(str(make_url(database_url).set(host="127.0.0.1", port=proxy.port)))
    assert dsn is not None
    lost = asyncio.Event()
    listener = NoticeListener(
        dsn,
        "pocketllm_test",
        lambda _payload: None,
        log_prefix="test",
        on_lost=lost.set,
        ping_seconds=0.1,
        ping_timeout_seconds=0.2,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(listener.run(stop))
    try:
        await asyncio.wait_for(listener.listening.wait(), WAIT_SECONDS)

        proxy.stall()

        await asyncio.wait_for(lost.wait(), WAIT_SECONDS)
        await asyncio.wait_for(listener.reconnected.wait(), WAIT_SECONDS)
        assert listener.listening.is_set()
    finally:
        stop.set()
        await asyncio.wait_for(running, WAIT_SECONDS)


def test_listener_dsn_drops_dialect_options() -> None:
    dsn = listener_dsn(
        "postgresql+asyncpg://app:secret@db.internal/pocketllm?prepared_statement_cache_size=0&ssl=require"
    )

    assert dsn == "postgresql://app:secret@db.internal/pocketllm?sslmode=require"


@pytest.mark.postgres_only
async def test_listener_listens_with_dialect_options(database_url: str) -> None:
    dsn = listener_dsn(f"{database_url}?prepared_statement_cache_size=0")
    assert dsn is not None
    listener = NoticeListener(dsn, "pocketllm_test", lambda _payload: None, log_prefix="test")
    stop = asyncio.Event()
    running = asyncio.create_task(listener.run(stop))
    try:
        await asyncio.wait_for(listener.listening.wait(), WAIT_SECONDS)
    finally:
        stop.set()
        await asyncio.wait_for(running, WAIT_SECONDS)
