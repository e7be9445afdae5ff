"""Measure image jobs completed per second by 1 and 2 `pocketllm worker` processes, and the claim latency.

PostgreSQL only, because several workers need it. The fake provider returns one 8x8 PNG at once, so the
figures are the queue's and the worker's own cost: claim, key decryption, the provider call, the image
check, the file write to local storage (DATA_DIR/files) and the result.

For each worker count:

1. Throughput: `--jobs` jobs are queued through `POST /v1/jobs/image-generation` before the workers start.
   Jobs per second = jobs / (last finished_at - first started_at), from the jobs table, so process start-up
   is not counted.
2. Claim latency: with the workers running and idle, `--latency-jobs` jobs are queued at `--latency-rate`
   per second, below the measured throughput. Claim latency = started_at - created_at of each job. An idle
   worker in its own process learns of a new job at its next poll (JOB_POLL_SECONDS, 0.5 s by default),
   so expect about half the poll interval at p50.

The workers are not pinned: with one core per process there is nothing to scale on a 2-core machine.

    python -m benchmarks.jobs_throughput                 # full run
    python -m benchmarks.jobs_throughput --jobs 200 --latency-jobs 40
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from benchmarks.common import (
    ProcessGroup,
    asyncpg_dsn,
    machine_description,
    percentile,
    pin,
    plan_cores,
    print_json_line,
    print_table,
    raise_file_limit,
    run_async,
    scratch_directory,
    temporary_postgres_database,
)
from benchmarks.launch import Account, Server, server_environment, set_up_account, start_server, start_upstream
from benchmarks.rawhttp import JSON_HEADERS, HttpConnection, HttpResult, json_request_body, run_closed_loop

JOB_BODY = json_request_body({"input_data": {"prompt": "A lighthouse at dusk", "model": "dall-e-2", "size": "256x256"}})
POLL_SECONDS = 0.1


async def enqueue(server: Server, account: Account, count: int) -> list[uuid.UUID]:
    headers = {**account.headers, **JSON_HEADERS}

    async def post(connection: HttpConnection, ticket: int) -> HttpResult:
        return await connection.request("POST", "/v1/jobs/image-generation", headers=headers, body=JOB_BODY)

    results, _ = await run_closed_loop(
        8, total_requests=count, port=server.port, make_request=post, expected_status=202
    )
    return [uuid.UUID(result.json()["job_id"]) for result in results]


async def enqueue_at_rate(server: Server, account: Account, count: int, rate: float) -> list[uuid.UUID]:
    headers = {**account.headers, **JSON_HEADERS}
    connection = HttpConnection(server.port)
    await connection.open()
    ids: list[uuid.UUID] = []
    started = time.perf_counter()
    try:
        for index in range(count):
            # Open loop: each job is sent at its scheduled time, whatever the previous one took.
            delay = started + index / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            result = await connection.request("POST", "/v1/jobs/image-generation", headers=headers, body=JOB_BODY)
            if result.status != 202:
                raise RuntimeError(f"queuing a job failed: {result.status} {result.body[:300]!r}")
            ids.append(uuid.UUID(result.json()["job_id"]))
    finally:
        await connection.close()
    return ids


async def wait_finished(database: asyncpg.Connection, ids: list[uuid.UUID], timeout: float) -> list[asyncpg.Record]:
    deadline = time.monotonic() + timeout
    query = "SELECT status, created_at, started_at, finished_at FROM jobs WHERE id = ANY($1::uuid[])"
    while True:
        rows = await database.fetch(query, ids)
        if all(row["status"] in ("completed", "failed", "cancelled") for row in rows) and len(rows) == len(ids):
            return rows
        if time.monotonic() > deadline:
            pending = sum(1 for row in rows if row["status"] in ("pending", "processing"))
            raise TimeoutError(f"{pending} of {len(ids)} jobs were not finished within {timeout:.0f} s")
        await asyncio.sleep(POLL_SECONDS)


def start_workers(
    processes: ProcessGroup, count: int, environment: dict[str, str], scratch: Path, concurrency: int | None
) -> list[Any]:
    command = [str(Path(sys.executable).with_name("pocketllm")), "worker"]
    if concurrency is not None:
        command += ["--concurrency", str(concurrency)]
    return [
        processes.start(
            f"worker-{index}", command, environment=environment, cwd=scratch, log_path=scratch / f"worker-{index}.log"
        )
        for index in range(count)
    ]


async def measure(arguments: argparse.Namespace) -> dict[str, Any]:
    plan = plan_cores()
    worker_counts = [int(item) for item in arguments.workers.split(",")]
    processes = ProcessGroup()
    figures: dict[str, Any] = {}
    try:
        with scratch_directory("bench-jobs-") as scratch:
            upstream = await start_upstream(processes, scratch, plan.upstream)
            async with temporary_postgres_database("bench_jobs") as database_url:
                environment = server_environment(scratch, database_url)
                server = await start_server(
                    processes, kind="cli", environment=environment, data_dir=scratch, cores=plan.server
                )
                account = await set_up_account(server, upstream)
                database = await asyncpg.connect(asyncpg_dsn(database_url))
                try:
                    for count in worker_counts:
                        figures[f"workers_{count}"] = await measure_workers(
                            processes, server, account, database, environment, scratch, count, arguments
                        )
                finally:
                    await database.close()
                processes.stop_all()
    finally:
        processes.stop_all()
    return figures


async def measure_workers(
    processes: ProcessGroup,
    server: Server,
    account: Account,
    database: asyncpg.Connection,
    environment: dict[str, str],
    scratch: Path,
    count: int,
    arguments: argparse.Namespace,
) -> dict[str, Any]:
    ids = await enqueue(server, account, arguments.jobs)
    workers = start_workers(processes, count, environment, scratch, arguments.worker_concurrency)
    try:
        rows = await wait_finished(database, ids, arguments.timeout)
        completed = [row for row in rows if row["status"] == "completed"]
        span = (
            max(row["finished_at"] for row in completed) - min(row["started_at"] for row in completed)
        ).total_seconds()

        latency_ids = await enqueue_at_rate(server, account, arguments.latency_jobs, arguments.latency_rate)
        latency_rows = await wait_finished(database, latency_ids, arguments.timeout)
    finally:
        for worker in workers:
            processes.stop(worker)
    claims = [
        (row["started_at"] - row["created_at"]).total_seconds() * 1000 for row in latency_rows if row["started_at"]
    ]
    return {
        "jobs": len(ids),
        "completed": len(completed),
        "failed": len(rows) - len(completed),
        "jobs_per_second": len(completed) / span if span > 0 else float("nan"),
        "latency_jobs": len(latency_ids),
        "latency_rate_per_second": arguments.latency_rate,
        "claim_p50_ms": percentile(claims, 0.5),
        "claim_p99_ms": percentile(claims, 0.99),
    }


def report(figures: dict[str, Any]) -> None:
    rows = [
        [
            key.removeprefix("workers_"),
            values["jobs"],
            values["completed"],
            values["failed"],
            values["jobs_per_second"],
            values["claim_p50_ms"],
            values["claim_p99_ms"],
        ]
        for key, values in figures.items()
    ]
    print_table(
        "Image jobs on PostgreSQL against a zero-delay provider",
        ["workers", "jobs", "completed", "failed", "jobs/s", "claim p50 ms", "claim p99 ms"],
        rows,
    )
    counts = sorted(int(key.removeprefix("workers_")) for key in figures)
    if len(counts) >= 2:
        first, last = figures[f"workers_{counts[0]}"], figures[f"workers_{counts[-1]}"]
        ratio = last["jobs_per_second"] / first["jobs_per_second"]
        print(f"Throughput ratio {counts[-1]} to {counts[0]} workers: {ratio:.2f}")


async def main_async(arguments: argparse.Namespace) -> None:
    plan = plan_cores()
    pin(0, plan.client)
    print(f"{plan.describe()} (workers unpinned); {machine_description()}")
    figures = await measure(arguments)
    report(figures)
    print_json_line(
        "jobs_throughput",
        {"machine": machine_description(), "cores": plan.describe(), "settings": vars(arguments), "results": figures},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker process counts (default: %(default)s)")
    parser.add_argument(
        "--worker-concurrency",
        type=int,
        default=None,
        help="jobs each worker runs at once (default: the product's JOB_CONCURRENCY)",
    )
    parser.add_argument(
        "--jobs", type=int, default=2000, help="jobs queued before the workers start (default: %(default)s)"
    )
    parser.add_argument(
        "--latency-jobs",
        type=int,
        default=200,
        help="jobs queued at a fixed rate for the claim latency (default: %(default)s)",
    )
    parser.add_argument(
        "--latency-rate",
        type=float,
        default=10.0,
        help="jobs per second queued for the claim latency (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for one batch of jobs (default: %(default)s)"
    )

    arguments = parser.parse_args()
    raise_file_limit()
    run_async(main_async(arguments))


if __name__ == "__main__":
    main()
