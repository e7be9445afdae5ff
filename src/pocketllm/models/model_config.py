from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import Boolean, ForeignKey, Index, Integer, String, Text, UniqueConstraint, Uuid, text
from sqlalchemy.orm import Mapped, mapped_column

from pocketllm.db.base import Base
from pocketllm.db.types import JSONType
from pocketllm.models.mixins import Timestamps, UuidPrimaryKey


class ModelConfig(UuidPrimaryKey, Timestamps, Base):
    """A saved model configuration: one provider model with the user's generation settings."""

    __tablename__ = "model_configs"
    __table_args__ = (
        UniqueConstraint("user_id", "provider", "model"),
        # At most one default per user, enforced by the database rather than by a read-then-write.
        Index(
            "uq_model_configs_default_per_user",
            "user_id",
            unique=True,
            sqlite_where=text("is_default"),
            postgresql_where=text("is_default"),
        ),
    )

    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True)
    provider: Mapped[str] = mapped_column(String(32))
    provider_config_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("provider_configs.id", ondelete="SET NULL")
    )
    # The provider's model id, e.g. "gpt-4o-mini".
    model: Mapped[str] = mapped_column(String(255))
    display_name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(Text)
    settings: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    context_window: Mapped[int | None] = mapped_column(Integer)
    max_output_tokens: Mapped[int | None] = mapped_column(Integer)
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    extra_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONType)
