"""Public schemas of saved model configurations, named as the API documentation names them."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pocketllm.chats.prompt import DEFAULT_CONTEXT_WINDOW

MAX_SETTINGS_BYTES = 65_536
MAX_SYSTEM_PROMPT_LENGTH = 32_000
# Bounds of the token counts a user may set on a saved model. Both fit the database's 32-bit integer columns.
MAX_CONTEXT_WINDOW = 100_000_000
MAX_OUTPUT_TOKENS = 1_000_000


class ModelSettings(BaseModel):
    """Generation settings sent with every request to the model. Unknown keys are kept as they are."""

    model_config = ConfigDict(extra="allow")

    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    top_p: float | None = Field(default=None, ge=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    system_prompt: str | None = Field(default=None, max_length=MAX_SYSTEM_PROMPT_LENGTH)
    metadata: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _bounded_size(self) -> ModelSettings:
        if len(json.dumps(self.model_dump(mode="json"), default=str)) > MAX_SETTINGS_BYTES:
            raise ValueError(f"settings must be at most {MAX_SETTINGS_BYTES} bytes as JSON")
        return self


class ModelConfiguration(BaseModel):
    id: uuid.UUID
    provider: str
    provider_id: uuid.UUID | None = Field(description="The provider configuration this model uses.")
    model: str = Field(description="The provider's model id.")
    name: str
    display_name: str
    description: str | None
    base_url: str | None
    settings: ModelSettings
    context_window: int | None
    max_output_tokens: int | None
    is_default: bool
    is_active: bool
    metadata: dict[str, Any]
    created_at: datetime
    updated_at: datetime


class ModelImportRequest(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True)

    provider: str = Field(min_length=1, max_length=64)
    models: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Catalogue model ids to import; omitted imports the provider's whole catalogue.",
    )
    sync: bool = Field(default=True, description="Check the ids against the live catalogue and copy its details.")
    provider_id: str | None = Field(default=None, max_length=64)
    settings: ModelSettings | None = None

    @field_validator("models")
    @classmethod
    def _clean_ids(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        cleaned = list(dict.fromkeys(item.strip() for item in value))
        if any(not item or len(item) > 255 for item in cleaned):
            raise ValueError("model ids must be 1 to 255 characters long")
        return cleaned


class ModelConfigurationUpdate(BaseModel):
    """Partial update: omitted fields stay. Keys inside `settings` merge, and an explicit null removes one."""

    model_config = ConfigDict(str_strip_whitespace=True)

    display_name: str | None = Field(default=None, min_length=1, max_length=255)
    description: str | None = Field(default=None, max_length=2000)
    settings: ModelSettings | None = None
    is_active: bool | None = None
    context_window: int | None = Field(
        default=None,
        ge=1,
        le=MAX_CONTEXT_WINDOW,
        description="The maximum number of tokens the model reads, which bounds the history sent with each "
        f"message. Null clears it, and replies then assume {DEFAULT_CONTEXT_WINDOW:,}. A new import from the "
        "catalogue replaces it.",
    )
    max_output_tokens: int | None = Field(
        default=None,
        ge=1,
        le=MAX_OUTPUT_TOKENS,
        description="The maximum number of tokens in one reply, an upper bound for `settings.max_tokens`. "
        "Null clears it. A new import from the catalogue replaces it.",
    )


class ModelDefaultRequest(BaseModel):
    is_default: bool = True
