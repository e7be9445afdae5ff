"""A bare ASGI client for what httpx's ASGITransport cannot do: read a streaming response part by part and
then disconnect, as a phone that loses its connection does."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Message


async def disconnect_after_chunks(
    app: ASGIApp, path: str, *, headers: dict[str, str], payload: dict[str, Any], chunks: int
) -> list[bytes]:
    """POST `payload` to `path`, read `chunks` body chunks, then report a client disconnect.

    Returns the chunks read. The app task must end on its own once it sees the disconnect.
    """
    body = json.dumps(payload).encode()
    request_sent = False
    disconnected = asyncio.Event()
    received: list[bytes] = []

    async def receive() -> Message:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            received.append(message["body"])
            if len(received) >= chunks:
                disconnected.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")]
        + [(name.lower().encode(), value.encode()) for name, value in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("pocketllm.test", 80),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=30)
    return received


def parse_sse(text: str) -> list[tuple[str, Any]]:
    """Split our own event stream into (event, data) pairs; comment lines come back as ("comment", text)."""
    events: list[tuple[str, Any]] = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event = "message"
        data_lines: list[str] = []
        for line in block.split("\n"):
            if line.startswith(":"):
                events.append(("comment", line[1:].strip()))
            elif line.startswith("event:"):
                event = line.removeprefix("event:").strip()
            elif line.startswith("data:"):
                data_lines.append(line.removeprefix("data:").strip())
        if data_lines:
            events.append((event, json.loads("\n".join(data_lines))))
    return events
