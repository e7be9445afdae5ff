"""Shared benchmark plumbing: processes, CPU pinning, /proc readings, percentiles, databases and reports."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
# Processes get this long to exit after SIGTERM before they are killed.
STOP_TIMEOUT_SECONDS = 15.0
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
PAGE_SIZE_BYTES = os.sysconf("SC_PAGE_SIZE")
# Read once at import, before a benchmark pins itself, so that every core plan sees all usable CPUs.
USABLE_CPUS = sorted(os.sched_getaffinity(0))


# -- processes and CPUs --------------------------------------------------------------------------------------


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE of this process to its hard limit and return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65_536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


@dataclass(frozen=True)
class CorePlan:
    """The CPUs for the server under test, the load generator and the fake upstream."""

    server: set[int]
    client: set[int]
    upstream: set[int]

    def describe(self) -> str:
        return (
            f"server cores {sorted(self.server)}, client cores {sorted(self.client)}, "
            f"upstream cores {sorted(self.upstream)}"
        )


def plan_cores() -> CorePlan:
    """Give the server its own core and share the rest between the client and the fake upstream.

    With one core nothing can be separated, so everything shares it. With two cores the client and the
    upstream share the second core, which adds the same cost to direct and through-server requests.
    """
    available = USABLE_CPUS
    if len(available) == 1:
        return CorePlan(set(available), set(available), set(available))
    if len(available) == 2:
        return CorePlan({available[0]}, {available[1]}, {available[1]})
    return CorePlan({available[0]}, {available[1]}, set(available[2:]))


def pin(pid: int, cores: set[int]) -> None:
    """Restrict process `pid` (0 for this one) to `cores`; threads started afterwards inherit the mask."""
    os.sched_setaffinity(pid, cores)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        port: int = listener.getsockname()[1]
        return port


def minimal_environment(**values: str) -> dict[str, str]:
    """Return an environment with PATH, HOME and locale from this process plus `values`, nothing else.

    Leaving out everything else keeps proxy variables, DATABASE_URL or REDIS_URL of the shell from reaching
    the server under test.
    """
    environment = {name: os.environ[name] for name in ("PATH", "HOME", "LANG", "LC_ALL", "TZ") if name in os.environ}
    environment["PYTHONPATH"] = str(REPOSITORY_ROOT)
    environment.update(values)
    return environment


class ProcessGroup:
    """Child processes started by a benchmark; `stop_all` ends them with SIGTERM, then SIGKILL."""

    def __init__(self) -> None:
        self._processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        command: Sequence[str],
        *,
        environment: dict[str, str],
        cwd: Path,
        cores: set[int] | None = None,
        log_path: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        log_file = open(log_path or os.devnull, "wb")  # noqa: SIM115  (closed when the process is reaped)
        process = subprocess.Popen(  # noqa: S603  (fixed argument lists built by the benchmarks)
            list(command),
            env=environment,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        if cores is not None:
            pin(process.pid, cores)
        self._processes.append((name, process))
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """Stop one process and wait for it, at most STOP_TIMEOUT_SECONDS before SIGKILL."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_SECONDS)
        self._processes = [(name, item) for name, item in self._processes if item is not process]

    def stop_all(self) -> None:
        for _, process in reversed(list(self._processes)):
            self.stop(process)


@contextlib.contextmanager
def scratch_directory(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as directory:
        yield Path(directory)


# -- readings from /proc -------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of process `pid`, from the second field of /proc/<pid>/statm."""
    fields = Path(f"/proc/{pid}/statm").read_text().split()
    return int(fields[1]) * PAGE_SIZE_BYTES


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid` (all its threads), from /proc/<pid>/stat.

    The kernel counts in clock ticks, usually 10 ms, so a difference is only exact to about two ticks.
    """
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name in field 2 may contain spaces, so fields are counted after its closing bracket.
    fields = raw[raw.rindex(")") + 2 :].split()
    user_ticks, system_ticks = int(fields[11]), int(fields[12])
    return (user_ticks + system_ticks) / CLOCK_TICKS_PER_SECOND


def open_file_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- statistics ----------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], fraction: float) -> float:
    """Return the `fraction` quantile (0.5 for the median) by linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    lower = math.floor(position)
    upper = math.ceil(position)
    if lower == upper:
        return ordered[lower]
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs."""
    count = len(xs)
    if count < 2:
        return math.nan
    mean_x = sum(xs) / count
    mean_y = sum(ys) / count
    numerator = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    denominator = sum((x - mean_x) ** 2 for x in xs)
    return numerator / denominator if denominator else math.nan


# -- PostgreSQL ----------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def temporary_postgres_database(prefix: str) -> AsyncIterator[str]:
    """Create a PostgreSQL database with a random name, yield its SQLAlchemy URL, and drop it afterwards."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(POSTGRES_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    finally:
        admin = await asyncpg.connect(POSTGRES_ADMIN_DSN)
        try:
            # FORCE ends connections that a killed server process may have left behind.
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+asyncpg://", "postgresql://", 1)


# -- reports -------------------------------------------------------------------------------------------------


def format_number(value: Any, digits: int = 2) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}f}"
    return str(value)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 2) -> None:
    cells = [[format_number(value, digits) for value in row] for row in rows]
    widths = [max(len(str(header)), *(len(row[index]) for row in cells)) for index, header in enumerate(headers)]
    print(f"\n{title}")
    print("  ".join(str(header).ljust(width) for header, width in zip(headers, widths, strict=True)))
    print("  ".join("-" * width for width in widths))
    for row in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    sys.stdout.flush()


def print_json_line(benchmark: str, figures: dict[str, Any]) -> None:
    """Print one machine-readable line: `BENCHMARK-JSON {...}` with every figure of the run."""
    payload = {"benchmark": benchmark, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **figures}
    print("BENCHMARK-JSON " + json.dumps(_json_safe(payload), sort_keys=True))
    sys.stdout.flush()


def _json_safe(value: Any) -> Any:
    """Replace NaN with null (JSON has no NaN) and sets with sorted lists, recursively."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 6)
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if isinstance(value, set):
        return sorted(value)
    if isinstance(value, str | int | bool) or value is None:
        return value
    return str(value)


def machine_description() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu_model": model, "cpus": len(USABLE_CPUS), "python": sys.version.split()[0]}


def run_async(main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on uvloop when it is installed (as uvicorn does for the server), else on asyncio's loop.

    SIGTERM cancels `main`, as Ctrl-C does, so its finally blocks stop the child processes and drop the
    temporary database.
    """

    async def cancellable() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await main

    try:
        import uvloop
    except ImportError:
        asyncio.run(cancellable())
    else:
        uvloop.run(cancellable())
