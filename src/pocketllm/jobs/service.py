"""Job records for the API: queuing image jobs, listing, cancelling, retrying, and rendering results."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from pocketllm.db.engine import Database
from pocketllm.db.types import utcnow
from pocketllm.errors import Conflict, InvalidInput, NotFound, PocketLLMError
from pocketllm.jobs.notify import announce_job
from pocketllm.jobs.prices import (
    CostEstimate,
    ImageRequest,
    UnknownImageModel,
    estimate_cost,
    image_model_listing,
    imagerouter_image_models,
    known_image_models,
    validate_image_request,
)
from pocketllm.jobs.schemas import IMAGE_GENERATION, ImageGenerationInput, JobEstimateRequest
from pocketllm.jobs.schemas import Job as JobSchema
from pocketllm.models import Job, ProviderConfig
from pocketllm.models.job import ACTIVE_STATUSES, MAX_IDEMPOTENCY_KEY_LENGTH, JobStatus
from pocketllm.providers.catalogue import ProviderTarget
from pocketllm.providers.dependencies import ProviderRuntime
from pocketllm.providers.registry import PROVIDERS, Capability, get_provider_spec
from pocketllm.providers.schemas import ProviderModel
from pocketllm.providers.service import build_target, list_configs
from pocketllm.storage.service import FileStorage

log = structlog.get_logger(__name__)

# Order in which a provider is picked when the request names none.
IMAGE_PROVIDER_PREFERENCE = ("openai", "imagerouter", "custom")
IMAGE_MODELS_CACHE_PREFIX = "image-models:"


class JobNotFound(NotFound):
    code = "job_not_found"
    default_message = "No job with this id exists for your account."


class UnsupportedJobType(InvalidInput):
    code = "unsupported_job_type"
    default_message = "This route queues image generation jobs only: set job_type to 'image_generation'."


class NoImageProvider(InvalidInput):
    code = "no_image_provider"
    default_message = (
        "No active provider can generate images; activate openai, imagerouter or custom with "
        "POST /v1/providers/activate."
    )


class ProviderNotImageCapable(InvalidInput):
    code = "provider_not_image_capable"


class JobNotRetryable(InvalidInput):
    code = "job_not_retryable"


class InvalidIdempotencyKey(InvalidInput):
    code = "invalid_idempotency_key"
    default_message = f"The Idempotency-Key header must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} visible ASCII characters."


class IdempotencyKeyReused(Conflict):
    code = "idempotency_key_reused"
    default_message = "This Idempotency-Key was already used for a different request; use a new key."


def parse_job_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise JobNotFound() from None


def check_idempotency_key(raw: str | None) -> str | None:
    if raw is None:
        return None
    if not 1 <= len(raw) <= MAX_IDEMPOTENCY_KEY_LENGTH or any(not "!" <= character <= "~" for character in raw):
        raise InvalidIdempotencyKey()
    return raw


# Providers and image models


@dataclass(frozen=True, slots=True)
class ResolvedProvider:
    provider: str
    # None when the user has no active configuration for it (allowed for estimates only).
    config: ProviderConfig | None


def _image_capable(provider: str) -> bool:
    spec = PROVIDERS.get(provider)
    return spec is not None and Capability.IMAGES in spec.capabilities


async def _active_image_configs(session: AsyncSession, user_id: uuid.UUID) -> dict[str, ProviderConfig]:
    return {
        config.provider: config
        for config in await list_configs(session, user_id)
        if config.is_active and _image_capable(config.provider)
    }


async def resolve_image_provider(
    session: AsyncSession, user_id: uuid.UUID, provider: str | None, model: str, *, require_active: bool = True
) -> ResolvedProvider:
    """Pick the provider for an image request: the named one, OpenAI for its own models, else the first
    active image provider. Raises when no suitable provider is active (unless `require_active` is False)."""
    active = await _active_image_configs(session, user_id)
    if provider is not None:
        spec = get_provider_spec(provider)
        if Capability.IMAGES not in spec.capabilities:
            raise ProviderNotImageCapable(
                f"Provider '{spec.id}' cannot generate images; use one of: {', '.join(IMAGE_PROVIDER_PREFERENCE)}."
            )
        config = active.get(spec.id)
        if config is None and require_active:
            raise NoImageProvider(
                f"Provider '{spec.id}' is not active for your account; activate it with POST /v1/providers/activate."
            )
        return ResolvedProvider(spec.id, config)

    openai_models = {spec.id for spec in known_image_models("openai")}
    if model in openai_models and ("openai" in active or not require_active):
        return ResolvedProvider("openai", active.get("openai"))
    for candidate in IMAGE_PROVIDER_PREFERENCE:
        if candidate in active and (candidate != "openai" or model in openai_models):
            return ResolvedProvider(candidate, active[candidate])
    if "openai" in active and model not in openai_models:
        # Only OpenAI is active: let validation name OpenAI's models.
        return ResolvedProvider("openai", active["openai"])
    raise NoImageProvider()


async def imagerouter_models(
    runtime: ProviderRuntime, target: ProviderTarget
) -> list[tuple[ProviderModel, float | None]]:
    """ImageRouter's image models with their per-image USD price, cached like model catalogues."""
    url = target.models_url
    material = "\n".join((target.provider, url, target.api_key or ""))
    cache_key = IMAGE_MODELS_CACHE_PREFIX + hashlib.sha256(material.encode()).hexdigest()
    cached = await runtime.cache.get(cache_key)
    if isinstance(cached, list):
        return [(ProviderModel.model_validate(model), price) for model, price in cached]

    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else None
    raw = await runtime.http.request_json(
        "GET",
        url,
        provider=target.provider,
        secret=target.api_key,
        headers=headers,
        timeout=runtime.catalogue.timeout_seconds,
    )
    models = imagerouter_image_models(raw)
    await runtime.cache.set(
        cache_key, [[model.model_dump(mode="json"), price] for model, price in models], runtime.catalogue.ttl_seconds
    )
    return models


