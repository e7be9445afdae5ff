"""JobWorker and the maintenance handlers on SQLite and PostgreSQL, and on PostgreSQL alone: two workers
sharing one queue, and the `pocketllm worker` command killed or stopped in the middle of a job.

The `test.*` job types are small handlers defined here. They stand in for real job types, so each test
chooses the outcome: success, each kind of error, or a handler that blocks.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update

from pocketllm.config import Settings
from pocketllm.db.engine import Database, create_engine
from pocketllm.db.types import utcnow
from pocketllm.errors import InvalidInput, RateLimited, UpstreamError
from pocketllm.jobs.handlers import EXPIRE_SESSIONS, SWEEP_JOB_FILES, MaintenanceHandlers, build_job_worker
from pocketllm.jobs.queue import ClaimedJob, JobQueue
from pocketllm.jobs.worker import INTERNAL_ERROR_MESSAGE, JobHandler, JobOutcome, JobWorker, describe_failure
from pocketllm.models import AuthSession, Job, User
from pocketllm.models.job import JobStatus
from pocketllm.storage.service import FileStorage, build_storage
from tests.conftest import TEST_JWT_SECRET, make_settings
from tests.fakes.provider import VALID_API_KEY, FakeProvider, make_png
from tests.helpers import auth_headers, sign_up

TEST_JOB_TYPE = "test.job"
RETRY_BASE_SECONDS = 5.0
# The upper bound of every wait for a worker. The jobs here take milliseconds.
WAIT_SECONDS = 10.0
# The lease of the `pocketllm worker` subprocess and of the in-test worker that takes its job over.
SUBPROCESS_LEASE_SECONDS = 2.0
SUBPROCESS_HEARTBEAT_SECONDS = 0.2
SUBPROCESS_POLL_SECONDS = 0.1
IMAGE_JOB = {
    "job_type": "image_generation",
    "input_data": {"prompt": "a red fox", "model": "dall-e-2", "size": "256x256"},
}
PNG = make_png(2, 2)
HTTP_DATE = "Wed, 21 Oct 2015 07:28:00 GMT"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {
        "allow_private_provider_urls": True,
        "job_lease_seconds": SUBPROCESS_LEASE_SECONDS,
        "job_heartbeat_seconds": SUBPROCESS_HEARTBEAT_SECONDS,
        "job_poll_seconds": SUBPROCESS_POLL_SECONDS,
    }


@pytest.fixture
def storage(settings: Settings) -> FileStorage:
    return build_storage(settings)


def make_worker(
    database: Database,
    handlers: Mapping[str, JobHandler],
    storage: FileStorage,
    *,
    lease_seconds: float = 2.0,
    heartbeat_seconds: float = 0.05,
    shutdown_grace_seconds: float = 0.0,
    concurrency: int = 1,
) -> JobWorker:
    queue = JobQueue(database, lease_seconds=lease_seconds, retry_base_seconds=RETRY_BASE_SECONDS)
    return JobWorker(
        queue,
        handlers,
        storage=storage,
        concurrency=concurrency,
        poll_seconds=0.05,
        heartbeat_seconds=heartbeat_seconds,
        shutdown_grace_seconds=shutdown_grace_seconds,
    )


async def insert_job(
    database: Database,
    *,
    job_type: str = TEST_JOB_TYPE,
    status: JobStatus = JobStatus.PENDING,
    max_attempts: int = 3,
    user_id: uuid.UUID | None = None,
    created_at: datetime | None = None,
    input_data: dict[str, Any] | None = None,
) -> uuid.UUID:
    now = created_at or utcnow()
    job = Job(
        id=uuid.uuid4(),
        user_id=user_id,
        job_type=job_type,
        status=status.value,
        input_data=input_data or {},
        attempts=0 if status == JobStatus.PENDING else 1,
        max_attempts=max_attempts,
        run_at=now,
        created_at=now,
        updated_at=now,
        lease_token=uuid.uuid4() if status == JobStatus.PROCESSING else None,
    )
    async with database.transaction() as session:
        session.add(job)
    return job.id


async def load_job(database: Database, job_id: uuid.UUID) -> Job:
    async with database.read_only() as session:
        job = await session.get(Job, job_id)
    assert job is not None, f"job {job_id} is missing"
    return job


async def insert_user(database: Database) -> uuid.UUID:
    user = User(email=f"worker-{uuid.uuid4().hex[:10]}@example.com")
    async with database.transaction() as session:
        session.add(user)
        await session.flush()
    return user.id


async def cancel_in_database(database: Database, job_id: uuid.UUID) -> None:
    """Cancel a job the way DELETE /v1/jobs/{id} cancels an active one."""
    async with database.transaction() as session:
        await session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(status=JobStatus.CANCELLED.value, lease_token=None, finished_at=utcnow())
        )


def raising(error: Exception) -> JobHandler:
    async def handler(job: ClaimedJob) -> JobOutcome:
        raise error

    return handler


async def run_one(database: Database, storage: FileStorage, handler: JobHandler, **job: Any) -> tuple[Job, JobWorker]:
    """Queue one test job, run it once with `handler`, and return the stored row and the worker."""
    job_id = await insert_job(database, **job)
    worker = make_worker(database, {TEST_JOB_TYPE: handler}, storage)

    assert await worker.run_due() == 1

    return await load_job(database, job_id), worker


@asynccontextmanager
async def running(worker: JobWorker) -> AsyncIterator[asyncio.Event]:
    """Run the worker in the background and yield its stop event. On exit, stop it and wait for run() to return."""
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT_SECONDS)


# -- outcomes ------------------------------------------------------------------------------------------------


async def test_successful_handler_completes_job(database: Database, storage: FileStorage) -> None:
    seen: list[ClaimedJob] = []

    async def handler(job: ClaimedJob) -> JobOutcome:
        seen.append(job)
        return JobOutcome({"answer": job.input_data["question"] * 2})

    row, worker = await run_one(database, storage, handler, input_data={"question": 21})

    assert row.status == JobStatus.COMPLETED.value
    assert row.output_data == {"answer": 42}
    assert row.attempts == 1
    assert row.lease_token is None
    assert row.finished_at is not None
    assert [job.id for job in seen] == [row.id]
    assert seen[0].attempt == 1
    assert worker.stats.completed == 1


async def test_client_error_fails_job_at_once(database: Database, storage: FileStorage) -> None:
    handler = raising(InvalidInput("The prompt is empty; write a prompt."))

    row, worker = await run_one(database, storage, handler, max_attempts=3)

    assert row.status == JobStatus.FAILED.value
    assert row.attempts == 1
    assert row.error_log == "The prompt is empty; write a prompt."
    assert row.finished_at is not None
    assert worker.stats.failed == 1
    assert worker.stats.retried == 0


async def test_server_error_is_retried(database: Database, storage: FileStorage) -> None:
    handler = raising(UpstreamError("The provider failed to respond."))
    before = utcnow()

    row, worker = await run_one(database, storage, handler, max_attempts=3)

    after = utcnow()
    assert row.status == JobStatus.PENDING.value
    assert row.attempts == 1
    assert row.error_log == "The provider failed to respond."
    assert before + timedelta(seconds=RETRY_BASE_SECONDS) <= row.run_at <= after + timedelta(seconds=RETRY_BASE_SECONDS)
    assert worker.stats.retried == 1
    assert worker.stats.failed == 0


async def test_rate_limit_waits_for_retry_after(database: Database, storage: FileStorage) -> None:
    handler = raising(RateLimited("The provider is rate limiting this key.", headers={"Retry-After": "120"}))
    before = utcnow()

    row, worker = await run_one(database, storage, handler, max_attempts=3)

    after = utcnow()
    assert row.status == JobStatus.PENDING.value
    assert row.error_log == "The provider is rate limiting this key."
    assert before + timedelta(seconds=120) <= row.run_at <= after + timedelta(seconds=120)
    assert worker.stats.retried == 1


async def test_server_error_on_last_attempt_fails(database: Database, storage: FileStorage) -> None:
    handler = raising(UpstreamError("The provider failed to respond."))

    row, worker = await run_one(database, storage, handler, max_attempts=1)

    assert row.status == JobStatus.FAILED.value
    assert row.error_log == "The provider failed to respond."
    assert worker.stats.failed == 1


async def test_unexpected_error_hides_its_text(database: Database, storage: FileStorage) -> None:
    handler = raising(RuntimeError("secret-ish detail: sk-live-0123456789"))

    row, worker = await run_one(database, storage, handler, max_attempts=3)

    assert row.status == JobStatus.PENDING.value
    assert row.error_log == INTERNAL_ERROR_MESSAGE
    assert worker.stats.retried == 1


async def test_unknown_job_type_fails(database: Database, storage: FileStorage) -> None:
    job_id = await insert_job(database, job_type="test.unknown", max_attempts=3)
    unused = raising(AssertionError("a job of an unknown type ran a handler"))
    worker = make_worker(database, {TEST_JOB_TYPE: unused}, storage)

    assert await worker.run_due() == 1

    row = await load_job(database, job_id)
    assert row.status == JobStatus.FAILED.value
    assert row.attempts == 1
    assert row.error_log is not None
    assert "'test.unknown'" in row.error_log
    assert worker.stats.failed == 1


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (InvalidInput("Bad size."), ("Bad size.", False, None)),
        (UpstreamError("Down."), ("Down.", True, None)),
        (RateLimited("Slow down.", headers={"Retry-After": "7"}), ("Slow down.", True, 7.0)),
        # An HTTP-date Retry-After is ignored, so the backoff applies.
        (
            RateLimited("Slow down.", headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
            ("Slow down.", True, None),
        ),
        (RateLimited("Slow down."), ("Slow down.", True, None)),
        (KeyError("api_key"), (INTERNAL_ERROR_MESSAGE, True, None)),
    ],
)
def test_describe_failure_decides_retry(error: Exception, expected: tuple[str, bool, float | None]) -> None:
    assert describe_failure(error) == expected


# -- cancellation and shutdown -------------------------------------------------------------------------------


async def test_cancelled_job_stops_within_heartbeat(database: Database, storage: FileStorage) -> None:
    started = asyncio.Event()
    handler_cancelled = asyncio.Event()

    async def handler(job: ClaimedJob) -> JobOutcome:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            handler_cancelled.set()
            raise
        raise AssertionError("the worker did not cancel the handler")

    job_id = await insert_job(database)
    # The lease is long, so only a failed renewal (not an expired lease) can stop the handler in time.
    worker = make_worker(database, {TEST_JOB_TYPE: handler}, storage, lease_seconds=30.0, heartbeat_seconds=0.05)

    async with running(worker):
        await asyncio.wait_for(started.wait(), WAIT_SECONDS)
        await cancel_in_database(database, job_id)
        await asyncio.wait_for(worker.wait_processed(1), timeout=2.0)

    assert handler_cancelled.is_set()
    assert worker.stats.stopped == 1
    assert worker.stats.completed == 0
    row = await load_job(database, job_id)
    assert row.status == JobStatus.CANCELLED.value
    assert row.output_data is None
    assert row.error_log is None


async def test_result_after_cancel_deletes_files(database: Database, storage: FileStorage) -> None:
    started = asyncio.Event()
    finish = asyncio.Event()
    job_id = await insert_job(database)
    written = f"jobs/{job_id}/{uuid.uuid4().hex}.png"
    unlisted = f"jobs/{job_id}/{uuid.uuid4().hex}.png"

    async def handler(job: ClaimedJob) -> JobOutcome:
        await storage.put(written, PNG, content_type="image/png")
        await storage.put(unlisted, PNG, content_type="image/png")
        started.set()
        await finish.wait()
        return JobOutcome({"images": [{"key": written}]}, files=(written,))

    # A heartbeat far longer than the test, so the handler finishes before any renewal notices the cancel.
    worker = make_worker(database, {TEST_JOB_TYPE: handler}, storage, lease_seconds=60.0, heartbeat_seconds=30.0)

    async with running(worker):
        await asyncio.wait_for(started.wait(), WAIT_SECONDS)
        await cancel_in_database(database, job_id)
        finish.set()
        await asyncio.wait_for(worker.wait_processed(1), WAIT_SECONDS)

    assert await storage.get(written) is None
    assert await storage.get(unlisted) is not None
    assert worker.stats.stopped == 1
    assert worker.stats.completed == 0
    row = await load_job(database, job_id)
    assert row.status == JobStatus.CANCELLED.value
    assert row.output_data is None


async def test_stop_without_grace_releases_job(database: Database, storage: FileStorage) -> None:
    started = asyncio.Event()
    handler_cancelled = asyncio.Event()

    async def handler(job: ClaimedJob) -> JobOutcome:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            handler_cancelled.set()
            raise
        raise AssertionError("the worker did not cancel the handler")

    job_id = await insert_job(database)
    worker = make_worker(database, {TEST_JOB_TYPE: handler}, storage, shutdown_grace_seconds=0.0)
    async with running(worker) as stop:
        await asyncio.wait_for(started.wait(), WAIT_SECONDS)
        stop.set()

    assert handler_cancelled.is_set()
    assert worker.stats.released == 1
    row = await load_job(database, job_id)
    assert row.status == JobStatus.PENDING.value
    assert row.attempts == 0
    assert row.lease_token is None
    assert row.worker_id is None
    assert row.run_at <= utcnow()


async def test_stop_waits_grace_for_running_job(database: Database, storage: FileStorage) -> None:
    started = asyncio.Event()
    finish = asyncio.Event()

    async def handler(job: ClaimedJob) -> JobOutcome:
        started.set()
        await finish.wait()
        return JobOutcome({"finished": True})

    job_id = await insert_job(database)
    worker = make_worker(database, {TEST_JOB_TYPE: handler}, storage, shutdown_grace_seconds=WAIT_SECONDS)
    async with running(worker) as stop:
        await asyncio.wait_for(started.wait(), WAIT_SECONDS)
        stop.set()
        finish.set()

    assert worker.stats.completed == 1
    assert worker.stats.released == 0
    row = await load_job(database, job_id)
    assert row.status == JobStatus.COMPLETED.value
    assert row.output_data == {"finished": True}


@pytest.mark.postgres_only
async def test_two_workers_share_queue(database: Database, database_url: str, storage: FileStorage) -> None:
    job_count = 80
    job_ids = {await insert_job(database) for _ in range(job_count)}
    handled: dict[str, list[tuple[uuid.UUID, int]]] = {"first": [], "second": []}
    all_handled = asyncio.Event()

    def recording(name: str) -> JobHandler:
        async def handler(job: ClaimedJob) -> JobOutcome:
            handled[name].append((job.id, job.attempt))
            # A short pause keeps each job running while the other worker claims, as real jobs would.
            await asyncio.sleep(0.01)
            if sum(len(records) for records in handled.values()) >= job_count:
                all_handled.set()
            return JobOutcome({"worker": name})

        return handler

    databases = [Database(create_engine(database_url)) for _ in range(2)]
    workers = [
        make_worker(db, {TEST_JOB_TYPE: recording(name)}, storage, concurrency=4, shutdown_grace_seconds=WAIT_SECONDS)
        for db, name in zip(databases, handled, strict=True)
    ]
    stop = asyncio.Event()
    tasks = [asyncio.create_task(worker.run(stop)) for worker in workers]
    try:
        await asyncio.wait_for(all_handled.wait(), 30)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), WAIT_SECONDS)
        for db in databases:
            await db.dispose()

    records = handled["first"] + handled["second"]
    assert len(records) == job_count
    assert {job_id for job_id, _ in records} == job_ids
    assert {attempt for _, attempt in records} == {1}
    assert handled["first"], "the first worker ran no job"
    assert handled["second"], "the second worker ran no job"
    assert sum(worker.stats.completed for worker in workers) == job_count
    async with database.read_only() as session:
        statuses = list(await session.scalars(select(Job.status)))
    assert statuses == [JobStatus.COMPLETED.value] * job_count


# -- maintenance ---------------------------------------------------------------------------------------------


def maintenance_job(job_type: str) -> ClaimedJob:
    return ClaimedJob(
        id=uuid.uuid4(),
        user_id=None,
        job_type=job_type,
        input_data={},
        attempt=1,
        max_attempts=3,
        lease_token=uuid.uuid4(),
    )


def maintenance_handlers(database: Database, storage: FileStorage) -> MaintenanceHandlers:
    queue = JobQueue(database, lease_seconds=30.0, retry_base_seconds=RETRY_BASE_SECONDS)
    return MaintenanceHandlers(database, storage, queue)


async def test_sweep_deletes_unreferenced_job_files(database: Database, storage: FileStorage) -> None:
    user_id = await insert_user(database)
    deleted_job = uuid.uuid4()
    completed_job = await insert_job(database, user_id=user_id, status=JobStatus.COMPLETED)
    referenced = f"jobs/{completed_job}/{uuid.uuid4().hex}.png"
    async with database.transaction() as session:
        await session.execute(
            update(Job).where(Job.id == completed_job).values(output_data={"images": [{"key": referenced}]})
        )
    failed_job = await insert_job(database, user_id=user_id, status=JobStatus.FAILED)
    running_job = await insert_job(database, user_id=user_id, status=JobStatus.PROCESSING)
    pending_job = await insert_job(database, user_id=user_id)
    old_maintenance = await insert_job(
        database, job_type=SWEEP_JOB_FILES, status=JobStatus.COMPLETED, created_at=utcnow() - timedelta(days=8)
    )

    expected_deleted = [
        f"jobs/{deleted_job}/a.png",
        f"jobs/{deleted_job}/b.png",
        f"jobs/{completed_job}/stray.png",
        f"jobs/{failed_job}/partial.png",
    ]
    expected_kept = [
        referenced,
        f"jobs/{running_job}/partial.png",
        f"jobs/{pending_job}/early.png",
        f"users/{user_id}/avatars/{uuid.uuid4().hex}.png",
        f"jobsarchive/{deleted_job}/a.png",
        f"chats/{deleted_job}/a.png",
    ]
    for key in expected_deleted + expected_kept:
        await storage.put(key, PNG, content_type="image/png")

    outcome = await maintenance_handlers(database, storage).sweep_job_files(maintenance_job(SWEEP_JOB_FILES))

    for key in expected_deleted:
        assert await storage.get(key) is None, f"{key} was kept"
    for key in expected_kept:
        assert await storage.get(key) is not None, f"{key} was deleted"
    assert outcome.output_data == {"deleted_files": len(expected_deleted), "pruned_jobs": 1}
    async with database.read_only() as session:
        remaining = set(await session.scalars(select(Job.id)))
    assert old_maintenance not in remaining
    assert {completed_job, failed_job, running_job, pending_job} <= remaining


async def test_expire_sessions_deletes_ended_sessions(database: Database, storage: FileStorage) -> None:
    user_id = await insert_user(database)
    now = utcnow()
    sessions = {
        "expired 8 days ago": AuthSession(user_id=user_id, expires_at=now - timedelta(days=8)),
        "revoked 8 days ago": AuthSession(
            user_id=user_id, expires_at=now + timedelta(days=20), revoked_at=now - timedelta(days=8)
        ),
        "expired 1 day ago": AuthSession(user_id=user_id, expires_at=now - timedelta(days=1)),
        "revoked 1 day ago": AuthSession(
            user_id=user_id, expires_at=now + timedelta(days=20), revoked_at=now - timedelta(days=1)
        ),
        "live": AuthSession(user_id=user_id, expires_at=now + timedelta(days=20)),
    }
    async with database.transaction() as session:
        session.add_all(sessions.values())
        await session.flush()
    ids = {name: auth_session.id for name, auth_session in sessions.items()}

    outcome = await maintenance_handlers(database, storage).expire_sessions(maintenance_job(EXPIRE_SESSIONS))

    assert outcome.output_data == {"deleted_sessions": 2}
    async with database.read_only() as session:
        remaining = set(await session.scalars(select(AuthSession.id)))
    assert ids["expired 8 days ago"] not in remaining
    assert ids["revoked 8 days ago"] not in remaining
    for name in ("expired 1 day ago", "revoked 1 day ago", "live"):
        assert ids[name] in remaining, f"the session {name} was deleted"


# -- the `pocketllm worker` command --------------------------------------------------------------------------


async def queue_image_job(client: httpx.AsyncClient, fake: FakeProvider) -> uuid.UUID:
    """Sign up, activate OpenAI at the fake provider, queue an image job and return its id."""
    headers = auth_headers(await sign_up(client, f"images-{uuid.uuid4().hex[:10]}@example.com"))
    activated = await client.post(
        "/v1/providers/activate",
        headers=headers,
        json={"provider": "openai", "api_key": VALID_API_KEY, "base_url": fake.openai_base_url, "verify": False},
    )
    assert activated.status_code == 200, activated.text
    queued = await client.post("/v1/jobs/image-generation", headers=headers, json=IMAGE_JOB)
    assert queued.status_code == 202, queued.text
    return uuid.UUID(queued.json()["job_id"])


def worker_environment(settings: Settings, database_url: str, **extra: str) -> dict[str, str]:
    """Build the environment of a `pocketllm worker` subprocess from the test's database, keys and data
    directory, without this process's own settings."""
    inherited = {name: os.environ[name] for name in ("PATH", "HOME", "LANG", "PYTHONPATH") if name in os.environ}
    assert settings.encryption_key is not None
    return {
        **inherited,
        "DATABASE_URL": database_url,
        "ENVIRONMENT": "test",
        "JWT_SECRET": TEST_JWT_SECRET,
        "ENCRYPTION_KEY": settings.encryption_key,
        "DATA_DIR": str(settings.data_dir),
        "JOB_LEASE_SECONDS": str(SUBPROCESS_LEASE_SECONDS),
        "JOB_HEARTBEAT_SECONDS": str(SUBPROCESS_HEARTBEAT_SECONDS),
        "JOB_POLL_SECONDS": str(SUBPROCESS_POLL_SECONDS),
        "ALLOW_PRIVATE_PROVIDER_URLS": "true",
        "MIGRATE_ON_START": "false",
        "LOG_LEVEL": "INFO",
        **extra,
    }


