"""The relay of a streamed reply: from the reply task through ReplyStream to the encoded events."""

from __future__ import annotations

import asyncio
import json

import pytest

from pocketllm.chats.replies import ReplyStream, StreamItem, stream_items
from pocketllm.chats.router import _sse
from pocketllm.errors import PocketLLMError
from pocketllm.kit.sse import SseDecoder
from pocketllm.providers.chat import parse_json
from pocketllm.providers.errors import ProviderRequestFailed


async def collect(stream: ReplyStream, heartbeat_seconds: float = 5.0) -> list[list[StreamItem]]:
    return [batch async for batch in stream_items(stream, heartbeat_seconds)]


class TestReplyStream:
    async def test_take_joins_waiting_deltas(self) -> None:
        stream = ReplyStream()
        stream.put(StreamItem(delta="a"))
        stream.put(StreamItem(delta="b"))

        assert await stream.take(5.0) == [StreamItem(delta="ab")]

    async def test_take_returns_deltas_before_end(self) -> None:
        stream = ReplyStream()
        error = StreamItem(error=ProviderRequestFailed())
        stream.put(StreamItem(delta="a"))
        stream.put(StreamItem(delta="b"))
        stream.put(error)
        stream.put(None)

        assert await stream.take(5.0) == [StreamItem(delta="ab"), error, None]

    async def test_take_returns_each_item_once(self) -> None:
        stream = ReplyStream()
        stream.put(StreamItem(delta="a"))
        await stream.take(5.0)

        assert await stream.take(0.01) == []

    async def test_take_times_out_empty(self) -> None:
        assert await ReplyStream().take(0.01) == []

    async def test_take_wakes_on_put(self) -> None:
        stream = ReplyStream()
        waiting = asyncio.create_task(stream.take(5.0))
        await asyncio.sleep(0)
        item = StreamItem(delta="late")
        stream.put(item)

        assert await asyncio.wait_for(waiting, 1.0) == [item]

    async def test_take_cancelled_then_reused(self) -> None:
        stream = ReplyStream()
        waiting = asyncio.create_task(stream.take(5.0))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        item = StreamItem(delta="after")
        stream.put(item)

        assert await stream.take(5.0) == [item]


class TestStreamItems:
    async def test_burst_comes_as_one_delta(self) -> None:
        stream = ReplyStream()
        for index in range(5):
            stream.put(StreamItem(delta=str(index)))
        stream.put(None)

        assert await collect(stream) == [[StreamItem(delta="01234")]]

    async def test_end_marker_alone_ends(self) -> None:
        stream = ReplyStream()
        stream.put(None)

        assert await collect(stream) == []

    async def test_heartbeat_while_quiet(self) -> None:
        stream = ReplyStream()
        batches = stream_items(stream, 0.01)

        assert await anext(batches) == []
        item = StreamItem(delta="x")
        stream.put(item)
        stream.put(None)
        assert await anext(batches) == [item]
        with pytest.raises(StopAsyncIteration):
            await anext(batches)

    async def test_items_put_while_reading_arrive(self) -> None:
        stream = ReplyStream()
        reader = asyncio.create_task(collect(stream))
        first, second = StreamItem(delta="a"), StreamItem(delta="b")
        stream.put(first)
        await asyncio.sleep(0)
        stream.put(second)
        stream.put(None)

        batches = await asyncio.wait_for(reader, 1.0)
        assert [item for batch in batches for item in batch] == [first, second]


class TestSseEncoding:
    def test_event_lines(self) -> None:
        assert _sse("delta", {"content": "Hi"}) == b'event: delta\ndata: {"content":"Hi"}\n\n'

    @pytest.mark.parametrize("text", ["caf\u00e9 \u2028 \U0001f600", 'quote " and \\ and \n newline'])
    def test_data_decodes_to_payload(self, text: str) -> None:
        encoded = _sse("delta", {"content": text})
        event = SseDecoder().feed_bytes(encoded)

        assert len(event) == 1
        assert json.loads(event[0].data) == {"content": text}

    def test_unpaired_surrogate_escaped(self) -> None:
        # Providers can send an escape of half a surrogate pair, which UTF-8 cannot encode.
        text = "a\ud83d"
        encoded = _sse("delta", {"content": text})

        assert encoded == b'event: delta\ndata: {"content":"a\\ud83d"}\n\n'
        assert json.loads(encoded.split(b"data: ")[1]) == {"content": text}


class TestFeedBytes:
    def test_split_character(self) -> None:
        encoded = "data: \u00e9\U0001f600\n\n".encode()
        decoder = SseDecoder()
        events = [event for index in range(len(encoded)) for event in decoder.feed_bytes(encoded[index : index + 1])]

        assert [event.data for event in events] == ["\u00e9\U0001f600"]

    def test_invalid_bytes_replaced(self) -> None:
        events = SseDecoder().feed_bytes(b"data: \xff\n\n")

        assert [event.data for event in events] == ["\ufffd"]

    def test_unfinished_character_at_end(self) -> None:
        decoder = SseDecoder()
        decoder.feed_bytes(b"data: a\xe2\x82")

        unterminated = decoder.end()
        assert unterminated is not None
        assert unterminated.data == "a\ufffd"
        assert not decoder.ended_cleanly

    def test_byte_order_mark_dropped(self) -> None:
        events = SseDecoder().feed_bytes(b"\xef\xbb\xbfdata: a\n\n")

        assert [event.data for event in events] == ["a"]


class TestParseJson:
    def test_object(self) -> None:
        raw = '{"choices":[{"delta":{"content":"Hi"}}],"n":12345678901234567890}'

        assert parse_json(raw, provider="openai", description="a stream event") == json.loads(raw)

    def test_unpaired_surrogate_escape_accepted(self) -> None:
        parsed = parse_json('{"content":"\\ud83d"}', provider="openai", description="a stream event")

        assert parsed == {"content": "\ud83d"}

    @pytest.mark.parametrize("raw", ["", "{", '{"a":1} x', b"\xff"])
    def test_invalid_raises(self, raw: str | bytes) -> None:
        with pytest.raises(ProviderRequestFailed) as caught:
            parse_json(raw, provider="openai", description="a stream event")

        assert isinstance(caught.value, PocketLLMError)
        assert "a stream event that is not valid JSON" in caught.value.message
