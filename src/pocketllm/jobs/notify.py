"""Wake workers in other processes when a job is queued, through PostgreSQL's LISTEN and NOTIFY.

Without it a worker learns of a new job at its next poll (JOB_POLL_SECONDS). The notice is sent in the
transaction that queues the job, so PostgreSQL delivers it at commit, when the job can be claimed, and
never for a job that was rolled back. Polling stays as it is: a notice lost while a listener reconnects
delays a job by one poll at most. SQLite has no notices; there the API wakes the worker of its own process.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from pocketllm.db.notices import NoticeListener, listener_dsn

__all__ = ["JOBS_CHANNEL", "JobListener", "announce_job", "listener_dsn"]

JOBS_CHANNEL = "pocketllm_jobs"
_NOTIFY = select(func.pg_notify(JOBS_CHANNEL, ""))


async def announce_job(session: AsyncSession) -> None:
    """Tell listening workers that a job is due once the session's transaction commits (PostgreSQL only)."""
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(_NOTIFY)


class JobListener(NoticeListener):
    """A listener on JOBS_CHANNEL that calls `wake` for every notice, and once after each reconnection,
    since notices sent in between were lost."""

    def __init__(self, dsn: str, wake: Callable[[], None]) -> None:
        super().__init__(
            dsn,
            JOBS_CHANNEL,
            lambda _payload: wake(),
            log_prefix="worker",
            on_listening=lambda reconnected: wake() if reconnected else None,
        )
