"""Measure memory per open reply stream, time to first token with many open streams, and pool use while they wait.

One server process (benchmarks/bench_server.py, which is `pocketllm serve --no-worker` plus `/bench/pool`)
streams replies from a fake provider that sends the first content chunk at once and then holds the stream
open until it is released. Streams are opened in steps of `--step` up to `--streams`, spread over 100 chats.
After each step, once every open stream has its first `delta` event, the benchmark records the server's RSS
(from /proc), its open file descriptors and the database pool. The most connections checked out by request
work during one second of waiting must be 0, because no connection may be held while a stream waits on the
provider. Connections taken by the app's background mail sender are counted apart (`/bench/pool`).
Then the upstream releases every stream, the replies are stored, and the RSS is read again.

* Memory per stream: least-squares slope of RSS over the open stream count, and (RSS at the last step -
  RSS at the first) / (streams between them).
* Time to first token: p50 and p99 over the streams opened in the last step, which were opened at once
  while the earlier streams stayed open, and over all streams.
* Memory after the streams end, as a ratio to the RSS before the first step (target: within 10%). Both
  are read `MEMORY_SETTLE_SECONDS` after the last stream ended, once the server's memory trimmer has
  checked the quiet process.
* Growth in a second, identical ramp: (RSS after the second ramp - RSS after the first) / (RSS after the
  first - RSS before). Near 0 means that the allocator kept the memory after the first ramp and the
  second reused it. Near 1 would mean that each ramp leaks as much again.

    python -m benchmarks.open_streams                    # full run: 100 to 1,000 streams on PostgreSQL
    python -m benchmarks.open_streams --streams 100 --step 25
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from benchmarks.common import (
    ProcessGroup,
    machine_description,
    open_file_count,
    percentile,
    pin,
    plan_cores,
    print_json_line,
    print_table,
    raise_file_limit,
    rss_bytes,
    run_async,
    scratch_directory,
    slope,
)
from benchmarks.launch import (
    Account,
    DatabaseKind,
    Server,
    Upstream,
    bench_json,
    database_url_for,
    parse_databases,
    server_environment,
    set_up_account,
    start_server,
    start_upstream,
)
from benchmarks.rawhttp import JSON_HEADERS, HttpConnection, HttpResult, json_request_body
from pocketllm.kit.memory import CHECK_INTERVAL_SECONDS

CHATS = 100
WARMUP_STREAMS = 20
MEMORY_RETURN_TARGET = 1.10
SETTLE_SECONDS = 2.0
# The server's memory trimmer (pocketllm/kit/memory.py) checks once per interval, so one interval after the
# settling time it has seen the quiet event loop. The RSS readings before and after the streams both wait this.
MEMORY_SETTLE_SECONDS = SETTLE_SECONDS + CHECK_INTERVAL_SECONDS
POOL_WATCH_SECONDS = 1.0
SERVER_DELTA_MARKER = b"event: delta"
MEBIBYTE = 1024 * 1024


class StreamSet:
    """Open streams, each on its own connection, with the time of its first delta."""

    def __init__(self, server: Server, headers: dict[str, str], chat_ids: list[str]) -> None:
        self._server = server
        self._headers = {**headers, **JSON_HEADERS}
        self._chat_ids = chat_ids
        self._body = json_request_body({"content": "Tell me a long story.", "role": "user", "stream": True})
        self.tasks: list[asyncio.Task[HttpResult]] = []
        self.started: list[float] = []
        self.first_token: list[float | None] = []
        self.first_token_count = 0

    def open(self, count: int) -> range:
        first = len(self.tasks)
        for index in range(first, first + count):
            self.started.append(time.perf_counter())
            self.first_token.append(None)
            self.tasks.append(asyncio.create_task(self._stream(index)))
        return range(first, first + count)

    async def _stream(self, index: int) -> HttpResult:
        def record(at: float) -> None:
            self.first_token[index] = at
            self.first_token_count += 1

        connection = HttpConnection(self._server.port)
        await connection.open()
        try:
            chat_id = self._chat_ids[index % len(self._chat_ids)]
            return await connection.request(
                "POST",
                f"/v1/chats/{chat_id}/messages",
                headers=self._headers,
                body=self._body,
                marker=SERVER_DELTA_MARKER,
                on_marker=record,
            )
        finally:
            await connection.close()

    async def wait_first_tokens(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.first_token_count < len(self.tasks):
            failed = [task for task in self.tasks if task.done() and task.exception() is not None]
            if failed:
                raise RuntimeError(f"{len(failed)} streams failed; first error: {failed[0].exception()!r}")
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def ttft_ms(self, indexes: range) -> list[float]:
        return [
            (first - self.started[index]) * 1000 for index in indexes if (first := self.first_token[index]) is not None
        ]


async def measure_database(database: DatabaseKind, arguments: argparse.Namespace) -> dict[str, Any]:
    plan = plan_cores()
    processes = ProcessGroup()
    try:
        with scratch_directory("bench-streams-") as scratch:
            upstream = await start_upstream(processes, scratch, plan.upstream)
            async with database_url_for(database, scratch, "bench_streams") as database_url:
                server = await start_server(
                    processes,
                    kind="bench",
                    environment=server_environment(scratch, database_url),
                    data_dir=scratch,
                    cores=plan.server,
                )
                account = await set_up_account(server, upstream, chats=CHATS)

                # Warm-up with streams that end at once, so that first-use allocations are in the baseline.
                await upstream.configure(hold_seconds=0)
                warmup = StreamSet(server, account.headers, account.chat_ids)
                warmup.open(WARMUP_STREAMS)
                await asyncio.gather(*warmup.tasks)
                await asyncio.sleep(MEMORY_SETTLE_SECONDS)
                rss_start = rss_bytes(server.pid)

                figures, released, errors = await ramp_and_release(server, upstream, account, arguments)
                await asyncio.sleep(MEMORY_SETTLE_SECONDS)
                rss_end = rss_bytes(server.pid)
                pool_after = await bench_json(server, "/bench/pool")
                # The same ramp again. It reuses memory that the allocator kept after the first one, so the
                # RSS stays where it was. Memory that leaks would grow it by about as much again.
                _, second_released, second_errors = await ramp_and_release(server, upstream, account, arguments)
                await asyncio.sleep(MEMORY_SETTLE_SECONDS)
                rss_second_end = rss_bytes(server.pid)
                figures.update(
                    {
                        "rss_start_mib": rss_start / MEBIBYTE,
                        "rss_end_mib": rss_end / MEBIBYTE,
                        "rss_end_to_start_ratio": rss_end / rss_start,
                        "rss_second_end_mib": rss_second_end / MEBIBYTE,
                        "rss_growth_second_to_first_ratio": (rss_second_end - rss_end) / (rss_end - rss_start)
                        if rss_end > rss_start
                        else float("nan"),
                        "streams_released": released + second_released,
                        "stream_errors": len(errors) + len(second_errors),
                        "pool_after": pool_after,
                    }
                )
                processes.stop_all()
                return figures
    finally:
        processes.stop_all()


async def ramp_and_release(
    server: Server, upstream: Upstream, account: Account, arguments: argparse.Namespace
) -> tuple[dict[str, Any], int, list[BaseException]]:
    """Open streams step by step (see `ramp`), then release them all and wait until every reply was stored.

    Returns the ramp's figures, the number of streams released and the streams that failed.
    """
    await upstream.configure(hold_seconds=arguments.hold_seconds)
    streams = StreamSet(server, account.headers, account.chat_ids)
    try:
        figures = await ramp(server, streams, arguments)
    finally:
        released = await upstream.release()
        await upstream.configure(hold_seconds=0)
        results = await asyncio.wait_for(
            asyncio.gather(*streams.tasks, return_exceptions=True), timeout=arguments.drain_seconds
        )
    return figures, released, [result for result in results if isinstance(result, BaseException)]


async def ramp(server: Server, streams: StreamSet, arguments: argparse.Namespace) -> dict[str, Any]:
    steps: list[dict[str, Any]] = []
    last_indexes = range(0)
    complete = True
    open_count = 0
    while open_count < arguments.streams:
        count = min(arguments.step, arguments.streams - open_count)
        last_indexes = streams.open(count)
        open_count += count
        if not await streams.wait_first_tokens(arguments.first_token_timeout):
            complete = False
            steps.append({"open": open_count, "with_first_token": streams.first_token_count})
            break

        await bench_json(server, "/bench/pool/reset", method="POST")
        await asyncio.sleep(POOL_WATCH_SECONDS)
        pool = await bench_json(server, "/bench/pool")
        ttft = streams.ttft_ms(last_indexes)
        steps.append(
            {
                "open": open_count,
                "with_first_token": streams.first_token_count,
                "rss_mib": rss_bytes(server.pid) / MEBIBYTE,
                "open_files": open_file_count(server.pid),
                "pool_checked_out": pool["checked_out"],
                "pool_max_checked_out_while_waiting": pool["max_request_checked_out"],
                "pool_max_checked_out_all_tasks": pool["max_checked_out"],
                "pool_class": pool["pool_class"],
                "step_ttft_p50_ms": percentile(ttft, 0.5),
                "step_ttft_p99_ms": percentile(ttft, 0.99),
            }
        )

    measured = [step for step in steps if "rss_mib" in step]
    all_ttft = streams.ttft_ms(range(len(streams.tasks)))
    figures: dict[str, Any] = {
        "steps": steps,
        "reached_target": complete,
        "max_open_with_first_token": max((step["with_first_token"] for step in steps), default=0),
        "ttft_all_p50_ms": percentile(all_ttft, 0.5),
        "ttft_all_p99_ms": percentile(all_ttft, 0.99),
        "ttft_last_step_p50_ms": percentile(streams.ttft_ms(last_indexes), 0.5),
        "ttft_last_step_p99_ms": percentile(streams.ttft_ms(last_indexes), 0.99),
        "pool_max_checked_out_while_waiting": max(
            (step["pool_max_checked_out_while_waiting"] for step in measured), default=None
        ),
    }
    if len(measured) >= 2:
        first, last = measured[0], measured[-1]
        figures["kib_per_stream_slope"] = (
            slope([step["open"] for step in measured], [step["rss_mib"] for step in measured]) * 1024
        )
        figures["kib_per_stream_first_to_last"] = (
            (last["rss_mib"] - first["rss_mib"]) * 1024 / (last["open"] - first["open"])
        )
    return figures


def report(all_figures: dict[str, dict[str, Any]]) -> None:
    for database, figures in all_figures.items():
        rows = [
            [
                step["open"],
                step["with_first_token"],
                step.get("rss_mib", float("nan")),
                step.get("open_files", "n/a"),
                step.get("pool_max_checked_out_while_waiting", "n/a"),
                step.get("pool_max_checked_out_all_tasks", "n/a"),
                step.get("step_ttft_p50_ms", float("nan")),
                step.get("step_ttft_p99_ms", float("nan")),
            ]
            for step in figures["steps"]
        ]
        print_table(
            f"Open streams on {database}: one server process, each step opened at once",
            [
                "open",
                "with 1st token",
                "RSS MiB",
                "open fds",
                "pool max out, requests",
                "pool max out, all tasks",
                "step TTFT p50 ms",
                "step TTFT p99 ms",
            ],
            rows,
        )
        if not figures["reached_target"]:
            print(
                f"NOTE: only {figures['max_open_with_first_token']} streams got a first token; the ramp stopped "
                "at the step that timed out."
            )
    summary = [
        [
            database,
            figures.get("kib_per_stream_slope", float("nan")),
            figures.get("kib_per_stream_first_to_last", float("nan")),
            figures["ttft_last_step_p99_ms"],
            figures["ttft_all_p99_ms"],
            figures["rss_start_mib"],
            figures["rss_end_mib"],
            figures["rss_end_to_start_ratio"],
            "yes" if figures["rss_end_to_start_ratio"] <= MEMORY_RETURN_TARGET else "no",
            figures["rss_second_end_mib"],
            figures["rss_growth_second_to_first_ratio"],
            figures["pool_max_checked_out_while_waiting"],
            figures["stream_errors"],
        ]
        for database, figures in all_figures.items()
    ]
    print_table(
        "Open streams summary",
        [
            "database",
            "KiB/stream slope",
            "KiB/stream first-last",
            "TTFT p99 last step ms",
            "TTFT p99 all ms",
            "RSS start MiB",
            "RSS end MiB",
            "end/start",
            "within 10%",
            "RSS after 2nd ramp MiB",
            "2nd ramp growth / 1st",
            "pool max out",
            "stream errors",
        ],
        summary,
    )


async def main_async(arguments: argparse.Namespace) -> None:
    plan = plan_cores()
    pin(0, plan.client)
    print(f"{plan.describe()}; {machine_description()}")
    all_figures: dict[str, dict[str, Any]] = {}
    for database in parse_databases(arguments.databases):
        all_figures[database] = await measure_database(database, arguments)
    report(all_figures)
    print_json_line(
        "open_streams",
        {
            "machine": machine_description(),
            "cores": plan.describe(),
            "settings": vars(arguments),
            "results": all_figures,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--databases", default="postgresql", help="comma-separated: sqlite, postgresql (default: %(default)s)"
    )
    parser.add_argument(
        "--streams", type=int, default=1000, help="open streams at the last step (default: %(default)s)"
    )
    parser.add_argument("--step", type=int, default=100, help="streams opened at once per step (default: %(default)s)")
    parser.add_argument(
        "--hold-seconds",
        type=float,
        default=600.0,
        help="maximum seconds the upstream holds a stream that is never released (default: %(default)s)",
    )
    parser.add_argument(
        "--first-token-timeout",
        type=float,
        default=60.0,
        help="seconds a step may take to get every first token (default: %(default)s)",
    )
    parser.add_argument(
        "--drain-seconds",
        type=float,
        default=120.0,
        help="seconds the released streams may take to finish (default: %(default)s)",
    )

    arguments = parser.parse_args()
    raise_file_limit()
    run_async(main_async(arguments))


if __name__ == "__main__":
    main()
