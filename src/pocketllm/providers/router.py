"""/v1/providers: bring-your-own-key provider configurations and their live catalogues."""

from __future__ import annotations

import contextlib
from datetime import datetime
from typing import Annotated

import structlog
from fastapi import Query, Response, status

from pocketllm.auth.dependencies import CurrentUser
from pocketllm.db.dependencies import Db, DbSession
from pocketllm.db.types import utcnow
from pocketllm.errors import NotAuthenticated, UnparsableBody, error_responses
from pocketllm.kit.routing import JsonBodyRoute, PrefixRouter
from pocketllm.providers import service
from pocketllm.providers.catalogue import ProviderTarget
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
from pocketllm.providers.schemas import (
    ProviderActivationRequest,
    ProviderActivationResponse,
    ProviderConfiguration,
    ProviderModel,
    ProviderStatus,
    ProviderUpdateRequest,
)

router = PrefixRouter(prefix="/v1/providers", tags=["providers"], route_class=JsonBodyRoute)
log = structlog.get_logger(__name__)

_SAVE_ERRORS = (
    NotAuthenticated,
    UnsupportedProvider,
    service.ApiKeyRequired,
    service.BaseUrlRequired,
    service.InvalidBaseUrl,
    ProviderAuthFailed,
    ProviderUnreachable,
    ProviderUrlNotAllowed,
    UnparsableBody,
)
_CATALOGUE_ERRORS = (
    NotAuthenticated,
    UnsupportedProvider,
    ProviderNotConfigured,
    service.ProviderKeyUnreadable,
    ProviderAuthFailed,
    ProviderUnreachable,
    ProviderUrlNotAllowed,
    ProviderRateLimited,
    ProviderRequestFailed,
    ProviderTimeout,
)


async def verify_target(providers: Providers, target: ProviderTarget) -> None:
    """Ask the provider for its model list with the new key; reject what it refuses or cannot answer."""
    try:
        await providers.catalogue.fetch(target, use_cache=False)
    except (ProviderAuthFailed, ProviderUrlNotAllowed, ProviderUnreachable):
        raise
    except (ProviderTimeout, ProviderRequestFailed, ProviderRateLimited) as error:
        reason = error.message if error.message.endswith(".") else error.message + "."
        raise ProviderUnreachable(
            f'{reason} Save with "verify": false to store the configuration without checking it.'
        ) from error


async def check_target(providers: Providers, target: ProviderTarget, *, verify: bool) -> datetime | None:
    """Check a configuration before it is saved; returns when it was verified with the provider, if it was.

    The outbound guard always checks the base URL's address, so a URL the server would refuse to call
    (a metadata or, unless allowed, private address) is never stored. With `verify` false a host name that
    does not resolve right now is accepted, because the guard checks it again on every request.
    """
    if verify:
        await verify_target(providers, target)
        return utcnow()
    with contextlib.suppress(ProviderUnreachable):
        await providers.http.guard.check(target.base_url)
    return None


@router.get("", response_model=list[ProviderConfiguration], responses=error_responses(NotAuthenticated))
async def list_providers(user: CurrentUser, session: DbSession) -> list[ProviderConfiguration]:
    """List the caller's provider configurations, active or not."""
    return [service.to_configuration(config) for config in await service.list_configs(session, user.user_id)]


@router.get("/status", response_model=list[ProviderStatus], responses=error_responses(NotAuthenticated))
async def provider_status(user: CurrentUser, session: DbSession) -> list[ProviderStatus]:
    """Report every supported provider, configured or not, with the caller's state for it."""
    configs = {config.provider: config for config in await service.list_configs(session, user.user_id)}
    return [service.to_status(spec, configs.get(spec.id)) for spec in PROVIDERS.values()]


@router.post("/activate", response_model=ProviderActivationResponse, responses=error_responses(*_SAVE_ERRORS))
async def activate_provider(
    payload: ProviderActivationRequest, user: CurrentUser, database: Db, providers: Providers
) -> ProviderActivationResponse:
    """Create or update a provider configuration; the key is checked with the provider unless `verify` is false."""
    spec = get_provider_spec(payload.provider)
    async with database.read_only() as session:
        existing = await service.find_config(session, user.user_id, spec.id)

    base_url = service.normalise_base_url(payload.base_url) if payload.base_url else None
    stored_base_url = existing.base_url if existing else None
    target_base_url = service.effective_base_url(spec, base_url or stored_base_url)
    api_key = payload.api_key or None
    keeps_stored_key = api_key is None and existing is not None and existing.api_key_encrypted is not None
    if spec.requires_api_key and api_key is None and not keeps_stored_key:
        raise service.ApiKeyRequired(f"Provider '{spec.id}' needs an api_key.")
    target_key = service.decrypt_key(providers.secrets, existing) if keeps_stored_key and existing else api_key

    verified_at = await check_target(
        providers, ProviderTarget(spec=spec, base_url=target_base_url, api_key=target_key), verify=payload.verify
    )

    values = {"is_active": True, **service.verification_values(verified_at, with_key=target_key is not None)}
    if base_url is not None:
        values["base_url"] = base_url
    if payload.display_name is not None:
        values["display_name"] = payload.display_name
    if payload.metadata is not None:
        values["extra_metadata"] = payload.metadata
    key = service.encrypt_key(providers.secrets, api_key) if api_key is not None else None
    async with database.transaction() as session:
        config = await service.save_config(session, user.user_id, spec, values=values, key=key)

    await providers.catalogue.invalidate(ProviderTarget(spec=spec, base_url=target_base_url, api_key=target_key))
    log.info("provider.activated", user_id=str(user.user_id), provider=spec.id, verified=payload.verify)
    return ProviderActivationResponse(
        provider=service.to_configuration(config), message=f"{spec.display_name} is active."
    )


