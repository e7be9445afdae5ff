"""Reply generation: store the user's message, call the provider with no database connection held, store
the reply.

Each reply runs in its own task that the request only waits for. A client that disconnects (or a
streaming client that goes away) cancels the wait, not the task, so a reply that has started is always
finished and stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy.exc
import structlog

from pocketllm.chats import service
from pocketllm.chats.prompt import DEFAULT_CONTEXT_WINDOW, fit_history, output_limit
from pocketllm.chats.schemas import Message, MessageCreate
from pocketllm.db.engine import Database
from pocketllm.errors import DATABASE_LOCKED_MESSAGE, DatabaseBusy, PocketLLMError, is_database_locked
from pocketllm.kit.crypto import SecretBox
from pocketllm.kit.text import ends_with_high_surrogate, storable_text
from pocketllm.providers import service as providers_service
from pocketllm.providers.catalogue import ProviderTarget
from pocketllm.providers.chat import (
    ChatParameters,
    ChatRequest,
    ChatResult,
    ContentDelta,
    StreamEnd,
    TokenUsage,
    complete_chat,
    stream_chat,
)
from pocketllm.providers.errors import ProviderRequestFailed
from pocketllm.providers.guard import ProviderUnreachable
from pocketllm.providers.http import ProviderHttp, ProviderResponseTooLarge
from pocketllm.providers.registry import PROVIDERS

log = structlog.get_logger(__name__)


class ReplyFailed(PocketLLMError):
    status_code = 500
    code = "internal_error"
    default_message = "The reply could not be generated because of a server error; the request id is logged."


class ReplyInterrupted(PocketLLMError):
    status_code = 503
    code = "reply_interrupted"
    default_message = "The server stopped before the reply was finished; send the message again."


# Extra wait at shutdown for replies still running once the server stopped taking requests.
SHUTDOWN_REPLY_WAIT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class ReplyRecord:
    """The ids, provider and model that storing a reply or its failure needs, without the prompt."""

    user_id: uuid.UUID
    chat_id: uuid.UUID
    user_message_id: uuid.UUID
    model_config_id: uuid.UUID
    provider: str
    model: str


@dataclass(frozen=True, slots=True)
class PreparedReply:
    """Everything a reply needs, loaded in one short transaction. Holds the decrypted key: never log it."""

    record: ReplyRecord
    target: ProviderTarget
    request: ChatRequest


@dataclass(slots=True)
class StreamItem:
    """One thing for the outgoing event stream: a text delta, the stored reply, or an error."""

    delta: str | None = None
    message: Message | None = None
    error: PocketLLMError | None = None


class ReplyStream:
    """The items of one streamed reply, from the reply task to the response. None marks the end.

    A list and a future that exists only while the reader waits cost less memory than an asyncio.Queue
    (four deques), which matters with thousands of open streams. One task puts, and one task reads.

    Deltas that wait for the reader are joined into one, because their text goes into one buffer instead
    of an item per piece. A client that reads slowly, or not at all, then costs about the reply's text
    and not a few hundred bytes per piece. The reply task puts deltas only before the stored message or
    error.
    """

    __slots__ = ("_items", "_text", "_waiter")

    def __init__(self) -> None:
        self._items: list[StreamItem | None] = []
        self._text: io.StringIO | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: StreamItem | None) -> None:
        if item is not None and item.delta is not None:
            if self._text is None:
                self._text = io.StringIO()
            self._text.write(item.delta)
        else:
            self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self, timeout: float) -> list[StreamItem | None]:
        """Return what was put since the last call, waiting at most `timeout` seconds for the first item.

        The deltas come first, joined into one item, then the other items in order. Returns an empty list
        when the time runs out.
        """
        if not self._items and self._text is None:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            # A timer that wakes the waiter costs less than asyncio.timeout(), which cancels the task.
            timer = loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        items: list[StreamItem | None] = []
        if self._text is not None:
            items.append(StreamItem(delta=self._text.getvalue()))
            self._text = None
        items.extend(self._items)
        self._items = []
        return items


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class ReplyGenerator:
    def __init__(self, database: Database, http: ProviderHttp, secrets: SecretBox, *, max_characters: int) -> None:
        self._database = database
        self._http = http
        self._max_characters = max_characters
        self._secrets = secrets
        self._tasks: set[asyncio.Task[Any]] = set()

    async def store_only(self, user_id: uuid.UUID, chat_id: uuid.UUID, payload: MessageCreate) -> Message:
        """Store an assistant or system message as it is, without calling a provider."""
        async with self._database.transaction() as session:
            return await service.append_message(
                session, user_id, chat_id, role=payload.role, content=payload.content, metadata=payload.metadata
            )

    async def prepare(
        self, user_id: uuid.UUID, chat_id: uuid.UUID, payload: MessageCreate
    ) -> tuple[PreparedReply, Message]:
        """Check that the chat has a usable model, then store the user's message and build the prompt.

        Returns the prepared reply and the stored user message. The message is not part of PreparedReply,
        which the reply task keeps until the reply is stored, so that an open stream does not hold it.
        """
        # Each statement is atomic on its own: nothing is stored unless the model is usable, and the message
        # is numbered and inserted in one statement (on PostgreSQL the same statement does all of it).
        # On SQLite the statements and the block's commit are one trip to the connection's thread.
        async with self._database.statements() as connection:
            start = await service.start_reply(
                connection, user_id, chat_id, content=payload.content, metadata=payload.metadata, commit=True
            )
        model_config, user_message, history = start.model, start.message, start.history
        record = ReplyRecord(
            user_id=user_id,
            chat_id=chat_id,
            user_message_id=user_message.id,
            model_config_id=model_config.id,
            provider=model_config.provider,
            model=model_config.model,
        )
        try:
            target = providers_service.build_target(PROVIDERS[model_config.provider], model_config, self._secrets)
        except PocketLLMError as error:
            # An API key that this server cannot decrypt: the message is stored, so it is marked as failed,
            # as when the provider rejects a key.
            raise await self._fail(record, error) from error

        settings = model_config.settings
        context_window = model_config.context_window or DEFAULT_CONTEXT_WINDOW
        max_tokens = output_limit(settings.get("max_tokens"), model_config.max_output_tokens, context_window)
        system_prompt = settings.get("system_prompt") or None
        messages = fit_history(
            history,
            system_prompt=system_prompt,
            new_message=payload.content,
            context_window=context_window,
            max_tokens=max_tokens,
        )
        request = ChatRequest(
            model=model_config.model,
            system_prompt=system_prompt,
            messages=messages,
            parameters=ChatParameters(
                max_tokens=max_tokens,
                temperature=settings.get("temperature"),
                top_p=settings.get("top_p"),
                frequency_penalty=settings.get("frequency_penalty"),
                presence_penalty=settings.get("presence_penalty"),
            ),
        )
        prepared = PreparedReply(record=record, target=target, request=request)
        return prepared, user_message

    def start(self, prepared: PreparedReply) -> asyncio.Task[Message]:
        """Generate and store the reply in a task that outlives the request."""
        return self._track(asyncio.create_task(self._generate(prepared)))

    def start_stream(self, prepared: PreparedReply) -> ReplyStream:
        """Stream the reply into a ReplyStream from a task that outlives the request."""
        stream = ReplyStream()
        # The task gets the provider stream and the record, not the prompt, which can be large. The
        # stream's generator lets go of the prompt once it has encoded the request body.
        items = stream_chat(self._http, prepared.target, prepared.request)
        self._track(asyncio.create_task(self._generate_streaming(prepared.record, items, stream)))
        return stream

    async def drain(self, timeout: float | None = None) -> None:
        """Wait for every reply in progress, at most `timeout` seconds."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def shutdown(self, timeout: float) -> None:
        """Wait for replies in progress, then stop the rest; each stopped reply records `reply_interrupted`."""
        await self.drain(timeout)
        remaining = set(self._tasks)
        for task in remaining:
            task.cancel()
        if remaining:
            await asyncio.wait(remaining, timeout=SHUTDOWN_REPLY_WAIT_SECONDS)

    def _track(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        # Reading the exception marks it as retrieved when the client went away before awaiting it; the
        # failure itself was already logged and recorded by the task.
        if not task.cancelled():
            task.exception()

    async def _generate(self, prepared: PreparedReply) -> Message:
        started = time.perf_counter()
        record = prepared.record
        try:
            result = await complete_chat(self._http, prepared.target, prepared.request)
            error_code = None
            if len(result.content) > self._max_characters:
                # No finish reason, as for a cut stream, because the stored reply did not end where the provider's did.
                cut = result.content[: self._max_characters]
                result = dataclasses.replace(result, content=cut, incomplete=True, finish_reason=None)
                error_code = self._reply_too_long(record).code
            return await self._store_reply(record, result, latency_ms=_elapsed_ms(started), error_code=error_code)
        except asyncio.CancelledError:
            await self._fail(record, ReplyInterrupted())
            raise
        except Exception as error:
            raise await self._fail(record, error) from error

    async def _generate_streaming(
        self, record: ReplyRecord, provider_stream: AsyncGenerator[ContentDelta | StreamEnd, None], stream: ReplyStream
    ) -> None:
        started = time.perf_counter()
        # One buffer rather than a list of pieces, because a provider may send a great many tiny ones.
        text = io.StringIO()
        length = 0
        # The first half of a surrogate pair that ended the last delta, kept until the next delta or the end.
        pending_half = ""
        try:
            end: StreamEnd | None = None
            # aclosing(): the provider connection is closed even when this loop stops early.
            async with contextlib.aclosing(provider_stream) as items:
                async for item in items:
                    if isinstance(item, ContentDelta):
                        received, pending_half = pending_half + item.text, ""
                        if ends_with_high_surrogate(received):
                            received, pending_half = received[:-1], received[-1]
                    else:
                        end = item
                        received, pending_half = pending_half, ""
                    # Cleaned as the stored reply will be, so that the deltas add up to the stored content.
                    piece = storable_text(received)
                    room = self._max_characters - length
                    too_long = len(piece) > room
                    if too_long:
                        piece = piece[:room]
                        end = StreamEnd(
                            finish_reason=None,
                            usage=None,
                            model=None,
                            incomplete=True,
                            error=self._reply_too_long(record),
                        )
                    if piece:
                        text.write(piece)
                        length += len(piece)
                        stream.put(StreamItem(delta=piece))
                    if too_long:
                        break
            if end is None:
                # The client yields exactly one StreamEnd; without it the reply cannot be trusted as whole.
                end = StreamEnd(finish_reason=None, usage=None, model=None, incomplete=True)
            result = ChatResult(
                content=text.getvalue(),
                finish_reason=end.finish_reason,
                usage=end.usage,
                model=end.model,
                incomplete=end.incomplete,
            )
            message = await self._store_reply(
                record,
                result,
                latency_ms=_elapsed_ms(started),
                error_code=end.error.code if end.error else None,
            )
            stream.put(StreamItem(message=message))
        except asyncio.CancelledError:
            stream.put(StreamItem(error=await self._fail(record, ReplyInterrupted())))
            raise
        except Exception as error:
            stream.put(StreamItem(error=await self._fail(record, error)))
        finally:
            stream.put(None)

    def _reply_too_long(self, record: ReplyRecord) -> ProviderResponseTooLarge:
        log.info("chat.reply.too_long", chat_id=str(record.chat_id), provider=record.provider)
        return ProviderResponseTooLarge(
            f"{record.provider} sent a reply longer than {self._max_characters:,} characters; "
            "it was cut there and stored as incomplete."
        )

    async def _store_reply(
        self, record: ReplyRecord, result: ChatResult, *, latency_ms: int, error_code: str | None = None
    ) -> Message:
        metadata: dict[str, Any] = {
            "provider": record.provider,
            "model": storable_text(result.model or record.model),
            "model_config_id": str(record.model_config_id),
            "finish_reason": storable_text(result.finish_reason) if result.finish_reason else None,
            "usage": _usage_dict(result.usage),
            "latency_ms": latency_ms,
            "reply_to": str(record.user_message_id),
        }
        if result.incomplete:
            metadata["incomplete"] = True
        if error_code:
            metadata["error"] = error_code

        async with self._database.statements() as connection:
            stored = await service.append_message(
                connection,
                record.user_id,
                record.chat_id,
                role="assistant",
                content=storable_text(result.content),
                status="incomplete" if result.incomplete else "complete",
                metadata=metadata,
                commit=True,
            )
        log.info(
            "chat.reply.stored",
            chat_id=str(record.chat_id),
            message_id=str(stored.id),
            provider=record.provider,
            latency_ms=latency_ms,
            incomplete=result.incomplete,
        )
        return stored

    async def _fail(self, record: ReplyRecord, error: Exception) -> PocketLLMError:
        """Record a failed reply on the user's message and return the error to report."""
        if isinstance(error, ProviderUnreachable):
            # At this point the URL was saved and checked before: not resolving now is an outage.
            failure: PocketLLMError = ProviderRequestFailed(error.message)
        elif isinstance(error, PocketLLMError):
            failure = error
        elif isinstance(error, sqlalchemy.exc.TimeoutError):
            # No pooled connection became free in time to store the reply: the server is overloaded.
            log.warning("database.pool_timeout", chat_id=str(record.chat_id))
            failure = DatabaseBusy()
        elif is_database_locked(error):
            log.warning("database.locked", chat_id=str(record.chat_id))
            failure = DatabaseBusy(DATABASE_LOCKED_MESSAGE)
        else:
            log.exception("chat.reply.crashed", chat_id=str(record.chat_id), exc_info=error)
            failure = ReplyFailed()

        log.info("chat.reply.failed", chat_id=str(record.chat_id), provider=record.provider, code=failure.code)
        try:
            async with self._database.transaction() as session:
                await service.record_reply_failure(
                    session,
                    record.user_id,
                    record.user_message_id,
                    code=failure.code,
                    detail=storable_text(failure.message),
                )
        except Exception:
            log.exception("chat.reply.failure_not_recorded", chat_id=str(record.chat_id))
        return failure


def _elapsed_ms(started: float) -> int:
    return round((time.perf_counter() - started) * 1000)


def _usage_dict(usage: TokenUsage | None) -> dict[str, int | None] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


async def stream_items(stream: ReplyStream, heartbeat_seconds: float) -> AsyncIterator[list[StreamItem]]:
    """Yield the items that arrived since the last yield as one list, so that a burst is sent in one write.

    An empty list is a heartbeat: nothing came for `heartbeat_seconds`. Ends after the end marker.
    """
    while True:
        items = await stream.take(heartbeat_seconds)
        batch = [item for item in items if item is not None]
        if len(batch) < len(items):
            if batch:
                yield batch
            return
        yield batch
