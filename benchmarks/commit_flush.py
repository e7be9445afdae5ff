"""Measure what waiting for PostgreSQL's write-ahead log flush adds to one autocommit statement.

A reply's first statement on PostgreSQL (`start_reply` in src/pocketllm/chats/service.py) inserts the
user's message in a transaction of its own and turns `synchronous_commit` off for that transaction. This
script sends the same one-row INSERT in autocommit mode both ways, in alternating batches on one asyncpg
connection, into a table of a new PostgreSQL database that it drops afterwards:

* `flush`: the server's default, where the commit waits until its log record is on disk;
* `no flush`: with `set_config('synchronous_commit', 'off', true)` in the statement, as `start_reply` does.

The figures are the statement's round trip from this process: p50 and p90 in µs per case, and the
difference of the p50s.

    python -m benchmarks.commit_flush [--statements 4000] [--batch 100]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import asyncpg

from benchmarks.common import (
    asyncpg_dsn,
    machine_description,
    percentile,
    print_json_line,
    print_table,
    run_async,
    temporary_postgres_database,
)

CASES = {
    "flush": "INSERT INTO notes (body) VALUES ($1)",
    "no flush": (
        "WITH no_flush AS (SELECT set_config('synchronous_commit', 'off', true) AS setting) "
        "INSERT INTO notes (body) SELECT $1 FROM no_flush"
    ),
}
# About the size of a short chat message.
BODY = "x" * 200


async def measure(dsn: str, statements: int, batch: int) -> dict[str, dict[str, float]]:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute("CREATE TABLE notes (id bigserial PRIMARY KEY, body text NOT NULL)")
        for sql in CASES.values():
            for _ in range(50):  # warm-up: prepare the statements, fill caches
                await connection.execute(sql, BODY)
        latencies: dict[str, list[float]] = {name: [] for name in CASES}
        for _ in range(max(1, statements // batch)):
            for name, sql in CASES.items():
                for _ in range(batch):
                    started = time.perf_counter()
                    await connection.execute(sql, BODY)
                    latencies[name].append((time.perf_counter() - started) * 1e6)
    finally:
        await connection.close()
    return {
        name: {
            "p50_us": percentile(values, 0.5),
            "p90_us": percentile(values, 0.9),
            "statements": len(values),
        }
        for name, values in latencies.items()
    }


async def main_async(arguments: argparse.Namespace) -> None:
    async with temporary_postgres_database("bench_commit_flush") as url:
        results = await measure(asyncpg_dsn(url), arguments.statements, arguments.batch)

    saved = results["flush"]["p50_us"] - results["no flush"]["p50_us"]
    print_table(
        "One-row INSERT in autocommit mode, round trip from the client",
        ["case", "p50 us", "p90 us", "statements"],
        [[name, figures["p50_us"], figures["p90_us"], figures["statements"]] for name, figures in results.items()],
    )
    print(f"\nWaiting for the flush adds {saved:.1f} us at p50.")
    figures: dict[str, Any] = {"results": results, "flush_p50_minus_no_flush_p50_us": saved}
    print_json_line("commit_flush", {"machine": machine_description(), "settings": vars(arguments), **figures})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--statements", type=int, default=4000, help="statements per case (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=100, help="statements per batch (default: %(default)s)")
    run_async(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
