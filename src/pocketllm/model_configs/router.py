"""/v1/models: the aggregated live catalogue and the caller's saved model configurations."""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import Body, Query, Response, status
from sqlalchemy.ext.asyncio import AsyncSession

from pocketllm.auth.dependencies import CurrentUser
from pocketllm.db.dependencies import Db, DbSession
from pocketllm.errors import InvalidInput, NotAuthenticated, UnparsableBody, error_responses
from pocketllm.kit.routing import JsonBodyRoute, PrefixRouter
from pocketllm.model_configs import service
from pocketllm.model_configs.schemas import (
    ModelConfiguration,
    ModelConfigurationUpdate,
    ModelDefaultRequest,
    ModelImportRequest,
)
from pocketllm.models import ModelConfig, ProviderConfig
from pocketllm.providers import service as providers_service
from pocketllm.providers.dependencies import Providers
from pocketllm.providers.errors import (
    ProviderAuthFailed,
    ProviderNotConfigured,
    ProviderRateLimited,
    ProviderRequestFailed,
    ProviderTimeout,
)
from pocketllm.providers.guard import ProviderUnreachable, ProviderUrlNotAllowed
from pocketllm.providers.registry import PROVIDERS, UnsupportedProvider, get_provider_spec
from pocketllm.providers.router import filter_models
from pocketllm.providers.schemas import ProviderModel

router = PrefixRouter(prefix="/v1/models", tags=["models"], route_class=JsonBodyRoute)
log = structlog.get_logger(__name__)

MAX_IMPORT_ALL = 200


class ModelIdRequired(InvalidInput):
    code = "model_id_required"
    default_message = "The model id in the path is empty; use /v1/models/{modelId}/default."


@router.get("", response_model=list[ProviderModel], responses=error_responses(NotAuthenticated, UnsupportedProvider))
async def catalogue(
    user: CurrentUser,
    database: Db,
    providers: Providers,
    provider: Annotated[str | None, Query(max_length=64, description="Only this provider's models.")] = None,
    query: Annotated[str | None, Query(max_length=200, description="Case-insensitive filter.")] = None,
) -> list[ProviderModel]:
    """Gather the live catalogues of all the caller's active providers; a failing provider is left out."""
    only = get_provider_spec(provider).id if provider else None
    async with database.read_only() as session:
        configs = await providers_service.list_configs(session, user.user_id)

    targets = []
    for config in configs:
        if not config.is_active or (only and config.provider != only) or config.provider not in PROVIDERS:
            continue
        try:
            targets.append(providers_service.build_target(PROVIDERS[config.provider], config, providers.secrets))
        except InvalidInput as error:
            log.info("catalogue.provider_skipped", provider=config.provider, code=error.code)

    models, failures = await providers.catalogue.gather(targets)
    if failures:
        log.info("catalogue.partial", user_id=str(user.user_id), failed=sorted(failures))
    return filter_models(models, query)


@router.get("/saved", response_model=list[ModelConfiguration], responses=error_responses(NotAuthenticated))
async def list_saved(user: CurrentUser, database: Db) -> list[ModelConfiguration]:
    """List the caller's saved model configurations, oldest first."""
    async with database.driver_connection() as connection:
        return await service.list_saved(connection, user.user_id)


