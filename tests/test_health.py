from __future__ import annotations

from datetime import datetime

import httpx

from pocketllm import __version__


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
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "worker": "off"}}
