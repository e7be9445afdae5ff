"""Measure read throughput of one server process against a bare ASGI floor running the same queries.

`GET /v1/chats` (50 chats), `GET /v1/models/saved` and `GET /v1/users/profile` with a valid access token on
`pocketllm serve --no-worker`, and the same queries on benchmarks/bare_app.py (raw asyncpg or aiosqlite, no
framework and no authentication) under uvicorn with the same options, pinned to the same core. The load is
closed-loop with a fixed concurrency for a fixed time, alternating product and floor in rounds.

The load generator is benchmarks/rawhttp.py. Its own ceiling is measured against a static route of the
fake upstream, and httpx's against the bare floor, so a floor near the client ceiling shows up as such.

    python -m benchmarks.read_throughput                 # full run
    python -m benchmarks.read_throughput --seconds 2 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import (
    REPOSITORY_ROOT,
    ProcessGroup,
    free_port,
    machine_description,
    minimal_environment,
    pin,
    plan_cores,
    print_json_line,
    print_table,
    raise_file_limit,
    run_async,
    scratch_directory,
)
from benchmarks.launch import (
    Account,
    DatabaseKind,
    Server,
    database_url_for,
    parse_databases,
    server_environment,
    set_up_account,
    start_server,
    start_upstream,
    wait_until_healthy,
)
from benchmarks.rawhttp import HttpConnection, HttpResult, run_closed_loop

CHATS = 50
TARGET_RATIO = 0.5
ROUTES = {
    "chats": ("/v1/chats", "/chats"),
    "models_saved": ("/v1/models/saved", "/models/saved"),
    "profile": ("/v1/users/profile", "/users/profile"),
}
# A floor above this share of the client's own ceiling may be limited by the client, not the server.
CLIENT_BOUND_SHARE = 0.7


async def start_bare(processes: ProcessGroup, database_url: str, scratch: Path, cores: set[int]) -> int:
    port = free_port()
    process = processes.start(
        "bare",
        [sys.executable, "-m", "benchmarks.bare_app", "--port", str(port)],
        environment=minimal_environment(BARE_DATABASE_URL=database_url),
        cwd=REPOSITORY_ROOT,
        cores=cores,
        log_path=scratch / "bare.log",
    )
    await wait_until_healthy(f"http://127.0.0.1:{port}/health", process)
    return port


async def requests_per_second(
    port: int, path: str, headers: dict[str, str], *, concurrency: int, seconds: float
) -> tuple[float, int]:
    async def get(connection: HttpConnection, ticket: int) -> HttpResult:
        return await connection.request("GET", path, headers=headers)

    results, wall = await run_closed_loop(concurrency, duration_seconds=seconds, port=port, make_request=get)
    return len(results) / wall, len(results)


async def httpx_requests_per_second(url: str, *, concurrency: int, seconds: float) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    count = 0
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                response = await client.get(url)
                response.raise_for_status()
                count += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.perf_counter() - started)


async def measure_database(database: DatabaseKind, arguments: argparse.Namespace) -> dict[str, Any]:
    plan = plan_cores()
    processes = ProcessGroup()
    try:
        with scratch_directory("bench-read-") as scratch:
            upstream = await start_upstream(processes, scratch, plan.upstream)
            async with database_url_for(database, scratch, "bench_read") as database_url:
                server = await start_server(
                    processes,
                    kind="cli",
                    environment=server_environment(scratch, database_url),
                    data_dir=scratch,
                    cores=plan.server,
                )
                account = await set_up_account(server, upstream, chats=CHATS)
                bare_port = await start_bare(processes, database_url, scratch, plan.server)
                figures = await measure_routes(server, account, bare_port, upstream.port, arguments)
                processes.stop_all()
                return figures
    finally:
        processes.stop_all()


async def measure_routes(
    server: Server, account: Account, bare_port: int, upstream_port: int, arguments: argparse.Namespace
) -> dict[str, Any]:
    concurrency = arguments.concurrency
    seconds = arguments.seconds
    # Warm-up: connections, caches and the first-request imports of both servers.
    for product_path, bare_path in ROUTES.values():
        await requests_per_second(server.port, product_path, account.headers, concurrency=concurrency, seconds=1.0)
        await requests_per_second(
            bare_port, f"{bare_path}?user={account.user_id}", {}, concurrency=concurrency, seconds=1.0
        )

    totals: dict[str, dict[str, float]] = {
        name: {"product": 0.0, "bare": 0.0, "product_requests": 0, "bare_requests": 0} for name in ROUTES
    }
    for _ in range(arguments.rounds):
        for name, (product_path, bare_path) in ROUTES.items():
            rate, count = await requests_per_second(
                server.port, product_path, account.headers, concurrency=concurrency, seconds=seconds
            )
            totals[name]["product"] += rate / arguments.rounds
            totals[name]["product_requests"] += count
            rate, count = await requests_per_second(
                bare_port, f"{bare_path}?user={account.user_id}", {}, concurrency=concurrency, seconds=seconds
            )
            totals[name]["bare"] += rate / arguments.rounds
            totals[name]["bare_requests"] += count

    ceiling_raw, _ = await requests_per_second(upstream_port, "/ping", {}, concurrency=concurrency, seconds=seconds)
    httpx_on_bare = await httpx_requests_per_second(
        f"http://127.0.0.1:{bare_port}/chats?user={account.user_id}", concurrency=concurrency, seconds=seconds
    )
    figures: dict[str, Any] = {}
    for name, values in totals.items():
        figures[name] = {
            "product_rps": values["product"],
            "bare_rps": values["bare"],
            "ratio": values["product"] / values["bare"] if values["bare"] else float("nan"),
            "product_requests": int(values["product_requests"]),
            "bare_requests": int(values["bare_requests"]),
        }
    figures["client"] = {
        "raw_client_ceiling_rps": ceiling_raw,
        "httpx_on_bare_chats_rps": httpx_on_bare,
        "bare_chats_share_of_raw_ceiling": totals["chats"]["bare"] / ceiling_raw,
    }
    return figures


def report(all_figures: dict[str, dict[str, Any]]) -> None:
    rows = []
    for database, figures in all_figures.items():
        for name, (product_path, _) in ROUTES.items():
            values = figures[name]
            rows.append(
                [
                    database,
                    product_path,
                    values["product_rps"],
                    values["bare_rps"],
                    values["ratio"],
                    "yes" if values["ratio"] >= TARGET_RATIO else "no",
                ]
            )
    print_table(
        f"Read throughput, requests/s, one process (target: at least {TARGET_RATIO:.0%} of the bare floor)",
        ["database", "route", "server rps", "bare floor rps", "ratio", "meets target"],
        rows,
        digits=1,
    )
    client_rows = []
    for database, figures in all_figures.items():
        client = figures["client"]
        bound = "maybe" if client["bare_chats_share_of_raw_ceiling"] > CLIENT_BOUND_SHARE else "no"
        client_rows.append(
            [
                database,
                client["raw_client_ceiling_rps"],
                client["httpx_on_bare_chats_rps"],
                client["bare_chats_share_of_raw_ceiling"],
                bound,
            ]
        )
    print_table(
        "Load generator ceilings, requests/s",
        [
            "database",
            "raw client on static route",
            "httpx on bare /chats",
            "bare /chats / raw ceiling",
            "floor client-bound",
        ],
        client_rows,
        digits=2,
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
        "read_throughput",
        {
            "machine": machine_description(),
            "cores": plan.describe(),
            "settings": vars(arguments),
            "target_ratio": TARGET_RATIO,
            "results": all_figures,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--databases", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql (default: %(default)s)"
    )
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default: %(default)s)")
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="duration of one measurement (default: %(default)s)"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds of product and floor (default: %(default)s)"
    )

    arguments = parser.parse_args()
    raise_file_limit()
    run_async(main_async(arguments))


if __name__ == "__main__":
    main()
