"""A raw HTTP/1.1 server on 127.0.0.1 that sends its response a byte at a time, and a provider client for it.

Each byte comes well within any read timeout, so only a bound on the whole call ends such a response.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx

from pocketllm.providers.guard import OutboundGuard
from pocketllm.providers.http import ProviderHttp
from pocketllm.providers.network import ProviderClient, ProviderTransport
from tests.conftest import loopback_only_resolver

CHUNKED_JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
# A chunk of one space, which a JSON body may contain anywhere between its values.
ONE_SPACE_CHUNK = b"1\r\n \r\n"
TRICKLE_INTERVAL_SECONDS = 0.1


@dataclass
class TricklingServer:
    """The server's base URL, and an event set once the client has closed a connection."""

    url: str
    closed_by_client: asyncio.Event


@asynccontextmanager
async def trickling_server(*, sent_at_once: bytes, trickled: bytes | None) -> AsyncIterator[TricklingServer]:
    """Serve each request with `sent_at_once`, then `trickled` one byte per TRICKLE_INTERVAL_SECONDS.

    `trickled=None` sends one-space chunks for ever. Either way the connection stays open until the client
    closes it.
    """
    closed_by_client = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(_content_length(head))
        client_gone = asyncio.create_task(_read_until_closed(reader))
        writer.write(sent_at_once)
        pieces: Iterable[bytes] = (
            itertools.repeat(ONE_SPACE_CHUNK) if trickled is None else (bytes([byte]) for byte in trickled)
        )
        for piece in pieces:
            if client_gone.done():
                break
            writer.write(piece)
            await asyncio.sleep(TRICKLE_INTERVAL_SECONDS)
        await client_gone
        closed_by_client.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield TricklingServer(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", closed_by_client)
    finally:
        server.close()


@asynccontextmanager
async def provider_http_on_server_transport() -> AsyncIterator[ProviderHttp]:
    """Yield a ProviderHttp on the server's own transport, with a 10 s read timeout, for 127.0.0.1 only."""
    transport = ProviderTransport(ssl_context=ssl.create_default_context(), limits=httpx.Limits())
    async with ProviderClient(transport=transport, trust_env=False, timeout=10) as client:
        yield ProviderHttp(client, OutboundGuard(allow_private=True, resolver=loopback_only_resolver))


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


async def _read_until_closed(reader: asyncio.StreamReader) -> None:
    # With bytes that the client had not read, its close arrives as a reset.
    with contextlib.suppress(ConnectionError):
        await reader.read()