async def _catalogue_price(
    runtime: ProviderRuntime, resolved: ResolvedProvider, model: str, *, check_model: bool
) -> float | None:
    """Return the ImageRouter price of `model`; with `check_model`, raise when ImageRouter does not list it.

    When the list cannot be fetched, the model is accepted unchecked and no price is known. The provider
    itself rejects an unknown model when the job runs.
    """
    if resolved.provider != "imagerouter" or resolved.config is None:
        return None
    models = await _imagerouter_models_or_none(runtime, resolved.config)
    if models is None:
        return None
    prices = {entry.id: price for entry, price in models}
    if model not in prices:
        if check_model:
            raise UnknownImageModel(f"ImageRouter does not list an image model named {model[:200]!r}.")
        return None
    return prices[model]


async def _imagerouter_models_or_none(
    runtime: ProviderRuntime, config: ProviderConfig
) -> list[tuple[ProviderModel, float | None]] | None:
    """Return ImageRouter's image models for the user's configuration, or None when the list cannot be fetched."""
    target = build_target(PROVIDERS["imagerouter"], config, runtime.secrets)
    try:
        return await imagerouter_models(runtime, target)
    except PocketLLMError as error:
        log.info("images.model_list_failed", provider="imagerouter", code=error.code)
        return None


# Queuing


def _image_request(data: ImageGenerationInput) -> ImageRequest:
    return ImageRequest(
        prompt=data.prompt, model=data.model, size=data.size, n=data.n, quality=data.quality, style=data.style
    )


def _stored_input(provider: str, request: ImageRequest) -> dict[str, Any]:
    return {
        "prompt": request.prompt,
        "model": request.model,
        "provider": provider,
        "size": request.size,
        "n": request.n,
        "quality": request.quality,
        "style": request.style,
    }


