"""The `pocketllm` command, run as a real subprocess against the test databases."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from pocketllm.cli import graceful_shutdown_seconds
from pocketllm.db.engine import Database
from pocketllm.db.migrate import head_revision
from pocketllm.kit.memory import can_trim
from pocketllm.referrals.service import normalize_code
from tests.conftest import make_settings
from tests.helpers import DEFAULT_PASSWORD


def run_cli(
    *arguments: str, database_url: str, data_dir: Path, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "JWT_", "INVITE_", "ENCRYPTION_"))
    }
    environment.update(
        {"DATABASE_URL": database_url, "DATA_DIR": str(data_dir), "LOG_LEVEL": "WARNING", **(extra or {})}
    )
    return subprocess.run(  # noqa: S603  (fixed interpreter and arguments)
        [sys.executable, "-m", "pocketllm", *arguments],
        capture_output=True,
        text=True,
        env=environment,
        cwd=data_dir.parent,
        timeout=60,
        check=False,
    )


async def run_cli_in_thread(
    *arguments: str, database_url: str, data_dir: Path, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the command in a thread, so the app in this test's event loop keeps running.

    A blocked loop cannot finish a transaction that holds the SQLite write lock, and the command then
    fails with "database is locked" once its busy timeout has passed.
    """
    return await asyncio.to_thread(run_cli, *arguments, database_url=database_url, data_dir=data_dir, extra=extra)


def test_help_lists_commands(tmp_path: Path) -> None:
    result = run_cli("--help", database_url="sqlite+aiosqlite://", data_dir=tmp_path / "data")

    assert result.returncode == 0
    for command in ("serve", "worker", "migrate", "invites", "waitlist", "keys"):
        assert command in result.stdout


def test_serve_help_documents_options(tmp_path: Path) -> None:
    result = run_cli("serve", "--help", database_url="sqlite+aiosqlite://", data_dir=tmp_path / "data")

    assert result.returncode == 0
    for option in ("--host", "--port", "--workers"):
        assert option in result.stdout


@pytest.mark.parametrize(("configured", "expected"), [(0.0, 0), (0.5, 1), (30.0, 30), (30.2, 31)])
def test_shutdown_grace_rounds_up(tmp_path: Path, configured: float, expected: int) -> None:
    settings = make_settings("sqlite+aiosqlite://", tmp_path, shutdown_grace_seconds=configured)

    assert graceful_shutdown_seconds(settings) == expected


def test_keys_generate_prints_fernet_key(tmp_path: Path) -> None:
    from cryptography.fernet import Fernet

    result = run_cli("keys", "generate", database_url="sqlite+aiosqlite://", data_dir=tmp_path / "data")

    assert result.returncode == 0
    Fernet(result.stdout.strip().encode())


@pytest.mark.parametrize("settings_overrides", [{"invite_code": True}])
async def test_created_invite_lets_one_user_sign_up(
    client: httpx.AsyncClient, database_url: str, tmp_path: Path
) -> None:
    created = await run_cli_in_thread(
        "invites", "create", "--max-uses", "1", "--expires-in-days", "2", database_url=database_url, data_dir=tmp_path
    )
    assert created.returncode == 0, created.stderr
    code = created.stdout.strip()
    assert re.fullmatch(r"[A-Z0-9]{4}-[A-Z0-9]{4}-[A-Z0-9]{4}", code)

    first = await client.post(
        "/v1/auth/signup", json={"email": "one@example.com", "password": DEFAULT_PASSWORD, "invite_code": code}
    )
    second = await client.post(
        "/v1/auth/signup", json={"email": "two@example.com", "password": DEFAULT_PASSWORD, "invite_code": code}
    )

    assert first.status_code == 200
    assert second.status_code == 403
    listed = await run_cli_in_thread("invites", "list", database_url=database_url, data_dir=tmp_path)
    line = next(line for line in listed.stdout.splitlines() if line.startswith(code))
    assert "exhausted" in line
    assert "1/1" in line


