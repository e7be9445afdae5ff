"""Public chat schemas, named as the API documentation names them."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Row

from pocketllm.models import Chat, StoredMessage

MAX_MESSAGE_LENGTH = 100_000
MAX_METADATA_BYTES = 16_384
SERVER_METADATA_KEYS = frozenset({"reply_error", "incomplete", "error", "reply_to"})
DEFAULT_TITLE = "New chat"


def _strip_required(value: Any) -> Any:
    return value.strip() if isinstance(value, str) else value


class ChatSummary(BaseModel):
    id: uuid.UUID
    title: str
    model_config_id: uuid.UUID | None
    created_at: datetime
    updated_at: datetime
    message_count: int = Field(description="Messages in the chat, including failed and incomplete replies.")

    @classmethod
    def from_row(cls, chat: Chat | Row[*tuple[Any, ...]], message_count: int) -> ChatSummary:
        """Build the summary from a Chat or from a row with the same column names."""
        return cls(
            id=chat.id,
            title=chat.title or DEFAULT_TITLE,
            model_config_id=chat.model_config_id,
            created_at=chat.created_at,
            updated_at=chat.updated_at,
            message_count=message_count,
        )


class Message(BaseModel):
    id: uuid.UUID
    chat_id: uuid.UUID
    role: Literal["user", "assistant", "system"]
    content: str
    sequence: int = Field(description="Position in the chat, assigned by the server; messages sort by it.")
    status: Literal["complete", "incomplete"] = Field(
        description="`incomplete`: the provider's stream broke after this much of the reply."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict,
        description="For assistant replies: provider, model, finish_reason, usage, latency_ms. A user "
        "message whose reply failed carries `reply_error` with the error code.",
    )
    created_at: datetime

    @classmethod
    def from_row(cls, message: StoredMessage | Row[*tuple[Any, ...]]) -> Message:
        """Build the message from a StoredMessage or from a row with its attribute names."""
        return cls(
            id=message.id,
            chat_id=message.chat_id,
            role=message.role,
            content=message.content,
            sequence=message.sequence,
            status=message.status,
            metadata=message.extra_metadata or {},
            created_at=message.created_at,
        )


class ChatWithMessages(BaseModel):
    chat: ChatSummary
    messages: list[Message]


class ChatCreate(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True, protected_namespaces=())

    title: str | None = Field(default=None, max_length=200)
    model_config_id: str | None = Field(default=None, max_length=64)
    initial_message: str | None = Field(
        default=None,
        max_length=MAX_MESSAGE_LENGTH,
        description="Stored as the chat's first user message; no reply is generated for it.",
    )


class ChatUpdate(BaseModel):
    """Partial update: omitted fields stay; `model_config_id: null` makes the chat use the default model."""

    model_config = ConfigDict(str_strip_whitespace=True, protected_namespaces=())

    title: str | None = Field(default=None, min_length=1, max_length=200)
    model_config_id: str | None = Field(default=None, max_length=64)


class MessageCreate(BaseModel):
    content: str = Field(min_length=1, max_length=MAX_MESSAGE_LENGTH)
    role: Literal["user", "assistant", "system"] = Field(
        default="user",
        description="`user` gets a reply from the chat's model; `assistant` and `system` are only stored.",
    )
    stream: bool = Field(default=False, description="Answer with a text/event-stream (see docs/streaming.md).")
    metadata: dict[str, Any] | None = None

    _strip = field_validator("content", mode="before")(_strip_required)

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and len(json.dumps(value, default=str)) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata must be at most {MAX_METADATA_BYTES} bytes as JSON")
        # These keys are the server's record of a reply; a client must not be able to forge them.
        return {key: item for key, item in value.items() if key not in SERVER_METADATA_KEYS} if value else value