async def create_image_job(
    database: Database,
    runtime: ProviderRuntime,
    user_id: uuid.UUID,
    *,
    job_type: str,
    data: ImageGenerationInput,
    metadata: dict[str, Any] | None,
    idempotency_key: str | None,
    max_attempts: int,
) -> tuple[Job, bool]:
    """Check the request, then queue it. Returns the job and whether it is new.

    With an idempotency key already used for the same request, the existing job is returned instead.
    The reads and the insert run in two short transactions, and ImageRouter's model list is fetched
    between them, so that no database connection, and on SQLite not the write lock, waits for a slow provider.
    """
    if job_type != IMAGE_GENERATION:
        raise UnsupportedJobType()
    fingerprint = request_fingerprint(job_type, data, metadata)
    async with database.read_only(snapshot=False) as session:
        # A repeated request gets its job back even if the provider setup changed since the first one.
        if idempotency_key is not None:
            existing = await _find_by_idempotency_key(session, user_id, idempotency_key)
            if existing is not None:
                return _same_request(existing, fingerprint), False
        resolved = await resolve_image_provider(session, user_id, data.provider, data.model)

    request = validate_image_request(resolved.provider, _image_request(data))
    await _catalogue_price(runtime, resolved, request.model, check_model=True)

    now = utcnow()
    job = Job(
        id=uuid.uuid4(),
        user_id=user_id,
        job_type=IMAGE_GENERATION,
        status=JobStatus.PENDING.value,
        input_data=_stored_input(resolved.provider, request),
        extra_metadata=metadata,
        idempotency_key=idempotency_key,
        request_fingerprint=fingerprint if idempotency_key is not None else None,
        attempts=0,
        max_attempts=max_attempts,
        run_at=now,
        created_at=now,
        updated_at=now,
    )
    async with database.transaction() as session:
        try:
            async with session.begin_nested():
                session.add(job)
        except IntegrityError:
            # A concurrent request with the same key won; it has committed by now.
            if idempotency_key is None:
                raise
            existing = await _find_by_idempotency_key(session, user_id, idempotency_key)
            if existing is None:
                raise
            return _same_request(existing, fingerprint), False
        await announce_job(session)
    log.info("job.queued", job_id=str(job.id), job_type=job.job_type, provider=resolved.provider)
    return job, True


def request_fingerprint(job_type: str, data: ImageGenerationInput, metadata: dict[str, Any] | None) -> str:
    """Return the SHA-256 of the request as given, in a canonical JSON form."""
    canonical = json.dumps(
        {"job_type": job_type, "input_data": data.model_dump(mode="json"), "metadata": metadata},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


async def _find_by_idempotency_key(session: AsyncSession, user_id: uuid.UUID, key: str) -> Job | None:
    return await session.scalar(select(Job).where(Job.user_id == user_id, Job.idempotency_key == key))


def _same_request(existing: Job, fingerprint: str) -> Job:
    if existing.request_fingerprint != fingerprint:
        raise IdempotencyKeyReused()
    return existing


async def estimate(
    database: Database, runtime: ProviderRuntime, user_id: uuid.UUID, payload: JobEstimateRequest
) -> CostEstimate:
    """Estimate the job's price.

    The provider configuration is read first, and its connection returned to the pool before
    ImageRouter's model list is fetched.
    """
    size = payload.size
    if payload.dimensions is not None:
        size = f"{payload.dimensions[0]}x{payload.dimensions[1]}"
    async with database.read_only(snapshot=False) as session:
        resolved = await resolve_image_provider(session, user_id, payload.provider, payload.model, require_active=False)
    request = validate_image_request(
        resolved.provider,
        ImageRequest(
            # The prompt does not change the price; any non-empty text passes validation.
            prompt="estimate",
            model=payload.model,
            size=size,
            n=payload.n,
            quality=payload.quality,
            style=payload.style,
        ),
    )
    price = await _catalogue_price(runtime, resolved, request.model, check_model=False)
    return estimate_cost(resolved.provider, request, catalogue_price_usd=price)


async def list_image_models(database: Database, runtime: ProviderRuntime, user_id: uuid.UUID) -> list[ProviderModel]:
    """Return the image models of the caller's active providers, leaving out a provider whose list fails.

    The configurations are read first, and their connection returned to the pool before any model list
    is fetched.
    """
    async with database.read_only(snapshot=False) as session:
        active = await _active_image_configs(session, user_id)
    models: list[ProviderModel] = []
    for provider in IMAGE_PROVIDER_PREFERENCE:
        config = active.get(provider)
        if config is None:
            continue
        if provider == "imagerouter":
            listed = await _imagerouter_models_or_none(runtime, config)
            models.extend(model for model, _ in listed or [])
        else:
            models.extend(image_model_listing(provider))
    return models


# Reading and changing jobs


async def list_jobs(
    session: AsyncSession,
    user_id: uuid.UUID,
    *,
    status: str | None,
    job_type: str | None,
    limit: int,
    offset: int,
) -> Sequence[Job]:
    query = select(Job).where(Job.user_id == user_id)
    if status is not None:
        query = query.where(Job.status == status)
    if job_type is not None:
        query = query.where(Job.job_type == job_type)
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit).offset(offset)
    return list(await session.scalars(query))


