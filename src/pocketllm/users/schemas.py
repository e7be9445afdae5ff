"""Public user schemas, named as the API documentation names them."""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any

from pydantic import BaseModel, Field

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
    onboarding: dict[str, Any] | None = Field(default=None, description="Onboarding answers, kept verbatim.")
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
    def from_rows(cls, user: User, profile: Profile) -> UserProfile:
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
            avatar_url=profile.avatar_url,
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
