"""Chats and messages in the database, always scoped to the calling user."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import and_, func, not_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from pocketllm.chats.prompt import HistoryEntry, derive_title
from pocketllm.db.types import utcnow
from pocketllm.errors import InvalidInput, NotFound
from pocketllm.model_configs.service import ModelConfigNotFound
from pocketllm.models import Chat, ModelConfig, ProviderConfig, StoredMessage
from pocketllm.providers.errors import ProviderNotConfigured
from pocketllm.providers.registry import PROVIDERS

# How many earlier messages are loaded to build a prompt; the context window usually cuts sooner.
HISTORY_LIMIT = 200


class ChatNotFound(NotFound):
    code = "chat_not_found"
    default_message = "No chat with this id exists for your account."


class ModelNotConfigured(InvalidInput):
    code = "model_not_configured"
    default_message = "This chat has no model: import a model with POST /v1/models/import or pick one for the chat."


def parse_id(raw: str | None, error: type[NotFound]) -> uuid.UUID:
    """Parse a path or body id; anything that is not a UUID cannot name a row, so it is not found."""
    try:
        return uuid.UUID(str(raw))
    except ValueError as exception:
        raise error() from exception


async def list_chats(session: AsyncSession, user_id: uuid.UUID, *, limit: int, offset: int) -> list[Chat]:
    result = await session.scalars(
        select(Chat)
        .where(Chat.user_id == user_id)
        # The id breaks ties between chats updated in the same instant, so pages never overlap.
        .order_by(Chat.updated_at.desc(), Chat.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(result)


async def get_chat(session: AsyncSession, user_id: uuid.UUID, chat_id: uuid.UUID) -> Chat:
    chat = await session.scalar(select(Chat).where(Chat.id == chat_id, Chat.user_id == user_id))
    if chat is None:
        raise ChatNotFound()
    return chat


async def check_model_config(session: AsyncSession, user_id: uuid.UUID, raw_id: str) -> uuid.UUID:
    """Return the id of the caller's model configuration named by `raw_id`, or raise ModelConfigNotFound."""
    model_config_id = parse_id(raw_id, ModelConfigNotFound)
    exists = await session.scalar(
        select(ModelConfig.id).where(ModelConfig.id == model_config_id, ModelConfig.user_id == user_id)
    )
    if exists is None:
        raise ModelConfigNotFound()
    return model_config_id


async def create_chat(
    session: AsyncSession,
    user_id: uuid.UUID,
    *,
    title: str | None,
    model_config_id: uuid.UUID | None,
    initial_message: str | None,
) -> Chat:
    now = utcnow()
    chat = Chat(user_id=user_id, title=title or None, model_config_id=model_config_id, created_at=now, updated_at=now)
    session.add(chat)
    await session.flush()
    if initial_message:
        await append_message(session, user_id, chat, role="user", content=initial_message)
    return chat


async def append_message(
    session: AsyncSession,
    user_id: uuid.UUID,
    chat: Chat | uuid.UUID,
    *,
    role: str,
    content: str,
    status: str = "complete",
    metadata: dict[str, Any] | None = None,
) -> StoredMessage:
    """Store a message at the chat's next sequence number; raises ChatNotFound if the chat is gone.

    The number comes from one `UPDATE ... RETURNING` on the chat row, so concurrent posts to one chat get
    distinct, gap-free numbers: PostgreSQL makes the second writer wait for the row lock, and SQLite runs
    one write transaction at a time.
    """
    chat_id = chat.id if isinstance(chat, Chat) else chat
    now = utcnow()
    values: dict[str, Any] = {"last_sequence": Chat.last_sequence + 1, "updated_at": now}
    if role == "user":
        # Name an untitled chat after its first user message, in the same statement.
        values["title"] = func.coalesce(Chat.title, derive_title(content))
    row = (
        await session.execute(
            update(Chat)
            .where(Chat.id == chat_id, Chat.user_id == user_id)
            .values(values)
            .returning(Chat.last_sequence, Chat.title)
            .execution_options(synchronize_session=False)
        )
    ).one_or_none()
    if row is None:
        raise ChatNotFound()
    sequence, title = row

    message = StoredMessage(
        chat_id=chat_id,
        sequence=sequence,
        role=role,
        content=content,
        status=status,
        extra_metadata=metadata,
        created_at=now,
    )
    session.add(message)
    await session.flush()
    if isinstance(chat, Chat):
        # The loaded chat learns the new values from RETURNING, as if loaded again, without another query.
        set_committed_value(chat, "last_sequence", sequence)
        set_committed_value(chat, "updated_at", now)
        set_committed_value(chat, "title", title)
    return message


