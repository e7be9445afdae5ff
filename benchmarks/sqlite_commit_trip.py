"""Measure what a trip of its own for COMMIT costs an SQLite write transaction of the server.

A reply on SQLite runs two write transactions, and each runs its statements in one call on aiosqlite's
thread (`run_in_one_trip` in src/pocketllm/db/driver_query.py). This script runs the same transaction,
one UPDATE ... RETURNING in `Database.statements()`, in alternating batches from this process, on a new
SQLite file in a temporary directory:

* `commit trip`: the block's COMMIT is a second trip to the thread;
* `commit in the statements' trip`: `run_in_one_trip(..., commit=True)`, as the reply path runs it.

The figures are the block's wall time p50 and this process's CPU time (user plus system, from getrusage)
per block. Run on uvloop, as the server does.

    python -m benchmarks.sqlite_commit_trip [--blocks 3000] [--batch 100]
"""

from __future__ import annotations

import argparse
import resource
import time
from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, bindparam, insert, update

from benchmarks.common import (
    machine_description,
    percentile,
    print_json_line,
    print_table,
    run_async,
    scratch_directory,
)
from pocketllm.db.driver_query import DriverQuery, OneTripSteps, run_in_one_trip
from pocketllm.db.engine import Database, create_engine

_METADATA = MetaData()
_NOTES = Table("notes", _METADATA, Column("id", Integer, primary_key=True), Column("body", String))
_EDIT = DriverQuery(
    update(_NOTES).where(_NOTES.c.id == bindparam("p_id")).values(body=bindparam("p_body")).returning(_NOTES.c.id),
    writes=True,
)
CASES = {"commit trip": False, "commit in the statements' trip": True}
ROWS = 10


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_block(database: Database, note_id: int, *, commit: bool) -> None:
    def edit(steps: OneTripSteps) -> Any:
        return steps.first(_EDIT, {"p_id": note_id, "p_body": "edited"})

    async with database.statements() as connection:
        await run_in_one_trip(connection, edit, writes=True, commit=commit)


async def measure(database: Database, blocks: int, batch: int) -> dict[str, dict[str, float]]:
    async with database.engine.begin() as connection:
        await connection.run_sync(_METADATA.create_all)
        await connection.execute(insert(_NOTES), [{"id": number, "body": "note"} for number in range(1, ROWS + 1)])
    for commit in CASES.values():
        for number in range(50):  # warm-up: compile the statement, fill caches
            await run_block(database, 1 + number % ROWS, commit=commit)
    latencies: dict[str, list[float]] = {name: [] for name in CASES}
    cpu = dict.fromkeys(CASES, 0.0)
    for _ in range(max(1, blocks // batch)):
        for name, commit in CASES.items():
            started_cpu = process_cpu_seconds()
            for number in range(batch):
                started = time.perf_counter()
                await run_block(database, 1 + number % ROWS, commit=commit)
                latencies[name].append((time.perf_counter() - started) * 1e6)
            cpu[name] += process_cpu_seconds() - started_cpu
    return {
        name: {
            "p50_us": percentile(values, 0.5),
            "cpu_us_per_block": cpu[name] / len(values) * 1e6,
            "blocks": len(values),
        }
        for name, values in latencies.items()
    }


async def main_async(arguments: argparse.Namespace) -> None:
    with scratch_directory("bench-sqlite-commit-trip-") as scratch:
        database = Database(create_engine(f"sqlite+aiosqlite:///{scratch / 'bench.sqlite3'}"))
        try:
            results = await measure(database, arguments.blocks, arguments.batch)
        finally:
            await database.dispose()

    print_table(
        "One UPDATE in Database.statements() on SQLite, this process's figures per block",
        ["case", "p50 us", "CPU us/block", "blocks"],
        [
            [name, figures["p50_us"], figures["cpu_us_per_block"], figures["blocks"]]
            for name, figures in results.items()
        ],
    )
    print_json_line(
        "sqlite_commit_trip", {"machine": machine_description(), "settings": vars(arguments), "results": results}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=3000, help="transaction blocks per case (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=100, help="blocks per batch (default: %(default)s)")
    run_async(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
