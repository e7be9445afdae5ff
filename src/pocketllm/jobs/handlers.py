"""Job handlers for each job type, and the worker that runs them with the process's resources."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy import delete, or_, select

from pocketllm.config import Settings
from pocketllm.db.engine import Database
from pocketllm.db.types import utcnow
from pocketllm.errors import InvalidInput
from pocketllm.jobs.images import ImageResult, generate_images
from pocketllm.jobs.notify import listener_dsn
from pocketllm.jobs.prices import CREDITS_PER_USD, ImageRequest
from pocketllm.jobs.queue import ClaimedJob, JobQueue
from pocketllm.jobs.schemas import IMAGE_GENERATION
from pocketllm.jobs.service import job_files_prefix
from pocketllm.jobs.worker import MAINTENANCE_RECORD_RETENTION, JobHandler, JobOutcome, JobWorker, PeriodicTask
from pocketllm.models import AuthSession, Job
from pocketllm.models.job import ACTIVE_STATUSES
from pocketllm.providers.dependencies import ProviderRuntime
from pocketllm.providers.errors import ProviderNotConfigured
from pocketllm.providers.registry import PROVIDERS
from pocketllm.providers.service import build_target, find_config
from pocketllm.storage.keys import new_key
from pocketllm.storage.service import FileStorage
from pocketllm.users.service import purge_deleted_accounts

log = structlog.get_logger(__name__)

PURGE_ACCOUNTS = "maintenance.purge_accounts"
EXPIRE_SESSIONS = "maintenance.expire_sessions"
SWEEP_JOB_FILES = "maintenance.sweep_job_files"
# Ended sessions are kept this long after they expired or were revoked, then deleted with their tokens.
ENDED_SESSION_RETENTION = timedelta(days=7)


class InvalidJobInput(InvalidInput):
    code = "invalid_job_input"


class ImageGenerationHandler:
    """Generates images with the user's own provider and copies them into our storage."""

    def __init__(
        self, database: Database, providers: ProviderRuntime, storage: FileStorage, settings: Settings
    ) -> None:
        self._database = database
        self._providers = providers
        self._storage = storage
        self._timeout = settings.image_timeout_seconds
        self._max_bytes = settings.image_max_bytes
        self._max_pixels = settings.image_max_pixels

    async def __call__(self, job: ClaimedJob) -> JobOutcome:
        data = job.input_data
        provider = data.get("provider")
        spec = PROVIDERS.get(provider) if isinstance(provider, str) else None
        if job.user_id is None or spec is None or not isinstance(data.get("prompt"), str):
            raise InvalidJobInput("The job's input is not a valid image generation request.")
        request = ImageRequest(
            prompt=data["prompt"],
            model=str(data.get("model")),
            size=data.get("size"),
            n=int(data.get("n") or 1),
            quality=data.get("quality"),
            style=data.get("style"),
        )

        # The key is read for each attempt, so a key saved again after a failure is used by the retry.
        async with self._database.read_only() as session:
            config = await find_config(session, job.user_id, spec.id)
        if config is None or not config.is_active:
            raise ProviderNotConfigured(
                f"Provider '{spec.id}' is no longer active for this account; activate it and retry the job."
            )
        target = build_target(spec, config, self._providers.secrets)

        result = await generate_images(
            self._providers.http,
            target,
            request,
            timeout=self._timeout,
            max_image_bytes=self._max_bytes,
            max_pixels=self._max_pixels,
        )
        keys = await self._store(job.id, result)
        return JobOutcome(_output(spec.id, request, result, keys), tuple(keys))

    async def _store(self, job_id: uuid.UUID, result: ImageResult) -> list[str]:
        keys: list[str] = []
        try:
            for image in result.images:
                key = new_key(job_files_prefix(job_id), image.extension)
                await self._storage.put(key, image.data, content_type=image.mime_type)
                keys.append(key)
        except BaseException:
            for key in keys:
                try:
                    await self._storage.delete(key)
                except Exception:  # the periodic sweep deletes it later
                    log.exception("job.file_cleanup_failed", key=key)
            raise
        return keys


def _output(provider: str, request: ImageRequest, result: ImageResult, keys: list[str]) -> dict[str, Any]:
    images = [
        {
            "key": key,
            "width": image.width,
            "height": image.height,
            "mime_type": image.mime_type,
            "revised_prompt": image.revised_prompt,
        }
        for key, image in zip(keys, result.images, strict=True)
    ]
    revised = next((image.revised_prompt for image in result.images if image.revised_prompt), None)
    cost = None
    if result.cost_usd is not None:
        cost = {
            "usd": round(result.cost_usd, 6),
            "credits": round(result.cost_usd * CREDITS_PER_USD, 3),
            "currency": "credits",
        }
    return {
        "provider": provider,
        "model": request.model,
        # A provider may return fewer images than requested; the cost covers those returned.
        "images_requested": request.n,
        "images": images,
        "revised_prompt": revised,
        "cost": cost,
        "usage": result.usage,
    }


