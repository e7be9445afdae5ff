from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Any

from sqlalchemy import Boolean, Date, ForeignKey, Index, Integer, String, Text, Uuid, func
from sqlalchemy.orm import Mapped, mapped_column

from pocketllm.db.base import Base
from pocketllm.db.types import JSONType, UTCDateTime
from pocketllm.models.mixins import Timestamps


class Profile(Timestamps, Base):
    """The public face of an account: everything `UserProfile` returns except the e-mail address."""

    __tablename__ = "profiles"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    full_name: Mapped[str | None] = mapped_column(String(200))
    username: Mapped[str | None] = mapped_column(String(64))
    bio: Mapped[str | None] = mapped_column(Text)
    date_of_birth: Mapped[date | None] = mapped_column(Date)
    age: Mapped[int | None] = mapped_column(Integer)
    profession: Mapped[str | None] = mapped_column(String(200))
    heard_from: Mapped[str | None] = mapped_column(String(200))
    # Storage key of the current avatar; responses turn it into a URL.
    avatar_key: Mapped[str | None] = mapped_column(String(300))

    invite_code: Mapped[str | None] = mapped_column(String(64))
    referral_code: Mapped[str | None] = mapped_column(String(64))
    referred_by: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))
    invite_status: Mapped[str] = mapped_column(String(32), default="pending")
    invite_approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    waitlist_status: Mapped[str] = mapped_column(String(32), default="pending")
    waitlist_applied_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    waitlist_metadata: Mapped[dict[str, Any] | None] = mapped_column(JSONType)

    onboarding: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    preferences: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    survey_completed: Mapped[bool] = mapped_column(Boolean, default=False)

    deletion_status: Mapped[str | None] = mapped_column(String(32))
    deletion_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    deletion_scheduled_for: Mapped[datetime | None] = mapped_column(UTCDateTime)


# Usernames are unique regardless of case; the index also serves case-insensitive look-ups.
Index("uq_profiles_username_lower", func.lower(Profile.username), unique=True)
