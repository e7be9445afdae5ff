"""/v1/jobs: queue image generation, follow jobs, cancel and retry them, list image models and prices."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import structlog
from fastapi import BackgroundTasks, Header, Query, Request, Response, status

from pocketllm.auth.dependencies import CurrentUser
from pocketllm.db.dependencies import Db, DbSession
from pocketllm.errors import NotAuthenticated, RateLimited, UnparsableBody, error_responses
from pocketllm.jobs import service
from pocketllm.jobs.prices import UnknownImageModel
from pocketllm.jobs.schemas import (
    Job,
    JobCreateRequest,
    JobCreateResponse,
    JobEstimateRequest,
    JobEstimateResponse,
    JobStatusFilter,
)
from pocketllm.kit.ratelimit import Limiter
from pocketllm.kit.routing import JsonBodyRoute, PrefixRouter
from pocketllm.models import Job as JobRow
from pocketllm.providers.dependencies import Providers
from pocketllm.providers.registry import UnsupportedProvider
from pocketllm.providers.schemas import ProviderModel
from pocketllm.storage.service import FileStorage
from pocketllm.users.router import public_base_url

# Far beyond any real list; larger values would overflow the databases' 64-bit integers.
MAX_OFFSET = 1_000_000_000

router = PrefixRouter(prefix="/v1/jobs", tags=["jobs"], route_class=JsonBodyRoute)
log = structlog.get_logger(__name__)

_VALIDATION_ERRORS = (
    service.UnsupportedJobType,
    service.NoImageProvider,
    service.ProviderNotImageCapable,
    UnknownImageModel,
    UnsupportedProvider,
)


def _storage(request: Request) -> FileStorage:
    storage: FileStorage = request.app.state.storage
    return storage


def _wake_worker(request: Request) -> None:
    """Let this process's worker pick the new job up at once; workers elsewhere find it at their next poll."""
    worker = getattr(request.app.state, "job_worker", None)
    if worker is not None:
        worker.wake()


def _render(request: Request, job: JobRow) -> Job:
    return service.render_job(job, _storage(request), public_base_url(request))


@router.get("", response_model=list[Job], responses=error_responses(NotAuthenticated))
async def list_jobs(
    user: CurrentUser,
    session: DbSession,
    request: Request,
    status_filter: Annotated[JobStatusFilter | None, Query(alias="status")] = None,
    job_type: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> list[Job]:
    """List the caller's jobs, newest first."""
    jobs = await service.list_jobs(
        session,
        user.user_id,
        status=status_filter,
        job_type=job_type,
        limit=limit,
        offset=offset,
    )
    return [_render(request, job) for job in jobs]


@router.post(
    "/image-generation",
    response_model=JobCreateResponse,
    status_code=status.HTTP_202_ACCEPTED,
    responses=error_responses(
        NotAuthenticated,
        RateLimited,
        service.InvalidIdempotencyKey,
        service.IdempotencyKeyReused,
        UnparsableBody,
        *_VALIDATION_ERRORS,
    ),
)
async def create_image_job(
    payload: JobCreateRequest,
    user: CurrentUser,
    database: Db,
    providers: Providers,
    request: Request,
    response: Response,
    background: BackgroundTasks,
    limiter: Limiter,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Repeating a request with the same key returns the job it created instead of a new one.",
        ),
    ] = None,
) -> JobCreateResponse:
    """Check the request against the model and queue it; a worker generates the images."""
    settings = request.app.state.settings
    await limiter.hit("jobs", str(user.user_id), settings.rate_limit_jobs)
    key = service.check_idempotency_key(idempotency_key)
    job, created = await service.create_image_job(
        database,
        providers,
        user.user_id,
        job_type=payload.job_type,
        data=payload.input_data,
        metadata=payload.metadata,
        idempotency_key=key,
        max_attempts=settings.job_max_attempts,
    )
    if created:
        # Background tasks run after the response, so after the commit the worker needs to see the job.
        background.add_task(_wake_worker, request)
    else:
        response.status_code = status.HTTP_200_OK
    return JobCreateResponse(job_id=job.id, status=job.status)


@router.get(
    "/image-generation/models",
    response_model=list[ProviderModel],
    responses=error_responses(NotAuthenticated),
)
async def list_image_models(user: CurrentUser, database: Db, providers: Providers) -> list[ProviderModel]:
    """Image models of the caller's active image providers, with per-image prices in `metadata`."""
    return await service.list_image_models(database, providers, user.user_id)


@router.post(
    "/image-generation/estimate-cost",
    response_model=JobEstimateResponse,
    responses=error_responses(NotAuthenticated, UnparsableBody, *_VALIDATION_ERRORS),
)
async def estimate_cost(
    payload: JobEstimateRequest, user: CurrentUser, database: Db, providers: Providers
) -> JobEstimateResponse:
    """Estimate the price of an image job from the published price table (see `breakdown` for its source)."""
    estimate = await service.estimate(database, providers, user.user_id, payload)
    return JobEstimateResponse(
        model=estimate.model,
        provider=estimate.provider,
        cost_credits=estimate.cost_credits,
        breakdown=estimate.breakdown(),
    )


@router.get("/{job_id}", response_model=Job, responses=error_responses(NotAuthenticated, service.JobNotFound))
async def get_job(job_id: str, user: CurrentUser, session: DbSession, request: Request) -> Job:
    """Return the job with its result; image URLs are signed afresh on every call."""
    job = await service.get_job(session, user.user_id, service.parse_job_id(job_id))
    return _render(request, job)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(NotAuthenticated, service.JobNotFound),
)
async def delete_job(
    job_id: str, user: CurrentUser, session: DbSession, request: Request, background: BackgroundTasks
) -> Response:
    """Cancel a pending or running job; delete a finished job's record and images."""
    parsed = service.parse_job_id(job_id)
    stop_time = timedelta(seconds=2 * request.app.state.settings.job_heartbeat_seconds)
    if await service.cancel_or_delete(session, user.user_id, parsed, stop_time=stop_time):
        # After the commit; if it fails, the periodic sweep deletes the files.
        background.add_task(_storage(request).delete_prefix, service.job_files_prefix(parsed))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{job_id}/retry",
    response_model=JobCreateResponse,
    responses=error_responses(NotAuthenticated, service.JobNotFound, service.JobNotRetryable),
)
async def retry_job(
    job_id: str, user: CurrentUser, session: DbSession, request: Request, background: BackgroundTasks
) -> JobCreateResponse:
    """Queue a failed or cancelled job again, with a fresh count of attempts."""
    job = await service.retry(session, user.user_id, service.parse_job_id(job_id))
    background.add_task(_wake_worker, request)
    return JobCreateResponse(job_id=job.id, status=job.status)