@contextmanager
def worker_process(environment: dict[str, str], directory: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start `pocketllm worker` with its log in `directory`, and kill it on exit if it still runs."""
    log_path = directory / "worker.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "pocketllm", "worker"],
            env=environment,
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=WAIT_SECONDS)


def worker_log(directory: Path) -> str:
    return (directory / "worker.log").read_text(errors="replace")


async def wait_for_image_request(
    fake: FakeProvider, process: subprocess.Popen[bytes], directory: Path, *, timeout: float = 30.0
) -> None:
    """Wait until the fake provider has received an image request. Fail early if the worker process exits."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the worker exited with {process.returncode}:\n{worker_log(directory)}")
        try:
            await asyncio.to_thread(fake.wait_for_requests, "/images/generations", count=1, timeout=0.5)
            return
        except TimeoutError:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the worker sent no image request within {timeout} s:\n{worker_log(directory)}"
                ) from None


async def wait_until_finished(worker: JobWorker, database: Database, job_id: uuid.UUID) -> Job:
    """Wait, one processed attempt at a time, until the job is finished. Callers bound it with asyncio.wait_for."""
    processed = 1
    while True:
        await worker.wait_processed(processed)
        row = await load_job(database, job_id)
        if row.status not in (JobStatus.PENDING.value, JobStatus.PROCESSING.value):
            return row
        processed += 1


