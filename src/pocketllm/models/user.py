from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from pocketllm.db.base import Base
from pocketllm.db.types import UTCDateTime
from pocketllm.models.mixins import Timestamps, UuidPrimaryKey


class User(UuidPrimaryKey, Timestamps, Base):
    """An account and its password credential.

    With the Supabase backend the id is GoTrue's user id and `password_hash` stays empty, because GoTrue
    owns the credential.
    """

    __tablename__ = "users"

    # The canonical form (see auth.emails.canonicalize_email); uniqueness is enforced on it.
    email: Mapped[str] = mapped_column(String(320), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    last_sign_in_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    password_changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
