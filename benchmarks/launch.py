"""Start the fake upstream and PocketLLM server processes, and set up an account through the API."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
from cryptography.fernet import Fernet

from benchmarks.common import (
    REPOSITORY_ROOT,
    ProcessGroup,
    free_port,
    minimal_environment,
    temporary_postgres_database,
)
from benchmarks.upstream import MODEL

START_TIMEOUT_SECONDS = 60.0
BENCH_EMAIL = "bench@example.com"
BENCH_PASSWORD = "Bench-Password-1"  # noqa: S105  (an account in a throwaway benchmark database)
BENCH_API_KEY = "sk-bench"
ServerKind = Literal["cli", "bench"]
DatabaseKind = Literal["sqlite", "postgresql"]


def parse_databases(value: str) -> list[DatabaseKind]:
    """Parse a comma-separated list of `sqlite` and `postgresql`."""
    names = [item.strip() for item in value.split(",") if item.strip()]
    for name in names:
        if name not in ("sqlite", "postgresql"):
            raise ValueError(f"unknown database {name!r}; use sqlite, postgresql or both, comma-separated")
    return names  # type: ignore[return-value]


@contextlib.asynccontextmanager
async def database_url_for(kind: DatabaseKind, data_dir: Path, prefix: str) -> AsyncIterator[str]:
    """Yield a SQLAlchemy URL: a new SQLite file in `data_dir`, or a new PostgreSQL database that is dropped after."""
    if kind == "sqlite":
        yield f"sqlite+aiosqlite:///{data_dir / 'pocketllm.db'}"
        return
    async with temporary_postgres_database(prefix) as url:
        yield url


def server_environment(data_dir: Path, database_url: str, *, run_worker: bool = False, **extra: str) -> dict[str, str]:
    """Settings for the server under test: explicit secrets, no rate limits or invite codes, private URLs allowed."""
    return minimal_environment(
        DATA_DIR=str(data_dir),
        DATABASE_URL=database_url,
        JWT_SECRET="bench-jwt-secret-" + uuid.uuid4().hex,
        ENCRYPTION_KEY=Fernet.generate_key().decode(),
        RATE_LIMIT_ENABLED="false",
        INVITE_CODE="false",
        ALLOW_PRIVATE_PROVIDER_URLS="true",
        LOG_LEVEL="WARNING",
        RUN_WORKER="true" if run_worker else "false",
        **extra,
    )


async def wait_until_healthy(url: str, process: Any, timeout: float = START_TIMEOUT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(trust_env=False) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{url} exited with status {process.returncode} before it responded")
            with contextlib.suppress(httpx.TransportError):
                response = await client.get(url, timeout=2.0)
                if response.status_code == 200:
                    return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not respond with status 200 within {timeout:.0f} s")


@dataclass
class Upstream:
    port: int
    pid: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def configure(self, *, chunks: int | None = None, hold_seconds: float | None = None) -> None:
        settings: dict[str, Any] = {}
        if chunks is not None:
            settings["chunks"] = chunks
        if hold_seconds is not None:
            settings["hold_seconds"] = hold_seconds
        async with httpx.AsyncClient(trust_env=False) as client:
            (await client.post(f"{self.base_url}/bench/config", json=settings)).raise_for_status()

    async def release(self) -> int:
        async with httpx.AsyncClient(trust_env=False) as client:
            response = await client.post(f"{self.base_url}/bench/release")
            response.raise_for_status()
            released: int = response.json()["released"]
            return released


async def start_upstream(processes: ProcessGroup, scratch: Path, cores: set[int]) -> Upstream:
    port = free_port()
    process = processes.start(
        "upstream",
        [sys.executable, "-m", "benchmarks.upstream", "--port", str(port)],
        environment=minimal_environment(),
        cwd=REPOSITORY_ROOT,
        cores=cores,
        log_path=scratch / "upstream.log",
    )
    await wait_until_healthy(f"http://127.0.0.1:{port}/ping", process)
    return Upstream(port=port, pid=process.pid)


@dataclass
class Server:
    port: int
    pid: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start_server(
    processes: ProcessGroup,
    *,
    kind: ServerKind,
    environment: dict[str, str],
    data_dir: Path,
    cores: set[int],
    name: str = "server",
) -> Server:
    """Start one API process: `pocketllm serve --no-worker` (kind "cli") or the launcher with bench routes."""
    port = free_port()
    if kind == "cli":
        executable = Path(sys.executable).with_name("pocketllm")
        command = [str(executable), "serve", "--host", "127.0.0.1", "--port", str(port), "--no-worker"]
    else:
        command = [sys.executable, "-m", "benchmarks.bench_server", "--port", str(port)]
    log_path = data_dir / f"{name}.log"
    # The data directory is the working directory, so no .env file of the repository is read.
    process = processes.start(name, command, environment=environment, cwd=data_dir, cores=cores, log_path=log_path)
    try:
        await wait_until_healthy(f"http://127.0.0.1:{port}/health", process)
    except (RuntimeError, TimeoutError):
        print(log_path.read_text(errors="replace")[-4000:], file=sys.stderr)
        raise
    return Server(port=port, pid=process.pid, log_path=log_path)


@dataclass
class Account:
    """A signed-up user with the fake upstream active as `openai`, one imported model and some chats."""

    token: str
    user_id: str
    model_config_id: str
    chat_ids: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _checked(response: httpx.Response) -> Any:
    if response.status_code != 200:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path} failed with status {response.status_code}: "
            f"{response.text[:500]}"
        )
    return response.json()


async def set_up_account(server: Server, upstream: Upstream, *, chats: int = 1, email: str = BENCH_EMAIL) -> Account:
    async with httpx.AsyncClient(base_url=server.base_url, trust_env=False, timeout=60.0) as client:
        signup = _checked(await client.post("/v1/auth/signup", json={"email": email, "password": BENCH_PASSWORD}))
        headers = {"Authorization": f"Bearer {signup['tokens']['access_token']}"}
        _checked(
            await client.post(
                "/v1/providers/activate",
                headers=headers,
                json={
                    "provider": "openai",
                    "api_key": BENCH_API_KEY,
                    "base_url": f"{upstream.base_url}/v1",
                    "verify": False,
                },
            )
        )
        imported = _checked(
            await client.post(
                "/v1/models/import", headers=headers, json={"provider": "openai", "models": [MODEL], "sync": False}
            )
        )
        account = Account(
            token=signup["tokens"]["access_token"], user_id=signup["user"]["id"], model_config_id=imported[0]["id"]
        )
        for index in range(chats):
            chat = _checked(await client.post("/v1/chats", headers=headers, json={"title": f"Benchmark chat {index}"}))
            account.chat_ids.append(chat["id"])
        return account


async def bench_json(server: Server, path: str, method: str = "GET") -> Any:
    async with httpx.AsyncClient(base_url=server.base_url, trust_env=False, timeout=10.0) as client:
        return _checked(await client.request(method, path))
