"""GET /metrics: request, provider and job metrics, the queue depth, and readiness without a database."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from pocketllm.app import create_app
from pocketllm.jobs.handlers import build_job_worker
from pocketllm.kit.metrics import QUEUE_DEPTH_UNKNOWN
from tests.conftest import make_settings
from tests.fakes.provider import VALID_API_KEY, FakeProvider
from tests.helpers import auth_headers, sign_up
from tests.test_logging import capture_log_output, parse_lines

REQUESTS = "pocketllm_http_request_duration_seconds"
PROVIDER_CALLS = "pocketllm_provider_request_duration_seconds"
JOB_ATTEMPTS = "pocketllm_job_duration_seconds"
QUEUE_DEPTH = "pocketllm_job_queue_depth"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # The fake provider listens on 127.0.0.1, which the outbound guard blocks by default.
    return {"allow_private_provider_urls": True, "provider_read_timeout_seconds": 5.0}


@pytest.fixture
async def headers(client: httpx.AsyncClient, unique_email: str) -> dict[str, str]:
    return auth_headers(await sign_up(client, unique_email))


async def scrape(client: httpx.AsyncClient) -> str:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    return response.text


def sample(text: str, name: str, **labels: str) -> float:
    """Return the value of the sample `name` with exactly `labels`, or 0.0 when the scrape has none."""
    for family in text_string_to_metric_families(text):
        for item in family.samples:
            if item.name == name and item.labels == labels:
                return float(item.value)
    return 0.0


def label_values(text: str, name: str, label: str) -> set[str]:
    return {
        item.labels[label]
        for family in text_string_to_metric_families(text)
        for item in family.samples
        if item.name == name and label in item.labels
    }


async def activate_openai(client: httpx.AsyncClient, headers: dict[str, str], fake: FakeProvider) -> None:
    response = await client.post(
        "/v1/providers/activate",
        headers=headers,
        json={"provider": "openai", "api_key": VALID_API_KEY, "base_url": fake.openai_base_url, "verify": False},
    )
    assert response.status_code == 200, response.text


async def new_chat_with_model(client: httpx.AsyncClient, headers: dict[str, str], fake: FakeProvider) -> str:
    await activate_openai(client, headers, fake)
    imported = await client.post(
        "/v1/models/import", headers=headers, json={"provider": "openai", "models": ["gpt-4o-mini"]}
    )
    assert imported.status_code == 200, imported.text
    created = await client.post("/v1/chats", headers=headers, json={"model_config_id": imported.json()[0]["id"]})
    assert created.status_code == 200, created.text
    chat_id: str = created.json()["id"]
    return chat_id


async def send_message(
    client: httpx.AsyncClient, headers: dict[str, str], chat_id: str, *, stream: bool = False
) -> httpx.Response:
    return await client.post(
        f"/v1/chats/{chat_id}/messages", headers=headers, json={"content": "Hello!", "role": "user", "stream": stream}
    )


def closed_port() -> int:
    """Return a loopback port that nothing listens on: the OS picks a free one, and it is closed again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        port: int = listener.getsockname()[1]
    return port


