"""/v1/chats: conversations, their messages, and replies from the user's own models."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import pydantic_core
import structlog
from fastapi import Query, Request, Response, status

from pocketllm.auth.dependencies import CurrentUser
from pocketllm.chats import service
from pocketllm.chats.replies import PreparedReply, ReplyGenerator, ReplyInterrupted, stream_items
from pocketllm.chats.schemas import ChatCreate, ChatSummary, ChatUpdate, ChatWithMessages, Message, MessageCreate
from pocketllm.db.dependencies import Db, DbSession
from pocketllm.errors import NotAuthenticated, PocketLLMError, RateLimited, UnparsableBody, error_responses
from pocketllm.kit.ratelimit import Limiter
from pocketllm.kit.routing import JsonBodyRoute, PrefixRouter
from pocketllm.kit.streaming import EventStreamResponse
from pocketllm.model_configs.service import ModelConfigNotFound
from pocketllm.providers.errors import (
    ContextLengthExceeded,
    ProviderAuthFailed,
    ProviderNotConfigured,
    ProviderRateLimited,
    ProviderRequestFailed,
    ProviderTimeout,
)
from pocketllm.providers.guard import ProviderUrlNotAllowed
from pocketllm.providers.service import ProviderKeyUnreadable

# Far beyond any real list; larger values would overflow the databases' 64-bit integers.
MAX_OFFSET = 1_000_000_000

router = PrefixRouter(prefix="/v1/chats", tags=["chats"], route_class=JsonBodyRoute)
log = structlog.get_logger(__name__)

_REPLY_ERRORS = (
    NotAuthenticated,
    service.ChatNotFound,
    service.ModelNotConfigured,
    ProviderNotConfigured,
    ProviderKeyUnreadable,
    ProviderAuthFailed,
    ProviderUrlNotAllowed,
    ContextLengthExceeded,
    ProviderRateLimited,
    ProviderRequestFailed,
    ProviderTimeout,
    ReplyInterrupted,
    RateLimited,
    UnparsableBody,
)
_STREAM_DESCRIPTION = (
    "With `stream: true`: a text/event-stream of `user_message`, `delta`, `assistant_message` and `error` "
    "events with heartbeat comments (see docs/streaming.md)."
)
# One event of the stream, whose `data` is JSON text. Schemathesis checks each streamed event against it.
_STREAM_EVENT_SCHEMA = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["user_message", "delta", "assistant_message", "error"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
    },
}
_STREAM_EXAMPLE = (
    'event: user_message\ndata: {"id": "...", "role": "user", "content": "Hi", ...}\n\n'
    'event: delta\ndata: {"content": "Hello"}\n\n'
    'event: delta\ndata: {"content": "!"}\n\n'
    'event: assistant_message\ndata: {"id": "...", "role": "assistant", "content": "Hello!", ...}\n\n'
)


def get_replies(request: Request) -> ReplyGenerator:
    replies: ReplyGenerator = request.app.state.replies
    return replies


@router.get("", response_model=list[ChatSummary], responses=error_responses(NotAuthenticated))
async def list_chats(
    user: CurrentUser,
    database: Db,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> list[ChatSummary]:
    """List the caller's chats, most recently updated first."""
    async with database.driver_connection() as connection:
        return await service.list_chats(connection, user.user_id, limit=limit, offset=offset)


@router.post(
    "",
    response_model=ChatSummary,
    status_code=status.HTTP_200_OK,
    responses=error_responses(NotAuthenticated, ModelConfigNotFound, UnparsableBody),
)
async def create_chat(user: CurrentUser, session: DbSession, payload: ChatCreate | None = None) -> ChatSummary:
    """Create a chat; it may exist before the user has any model, which is resolved when a message is sent."""
    payload = payload or ChatCreate()
    model_config_id = None
    if payload.model_config_id:
        model_config_id = await service.check_model_config(session, user.user_id, payload.model_config_id)

    chat = await service.create_chat(
        session,
        user.user_id,
        title=payload.title,
        model_config_id=model_config_id,
        initial_message=payload.initial_message,
    )
    log.info("chat.created", user_id=str(user.user_id), chat_id=str(chat.id))
    return ChatSummary.from_row(chat, chat.last_sequence)


@router.get(
    "/{chat_id}", response_model=ChatWithMessages, responses=error_responses(NotAuthenticated, service.ChatNotFound)
)
async def get_chat(chat_id: str, user: CurrentUser, database: Db) -> ChatWithMessages:
    """Return the chat and all its messages in order."""
    parsed_chat_id = service.parse_id(chat_id, service.ChatNotFound)
    async with database.read_connection() as connection:
        chat = await service.read_chat(connection, user.user_id, parsed_chat_id)
        messages = await service.list_messages(connection, chat.id, up_to=chat.last_sequence)
        if len(messages) < chat.last_sequence:
            # Messages are numbered without gaps and never deleted one by one, so some are missing only
            # when the chat was deleted between the two reads. Reading it again raises ChatNotFound then.
            await service.read_chat(connection, user.user_id, parsed_chat_id)
    return ChatWithMessages(
        chat=ChatSummary.from_row(chat, chat.last_sequence), messages=[Message.from_row(m) for m in messages]
    )


