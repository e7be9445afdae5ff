"""Public provider schemas, named as the API documentation names them."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pocketllm.providers.registry import ProviderSpec

MAX_API_KEY_LENGTH = 1024
MAX_METADATA_BYTES = 16_384


def _check_metadata_size(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and len(json.dumps(value, default=str)) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata must be at most {MAX_METADATA_BYTES} bytes as JSON")
    return value


def _strip_key(value: Any) -> Any:
    # The client sends keys copied from dashboards; surrounding whitespace is never part of a key.
    return value.strip() if isinstance(value, str) else value


def _visible_ascii_key(value: str | None) -> str | None:
    # Keys travel in HTTP headers, which take visible ASCII only; every provider's keys fit that.
    if value is not None and any(not "!" <= character <= "~" for character in value):
        raise ValueError("api_key may contain only visible ASCII characters: no spaces, accents or control characters")
    return value


class ProviderConfiguration(BaseModel):
    id: uuid.UUID
    provider: str
    display_name: str
    base_url: str | None
    is_active: bool
    has_api_key: bool
    api_key_preview: str | None = Field(description="A few characters of the key, e.g. `sk-…9f3a`; never the key.")
    requires_api_key: bool
    capabilities: list[str]
    metadata: dict[str, Any] = Field(default_factory=dict)
    message: str | None = None
    last_verified_at: datetime | None = None
    created_at: datetime
    updated_at: datetime


class ProviderStatus(BaseModel):
    provider: str
    display_name: str
    configured: bool
    is_active: bool
    has_api_key: bool
    api_key_preview: str | None = None
    requires_api_key: bool
    message: str


class ProviderActivationRequest(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True)

    provider: str = Field(min_length=1, max_length=64)
    api_key: str | None = Field(default=None, max_length=MAX_API_KEY_LENGTH)
    base_url: str | None = Field(default=None, max_length=2048)
    display_name: str | None = Field(default=None, max_length=200)
    metadata: dict[str, Any] | None = None
    verify: bool = Field(default=True, description="Check the key and URL against the provider before saving.")

    _strip = field_validator("api_key", mode="before")(_strip_key)
    _ascii = field_validator("api_key")(_visible_ascii_key)
    _metadata = field_validator("metadata")(_check_metadata_size)


class ProviderActivationResponse(BaseModel):
    provider: ProviderConfiguration
    message: str


class ProviderUpdateRequest(BaseModel):
    """Partial update: omitted fields stay; an explicit `api_key: null` removes the stored key."""

    model_config = ConfigDict(str_strip_whitespace=True)

    api_key: str | None = Field(default=None, max_length=MAX_API_KEY_LENGTH)
    base_url: str | None = Field(default=None, max_length=2048)
    display_name: str | None = Field(default=None, max_length=200)
    metadata: dict[str, Any] | None = None
    is_active: bool | None = None
    verify: bool = True

    _strip = field_validator("api_key", mode="before")(_strip_key)
    _ascii = field_validator("api_key")(_visible_ascii_key)
    _metadata = field_validator("metadata")(_check_metadata_size)


class ModelPricing(BaseModel):
    input: float | None = Field(default=None, description="US dollars per million input tokens.")
    output: float | None = Field(default=None, description="US dollars per million output tokens.")
    currency: str = "USD"


class ProviderModel(BaseModel):
    id: str
    name: str
    provider: str
    description: str | None = None
    context_window: int | None = None
    max_output_tokens: int | None = None
    pricing: ModelPricing | None = None
    is_active: bool = True
    capabilities: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    architecture: dict[str, Any] | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


def provider_capabilities(spec: ProviderSpec) -> list[str]:
    return sorted(capability.value for capability in spec.capabilities)
