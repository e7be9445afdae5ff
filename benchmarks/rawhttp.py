"""A minimal HTTP/1.1 keep-alive client on asyncio streams, for load generation with little client overhead.

It speaks just enough HTTP for the benchmarks. Each connection carries one request at a time, and
responses may use Content-Length or chunked transfer encoding. It records when a marker first appears in
the body (the first token of a stream). It is not a general client: no TLS, redirects or compression.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

# Limit for one response header block or chunk-size line; reaching it means the response is malformed.
MAX_LINE_BYTES = 1 << 20


class HttpError(Exception):
    """The server responded with an unexpected status or broke the HTTP framing."""


@dataclass(slots=True)
class HttpResult:
    status: int
    body: bytes
    # perf_counter() values: when the request was written, when the first body bytes and the marker came,
    # and when the response was complete.
    started: float
    first_byte: float
    marker: float | None
    finished: float

    @property
    def elapsed(self) -> float:
        return self.finished - self.started

    def json(self) -> Any:
        return json.loads(self.body)


class HttpConnection:
    """One keep-alive connection to 127.0.0.1:`port`. Not safe for concurrent requests: use one per task."""

    def __init__(self, port: int, *, host: str = "127.0.0.1") -> None:
        self._host = host
        self._port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self._host, self._port, limit=MAX_LINE_BYTES)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
        self._reader = self._writer = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        marker: bytes | None = None,
        on_marker: Callable[[float], None] | None = None,
    ) -> HttpResult:
        """Send one request and read the whole response; reconnect first if the server closed the connection.

        `on_marker` is called with the time the marker first arrived, while the rest of the body is still read.
        """
        if self._writer is None or self._writer.is_closing():
            await self.open()
        assert self._reader is not None
        assert self._writer is not None

        lines = [f"{method} {path} HTTP/1.1", f"Host: {self._host}:{self._port}"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}")
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

        started = time.perf_counter()
        self._writer.write(head + body if body is not None else head)
        status, response_headers = await self._read_head()
        first_byte = time.perf_counter()
        if response_headers.get("transfer-encoding", "").lower() == "chunked":
            content, marker_time = await self._read_chunked(marker, on_marker)
        elif "content-length" in response_headers:
            content = await self._reader.readexactly(int(response_headers["content-length"]))
            marker_time = time.perf_counter() if marker is not None and marker in content else None
        else:
            content = await self._reader.read()
            marker_time = time.perf_counter() if marker is not None and marker in content else None
            await self.close()
        finished = time.perf_counter()
        if response_headers.get("connection", "").lower() == "close":
            await self.close()
        return HttpResult(status, content, started, first_byte, marker_time, finished)

    async def _read_head(self) -> tuple[int, dict[str, str]]:
        assert self._reader is not None
        raw = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = raw.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise HttpError(f"malformed status line: {status_line!r}")
        headers: dict[str, str] = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    async def _read_chunked(
        self, marker: bytes | None, on_marker: Callable[[float], None] | None
    ) -> tuple[bytes, float | None]:
        assert self._reader is not None
        pieces: list[bytes] = []
        marker_time: float | None = None
        tail = b""
        while True:
            size_line = await self._reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                # Trailer section: header lines up to an empty line.
                while (await self._reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return b"".join(pieces), marker_time
            data = await self._reader.readexactly(size)
            await self._reader.readexactly(2)
            pieces.append(data)
            if marker is not None and marker_time is None:
                # The tail covers a marker split across two chunks.
                if marker in tail + data:
                    marker_time = time.perf_counter()
                    if on_marker is not None:
                        on_marker(marker_time)
                tail = (tail + data)[-len(marker) :]


def json_request_body(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


JSON_HEADERS = {"Content-Type": "application/json"}


async def run_closed_loop(
    concurrency: int,
    *,
    duration_seconds: float | None = None,
    total_requests: int | None = None,
    make_request: Callable[[HttpConnection, int], Awaitable[HttpResult]],
    port: int,
    expected_status: int = 200,
) -> tuple[list[HttpResult], float]:
    """Keep `concurrency` requests in flight, each task on its own connection, until the duration or count is
    reached. Returns the results and the wall time in seconds. Any unexpected status raises HttpError."""
    if duration_seconds is None and total_requests is None:
        raise ValueError("give duration_seconds or total_requests")
    results: list[HttpResult] = []
    issued = 0
    started = time.perf_counter()
    deadline = started + duration_seconds if duration_seconds is not None else None

    def take_ticket() -> int | None:
        nonlocal issued
        if total_requests is not None and issued >= total_requests:
            return None
        if deadline is not None and time.perf_counter() >= deadline:
            return None
        issued += 1
        return issued - 1

    async def worker() -> None:
        connection = HttpConnection(port)
        await connection.open()
        try:
            while (ticket := take_ticket()) is not None:
                result = await make_request(connection, ticket)
                if result.status != expected_status:
                    raise HttpError(f"expected status {expected_status}, got {result.status}: {result.body[:300]!r}")
                results.append(result)
        finally:
            await connection.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - started
