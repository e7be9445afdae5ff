from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Boolean, ForeignKey, String, Text, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from pocketllm.db.base import Base
from pocketllm.db.types import JSONType, UTCDateTime
from pocketllm.models.mixins import Timestamps, UuidPrimaryKey


class ProviderConfig(UuidPrimaryKey, Timestamps, Base):
    """A user's connection to one provider: base URL and encrypted API key.

    Deactivating keeps the row, so saved model configurations and chat history still name it.
    """

    __tablename__ = "provider_configs"
    __table_args__ = (UniqueConstraint("user_id", "provider"),)

    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    provider: Mapped[str] = mapped_column(String(32))
    display_name: Mapped[str | None] = mapped_column(String(200))
    # None means the registry's default base URL.
    base_url: Mapped[str | None] = mapped_column(Text)
    # Fernet token under ENCRYPTION_KEY; never returned or logged.
    api_key_encrypted: Mapped[str | None] = mapped_column(Text)
    api_key_preview: Mapped[str | None] = mapped_column(String(32))
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    status_message: Mapped[str | None] = mapped_column(String(500))
    last_verified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    extra_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONType)
