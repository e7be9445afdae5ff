"""`pocketllm waitlist list`, `approve` and `reject`, run as real subprocesses against the test databases."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from pocketllm.db.engine import Database
from pocketllm.models import WaitlistApplication
from tests.test_cli import run_cli, run_cli_in_thread


async def status_of(database: Database, email: str) -> str | None:
    async with database.read_only() as session:
        application = await session.scalar(select(WaitlistApplication).where(WaitlistApplication.email == email))
    return application.status if application else None


async def test_waitlist_list_approve_reject(
    client: httpx.AsyncClient, database: Database, database_url: str, tmp_path: Path
) -> None:
    for email in ("ada@example.com", "grace@example.com"):
        response = await client.post("/v1/waitlist", json={"email": email, "name": "Applicant", "source": "app_auth"})
        assert response.status_code == 201, response.text

    listed = await run_cli_in_thread("waitlist", "list", database_url=database_url, data_dir=tmp_path)
    approved = await run_cli_in_thread(
        "waitlist", "approve", "ADA@example.com", database_url=database_url, data_dir=tmp_path
    )
    only_approved = await run_cli_in_thread(
        "waitlist", "list", "--status", "approved", database_url=database_url, data_dir=tmp_path
    )
    rejected = await run_cli_in_thread(
        "waitlist", "reject", " Grace@Example.com", database_url=database_url, data_dir=tmp_path
    )
    only_pending = await run_cli_in_thread(
        "waitlist", "list", "--status", "pending", database_url=database_url, data_dir=tmp_path
    )

    assert listed.returncode == 0, listed.stderr
    assert "ada@example.com" in listed.stdout
    assert "grace@example.com" in listed.stdout
    assert approved.returncode == 0, approved.stderr
    assert "ada@example.com" in only_approved.stdout
    assert "grace@example.com" not in only_approved.stdout
    assert rejected.returncode == 0, rejected.stderr
    assert "rejected the application of grace@example.com" in rejected.stdout
    assert only_pending.stdout.strip() == "no pending waitlist applications"
    assert await status_of(database, "ada@example.com") == "approved"
    assert await status_of(database, "grace@example.com") == "rejected"


@pytest.mark.parametrize("settings_overrides", [{"invite_code": True}])
async def test_reject_revokes_approval(client: httpx.AsyncClient, database_url: str, tmp_path: Path) -> None:
    approved = await run_cli_in_thread(
        "waitlist", "approve", "ada@example.com", database_url=database_url, data_dir=tmp_path
    )
    rejected = await run_cli_in_thread(
        "waitlist", "reject", "ada@example.com", database_url=database_url, data_dir=tmp_path
    )

    response = await client.post("/v1/auth/signup", json={"email": "ada@example.com", "password": "Sup3rSecret!"})

    assert approved.returncode == 0, approved.stderr
    assert rejected.returncode == 0, rejected.stderr
    assert response.status_code == 403, response.text
    assert response.json()["code"] == "invite_required"


def test_reject_unknown_address_fails(database_url: str, tmp_path: Path) -> None:
    result = run_cli("waitlist", "reject", "nobody@example.com", database_url=database_url, data_dir=tmp_path)

    assert result.returncode == 2
    assert "no waitlist application for nobody@example.com" in result.stderr


def test_list_rejects_unknown_status(database_url: str, tmp_path: Path) -> None:
    result = run_cli("waitlist", "list", "--status", "archived", database_url=database_url, data_dir=tmp_path)

    assert result.returncode == 2
    assert "invalid choice" in result.stderr