class MaintenanceHandlers:
    """The periodic jobs: purging deleted accounts, deleting ended sessions, sweeping orphaned job files."""

    def __init__(self, database: Database, storage: FileStorage, queue: JobQueue) -> None:
        self._database = database
        self._storage = storage
        self._queue = queue

    async def purge_accounts(self, job: ClaimedJob) -> JobOutcome:
        purged = await purge_deleted_accounts(self._database, self._storage)
        return JobOutcome({"purged_accounts": purged})

    async def expire_sessions(self, job: ClaimedJob) -> JobOutcome:
        cutoff = utcnow() - ENDED_SESSION_RETENTION
        statement = delete(AuthSession).where(or_(AuthSession.expires_at < cutoff, AuthSession.revoked_at < cutoff))
        async with self._database.transaction() as session:
            result = await session.execute(statement)
        deleted = int(result.rowcount)  # type: ignore[attr-defined]
        log.info("sessions.deleted", count=deleted)
        return JobOutcome({"deleted_sessions": deleted})

    async def sweep_job_files(self, job: ClaimedJob) -> JobOutcome:
        """Delete stored files that no job refers to any more: files of deleted jobs and of purged accounts,
        and files an interrupted attempt left behind. Files of active jobs are never touched."""
        keys = await self._storage.list_keys("jobs/")
        by_job: dict[uuid.UUID | None, list[str]] = {}
        for key in keys:
            by_job.setdefault(_job_id_of(key), []).append(key)

        known = [job_id for job_id in by_job if job_id is not None]
        referenced: set[str] = set()
        active: set[uuid.UUID] = set()
        existing: set[uuid.UUID] = set()
        async with self._database.read_only() as session:
            for start in range(0, len(known), 500):
                rows = await session.execute(
                    select(Job.id, Job.status, Job.output_data).where(Job.id.in_(known[start : start + 500]))
                )
                for job_id, status, output in rows:
                    existing.add(job_id)
                    if status in ACTIVE_STATUSES:
                        active.add(job_id)
                    referenced.update(_stored_keys(output))

        deleted = 0
        for job_id, job_keys in by_job.items():
            if job_id in active:
                continue
            for key in job_keys:
                if job_id in existing and key in referenced:
                    continue
                await self._storage.delete(key)
                deleted += 1
        pruned = await self._queue.prune_finished_maintenance(older_than=MAINTENANCE_RECORD_RETENTION)
        if deleted or pruned:
            log.info("jobs.swept", deleted_files=deleted, pruned_jobs=pruned)
        return JobOutcome({"deleted_files": deleted, "pruned_jobs": pruned})


def _job_id_of(key: str) -> uuid.UUID | None:
    parts = key.split("/")
    if len(parts) < 3:
        return None
    try:
        return uuid.UUID(parts[1])
    except ValueError:
        return None


def _stored_keys(output: Any) -> list[str]:
    if not isinstance(output, dict) or not isinstance(output.get("images"), list):
        return []
    return [image["key"] for image in output["images"] if isinstance(image, dict) and isinstance(image.get("key"), str)]


def build_job_worker(
    settings: Settings,
    database: Database,
    storage: FileStorage,
    providers: ProviderRuntime,
    *,
    concurrency: int | None = None,
) -> JobWorker:
    """Build the worker with a handler for every job type, and the periodic maintenance jobs."""
    queue = JobQueue(
        database, lease_seconds=settings.job_lease_seconds, retry_base_seconds=settings.job_retry_base_seconds
    )
    maintenance = MaintenanceHandlers(database, storage, queue)
    handlers: dict[str, JobHandler] = {
        IMAGE_GENERATION: ImageGenerationHandler(database, providers, storage, settings),
        PURGE_ACCOUNTS: maintenance.purge_accounts,
        EXPIRE_SESSIONS: maintenance.expire_sessions,
        SWEEP_JOB_FILES: maintenance.sweep_job_files,
    }
    periodic = (
        PeriodicTask(PURGE_ACCOUNTS, settings.account_purge_interval_seconds),
        PeriodicTask(EXPIRE_SESSIONS, settings.session_cleanup_interval_seconds),
        PeriodicTask(SWEEP_JOB_FILES, settings.job_file_sweep_interval_seconds),
    )
    return JobWorker(
        queue,
        handlers,
        storage=storage,
        concurrency=concurrency or settings.job_concurrency,
        poll_seconds=settings.job_poll_seconds,
        heartbeat_seconds=settings.job_heartbeat_seconds,
        shutdown_grace_seconds=settings.job_shutdown_grace_seconds,
        periodic=periodic,
        listen_dsn=listener_dsn(settings.effective_database_url),
    )
