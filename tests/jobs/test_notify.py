"""Notices of queued jobs on PostgreSQL: a worker that polls once an hour still starts a new job at once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from pocketllm.config import Settings
from pocketllm.db.engine import Database
from pocketllm.jobs.notify import JOBS_CHANNEL, announce_job, listener_dsn
from pocketllm.jobs.queue import JobQueue
from pocketllm.jobs.worker import JobOutcome, JobWorker
from pocketllm.storage.service import FileStorage, build_storage
from tests.fakes.provider import FakeProvider
from tests.helpers import auth_headers, sign_up
from tests.jobs.test_router import activate, queue_job
from tests.jobs.test_worker import TEST_JOB_TYPE, WAIT_SECONDS, insert_job

# Far longer than any wait here, so a job that starts within WAIT_SECONDS was started by a notice.
HOUR_SECONDS = 3600.0


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"allow_private_provider_urls": True}


async def succeed(job: Any) -> JobOutcome:
    return JobOutcome({"done": True})


@pytest.fixture
async def listening_worker(database: Database, database_url: str, settings: Settings) -> AsyncIterator[JobWorker]:
    """A worker that polls once an hour and listens for notices, running until the test ends."""
    storage: FileStorage = build_storage(settings)
    worker = JobWorker(
        JobQueue(database, lease_seconds=5.0, retry_base_seconds=5.0),
        {TEST_JOB_TYPE: succeed},
        storage=storage,
        concurrency=1,
        poll_seconds=HOUR_SECONDS,
        heartbeat_seconds=1.0,
        shutdown_grace_seconds=0.0,
        listen_dsn=listener_dsn(database_url),
    )
    assert worker.listener is not None
    stop = asyncio.Event()
    running = asyncio.create_task(worker.run(stop))
    await asyncio.wait_for(worker.listener.listening.wait(), WAIT_SECONDS)
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(running, WAIT_SECONDS)


async def queue_and_announce(database: Database) -> uuid.UUID:
    """Queue a job as another process would: the row, then the notice in a transaction of its own."""
    job_id = await insert_job(database)
    async with database.transaction() as session:
        await announce_job(session)
    return job_id


@pytest.mark.postgres_only
async def test_notice_starts_job_before_next_poll(listening_worker: JobWorker, database: Database) -> None:
    job_id = await queue_and_announce(database)

    await asyncio.wait_for(listening_worker.wait_attempted(job_id), WAIT_SECONDS)

    assert listening_worker.stats.completed == 1


@pytest.mark.postgres_only
async def test_listener_reconnects_after_losing_its_connection(
    app: FastAPI, listening_worker: JobWorker, database: Database, caplog: pytest.LogCaptureFixture
) -> None:
    # The app fixture configures logging as `pocketllm serve` does, through the standard library.
    listener = listening_worker.listener
    assert listener is not None
    async with database.transaction() as session:
        terminated = await session.scalar(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN %pocketllm_jobs%' "
                "AND pid <> pg_backend_pid()"
            )
        )
    assert terminated == 1

    await asyncio.wait_for(listener.reconnected.wait(), WAIT_SECONDS)
    job_id = await queue_and_announce(database)

    await asyncio.wait_for(listening_worker.wait_attempted(job_id), WAIT_SECONDS)
    assert "worker.listen_lost" in caplog.text
    assert "worker.listening_again" in caplog.text


@pytest.mark.postgres_only
async def test_queuing_through_api_sends_notice(
    client: httpx.AsyncClient, database_url: str, unique_email: str, fake_provider: FakeProvider
) -> None:
    headers = auth_headers(await sign_up(client, unique_email))
    await activate(client, headers, "openai", fake_provider.openai_base_url)
    dsn = listener_dsn(database_url)
    assert dsn is not None
    noticed = asyncio.Event()
    connection = await asyncpg.connect(dsn)
    try:
        await connection.add_listener(JOBS_CHANNEL, lambda *_details: noticed.set())
        await queue_job(client, headers)
        await asyncio.wait_for(noticed.wait(), WAIT_SECONDS)
    finally:
        await connection.close()


def test_listener_dsn_only_for_postgresql() -> None:
    assert listener_dsn("sqlite+aiosqlite:///data/pocketllm.db") is None
    assert (
        listener_dsn("postgresql+asyncpg://app:secret@db.internal:6432/pocketllm")
        == "postgresql://app:secret@db.internal:6432/pocketllm"
    )
