from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import String, Text
from sqlalchemy.orm import Mapped, mapped_column

from pocketllm.db.base import Base
from pocketllm.db.types import JSONType, UTCDateTime
from pocketllm.models.mixins import Timestamps, UuidPrimaryKey


class WaitlistApplication(UuidPrimaryKey, Timestamps, Base):
    """A request for access; an approved application lets its e-mail address sign up without a code."""

    __tablename__ = "waitlist_applications"

    email: Mapped[str] = mapped_column(String(320), unique=True)
    full_name: Mapped[str | None] = mapped_column(String(200))
    occupation: Mapped[str | None] = mapped_column(String(200))
    motivation: Mapped[str | None] = mapped_column(Text)
    use_case: Mapped[str | None] = mapped_column(Text)
    links: Mapped[list[str] | None] = mapped_column(JSONType)
    source: Mapped[str | None] = mapped_column(String(64))
    # `metadata` is reserved by SQLAlchemy's declarative base, so the attribute has another name.
    extra_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONType)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    approved_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