def test_create_with_own_code_rejects_duplicates(database_url: str, tmp_path: Path) -> None:
    first = run_cli("invites", "create", "--code", "team-2026", database_url=database_url, data_dir=tmp_path)
    second = run_cli("invites", "create", "--code", "TEAM-2026", database_url=database_url, data_dir=tmp_path)

    assert first.stdout.strip() == normalize_code("team-2026")
    assert second.returncode == 2
    assert "already exists" in second.stderr


@pytest.mark.parametrize("arguments", [("--max-uses", "0"), ("--expires-in-days", "-1"), ("--code", "abc")])
def test_create_rejects_bad_options(database_url: str, tmp_path: Path, arguments: tuple[str, str]) -> None:
    result = run_cli("invites", "create", *arguments, database_url=database_url, data_dir=tmp_path)

    assert result.returncode == 2
    assert arguments[0] in result.stderr


@pytest.mark.parametrize("settings_overrides", [{"invite_code": True}])
async def test_waitlist_approve_allows_sign_up(client: httpx.AsyncClient, database_url: str, tmp_path: Path) -> None:
    blocked = await client.post("/v1/auth/signup", json={"email": "grace@example.com", "password": DEFAULT_PASSWORD})
    assert blocked.status_code == 403

    approved = await run_cli_in_thread(
        "waitlist", "approve", "Grace@Example.com", database_url=database_url, data_dir=tmp_path
    )
    assert approved.returncode == 0, approved.stderr
    assert "grace@example.com" in approved.stdout

    allowed = await client.post("/v1/auth/signup", json={"email": "grace@example.com", "password": DEFAULT_PASSWORD})
    assert allowed.status_code == 200


def test_waitlist_approve_rejects_bad_email(database_url: str, tmp_path: Path) -> None:
    result = run_cli("waitlist", "approve", "not-an-email", database_url=database_url, data_dir=tmp_path)

    assert result.returncode == 2
    assert "not valid" in result.stderr


