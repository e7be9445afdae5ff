"""Provider configurations: a user's base URL and encrypted key per provider, always scoped to that user."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from pocketllm.errors import InvalidInput, NotFound
from pocketllm.kit.crypto import SecretBox, SecretDecryptionFailed, preview_secret
from pocketllm.models import ProviderConfig
from pocketllm.providers.catalogue import ProviderTarget
from pocketllm.providers.registry import PROVIDERS, ProviderSpec
from pocketllm.providers.schemas import ProviderConfiguration, ProviderStatus, provider_capabilities


class ProviderConfigNotFound(NotFound):
    code = "provider_not_found"
    default_message = "This provider is not configured for your account."


class ApiKeyRequired(InvalidInput):
    code = "api_key_required"


class BaseUrlRequired(InvalidInput):
    code = "base_url_required"


class InvalidBaseUrl(InvalidInput):
    code = "invalid_base_url"


class ProviderKeyUnreadable(InvalidInput):
    code = "provider_key_unreadable"
    default_message = (
        "The stored API key can no longer be decrypted because ENCRYPTION_KEY changed; save the key again."
    )


@dataclass(frozen=True, slots=True)
class EncryptedKey:
    """An API key ready to store: the Fernet token and its preview. None values remove the key."""

    token: str | None
    preview: str | None


def encrypt_key(secrets: SecretBox, api_key: str | None) -> EncryptedKey:
    if not api_key:
        return EncryptedKey(None, None)
    return EncryptedKey(secrets.encrypt(api_key), preview_secret(api_key))


def normalise_base_url(raw: str) -> str:
    """Check the shape of a base URL and drop a trailing slash; the outbound guard checks its address later."""
    try:
        url = httpx.URL(raw.strip())
    except (httpx.InvalidURL, ValueError) as error:
        raise InvalidBaseUrl("The base URL is not a valid URL.") from error
    if url.scheme not in ("http", "https") or not url.host:
        raise InvalidBaseUrl("The base URL must be an http:// or https:// URL with a host name.")
    if url.userinfo:
        raise InvalidBaseUrl("The base URL must not contain a user name or password; use api_key for the key.")
    if url.query or url.fragment:
        raise InvalidBaseUrl("The base URL must not contain a query string or fragment.")
    return str(url).rstrip("/")


def effective_base_url(spec: ProviderSpec, configured: str | None) -> str:
    base_url = configured or spec.default_base_url
    if base_url is None:
        raise BaseUrlRequired(f"Provider '{spec.id}' needs a base_url.")
    return base_url


class StoredProvider(Protocol):
    """The stored parts of a provider configuration that a call needs: a ProviderConfig or a row of its columns."""

    @property
    def base_url(self) -> str | None: ...

    @property
    def api_key_encrypted(self) -> str | None: ...


def decrypt_key(secrets: SecretBox, config: StoredProvider) -> str | None:
    if config.api_key_encrypted is None:
        return None
    try:
        return secrets.decrypt(config.api_key_encrypted)
    except SecretDecryptionFailed as error:
        raise ProviderKeyUnreadable() from error


def build_target(spec: ProviderSpec, config: StoredProvider, secrets: SecretBox) -> ProviderTarget:
    return ProviderTarget(
        spec=spec, base_url=effective_base_url(spec, config.base_url), api_key=decrypt_key(secrets, config)
    )


async def list_configs(session: AsyncSession, user_id: uuid.UUID) -> list[ProviderConfig]:
    result = await session.scalars(
        select(ProviderConfig).where(ProviderConfig.user_id == user_id).order_by(ProviderConfig.provider)
    )
    return list(result)


async def find_config(session: AsyncSession, user_id: uuid.UUID, provider: str) -> ProviderConfig | None:
    return await session.scalar(
        select(ProviderConfig).where(ProviderConfig.user_id == user_id, ProviderConfig.provider == provider)
    )


async def get_config(session: AsyncSession, user_id: uuid.UUID, provider: str) -> ProviderConfig:
    config = await find_config(session, user_id, provider)
    if config is None:
        raise ProviderConfigNotFound(f"Provider '{provider}' is not configured for your account.")
    return config


async def save_config(
    session: AsyncSession,
    user_id: uuid.UUID,
    spec: ProviderSpec,
    *,
    values: dict[str, Any],
    key: EncryptedKey | None,
) -> ProviderConfig:
    """Create the user's configuration for `spec` or update it with `values` (column name to value).

    `key` None keeps the stored key; an EncryptedKey replaces it (with None token: removes it).
    """
    config = await find_config(session, user_id, spec.id)
    if config is None:
        config = ProviderConfig(user_id=user_id, provider=spec.id, is_active=True)
        session.add(config)
    for column, value in values.items():
        setattr(config, column, value)
    if key is not None:
        config.api_key_encrypted = key.token
        config.api_key_preview = key.preview
    await session.flush()
    return config


def to_configuration(config: ProviderConfig) -> ProviderConfiguration:
    spec = PROVIDERS[config.provider]
    return ProviderConfiguration(
        id=config.id,
        provider=config.provider,
        display_name=config.display_name or spec.display_name,
        base_url=config.base_url or spec.default_base_url,
        is_active=config.is_active,
        has_api_key=config.api_key_encrypted is not None,
        api_key_preview=config.api_key_preview,
        requires_api_key=spec.requires_api_key,
        capabilities=provider_capabilities(spec),
        metadata=config.extra_metadata or {},
        message=config.status_message,
        last_verified_at=config.last_verified_at,
        created_at=config.created_at,
        updated_at=config.updated_at,
    )


def status_message(spec: ProviderSpec, config: ProviderConfig | None) -> str:
    if config is None:
        return "Not configured."
    if not config.is_active:
        return "Deactivated."
    if spec.requires_api_key and config.api_key_encrypted is None:
        return "API key missing."
    return config.status_message or "Active."


def to_status(spec: ProviderSpec, config: ProviderConfig | None) -> ProviderStatus:
    has_key = config is not None and config.api_key_encrypted is not None
    usable = config is not None and (has_key or not spec.requires_api_key)
    return ProviderStatus(
        provider=spec.id,
        display_name=(config.display_name if config else None) or spec.display_name,
        configured=usable,
        is_active=bool(config and config.is_active),
        has_api_key=has_key,
        api_key_preview=config.api_key_preview if config else None,
        requires_api_key=spec.requires_api_key,
        message=status_message(spec, config),
    )


def verification_values(verified_at: datetime | None, *, with_key: bool) -> dict[str, Any]:
    """Return the stored status of a configuration checked at `verified_at`, or saved unchecked when None."""
    if verified_at is None:
        return {"status_message": "Saved without verification.", "last_verified_at": None}
    if not with_key:
        return {"status_message": "Verified: the provider listed its models.", "last_verified_at": verified_at}
    return {"status_message": "Verified: the provider accepted the key.", "last_verified_at": verified_at}
