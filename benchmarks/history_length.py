"""Measure reply latency and database time against the number of earlier messages in the chat.

One chat per history length (default 10, 100, 1,000 and 10,000 messages), filled by direct inserts through
the project's models. Non-streaming replies from the zero-delay fake provider, one at a time, the lengths
taken in turn in every round. After each reply the chat is cut back to its length by the benchmark, outside
the timed request, so every reply sees the same history.

Database time is the server's own sum of statement times from SQLAlchemy's before/after_cursor_execute
events (see benchmarks/bench_server.py for what that span includes), read before and after each batch.
The server loads at most its history limit of earlier messages for a prompt, so past that limit a longer
chat changes the queries' work, not the prompt size.

    python -m benchmarks.history_length                  # full run
    python -m benchmarks.history_length --requests 20 --rounds 2
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.common import (
    ProcessGroup,
    machine_description,
    percentile,
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
    bench_json,
    database_url_for,
    parse_databases,
    server_environment,
    set_up_account,
    start_server,
    start_upstream,
)
from benchmarks.rawhttp import JSON_HEADERS, HttpConnection, json_request_body
from benchmarks.seed import ChatStore

TARGET_RATIO = 1.2
WARMUP_REQUESTS = 20


async def measure_database(database: DatabaseKind, arguments: argparse.Namespace) -> dict[str, Any]:
    plan = plan_cores()
    lengths = [int(item) for item in arguments.lengths.split(",")]
    processes = ProcessGroup()
    try:
        with scratch_directory("bench-history-") as scratch:
            upstream = await start_upstream(processes, scratch, plan.upstream)
            async with database_url_for(database, scratch, "bench_history") as database_url:
                server = await start_server(
                    processes,
                    kind="bench",
                    environment=server_environment(scratch, database_url),
                    data_dir=scratch,
                    cores=plan.server,
                )
                account = await set_up_account(server, upstream, chats=len(lengths))
                store = ChatStore(database_url)
                try:
                    for chat_id, length in zip(account.chat_ids, lengths, strict=True):
                        await store.seed(chat_id, length)
                    figures = await measure_lengths(server, account, store, lengths, arguments)
                finally:
                    await store.close()
                processes.stop_all()
                return figures
    finally:
        processes.stop_all()


async def measure_lengths(
    server: Server, account: Account, store: ChatStore, lengths: list[int], arguments: argparse.Namespace
) -> dict[str, Any]:
    headers = {**account.headers, **JSON_HEADERS}
    body = json_request_body({"content": "Summarise our conversation so far in one sentence.", "role": "user"})
    latencies: dict[int, list[float]] = {length: [] for length in lengths}
    db_seconds = dict.fromkeys(lengths, 0.0)
    statements = dict.fromkeys(lengths, 0)
    connection = HttpConnection(server.port)
    await connection.open()
    try:
        for round_number in range(arguments.rounds + 1):
            warmup = round_number == 0
            for chat_id, length in zip(account.chat_ids, lengths, strict=True):
                before = await bench_json(server, "/bench/db-time")
                for _ in range(WARMUP_REQUESTS if warmup else arguments.requests):
                    result = await connection.request(
                        "POST", f"/v1/chats/{chat_id}/messages", headers=headers, body=body
                    )
                    if result.status != 200:
                        raise RuntimeError(f"reply failed: {result.status} {result.body[:300]!r}")
                    if not warmup:
                        latencies[length].append(result.elapsed * 1000)
                    # The cut-back is not in the server's statement clock: it runs on the benchmark's own engine.
                    await store.truncate([chat_id], length)
                after = await bench_json(server, "/bench/db-time")
                if not warmup:
                    db_seconds[length] += after["seconds"] - before["seconds"]
                    statements[length] += after["statements"] - before["statements"]
    finally:
        await connection.close()

    figures: dict[str, Any] = {}
    for length in lengths:
        count = len(latencies[length])
        figures[str(length)] = {
            "requests": count,
            "latency_p50_ms": percentile(latencies[length], 0.5),
            "latency_p99_ms": percentile(latencies[length], 0.99),
            "db_ms_per_reply": db_seconds[length] / count * 1000,
            "statements_per_reply": statements[length] / count,
        }
    base = figures[str(lengths[0])]
    for length in lengths:
        entry = figures[str(length)]
        entry["latency_p50_ratio"] = entry["latency_p50_ms"] / base["latency_p50_ms"]
        entry["db_time_ratio"] = entry["db_ms_per_reply"] / base["db_ms_per_reply"]
    return figures


def report(all_figures: dict[str, dict[str, Any]], lengths: list[int]) -> None:
    rows = []
    for database, figures in all_figures.items():
        for length in lengths:
            entry = figures[str(length)]
            rows.append(
                [
                    database,
                    length,
                    entry["latency_p50_ms"],
                    entry["latency_p99_ms"],
                    entry["latency_p50_ratio"],
                    entry["db_ms_per_reply"],
                    entry["db_time_ratio"],
                    entry["statements_per_reply"],
                    entry["requests"],
                ]
            )
    print_table(
        "Reply latency and database time by history length, concurrency 1 "
        f"(target: largest within {TARGET_RATIO}x of smallest)",
        [
            "database",
            "messages",
            "p50 ms",
            "p99 ms",
            "p50 ratio",
            "DB ms/reply",
            "DB ratio",
            "statements/reply",
            "requests",
        ],
        rows,
    )


async def main_async(arguments: argparse.Namespace) -> None:
    plan = plan_cores()
    pin(0, plan.client)
    print(f"{plan.describe()}; {machine_description()}")
    lengths = [int(item) for item in arguments.lengths.split(",")]
    all_figures: dict[str, dict[str, Any]] = {}
    for database in parse_databases(arguments.databases):
        all_figures[database] = await measure_database(database, arguments)
    report(all_figures, lengths)
    print_json_line(
        "history_length",
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
    parser.add_argument(
        "--lengths",
        default="10,100,1000,10000",
        help="comma-separated history lengths, smallest first (default: %(default)s)",
    )
    parser.add_argument("--requests", type=int, default=100, help="replies per length per round (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds over all lengths (default: %(default)s)")

    arguments = parser.parse_args()
    raise_file_limit()
    run_async(main_async(arguments))


if __name__ == "__main__":
    main()
