"""Chats and messages in the database, always scoped to the calling user."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import (
    CTE,
    Executable,
    Select,
    String,
    Table,
    Update,
    and_,
    any_,
    bindparam,
    case,
    func,
    insert,
    not_,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, aggregate_order_by
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm.attributes import set_committed_value

from pocketllm.chats.prompt import derive_title
from pocketllm.chats.schemas import ChatSummary, Message
from pocketllm.db.driver_query import DriverQuery, DriverRow, OneTripSteps, run_in_one_trip
from pocketllm.db.types import AnyRow, attribute_columns, utcnow
from pocketllm.errors import InvalidInput, NotFound
from pocketllm.model_configs.service import ModelConfigNotFound
from pocketllm.models import Chat, ModelConfig, ProviderConfig, StoredMessage
from pocketllm.providers.errors import ProviderNotConfigured
from pocketllm.providers.registry import PROVIDERS

# How many earlier messages are loaded to build a prompt; the context window usually cuts sooner.
HISTORY_LIMIT = 200
# The reply path runs its statements on a plain connection (`Database.statements()`), other callers on a
# session. Both run Core statements the same way.
Connectable = AsyncSession | AsyncConnection


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


# Read on every visit of the chat list, so it is built once; see _NEXT_SEQUENCE below for why.
# Columns rather than Chat objects: building ORM objects for 50 chats took about a fifth of the request's CPU.
# The columns of a ChatSummary, with last_sequence as its message count.
_SUMMARY_COLUMNS = (Chat.id, Chat.title, Chat.model_config_id, Chat.created_at, Chat.updated_at, Chat.last_sequence)
_LIST_CHATS = DriverQuery(
    select(*_SUMMARY_COLUMNS)
    .where(Chat.user_id == bindparam("p_user_id"))
    # The id breaks ties between chats updated in the same instant, so pages never overlap.
    .order_by(Chat.updated_at.desc(), Chat.id.desc())
    .limit(bindparam("p_limit"))
    .offset(bindparam("p_offset"))
)


_READ_CHAT = DriverQuery(
    select(*_SUMMARY_COLUMNS).where(Chat.id == bindparam("p_chat_id"), Chat.user_id == bindparam("p_user_id"))
)


async def list_chats(connection: AsyncConnection, user_id: uuid.UUID, *, limit: int, offset: int) -> list[ChatSummary]:
    rows = await _LIST_CHATS.all(connection, {"p_user_id": user_id, "p_limit": limit, "p_offset": offset})
    return [ChatSummary.from_row(row, row.last_sequence) for row in rows]


async def read_chat(connection: AsyncConnection, user_id: uuid.UUID, chat_id: uuid.UUID) -> DriverRow:
    """Return the user's chat as a row with the columns of the chat list, or raise ChatNotFound."""
    row = await _READ_CHAT.first(connection, {"p_user_id": user_id, "p_chat_id": chat_id})
    if row is None:
        raise ChatNotFound()
    return row


async def get_chat(session: AsyncSession, user_id: uuid.UUID, chat_id: uuid.UUID, *, lock: bool = False) -> Chat:
    """Load the user's chat, and with `lock` keep its row locked until the transaction ends (PostgreSQL).

    Pass `lock` when the transaction changes the chat. Without the lock, a delete committed after the read
    makes the UPDATE match no row, which SQLAlchemy raises as StaleDataError.
    """
    statement = select(Chat).where(Chat.id == chat_id, Chat.user_id == user_id)
    if lock:
        statement = statement.with_for_update()
    chat = await session.scalar(statement)
    if chat is None:
        raise ChatNotFound()
    return chat


