"""The worker loop: claims due jobs, runs their handlers with a renewed lease, and stores the outcomes.

The same loop runs inside `pocketllm serve` and on its own as `pocketllm worker`. Handlers are plain
async callables from a claimed job to a `JobOutcome`. A handler error decides what happens next:

* a domain error with a 4xx status (refused key, rejected request) fails the job at once;
* 429 and 5xx errors (rate limits, provider or storage outages, timeouts) are retried with backoff;
* any other exception is a bug: it is logged with its traceback and retried, and the job's error log
  contains only a generic internal-error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog

from pocketllm.errors import PocketLLMError
from pocketllm.jobs.notify import JobListener
from pocketllm.jobs.queue import ClaimedJob, JobQueue
from pocketllm.kit.metrics import JobAttemptOutcome, record_job_attempt
from pocketllm.storage.service import FileStorage

log = structlog.get_logger(__name__)

INTERNAL_ERROR_MESSAGE = "The job failed because of an internal error."
# While claims keep failing (the database is down or not migrated), the pause between tries doubles up to this.
MAX_CLAIM_RETRY_SECONDS = 30.0
# How often the worker queues the periodic maintenance jobs; each period still runs once.
SCHEDULE_CHECK_SECONDS = 30.0
# Finished maintenance jobs are kept this long, for operators to look at, then deleted.
MAINTENANCE_RECORD_RETENTION = timedelta(days=7)


@dataclass(frozen=True, slots=True)
class JobOutcome:
    output_data: dict[str, Any]
    # Storage keys written by the attempt. They are deleted again if the result cannot be stored because
    # the job was cancelled or taken over meanwhile.
    files: tuple[str, ...] = ()


JobHandler = Callable[[ClaimedJob], Coroutine[Any, Any, JobOutcome]]


@dataclass(frozen=True, slots=True)
class PeriodicTask:
    job_type: str
    period_seconds: int


@dataclass(slots=True)
class WorkerStats:
    """Counts since the worker started, for logs and tests."""

    completed: int = 0
    failed: int = 0
    retried: int = 0
    stopped: int = 0
    released: int = 0
    claim_failures: int = 0


def new_worker_id() -> str:
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def describe_failure(error: BaseException) -> tuple[str, bool, float | None]:
    """Return the error log text, whether to retry, and the provider's Retry-After in seconds if any."""
    if isinstance(error, PocketLLMError):
        if error.status_code == 429:
            retry_after = (error.headers or {}).get("Retry-After", "")
            return error.message, True, float(retry_after) if retry_after.isdigit() else None
        return error.message, error.status_code >= 500, None
    return INTERNAL_ERROR_MESSAGE, True, None