async def list_messages(
    session: AsyncSession, chat_id: uuid.UUID, *, limit: int | None = None, offset: int = 0
) -> list[StoredMessage]:
    statement = (
        select(StoredMessage).where(StoredMessage.chat_id == chat_id).order_by(StoredMessage.sequence).offset(offset)
    )
    if limit is not None:
        statement = statement.limit(limit)
    return list(await session.scalars(statement))


async def recent_history(session: AsyncSession, chat_id: uuid.UUID, *, before: int) -> list[HistoryEntry]:
    """Load the messages before sequence `before`, oldest first, at most HISTORY_LIMIT of them.

    User messages whose reply failed are left out: the user usually sends them again, and the model
    should not see the same question twice in a row.
    """
    failed_user_message = and_(
        StoredMessage.role == "user", StoredMessage.extra_metadata["reply_error"].as_string().is_not(None)
    )
    # The database leaves those out, so no message's metadata has to be decoded here.
    rows = await session.execute(
        select(StoredMessage.role, StoredMessage.content)
        .where(StoredMessage.chat_id == chat_id, StoredMessage.sequence < before, not_(failed_user_message))
        .order_by(StoredMessage.sequence.desc())
        .limit(HISTORY_LIMIT)
    )
    return [HistoryEntry(role=role, content=content) for role, content in reversed(rows.all())]


async def resolve_model(session: AsyncSession, user_id: uuid.UUID, chat: Chat) -> tuple[ModelConfig, ProviderConfig]:
    """Find the model for a reply: the chat's configuration, else the user's default, with its provider."""
    model_config = None
    if chat.model_config_id is not None:
        model_config = await session.scalar(
            select(ModelConfig).where(ModelConfig.id == chat.model_config_id, ModelConfig.user_id == user_id)
        )
    if model_config is None:
        model_config = await session.scalar(
            select(ModelConfig).where(ModelConfig.user_id == user_id, ModelConfig.is_default.is_(True))
        )
    if model_config is None:
        raise ModelNotConfigured()
    if not model_config.is_active:
        raise ModelNotConfigured(
            f"The model configuration '{model_config.display_name}' is deactivated; activate it or pick another."
        )

    provider_config = await session.scalar(
        select(ProviderConfig).where(
            ProviderConfig.user_id == user_id, ProviderConfig.provider == model_config.provider
        )
    )
    spec = PROVIDERS.get(model_config.provider)
    if provider_config is None or spec is None or not provider_config.is_active:
        raise ProviderNotConfigured(
            f"Provider '{model_config.provider}' is not active; activate it with POST /v1/providers/activate."
        )
    if spec.requires_api_key and provider_config.api_key_encrypted is None:
        raise ProviderNotConfigured(f"Provider '{model_config.provider}' has no API key; add one to chat with it.")
    return model_config, provider_config


async def record_reply_failure(
    session: AsyncSession, user_id: uuid.UUID, message_id: uuid.UUID, *, code: str, detail: str
) -> None:
    """Note on the user's message that its reply failed, so a client can offer to retry."""
    message = await session.scalar(
        select(StoredMessage)
        .join(Chat, Chat.id == StoredMessage.chat_id)
        .where(StoredMessage.id == message_id, Chat.user_id == user_id)
    )
    if message is None:
        return
    message.extra_metadata = {
        **(message.extra_metadata or {}),
        "reply_error": {"code": code, "detail": detail, "at": utcnow().isoformat()},
    }
    await session.flush()