async def check_model_config(session: AsyncSession, user_id: uuid.UUID, raw_id: str) -> uuid.UUID:
    """Return the id of the caller's model configuration named by `raw_id`, or raise ModelConfigNotFound.

    On PostgreSQL the row stays share-locked until the transaction ends, so that a concurrent delete waits
    instead of turning the caller's reference to it into a foreign key violation.
    """
    model_config_id = parse_id(raw_id, ModelConfigNotFound)
    exists = await session.scalar(
        select(ModelConfig.id)
        .where(ModelConfig.id == model_config_id, ModelConfig.user_id == user_id)
        .with_for_update(read=True)
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


# The statements of the reply path are built once: a statement object keeps its cache key, so running it
# again skips building the expression and looking up its compiled form (about a third of a small
# statement's CPU). Bound parameters are prefixed
# with `p_` because an UPDATE reserves the names of the columns it sets.
_chats: Table = Chat.__table__  # type: ignore[assignment]
_messages: Table = StoredMessage.__table__  # type: ignore[assignment]


# User messages whose reply failed are left out of a prompt: the user usually sends them again, and the
# model should not see the same question twice in a row. The database filters them, so no message's
# metadata has to be decoded here.
_FAILED_USER_MESSAGE = and_(
    StoredMessage.role == "user", StoredMessage.extra_metadata["reply_error"].as_string().is_not(None)
)


def _next_sequence_statement(*, name_chat: bool) -> Update:
    values: dict[str, Any] = {"last_sequence": _chats.c.last_sequence + 1, "updated_at": bindparam("p_now")}
    if name_chat:
        # Name an untitled chat after its first user message, in the same statement.
        values["title"] = func.coalesce(_chats.c.title, bindparam("p_title"))
    return (
        update(_chats)
        .where(_chats.c.id == bindparam("p_chat_id"), _chats.c.user_id == bindparam("p_user_id"))
        .values(values)
        .returning(_chats.c.last_sequence, _chats.c.title)
    )


def _stored_message_cte(numbered: CTE) -> CTE:
    """Build the data-modifying CTE that inserts a message numbered by the `numbered` CTE (its UPDATE)."""
    return (
        insert(_messages)
        .from_select(
            ["id", "chat_id", "sequence", "role", "content", "status", "metadata", "created_at"],
            select(
                bindparam("p_id", type_=_messages.c.id.type),
                bindparam("p_chat_id", type_=_messages.c.chat_id.type),
                numbered.c.last_sequence,
                bindparam("p_role", type_=_messages.c.role.type),
                bindparam("p_content", type_=_messages.c.content.type),
                bindparam("p_status", type_=_messages.c.status.type),
                bindparam("p_metadata", type_=_messages.c.metadata.type),
                bindparam("p_now", type_=_messages.c.created_at.type),
            ).select_from(numbered),
        )
        .returning(_messages.c.id)
        .cte("stored")
    )


def _numbered_insert_statement(next_sequence: Update) -> Select[Any]:
    """Build one PostgreSQL statement that numbers and inserts a message: the UPDATE and the INSERT run as
    data-modifying CTEs, and the statement returns the new sequence number and the chat's title.

    A chat that is not the user's updates no row, so nothing is inserted and no row comes back.
    """
    numbered = next_sequence.cte("numbered")
    return select(numbered.c.last_sequence, numbered.c.title).add_cte(_stored_message_cte(numbered))


_NEXT_SEQUENCE = _next_sequence_statement(name_chat=False)
_NEXT_SEQUENCE_NAMING_CHAT = _next_sequence_statement(name_chat=True)
# Every column is named, so that neither SQLAlchemy nor DriverQuery fills in a default. The creation time is
# p_now, as in the numbering UPDATE and in `_stored_message_cte`.
_INSERT_MESSAGE = insert(_messages).values(
    {
        column.key: bindparam("p_now" if column.key == "created_at" else f"p_{column.key}")
        for column in _messages.columns
    }
)
_NUMBERED_INSERT = _numbered_insert_statement(_NEXT_SEQUENCE)
_NUMBERED_INSERT_NAMING_CHAT = _numbered_insert_statement(_NEXT_SEQUENCE_NAMING_CHAT)
# The same statements for the driver's own call, used on the plain connection of `Database.statements()`.
_ON_DRIVER: dict[Executable, DriverQuery] = {
    statement: DriverQuery(statement, writes=True)
    for statement in (
        _NEXT_SEQUENCE,
        _NEXT_SEQUENCE_NAMING_CHAT,
        _INSERT_MESSAGE,
        _NUMBERED_INSERT,
        _NUMBERED_INSERT_NAMING_CHAT,
    )
}


def _dialect_name(session: Connectable) -> str:
    if isinstance(session, AsyncConnection):
        return session.dialect.name
    return session.get_bind().dialect.name


async def _execute_one(session: Connectable, statement: Executable, parameters: dict[str, Any]) -> Any:
    """Run one of append_message's statements and return its first row, or None when it returns none.

    A plain connection runs it with the driver's own call (DriverQuery), a session through SQLAlchemy.
    """
    if isinstance(session, AsyncConnection):
        return await _ON_DRIVER[statement].first(session, parameters)
    result = await session.execute(statement, parameters)
    if isinstance(result, CursorResult) and not result.returns_rows:
        return None
    return result.first()


async def append_message(
    session: Connectable,
    user_id: uuid.UUID,
    chat: Chat | uuid.UUID,
    *,
    role: str,
    content: str,
    status: str = "complete",
    metadata: dict[str, Any] | None = None,
    commit: bool = False,
) -> Message:
    """Store a message at the chat's next sequence number; raises ChatNotFound if the chat is gone.

    The number comes from one `UPDATE ... RETURNING` on the chat row, so concurrent posts to one chat get
    distinct, gap-free numbers: PostgreSQL makes the second writer wait for the row lock, and SQLite runs
    one write transaction at a time. On PostgreSQL the UPDATE and the INSERT are one statement, which is
    atomic on its own, so it is safe in `Database.statements()`. On SQLite they are two statements in the
    caller's transaction, sent in one trip to the connection's thread on a plain connection. With a
    session, neither goes through its unit of work, which would cost more than the statements themselves.

    With `commit` on SQLite's plain connection, the caller's transaction is committed in the same trip, and
    the caller's block must end without another statement (see `run_in_one_trip`).
    """
    chat_id = chat.id if isinstance(chat, Chat) else chat
    numbering, values = _message_parameters(user_id, chat_id, role, content, status, metadata)

    if _dialect_name(session) == "postgresql":
        statement = _NUMBERED_INSERT_NAMING_CHAT if role == "user" else _NUMBERED_INSERT
        row = await _execute_one(session, statement, {**numbering, **values})
        if row is None:
            raise ChatNotFound()
        sequence, title = row
    elif isinstance(session, AsyncConnection):
        sequence, title = await run_in_one_trip(
            session, partial(_number_and_insert, numbering=numbering, values=values), writes=True, commit=commit
        )
    else:
        row = await _execute_one(session, _next_sequence_for(role), numbering)
        if row is None:
            raise ChatNotFound()
        sequence, title = row
        await _execute_one(session, _INSERT_MESSAGE, {**values, "p_sequence": sequence})

    if isinstance(chat, Chat):
        # The loaded chat learns the new values from RETURNING, as if loaded again, without another query.
        set_committed_value(chat, "last_sequence", sequence)
        set_committed_value(chat, "updated_at", values["p_now"])
        set_committed_value(chat, "title", title)
    return _stored_message(values, sequence)


def _message_parameters(
    user_id: uuid.UUID,
    chat_id: uuid.UUID,
    role: str,
    content: str,
    status: str,
    metadata: dict[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the parameters of the UPDATE that numbers a new message (see `_next_sequence_statement`) and
    those of its INSERT but for the number (see `_stored_message_cte`), with a new id and the time now."""
    now = utcnow()
    numbering: dict[str, Any] = {"p_chat_id": chat_id, "p_user_id": user_id, "p_now": now}
    if role == "user":
        # Names an untitled chat after its first user message.
        numbering["p_title"] = derive_title(content)
    values = {
        "p_id": uuid.uuid4(),
        "p_chat_id": chat_id,
        "p_role": role,
        "p_content": content,
        "p_status": status,
        "p_metadata": metadata,
        "p_now": now,
    }
    return numbering, values


def _stored_message(values: dict[str, Any], sequence: int) -> Message:
    """Return the message that `values` (from `_message_parameters`) inserted with the number `sequence`."""
    return Message(
        id=values["p_id"],
        chat_id=values["p_chat_id"],
        role=values["p_role"],
        content=values["p_content"],
        sequence=sequence,
        status=values["p_status"],
        metadata=values["p_metadata"] or {},
        created_at=values["p_now"],
    )


def _next_sequence_for(role: str) -> Update:
    """Return the UPDATE that numbers a message of `role`: a user's message also names an untitled chat."""
    return _NEXT_SEQUENCE_NAMING_CHAT if role == "user" else _NEXT_SEQUENCE


def _number_and_insert(
    steps: OneTripSteps, *, numbering: dict[str, Any], values: dict[str, Any]
) -> tuple[int, str | None]:
    """Number and insert a message on an SQLite connection's thread, and return its number and the chat's
    title."""
    row = steps.first(_ON_DRIVER[_next_sequence_for(values["p_role"])], numbering)
    if row is None:
        raise ChatNotFound()
    sequence, title = row
    steps.first(_ON_DRIVER[_INSERT_MESSAGE], {**values, "p_sequence": sequence})
    return sequence, title


_MESSAGE_COLUMNS = attribute_columns(StoredMessage)


async def list_messages(
    connection: AsyncConnection,
    chat_id: uuid.UUID,
    *,
    limit: int | None = None,
    offset: int = 0,
    up_to: int | None = None,
) -> Sequence[AnyRow]:
    """List the chat's messages in order as rows, with the attribute names of StoredMessage. With `up_to`,
    list only those numbered up to that sequence.

    GET requests read without a snapshot, so a message can be stored between reading a chat and reading
    its messages. Passing the chat's `last_sequence` as `up_to` keeps the list in step with that chat row:
    a message is numbered and stored atomically, so every number up to it is already stored.
    """
    statement = (
        select(*_MESSAGE_COLUMNS)
        .where(StoredMessage.chat_id == chat_id)
        .order_by(StoredMessage.sequence)
        .offset(offset)
    )
    if up_to is not None:
        statement = statement.where(StoredMessage.sequence <= up_to)
    if limit is not None:
        statement = statement.limit(limit)
    return (await connection.execute(statement)).all()


# The (role, content) pairs of the messages before sequence p_before, newest first, at most HISTORY_LIMIT of
# them, without user messages whose reply failed: the history of a reply on SQLite.
_RECENT_HISTORY = DriverQuery(
    select(StoredMessage.role, StoredMessage.content)
    .where(
        StoredMessage.chat_id == bindparam("p_chat_id"),
        StoredMessage.sequence < bindparam("p_before"),
        not_(_FAILED_USER_MESSAGE),
    )
    .order_by(StoredMessage.sequence.desc())
    .limit(HISTORY_LIMIT)
)


@dataclass(frozen=True, slots=True)
class ReplyModel:
    """The model configuration that a reply uses, with the stored parts of its provider's configuration."""

    id: uuid.UUID
    provider: str
    model: str
    settings: dict[str, Any]
    context_window: int | None
    max_output_tokens: int | None
    base_url: str | None
    api_key_encrypted: str | None


# The chat's own model configuration sorts before the user's default, so one row answers both questions.
# Columns, not ORM objects, so that the reply path needs no ORM session.
_REPLY_MODEL_SELECT = (
    select(
        Chat.id.label("chat_id"),
        ModelConfig.id.label("model_config_id"),
        ModelConfig.provider,
        ModelConfig.model,
        ModelConfig.display_name,
        ModelConfig.settings,
        ModelConfig.context_window,
        ModelConfig.max_output_tokens,
        ModelConfig.is_active.label("model_is_active"),
        ProviderConfig.id.label("provider_config_id"),
        ProviderConfig.is_active.label("provider_is_active"),
        ProviderConfig.base_url,
        ProviderConfig.api_key_encrypted,
    )
    .outerjoin(
        ModelConfig,
        and_(
            ModelConfig.user_id == Chat.user_id,
            or_(ModelConfig.id == Chat.model_config_id, ModelConfig.is_default.is_(True)),
        ),
    )
    .outerjoin(
        ProviderConfig,
        and_(ProviderConfig.user_id == Chat.user_id, ProviderConfig.provider == ModelConfig.provider),
    )
    .where(Chat.id == bindparam("p_chat_id"), Chat.user_id == bindparam("p_user_id"))
    .order_by(case((ModelConfig.id == Chat.model_config_id, 0), else_=1))
    .limit(1)
)
_REPLY_MODEL = DriverQuery(_REPLY_MODEL_SELECT)
_REPLY_MODEL_WIDTH = len(_REPLY_MODEL_SELECT.selected_columns)
_KNOWN_PROVIDERS = sorted(PROVIDERS)
_KEYLESS_PROVIDERS = sorted(spec.id for spec in PROVIDERS.values() if not spec.requires_api_key)


def _prompt_message_statement() -> Select[Any]:
    """Build the PostgreSQL statement that prepares a reply in one round trip.

    It reads the reply's model (`_REPLY_MODEL_SELECT`), numbers and stores the user's message only when
    `_reply_model` would accept that model, and reads the history before the message as `_RECENT_HISTORY`
    does. Its one row contains the model's columns, the new sequence number and the chat's title (NULL when
    nothing was stored), and the roles and contents of the history as two arrays, newest first (NULL when
    there is none). A chat that is not the user's returns no row.

    The history is read from the statement's snapshot, which does not contain the message that the
    statement inserts. It comes as arrays so that the model's columns are not repeated and converted in a
    row per message: with 200 messages of history that took about 0.6 ms more database time per reply.
    """
    model = _REPLY_MODEL_SELECT.cte("model")
    usable = (
        select(model.c.chat_id)
        .where(
            model.c.model_config_id.is_not(None),
            model.c.model_is_active.is_(True),
            model.c.provider_config_id.is_not(None),
            model.c.provider_is_active.is_(True),
            model.c.provider == any_(bindparam("p_known_providers", type_=ARRAY(String))),
            or_(
                model.c.api_key_encrypted.is_not(None),
                model.c.provider == any_(bindparam("p_keyless_providers", type_=ARRAY(String))),
            ),
        )
        .exists()
    )
    numbered = _next_sequence_statement(name_chat=True).where(usable).cte("numbered")
    recent = (
        select(_messages.c.sequence, _messages.c.role, _messages.c.content)
        .where(_messages.c.chat_id == bindparam("p_chat_id"), not_(_FAILED_USER_MESSAGE))
        .order_by(_messages.c.sequence.desc())
        .limit(HISTORY_LIMIT)
        .subquery("recent")
    )
    newest_first = recent.c.sequence.desc()
    history = select(
        func.array_agg(aggregate_order_by(recent.c.role, newest_first)).label("roles"),
        func.array_agg(aggregate_order_by(recent.c.content, newest_first)).label("contents"),
    ).subquery("history")
    # The statement's transaction commits without waiting for the write-ahead log flush (see `start_reply`).
    # set_config(..., true) lasts until the end of the transaction, which is this statement.
    no_flush = select(func.set_config("synchronous_commit", "off", true()).label("setting")).cte("no_flush")
    return (
        select(*model.c, numbered.c.last_sequence, numbered.c.title, history.c.roles, history.c.contents)
        .select_from(model.outerjoin(numbered, true()).join(history, true()).join(no_flush, true()))
        .add_cte(_stored_message_cte(numbered))
    )


_PROMPT_MESSAGE = DriverQuery(_prompt_message_statement(), writes=True)


def _reply_model(row: Sequence[Any]) -> ReplyModel:
    """Check a row of `_REPLY_MODEL_SELECT` and return its model.

    Raises ModelNotConfigured or ProviderNotConfigured when that model cannot reply.
    """
    (
        _,
        model_config_id,
        provider,
        model,
        display_name,
        settings,
        context_window,
        max_output_tokens,
        model_is_active,
        provider_config_id,
        provider_is_active,
        base_url,
        api_key_encrypted,
    ) = row
    if model_config_id is None:
        raise ModelNotConfigured()
    if not model_is_active:
        raise ModelNotConfigured(
            f"The model configuration '{display_name}' is deactivated; activate it or pick another."
        )
    spec = PROVIDERS.get(provider)
    if provider_config_id is None or spec is None or not provider_is_active:
        raise ProviderNotConfigured(
            f"Provider '{provider}' is not active; activate it with POST /v1/providers/activate."
        )
    if spec.requires_api_key and api_key_encrypted is None:
        raise ProviderNotConfigured(f"Provider '{provider}' has no API key; add one to chat with it.")
    return ReplyModel(
        id=model_config_id,
        provider=provider,
        model=model,
        settings=settings or {},
        context_window=context_window,
        max_output_tokens=max_output_tokens,
        base_url=base_url,
        api_key_encrypted=api_key_encrypted,
    )


@dataclass(frozen=True, slots=True)
class ReplyStart:
    """The start of a reply: its model, the stored user message and the history before it."""

    model: ReplyModel
    message: Message
    history: Sequence[Sequence[str]]


async def start_reply(
    connection: AsyncConnection,
    user_id: uuid.UUID,
    chat_id: uuid.UUID,
    *,
    content: str,
    metadata: dict[str, Any] | None,
    commit: bool = False,
) -> ReplyStart:
    """Find the reply's model, store the user's message, and read the history before it.

    Raises ChatNotFound, ModelNotConfigured or ProviderNotConfigured, and then stores nothing. On
    PostgreSQL one statement does all three, which saves two round trips. Its history comes from the
    snapshot that the statement started with. A message that another request stores in the same chat at
    the same moment can therefore be numbered before this one and still be missing from its history, as
    if the two had been sent the other way round.

    The PostgreSQL statement commits without waiting for its write-ahead log to reach the disk
    (`synchronous_commit` off for its transaction only), which saves about 90 µs per reply on the
    benchmark machine (benchmarks/commit_flush.py). The message becomes durable with the next commit that
    waits, such as the stored reply's, or when PostgreSQL's WAL writer flushes it, at most three times
    `wal_writer_delay` later (0.6 s by default). A crash of the database server before that can lose the
    message. A reply stored after it makes it durable, so a chat never keeps a reply without its message.

    On SQLite, which runs one write transaction at a time, each step is its own statement, the history is
    read after the insert, and all of them run in one trip to the connection's thread. With `commit`, that
    trip also commits the caller's transaction, and the caller's block must end without another statement.
    """
    numbering, values = _message_parameters(user_id, chat_id, "user", content, "complete", metadata)
    if connection.dialect.name != "postgresql":
        model, sequence, history = await run_in_one_trip(
            connection,
            partial(_start_reply_on_thread, user_id=user_id, numbering=numbering, values=values),
            writes=True,
            commit=commit,
        )
        return ReplyStart(model, _stored_message(values, sequence), history)

    rows = await _PROMPT_MESSAGE.values(
        connection,
        {
            **numbering,
            **values,
            "p_known_providers": _KNOWN_PROVIDERS,
            "p_keyless_providers": _KEYLESS_PROVIDERS,
        },
    )
    if not rows:
        raise ChatNotFound()
    row = rows[0]
    model = _reply_model(row[:_REPLY_MODEL_WIDTH])
    sequence, _title, roles, contents = row[_REPLY_MODEL_WIDTH:]
    if sequence is None:
        # The model was usable, so the chat row was deleted after the statement's snapshot was taken.
        raise ChatNotFound()
    history = list(zip(roles, contents, strict=True)) if roles else []
    return ReplyStart(model, _stored_message(values, sequence), history)


def _start_reply_on_thread(
    steps: OneTripSteps, *, user_id: uuid.UUID, numbering: dict[str, Any], values: dict[str, Any]
) -> tuple[ReplyModel, int, Sequence[Sequence[str]]]:
    """Run start_reply's statements on an SQLite connection's thread, and return the model, the message's
    number and the history."""
    chat_id = values["p_chat_id"]
    row = steps.first(_REPLY_MODEL, {"p_chat_id": chat_id, "p_user_id": user_id})
    if row is None:
        raise ChatNotFound()
    model = _reply_model(row)
    sequence, _title = _number_and_insert(steps, numbering=numbering, values=values)
    history = steps.values(_RECENT_HISTORY, {"p_chat_id": chat_id, "p_before": sequence})
    return model, sequence, history


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
