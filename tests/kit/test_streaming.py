from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from starlette.types import Message

from pocketllm.kit.streaming import EventStreamResponse

SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "GET", "headers": []}


class Client:
    """The ASGI side of one connection: records what is sent and can report a disconnect."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.complete = False
        self.disconnected = asyncio.Event()
        self.first_body = asyncio.Event()

    async def receive(self) -> Message:
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body":
            if message.get("body"):
                self.bodies.append(message["body"])
                self.first_body.set()
            if not message.get("more_body", False):
                self.complete = True


class Endless:
    """An event source that yields one chunk, then waits forever, and notes whether it was closed."""

    def __init__(self) -> None:
        self.closed = False

    async def events(self) -> AsyncIterator[bytes]:
        try:
            yield b"data: first\n\n"
            await asyncio.Event().wait()
        finally:
            self.closed = True


async def start_endless(client: Client) -> tuple[asyncio.Task[None], Endless]:
    """Start an EventStreamResponse on an Endless source, and return once its first chunk was sent."""
    source = Endless()
    call = asyncio.create_task(EventStreamResponse(source.events())(SCOPE, client.receive, client.send))
    await client.first_body.wait()
    return call, source


async def test_response_sends_every_chunk() -> None:
    async def events() -> AsyncIterator[bytes]:
        for text in (b"a", b"b", b"c"):
            yield text

    client = Client()
    await EventStreamResponse(events(), media_type="text/event-stream")(SCOPE, client.receive, client.send)

    assert client.bodies == [b"a", b"b", b"c"]
    assert client.complete


async def test_disconnect_ends_waiting_stream() -> None:
    client = Client()
    call, source = await start_endless(client)

    client.disconnected.set()
    done, _ = await asyncio.wait({call}, timeout=5)

    assert call in done, "the response went on after its client left"
    # The call returned normally: the disconnect was not turned into a cancellation of the caller.
    assert call.exception() is None
    assert client.bodies == [b"data: first\n\n"]
    assert source.closed


async def test_outside_cancellation_propagates() -> None:
    client = Client()
    call, source = await start_endless(client)

    call.cancel()

    with pytest.raises(asyncio.CancelledError):
        await call
    assert source.closed


async def test_disconnect_with_shutdown_still_cancels() -> None:
    client = Client()
    call, _ = await start_endless(client)

    client.disconnected.set()
    for _ in range(100):
        if call.cancelling():
            break
        await asyncio.sleep(0)
    assert call.cancelling() == 1, "the disconnect should have cancelled the sending task by now"
    call.cancel()

    with pytest.raises(asyncio.CancelledError):
        await call


async def test_watcher_ends_with_response() -> None:
    async def events() -> AsyncIterator[bytes]:
        yield b"only"

    client = Client()
    before = asyncio.all_tasks()
    await EventStreamResponse(events())(SCOPE, client.receive, client.send)
    await asyncio.sleep(0)

    # The task that waited for the disconnect is gone, so it cannot cancel a later request on this task.
    assert asyncio.all_tasks() == before
    assert client.complete