def test_migrate_builds_fresh_sqlite_database(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"

    migrated = run_cli("migrate", database_url=url, data_dir=data_dir)
    shown = run_cli("migrate", "--show", database_url=url, data_dir=data_dir)

    assert migrated.returncode == 0, migrated.stderr
    current = re.search(r"current: (\S+)", shown.stdout)
    latest = re.search(r"latest:\s+(\S+)", shown.stdout)
    assert current is not None
    assert latest is not None
    assert current.group(1) == latest.group(1)


def test_migrate_to_passed_revision_changes_nothing(database_url: str, tmp_path: Path) -> None:
    result = run_cli("migrate", "--revision", "0008", database_url=database_url, data_dir=tmp_path / "data")

    assert result.returncode == 0, result.stderr
    assert f"database is at revision {head_revision()}" in result.stdout
    assert "unchanged: migrate only upgrades" in result.stdout


def test_migrate_to_unknown_revision_fails(database_url: str, tmp_path: Path) -> None:
    result = run_cli("migrate", "--revision", "0042", database_url=database_url, data_dir=tmp_path / "data")

    assert result.returncode == 2
    assert "cannot migrate to revision '0042'" in result.stderr
    assert "Traceback" not in result.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def running_server(*arguments: str, environment: dict[str, str], cwd: Path) -> Iterator[str]:
    """Start `pocketllm serve` on a free loopback port; yield its base URL once /health answers."""
    with serve_process(*arguments, environment=environment, cwd=cwd) as (base_url, _):
        yield base_url


@contextmanager
def serve_process(
    *arguments: str, environment: dict[str, str], cwd: Path
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Start `pocketllm serve` like `running_server`; yield its base URL and process once /health responds."""
    port = free_port()
    process = subprocess.Popen(  # noqa: S603  (fixed interpreter and arguments)
        [sys.executable, "-m", "pocketllm", "serve", "--host", "127.0.0.1", "--port", str(port), *arguments],
        env=environment,
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"server exited with {process.returncode}: {process.stderr.read() if process.stderr else ''}"
                )
            try:
                if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server did not answer /health within 30 s")
            time.sleep(0.1)
        yield base_url, process
    finally:
        process.terminate()
        process.wait(timeout=15)


def serve_environment(**values: str) -> dict[str, str]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DATABASE_", "JWT_", "INVITE_", "ENCRYPTION_", "DATA_DIR", "ENVIRONMENT"))
    }
    environment.update({"LOG_LEVEL": "WARNING", **values})
    return environment


def test_serve_embedded_default_keeps_secrets_across_restarts(tmp_path: Path) -> None:
    environment = serve_environment(INVITE_CODE="false")

    with running_server(environment=environment, cwd=tmp_path) as base_url:
        signup = httpx.post(
            f"{base_url}/v1/auth/signup", json={"email": "ada@example.com", "password": DEFAULT_PASSWORD}, timeout=10
        )
        assert signup.status_code == 200, signup.text
        token = signup.json()["tokens"]["access_token"]

    assert (tmp_path / "pocketllm-data" / "pocketllm.db").is_file()
    assert (tmp_path / "pocketllm-data" / "jwt_secret").stat().st_mode & 0o077 == 0

    with running_server(environment=environment, cwd=tmp_path) as base_url:
        profile = httpx.get(f"{base_url}/v1/users/profile", headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert profile.status_code == 200, profile.text


def process_environment(pid: int) -> dict[str, str]:
    """Return the environment that process `pid` was started (or last exec'd) with, from /proc."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


@pytest.mark.postgres_only
@pytest.mark.skipif(not can_trim(), reason="needs glibc's malloc_trim")
def test_serve_restarts_on_system_allocator(database_url: str, tmp_path: Path) -> None:
    environment = serve_environment(DATABASE_URL=database_url, DATA_DIR=str(tmp_path / "data"))
    environment.pop("PYTHONMALLOC", None)

    with serve_process(environment=environment, cwd=tmp_path) as (base_url, process):
        # The process that responds is the one started, after it ran its command line again.
        server_environment = process_environment(process.pid)
        health = httpx.get(f"{base_url}/health", timeout=10)

    assert server_environment.get("PYTHONMALLOC") == "malloc"
    assert health.status_code == 200


@pytest.mark.postgres_only
def test_serve_keeps_operator_allocator(database_url: str, tmp_path: Path) -> None:
    environment = serve_environment(DATABASE_URL=database_url, DATA_DIR=str(tmp_path / "data"), PYTHONMALLOC="pymalloc")

    with serve_process(environment=environment, cwd=tmp_path) as (_, process):
        server_environment = process_environment(process.pid)

    assert server_environment.get("PYTHONMALLOC") == "pymalloc"


def test_serve_on_sqlite_keeps_allocator(tmp_path: Path) -> None:
    environment = serve_environment()
    environment.pop("PYTHONMALLOC", None)

    with serve_process(environment=environment, cwd=tmp_path) as (_, process):
        server_environment = process_environment(process.pid)

    assert "PYTHONMALLOC" not in server_environment


@pytest.mark.parametrize(("arguments", "worker"), [((), "running"), (("--no-worker",), "off")])
def test_serve_worker_flag(tmp_path: Path, arguments: tuple[str, ...], worker: str) -> None:
    with running_server(*arguments, environment=serve_environment(), cwd=tmp_path) as base_url:
        ready = httpx.get(f"{base_url}/health/ready", timeout=10)

    assert ready.json()["checks"] == {"database": "ok", "schema": "ok", "worker": worker}


def test_worker_refuses_zero_concurrency(tmp_path: Path) -> None:
    result = run_cli(
        "worker",
        "--concurrency",
        "0",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'x.db'}",
        data_dir=tmp_path / "data",
    )

    assert result.returncode == 2
    assert "--concurrency" in result.stderr


def test_serve_refuses_several_workers_on_sqlite(tmp_path: Path) -> None:
    result = run_cli(
        "serve", "--workers", "2", database_url=f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", data_dir=tmp_path
    )

    assert result.returncode == 2
    assert "PostgreSQL" in result.stderr


@pytest.mark.postgres_only
def test_serve_with_workers_on_postgres(database_url: str, tmp_path: Path) -> None:
    environment = serve_environment(DATABASE_URL=database_url, DATA_DIR=str(tmp_path / "data"), INVITE_CODE="false")

    with running_server("--workers", "2", environment=environment, cwd=tmp_path) as base_url:
        statuses = [
            httpx.post(
                f"{base_url}/v1/auth/signup",
                json={"email": f"worker-{index}@example.com", "password": DEFAULT_PASSWORD},
                timeout=10,
            ).status_code
            for index in range(4)
        ]
        ready = httpx.get(f"{base_url}/health/ready", timeout=10)

    assert statuses == [200, 200, 200, 200]
    assert ready.json()["checks"]["database"] == "ok"


async def test_keys_rotate_reencrypts_under_primary(database_url: str, tmp_path: Path, database: Database) -> None:
    from cryptography.fernet import Fernet
    from sqlalchemy import select

    from pocketllm.kit.crypto import SecretBox, SecretDecryptionFailed
    from pocketllm.models import ProviderConfig, User

    old_key, new_key = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    async with database.transaction() as session:
        user = User(email="keys@example.com")
        session.add(user)
        await session.flush()
        session.add(
            ProviderConfig(
                user_id=user.id, provider="openai", api_key_encrypted=SecretBox([old_key]).encrypt("sk-rotate-me")
            )
        )

    environment_key = f"{new_key},{old_key}"
    result = await run_cli_in_thread(
        "keys", "rotate", database_url=database_url, data_dir=tmp_path, extra={"ENCRYPTION_KEY": environment_key}
    )

    assert result.returncode == 0, result.stderr
    assert "re-encrypted 1" in result.stdout
    async with database.transaction() as session:
        token = await session.scalar(select(ProviderConfig.api_key_encrypted))
    assert token is not None
    assert SecretBox([new_key]).decrypt(token) == "sk-rotate-me"
    with pytest.raises(SecretDecryptionFailed):
        SecretBox([old_key]).decrypt(token)


async def test_keys_rotate_reports_unreadable_keys(database_url: str, tmp_path: Path, database: Database) -> None:
    from cryptography.fernet import Fernet

    from pocketllm.kit.crypto import SecretBox
    from pocketllm.models import ProviderConfig, User

    async with database.transaction() as session:
        user = User(email="lost@example.com")
        session.add(user)
        await session.flush()
        session.add(
            ProviderConfig(
                user_id=user.id,
                provider="groq",
                api_key_encrypted=SecretBox([Fernet.generate_key().decode()]).encrypt("sk-lost"),
            )
        )

    result = await run_cli_in_thread(
        "keys",
        "rotate",
        database_url=database_url,
        data_dir=tmp_path,
        extra={"ENCRYPTION_KEY": Fernet.generate_key().decode()},
    )

    assert result.returncode == 1
    assert "groq" in result.stderr
    assert "sk-lost" not in result.stderr + result.stdout


@pytest.mark.parametrize("command", ["migrate", "serve", "worker"])
def test_unreachable_database_is_one_line(command: str, tmp_path: Path) -> None:
    # Nothing listens on port 1, so the connection is refused at once.
    database_url = "postgresql+asyncpg://app:hunter2-password@127.0.0.1:1/pocketllm"
    arguments = [command, "--port", "1"] if command == "serve" else [command]

    result = run_cli(*arguments, database_url=database_url, data_dir=tmp_path / "data")

    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("pocketllm: the database in DATABASE_URL cannot be used: ")
    assert "Connect call failed" in result.stderr
    assert "Traceback" not in result.stderr
    assert "hunter2-password" not in result.stderr


@pytest.mark.postgres_only
def test_missing_database_is_one_line(database_url: str, tmp_path: Path) -> None:
    missing = make_url(database_url).set(database=f"missing_{uuid.uuid4().hex}")

    result = run_cli("migrate", database_url=missing.render_as_string(hide_password=False), data_dir=tmp_path / "data")

    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("pocketllm: the database in DATABASE_URL cannot be used: ")
    assert f'database "{missing.database}" does not exist' in result.stderr
    assert "Traceback" not in result.stderr


def test_uncreatable_sqlite_file_is_one_line(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")

    result = run_cli("migrate", database_url=f"sqlite+aiosqlite:///{not_a_folder / 'x.db'}", data_dir=tmp_path / "data")

    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("pocketllm: the database in DATABASE_URL cannot be used: cannot create the SQLite")
    assert "Traceback" not in result.stderr