class JobWorker:
    """Runs up to `concurrency` jobs at a time until its stop event is set.

    On stop it claims nothing more, gives running jobs `shutdown_grace_seconds` to finish, then cancels
    them and releases them to the queue, due at once and without counting the interrupted attempt.
    """

    def __init__(
        self,
        queue: JobQueue,
        handlers: Mapping[str, JobHandler],
        *,
        storage: FileStorage,
        concurrency: int,
        poll_seconds: float,
        heartbeat_seconds: float,
        shutdown_grace_seconds: float,
        periodic: Sequence[PeriodicTask] = (),
        maintenance_max_attempts: int = 3,
        worker_id: str | None = None,
        listen_dsn: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if heartbeat_seconds >= queue.lease.total_seconds():
            raise ValueError("the heartbeat must be shorter than the lease, or leases run out while jobs run")
        self.queue = queue
        self.worker_id = worker_id or new_worker_id()
        self.stats = WorkerStats()
        self._handlers = dict(handlers)
        self._storage = storage
        self._concurrency = concurrency
        self._poll_seconds = poll_seconds
        self._heartbeat_seconds = heartbeat_seconds
        self._grace_seconds = shutdown_grace_seconds
        self._periodic = tuple(periodic)
        self._maintenance_max_attempts = maintenance_max_attempts
        self._wake = asyncio.Event()
        # On PostgreSQL, notices of queued jobs wake the worker at once instead of at its next poll.
        self.listener = JobListener(listen_dsn, self.wake) if listen_dsn else None
        self._running: set[asyncio.Task[None]] = set()
        self._processed = 0
        # Ids of recently attempted jobs, newest last, for `wait_attempted`.
        self._recent: deque[uuid.UUID] = deque(maxlen=1000)
        self._progress = asyncio.Condition()

    def wake(self) -> None:
        """Look for due jobs now instead of at the next poll; call it after queuing a job in this process."""
        self._wake.set()

    async def wait_processed(self, count: int) -> None:
        """Return once this worker has finished `count` attempts in all (whatever their outcome)."""
        async with self._progress:
            await self._progress.wait_for(lambda: self._processed >= count)

    async def wait_attempted(self, job_id: uuid.UUID) -> None:
        """Return once this worker has finished an attempt at `job_id` (whatever its outcome)."""
        async with self._progress:
            await self._progress.wait_for(lambda: job_id in self._recent)

    async def run(self, stop: asyncio.Event) -> None:
        log.info("worker.started", worker=self.worker_id, concurrency=self._concurrency)
        scheduler = asyncio.create_task(self._schedule_periodic(stop), name="job-scheduler") if self._periodic else None
        listener = asyncio.create_task(self.listener.run(stop), name="job-listener") if self.listener else None
        try:
            await self._claim_loop(stop)
        finally:
            for task in (scheduler, listener):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            await self._finish_running()
            log.info("worker.stopped", worker=self.worker_id, completed=self.stats.completed, failed=self.stats.failed)

    async def run_due(self) -> int:
        """Claim and run due jobs one after another until none is due; return how many ran (for tests and tools)."""
        count = 0
        while (job := await self.queue.claim(self.worker_id)) is not None:
            await self._process(job)
            count += 1
        return count

    async def _claim_loop(self, stop: asyncio.Event) -> None:
        stop_waiter = asyncio.create_task(stop.wait())
        failures = 0
        try:
            while not stop.is_set():
                if len(self._running) >= self._concurrency:
                    await asyncio.wait({stop_waiter, *self._running}, return_when=asyncio.FIRST_COMPLETED)
                    continue
                self._wake.clear()
                pause = self._poll_seconds
                try:
                    job = await self.queue.claim(self.worker_id)
                    failures = 0
                except Exception:  # a database outage must not end the worker; it tries again after a pause
                    failures += 1
                    self.stats.claim_failures += 1
                    # Longer pauses while the outage lasts, so that it does not flood the log.
                    pause = min(self._poll_seconds * 2**failures, MAX_CLAIM_RETRY_SECONDS)
                    log.exception("worker.claim_failed", worker=self.worker_id, failures=failures, retry_in=pause)
                    job = None
                if job is None:
                    wake_waiter = asyncio.create_task(self._wake.wait())
                    await asyncio.wait({stop_waiter, wake_waiter}, timeout=pause, return_when=asyncio.FIRST_COMPLETED)
                    wake_waiter.cancel()
                    continue
                task = asyncio.create_task(self._process(job), name=f"job-{job.id}")
                self._running.add(task)
                task.add_done_callback(self._running.discard)
        finally:
            stop_waiter.cancel()

    async def _finish_running(self) -> None:
        if not self._running:
            return
        running = set(self._running)
        log.info("worker.draining", worker=self.worker_id, jobs=len(running), grace_seconds=self._grace_seconds)
        _, unfinished = await asyncio.wait(running, timeout=self._grace_seconds)
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)

    async def _process(self, job: ClaimedJob) -> None:
        log.info("job.started", job_id=str(job.id), job_type=job.job_type, attempt=job.attempt, worker=self.worker_id)
        handler = self._handlers.get(job.job_type)
        if handler is None:
            await self.queue.fail(job, f"This server has no handler for jobs of type {job.job_type!r}.", retry=False)
            self.stats.failed += 1
            # No handler ran, so the attempt took no time.
            record_job_attempt(job.job_type, "failed", 0.0)
            await self._count_processed(job)
            return

        work = asyncio.create_task(handler(job), name=f"job-handler-{job.id}")
        try:
            await self._attempt(job, work)
        except Exception:
            # Storing the outcome failed, e.g. the database is down. The lease runs out and the job is
            # claimed again as its next attempt.
            log.exception("job.outcome_not_stored", job_id=str(job.id), job_type=job.job_type)
        finally:
            await self._count_processed(job)

    async def _count_processed(self, job: ClaimedJob) -> None:
        async with self._progress:
            self._processed += 1
            self._recent.append(job.id)
            self._progress.notify_all()

    async def _attempt(self, job: ClaimedJob, work: asyncio.Task[JobOutcome]) -> None:
        started = time.monotonic()
        try:
            if not await self._supervise(job, work):
                self.stats.stopped += 1
                log.info("job.stopped", job_id=str(job.id), job_type=job.job_type, reason="cancelled or taken over")
                record_job_attempt(job.job_type, "stopped", time.monotonic() - started)
                return
            outcome = work.result()
        except asyncio.CancelledError:
            # The worker is shutting down: stop the handler and hand the job back.
            await _cancel_and_wait(work)
            if await self.queue.release(job):
                self.stats.released += 1
                log.info("job.released", job_id=str(job.id), job_type=job.job_type)
                record_job_attempt(job.job_type, "released", time.monotonic() - started)
            else:
                record_job_attempt(job.job_type, "stopped", time.monotonic() - started)
            raise
        except Exception as error:
            failure = await self._store_failure(job, error)
            record_job_attempt(job.job_type, failure, time.monotonic() - started)
            return

        store = asyncio.ensure_future(self.queue.complete(job, outcome.output_data))
        try:
            stored = await asyncio.shield(store)
        except asyncio.CancelledError:
            # The worker is stopping, but the work is done: storing it is one short transaction, and
            # releasing the job instead would make another worker generate the images again.
            await store
            raise
        except Exception:
            # The next attempt writes its own files; these would belong to no job.
            await self._delete_files(outcome.files)
            raise
        if stored:
            self.stats.completed += 1
            log.info("job.completed", job_id=str(job.id), job_type=job.job_type, attempt=job.attempt)
            record_job_attempt(job.job_type, "completed", time.monotonic() - started)
            return
        self.stats.stopped += 1
        log.info("job.result_discarded", job_id=str(job.id), job_type=job.job_type, reason="cancelled or taken over")
        record_job_attempt(job.job_type, "stopped", time.monotonic() - started)
        await self._delete_files(outcome.files)

    async def _supervise(self, job: ClaimedJob, work: asyncio.Task[JobOutcome]) -> bool:
        """Renew the lease until `work` ends. Returns False, with `work` cancelled, when the lease is lost."""
        while True:
            done, _ = await asyncio.wait({work}, timeout=self._heartbeat_seconds)
            if done:
                return True
            try:
                renewed = await self.queue.renew(job)
            except Exception:  # the lease has time left; the next heartbeat tries again
                log.exception("job.renew_failed", job_id=str(job.id))
                continue
            if not renewed:
                await _cancel_and_wait(work)
                return False

    async def _store_failure(self, job: ClaimedJob, error: Exception) -> JobAttemptOutcome:
        """Store the failed attempt and return its outcome; `stopped` when the lease was lost meanwhile."""
        message, retry, retry_after = describe_failure(error)
        if not isinstance(error, PocketLLMError):
            log.error("job.crashed", job_id=str(job.id), job_type=job.job_type, exc_info=error)
        outcome = await self.queue.fail(job, message, retry=retry, retry_after_seconds=retry_after)
        code = getattr(error, "code", type(error).__name__)
        if outcome == "failed":
            self.stats.failed += 1
            log.warning("job.failed", job_id=str(job.id), job_type=job.job_type, attempt=job.attempt, code=code)
        elif outcome == "retry_scheduled":
            self.stats.retried += 1
            log.info("job.retry_scheduled", job_id=str(job.id), job_type=job.job_type, attempt=job.attempt, code=code)
        return "stopped" if outcome == "lease_lost" else outcome

    async def _delete_files(self, keys: Sequence[str]) -> None:
        for key in keys:
            try:
                await self._storage.delete(key)
            except Exception:  # the periodic sweep deletes files that no job refers to
                log.exception("job.file_cleanup_failed", key=key)

    async def _schedule_periodic(self, stop: asyncio.Event) -> None:
        interval = min(SCHEDULE_CHECK_SECONDS, *(task.period_seconds for task in self._periodic))
        while not stop.is_set():
            for task in self._periodic:
                try:
                    if await self.queue.schedule(
                        task.job_type, period_seconds=task.period_seconds, max_attempts=self._maintenance_max_attempts
                    ):
                        log.info("job.scheduled", job_type=task.job_type, worker=self.worker_id)
                        self.wake()
                except Exception:  # retried at the next check
                    log.exception("worker.schedule_failed", job_type=task.job_type)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)


async def _cancel_and_wait(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
