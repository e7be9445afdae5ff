"""Public job schemas, named as the API documentation names them."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_METADATA_BYTES = 16_384
MAX_PROMPT_LENGTH = 32_000
JOB_TYPE_PATTERN = r"^[A-Za-z0-9_-]+$"
IMAGE_GENERATION = "image_generation"


def _check_metadata_size(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is not None and len(json.dumps(value, default=str)) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata must be at most {MAX_METADATA_BYTES} bytes as JSON")
    return value


class ImageGenerationInput(BaseModel):
    """The image request of a job. Its fields are checked against the chosen model before the job is queued."""

    model_config = ConfigDict(str_strip_whitespace=True, extra="ignore")

    prompt: str = Field(max_length=MAX_PROMPT_LENGTH)
    model: str = Field(max_length=200)
    provider: str | None = Field(
        default=None,
        max_length=64,
        description="`openai`, `imagerouter` or `custom`. Omitted: OpenAI for its models, else the first "
        "active image provider.",
    )
    size: str | None = Field(default=None, max_length=32, description="`WIDTHxHEIGHT`, e.g. `1024x1024`.")
    n: int = Field(default=1, description="How many images; the model sets the maximum.")
    quality: str | None = Field(default=None, max_length=32)
    style: str | None = Field(default=None, max_length=32)


class JobCreateRequest(BaseModel):
    job_type: str = Field(default=IMAGE_GENERATION, max_length=64, pattern=JOB_TYPE_PATTERN)
    input_data: ImageGenerationInput
    metadata: dict[str, Any] | None = None

    _metadata = field_validator("metadata")(_check_metadata_size)


class JobCreateResponse(BaseModel):
    job_id: uuid.UUID
    status: str


class Job(BaseModel):
    id: uuid.UUID
    user_id: uuid.UUID
    job_type: str
    status: Literal["pending", "processing", "completed", "failed", "cancelled"]
    input_data: dict[str, Any]
    output_data: dict[str, Any] | None = Field(
        default=None,
        description="For a completed image job: `images[{url, width, height, mime_type, revised_prompt?}]` "
        "with signed URLs, `revised_prompt`, `provider`, `model` and `cost`.",
    )
    error_log: str | None = None
    metadata: dict[str, Any] | None = None
    attempts: int
    max_attempts: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None


JobStatusFilter = Literal["pending", "processing", "completed", "failed", "cancelled"]


class JobEstimateRequest(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True)

    model: str = Field(max_length=200)
    provider: str | None = Field(default=None, max_length=64)
    size: str | None = Field(default=None, max_length=32)
    dimensions: list[int] | None = Field(
        default=None, min_length=2, max_length=2, description="`[width, height]`; another way to give `size`."
    )
    n: int = 1
    quality: str | None = Field(default=None, max_length=32)
    style: str | None = Field(default=None, max_length=32)
    steps: int | None = Field(default=None, ge=1, le=1000, description="Accepted for compatibility; not priced.")
    metadata: dict[str, Any] | None = None

    _metadata = field_validator("metadata")(_check_metadata_size)

    @field_validator("dimensions")
    @classmethod
    def _positive_dimensions(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(not 1 <= side <= 16_384 for side in value):
            raise ValueError("dimensions must be two sides from 1 to 16384 pixels")
        return value


class JobEstimateResponse(BaseModel):
    model: str
    provider: str
    cost_credits: float | None = Field(description="Null when no price is known for this model.")
    currency: Literal["credits"] = "credits"
    breakdown: dict[str, Any]
