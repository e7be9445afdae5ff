"""Request and response bodies of /v1/waitlist and /v1/referral, named as the API documentation names them."""

from __future__ import annotations

import json
import re
import uuid
from datetime import datetime
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from pocketllm.models import Referral, WaitlistApplication

MAX_LINKS = 20
MAX_LINK_LENGTH = 2048
MAX_LONG_TEXT_LENGTH = 5000
# Serialised size limit of the free-form `metadata` object of a waitlist application.
MAX_METADATA_BYTES = 10_000
MAX_PERSONAL_MESSAGE_LENGTH = 2000


def _blank_to_none(value: object) -> object:
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


class WaitlistEntryCreate(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    email: str = Field(min_length=3, max_length=320, examples=["ada@example.com"])
    # The shipped client sends `name`; `full_name` is accepted too.
    full_name: str | None = Field(
        default=None, max_length=200, validation_alias=AliasChoices("full_name", "name"), examples=["Ada Lovelace"]
    )
    occupation: str | None = Field(default=None, max_length=200)
    motivation: str | None = Field(default=None, max_length=MAX_LONG_TEXT_LENGTH)
    use_case: str | None = Field(default=None, max_length=MAX_LONG_TEXT_LENGTH)
    links: list[str] | None = Field(
        default=None, description=f"At most {MAX_LINKS} links; a string is split on commas and line breaks."
    )
    source: str | None = Field(default=None, max_length=64, examples=["app_auth"])
    metadata: dict[str, Any] | None = Field(default=None, description="Free-form details such as the platform.")

    _blank_texts = field_validator("full_name", "occupation", "motivation", "use_case", "source", mode="before")(
        _blank_to_none
    )

    @field_validator("links", mode="before")
    @classmethod
    def _split_links(cls, value: Any) -> Any:
        if isinstance(value, str):
            return re.split(r"[,\n\r]+", value)
        return value

    @field_validator("links")
    @classmethod
    def _check_links(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        links = [link.strip() for link in value if link.strip()]
        if len(links) > MAX_LINKS:
            raise ValueError(f"at most {MAX_LINKS} links are accepted")
        if any(len(link) > MAX_LINK_LENGTH for link in links):
            raise ValueError(f"each link must be at most {MAX_LINK_LENGTH} characters long")
        return links

    @field_validator("metadata")
    @classmethod
    def _check_metadata_size(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(json.dumps(value, ensure_ascii=False).encode()) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata must be at most {MAX_METADATA_BYTES} bytes as JSON")
        return value


class WaitlistEntry(BaseModel):
    id: uuid.UUID
    email: str
    full_name: str | None = None
    name: str | None = Field(default=None, description="The same value as `full_name`.")
    occupation: str | None = None
    motivation: str | None = None
    use_case: str | None = None
    links: list[str] | None = None
    source: str | None = None
    metadata: dict[str, Any] | None = None
    status: str = Field(description="pending, approved or rejected.")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, application: WaitlistApplication) -> WaitlistEntry:
        return cls(
            id=application.id,
            email=application.email,
            full_name=application.full_name,
            name=application.full_name,
            occupation=application.occupation,
            motivation=application.motivation,
            use_case=application.use_case,
            links=application.links,
            source=application.source,
            metadata=application.extra_metadata,
            status=application.status,
            created_at=application.created_at,
            updated_at=application.updated_at,
        )


class ReferralSendRequest(BaseModel):
    email: str = Field(min_length=3, max_length=320, examples=["grace@example.com"])
    full_name: str | None = Field(default=None, max_length=200)
    message: str | None = Field(
        default=None, max_length=MAX_PERSONAL_MESSAGE_LENGTH, description="A personal note quoted in the e-mail."
    )

    _blank_texts = field_validator("full_name", "message", mode="before")(_blank_to_none)


class ReferralSendResponse(BaseModel):
    referral_id: uuid.UUID
    invite_code: str
    status: str = Field(description="pending, or joined once the address has signed up with the code.")
    email: str
    invite_sent: bool = Field(
        description="Whether this request queued an invite e-mail; false within the resend cool-down."
    )


class ReferralEntry(BaseModel):
    referral_id: uuid.UUID
    email: str
    full_name: str | None = None
    status: str = Field(description="pending or joined.")
    reward_status: str = Field(description="none before the join, then pending, or issued once granted.")
    created_at: datetime
    accepted_at: datetime | None = None

    @classmethod
    def from_row(cls, referral: Referral) -> ReferralEntry:
        return cls(
            referral_id=referral.id,
            email=referral.email,
            full_name=referral.full_name,
            status=referral.status,
            reward_status=referral.reward_status,
            created_at=referral.created_at,
            accepted_at=referral.accepted_at,
        )


class ReferralStatsBody(BaseModel):
    total_sent: int = Field(description="Referrals that were sent an invite e-mail.")
    total_joined: int
    pending: int
    rewards_issued: int = Field(description="Rewards recorded for joined referrals, granted or not.")


class ReferralListResponse(BaseModel):
    invite_code: str
    max_uses: int
    uses_count: int
    remaining_uses: int
    invite_link: str
    share_message: str
    stats: ReferralStatsBody
    referrals: list[ReferralEntry]