@pytest.mark.postgres_only
async def test_killed_worker_job_is_taken_over(
    app: FastAPI,
    client: httpx.AsyncClient,
    database: Database,
    database_url: str,
    settings: Settings,
    fake_provider: FakeProvider,
    tmp_path: Path,
) -> None:
    job_id = await queue_image_job(client, fake_provider)
    # The first image request hangs, so the subprocess is in the middle of the job when it is killed.
    fake_provider.fail_next("/images/generations", delay_seconds=30)

    with worker_process(worker_environment(settings, database_url), tmp_path) as process:
        await wait_for_image_request(fake_provider, process, tmp_path)
        process.kill()
        process.wait(timeout=WAIT_SECONDS)

    running_row = await load_job(database, job_id)
    assert running_row.status == JobStatus.PROCESSING.value
    assert running_row.attempts == 1
    worker = build_job_worker(settings, database, app.state.storage, app.state.providers)
    async with running(worker):
        row = await asyncio.wait_for(wait_until_finished(worker, database, job_id), 20)

    assert row.status == JobStatus.COMPLETED.value, row.error_log
    assert row.attempts == 2
    assert row.worker_id == worker.worker_id
    assert row.output_data is not None
    images = row.output_data["images"]
    assert len(images) == 1
    stored = await app.state.storage.get(images[0]["key"])
    assert stored is not None
    assert stored.data.startswith(b"\x89PNG")
    assert len(fake_provider.requests_to("/images/generations")) == 2