@router.post(
    "/import",
    response_model=list[ModelConfiguration],
    responses=error_responses(
        NotAuthenticated,
        UnsupportedProvider,
        ProviderNotConfigured,
        service.UnknownModels,
        service.ModelsRequired,
        ProviderAuthFailed,
        ProviderUnreachable,
        ProviderUrlNotAllowed,
        ProviderRateLimited,
        ProviderRequestFailed,
        ProviderTimeout,
        UnparsableBody,
    ),
)
async def import_models(
    payload: ModelImportRequest, user: CurrentUser, database: Db, providers: Providers
) -> list[ModelConfiguration]:
    """Save one configuration per provider model, creating or updating it and applying `settings`."""
    spec = get_provider_spec(payload.provider)
    async with database.read_only() as session:
        provider_config = await providers_service.find_config(session, user.user_id, spec.id)
    if provider_config is None or not provider_config.is_active:
        raise ProviderNotConfigured(f"Provider '{spec.id}' is not active; activate it before importing models.")

    if payload.sync:
        target = providers_service.build_target(spec, provider_config, providers.secrets)
        catalogue = {model.id: model for model in await providers.catalogue.fetch(target)}
        wanted = payload.models if payload.models else list(catalogue)[:MAX_IMPORT_ALL]
        missing = [model_id for model_id in wanted if model_id not in catalogue]
        if missing:
            raise service.UnknownModels(
                f"{spec.display_name} does not list these models: {', '.join(missing[:10])}. "
                'Check the ids, or import with "sync": false.'
            )
        entries: list[tuple[str, ProviderModel | None]] = [(model_id, catalogue[model_id]) for model_id in wanted]
    else:
        if not payload.models:
            raise service.ModelsRequired()
        entries = [(model_id, None) for model_id in payload.models]

    async with database.transaction() as session:
        provider_config = await providers_service.get_config(session, user.user_id, spec.id)
        imported = await service.import_models(
            session, user.user_id, provider_config, entries, settings=payload.settings
        )
        result = [service.to_configuration(config, provider_config.base_url) for config in imported]

    log.info("models.imported", user_id=str(user.user_id), provider=spec.id, count=len(result))
    return result


@router.post(
    "//default",
    include_in_schema=False,
    responses=error_responses(ModelIdRequired),
)
async def default_without_id(user: CurrentUser) -> None:
    """Answer a request with an empty model id clearly instead of with a 404."""
    raise ModelIdRequired()


@router.get(
    "/{model_id}",
    response_model=ModelConfiguration,
    responses=error_responses(NotAuthenticated, service.ModelConfigNotFound),
)
async def get_model(model_id: str, user: CurrentUser, session: DbSession) -> ModelConfiguration:
    """Return one saved model configuration."""
    config = await service.get_saved(session, user.user_id, service.parse_model_id(model_id))
    return await _to_configuration(session, config)


@router.patch(
    "/{model_id}",
    response_model=ModelConfiguration,
    responses=error_responses(NotAuthenticated, service.ModelConfigNotFound, UnparsableBody),
)
async def update_model(
    model_id: str, payload: ModelConfigurationUpdate, user: CurrentUser, session: DbSession
) -> ModelConfiguration:
    """Change the display name, description, settings, token limits or active state of a saved configuration."""
    config = await service.get_saved(session, user.user_id, service.parse_model_id(model_id))
    changed = payload.model_fields_set

    if "display_name" in changed and payload.display_name:
        config.display_name = payload.display_name
    if "description" in changed:
        config.description = payload.description
    if "settings" in changed:
        config.settings = service.merge_settings(config.settings, payload.settings) if payload.settings else {}
    if "is_active" in changed and payload.is_active is not None:
        config.is_active = payload.is_active
    if "context_window" in changed:
        config.context_window = payload.context_window
    if "max_output_tokens" in changed:
        config.max_output_tokens = payload.max_output_tokens
    await session.flush()
    return await _to_configuration(session, config)


@router.delete(
    "/{model_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(NotAuthenticated, service.ModelConfigNotFound),
)
async def delete_model(model_id: str, user: CurrentUser, session: DbSession) -> Response:
    """Delete a saved configuration; if it was the default, another one becomes the default."""
    config = await service.get_saved(session, user.user_id, service.parse_model_id(model_id))
    await service.delete_saved(session, user.user_id, config)
    log.info("models.deleted", user_id=str(user.user_id), model_config_id=model_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{model_id}/default",
    response_model=ModelConfiguration,
    responses=error_responses(NotAuthenticated, service.ModelConfigNotFound, UnparsableBody),
)
async def set_default(
    model_id: str,
    user: CurrentUser,
    session: DbSession,
    payload: Annotated[ModelDefaultRequest | None, Body()] = None,
) -> ModelConfiguration:
    """Make this configuration the caller's default model (the body may be empty)."""
    config = await service.get_saved(session, user.user_id, service.parse_model_id(model_id))
    await service.set_default(session, user.user_id, config, is_default=(payload or ModelDefaultRequest()).is_default)
    return await _to_configuration(session, config)


async def _to_configuration(session: AsyncSession, config: ModelConfig) -> ModelConfiguration:
    provider_config = None
    if config.provider_config_id is not None:
        provider_config = await session.get(ProviderConfig, config.provider_config_id)
    return service.to_configuration(config, provider_config.base_url if provider_config else None)
