from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import CheckConstraint, ForeignKey, Index, Integer, String, Text, UniqueConstraint, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column

from pocketllm.db.base import Base
from pocketllm.db.types import JSONType, UTCDateTime, utcnow
from pocketllm.models.mixins import Timestamps, UuidPrimaryKey

MAX_JOB_TYPE_LENGTH = 64
MAX_IDEMPOTENCY_KEY_LENGTH = 200
MAX_ERROR_LOG_LENGTH = 2000


class JobStatus(StrEnum):
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_STATUSES = (JobStatus.PENDING.value, JobStatus.PROCESSING.value)
_ACTIVE_CONDITION = text("status IN ('pending', 'processing')")


class Job(UuidPrimaryKey, Timestamps, Base):
    """A background job: the record the API shows and, while active, an entry of the queue.

    A pending job is due once `run_at` has passed. A processing job is leased by the worker holding
    `lease_token`, and `run_at` is then the end of that lease: the worker moves it forward while it works,
    and once it has passed (the worker crashed) the job is claimed again. Results are stored only by the
    holder of the current lease token, so no two workers ever finish the same attempt.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        # The queue: only active jobs are in this index, ordered by when they are due.
        Index("ix_jobs_run_at", "run_at", postgresql_where=_ACTIVE_CONDITION, sqlite_where=_ACTIVE_CONDITION),
        Index("ix_jobs_user_id_created_at", "user_id", "created_at", "id"),
        # NULLs are distinct, so jobs without an idempotency key never conflict.
        UniqueConstraint("user_id", "idempotency_key"),
        # Periodic maintenance jobs carry "<job type>:<period number>", so each period is queued once.
        UniqueConstraint("schedule_key"),
        CheckConstraint("status IN ('pending', 'processing', 'completed', 'failed', 'cancelled')", name="status_known"),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
    )

    # None for maintenance jobs, which belong to no user and are not listed by the API.
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"))
    job_type: Mapped[str] = mapped_column(String(MAX_JOB_TYPE_LENGTH))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.PENDING.value)
    input_data: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # Storage keys, never URLs: URLs are signed afresh for every response.
    output_data: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # The latest failure, readable and free of keys. Kept when a later attempt succeeds.
    error_log: Mapped[str | None] = mapped_column(Text)
    extra_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONType)
    idempotency_key: Mapped[str | None] = mapped_column(String(MAX_IDEMPOTENCY_KEY_LENGTH))
    # SHA-256 of the request that used the idempotency key, to tell a repeat from a different request.
    request_fingerprint: Mapped[str | None] = mapped_column(String(64))
    schedule_key: Mapped[str | None] = mapped_column(String(160))
    # Counted when a worker claims the job, so an attempt that crashed its worker counts too.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    run_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    worker_id: Mapped[str | None] = mapped_column(String(120))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
