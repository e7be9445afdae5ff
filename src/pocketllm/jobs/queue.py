"""The job queue on the `jobs` table: claiming, leases, results, retries and periodic scheduling.

Every step is one short transaction and no transaction stays open while a job runs:

1. `claim` takes the oldest due job, counts the attempt, and leases it with a fresh token. On PostgreSQL
   the row is locked with `FOR UPDATE SKIP LOCKED`, so concurrent claims never wait for or take the same
   row. On SQLite claims are write transactions, which the engine serializes with BEGIN IMMEDIATE.
2. `renew` moves the lease forward while the job runs. It fails once the job was cancelled or another
   worker took it over, which tells the worker to stop.
3. `complete`, `fail` and `release` store the outcome, but only while the lease token still matches.

A worker that dies leaves its job `processing` with a lease that runs out; the next claim after that
takes the job again, or marks it failed when it has no attempts left.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import structlog
from sqlalchemy import ColumnElement, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from pocketllm.db.engine import Database
from pocketllm.db.types import utcnow
from pocketllm.kit.text import storable_text
from pocketllm.models.job import ACTIVE_STATUSES, MAX_ERROR_LOG_LENGTH, Job, JobStatus

log = structlog.get_logger(__name__)

# Retry delays double from the base up to this cap.
MAX_RETRY_DELAY_SECONDS = 3600.0
INTERRUPTED_ERROR = "The last attempt was interrupted (its worker stopped) and no attempts are left."

FailOutcome = Literal["failed", "retry_scheduled", "lease_lost"]


@dataclass(frozen=True, slots=True)
class ClaimedJob:
    """One attempt at a job, as handed to a handler. Detached from any database session."""

    id: uuid.UUID
    user_id: uuid.UUID | None
    job_type: str
    input_data: dict[str, Any]
    # The attempt number of this claim, from 1.
    attempt: int
    max_attempts: int
    lease_token: uuid.UUID

    @property
    def is_last_attempt(self) -> bool:
        return self.attempt >= self.max_attempts


def retry_delay(attempt: int, base_seconds: float) -> timedelta:
    """Return the wait after failed attempt number `attempt`: the base, twice it, four times it, up to an hour."""
    exponent = min(max(attempt - 1, 0), 32)
    return timedelta(seconds=min(base_seconds * 2**exponent, MAX_RETRY_DELAY_SECONDS))


def storable_json(value: Any) -> Any:
    """Return a copy of `value` that both databases can store as JSON.

    Provider responses end up in job results, and they can contain NUL characters, unpaired surrogates or
    numbers too large for JSON (infinity after a conversion). Strings are cleaned like `storable_text`,
    and numbers that are not finite become None.
    """
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {storable_text(str(key)): storable_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [storable_json(item) for item in value]
    return value


def clip_error(text: str) -> str:
    text = " ".join(storable_text(text).split())
    if len(text) > MAX_ERROR_LOG_LENGTH:
        text = text[: MAX_ERROR_LOG_LENGTH - 1] + "…"
    return text


class JobQueue:
    """Queue operations for workers. Safe to use from any number of workers and processes at once."""

    def __init__(self, database: Database, *, lease_seconds: float, retry_base_seconds: float) -> None:
        if lease_seconds <= 0 or retry_base_seconds <= 0:
            raise ValueError("lease_seconds and retry_base_seconds must be positive")
        self._database = database
        self.lease = timedelta(seconds=lease_seconds)
        self._retry_base_seconds = retry_base_seconds

    async def claim(self, worker_id: str, *, now: datetime | None = None) -> ClaimedJob | None:
        """Lease the oldest due job to `worker_id`, or return None when no job is due."""
        while True:
            now = now or utcnow()
            # A read first, so that idle workers polling the queue take no write lock on SQLite and open no
            # write transaction on PostgreSQL.
            async with self._database.read_only() as session:
                due = await session.scalar(
                    select(Job.id).where(Job.status.in_(ACTIVE_STATUSES), Job.run_at <= now).limit(1)
                )
            if due is None:
                return None
            query = (
                select(Job)
                .where(Job.status.in_(ACTIVE_STATUSES), Job.run_at <= now)
                .order_by(Job.run_at, Job.id)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            async with self._database.transaction() as session:
                job = await session.scalar(query)
                if job is None:
                    return None
                if job.status == JobStatus.PROCESSING.value and job.attempts >= job.max_attempts:
                    # Its worker died during the last attempt: nothing is left to try.
                    job.status = JobStatus.FAILED.value
                    job.error_log = clip_error(
                        f"{job.error_log}\n{INTERRUPTED_ERROR}" if job.error_log else INTERRUPTED_ERROR
                    )
                    job.lease_token = None
                    job.finished_at = now
                    log.error("job.failed", job_id=str(job.id), job_type=job.job_type, attempts=job.attempts)
                    continue
                if job.status == JobStatus.PROCESSING.value:
                    log.warning("job.lease_expired", job_id=str(job.id), job_type=job.job_type, worker=job.worker_id)
                job.status = JobStatus.PROCESSING.value
                job.attempts += 1
                job.lease_token = uuid.uuid4()
                job.run_at = now + self.lease
                job.worker_id = worker_id[:120]
                job.started_at = job.started_at or now
                return ClaimedJob(
                    id=job.id,
                    user_id=job.user_id,
                    job_type=job.job_type,
                    input_data=dict(job.input_data),
                    attempt=job.attempts,
                    max_attempts=job.max_attempts,
                    lease_token=job.lease_token,
                )

    async def renew(self, job: ClaimedJob, *, now: datetime | None = None) -> bool:
        """Extend the lease; False when the job was cancelled, deleted or taken over meanwhile."""
        now = now or utcnow()
        statement = update(Job).where(*_held(job)).values(run_at=now + self.lease).returning(Job.id)
        async with self._database.transaction() as session:
            return (await session.execute(statement)).scalar_one_or_none() is not None

    async def complete(self, job: ClaimedJob, output_data: dict[str, Any], *, now: datetime | None = None) -> bool:
        """Store the result; False when the lease was lost and the result must be thrown away."""
        now = now or utcnow()
        statement = (
            update(Job)
            .where(*_held(job))
            .values(
                status=JobStatus.COMPLETED.value,
                output_data=storable_json(output_data),
                # The failures of earlier attempts no longer describe the job.
                error_log=None,
                lease_token=None,
                finished_at=now,
                updated_at=now,
            )
            .returning(Job.id)
        )
        async with self._database.transaction() as session:
            return (await session.execute(statement)).scalar_one_or_none() is not None

    async def fail(
        self,
        job: ClaimedJob,
        error: str,
        *,
        retry: bool,
        retry_after_seconds: float | None = None,
        now: datetime | None = None,
    ) -> FailOutcome:
        """Store a failed attempt: retry later with backoff, or mark the job failed when `retry` is False
        or no attempts are left. `retry_after_seconds` (a provider's Retry-After) lengthens the wait."""
        now = now or utcnow()
        error = clip_error(error)
        final = not retry or job.is_last_attempt
        values: dict[str, Any] = {"error_log": error, "lease_token": None, "updated_at": now}
        if final:
            values |= {"status": JobStatus.FAILED.value, "finished_at": now}
        else:
            delay = retry_delay(job.attempt, self._retry_base_seconds)
            if retry_after_seconds is not None:
                delay = max(delay, timedelta(seconds=min(retry_after_seconds, MAX_RETRY_DELAY_SECONDS)))
            values |= {"status": JobStatus.PENDING.value, "run_at": now + delay}
        statement = update(Job).where(*_held(job)).values(values).returning(Job.id)
        async with self._database.transaction() as session:
            stored = (await session.execute(statement)).scalar_one_or_none()
        if stored is None:
            return "lease_lost"
        return "failed" if final else "retry_scheduled"

    async def release(self, job: ClaimedJob, *, now: datetime | None = None) -> bool:
        """Give the job back unfinished, due at once, without counting this attempt (worker shutdown)."""
        now = now or utcnow()
        statement = (
            update(Job)
            .where(*_held(job))
            .values(
                status=JobStatus.PENDING.value,
                run_at=now,
                attempts=Job.attempts - 1,
                lease_token=None,
                worker_id=None,
                updated_at=now,
            )
            .returning(Job.id)
        )
        async with self._database.transaction() as session:
            return (await session.execute(statement)).scalar_one_or_none() is not None

    async def schedule(
        self, job_type: str, *, period_seconds: int, max_attempts: int, now: datetime | None = None
    ) -> bool:
        """Queue the maintenance job `job_type` for the current period unless it is queued already.

        Any number of workers may call this at once: the period's `schedule_key` is unique, so exactly one
        insert wins. Returns whether this call queued it.
        """
        now = now or utcnow()
        period = int(now.timestamp() // period_seconds)
        values: dict[str, Any] = {
            "id": uuid.uuid4(),
            "user_id": None,
            "job_type": job_type,
            "status": JobStatus.PENDING.value,
            "input_data": {},
            "schedule_key": f"{job_type}:{period_seconds}:{period}",
            "attempts": 0,
            "max_attempts": max_attempts,
            "run_at": now,
            "created_at": now,
            "updated_at": now,
        }
        insert = postgresql.insert if self._database.dialect == "postgresql" else sqlite.insert
        statement = insert(Job).values(values).on_conflict_do_nothing(index_elements=["schedule_key"]).returning(Job.id)
        async with self._database.transaction() as session:
            return (await session.execute(statement)).scalar_one_or_none() is not None

    async def prune_finished_maintenance(self, *, older_than: timedelta, now: datetime | None = None) -> int:
        """Delete finished maintenance jobs older than `older_than`; returns how many."""
        now = now or utcnow()
        statement = delete(Job).where(
            Job.user_id.is_(None), Job.status.not_in(ACTIVE_STATUSES), Job.created_at < now - older_than
        )
        async with self._database.transaction() as session:
            result = await session.execute(statement)
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def depth(self) -> int:
        """Return the number of pending jobs, due or not."""
        async with self._database.read_only() as session:
            count = await session.scalar(
                select(func.count()).select_from(Job).where(Job.status == JobStatus.PENDING.value)
            )
        return int(count or 0)


def _held(job: ClaimedJob) -> tuple[ColumnElement[bool], ...]:
    """Conditions that hold only while this claim's lease is current."""
    return (Job.id == job.id, Job.status == JobStatus.PROCESSING.value, Job.lease_token == job.lease_token)
