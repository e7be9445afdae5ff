"""/v1/jobs on SQLite and PostgreSQL: queuing image jobs, running them against the fake provider, and the
routes that list, cancel, delete and retry them."""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select, update

from pocketllm.db.engine import Database
from pocketllm.db.types import utcnow
from pocketllm.jobs.handlers import build_job_worker
from pocketllm.jobs.worker import JobWorker
from pocketllm.models import Job
from tests.fakes.provider import VALID_API_KEY, FakeProvider, make_image
from tests.helpers import auth_headers, sign_up

JOBS = "/v1/jobs"
CREATE = "/v1/jobs/image-generation"


SETTINGS = {
    # The fake provider listens on 127.0.0.1, which the outbound guard blocks by default.
    "allow_private_provider_urls": True,
    "provider_read_timeout_seconds": 5.0,
    "job_max_attempts": 3,
    "job_heartbeat_seconds": 0.05,
    "job_lease_seconds": 5.0,
    "job_poll_seconds": 0.05,
    "job_shutdown_grace_seconds": 0.0,
}


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return dict(SETTINGS)


@pytest.fixture(autouse=True)
def _strict_image_models(fake_provider: FakeProvider) -> None:
    # The fake then checks each OpenAI model's parameters the way the real API does.
    fake_provider.strict_image_models = True


@pytest.fixture
async def headers(client: httpx.AsyncClient, unique_email: str) -> dict[str, str]:
    return auth_headers(await sign_up(client, unique_email))


@pytest.fixture
def worker(app: FastAPI) -> JobWorker:
    state = app.state
    return build_job_worker(state.settings, state.database, state.storage, state.providers)


async def activate(
    client: httpx.AsyncClient, headers: dict[str, str], provider: str, base_url: str, api_key: str = VALID_API_KEY
) -> None:
    response = await client.post(
        "/v1/providers/activate",
        headers=headers,
        json={"provider": provider, "api_key": api_key, "base_url": base_url, "verify": False},
    )
    assert response.status_code == 200, response.text


async def queue_job(
    client: httpx.AsyncClient, headers: dict[str, str], expected_status: int = 202, **input_data: Any
) -> dict[str, Any]:
    data = {"prompt": "A lighthouse at dawn", "model": "dall-e-2", "size": "256x256", **input_data}
    response = await client.post(CREATE, headers=headers, json={"job_type": "image_generation", "input_data": data})
    assert response.status_code == expected_status, response.text
    body: dict[str, Any] = response.json()
    return body


async def get_job(client: httpx.AsyncClient, headers: dict[str, str], job_id: str) -> dict[str, Any]:
    response = await client.get(f"{JOBS}/{job_id}", headers=headers)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    return body


async def job_count(database: Database) -> int:
    async with database.read_only() as session:
        return int(await session.scalar(select(func.count()).select_from(Job)) or 0)


async def make_due(database: Database, job_id: str) -> None:
    """Move a retry's due time to now, instead of waiting out the backoff."""
    async with database.transaction() as session:
        await session.execute(update(Job).where(Job.id == uuid.UUID(job_id)).values(run_at=utcnow()))


# Queuing and running


