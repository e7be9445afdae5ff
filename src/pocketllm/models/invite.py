from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Boolean, CheckConstraint, ForeignKey, Integer, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from pocketllm.db.base import Base
from pocketllm.db.types import UTCDateTime
from pocketllm.models.mixins import Timestamps, UuidPrimaryKey


class InviteCode(UuidPrimaryKey, Timestamps, Base):
    """A code that lets up to `max_uses` people sign up while sign-up is invite-gated."""

    __tablename__ = "invite_codes"
    __table_args__ = (
        CheckConstraint("max_uses >= 1", name="max_uses_positive"),
        CheckConstraint("uses_count >= 0 AND uses_count <= max_uses", name="uses_within_limit"),
    )

    # Stored upper-case; codes are compared case-insensitively.
    code: Mapped[str] = mapped_column(String(64), unique=True)
    max_uses: Mapped[int] = mapped_column(Integer, default=1)
    uses_count: Mapped[int] = mapped_column(Integer, default=0)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # "admin" for codes made with the CLI, "referral" for a user's personal code.
    kind: Mapped[str] = mapped_column(String(16), default="admin")
    created_by: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))
