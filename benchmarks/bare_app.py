"""A bare ASGI app that runs the read queries of three API routes with the raw driver: the floor for read_throughput.

No framework, no authentication, no ORM and no validation: each route runs the SQL that the product's
route runs for its data and returns the rows as JSON. The caller names the user with `?user=<uuid>`.

* `GET /chats`: the chat list query of `GET /v1/chats` (newest first, limit 100).
* `GET /models/saved`: the model configurations joined with their providers' base URLs, as in `GET /v1/models/saved`.
* `GET /users/profile`: the user and profile join of `GET /v1/users/profile`.

BARE_DATABASE_URL names the database as a SQLAlchemy URL (postgresql+asyncpg://... or sqlite+aiosqlite:///...).
PostgreSQL uses an asyncpg pool of 10 connections, the size of the product's default pool. SQLite uses one
aiosqlite connection. Run: `python -m benchmarks.bare_app --port PORT`, served by uvicorn with the options of
`pocketllm serve`.
"""

from __future__ import annotations

import argparse
import json
import os
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import aiosqlite
import asyncpg
import uvicorn

from benchmarks.common import raise_file_limit

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

POOL_SIZE = 10
QUERIES = {
    "/chats": [
        "SELECT id, title, model_config_id, created_at, updated_at, last_sequence FROM chats "
        "WHERE user_id = {0} ORDER BY updated_at DESC, id DESC LIMIT 100 OFFSET 0"
    ],
    "/models/saved": [
        "SELECT model_configs.*, provider_configs.base_url FROM model_configs "
        "LEFT OUTER JOIN provider_configs ON provider_configs.id = model_configs.provider_config_id "
        "AND provider_configs.user_id = model_configs.user_id "
        "WHERE model_configs.user_id = {0} ORDER BY model_configs.created_at, model_configs.id"
    ],
    "/users/profile": ["SELECT * FROM users JOIN profiles ON profiles.id = users.id WHERE users.id = {0}"],
}


class Backend:
    async def start(self) -> None: ...

    async def fetch(self, statements: list[str], user_id: uuid.UUID) -> list[list[dict[str, Any]]]:
        raise NotImplementedError

    async def stop(self) -> None: ...


class PostgresBackend(Backend):
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(self._dsn, min_size=POOL_SIZE, max_size=POOL_SIZE)

    async def fetch(self, statements: list[str], user_id: uuid.UUID) -> list[list[dict[str, Any]]]:
        assert self._pool is not None
        results = []
        async with self._pool.acquire() as connection:
            for statement in statements:
                rows = await connection.fetch(statement.format("$1"), user_id)
                results.append([dict(row) for row in rows])
        return results

    async def stop(self) -> None:
        if self._pool is not None:
            await self._pool.close()


class SqliteBackend(Backend):
    def __init__(self, path: str) -> None:
        self._path = path
        self._connection: aiosqlite.Connection | None = None

    async def start(self) -> None:
        self._connection = await aiosqlite.connect(self._path)
        self._connection.row_factory = aiosqlite.Row

    async def fetch(self, statements: list[str], user_id: uuid.UUID) -> list[list[dict[str, Any]]]:
        assert self._connection is not None
        results = []
        for statement in statements:
            # SQLAlchemy's Uuid type stores UUIDs on SQLite as 32 hexadecimal digits.
            async with self._connection.execute(statement.format("?"), (user_id.hex,)) as cursor:
                results.append([dict(row) for row in await cursor.fetchall()])
        return results

    async def stop(self) -> None:
        if self._connection is not None:
            await self._connection.close()


def build_backend(database_url: str) -> Backend:
    if database_url.startswith("postgresql+asyncpg://"):
        return PostgresBackend(database_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    if database_url.startswith("sqlite+aiosqlite:///"):
        return SqliteBackend(database_url.removeprefix("sqlite+aiosqlite:///"))
    raise ValueError(
        f"BARE_DATABASE_URL must be postgresql+asyncpg://... or sqlite+aiosqlite:///..., got {database_url!r}"
    )


async def _respond(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BareApp:
    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        statements = QUERIES.get(scope["path"])
        if scope["path"] == "/health":
            await _respond(send, 200, b'{"status":"ok"}')
            return
        if statements is None:
            await _respond(send, 404, b'{"detail":"not found"}')
            return
        raw_user = parse_qs(scope["query_string"].decode()).get("user", [""])[0]
        try:
            user_id = uuid.UUID(raw_user)
        except ValueError:
            await _respond(send, 400, b'{"detail":"the user query parameter must be a UUID"}')
            return
        results = await self._backend.fetch(statements, user_id)
        payload = results[0] if len(results) == 1 else results
        await _respond(send, 200, json.dumps(payload, default=str, separators=(",", ":")).encode())

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._backend.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self._backend.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1 to listen on")

    arguments = parser.parse_args()
    raise_file_limit()
    database_url = os.environ.get("BARE_DATABASE_URL")
    if not database_url:
        parser.error("BARE_DATABASE_URL is not set; set it to the database's SQLAlchemy URL")
    app = BareApp(build_backend(database_url))
    uvicorn.run(app, host="127.0.0.1", port=arguments.port, log_config=None, proxy_headers=False, server_header=False)


if __name__ == "__main__":
    main()