async def get_job(session: AsyncSession, user_id: uuid.UUID, job_id: uuid.UUID, *, for_update: bool = False) -> Job:
    query = select(Job).where(Job.id == job_id, Job.user_id == user_id)
    if for_update:
        query = query.with_for_update()
    job = await session.scalar(query)
    if job is None:
        raise JobNotFound()
    return job


async def cancel_or_delete(
    session: AsyncSession, user_id: uuid.UUID, job_id: uuid.UUID, *, stop_time: timedelta
) -> bool:
    """Cancel an active job, or delete a finished one. Returns True when the record was deleted, and its
    files must then be deleted after the commit.

    `stop_time` is how long a running worker may take to notice a cancellation (two lease renewals).
    """
    job = await get_job(session, user_id, job_id, for_update=True)
    now = utcnow()
    if job.status in ACTIVE_STATUSES:
        # Clearing the lease token makes the running worker's next lease renewal fail, which stops it.
        # A retry is not due before that worker has stopped, so that no two attempts overlap.
        job.run_at = now + stop_time if job.status == JobStatus.PROCESSING.value else now
        job.status = JobStatus.CANCELLED.value
        job.lease_token = None
        job.finished_at = now
        job.updated_at = now
        await session.flush()
        log.info("job.cancelled", job_id=str(job.id))
        return False
    await session.delete(job)
    await session.flush()
    log.info("job.deleted", job_id=str(job.id))
    return True


async def retry(session: AsyncSession, user_id: uuid.UUID, job_id: uuid.UUID) -> Job:
    job = await get_job(session, user_id, job_id, for_update=True)
    if job.status not in (JobStatus.FAILED.value, JobStatus.CANCELLED.value):
        raise JobNotRetryable(f"Only failed or cancelled jobs can be retried; this job is {job.status}.")
    now = utcnow()
    # A job cancelled while running is due once its worker has stopped (see cancel_or_delete).
    job.run_at = max(now, job.run_at) if job.status == JobStatus.CANCELLED.value else now
    job.status = JobStatus.PENDING.value
    job.attempts = 0
    job.lease_token = None
    job.worker_id = None
    job.output_data = None
    job.error_log = None
    job.started_at = None
    job.finished_at = None
    job.updated_at = now
    await session.flush()
    await announce_job(session)
    log.info("job.retried", job_id=str(job.id))
    return job


def job_files_prefix(job_id: uuid.UUID) -> str:
    return f"jobs/{job_id}/"


def render_job(job: Job, storage: FileStorage, base_url: str) -> JobSchema:
    """Build the API view of a job, with a freshly signed URL for every stored image."""
    assert job.user_id is not None
    return JobSchema(
        id=job.id,
        user_id=job.user_id,
        job_type=job.job_type,
        status=job.status,
        input_data=job.input_data,
        output_data=render_output(job.output_data, storage, base_url),
        error_log=job.error_log,
        metadata=job.extra_metadata,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        created_at=job.created_at,
        updated_at=job.updated_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


def render_output(output: dict[str, Any] | None, storage: FileStorage, base_url: str) -> dict[str, Any] | None:
    if output is None:
        return None
    rendered = dict(output)
    images = output.get("images")
    if isinstance(images, list):
        rendered["images"] = [_render_image(image, storage, base_url) for image in images if isinstance(image, dict)]
    return rendered


def _render_image(image: dict[str, Any], storage: FileStorage, base_url: str) -> dict[str, Any]:
    rendered = {name: value for name, value in image.items() if name != "key"}
    key = image.get("key")
    rendered["url"] = storage.url_for(key, base_url=base_url) if isinstance(key, str) else None
    return rendered
