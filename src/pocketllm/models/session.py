from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from pocketllm.db.base import Base
from pocketllm.db.types import UTCDateTime, utcnow
from pocketllm.models.mixins import UuidPrimaryKey


class AuthSession(UuidPrimaryKey, Base):
    """A signed-in device. Access tokens name it in their `session_id` claim and stop working once it is
    revoked or expired."""

    __tablename__ = "auth_sessions"

    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    refreshed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Slides forward on every refresh: a session ends after SESSION_TTL_SECONDS without use.
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_reason: Mapped[str | None] = mapped_column(String(32))
    user_agent: Mapped[str | None] = mapped_column(String(512))
    ip_address: Mapped[str | None] = mapped_column(String(64))


class RefreshToken(UuidPrimaryKey, Base):
    """One refresh token of a session, stored only as its SHA-256 hash.

    Without rotation a session has one token for its whole life. With rotation each use revokes the token
    and issues a child whose `parent_id` points back, which is how reuse of an old token is detected.
    """

    __tablename__ = "refresh_tokens"

    session_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("auth_sessions.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    parent_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
