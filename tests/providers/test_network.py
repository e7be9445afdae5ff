"""The provider clients' network layer against raw HTTP/1.1 servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import hashlib
import socket
import ssl
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from pocketllm.providers.network import READ_BUFFER_LIMIT, AsyncioStream, ProviderClient, ProviderTransport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """Serve `handler` on a free port of 127.0.0.1 and yield the base URL."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """Read one request's head (the test requests have no body) and return it."""
    return await reader.readuntil(b"\r\n\r\n")


def response_head(length: int, *extra: str) -> bytes:
    lines = ["HTTP/1.1 200 OK", f"Content-Length: {length}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def provider_client(**options: float) -> ProviderClient:
    transport = ProviderTransport(ssl_context=ssl.create_default_context(), limits=httpx.Limits())
    return ProviderClient(transport=transport, trust_env=False, timeout=httpx.Timeout(5.0, **options))


async def test_connection_uses_asyncio_stream() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response_head(5) + b"hello")
        await writer.drain()

    async with raw_server(handle) as url, provider_client() as client, client.stream("GET", url) as response:
        body = await response.aread()
        stream = response.extensions["network_stream"]
        nodelay = stream.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)

    assert body == b"hello"
    assert isinstance(stream, AsyncioStream)
    assert nodelay != 0


async def test_large_body_read_whole() -> None:
    body = bytes(range(256)) * (16 * 1024)  # 4 MiB

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response_head(len(body)))
        writer.write(body)
        await writer.drain()

    async with raw_server(handle) as url, provider_client() as client:
        response = await client.get(url)

    assert len(response.content) == len(body)
    assert hashlib.sha256(response.content).digest() == hashlib.sha256(body).digest()


async def test_reading_pauses_while_body_unread() -> None:
    body = b"x" * (64 * 1024 * 1024)
    server_blocked = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response_head(len(body)))
        view = memoryview(body)
        for start in range(0, len(body), 64 * 1024):
            writer.write(view[start : start + 64 * 1024])
            if writer.transport.get_write_buffer_size() > 8 * 1024 * 1024:
                # The client stopped reading: the kernel buffers are full and ours keep growing.
                server_blocked.set()
                break
            # Lets the client's protocol run, which takes in each write at once unless it paused reading.
            await asyncio.sleep(0)
        writer.close()

    async with raw_server(handle) as url, provider_client() as client, client.stream("GET", url) as response:
        await asyncio.wait_for(server_blocked.wait(), timeout=10)
        stream = response.extensions["network_stream"]
        waiting = stream._protocol.buffered

    # Without flow control the client would have taken everything the server could send into memory.
    assert waiting <= READ_BUFFER_LIMIT + 1024 * 1024


async def test_silent_server_times_out() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response_head(10) + b"part")
        await writer.drain()
        await reader.read()  # waits until the client gives up and closes

    async with raw_server(handle) as url, provider_client(read=0.2) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(url)


async def test_connection_lost_mid_body() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response_head(100) + b"only part of it")
        await writer.drain()
        writer.transport.abort()

    async with raw_server(handle) as url, provider_client() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(url)


async def test_idle_connection_closed_by_server_not_reused() -> None:
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        # A keep-alive response, after which the server closes the connection anyway (its idle timeout).
        writer.write(response_head(2) + b"ok")
        await writer.drain()
        writer.close()

    async with raw_server(handle) as url, provider_client() as client:
        async with client.stream("GET", url) as first:
            await first.aread()
            stream = first.extensions["network_stream"]
        for _ in range(200):
            if stream.get_extra_info("is_readable"):
                break
            await asyncio.sleep(0.01)
        second = await client.get(url)

    assert stream.get_extra_info("is_readable")
    assert second.status_code == 200
    assert connections == 2


async def test_refused_connection_is_connect_error() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]

    async with provider_client() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")


class _RequestState:
    """Stand-in for a request's ASGI scope, which a context variable of the request's task refers to."""


_request_state: contextvars.ContextVar[_RequestState] = contextvars.ContextVar("request_state")


async def test_pooled_connection_keeps_no_request_context() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(response_head(2) + b"ok")
        await writer.drain()
        await reader.read()  # keeps the connection open until the client closes it

    async def request_in_own_context(client: httpx.AsyncClient, url: str) -> weakref.ref[_RequestState]:
        state = _RequestState()
        _request_state.set(state)
        response = await client.get(url)
        assert response.status_code == 200
        return weakref.ref(state)

    async with raw_server(handle) as url, provider_client() as client:
        state_reference = await asyncio.create_task(request_in_own_context(client, url))
        # The event loop callback that resumed this task refers to the finished task until it returns.
        await asyncio.sleep(0)
        gc.collect()
        pooled = client._provider_transport._pool.connections  # type: ignore[union-attr]

        assert len(pooled) == 1
        assert pooled[0].is_idle()
        # The connection stays in the pool, but the context of the request that opened it is gone.
        assert state_reference() is None


async def test_close_idle_connections_spares_active_ones() -> None:
    closed_by_client = 0
    opened = 0
    release_body = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal closed_by_client, opened
        opened += 1
        while True:
            try:
                head = await read_request(reader)
            except asyncio.IncompleteReadError:
                closed_by_client += 1
                return
            if b"GET /slow " in head:
                writer.write(response_head(8) + b"slow")
                await writer.drain()
                await release_body.wait()
                writer.write(b"body")
            else:
                writer.write(response_head(2) + b"ok")
            await writer.drain()

    async with raw_server(handle) as url, provider_client() as client:
        async with client.stream("GET", f"{url}/slow") as slow:
            # A second connection, because the first is busy with the slow response. It is idle afterwards.
            first = await client.get(f"{url}/fast")
            closed = await client.close_idle_connections()
            release_body.set()
            slow_body = await slow.aread()
        for _ in range(200):
            if closed_by_client == 1:
                break
            await asyncio.sleep(0.01)
        second = await client.get(f"{url}/fast")

    assert first.status_code == 200
    assert closed == 1
    assert closed_by_client == 1
    # The response that was being read when the idle connection closed was not cut.
    assert slow_body == b"slowbody"
    # The pool dropped the closed connection and reused the one the slow response left idle.
    assert second.status_code == 200
    assert opened == 2