@router.put(
    "/{chat_id}",
    response_model=ChatSummary,
    responses=error_responses(NotAuthenticated, service.ChatNotFound, ModelConfigNotFound, UnparsableBody),
)
async def update_chat(chat_id: str, payload: ChatUpdate, user: CurrentUser, session: DbSession) -> ChatSummary:
    """Rename the chat or change its model configuration (`null` falls back to the default model)."""
    chat = await service.get_chat(session, user.user_id, service.parse_id(chat_id, service.ChatNotFound), lock=True)
    changed = payload.model_fields_set

    if "title" in changed and payload.title:
        chat.title = payload.title
    if "model_config_id" in changed:
        chat.model_config_id = (
            await service.check_model_config(session, user.user_id, payload.model_config_id)
            if payload.model_config_id
            else None
        )
    await session.flush()
    return ChatSummary.from_row(chat, chat.last_sequence)


@router.delete(
    "/{chat_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(NotAuthenticated, service.ChatNotFound),
)
async def delete_chat(chat_id: str, user: CurrentUser, session: DbSession) -> Response:
    """Delete the chat and its messages."""
    chat = await service.get_chat(session, user.user_id, service.parse_id(chat_id, service.ChatNotFound))
    await session.delete(chat)
    await session.flush()
    log.info("chat.deleted", user_id=str(user.user_id), chat_id=str(chat.id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{chat_id}/messages",
    response_model=list[Message],
    responses=error_responses(NotAuthenticated, service.ChatNotFound),
)
async def list_messages(
    chat_id: str,
    user: CurrentUser,
    database: Db,
    limit: Annotated[int | None, Query(ge=1, le=1000)] = None,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> list[Message]:
    """List the chat's messages in order."""
    parsed_chat_id = service.parse_id(chat_id, service.ChatNotFound)
    async with database.read_connection() as connection:
        chat = await service.read_chat(connection, user.user_id, parsed_chat_id)
        messages = await service.list_messages(connection, chat.id, limit=limit, offset=offset)
    return [Message.from_row(m) for m in messages]


@router.post(
    "/{chat_id}/messages",
    response_model=Message,
    responses={
        **error_responses(*_REPLY_ERRORS),
        200: {
            "description": f"The stored reply (or message). {_STREAM_DESCRIPTION}",
            "content": {"text/event-stream": {"schema": _STREAM_EVENT_SCHEMA, "example": _STREAM_EXAMPLE}},
        },
    },
)
async def post_message(
    chat_id: str, payload: MessageCreate, user: CurrentUser, request: Request, limiter: Limiter
) -> Any:
    """Add a message; a `user` message gets a reply from the chat's model, which is stored and returned."""
    await limiter.hit("chat-messages", str(user.user_id), request.app.state.settings.rate_limit_chat_messages)
    replies = get_replies(request)
    parsed_chat_id = service.parse_id(chat_id, service.ChatNotFound)
    if payload.role != "user":
        return await replies.store_only(user.user_id, parsed_chat_id, payload)

    prepared, user_message = await replies.prepare(user.user_id, parsed_chat_id, payload)
    if payload.stream:
        return _streaming_response(request, prepared, user_message)

    # shield(): a client that disconnects cancels this wait, not the reply, which is still stored.
    task = replies.start(prepared)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if task.cancelled() and not (current and current.cancelling()):
            # The reply itself was stopped (server shutdown), not this request.
            # NOTE: uvicorn cancels open requests when its grace time ends, before the lifespan stops
            # replies, so under `pocketllm serve` the client gets uvicorn's 500 instead (docs/streaming.md).
            raise ReplyInterrupted() from None
        raise


def _streaming_response(request: Request, prepared: PreparedReply, user_message: Message) -> EventStreamResponse:
    replies = get_replies(request)
    heartbeat_seconds: float = request.app.state.settings.stream_heartbeat_seconds
    # Encoded now, so that the open stream keeps these bytes instead of the message object.
    first_event = _sse("user_message", user_message.model_dump(mode="json"))
    stream = replies.start_stream(prepared)

    async def events() -> AsyncIterator[bytes]:
        yield first_event
        async for batch in stream_items(stream, heartbeat_seconds):
            if not batch:
                yield b": heartbeat\n\n"
                continue
            # Items that arrived together (a burst from the provider, or a busy server) go out in one
            # chunk, which saves a send through the middleware stack and a socket write per item.
            encoded: list[bytes] = []
            for item in batch:
                if item.delta is not None:
                    encoded.append(_sse("delta", {"content": item.delta}))
                elif item.message is not None:
                    encoded.append(_sse("assistant_message", item.message.model_dump(mode="json")))
                elif item.error is not None:
                    encoded.append(_sse("error", _error_payload(item.error)))
            yield b"".join(encoded)

    return EventStreamResponse(
        events(),
        media_type="text/event-stream",
        # no-transform and X-Accel-Buffering keep proxies from buffering the stream.
        headers={"Cache-Control": "no-store, no-transform", "X-Accel-Buffering": "no"},
    )


def _error_payload(error: PocketLLMError) -> dict[str, Any]:
    payload: dict[str, Any] = {"detail": error.message, "code": error.code, "status": error.status_code}
    retry_after = (error.headers or {}).get("Retry-After", "")
    if retry_after.isdigit():
        payload["retry_after"] = int(retry_after)
    return payload


def _sse(event: str, data: dict[str, Any]) -> bytes:
    try:
        encoded = pydantic_core.to_json(data)
    except pydantic_core.PydanticSerializationError:
        # Provider text can contain unpaired surrogates, which UTF-8 cannot encode, so json.dumps escapes them.
        encoded = json.dumps(data, separators=(",", ":")).encode()
    return b"event: " + event.encode() + b"\ndata: " + encoded + b"\n\n"
