"""Public user schemas, named as the API documentation names them."""

from __future__ import annotations

import json
import uuid
from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pocketllm.db.types import AnyRow
from pocketllm.models import Profile, User


class UserProfile(BaseModel):
    id: uuid.UUID
    email: str
    full_name: str | None = None
    username: str | None = None
    bio: str | None = None
    date_of_birth: date | None = None
    age: int | None = None
    profession: str | None = None
    heard_from: str | None = None
    avatar_url: str | None = None
    invite_code: str | None = None
    referral_code: str | None = None
    referred_by: uuid.UUID | None = None
    invite_status: str = "pending"
    invite_approved_at: datetime | None = None
    waitlist_status: str = "pending"
    waitlist_applied_at: datetime | None = None
    waitlist_metadata: dict[str, Any] | None = None
    onboarding: dict[str, Any] | None = Field(
        default=None,
        description="Onboarding answers as sent. On PostgreSQL their keys may be returned in another order.",
    )
    onboarding_responses: dict[str, Any] | None = Field(
        default=None, description="The same object as `onboarding`, under the name older clients read."
    )
    preferences: dict[str, Any] | None = Field(
        default=None, description="Free-form client settings; `preferences.appearance` holds the theme."
    )
    survey_completed: bool = False
    deletion_status: str | None = None
    deletion_requested_at: datetime | None = None
    deletion_scheduled_for: datetime | None = None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_rows(cls, user: User | AnyRow, profile: Profile | AnyRow, *, avatar_url: str | None = None) -> UserProfile:
        """Build the view from the mapped objects, or from one row of `read_profile` passed as both."""
        return cls(
            id=user.id,
            email=user.email,
            full_name=profile.full_name,
            username=profile.username,
            bio=profile.bio,
            date_of_birth=profile.date_of_birth,
            age=profile.age,
            profession=profile.profession,
            heard_from=profile.heard_from,
            avatar_url=avatar_url,
            invite_code=profile.invite_code,
            referral_code=profile.referral_code,
            referred_by=profile.referred_by,
            invite_status=profile.invite_status,
            invite_approved_at=profile.invite_approved_at,
            waitlist_status=profile.waitlist_status,
            waitlist_applied_at=profile.waitlist_applied_at,
            waitlist_metadata=profile.waitlist_metadata,
            onboarding=profile.onboarding,
            onboarding_responses=profile.onboarding,
            preferences=profile.preferences,
            survey_completed=profile.survey_completed,
            deletion_status=profile.deletion_status,
            deletion_requested_at=profile.deletion_requested_at,
            deletion_scheduled_for=profile.deletion_scheduled_for,
            created_at=profile.created_at,
            updated_at=profile.updated_at,
        )


MAX_JSON_OBJECT_BYTES = 16_384
USERNAME_PATTERN = r"^[A-Za-z0-9_.-]{2,32}$"


def _json_object(value: Any) -> Any:
    """Accept an object, or an object encoded as a JSON string (older clients send that)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise ValueError("must be a JSON object") from error
    if value is not None and not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    if value is not None and len(json.dumps(value)) > MAX_JSON_OBJECT_BYTES:
        raise ValueError(f"must be at most {MAX_JSON_OBJECT_BYTES} bytes as JSON")
    return value


def _date_prefix(value: Any) -> Any:
    # The client may send a full timestamp; only the date part is a date of birth.
    if isinstance(value, str) and len(value) > 10 and value[4:5] == "-":
        return value[:10]
    return value


def _blank_to_none(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        return None
    return value.strip() if isinstance(value, str) else value


class UserProfileUpdate(BaseModel):
    """Partial update: omitted fields stay as they are, an explicit null clears a field.

    Unknown fields are ignored rather than rejected, because the shipped client sends whatever its
    local profile holds.
    """

    model_config = ConfigDict(extra="ignore")

    full_name: str | None = Field(default=None, max_length=200)
    username: str | None = Field(
        default=None, pattern=USERNAME_PATTERN, description="2 to 32 letters, digits, `_`, `.` or `-`."
    )
    bio: str | None = Field(default=None, max_length=1000)
    date_of_birth: date | None = None
    age: int | None = Field(default=None, ge=0, le=150)
    profession: str | None = Field(default=None, max_length=200)
    heard_from: str | None = Field(default=None, max_length=200)
    survey_completed: bool | None = None
    onboarding: dict[str, Any] | None = Field(
        default=None, description="Replaces the old answers as a whole. On PostgreSQL key order is not kept."
    )
    preferences: dict[str, Any] | None = Field(
        default=None,
        description="Merged by top-level key (e.g. `appearance`), each stored as sent; a null value removes its key.",
    )
    avatar_url: str | None = Field(default=None, description="Only `null` has an effect: it removes the avatar.")

    _text = field_validator("full_name", "username", "bio", "profession", "heard_from", mode="before")(_blank_to_none)
    _objects = field_validator("onboarding", "preferences", mode="before")(_json_object)
    _date = field_validator("date_of_birth", mode="before")(_date_prefix)


class OnboardingSurvey(UserProfileUpdate):
    """The answers of the onboarding survey, and the profile fields asked for with it."""

    survey_completed: bool | None = Field(default=True, description="Defaults to true: the survey was answered.")


class DeleteAccountResponse(BaseModel):
    status: Literal["pending"] = "pending"
    deletion_requested_at: datetime
    deletion_scheduled_for: datetime


class CancelDeletionResponse(BaseModel):
    canceled: bool
    profile: UserProfile
    previous_deletion_requested_at: datetime | None = None
    previous_deletion_scheduled_for: datetime | None = None