async def test_image_job_stores_images(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, worker: JobWorker, app: FastAPI
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    created = await queue_job(client, headers, model="dall-e-3", size="1024x1024", quality="hd", style="natural")
    assert created["status"] == "pending"
    pending = await get_job(client, headers, created["job_id"])
    assert pending["status"] == "pending"
    assert pending["output_data"] is None

    assert await worker.run_due() == 1

    job = await get_job(client, headers, created["job_id"])
    assert job["status"] == "completed", job
    assert job["attempts"] == 1
    output = job["output_data"]
    assert output["provider"] == "openai"
    assert output["model"] == "dall-e-3"
    assert output["cost"] == {"usd": 0.08, "credits": 80.0, "currency": "credits"}
    assert output["revised_prompt"]
    [image] = output["images"]
    assert (image["width"], image["height"], image["mime_type"]) == (8, 8, "image/png")
    assert "key" not in image

    sent = fake_provider.last_request("/images/generations").body
    assert sent["model"] == "dall-e-3"
    assert sent["quality"] == "hd"
    assert sent["style"] == "natural"

    # The URL is this server's signed file URL, and it serves exactly the bytes the provider generated.
    assert image["url"].startswith("http://pocketllm.test/v1/files/jobs/")
    assert "signature=" in image["url"]
    served = await client.get(image["url"])
    assert served.status_code == 200
    assert served.headers["content-type"] == "image/png"
    assert served.content in fake_provider.generated_images.values()
    assert len(await app.state.storage.list_keys(f"jobs/{created['job_id']}/")) == 1


async def test_url_images_copied_to_storage(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, worker: JobWorker
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    fake_provider.image_response_format = "url"
    created = await queue_job(client, headers, n=2)

    await worker.run_due()

    job = await get_job(client, headers, created["job_id"])
    assert job["status"] == "completed", job
    served = [(await client.get(image["url"])).content for image in job["output_data"]["images"]]
    assert sorted(served) == sorted(fake_provider.generated_images.values())
    # The URL form made the server download each image from the provider's file host.
    assert len(fake_provider.requests_to(".png")) == 2


async def test_imagerouter_job_records_cost(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, worker: JobWorker
) -> None:
    await activate(client, headers, "imagerouter", fake_provider.imagerouter_base_url)
    created = await queue_job(client, headers, model="test/fixed-image", size=None)

    await worker.run_due()

    job = await get_job(client, headers, created["job_id"])
    assert job["status"] == "completed", job
    assert job["output_data"]["provider"] == "imagerouter"
    assert job["output_data"]["cost"]["usd"] == pytest.approx(0.04)
    assert len(job["output_data"]["images"]) == 1


IN_PROCESS_WORKER = {
    "allow_private_provider_urls": True,
    "run_worker": True,
    "job_poll_seconds": 5.0,
    "job_shutdown_grace_seconds": 0.0,
}


@pytest.mark.parametrize("settings_overrides", [IN_PROCESS_WORKER])
async def test_in_process_worker_starts_job(
    fake_provider: FakeProvider, client: httpx.AsyncClient, app: FastAPI
) -> None:
    worker: JobWorker | None = app.state.job_worker
    assert worker is not None, "the app runs a worker when RUN_WORKER is true"
    headers = auth_headers(await sign_up(client, f"user-{uuid.uuid4().hex[:8]}@example.com"))
    await activate(client, headers, "openai", fake_provider.openai_base_url)

    created = await queue_job(client, headers)
    # The worker polls every 5 s here, so finishing sooner shows that queuing woke it.
    await asyncio.wait_for(worker.wait_attempted(uuid.UUID(created["job_id"])), timeout=3)

    job = await get_job(client, headers, created["job_id"])
    assert job["status"] == "completed"


# Validation before queuing


@pytest.mark.parametrize(
    ("input_data", "code"),
    [
        ({"prompt": "   "}, "empty_prompt"),
        ({"model": "dall-e-9"}, "unknown_image_model"),
        ({"size": "300x300"}, "unsupported_image_size"),
        ({"n": 11}, "unsupported_image_count"),
        ({"n": 0}, "unsupported_image_count"),
        ({"model": "dall-e-3", "size": "1024x1024", "n": 2}, "unsupported_image_count"),
        ({"style": "vivid"}, "unsupported_image_option"),
        ({"provider": "anthropic"}, "provider_not_image_capable"),
        ({"provider": "imagerouter"}, "no_image_provider"),
        ({"provider": "nonsense"}, "unsupported_provider"),
    ],
)
async def test_invalid_request_not_queued(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    fake_provider: FakeProvider,
    database: Database,
    input_data: dict[str, Any],
    code: str,
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    data = {"prompt": "A lighthouse", "model": "dall-e-2", "size": "256x256", **input_data}
    response = await client.post(CREATE, headers=headers, json={"job_type": "image_generation", "input_data": data})

    assert_error(response, 400, code)
    assert await job_count(database) == 0
    assert fake_provider.requests_to("/images/generations") == []


async def test_no_image_provider_rejected(
    client: httpx.AsyncClient, headers: dict[str, str], database: Database
) -> None:
    response = await client.post(
        CREATE,
        headers=headers,
        json={"job_type": "image_generation", "input_data": {"prompt": "x", "model": "dall-e-2"}},
    )
    assert_error(response, 400, "no_image_provider")
    assert await job_count(database) == 0


async def test_unlisted_imagerouter_model_rejected(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, database: Database
) -> None:
    await activate(client, headers, "imagerouter", fake_provider.imagerouter_base_url)
    for model in ("test/not-listed", "test/video"):
        response = await client.post(
            CREATE,
            headers=headers,
            json={"job_type": "image_generation", "input_data": {"prompt": "x", "model": model}},
        )
        assert_error(response, 400, "unknown_image_model")
    assert await job_count(database) == 0


@pytest.mark.parametrize(
    "payload",
    [
        {"job_type": "video_generation", "input_data": {"prompt": "x", "model": "dall-e-2"}},
        {"job_type": "bad type!", "input_data": {"prompt": "x", "model": "dall-e-2"}},
        {"job_type": "image_generation"},
        {"job_type": "image_generation", "input_data": {"prompt": "x", "model": "dall-e-2", "n": "two"}},
        {"job_type": "image_generation", "input_data": {"model": "dall-e-2"}},
        {"job_type": "image_generation", "input_data": ["not", "an", "object"]},
    ],
)
async def test_malformed_body_rejected(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    fake_provider: FakeProvider,
    database: Database,
    payload: dict[str, Any],
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    response = await client.post(CREATE, headers=headers, json=payload)

    assert response.status_code in (400, 422), response.text
    assert response.json()["code"] in ("unsupported_job_type", "validation_error")
    assert await job_count(database) == 0


async def test_jobs_need_authentication(client: httpx.AsyncClient) -> None:
    for method, path in [("GET", JOBS), ("POST", CREATE), ("GET", f"{JOBS}/{uuid.uuid4()}")]:
        response = await client.request(method, path, json={} if method == "POST" else None)
        assert response.status_code == 401, (method, path)


# Idempotency


async def test_idempotency_key_returns_same_job(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, database: Database
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    payload = {"job_type": "image_generation", "input_data": {"prompt": "A fox", "model": "dall-e-2"}}
    keyed = {**headers, "Idempotency-Key": "order-17"}

    first = await client.post(CREATE, headers=keyed, json=payload)
    second = await client.post(CREATE, headers=keyed, json=payload)

    assert first.status_code == 202
    assert second.status_code == 200
    assert second.json()["job_id"] == first.json()["job_id"]
    assert await job_count(database) == 1

    changed = {"job_type": "image_generation", "input_data": {"prompt": "A wolf", "model": "dall-e-2"}}
    assert_error(await client.post(CREATE, headers=keyed, json=changed), 422, "idempotency_key_reused")
    with_metadata = {**payload, "metadata": {"source": "other"}}
    assert_error(await client.post(CREATE, headers=keyed, json=with_metadata), 422, "idempotency_key_reused")
    assert await job_count(database) == 1

    # A repeat still gets its job after the provider was deactivated.
    assert (await client.delete("/v1/providers/openai", headers=headers)).status_code in (200, 204)
    repeated = await client.post(CREATE, headers=keyed, json=payload)
    assert repeated.status_code == 200, repeated.text
    assert repeated.json()["job_id"] == first.json()["job_id"]


async def test_concurrent_idempotent_requests_one_job(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, database: Database
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    payload = {"job_type": "image_generation", "input_data": {"prompt": "A fox", "model": "dall-e-2"}}
    keyed = {**headers, "Idempotency-Key": "burst-1"}

    responses = await asyncio.gather(*(client.post(CREATE, headers=keyed, json=payload) for _ in range(6)))

    assert sorted(response.status_code for response in responses) == [200] * 5 + [202]
    assert len({response.json()["job_id"] for response in responses}) == 1
    assert await job_count(database) == 1


async def test_idempotency_key_per_user(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, database: Database
) -> None:
    other = auth_headers(await sign_up(client, f"other-{uuid.uuid4().hex[:8]}@example.com"))
    payload = {"job_type": "image_generation", "input_data": {"prompt": "A fox", "model": "dall-e-2"}}
    for user in (headers, other):
        await activate(client, user, "openai", fake_provider.openai_base_url)
        response = await client.post(CREATE, headers={**user, "Idempotency-Key": "shared"}, json=payload)
        assert response.status_code == 202
    assert await job_count(database) == 2


@pytest.mark.parametrize("key", ["", "x" * 201, "has space", "naïve"])
async def test_invalid_idempotency_key_rejected(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, key: str
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    payload = {"job_type": "image_generation", "input_data": {"prompt": "A fox", "model": "dall-e-2"}}
    keyed: dict[str, str | bytes] = {**headers, "Idempotency-Key": key.encode("utf-8")}
    assert_error(await client.post(CREATE, headers=keyed, json=payload), 400, "invalid_idempotency_key")


# Listing and isolation


async def test_list_newest_first_with_filters(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, worker: JobWorker
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    first = await queue_job(client, headers)
    await worker.run_due()
    second = await queue_job(client, headers)
    third = await queue_job(client, headers)

    listed = (await client.get(JOBS, headers=headers)).json()
    assert [job["id"] for job in listed] == [third["job_id"], second["job_id"], first["job_id"]]

    completed = (await client.get(JOBS, headers=headers, params={"status": "completed"})).json()
    assert [job["id"] for job in completed] == [first["job_id"]]
    assert completed[0]["output_data"]["images"][0]["url"].startswith("http://pocketllm.test/v1/files/")

    page = (await client.get(JOBS, headers=headers, params={"limit": 1, "offset": 1})).json()
    assert [job["id"] for job in page] == [second["job_id"]]
    assert (await client.get(JOBS, headers=headers, params={"job_type": "other"})).json() == []
    invalid_status = assert_error(
        await client.get(JOBS, headers=headers, params={"status": "done"}), 422, "validation_error"
    )
    assert "'pending'" in invalid_status["message"]
    assert "JobStatus" not in invalid_status["message"]
    assert_error(await client.get(JOBS, headers=headers, params={"limit": 0}), 422, "validation_error")


async def test_jobs_isolated_between_users(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, database: Database
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    job_id = (await queue_job(client, headers))["job_id"]
    other = auth_headers(await sign_up(client, f"other-{uuid.uuid4().hex[:8]}@example.com"))

    assert (await client.get(JOBS, headers=other)).json() == []
    assert_error(await client.get(f"{JOBS}/{job_id}", headers=other), 404, "job_not_found")
    assert_error(await client.delete(f"{JOBS}/{job_id}", headers=other), 404, "job_not_found")
    assert_error(await client.post(f"{JOBS}/{job_id}/retry", headers=other), 404, "job_not_found")
    assert (await get_job(client, headers, job_id))["status"] == "pending"


@pytest.mark.parametrize("job_id", ["not-a-uuid", str(uuid.uuid4())])
async def test_unknown_job_not_found(client: httpx.AsyncClient, headers: dict[str, str], job_id: str) -> None:
    assert_error(await client.get(f"{JOBS}/{job_id}", headers=headers), 404, "job_not_found")
    assert_error(await client.delete(f"{JOBS}/{job_id}", headers=headers), 404, "job_not_found")
    assert_error(await client.post(f"{JOBS}/{job_id}/retry", headers=headers), 404, "job_not_found")


# Cancelling and deleting


async def test_delete_cancels_then_removes_pending(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, worker: JobWorker
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    job_id = (await queue_job(client, headers))["job_id"]

    assert (await client.delete(f"{JOBS}/{job_id}", headers=headers)).status_code == 204
    assert (await get_job(client, headers, job_id))["status"] == "cancelled"
    assert await worker.run_due() == 0
    assert fake_provider.requests_to("/images/generations") == []

    assert (await client.delete(f"{JOBS}/{job_id}", headers=headers)).status_code == 204
    assert_error(await client.get(f"{JOBS}/{job_id}", headers=headers), 404, "job_not_found")


async def test_delete_finished_job_removes_images(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, worker: JobWorker, app: FastAPI
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    job_id = (await queue_job(client, headers, n=2))["job_id"]
    await worker.run_due()
    url = (await get_job(client, headers, job_id))["output_data"]["images"][0]["url"]
    assert len(await app.state.storage.list_keys(f"jobs/{job_id}/")) == 2

    assert (await client.delete(f"{JOBS}/{job_id}", headers=headers)).status_code == 204

    assert await app.state.storage.list_keys(f"jobs/{job_id}/") == []
    assert (await client.get(url)).status_code == 404
    assert_error(await client.get(f"{JOBS}/{job_id}", headers=headers), 404, "job_not_found")


async def test_delete_stops_running_job(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, worker: JobWorker, app: FastAPI
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    fake_provider.fail_next("/images/generations", delay_seconds=30)
    job_id = (await queue_job(client, headers))["job_id"]
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    try:
        await asyncio.to_thread(fake_provider.wait_for_requests, "/images/generations", timeout=5)
        assert (await get_job(client, headers, job_id))["status"] == "processing"

        assert (await client.delete(f"{JOBS}/{job_id}", headers=headers)).status_code == 204
        await asyncio.wait_for(worker.wait_attempted(uuid.UUID(job_id)), timeout=5)
    finally:
        stop.set()
        await asyncio.wait_for(running, timeout=5)

    assert worker.stats.stopped == 1
    job = await get_job(client, headers, job_id)
    assert job["status"] == "cancelled"
    assert job["output_data"] is None
    assert await app.state.storage.list_keys(f"jobs/{job_id}/") == []


async def test_retry_after_cancel_waits_for_the_old_attempt(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    fake_provider: FakeProvider,
    worker: JobWorker,
    database: Database,
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    job_id = (await queue_job(client, headers))["job_id"]
    claimed = await worker.queue.claim("another-worker")
    assert claimed is not None

    assert (await client.delete(f"{JOBS}/{job_id}", headers=headers)).status_code == 204
    assert (await client.post(f"{JOBS}/{job_id}/retry", headers=headers)).status_code == 200

    # The cancelled attempt may still be running until its worker's next heartbeats.
    async with database.read_only() as session:
        run_at = await session.scalar(select(Job.run_at).where(Job.id == uuid.UUID(job_id)))
    assert run_at is not None
    assert run_at > utcnow()
    assert await worker.run_due() == 0


# Failures and retries


async def test_rejected_key_fails_at_once(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, worker: JobWorker
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url, api_key="sk-test-revoked-0123456789")
    job_id = (await queue_job(client, headers))["job_id"]

    await worker.run_due()

    job = await get_job(client, headers, job_id)
    assert job["status"] == "failed"
    assert job["attempts"] == 1
    assert "rejected the API key" in job["error_log"]
    assert "sk-test-revoked" not in str(job)


async def test_rejected_request_fails_at_once(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, worker: JobWorker
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    fake_provider.fail_next(
        "/images/generations",
        status=400,
        error_code="content_policy_violation",
        message=f"Your request was rejected by the safety system. Key: {VALID_API_KEY}",
    )
    job_id = (await queue_job(client, headers))["job_id"]

    await worker.run_due()

    job = await get_job(client, headers, job_id)
    assert job["status"] == "failed"
    assert job["attempts"] == 1
    assert "safety system" in job["error_log"]
    assert VALID_API_KEY not in job["error_log"]


async def test_server_error_retried(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    fake_provider: FakeProvider,
    worker: JobWorker,
    database: Database,
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    fake_provider.fail_next("/images/generations", status=500)
    job_id = (await queue_job(client, headers))["job_id"]

    started = utcnow()
    await worker.run_due()
    job = await get_job(client, headers, job_id)
    assert job["status"] == "pending"
    assert "HTTP 500" in job["error_log"]
    async with database.read_only() as session:
        run_at = await session.scalar(select(Job.run_at).where(Job.id == uuid.UUID(job_id)))
    assert run_at is not None
    assert run_at >= started + timedelta(seconds=10)  # JOB_RETRY_BASE_SECONDS

    await make_due(database, job_id)
    await worker.run_due()
    job = await get_job(client, headers, job_id)
    assert job["status"] == "completed"
    assert job["attempts"] == 2
    assert job["error_log"] is None


async def test_rate_limit_waits_retry_after(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    fake_provider: FakeProvider,
    worker: JobWorker,
    database: Database,
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    fake_provider.fail_next("/images/generations", status=429, retry_after=120)
    job_id = (await queue_job(client, headers))["job_id"]

    started = utcnow()
    await worker.run_due()

    async with database.read_only() as session:
        job = await session.scalar(select(Job).where(Job.id == uuid.UUID(job_id)))
    assert job is not None
    assert job.status == "pending"
    assert job.run_at >= started + timedelta(seconds=120)


async def test_failed_job_retried_by_user(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    fake_provider: FakeProvider,
    worker: JobWorker,
    database: Database,
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    fake_provider.fail_next("/images/generations", status=503, times=3)
    job_id = (await queue_job(client, headers))["job_id"]

    for _ in range(3):
        await make_due(database, job_id)
        await worker.run_due()
    failed = await get_job(client, headers, job_id)
    assert failed["status"] == "failed"
    assert failed["attempts"] == 3
    assert "HTTP 503" in failed["error_log"]

    retried = await client.post(f"{JOBS}/{job_id}/retry", headers=headers)
    assert retried.status_code == 200
    assert retried.json() == {"job_id": job_id, "status": "pending"}
    await worker.run_due()

    job = await get_job(client, headers, job_id)
    assert job["status"] == "completed"
    assert job["attempts"] == 1
    assert job["error_log"] is None


async def test_retry_only_failed_or_cancelled(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, worker: JobWorker
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    job_id = (await queue_job(client, headers))["job_id"]
    assert_error(await client.post(f"{JOBS}/{job_id}/retry", headers=headers), 400, "job_not_retryable")
    await worker.run_due()
    assert_error(await client.post(f"{JOBS}/{job_id}/retry", headers=headers), 400, "job_not_retryable")

    cancelled_id = (await queue_job(client, headers))["job_id"]
    assert (await client.delete(f"{JOBS}/{cancelled_id}", headers=headers)).status_code == 204
    assert (await client.post(f"{JOBS}/{cancelled_id}/retry", headers=headers)).status_code == 200
    await worker.run_due()
    assert (await get_job(client, headers, cancelled_id))["status"] == "completed"


async def test_deactivated_provider_fails_job(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, worker: JobWorker
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    job_id = (await queue_job(client, headers))["job_id"]
    assert (await client.delete("/v1/providers/openai", headers=headers)).status_code in (200, 204)

    await worker.run_due()

    job = await get_job(client, headers, job_id)
    assert job["status"] == "failed"
    assert "no longer active" in job["error_log"]
    assert fake_provider.requests_to("/images/generations") == []


async def test_junk_response_retried_then_fails(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    fake_provider: FakeProvider,
    worker: JobWorker,
    database: Database,
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    fake_provider.image_response_override = {"data": [{"b64_json": base64.b64encode(b"not an image").decode()}]}
    job_id = (await queue_job(client, headers))["job_id"]

    for _ in range(3):
        await make_due(database, job_id)
        await worker.run_due()

    job = await get_job(client, headers, job_id)
    assert job["status"] == "failed"
    assert job["attempts"] == 3
    assert job["output_data"] is None


async def test_unstorable_provider_text_is_cleaned(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, worker: JobWorker
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    fake_provider.strict_image_models = False
    png = base64.b64encode(make_image(8, 8, (1, 2, 3))).decode()
    fake_provider.image_response_override = {
        "data": [{"b64_json": png, "revised_prompt": "a\x00b"}],
        "usage": {"note": "x\x00y"},
    }
    job_id = (await queue_job(client, headers, model="dall-e-3", size="1024x1024"))["job_id"]

    await worker.run_due()

    job = await get_job(client, headers, job_id)
    assert job["status"] == "completed", job
    assert job["attempts"] == 1
    assert job["output_data"]["revised_prompt"] == "ab"
    assert job["output_data"]["usage"] == {"note": "xy"}


async def test_absurd_reported_cost_is_unknown(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, worker: JobWorker
) -> None:
    await activate(client, headers, "imagerouter", fake_provider.imagerouter_base_url)
    fake_provider.imagerouter_cost = 1e308
    job_id = (await queue_job(client, headers, model="test/fixed-image", size=None))["job_id"]

    await worker.run_due()

    job = await get_job(client, headers, job_id)
    assert job["status"] == "completed", job
    assert job["output_data"]["cost"] is None


async def test_fewer_images_than_requested_are_recorded(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, worker: JobWorker
) -> None:
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    png = base64.b64encode(make_image(8, 8, (1, 2, 3))).decode()
    fake_provider.image_response_override = {"data": [{"b64_json": png}]}
    job_id = (await queue_job(client, headers, n=3))["job_id"]

    await worker.run_due()

    output = (await get_job(client, headers, job_id))["output_data"]
    assert output["images_requested"] == 3
    assert len(output["images"]) == 1
    assert output["cost"]["usd"] == pytest.approx(0.016)


async def test_imagerouter_with_own_base_url_is_verified(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
) -> None:
    response = await client.post(
        "/v1/providers/activate",
        headers=headers,
        json={"provider": "imagerouter", "api_key": VALID_API_KEY, "base_url": fake_provider.imagerouter_base_url},
    )

    assert response.status_code == 200, response.text
    assert fake_provider.last_request("/models").path == "/imagerouter/v1/models"


# Models and estimates


async def test_image_models_with_prices(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
) -> None:
    assert (await client.get(f"{CREATE}/models", headers=headers)).json() == []

    await activate(client, headers, "openai", fake_provider.openai_base_url)
    await activate(client, headers, "imagerouter", fake_provider.imagerouter_base_url)
    response = await client.get(f"{CREATE}/models", headers=headers)

    assert response.status_code == 200
    models = {(model["provider"], model["id"]): model for model in response.json()}
    assert {("openai", "dall-e-2"), ("openai", "dall-e-3"), ("openai", "gpt-image-1")} <= set(models)
    assert ("imagerouter", "test/fixed-image") in models
    assert ("imagerouter", "test/video") not in models
    assert models[("openai", "dall-e-2")]["metadata"]["price_per_image_usd"]


async def test_estimate_from_price_table(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    response = await client.post(
        f"{CREATE}/estimate-cost",
        headers=headers,
        json={"model": "dall-e-3", "dimensions": [1792, 1024], "quality": "hd"},
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["cost_credits"] == pytest.approx(120)
    assert body["currency"] == "credits"
    assert body["provider"] == "openai"
    assert body["breakdown"]["price_source"].startswith("https://")
    assert body["breakdown"]["price_date"]


@pytest.mark.parametrize("settings_overrides", [{**SETTINGS, "database_pool_size": 1}])
@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", f"{CREATE}/estimate-cost", {"model": "test/range-image", "provider": "imagerouter"}, 200),
        ("GET", f"{CREATE}/models", None, 200),
        (
            "POST",
            CREATE,
            {
                "job_type": "image_generation",
                "input_data": {"prompt": "A lighthouse", "model": "test/fixed-image", "provider": "imagerouter"},
            },
            202,
        ),
    ],
)
async def test_model_list_fetch_holds_no_connection(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    fake_provider: FakeProvider,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    status: int,
) -> None:
    # With one pooled connection, a request waiting for ImageRouter's model list must leave it free.
    await activate(client, headers, "imagerouter", fake_provider.imagerouter_base_url)
    fake_provider.fail_next("/imagerouter/v1/models", delay_seconds=60)
    slow = asyncio.create_task(client.request(method, path, headers=headers, json=body))
    await asyncio.to_thread(fake_provider.wait_for_requests, "/imagerouter/v1/models")

    async with asyncio.timeout(10):
        profile = await client.get("/v1/users/profile", headers=headers)
    fake_provider.reset()
    response = await slow

    assert profile.status_code == 200
    assert response.status_code == status, response.text


async def test_estimate_from_imagerouter_prices(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
) -> None:
    await activate(client, headers, "imagerouter", fake_provider.imagerouter_base_url)
    response = await client.post(
        f"{CREATE}/estimate-cost", headers=headers, json={"model": "test/range-image", "provider": "imagerouter"}
    )
    assert response.status_code == 200, response.text
    assert response.json()["cost_credits"] == pytest.approx(1.3)


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"model": "dall-e-9", "provider": "openai"}, 400, "unknown_image_model"),
        ({"model": "dall-e-3", "dimensions": [300, 300]}, 400, "unsupported_image_size"),
        ({"model": "dall-e-3", "dimensions": [0, 300]}, 422, "validation_error"),
        ({"model": "dall-e-3", "dimensions": [1024]}, 422, "validation_error"),
        ({"dimensions": [1024, 1024]}, 422, "validation_error"),
    ],
)
async def test_estimate_invalid_request_rejected(
    client: httpx.AsyncClient, headers: dict[str, str], payload: dict[str, Any], status: int, code: str
) -> None:
    response = await client.post(f"{CREATE}/estimate-cost", headers=headers, json=payload)
    assert_error(response, status, code)
