"""A zero-delay fake OpenAI-compatible provider on a bare asyncio protocol, for benchmark baselines.

It parses only what it must (request line, Content-Length, whether the body requests a stream) and sends
prebuilt responses, so that its own cost stays small next to the server under test. Routes:

* `POST /v1/chat/completions`: a chat completion as JSON, or with `"stream": true` an event stream with
  a role chunk, `chunks` content chunks, a finish chunk and `[DONE]`, sent chunked in one write.
  With `hold_seconds` above 0, the stream sends the role chunk and the first content chunk, then holds
  the connection for that long (or until `POST /bench/release`) before it sends the rest.
* `POST /v1/images/generations`: one 8x8 PNG as `b64_json`.
* `GET /ping`: a two-byte body, to measure the load generator's own ceiling.
* `POST /bench/config` with JSON `{"chunks": N, "hold_seconds": T}`, `POST /bench/release`, and
  `GET /bench/stats` (`{"requests": ..., "held": ...}`) control it during a benchmark.

Any API key is accepted. Run: `python -m benchmarks.upstream --port PORT`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import struct
import time
import zlib
from typing import Any

from benchmarks.common import raise_file_limit

MODEL = "bench-model"
CHUNK_TEXT = " word"
MAX_REQUEST_HEAD_BYTES = 64 * 1024


def tiny_png() -> bytes:
    """Encode an 8x8 single-colour RGB PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    pixels = zlib.compress((b"\x00" + b"\x28\x78\xc8" * 8) * 8)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _response(status: str, content_type: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def _json_response(payload: Any, status: str = "200 OK") -> bytes:
    return _response(status, "application/json", json.dumps(payload, separators=(",", ":")).encode())


def _sse_event(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
CHUNKED_END = b"0\r\n\r\n"


class Replies:
    """Prebuilt response bytes; rebuilt when `/bench/config` changes the stream shape."""

    def __init__(self) -> None:
        self.chunks = 16
        self.hold_seconds = 0.0
        self.completion = _json_response(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": MODEL,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Hello from the benchmark upstream"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        )
        self.image = _json_response(
            {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(tiny_png()).decode("ascii")}]}
        )
        self.ping = _response("200 OK", "text/plain", b"ok")
        self.not_found = _json_response(
            {"error": {"message": "not found", "type": "invalid_request_error"}}, "404 Not Found"
        )
        self.rebuild()

    def rebuild(self) -> None:
        def chunk(choices: list[Any]) -> bytes:
            return _sse_event(
                {
                    "id": "chatcmpl-bench",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": MODEL,
                    "choices": choices,
                }
            )

        role = chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        content = chunk([{"index": 0, "delta": {"content": CHUNK_TEXT}, "finish_reason": None}])
        finish = chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        done = b"data: [DONE]\n\n"
        # Held streams send the role and first content chunk at once and the rest after the hold.
        self.stream_first = STREAM_HEAD + _chunked(role + content)
        self.stream_rest = _chunked(content * (self.chunks - 1) + finish + done) + CHUNKED_END
        self.stream_whole = STREAM_HEAD + _chunked(role + content * self.chunks + finish + done) + CHUNKED_END


class UpstreamState:
    def __init__(self) -> None:
        self.replies = Replies()
        self.requests = 0
        self.held: set[asyncio.Future[None]] = set()


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, state: UpstreamState) -> None:
        self._state = state
        self._buffer = b""
        self._transport: asyncio.WriteTransport | None = None
        self._busy = False
        self._held_task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so this is a cast rather than a check.
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._process()

    def _process(self) -> None:
        # One request at a time per connection: a held stream pauses parsing until it has been sent.
        while not self._busy and self._transport is not None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_REQUEST_HEAD_BYTES:
                    self._transport.close()
                return
            head = self._buffer[:end].decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            length = 0
            for line in header_lines:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self._buffer) < end + 4 + length:
                return
            body = self._buffer[end + 4 : end + 4 + length]
            self._buffer = self._buffer[end + 4 + length :]
            method, _, rest = request_line.partition(" ")
            path = rest.partition(" ")[0]
            self._state.requests += 1
            self._dispatch(method, path, body)

    def _dispatch(self, method: str, path: str, body: bytes) -> None:
        assert self._transport is not None
        replies = self._state.replies
        if method == "POST" and path.endswith("/chat/completions"):
            if b'"stream":true' not in body and b'"stream": true' not in body:
                self._transport.write(replies.completion)
            elif replies.hold_seconds <= 0:
                self._transport.write(replies.stream_whole)
            else:
                self._transport.write(replies.stream_first)
                self._busy = True
                self._held_task = asyncio.ensure_future(
                    self._finish_held_stream(replies.hold_seconds, replies.stream_rest)
                )
        elif method == "POST" and path.endswith("/images/generations"):
            self._transport.write(replies.image)
        elif path == "/ping":
            self._transport.write(replies.ping)
        elif method == "POST" and path == "/bench/config":
            settings = json.loads(body or b"{}")
            replies.chunks = max(1, int(settings.get("chunks", replies.chunks)))
            replies.hold_seconds = float(settings.get("hold_seconds", replies.hold_seconds))
            replies.rebuild()
            self._transport.write(_json_response({"chunks": replies.chunks, "hold_seconds": replies.hold_seconds}))
        elif method == "POST" and path == "/bench/release":
            released = len(self._state.held)
            for waiter in list(self._state.held):
                if not waiter.done():
                    waiter.set_result(None)
            self._transport.write(_json_response({"released": released}))
        elif path == "/bench/stats":
            self._transport.write(_json_response({"requests": self._state.requests, "held": len(self._state.held)}))
        else:
            self._transport.write(replies.not_found)

    async def _finish_held_stream(self, hold_seconds: float, rest: bytes) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._state.held.add(waiter)
        try:
            await asyncio.wait_for(waiter, timeout=hold_seconds)
        except TimeoutError:
            pass
        finally:
            self._state.held.discard(waiter)
        if self._transport is not None:
            self._transport.write(rest)
        self._busy = False
        self._process()


async def serve(port: int) -> None:
    state = UpstreamState()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: UpstreamProtocol(state), "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    async with server:
        await stop.wait()
    for waiter in list(state.held):
        if not waiter.done():
            waiter.set_result(None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1 to listen on")

    arguments = parser.parse_args()
    raise_file_limit()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(arguments.port))
    else:
        uvloop.run(serve(arguments.port))


if __name__ == "__main__":
    main()
