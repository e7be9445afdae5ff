"""The end of a streamed provider body after the last event: the wait for it, and the connection afterwards.

A raw HTTP/1.1 server on 127.0.0.1 sends an OpenAI stream whose last event ([DONE]) comes at once and
whose chunked body ends only after a set delay, or never.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import pytest

from pocketllm.providers.catalogue import ProviderTarget
from pocketllm.providers.chat import END_OF_BODY_WAIT_SECONDS, ChatMessage, ChatParameters, ChatRequest, StreamEnd
from pocketllm.providers.clients.openai import stream_chat
from pocketllm.providers.guard import HostClients, OutboundGuard
from pocketllm.providers.http import ProviderHttp
from pocketllm.providers.network import ProviderClient, ProviderTransport
from pocketllm.providers.registry import PROVIDERS

_EVENTS = (
    b'data: {"id":"c1","object":"chat.completion.chunk","model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)
_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


@dataclass
class StreamServer:
    """A server that sends `_EVENTS`, then ends the body after `body_end_delays[n]` seconds for its n-th response.

    None ends it never. `first_byte_delays` delays a whole response the same way.
    """

    body_end_delays: list[float | None]
    first_byte_delays: list[float] = field(default_factory=list)
    responses: int = 0
    connections_opened: int = 0
    connections_open: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_opened += 1
        self.connections_open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                index = self.responses
                self.responses += 1
                if index < len(self.first_byte_delays):
                    await asyncio.sleep(self.first_byte_delays[index])
                writer.write(_HEAD + b"%x\r\n%s\r\n" % (len(_EVENTS), _EVENTS))
                await writer.drain()
                delay = self.body_end_delays[index % len(self.body_end_delays)]
                if delay is None:
                    await reader.read()  # until the client closes the connection
                    return
                await asyncio.sleep(delay)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.connections_open -= 1
            writer.close()


@asynccontextmanager
async def serving(
    server: StreamServer, *, provider_transport: bool = True
) -> AsyncIterator[tuple[ProviderHttp, HostClients, ProviderTarget]]:
    """Serve `server` on 127.0.0.1 to provider clients on the server's transport, or on httpx's default one."""
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, backlog=1024)
    port = listener.sockets[0].getsockname()[1]
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)

    def make_client() -> httpx.AsyncClient:
        if not provider_transport:
            return httpx.AsyncClient(limits=limits, trust_env=False, timeout=10.0)
        transport = ProviderTransport(ssl_context=ssl.create_default_context(), limits=limits)
        return ProviderClient(transport=transport, trust_env=False, timeout=10.0)

    clients = HostClients(make_client)
    http = ProviderHttp(clients, OutboundGuard(allow_private=True))
    target = ProviderTarget(spec=PROVIDERS["openai"], base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test")
    try:
        yield http, clients, target
    finally:
        await clients.aclose()
        listener.close()


async def stream_once(http: ProviderHttp, target: ProviderTarget) -> tuple[str, StreamEnd]:
    request = ChatRequest(
        model="m",
        system_prompt=None,
        messages=[ChatMessage(role="user", content="hi")],
        parameters=ChatParameters(max_tokens=10),
    )
    text: list[str] = []
    end: StreamEnd | None = None
    async for item in stream_chat(http, target, request):
        if isinstance(item, StreamEnd):
            end = item
        else:
            text.append(item.text)
    assert end is not None
    return "".join(text), end


async def wait_until_closed(server: StreamServer) -> None:
    for _ in range(200):
        if server.connections_open == 0:
            return
        await asyncio.sleep(0.01)


async def test_late_body_end_near_deadline_keeps_no_connection() -> None:
    # Body ends spread around the deadline, so that it runs out at every point of reading and closing.
    count = 400
    delays: list[float | None] = [END_OF_BODY_WAIT_SECONDS * (0.8 + 0.4 * index / count) for index in range(count)]
    server = StreamServer(body_end_delays=delays)

    async with serving(server) as (http, clients, target):
        results = await asyncio.gather(*(stream_once(http, target) for _ in range(count)))
        await clients.close_idle_connections()
        await wait_until_closed(server)
        still_open = server.connections_open

    assert all(text == "hi" and not end.incomplete for text, end in results)
    # A connection that httpcore still counted as in use would stay open here, and take a pool slot for good.
    assert still_open == 0


@pytest.mark.parametrize("provider_transport", [True, False])
async def test_body_end_never_sent_closes_connection(provider_transport: bool) -> None:
    # On the server's transport the wait for the body's end runs out. httpx's own transport applies no
    # io_deadline, so there the connection is closed without the wait.
    server = StreamServer(body_end_delays=[None])

    async with serving(server, provider_transport=provider_transport) as (http, _, target):
        started = time.monotonic()
        text, end = await stream_once(http, target)
        elapsed = time.monotonic() - started
        await wait_until_closed(server)
        still_open = server.connections_open

    assert text == "hi"
    assert end.finish_reason == "stop"
    # Ended by the wait for the body's end or by closing, not by the client's 10 s read timeout.
    assert elapsed < 5
    assert still_open == 0


async def test_deadline_ends_with_response() -> None:
    # The second response starts later than the first one's deadline, on the same connection.
    server = StreamServer(body_end_delays=[0.0], first_byte_delays=[0.0, END_OF_BODY_WAIT_SECONDS * 2])

    async with serving(server) as (http, _, target):
        first = await stream_once(http, target)
        second = await stream_once(http, target)

    assert first[0] == "hi"
    assert second[0] == "hi"
    assert server.connections_opened == 1


@pytest.mark.parametrize("delay", [0.0, END_OF_BODY_WAIT_SECONDS / 5])
async def test_body_end_in_time_reuses_connection(delay: float) -> None:
    server = StreamServer(body_end_delays=[delay])

    async with serving(server) as (http, _, target):
        for _ in range(3):
            text, _end = await stream_once(http, target)
            assert text == "hi"

    assert server.connections_opened == 1
