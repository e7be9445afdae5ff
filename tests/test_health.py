from __future__ import annotations

from datetime import datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from pocketllm import __version__
from pocketllm.app import create_app
from pocketllm.db.engine import Database
from pocketllm.db.migrate import head_revision
from tests.conftest import make_settings


async def test_health_reports_status_timestamp_version(client: httpx.AsyncClient) -> None:
    for path in ("/health", "/v1/health"):
        response = await client.get(path, headers={"Accept": "application/json"})
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "ok"
        assert body["version"] == __version__
        assert datetime.fromisoformat(body["timestamp"]).tzinfo is not None


async def test_readiness_checks_database(client: httpx.AsyncClient) -> None:
    response = await client.get("/health/ready")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "schema": "ok", "worker": "off"}}


async def test_readiness_fails_without_migrations(tmp_path: Path) -> None:
    # MIGRATE_ON_START=false on a new database: the server starts, but no request could work.
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}", tmp_path / "data")
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/health/ready")

    assert response.status_code == 503
    assert response.json()["checks"]["schema"] == "not_migrated"
    assert response.json()["checks"]["database"] == "ok"


@pytest.mark.postgres_only
async def test_readiness_fails_on_an_older_schema(database_url: str, tmp_path: Path, database: Database) -> None:
    async with database.transaction() as session:
        await session.execute(text("UPDATE alembic_version SET version_num = '0001'"))
    try:
        app = create_app(make_settings(database_url, tmp_path / "data"))
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            response = await c.get("/health/ready")
    finally:
        async with database.transaction() as session:
            await session.execute(text("UPDATE alembic_version SET version_num = :head"), {"head": head_revision()})

    assert response.status_code == 503
    assert response.json()["checks"]["schema"] == "outdated"