class TestEndpoint:
    async def test_serves_text_format(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/metrics")

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert f"# TYPE {REQUESTS} histogram" in response.text
        assert f"# TYPE {PROVIDER_CALLS} histogram" in response.text
        assert f"# TYPE {JOB_ATTEMPTS} histogram" in response.text
        assert f"# TYPE {QUEUE_DEPTH} gauge" in response.text

    async def test_not_in_openapi(self, client: httpx.AsyncClient) -> None:
        schema = (await client.get("/openapi.json")).json()

        assert "/metrics" not in schema["paths"]

    async def test_each_app_has_own_registry(self, app: FastAPI, settings: Any) -> None:
        other = create_app(settings)

        assert other.state.metrics is not None
        assert other.state.metrics.registry is not app.state.metrics.registry


@pytest.mark.parametrize("settings_overrides", [{"metrics_enabled": False}])
async def test_disabled_metrics_are_404(client: httpx.AsyncClient, app: FastAPI) -> None:
    response = await client.get("/metrics")

    assert response.status_code == 404
    assert app.state.metrics is None


class TestRequestMetrics:
    async def test_route_template_label(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        created = await client.post("/v1/chats", headers=headers, json={})
        chat_id = created.json()["id"]
        fetched = await client.get(f"/v1/chats/{chat_id}", headers=headers)
        missing = await client.get("/v1/chats/00000000-0000-0000-0000-000000000000", headers=headers)

        text = await scrape(client)

        assert fetched.status_code == 200
        assert missing.status_code == 404
        labels = {"method": "GET", "route": "/v1/chats/{chat_id}"}
        assert sample(text, f"{REQUESTS}_count", **labels, status="200") == 1
        assert sample(text, f"{REQUESTS}_count", **labels, status="404") == 1
        assert sample(text, f"{REQUESTS}_count", method="POST", route="/v1/chats", status="200") == 1
        assert sample(text, f"{REQUESTS}_sum", **labels, status="200") > 0
        assert chat_id not in text

    async def test_unknown_path_is_unmatched(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/no-such-route/abc123")

        text = await scrape(client)

        assert response.status_code == 404
        assert sample(text, f"{REQUESTS}_count", method="GET", route="unmatched", status="404") == 1
        assert "no-such-route" not in text

    async def test_wrong_method_keeps_template(self, client: httpx.AsyncClient) -> None:
        response = await client.get("/v1/auth/signup")

        text = await scrape(client)

        assert response.status_code == 405
        assert sample(text, f"{REQUESTS}_count", method="GET", route="/v1/auth/signup", status="405") == 1

    async def test_unknown_method_is_other(self, client: httpx.AsyncClient) -> None:
        response = await client.request("BREW", "/health")

        text = await scrape(client)

        assert response.status_code == 405
        assert sample(text, f"{REQUESTS}_count", method="other", route="/health", status="405") == 1
        assert "BREW" not in text

    async def test_scrapes_are_counted(self, client: httpx.AsyncClient) -> None:
        await scrape(client)

        text = await scrape(client)

        assert sample(text, f"{REQUESTS}_count", method="GET", route="/metrics", status="200") == 1


class TestProviderMetrics:
    async def test_reply_counts_ok_call(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        chat_id = await new_chat_with_model(client, headers, fake_provider)
        labels = {"provider": "openai", "operation": "request", "outcome": "ok"}
        before = sample(await scrape(client), f"{PROVIDER_CALLS}_count", **labels)

        response = await send_message(client, headers, chat_id)

        text = await scrape(client)
        assert response.status_code == 200, response.text
        assert sample(text, f"{PROVIDER_CALLS}_count", **labels) == before + 1
        assert fake_provider.url not in text
        assert "127.0.0.1" not in text
        assert VALID_API_KEY not in text

    async def test_provider_error_counts_code(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        chat_id = await new_chat_with_model(client, headers, fake_provider)
        labels = {"provider": "openai", "operation": "request", "outcome": "provider_unavailable"}
        before = sample(await scrape(client), f"{PROVIDER_CALLS}_count", **labels)
        fake_provider.fail_next("/chat/completions", status=500)

        response = await send_message(client, headers, chat_id)

        assert response.status_code == 502, response.text
        assert response.json()["code"] == "provider_unavailable"
        assert sample(await scrape(client), f"{PROVIDER_CALLS}_count", **labels) == before + 1

    async def test_stream_counts_ok_call(
        self, client: httpx.AsyncClient, app: FastAPI, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        chat_id = await new_chat_with_model(client, headers, fake_provider)
        labels = {"provider": "openai", "operation": "stream", "outcome": "ok"}
        before = sample(await scrape(client), f"{PROVIDER_CALLS}_count", **labels)

        response = await send_message(client, headers, chat_id, stream=True)
        await app.state.replies.drain()

        assert response.status_code == 200
        assert sample(await scrape(client), f"{PROVIDER_CALLS}_count", **labels) == before + 1

    async def test_broken_stream_counts_error(
        self, client: httpx.AsyncClient, app: FastAPI, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        chat_id = await new_chat_with_model(client, headers, fake_provider)
        fake_provider.stream_chunks = ["one ", "two ", "three"]
        labels = {"provider": "openai", "operation": "stream"}
        before = await scrape(client)
        fake_provider.fail_next("/chat/completions", break_stream_after=1)

        response = await send_message(client, headers, chat_id, stream=True)
        await app.state.replies.drain()

        after = await scrape(client)
        assert response.status_code == 200
        assert sample(after, f"{PROVIDER_CALLS}_count", **labels, outcome="ok") == sample(
            before, f"{PROVIDER_CALLS}_count", **labels, outcome="ok"
        )
        failed = sample(after, f"{PROVIDER_CALLS}_count", **labels, outcome="provider_unavailable")
        assert failed == sample(before, f"{PROVIDER_CALLS}_count", **labels, outcome="provider_unavailable") + 1


class TestJobMetrics:
    async def test_image_job_depth_and_duration(
        self, client: httpx.AsyncClient, app: FastAPI, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        state = app.state
        worker = build_job_worker(state.settings, state.database, state.storage, state.providers)
        completed = {"job_type": "image_generation", "outcome": "completed"}
        before = sample(await scrape(client), f"{JOB_ATTEMPTS}_count", **completed)

        for _ in range(2):
            response = await client.post(
                "/v1/jobs/image-generation",
                headers=headers,
                json={"job_type": "image_generation", "input_data": {"prompt": "A lighthouse", "model": "dall-e-2"}},
            )
            assert response.status_code == 202, response.text
        queued = await scrape(client)
        ran = await worker.run_due()
        finished = await scrape(client)

        assert sample(queued, QUEUE_DEPTH, status="pending") == 2
        assert sample(queued, QUEUE_DEPTH, status="processing") == 0
        assert ran == 2
        assert sample(finished, QUEUE_DEPTH, status="pending") == 0
        assert sample(finished, f"{JOB_ATTEMPTS}_count", **completed) == before + 2
        assert "image_generation" in label_values(finished, f"{JOB_ATTEMPTS}_count", "job_type")

    @pytest.mark.parametrize(
        ("provider_status", "outcome"),
        [
            # A 400 from the provider rejects the request, which fails the job without a retry.
            (400, "failed"),
            # A 5xx is an outage, which schedules a retry.
            (500, "retry_scheduled"),
        ],
    )
    async def test_failed_attempt_outcome(
        self,
        client: httpx.AsyncClient,
        app: FastAPI,
        headers: dict[str, str],
        fake_provider: FakeProvider,
        provider_status: int,
        outcome: str,
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        state = app.state
        worker = build_job_worker(state.settings, state.database, state.storage, state.providers)
        labels = {"job_type": "image_generation", "outcome": outcome}
        before = sample(await scrape(client), f"{JOB_ATTEMPTS}_count", **labels)
        fake_provider.fail_next("/images/generations", status=provider_status)

        response = await client.post(
            "/v1/jobs/image-generation",
            headers=headers,
            json={"job_type": "image_generation", "input_data": {"prompt": "A lighthouse", "model": "dall-e-2"}},
        )
        assert response.status_code == 202, response.text
        assert await worker.run_due() == 1

        assert sample(await scrape(client), f"{JOB_ATTEMPTS}_count", **labels) == before + 1


class TestUnreachableDatabase:
    @pytest.fixture
    async def offline_client(self, tmp_path: Path) -> Any:
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port()}/pocketllm"
        app = create_app(make_settings(url, tmp_path / "data", log_format="json"))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://pocketllm.test") as http:
                yield http

    async def test_readiness_is_503(self, offline_client: httpx.AsyncClient) -> None:
        response = await offline_client.get("/health/ready")

        assert response.status_code == 503
        assert response.json()["status"] == "unavailable"
        assert response.json()["checks"]["database"] == "unreachable"

    async def test_scrape_reports_unknown_depth(self, offline_client: httpx.AsyncClient) -> None:
        with capture_log_output() as output:
            first = await scrape(offline_client)
            second = await scrape(offline_client)

        assert sample(first, QUEUE_DEPTH, status="pending") == QUEUE_DEPTH_UNKNOWN
        assert sample(first, QUEUE_DEPTH, status="processing") == QUEUE_DEPTH_UNKNOWN
        assert sample(second, QUEUE_DEPTH, status="pending") == QUEUE_DEPTH_UNKNOWN
        events = [line["event"] for line in parse_lines(output) if line["event"].startswith("metrics.")]
        assert events == ["metrics.queue_depth_failed"]