@router.patch(
    "/{provider}",
    response_model=ProviderConfiguration,
    responses=error_responses(*_SAVE_ERRORS, service.ProviderConfigNotFound),
)
async def update_provider(
    provider: str, payload: ProviderUpdateRequest, user: CurrentUser, database: Db, providers: Providers
) -> ProviderConfiguration:
    """Rotate or remove the key (`api_key: null`), or change base URL, name, metadata or active state."""
    spec = get_provider_spec(provider)
    async with database.read_only() as session:
        config = await service.get_config(session, user.user_id, spec.id)
    changed = payload.model_fields_set

    values: dict[str, object] = {}
    key = None
    api_key = config_key = service.decrypt_key(providers.secrets, config) if config.api_key_encrypted else None
    if "api_key" in changed:
        api_key = payload.api_key or None
        key = service.encrypt_key(providers.secrets, api_key)
    base_url = config.base_url
    if "base_url" in changed:
        base_url = service.normalise_base_url(payload.base_url) if payload.base_url else None
        values["base_url"] = base_url
    if "display_name" in changed:
        values["display_name"] = payload.display_name
    if "metadata" in changed:
        values["extra_metadata"] = payload.metadata
    is_active = payload.is_active if payload.is_active is not None else config.is_active
    values["is_active"] = is_active

    if is_active and spec.requires_api_key and api_key is None:
        raise service.ApiKeyRequired(f"Provider '{spec.id}' needs an api_key while it is active.")
    target = ProviderTarget(spec=spec, base_url=service.effective_base_url(spec, base_url), api_key=api_key)
    connection_changed = api_key != config_key or base_url != config.base_url
    if connection_changed and is_active:
        verified_at = await check_target(providers, target, verify=payload.verify)
        values.update(service.verification_values(verified_at, with_key=api_key is not None))
    elif "base_url" in changed:
        await check_target(providers, target, verify=False)

    async with database.transaction() as session:
        updated = await service.save_config(session, user.user_id, spec, values=values, key=key)

    await providers.catalogue.invalidate(target)
    log.info("provider.updated", user_id=str(user.user_id), provider=spec.id, fields=sorted(changed))
    return service.to_configuration(updated)


@router.delete(
    "/{provider}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(NotAuthenticated, UnsupportedProvider, service.ProviderConfigNotFound),
)
async def deactivate_provider(provider: str, user: CurrentUser, session: DbSession) -> Response:
    """Deactivate a provider; its configuration and the model configurations that use it are kept."""
    spec = get_provider_spec(provider)
    config = await service.get_config(session, user.user_id, spec.id)
    config.is_active = False
    await session.flush()
    log.info("provider.deactivated", user_id=str(user.user_id), provider=spec.id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/{provider}/models", response_model=list[ProviderModel], responses=error_responses(*_CATALOGUE_ERRORS))
async def provider_models(
    provider: str,
    user: CurrentUser,
    database: Db,
    providers: Providers,
    query: Annotated[
        str | None, Query(max_length=200, description="Case-insensitive filter on id, name and description.")
    ] = None,
) -> list[ProviderModel]:
    """Fetch one provider's live model catalogue with the caller's key."""
    spec = get_provider_spec(provider)
    async with database.read_only() as session:
        config = await service.find_config(session, user.user_id, spec.id)
    if config is None or not config.is_active:
        raise ProviderNotConfigured(f"Provider '{spec.id}' is not active; activate it first.")

    models = await providers.catalogue.fetch(service.build_target(spec, config, providers.secrets))
    return filter_models(models, query)


def filter_models(models: list[ProviderModel], query: str | None) -> list[ProviderModel]:
    if not query or not query.strip():
        return models
    needle = query.strip().lower()
    return [
        model
        for model in models
        if needle in model.id.lower() or needle in model.name.lower() or needle in (model.description or "").lower()
    ]
