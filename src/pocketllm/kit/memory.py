"""Give a server process's memory back to the operating system after a burst of requests.

Each open reply stream takes about 60 KiB of heap, so a burst of 1,000 streams grows the RSS by about
60 MiB. CPython's small-object allocator (pymalloc) frees a 1 MiB arena only once every object in it is
gone. A few objects that outlive the burst (pooled connections, cache entries, metric series) are spread
over the arenas it added, so after the burst pymalloc keeps most of them. glibc's allocator keeps freed
pages too, but gives them back on `malloc_trim`. So `pocketllm serve` on PostgreSQL runs the server with
PYTHONMALLOC=malloc (`use_system_allocator`), and `MemoryTrimmer` trims the heap once the load that grew
it has gone. docs/benchmarks.md ("Open streams") has the measurements.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import os
import sys
import time
from collections.abc import Awaitable, Callable, Mapping

import structlog

log = structlog.get_logger(__name__)

ALLOCATOR_VARIABLE = "PYTHONMALLOC"
SYSTEM_ALLOCATOR = "malloc"

CHECK_INTERVAL_SECONDS = 5.0
# RSS growth since the last trim that makes the next quiet check trim again.
MIN_GROWTH_BYTES = 16 * 1024 * 1024
# Tasks over the quietest count seen that still count as quiet. An open reply stream runs in about three
# (the request, the reply and the disconnect watcher), so this allows about 20 of them.
QUIET_TASK_MARGIN = 64


def _load_malloc_trim() -> Callable[[int], int] | None:
    """Return glibc's `malloc_trim`, or None on systems without it (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    function = getattr(libc, "malloc_trim", None)
    if function is None:
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    trim: Callable[[int], int] = function
    return trim


_malloc_trim = _load_malloc_trim()


def can_trim() -> bool:
    """Return whether the C library can give freed heap pages back (glibc's `malloc_trim`)."""
    return _malloc_trim is not None


def rss_bytes() -> int:
    """Return this process's resident set size from /proc/self/statm (Linux)."""
    with open("/proc/self/statm", "rb") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def trim_heap() -> None:
    """Run a full garbage collection, then give glibc's free heap pages back to the operating system."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


def wants_system_allocator(environment: Mapping[str, str]) -> bool:
    """Return whether a server process started with `environment` should restart on the system allocator.

    Only where `malloc_trim` exists, because elsewhere freed memory stays in the process either way and
    pymalloc is the faster allocator. An operator's own PYTHONMALLOC (such as `pymalloc`) is kept.
    """
    return can_trim() and ALLOCATOR_VARIABLE not in environment and bool(sys.executable)


def use_system_allocator() -> None:
    """Replace this process with the same command under PYTHONMALLOC=malloc, if `wants_system_allocator`.

    The allocator is chosen when the interpreter starts, so the process runs its own command line again
    (`sys.orig_argv`, interpreter options included) with `os.execve`. The process ID, open files and
    standard streams stay the same. Call it before the process has started threads or opened sockets.
    """
    if not wants_system_allocator(os.environ):
        return
    log.info("server.restarting", reason="PYTHONMALLOC=malloc, so that memory can go back to the system")
    environment = {**os.environ, ALLOCATOR_VARIABLE: SYSTEM_ALLOCATOR}
    # The same interpreter and arguments that started this process, so no shell and no outside input.
    os.execve(sys.executable, sys.orig_argv, environment)  # noqa: S606


class MemoryTrimmer:
    """Trim the heap (`trim_heap`) when the RSS has grown and the event loop is as quiet as before.

    Every `interval_seconds` it reads the RSS and counts the loop's unfinished tasks: uvicorn runs each
    request in a task, and each reply runs in another. It trims when the RSS has grown by `min_growth_bytes`
    over its lowest value since the last trim (or since it started), and the task count is within
    `quiet_task_margin` of the quietest count seen. Under a steady load the task count stays high, so
    nothing is trimmed until the load goes. Before trimming it closes idle provider connections with
    `close_idle_connections`, because each keeps buffers spread over the heap and a burst leaves up to a
    pool's worth of them.
    """

    def __init__(
        self,
        close_idle_connections: Callable[[], Awaitable[int]],
        *,
        interval_seconds: float = CHECK_INTERVAL_SECONDS,
        min_growth_bytes: int = MIN_GROWTH_BYTES,
        quiet_task_margin: int = QUIET_TASK_MARGIN,
    ) -> None:
        self._close_idle_connections = close_idle_connections
        self._interval_seconds = interval_seconds
        self._min_growth_bytes = min_growth_bytes
        self._quiet_task_margin = quiet_task_margin
        self.checks = 0
        self.trims = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Check every interval until `stop` is set. Errors are logged, and the next check runs as usual."""
        baseline_rss = rss_bytes()
        quietest_tasks = len(asyncio.all_tasks())
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._interval_seconds)
            if stop.is_set():
                return
            try:
                rss = rss_bytes()
                tasks = len(asyncio.all_tasks())
                quietest_tasks = min(quietest_tasks, tasks)
                # The RSS can fall below what the last trim left, and growth counts from the lowest value.
                baseline_rss = min(baseline_rss, rss)
                if rss - baseline_rss >= self._min_growth_bytes and tasks <= quietest_tasks + self._quiet_task_margin:
                    baseline_rss = await self._trim(rss, tasks)
            except Exception:
                log.exception("memory.check_failed")
            self.checks += 1

    async def _trim(self, rss_before: int, tasks: int) -> int:
        started = time.perf_counter()
        closed = await self._close_idle_connections()
        trim_heap()
        rss_after = rss_bytes()
        self.trims += 1
        log.info(
            "memory.trimmed",
            rss_before_mib=round(rss_before / 2**20, 1),
            rss_after_mib=round(rss_after / 2**20, 1),
            idle_connections_closed=closed,
            tasks=tasks,
            pid=os.getpid(),
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return rss_after
