"""Serve the app like `pocketllm serve --no-worker`, plus benchmark-only routes. Benchmark code, not product code.

Routes added to the app from `create_app(settings)`:

* `GET /bench/pool`: the SQLAlchemy pool of the app's engine: `checked_out` (connections in use now), the
  peaks `max_checked_out` and `max_request_checked_out` since the last `POST /bench/pool/reset`, and the
  pool's own status line. Request counts leave out connections taken by the app's background tasks (the
  mail sender polls its outbox), which are recognised by their asyncio task names.
* `GET /bench/db-time`: `statements` and `seconds` summed over every statement this process ran, timed from
  SQLAlchemy's before_cursor_execute to after_cursor_execute event. That span covers the driver's round
  trip and, with both drivers used here, fetching all rows. It leaves out BEGIN and COMMIT on PostgreSQL
  (asyncpg sends them outside cursors), ORM object loading and pool checkout. On SQLite the BEGIN that
  the app sends as a statement is included.

Settings come from the environment, as for `pocketllm serve`. Run:
`python -m benchmarks.bench_server --port PORT`.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.pool import Pool

from benchmarks.common import raise_file_limit
from pocketllm.app import create_app
from pocketllm.cli import graceful_shutdown_seconds
from pocketllm.config import load_settings
from pocketllm.db.engine import create_engine
from pocketllm.db.migrate import upgrade_database
from pocketllm.kit.collector import tune_garbage_collector
from pocketllm.kit.memory import use_system_allocator


class StatementClock:
    """Sums statement time over every Engine in the process (the app has one)."""

    def __init__(self) -> None:
        self.statements = 0
        self.seconds = 0.0

    def install(self) -> None:
        event.listen(Engine, "before_cursor_execute", self._before)
        event.listen(Engine, "after_cursor_execute", self._after)

    def _before(self, connection: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        connection.info.setdefault("bench_started", []).append(time.perf_counter())

    def _after(self, connection: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        started = connection.info["bench_started"].pop()
        self.seconds += time.perf_counter() - started
        self.statements += 1


# Tasks the app runs in the background; their short polls of the database are not request work.
BACKGROUND_TASK_NAMES = frozenset({"mail-sender", "job-worker", "job-scheduler"})


class PoolWatch:
    """Tracks checked-out connections by the asyncio task that took them, from the pool's checkout and checkin
    events, and the peak held by request work (any task but the app's named background tasks)."""

    def __init__(self) -> None:
        self._holders: dict[int, str] = {}
        self.max_checked_out = 0
        self.max_request_checked_out = 0

    def install(self) -> None:
        event.listen(Pool, "checkout", self._on_checkout)
        event.listen(Pool, "checkin", self._on_checkin)

    def request_checked_out(self) -> int:
        return sum(1 for name in self._holders.values() if name not in BACKGROUND_TASK_NAMES)

    def reset_peaks(self) -> None:
        self.max_checked_out = len(self._holders)
        self.max_request_checked_out = self.request_checked_out()

    def _on_checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        task = asyncio.current_task()
        self._holders[id(record)] = task.get_name() if task is not None else "(no task)"
        self.max_checked_out = max(self.max_checked_out, len(self._holders))
        self.max_request_checked_out = max(self.max_request_checked_out, self.request_checked_out())

    def _on_checkin(self, dbapi_connection: Any, record: Any) -> None:
        self._holders.pop(id(record), None)


def add_bench_routes(app: FastAPI, clock: StatementClock, watch: PoolWatch) -> None:
    async def pool(request: Request) -> dict[str, Any]:
        engine = request.app.state.database.engine
        pool_object = engine.sync_engine.pool
        return {
            "dialect": engine.dialect.name,
            "pool_class": type(pool_object).__name__,
            "checked_out": pool_object.checkedout(),
            "request_checked_out": watch.request_checked_out(),
            "max_checked_out": watch.max_checked_out,
            "max_request_checked_out": watch.max_request_checked_out,
            "status": pool_object.status(),
        }

    async def reset_pool_peaks(request: Request) -> dict[str, Any]:
        watch.reset_peaks()
        return await pool(request)

    async def db_time() -> dict[str, Any]:
        return {"statements": clock.statements, "seconds": clock.seconds}

    app.add_api_route("/bench/pool", pool, methods=["GET"], include_in_schema=False)
    app.add_api_route("/bench/pool/reset", reset_pool_peaks, methods=["POST"], include_in_schema=False)
    app.add_api_route("/bench/db-time", db_time, methods=["GET"], include_in_schema=False)


async def _migrate(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await upgrade_database(engine)
    finally:
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1 to listen on")

    arguments = parser.parse_args()
    settings = load_settings()
    # As `pocketllm serve` does on PostgreSQL: run again on glibc's allocator, so that the memory trimmer can
    # give memory back.
    if not settings.is_sqlite:
        use_system_allocator()
    raise_file_limit()

    # As `pocketllm serve` does: migrate before serving, so that the lifespan has nothing to do.
    if settings.migrate_on_start:
        asyncio.run(_migrate(settings.effective_database_url))
    settings = settings.model_copy(update={"migrate_on_start": False})

    clock = StatementClock()
    clock.install()
    watch = PoolWatch()
    watch.install()
    app = create_app(settings)
    add_bench_routes(app, clock, watch)
    # As create_app_from_environment does for `pocketllm serve`.
    tune_garbage_collector()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=arguments.port,
        log_config=None,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=graceful_shutdown_seconds(settings),
    )


if __name__ == "__main__":
    main()
