"""Giving memory back after a burst: glibc's trim in a real subprocess, and the trimmer's timing."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Callable

import httpx
import pytest

from pocketllm.kit.memory import MemoryTrimmer, can_trim, wants_system_allocator
from pocketllm.providers.network import ProviderClient, ProviderTransport

needs_glibc = pytest.mark.skipif(not can_trim(), reason="needs glibc's malloc_trim")

# Fills the heap with small objects, keeps one in 512 so that freed pages sit below live ones, where
# glibc does not return them by itself, then prints the RSS in MiB before and after trim_heap().
_FRAGMENTED_HEAP = """
from pocketllm.kit.memory import rss_bytes, trim_heap
objects = [bytes(100) + index.to_bytes(4, "little") for index in range(600_000)]
survivors = objects[::512]
del objects
before = rss_bytes()
trim_heap()
print(before / 2**20, rss_bytes() / 2**20, len(survivors))
"""


@needs_glibc
def test_trim_heap_returns_freed_pages() -> None:
    environment = {**os.environ, "PYTHONMALLOC": "malloc"}

    result = subprocess.run(  # noqa: S603  (fixed interpreter and script)
        [sys.executable, "-c", _FRAGMENTED_HEAP],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    before, after, _ = (float(value) for value in result.stdout.split())
    # About 80 MiB of small objects were freed, and all but a few pages of them are free.
    assert before - after > 40


@needs_glibc
def test_system_allocator_wanted_unless_set() -> None:
    assert wants_system_allocator({"PATH": "/usr/bin"})
    assert not wants_system_allocator({"PYTHONMALLOC": "pymalloc"})
    assert not wants_system_allocator({"PYTHONMALLOC": "malloc"})


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not hold within the timeout")
        await asyncio.sleep(0.01)


async def test_trimmer_waits_until_load_is_gone() -> None:
    connections_closed = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections_closed
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # Ends when the client closes the connection: at its end of file, or with a reset.
        with contextlib.suppress(ConnectionError):
            await reader.read()
        connections_closed += 1

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    transport = ProviderTransport(ssl_context=ssl.create_default_context(), limits=httpx.Limits())
    client = ProviderClient(transport=transport, trust_env=False)
    trimmer = MemoryTrimmer(
        client.close_idle_connections, interval_seconds=0.01, min_growth_bytes=8 * 2**20, quiet_task_margin=8
    )
    stop = asyncio.Event()
    trimmer_task = asyncio.create_task(trimmer.run(stop))
    release = asyncio.Event()
    try:
        assert (await client.get(url)).status_code == 200
        await wait_until(lambda: trimmer.checks >= 2)

        # A burst: many tasks, and memory that grows with them.
        busy = [asyncio.create_task(release.wait()) for _ in range(100)]
        ballast = [bytes(200) + index.to_bytes(4, "little") for index in range(200_000)]
        checks_at_start = trimmer.checks
        await wait_until(lambda: trimmer.checks >= checks_at_start + 5)
        trims_while_busy = trimmer.trims

        release.set()
        await asyncio.gather(*busy)
        await wait_until(lambda: trimmer.trims >= 1)
        checks_after_trim = trimmer.checks
        await wait_until(lambda: trimmer.checks >= checks_after_trim + 5)
        await wait_until(lambda: connections_closed == 1)
    finally:
        stop.set()
        await trimmer_task
        await client.aclose()
        server.close()

    assert len(ballast) == 200_000
    assert trims_while_busy == 0
    # Once: the memory that is still in use after a trim does not make the next checks trim again.
    assert trimmer.trims == 1
    assert connections_closed == 1


async def test_trimmer_counts_growth_from_lowest_rss() -> None:
    # Memory that is in use when the trimmer starts, and freed later, must not hide the next growth.
    ballast = [bytes(200) + index.to_bytes(4, "little") for index in range(200_000)]
    closed: list[int] = []

    async def close_idle_connections() -> int:
        closed.append(1)
        return 0

    trimmer = MemoryTrimmer(
        close_idle_connections, interval_seconds=0.01, min_growth_bytes=8 * 2**20, quiet_task_margin=8
    )
    stop = asyncio.Event()
    trimmer_task = asyncio.create_task(trimmer.run(stop))
    try:
        await wait_until(lambda: trimmer.checks >= 2)
        del ballast
        gc.collect()
        checks_after_free = trimmer.checks
        await wait_until(lambda: trimmer.checks >= checks_after_free + 3)
        trims_before_growth = trimmer.trims

        ballast = [bytes(200) + index.to_bytes(4, "little") for index in range(200_000)]
        await wait_until(lambda: trimmer.trims > trims_before_growth)
    finally:
        stop.set()
        await trimmer_task

    assert len(ballast) == 200_000
    assert trims_before_growth == 0
    assert trimmer.trims == 1