@pytest.mark.postgres_only
async def test_sigterm_releases_running_job(
    client: httpx.AsyncClient,
    database: Database,
    database_url: str,
    settings: Settings,
    fake_provider: FakeProvider,
    tmp_path: Path,
) -> None:
    job_id = await queue_image_job(client, fake_provider)
    fake_provider.fail_next("/images/generations", delay_seconds=30)
    environment = worker_environment(settings, database_url, JOB_SHUTDOWN_GRACE_SECONDS="0")

    with worker_process(environment, tmp_path) as process:
        await wait_for_image_request(fake_provider, process, tmp_path)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        returncode = await asyncio.to_thread(process.wait, WAIT_SECONDS)
        elapsed = time.monotonic() - started

    assert returncode == 0, worker_log(tmp_path)
    assert elapsed < 5.0
    row = await load_job(database, job_id)
    assert row.status == JobStatus.PENDING.value
    assert row.attempts == 0
    assert row.lease_token is None
    assert row.worker_id is None
    assert "job.released" in worker_log(tmp_path)


def test_worker_rejects_heartbeat_not_below_lease(tmp_path: Path) -> None:
    environment = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'worker.db'}",
        "ENVIRONMENT": "test",
        "JWT_SECRET": TEST_JWT_SECRET,
        "DATA_DIR": str(tmp_path / "data"),
        "MIGRATE_ON_START": "false",
        "JOB_LEASE_SECONDS": "1",
        "JOB_HEARTBEAT_SECONDS": "2",
    }

    result = subprocess.run(
        [sys.executable, "-m", "pocketllm", "worker"],
        env=environment,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 2, result.stderr
    assert "job_heartbeat_seconds" in result.stderr.lower()
    assert "Traceback" not in result.stderr


async def test_claim_failures_back_off(tmp_path: Path) -> None:
    # A database without the jobs table: every claim fails, as during an outage or before migrations.
    database = Database(create_engine(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"))
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}", tmp_path / "data")
    queue = JobQueue(database, lease_seconds=5, retry_base_seconds=1)
    worker = JobWorker(
        queue,
        {},
        storage=build_storage(settings),
        concurrency=1,
        poll_seconds=0.01,
        heartbeat_seconds=1,
        shutdown_grace_seconds=0,
    )
    stop = asyncio.Event()
    try:
        running = asyncio.create_task(worker.run(stop))
        # The observation window: without backoff a 10 ms poll would fail about 60 times in it.
        await asyncio.sleep(0.6)
        stop.set()
        await asyncio.wait_for(running, timeout=5)
    finally:
        await database.dispose()

    assert 1 <= worker.stats.claim_failures <= 8
