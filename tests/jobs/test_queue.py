"""JobQueue on SQLite and PostgreSQL: claims, leases, retries, releases, periodic scheduling and pruning.

Each test arranges its jobs as rows and passes `now=` to every queue call, so the tests set the clock
instead of sleeping.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, update

from pocketllm.db.engine import Database, create_engine
from pocketllm.db.types import utcnow
from pocketllm.jobs.queue import INTERRUPTED_ERROR, MAX_RETRY_DELAY_SECONDS, JobQueue, retry_delay, storable_json
from pocketllm.models import Job, User
from pocketllm.models.job import MAX_ERROR_LOG_LENGTH, JobStatus

LEASE_SECONDS = 30.0
RETRY_BASE_SECONDS = 10.0
TEST_JOB_TYPE = "test.echo"
LEASE = timedelta(seconds=LEASE_SECONDS)


@pytest.fixture
def queue(database: Database) -> JobQueue:
    return JobQueue(database, lease_seconds=LEASE_SECONDS, retry_base_seconds=RETRY_BASE_SECONDS)


@pytest.fixture
def now() -> datetime:
    return utcnow()


async def insert_job(
    database: Database,
    *,
    run_at: datetime,
    status: JobStatus = JobStatus.PENDING,
    attempts: int = 0,
    max_attempts: int = 3,
    user_id: uuid.UUID | None = None,
    created_at: datetime | None = None,
    **fields: Any,
) -> uuid.UUID:
    job = Job(
        id=uuid.uuid4(),
        user_id=user_id,
        job_type=fields.pop("job_type", TEST_JOB_TYPE),
        status=status.value,
        input_data=fields.pop("input_data", {"value": 1}),
        attempts=attempts,
        max_attempts=max_attempts,
        run_at=run_at,
        created_at=created_at or run_at,
        updated_at=created_at or run_at,
        **fields,
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
    user = User(email=f"queue-{uuid.uuid4().hex[:10]}@example.com")
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


# -- claim ---------------------------------------------------------------------------------------------------


async def test_claim_takes_oldest_due_job(database: Database, queue: JobQueue, now: datetime) -> None:
    newer = await insert_job(database, run_at=now - timedelta(seconds=5))
    oldest = await insert_job(database, run_at=now - timedelta(seconds=10), input_data={"prompt": "oldest"})
    await insert_job(database, run_at=now + timedelta(seconds=60))

    claimed = await queue.claim("worker-a", now=now)

    assert claimed is not None
    assert claimed.id == oldest
    assert claimed.id != newer
    assert claimed.job_type == TEST_JOB_TYPE
    assert claimed.input_data == {"prompt": "oldest"}
    assert claimed.attempt == 1
    assert claimed.max_attempts == 3
    row = await load_job(database, oldest)
    assert row.status == JobStatus.PROCESSING.value
    assert row.attempts == 1
    assert row.run_at == now + LEASE
    assert row.lease_token == claimed.lease_token
    assert row.worker_id == "worker-a"
    assert row.started_at == now


async def test_claim_returns_none_without_due_jobs(database: Database, queue: JobQueue, now: datetime) -> None:
    assert await queue.claim("worker-a", now=now) is None

    future = await insert_job(database, run_at=now + timedelta(seconds=1))
    for status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED):
        await insert_job(database, run_at=now - timedelta(hours=1), status=status)

    assert await queue.claim("worker-a", now=now) is None
    row = await load_job(database, future)
    assert row.status == JobStatus.PENDING.value
    assert row.attempts == 0


async def test_claims_at_same_time_take_different_jobs(database: Database, queue: JobQueue, now: datetime) -> None:
    first_id = await insert_job(database, run_at=now - timedelta(seconds=2))
    second_id = await insert_job(database, run_at=now - timedelta(seconds=1))

    first = await queue.claim("worker-a", now=now)
    second = await queue.claim("worker-b", now=now)
    third = await queue.claim("worker-c", now=now)

    assert first is not None
    assert second is not None
    assert (first.id, second.id) == (first_id, second_id)
    assert first.lease_token != second.lease_token
    assert third is None


async def test_claim_does_not_take_leased_job(database: Database, queue: JobQueue, now: datetime) -> None:
    job_id = await insert_job(database, run_at=now)
    claimed = await queue.claim("worker-a", now=now)
    assert claimed is not None

    just_before_expiry = now + LEASE - timedelta(milliseconds=1)

    assert await queue.claim("worker-b", now=just_before_expiry) is None
    row = await load_job(database, job_id)
    assert row.worker_id == "worker-a"
    assert row.attempts == 1


# -- leases --------------------------------------------------------------------------------------------------


async def test_expired_lease_moves_job_to_new_claim(database: Database, queue: JobQueue, now: datetime) -> None:
    job_id = await insert_job(database, run_at=now)
    old = await queue.claim("worker-a", now=now)
    assert old is not None
    later = now + LEASE + timedelta(seconds=1)

    new = await queue.claim("worker-b", now=later)

    assert new is not None
    assert new.id == job_id
    assert new.attempt == 2
    assert new.lease_token != old.lease_token
    assert await queue.renew(old, now=later) is False
    assert await queue.complete(old, {"from": "old"}, now=later) is False
    assert await queue.fail(old, "old attempt failed", retry=True, now=later) == "lease_lost"
    assert await queue.release(old, now=later) is False
    row = await load_job(database, job_id)
    assert row.status == JobStatus.PROCESSING.value
    assert row.lease_token == new.lease_token
    assert row.worker_id == "worker-b"
    assert row.attempts == 2
    assert row.run_at == later + LEASE
    assert row.output_data is None
    assert row.error_log is None

    assert await queue.complete(new, {"from": "new"}, now=later) is True
    row = await load_job(database, job_id)
    assert row.status == JobStatus.COMPLETED.value
    assert row.output_data == {"from": "new"}
    assert row.lease_token is None
    assert row.finished_at == later


async def test_renew_moves_lease_forward(database: Database, queue: JobQueue, now: datetime) -> None:
    job_id = await insert_job(database, run_at=now)
    claimed = await queue.claim("worker-a", now=now)
    assert claimed is not None
    renewed_at = now + timedelta(seconds=20)

    assert await queue.renew(claimed, now=renewed_at) is True

    row = await load_job(database, job_id)
    assert row.run_at == renewed_at + LEASE
    assert await queue.claim("worker-b", now=now + LEASE + timedelta(seconds=1)) is None


async def test_expired_last_attempt_is_marked_failed(database: Database, queue: JobQueue, now: datetime) -> None:
    interrupted = await insert_job(
        database,
        run_at=now - timedelta(seconds=2),
        status=JobStatus.PROCESSING,
        attempts=3,
        max_attempts=3,
        lease_token=uuid.uuid4(),
        worker_id="dead-worker",
        error_log="The provider failed to respond.",
    )
    waiting = await insert_job(database, run_at=now - timedelta(seconds=1))

    claimed = await queue.claim("worker-a", now=now)

    assert claimed is not None
    assert claimed.id == waiting
    row = await load_job(database, interrupted)
    assert row.status == JobStatus.FAILED.value
    assert row.attempts == 3
    assert row.lease_token is None
    assert row.finished_at == now
    assert row.error_log is not None
    assert INTERRUPTED_ERROR in row.error_log
    assert "The provider failed to respond." in row.error_log


async def test_expired_earlier_attempt_is_claimed_again(database: Database, queue: JobQueue, now: datetime) -> None:
    job_id = await insert_job(
        database,
        run_at=now - timedelta(seconds=1),
        status=JobStatus.PROCESSING,
        attempts=2,
        max_attempts=3,
        lease_token=uuid.uuid4(),
        worker_id="dead-worker",
    )

    claimed = await queue.claim("worker-a", now=now)

    assert claimed is not None
    assert claimed.id == job_id
    assert claimed.attempt == 3
    assert claimed.is_last_attempt
    row = await load_job(database, job_id)
    assert row.status == JobStatus.PROCESSING.value
    assert row.worker_id == "worker-a"


async def test_renew_fails_after_cancel(database: Database, queue: JobQueue, now: datetime) -> None:
    job_id = await insert_job(database, run_at=now)
    claimed = await queue.claim("worker-a", now=now)
    assert claimed is not None
    assert await queue.renew(claimed, now=now + timedelta(seconds=1)) is True

    await cancel_in_database(database, job_id)

    assert await queue.renew(claimed, now=now + timedelta(seconds=2)) is False
    assert await queue.complete(claimed, {"images": []}, now=now + timedelta(seconds=2)) is False
    row = await load_job(database, job_id)
    assert row.status == JobStatus.CANCELLED.value
    assert row.output_data is None


# -- fail and release ----------------------------------------------------------------------------------------


async def test_fail_retries_with_doubling_delay(database: Database, queue: JobQueue, now: datetime) -> None:
    job_id = await insert_job(database, run_at=now, max_attempts=4)
    first = await queue.claim("worker-a", now=now)
    assert first is not None

    assert await queue.fail(first, "The provider failed to respond.", retry=True, now=now) == "retry_scheduled"

    row = await load_job(database, job_id)
    assert row.status == JobStatus.PENDING.value
    assert row.run_at == now + timedelta(seconds=RETRY_BASE_SECONDS)
    assert row.error_log == "The provider failed to respond."
    assert row.lease_token is None
    assert row.finished_at is None
    assert await queue.claim("worker-a", now=now + timedelta(seconds=RETRY_BASE_SECONDS - 1)) is None

    retried_at = now + timedelta(seconds=RETRY_BASE_SECONDS)
    second = await queue.claim("worker-a", now=retried_at)
    assert second is not None
    assert second.attempt == 2

    assert await queue.fail(second, "The provider timed out.", retry=True, now=retried_at) == "retry_scheduled"

    row = await load_job(database, job_id)
    assert row.status == JobStatus.PENDING.value
    assert row.run_at == retried_at + timedelta(seconds=2 * RETRY_BASE_SECONDS)
    assert row.error_log == "The provider timed out."
    assert row.attempts == 2


@pytest.mark.parametrize(("retry_after", "expected_seconds"), [(120.0, 120.0), (3.0, RETRY_BASE_SECONDS)])
async def test_fail_waits_for_retry_after(
    database: Database, queue: JobQueue, now: datetime, retry_after: float, expected_seconds: float
) -> None:
    job_id = await insert_job(database, run_at=now)
    claimed = await queue.claim("worker-a", now=now)
    assert claimed is not None

    outcome = await queue.fail(claimed, "Rate limited.", retry=True, retry_after_seconds=retry_after, now=now)

    assert outcome == "retry_scheduled"
    row = await load_job(database, job_id)
    assert row.run_at == now + timedelta(seconds=expected_seconds)


async def test_fail_on_last_attempt_marks_failed(database: Database, queue: JobQueue, now: datetime) -> None:
    job_id = await insert_job(database, run_at=now, max_attempts=1)
    claimed = await queue.claim("worker-a", now=now)
    assert claimed is not None
    failed_at = now + timedelta(seconds=3)

    assert await queue.fail(claimed, "The provider failed to respond.", retry=True, now=failed_at) == "failed"

    row = await load_job(database, job_id)
    assert row.status == JobStatus.FAILED.value
    assert row.error_log == "The provider failed to respond."
    assert row.finished_at == failed_at
    assert row.lease_token is None
    assert await queue.claim("worker-a", now=failed_at + timedelta(days=1)) is None


async def test_fail_without_retry_marks_failed(database: Database, queue: JobQueue, now: datetime) -> None:
    job_id = await insert_job(database, run_at=now, max_attempts=3)
    claimed = await queue.claim("worker-a", now=now)
    assert claimed is not None

    assert await queue.fail(claimed, "The API key was rejected.", retry=False, now=now) == "failed"

    row = await load_job(database, job_id)
    assert row.status == JobStatus.FAILED.value
    assert row.attempts == 1
    assert row.error_log == "The API key was rejected."
    assert row.finished_at == now


async def test_fail_clips_long_error(database: Database, queue: JobQueue, now: datetime) -> None:
    job_id = await insert_job(database, run_at=now)
    claimed = await queue.claim("worker-a", now=now)
    assert claimed is not None
    error = "first line\n\n   second line " + "x" * (2 * MAX_ERROR_LOG_LENGTH)

    await queue.fail(claimed, error, retry=True, now=now)

    row = await load_job(database, job_id)
    assert row.error_log is not None
    assert len(row.error_log) == MAX_ERROR_LOG_LENGTH
    assert row.error_log.startswith("first line second line x")
    assert row.error_log.endswith("…")


async def test_release_returns_job_uncounted(database: Database, queue: JobQueue, now: datetime) -> None:
    job_id = await insert_job(database, run_at=now - timedelta(seconds=1))
    claimed = await queue.claim("worker-a", now=now)
    assert claimed is not None
    released_at = now + timedelta(seconds=5)

    assert await queue.release(claimed, now=released_at) is True

    row = await load_job(database, job_id)
    assert row.status == JobStatus.PENDING.value
    assert row.attempts == 0
    assert row.run_at == released_at
    assert row.lease_token is None
    assert row.worker_id is None
    assert await queue.release(claimed, now=released_at) is False
    again = await queue.claim("worker-b", now=released_at)
    assert again is not None
    assert again.id == job_id
    assert again.attempt == 1


def test_retry_delay_doubles_up_to_cap() -> None:
    assert retry_delay(1, 10.0) == timedelta(seconds=10)
    assert retry_delay(2, 10.0) == timedelta(seconds=20)
    assert retry_delay(3, 10.0) == timedelta(seconds=40)
    assert retry_delay(20, 10.0) == timedelta(seconds=MAX_RETRY_DELAY_SECONDS)
    assert retry_delay(10_000, 10.0) == timedelta(seconds=MAX_RETRY_DELAY_SECONDS)


# -- schedule, prune and depth -------------------------------------------------------------------------------

SCHEDULE_PERIOD_SECONDS = 3600
# The start of an hour, so that adding less than an hour stays in the same period.
PERIOD_START = datetime(2030, 1, 1, 12, tzinfo=UTC)


async def test_concurrent_schedule_queues_one_job(database: Database, database_url: str) -> None:
    schedulers = [Database(create_engine(database_url)) for _ in range(10)]
    scheduled_at = PERIOD_START + timedelta(minutes=10)
    try:
        queues = [JobQueue(db, lease_seconds=LEASE_SECONDS, retry_base_seconds=RETRY_BASE_SECONDS) for db in schedulers]
        # Each engine opens its connection first, so the inserts below race each other and not the pool.
        for scheduler in schedulers:
            async with scheduler.read_only():
                pass

        results = await asyncio.gather(
            *(
                queue.schedule(
                    "maintenance.test", period_seconds=SCHEDULE_PERIOD_SECONDS, max_attempts=2, now=scheduled_at
                )
                for queue in queues
            )
        )
        again = await queues[0].schedule(
            "maintenance.test",
            period_seconds=SCHEDULE_PERIOD_SECONDS,
            max_attempts=2,
            now=scheduled_at + timedelta(minutes=40),
        )
    finally:
        for scheduler in schedulers:
            await scheduler.dispose()

    assert results.count(True) == 1
    assert again is False
    async with database.read_only() as session:
        rows = list(await session.scalars(select(Job)))
    assert len(rows) == 1
    row = rows[0]
    assert row.job_type == "maintenance.test"
    assert row.user_id is None
    assert row.status == JobStatus.PENDING.value
    assert row.max_attempts == 2
    assert row.attempts == 0
    assert row.run_at == scheduled_at


async def test_schedule_queues_again_next_period(database: Database, queue: JobQueue) -> None:
    first = await queue.schedule(
        "maintenance.test", period_seconds=SCHEDULE_PERIOD_SECONDS, max_attempts=2, now=PERIOD_START
    )
    next_period = await queue.schedule(
        "maintenance.test",
        period_seconds=SCHEDULE_PERIOD_SECONDS,
        max_attempts=2,
        now=PERIOD_START + timedelta(seconds=SCHEDULE_PERIOD_SECONDS),
    )
    other_type = await queue.schedule(
        "maintenance.other", period_seconds=SCHEDULE_PERIOD_SECONDS, max_attempts=2, now=PERIOD_START
    )

    assert (first, next_period, other_type) == (True, True, True)
    async with database.read_only() as session:
        count = await session.scalar(select(func.count()).select_from(Job))
    assert count == 3


async def test_prune_deletes_old_finished_maintenance(database: Database, queue: JobQueue, now: datetime) -> None:
    user_id = await insert_user(database)
    old = now - timedelta(days=8)
    old_completed = await insert_job(database, run_at=old, created_at=old, status=JobStatus.COMPLETED)
    old_failed = await insert_job(database, run_at=old, created_at=old, status=JobStatus.FAILED)
    kept = {
        "recent finished maintenance": await insert_job(
            database, run_at=now, created_at=now - timedelta(days=1), status=JobStatus.COMPLETED
        ),
        "old pending maintenance": await insert_job(database, run_at=old, created_at=old),
        "old running maintenance": await insert_job(
            database, run_at=old, created_at=old, status=JobStatus.PROCESSING, attempts=1, lease_token=uuid.uuid4()
        ),
        "old finished user job": await insert_job(
            database, run_at=old, created_at=old, status=JobStatus.COMPLETED, user_id=user_id
        ),
    }

    pruned = await queue.prune_finished_maintenance(older_than=timedelta(days=7), now=now)

    assert pruned == 2
    async with database.read_only() as session:
        remaining = set(await session.scalars(select(Job.id)))
    assert old_completed not in remaining
    assert old_failed not in remaining
    for case, job_id in kept.items():
        assert job_id in remaining, f"{case} was deleted"


async def test_depth_counts_pending_jobs(database: Database, queue: JobQueue, now: datetime) -> None:
    await insert_job(database, run_at=now - timedelta(seconds=1))
    await insert_job(database, run_at=now + timedelta(hours=1))
    await insert_job(database, run_at=now, status=JobStatus.PROCESSING, attempts=1, lease_token=uuid.uuid4())
    await insert_job(database, run_at=now, status=JobStatus.COMPLETED)

    assert await queue.depth() == 2


def test_storable_json_cleans_what_databases_reject() -> None:
    value = {"text\x00": ["a\x00b", "c\ud800d"], "inf": float("inf"), "nan": float("nan"), "n": 3, "ok": 1.5}

    assert storable_json(value) == {"text": ["ab", "c\ufffdd"], "inf": None, "nan": None, "n": 3, "ok": 1.5}
