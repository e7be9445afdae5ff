from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, Text, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from pocketllm.db.base import Base
from pocketllm.db.types import JSONType, UTCDateTime, utcnow
from pocketllm.models.mixins import Timestamps, UuidPrimaryKey


class Chat(UuidPrimaryKey, Timestamps, Base):
    """A conversation. `updated_at` moves with every new message, which orders the chat list."""

    __tablename__ = "chats"
    __table_args__ = (Index("ix_chats_user_id_updated_at", "user_id", "updated_at", "id"),)

    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"))
    # None until the first user message gives one, or the user sets one.
    title: Mapped[str | None] = mapped_column(String(200))
    # None means "use the user's default model"; a deleted configuration leaves the chat usable.
    model_config_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("model_configs.id", ondelete="SET NULL"))
    # The sequence number of the newest message; incremented in one UPDATE to order concurrent posts.
    last_sequence: Mapped[int] = mapped_column(Integer, default=0)


class StoredMessage(UuidPrimaryKey, Base):
    """One message of a chat, in the order given by `sequence`."""

    __tablename__ = "messages"
    __table_args__ = (UniqueConstraint("chat_id", "sequence"),)

    chat_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("chats.id", ondelete="CASCADE"))
    sequence: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    # "complete", or "incomplete" for a reply whose stream broke after some text.
    status: Mapped[str] = mapped_column(String(16), default="complete")
    extra_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
