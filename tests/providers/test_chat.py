"""Chat replies over the network: request bodies per provider, JSON and streamed replies, and error mapping.

Most tests run against the fake provider. Streams whose exact bytes matter (comments, odd chunks, missing
`[DONE]`, other line endings) come from `ScriptedServer`, a small HTTP server in this file that sends the
bytes a test gives it.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from pocketllm.errors import InvalidInput, PocketLLMError
from pocketllm.providers.catalogue import ProviderTarget
from pocketllm.providers.chat import (
    ChatMessage,
    ChatParameters,
    ChatRequest,
    ChatResult,
    ContentDelta,
    StreamEnd,
    TokenUsage,
    complete_chat,
    stream_chat,
)
from pocketllm.providers.errors import (
    ContextLengthExceeded,
    ProviderAuthFailed,
    ProviderRateLimited,
    ProviderRequestFailed,
    ProviderTimeout,
)
from pocketllm.providers.guard import OutboundGuard
from pocketllm.providers.http import ProviderHttp
from pocketllm.providers.network import ProviderClient, ProviderTransport
from pocketllm.providers.registry import PROVIDERS
from tests.fakes.provider import (
    DEFAULT_REPLY_TEXT,
    VALID_ANTHROPIC_API_KEY,
    VALID_API_KEY,
    FakeProvider,
    count_tokens,
)

GPT = "gpt-4o-mini"
CLAUDE = "claude-3-5-haiku-20241022"
SHORT_TIMEOUT_SECONDS = 0.3
# Long enough that only the client's timeout can end the wait. The fake's reset() releases the pause.
PROVIDER_DELAY_SECONDS = 30.0


# -- scripted server -----------------------------------------------------------------------------------------


@dataclass
class ScriptedReply:
    """What the scripted server sends: the body in chunks, each written and flushed on its own.

    With `complete=False` the chunked body is never terminated, so the client sees a broken connection.
    """

    chunks: list[bytes]
    status: int = 200
    content_type: str = "text/event-stream"
    complete: bool = True
    # True waits for ScriptedServer.release after the chunks, before the body ends (at most 30 s).
    hold_before_end: bool = False


@dataclass
class ScriptedServer:
    reply: ScriptedReply = field(default_factory=lambda: ScriptedReply([]))
    received: list[tuple[str, Any]] = field(default_factory=list)
    port: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    # Set while a reply with `hold_before_end` waits for `release`.
    holding: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class _ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    scripted: ScriptedServer

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        raw = self.rfile.read(length)
        self.scripted.received.append((self.path, json.loads(raw) if raw else None))
        reply = self.scripted.reply

        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        for chunk in reply.chunks:
            if chunk:  # an empty chunk would end a chunked body
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
        if reply.hold_before_end:
            self.scripted.holding.set()
            self.scripted.release.wait(timeout=30)
            self.scripted.holding.clear()
        if reply.complete:
            self.wfile.write(b"0\r\n\r\n")
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def scripted_server() -> Iterator[ScriptedServer]:
    scripted = ScriptedServer()
    handler = type("Handler", (_ScriptedHandler,), {"scripted": scripted})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    scripted.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, name="scripted-provider", daemon=True)
    thread.start()
    yield scripted
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def scripted(scripted_server: ScriptedServer) -> Iterator[ScriptedServer]:
    scripted_server.reply = ScriptedReply([])
    scripted_server.received.clear()
    scripted_server.release.clear()
    yield scripted_server
    scripted_server.release.set()


def sse(*payloads: Any, line_break: str = "\n") -> list[bytes]:
    """Frame each payload as one `data:` event. Strings are sent as they are, and other values as JSON."""
    frames = []
    for payload in payloads:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        frames.append(f"data: {data}{line_break}{line_break}".encode())
    return frames


def openai_chunk(content: str | None = None, finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "scripted-model",
        "choices": [choice],
        **extra,
    }


def anthropic_event(event_type: str, payload: dict[str, Any]) -> bytes:
    return f"event: {event_type}\ndata: {json.dumps({'type': event_type, **payload})}\n\n".encode()


def anthropic_text(text: str) -> bytes:
    return anthropic_event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})


def anthropic_start(model: str = "scripted-claude", input_tokens: int = 11) -> bytes:
    message: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": []}
    message["usage"] = {"input_tokens": input_tokens, "output_tokens": 1}
    return anthropic_event("message_start", {"message": message})


def anthropic_finish(stop_reason: str = "end_turn", output_tokens: int = 3) -> bytes:
    delta = {"stop_reason": stop_reason, "stop_sequence": None}
    return anthropic_event("message_delta", {"delta": delta, "usage": {"output_tokens": output_tokens}})


# -- helpers -------------------------------------------------------------------------------------------------


@asynccontextmanager
async def provider_http(timeout: float = 10.0) -> AsyncIterator[ProviderHttp]:
    # The server's transport, which the wait for the end of a stream's body needs (see read_to_end).
    transport = ProviderTransport(ssl_context=ssl.create_default_context(), limits=httpx.Limits())
    async with ProviderClient(transport=transport, timeout=timeout, follow_redirects=False, trust_env=False) as client:
        yield ProviderHttp(client, OutboundGuard(allow_private=True))


@pytest.fixture
async def http() -> AsyncIterator[ProviderHttp]:
    async with provider_http() as provider:
        yield provider


def openai_target(fake: FakeProvider, provider: str = "openai", api_key: str | None = VALID_API_KEY) -> ProviderTarget:
    return ProviderTarget(spec=PROVIDERS[provider], base_url=fake.openai_base_url, api_key=api_key)


def anthropic_target(fake: FakeProvider, api_key: str | None = VALID_ANTHROPIC_API_KEY) -> ProviderTarget:
    return ProviderTarget(spec=PROVIDERS["anthropic"], base_url=fake.anthropic_base_url, api_key=api_key)


def target_for(fake: FakeProvider, protocol: str, api_key: str | None = None) -> ProviderTarget:
    if protocol == "anthropic":
        return anthropic_target(fake, api_key or VALID_ANTHROPIC_API_KEY)
    return openai_target(fake, api_key=api_key or VALID_API_KEY)


def chat_request(
    model: str = GPT,
    messages: list[ChatMessage] | None = None,
    system_prompt: str | None = "Be brief.",
    **parameters: Any,
) -> ChatRequest:
    parameters.setdefault("max_tokens", 256)
    return ChatRequest(
        model=model,
        system_prompt=system_prompt,
        messages=messages if messages is not None else [ChatMessage("user", "Say hello")],
        parameters=ChatParameters(**parameters),
    )


def request_for(protocol: str, **kwargs: Any) -> ChatRequest:
    return chat_request(model=CLAUDE if protocol == "anthropic" else GPT, **kwargs)


def path_for(protocol: str) -> str:
    return "/v1/messages" if protocol == "anthropic" else "/chat/completions"


async def collect(stream: AsyncIterator[ContentDelta | StreamEnd]) -> tuple[list[str], StreamEnd]:
    """Return the delta texts and the final StreamEnd, checking that StreamEnd comes once and last."""
    items = [item async for item in stream]
    assert items, "the stream yielded nothing"
    end = items[-1]
    assert isinstance(end, StreamEnd), f"last item is {end!r}"
    deltas = items[:-1]
    assert all(isinstance(item, ContentDelta) for item in deltas), f"StreamEnd before the end: {items!r}"
    texts = [item.text for item in deltas if isinstance(item, ContentDelta)]
    assert all(texts), f"empty ContentDelta in {texts!r}"
    return texts, end


async def send(http: ProviderHttp, target: ProviderTarget, request: ChatRequest, *, streaming: bool) -> None:
    """Request a reply with `stream_chat` or with `complete_chat`, and read all of it."""
    if streaming:
        await collect(stream_chat(http, target, request))
    else:
        await complete_chat(http, target, request)


PROTOCOLS = pytest.mark.parametrize("protocol", ["openai", "anthropic"])


# -- OpenAI-compatible: request bodies -----------------------------------------------------------------------


async def test_openai_body_all_parameters(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    request = chat_request(
        messages=[ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello"), ChatMessage("user", "Say hello")],
        temperature=0.7,
        top_p=0.9,
        frequency_penalty=0.5,
        presence_penalty=-0.5,
    )

    await complete_chat(http, openai_target(fake_provider), request)

    sent = fake_provider.last_request("/chat/completions")
    assert sent.headers["authorization"] == f"Bearer {VALID_API_KEY}"
    assert sent.body["model"] == GPT
    assert sent.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Say hello"},
    ]
    assert sent.body["max_completion_tokens"] == 256
    assert "max_tokens" not in sent.body
    assert sent.body["temperature"] == 0.7
    assert sent.body["top_p"] == 0.9
    assert sent.body["frequency_penalty"] == 0.5
    assert sent.body["presence_penalty"] == -0.5
    assert "stream" not in sent.body
    assert "stream_options" not in sent.body


@pytest.mark.parametrize("provider", ["groq", "custom", "googleai"])
async def test_openai_body_without_penalties(fake_provider: FakeProvider, http: ProviderHttp, provider: str) -> None:
    request = chat_request(temperature=0.2, top_p=0.5, frequency_penalty=0.5, presence_penalty=0.5)

    await complete_chat(http, openai_target(fake_provider, provider), request)

    body = fake_provider.last_request("/chat/completions").body
    assert body["max_tokens"] == 256
    assert "max_completion_tokens" not in body
    assert body["temperature"] == 0.2
    assert body["top_p"] == 0.5
    assert "frequency_penalty" not in body
    assert "presence_penalty" not in body


async def test_openai_body_leaves_out_unset_parameters(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    await complete_chat(http, openai_target(fake_provider, "mistral"), chat_request(system_prompt=None))

    body = fake_provider.last_request("/chat/completions").body
    assert set(body) == {"model", "messages", "max_tokens"}
    assert body["messages"] == [{"role": "user", "content": "Say hello"}]


async def test_openai_blank_system_prompt_not_sent(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    await complete_chat(http, openai_target(fake_provider), chat_request(system_prompt="  \n"))

    messages = fake_provider.last_request("/chat/completions").body["messages"]
    assert [message["role"] for message in messages] == ["user"]


async def test_openai_stream_body_with_usage_option(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    await collect(stream_chat(http, openai_target(fake_provider, "openrouter"), chat_request()))

    body = fake_provider.last_request("/chat/completions").body
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_openai_stream_body_without_usage_option(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    _, end = await collect(stream_chat(http, openai_target(fake_provider, "groq"), chat_request()))

    body = fake_provider.last_request("/chat/completions").body
    assert body["stream"] is True
    assert "stream_options" not in body
    assert end.usage is None


# -- OpenAI-compatible: replies ------------------------------------------------------------------------------


async def test_openai_json_reply(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    fake_provider.reply_text = "Hi there, friend"

    result = await complete_chat(http, openai_target(fake_provider), chat_request())

    prompt_tokens = count_tokens("Be brief.") + count_tokens("Say hello")
    assert result == ChatResult(
        content="Hi there, friend",
        finish_reason="stop",
        usage=TokenUsage(prompt_tokens=prompt_tokens, completion_tokens=3, total_tokens=prompt_tokens + 3),
        model=GPT,
    )


async def test_openai_json_reply_keeps_finish_reason(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    fake_provider.finish_reason = "length"

    result = await complete_chat(http, openai_target(fake_provider), chat_request())

    assert result.finish_reason == "length"


async def test_openai_json_reply_without_usage(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    fake_provider.include_usage = False

    result = await complete_chat(http, openai_target(fake_provider), chat_request())

    assert result.usage is None
    assert result.content == DEFAULT_REPLY_TEXT


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, ""),
        ([{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "A"}, {"type": "text", "text": "B"}], "AB"),
    ],
)
async def test_openai_json_reply_content_shapes(
    scripted: ScriptedServer, http: ProviderHttp, content: Any, expected: str
) -> None:
    body = {
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }
    scripted.reply = ScriptedReply([json.dumps(body).encode()], content_type="application/json")
    target = ProviderTarget(spec=PROVIDERS["mistral"], base_url=f"{scripted.url}/v1", api_key="k")

    result = await complete_chat(http, target, chat_request())

    assert result.content == expected
    assert result.usage is None
    assert scripted.received[0][0] == "/v1/chat/completions"


@pytest.mark.parametrize("body", [{"id": "x", "choices": []}, {"id": "x"}, [1, 2]])
async def test_openai_json_reply_without_choices(scripted: ScriptedServer, http: ProviderHttp, body: Any) -> None:
    scripted.reply = ScriptedReply([json.dumps(body).encode()], content_type="application/json")
    target = ProviderTarget(spec=PROVIDERS["custom"], base_url=scripted.url, api_key=None)

    with pytest.raises(ProviderRequestFailed):
        await complete_chat(http, target, chat_request())


async def test_openai_json_error_with_status_200(scripted: ScriptedServer, http: ProviderHttp) -> None:
    body = {"error": {"message": "Upstream model crashed", "code": 502}}
    scripted.reply = ScriptedReply([json.dumps(body).encode()], content_type="application/json")
    target = ProviderTarget(spec=PROVIDERS["openrouter"], base_url=scripted.url, api_key="k")

    with pytest.raises(ProviderRequestFailed) as raised:
        await complete_chat(http, target, chat_request())

    assert "Upstream model crashed" in raised.value.message


async def test_openai_stream_reply(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    fake_provider.reply_text = "One two three four"

    texts, end = await collect(stream_chat(http, openai_target(fake_provider), chat_request()))

    assert texts == ["One", " two", " three", " four"]
    assert end.finish_reason == "stop"
    assert end.model == GPT
    assert end.usage is not None
    assert end.usage.completion_tokens == 4
    assert end.incomplete is False
    assert end.error is None


@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
async def test_stream_reuses_connection(fake_provider: FakeProvider, http: ProviderHttp, protocol: str) -> None:
    target = target_for(fake_provider, protocol)
    model = CLAUDE if protocol == "anthropic" else GPT

    for _ in range(3):
        _texts, end = await collect(stream_chat(http, target, chat_request(model=model)))
        assert end.incomplete is False

    ports = {request.client_port for request in fake_provider.requests}
    assert len(fake_provider.requests) == 3
    assert len(ports) == 1


async def test_stream_ends_without_body_end(scripted: ScriptedServer, http: ProviderHttp) -> None:
    scripted.reply = ScriptedReply(sse(openai_chunk("Done", "stop"), "[DONE]"), hold_before_end=True)
    target = ProviderTarget(spec=PROVIDERS["custom"], base_url=scripted.url, api_key=None)

    texts, end = await collect(stream_chat(http, target, chat_request()))

    # The reply is complete while the server keeps the body open after [DONE].
    assert scripted.holding.is_set()
    assert texts == ["Done"]
    assert end.incomplete is False
    assert end.error is None


async def test_stream_broken_after_done(scripted: ScriptedServer, http: ProviderHttp) -> None:
    scripted.reply = ScriptedReply(sse(openai_chunk("Done", "stop"), "[DONE]", openai_chunk("late")), complete=False)
    target = ProviderTarget(spec=PROVIDERS["custom"], base_url=scripted.url, api_key=None)

    texts, end = await collect(stream_chat(http, target, chat_request()))

    assert texts == ["Done"]
    assert end.incomplete is False
    assert end.error is None


async def test_openai_stream_skips_empty_pieces(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    fake_provider.stream_chunks = ["", "A", "", "B"]

    texts, end = await collect(stream_chat(http, openai_target(fake_provider), chat_request()))

    assert texts == ["A", "B"]
    assert end.incomplete is False


async def test_openai_stream_quirks(scripted: ScriptedServer, http: ProviderHttp) -> None:
    usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    scripted.reply = ScriptedReply(
        [
            b": OPENROUTER PROCESSING\n\n",
            *sse(openai_chunk("")),
            b'data:{"model": "scripted-model", "choices": [{"index": 0, "delta": {"content": "Hel"}}]}\n\n',
            b": keep-alive\n",
            *sse({"model": "scripted-model", "choices": []}),
            *sse(openai_chunk("lo")),
            *sse(openai_chunk(None, "stop")),
            *sse({"model": "scripted-model", "choices": [], "usage": usage}),
            *sse("[DONE]"),
        ]
    )
    target = ProviderTarget(spec=PROVIDERS["deepseek"], base_url=scripted.url, api_key="k")

    texts, end = await collect(stream_chat(http, target, chat_request()))

    assert texts == ["Hel", "lo"]
    assert end == StreamEnd(finish_reason="stop", usage=TokenUsage(9, 2, 11), model="scripted-model")


async def test_openai_stream_groq_usage(scripted: ScriptedServer, http: ProviderHttp) -> None:
    groq_usage = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    scripted.reply = ScriptedReply(
        [*sse(openai_chunk("Hi"), openai_chunk(None, "stop", x_groq={"id": "req_1", "usage": groq_usage}), "[DONE]")]
    )
    target = ProviderTarget(spec=PROVIDERS["groq"], base_url=scripted.url, api_key="k")

    texts, end = await collect(stream_chat(http, target, chat_request()))

    assert texts == ["Hi"]
    assert end.usage == TokenUsage(5, 1, 6)


@pytest.mark.parametrize("line_break", ["\r\n", "\r"])
async def test_openai_stream_other_line_breaks(scripted: ScriptedServer, http: ProviderHttp, line_break: str) -> None:
    frames = sse(openai_chunk("A"), openai_chunk("B", "stop"), "[DONE]", line_break=line_break)
    # Split every frame inside its line break, so that a CRLF may arrive in two reads.
    scripted.reply = ScriptedReply([piece for frame in frames for piece in (frame[:-1], frame[-1:])])
    target = ProviderTarget(spec=PROVIDERS["custom"], base_url=scripted.url, api_key=None)

    texts, end = await collect(stream_chat(http, target, chat_request()))

    assert texts == ["A", "B"]
    assert end.finish_reason == "stop"
    assert end.incomplete is False


async def test_openai_stream_without_done_after_finish(scripted: ScriptedServer, http: ProviderHttp) -> None:
    scripted.reply = ScriptedReply(sse(openai_chunk("Done"), openai_chunk(None, "length")))
    target = ProviderTarget(spec=PROVIDERS["custom"], base_url=scripted.url, api_key=None)

    texts, end = await collect(stream_chat(http, target, chat_request()))

    assert texts == ["Done"]
    assert end.finish_reason == "length"
    assert end.incomplete is False
    assert end.error is None


async def test_openai_stream_done_without_finish_reason(scripted: ScriptedServer, http: ProviderHttp) -> None:
    scripted.reply = ScriptedReply(sse(openai_chunk("All"), openai_chunk(" here"), "[DONE]"))
    target = ProviderTarget(spec=PROVIDERS["custom"], base_url=scripted.url, api_key=None)

    texts, end = await collect(stream_chat(http, target, chat_request()))

    assert texts == ["All", " here"]
    assert end.finish_reason is None
    assert end.incomplete is False


async def test_openai_stream_broken_after_finish(scripted: ScriptedServer, http: ProviderHttp) -> None:
    scripted.reply = ScriptedReply(sse(openai_chunk("Done", "stop")), complete=False)
    target = ProviderTarget(spec=PROVIDERS["custom"], base_url=scripted.url, api_key=None)

    texts, end = await collect(stream_chat(http, target, chat_request()))

    assert texts == ["Done"]
    assert end.incomplete is False
    assert end.error is None


async def test_openai_stream_without_finish_is_incomplete(scripted: ScriptedServer, http: ProviderHttp) -> None:
    scripted.reply = ScriptedReply(sse(openai_chunk("Half"), openai_chunk(" a reply")))
    target = ProviderTarget(spec=PROVIDERS["custom"], base_url=scripted.url, api_key=None)

    texts, end = await collect(stream_chat(http, target, chat_request()))

    assert texts == ["Half", " a reply"]
    assert end.incomplete is True
    assert end.error is None
    assert end.finish_reason is None


async def test_openai_stream_unterminated_last_event_discarded(scripted: ScriptedServer, http: ProviderHttp) -> None:
    last = json.dumps(openai_chunk(" lost", "stop")).encode()
    scripted.reply = ScriptedReply([*sse(openai_chunk("Kept")), b"data: " + last])
    target = ProviderTarget(spec=PROVIDERS["custom"], base_url=scripted.url, api_key=None)

    texts, end = await collect(stream_chat(http, target, chat_request()))

    assert texts == ["Kept"]
    assert end.incomplete is True


async def test_openai_empty_stream_raises(scripted: ScriptedServer, http: ProviderHttp) -> None:
    scripted.reply = ScriptedReply([b": nothing to say\n\n"])
    target = ProviderTarget(spec=PROVIDERS["custom"], base_url=scripted.url, api_key=None)

    with pytest.raises(ProviderRequestFailed):
        await collect(stream_chat(http, target, chat_request()))


async def test_openai_stream_finish_without_text(scripted: ScriptedServer, http: ProviderHttp) -> None:
    scripted.reply = ScriptedReply(sse(openai_chunk(""), openai_chunk(None, "content_filter"), "[DONE]"))
    target = ProviderTarget(spec=PROVIDERS["custom"], base_url=scripted.url, api_key=None)

    texts, end = await collect(stream_chat(http, target, chat_request()))

    assert texts == []
    assert end.finish_reason == "content_filter"
    assert end.incomplete is False


async def test_openai_stream_answered_with_json(scripted: ScriptedServer, http: ProviderHttp) -> None:
    body = {
        "model": "plain",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Whole"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1},
    }
    scripted.reply = ScriptedReply([json.dumps(body).encode()], content_type="application/json; charset=utf-8")
    target = ProviderTarget(spec=PROVIDERS["custom"], base_url=scripted.url, api_key=None)

    texts, end = await collect(stream_chat(http, target, chat_request()))

    assert texts == ["Whole"]
    assert end == StreamEnd(finish_reason="stop", usage=TokenUsage(1, 1, 2), model="plain")


async def test_openai_stream_error_event_after_text(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    fake_provider.fail_next("/chat/completions", stream_error_after=2)

    texts, end = await collect(stream_chat(http, openai_target(fake_provider), chat_request()))

    assert "".join(texts) == "Hello from"
    assert end.incomplete is True
    assert isinstance(end.error, ProviderRequestFailed)
    assert end.error.status_code == 502


async def test_openai_stream_error_event_before_text(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    fake_provider.fail_next("/chat/completions", stream_error_after=0)

    with pytest.raises(ProviderRequestFailed):
        await collect(stream_chat(http, openai_target(fake_provider), chat_request()))


async def test_openai_stream_error_event_context_length(scripted: ScriptedServer, http: ProviderHttp) -> None:
    error = {"message": "This model's maximum context length is 8192 tokens.", "code": "context_length_exceeded"}
    scripted.reply = ScriptedReply(sse({"error": error}))
    target = ProviderTarget(spec=PROVIDERS["custom"], base_url=scripted.url, api_key=None)

    with pytest.raises(ContextLengthExceeded):
        await collect(stream_chat(http, target, chat_request()))


async def test_openai_stream_error_event_rate_limit(scripted: ScriptedServer, http: ProviderHttp) -> None:
    scripted.reply = ScriptedReply(sse(openai_chunk("Par"), {"error": {"message": "Slow down", "code": 429}}))
    target = ProviderTarget(spec=PROVIDERS["openrouter"], base_url=scripted.url, api_key="k")

    texts, end = await collect(stream_chat(http, target, chat_request()))

    assert texts == ["Par"]
    assert end.incomplete is True
    assert isinstance(end.error, ProviderRateLimited)


async def test_openai_stream_error_after_finish_is_complete(scripted: ScriptedServer, http: ProviderHttp) -> None:
    scripted.reply = ScriptedReply(sse(openai_chunk("All", "stop"), {"error": {"message": "late failure"}}))
    target = ProviderTarget(spec=PROVIDERS["custom"], base_url=scripted.url, api_key=None)

    texts, end = await collect(stream_chat(http, target, chat_request()))

    assert texts == ["All"]
    assert end.incomplete is False
    assert end.error is None


async def test_openai_stream_malformed_event(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    fake_provider.fail_next("/chat/completions", malformed_json=True)

    with pytest.raises(ProviderRequestFailed):
        await collect(stream_chat(http, openai_target(fake_provider), chat_request()))


async def test_openai_stream_closed_early(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    stream = stream_chat(http, openai_target(fake_provider), chat_request())

    first = await anext(stream)
    await stream.aclose()

    assert first == ContentDelta("Hello")
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


# -- Anthropic: request bodies -------------------------------------------------------------------------------


async def test_anthropic_body_shape(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    request = chat_request(
        model=CLAUDE,
        system_prompt="Be brief.",
        messages=[
            ChatMessage("assistant", "Welcome!"),
            ChatMessage("system", "Answer in English."),
            ChatMessage("user", "Hi"),
            ChatMessage("user", "   "),
            ChatMessage("user", "Are you there?"),
            ChatMessage("assistant", ""),
            ChatMessage("assistant", "Yes."),
            ChatMessage("assistant", "How can I help?"),
            ChatMessage("user", "Say hello"),
        ],
        max_tokens=300,
        frequency_penalty=0.5,
        presence_penalty=0.5,
    )

    await complete_chat(http, anthropic_target(fake_provider), request)

    sent = fake_provider.last_request("/v1/messages")
    assert sent.headers["x-api-key"] == VALID_ANTHROPIC_API_KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.body["system"] == "Be brief.\n\nAnswer in English."
    assert sent.body["messages"] == [
        {"role": "user", "content": "Hi\n\nAre you there?"},
        {"role": "assistant", "content": "Yes.\n\nHow can I help?"},
        {"role": "user", "content": "Say hello"},
    ]
    assert sent.body["max_tokens"] == 300
    assert "frequency_penalty" not in sent.body
    assert "presence_penalty" not in sent.body
    assert "stream" not in sent.body


@pytest.mark.parametrize(("given", "sent"), [(1.7, 1.0), (-0.5, 0.0), (0.4, 0.4)])
async def test_anthropic_temperature_clamped(
    fake_provider: FakeProvider, http: ProviderHttp, given: float, sent: float
) -> None:
    await complete_chat(http, anthropic_target(fake_provider), chat_request(model=CLAUDE, temperature=given))

    assert fake_provider.last_request("/v1/messages").body["temperature"] == sent


async def test_anthropic_top_p_only_without_temperature(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    target = anthropic_target(fake_provider)

    await complete_chat(http, target, chat_request(model=CLAUDE, top_p=0.8))
    alone = fake_provider.last_request("/v1/messages").body
    await complete_chat(http, target, chat_request(model=CLAUDE, top_p=0.8, temperature=0.3))
    both = fake_provider.last_request("/v1/messages").body

    assert alone["top_p"] == 0.8
    assert "temperature" not in alone
    assert both["temperature"] == 0.3
    assert "top_p" not in both


async def test_anthropic_body_without_system(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    await complete_chat(http, anthropic_target(fake_provider), chat_request(model=CLAUDE, system_prompt=None))

    body = fake_provider.last_request("/v1/messages").body
    assert set(body) == {"model", "max_tokens", "messages"}


async def test_anthropic_final_assistant_turn_trimmed(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    messages = [ChatMessage("user", "Continue:"), ChatMessage("assistant", "Once upon a time \n")]

    await complete_chat(http, anthropic_target(fake_provider), chat_request(model=CLAUDE, messages=messages))

    sent = fake_provider.last_request("/v1/messages").body["messages"]
    assert sent[-1] == {"role": "assistant", "content": "Once upon a time"}


@pytest.mark.parametrize(
    "messages",
    [[], [ChatMessage("assistant", "Hello")], [ChatMessage("user", "  "), ChatMessage("system", "Be brief.")]],
)
async def test_anthropic_without_user_text_rejected(
    fake_provider: FakeProvider, http: ProviderHttp, messages: list[ChatMessage]
) -> None:
    with pytest.raises(InvalidInput):
        await complete_chat(http, anthropic_target(fake_provider), chat_request(model=CLAUDE, messages=messages))

    assert fake_provider.requests_to("/v1/messages") == []


async def test_anthropic_stream_body(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    await collect(stream_chat(http, anthropic_target(fake_provider), chat_request(model=CLAUDE)))

    body = fake_provider.last_request("/v1/messages").body
    assert body["stream"] is True
    assert "stream_options" not in body


# -- Anthropic: replies --------------------------------------------------------------------------------------


async def test_anthropic_json_reply(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    fake_provider.prompt_tokens = 40
    fake_provider.completion_tokens = 5
    fake_provider.stop_reason = "max_tokens"

    result = await complete_chat(http, anthropic_target(fake_provider), chat_request(model=CLAUDE))

    assert result == ChatResult(
        content=DEFAULT_REPLY_TEXT, finish_reason="max_tokens", usage=TokenUsage(40, 5, 45), model=CLAUDE
    )


async def test_anthropic_json_reply_blocks_and_cache_usage(scripted: ScriptedServer, http: ProviderHttp) -> None:
    body = {
        "type": "message",
        "model": "claude-x",
        "content": [
            {"type": "thinking", "thinking": "Let me see", "signature": "sig"},
            {"type": "text", "text": "Part one. "},
            {"type": "text", "text": "Part two."},
        ],
        "stop_reason": "end_turn",
        "usage": {
            "input_tokens": 10,
            "cache_creation_input_tokens": 100,
            "cache_read_input_tokens": 1000,
            "output_tokens": 7,
        },
    }
    scripted.reply = ScriptedReply([json.dumps(body).encode()], content_type="application/json")
    target = ProviderTarget(spec=PROVIDERS["anthropic"], base_url=scripted.url, api_key="k")

    result = await complete_chat(http, target, chat_request(model=CLAUDE))

    assert result.content == "Part one. Part two."
    assert result.usage == TokenUsage(1110, 7, 1117)
    assert scripted.received[0][0] == "/v1/messages"


async def test_anthropic_stream_reply(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    fake_provider.reply_text = "Short and sweet"
    fake_provider.prompt_tokens = 12

    texts, end = await collect(stream_chat(http, anthropic_target(fake_provider), chat_request(model=CLAUDE)))

    assert texts == ["Short", " and", " sweet"]
    assert end == StreamEnd(finish_reason="end_turn", usage=TokenUsage(12, 3, 15), model=CLAUDE)


async def test_anthropic_stream_ignores_other_events(scripted: ScriptedServer, http: ProviderHttp) -> None:
    thinking = {"index": 0, "delta": {"type": "thinking_delta", "thinking": "Hmm"}}
    scripted.reply = ScriptedReply(
        [
            anthropic_start(),
            anthropic_event("ping", {}),
            anthropic_event("content_block_start", {"index": 0, "content_block": {"type": "thinking"}}),
            anthropic_event("content_block_delta", thinking),
            anthropic_event("content_block_stop", {"index": 0}),
            anthropic_event("future_event", {"anything": True}),
            anthropic_text("Answer"),
            anthropic_finish("stop_sequence", output_tokens=4),
            anthropic_event("message_stop", {}),
        ]
    )
    target = ProviderTarget(spec=PROVIDERS["anthropic"], base_url=scripted.url, api_key="k")

    texts, end = await collect(stream_chat(http, target, chat_request(model=CLAUDE)))

    assert texts == ["Answer"]
    assert end == StreamEnd(finish_reason="stop_sequence", usage=TokenUsage(11, 4, 15), model="scripted-claude")


async def test_anthropic_stream_without_stop_after_delta(scripted: ScriptedServer, http: ProviderHttp) -> None:
    scripted.reply = ScriptedReply([anthropic_start(), anthropic_text("Done"), anthropic_finish()])
    target = ProviderTarget(spec=PROVIDERS["anthropic"], base_url=scripted.url, api_key="k")

    texts, end = await collect(stream_chat(http, target, chat_request(model=CLAUDE)))

    assert texts == ["Done"]
    assert end.finish_reason == "end_turn"
    assert end.incomplete is False


async def test_anthropic_stream_broken_after_delta(scripted: ScriptedServer, http: ProviderHttp) -> None:
    scripted.reply = ScriptedReply([anthropic_start(), anthropic_text("Done"), anthropic_finish()], complete=False)
    target = ProviderTarget(spec=PROVIDERS["anthropic"], base_url=scripted.url, api_key="k")

    texts, end = await collect(stream_chat(http, target, chat_request(model=CLAUDE)))

    assert texts == ["Done"]
    assert end.incomplete is False
    assert end.usage == TokenUsage(11, 3, 14)


async def test_anthropic_stream_without_finish_is_incomplete(scripted: ScriptedServer, http: ProviderHttp) -> None:
    scripted.reply = ScriptedReply([anthropic_start(), anthropic_text("Cut")])
    target = ProviderTarget(spec=PROVIDERS["anthropic"], base_url=scripted.url, api_key="k")

    texts, end = await collect(stream_chat(http, target, chat_request(model=CLAUDE)))

    assert texts == ["Cut"]
    assert end.incomplete is True
    assert end.error is None
    assert end.usage == TokenUsage(prompt_tokens=11, completion_tokens=1, total_tokens=12)


async def test_anthropic_stream_error_event_after_text(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    fake_provider.fail_next("/v1/messages", stream_error_after=1)

    texts, end = await collect(stream_chat(http, anthropic_target(fake_provider), chat_request(model=CLAUDE)))

    assert texts == ["Hello"]
    assert end.incomplete is True
    assert isinstance(end.error, ProviderRequestFailed)
    assert "overloaded_error" in end.error.message


@pytest.mark.parametrize(
    ("error_type", "expected"),
    [
        ("overloaded_error", ProviderRequestFailed),
        ("api_error", ProviderRequestFailed),
        ("rate_limit_error", ProviderRateLimited),
        ("authentication_error", ProviderAuthFailed),
        ("timeout_error", ProviderTimeout),
    ],
)
async def test_anthropic_stream_error_event_before_text(
    fake_provider: FakeProvider, http: ProviderHttp, error_type: str, expected: type[PocketLLMError]
) -> None:
    fake_provider.fail_next("/v1/messages", stream_error_after=0, error_type=error_type)

    with pytest.raises(expected):
        await collect(stream_chat(http, anthropic_target(fake_provider), chat_request(model=CLAUDE)))


async def test_anthropic_stream_error_event_prompt_too_long(scripted: ScriptedServer, http: ProviderHttp) -> None:
    error = {"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: 9 > 5"}}
    scripted.reply = ScriptedReply([f"event: error\ndata: {json.dumps(error)}\n\n".encode()])
    target = ProviderTarget(spec=PROVIDERS["anthropic"], base_url=scripted.url, api_key="k")

    with pytest.raises(ContextLengthExceeded):
        await collect(stream_chat(http, target, chat_request(model=CLAUDE)))


async def test_anthropic_stream_malformed_event(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    fake_provider.fail_next("/v1/messages", malformed_json=True)

    with pytest.raises(ProviderRequestFailed):
        await collect(stream_chat(http, anthropic_target(fake_provider), chat_request(model=CLAUDE)))


# -- errors for both protocols -------------------------------------------------------------------------------


@PROTOCOLS
async def test_wrong_key_complete(fake_provider: FakeProvider, http: ProviderHttp, protocol: str) -> None:
    target = target_for(fake_provider, protocol, api_key="sk-wrong-key-123456")

    with pytest.raises(ProviderAuthFailed) as raised:
        await complete_chat(http, target, request_for(protocol))

    assert "sk-wrong-key-123456" not in raised.value.message


@PROTOCOLS
async def test_wrong_key_stream(fake_provider: FakeProvider, http: ProviderHttp, protocol: str) -> None:
    target = target_for(fake_provider, protocol, api_key="sk-wrong-key-123456")

    with pytest.raises(ProviderAuthFailed):
        await collect(stream_chat(http, target, request_for(protocol)))


@PROTOCOLS
@pytest.mark.parametrize("streaming", [False, True])
async def test_rate_limited_with_retry_after(
    fake_provider: FakeProvider, http: ProviderHttp, protocol: str, streaming: bool
) -> None:
    fake_provider.fail_next(path_for(protocol), status=429, retry_after=7)
    target = target_for(fake_provider, protocol)

    with pytest.raises(ProviderRateLimited) as raised:
        await send(http, target, request_for(protocol), streaming=streaming)

    assert raised.value.status_code == 429
    assert raised.value.headers == {"Retry-After": "7"}


@PROTOCOLS
@pytest.mark.parametrize("streaming", [False, True])
async def test_server_error(fake_provider: FakeProvider, http: ProviderHttp, protocol: str, streaming: bool) -> None:
    fake_provider.fail_next(path_for(protocol), status=500)
    target = target_for(fake_provider, protocol)

    with pytest.raises(ProviderRequestFailed) as raised:
        await send(http, target, request_for(protocol), streaming=streaming)

    assert raised.value.status_code == 502
    assert raised.value.code == "provider_unavailable"


@PROTOCOLS
async def test_error_message_scrubs_key(fake_provider: FakeProvider, http: ProviderHttp, protocol: str) -> None:
    target = target_for(fake_provider, protocol)
    assert target.api_key is not None
    fake_provider.fail_next(path_for(protocol), status=503, message=f"Backend refused key {target.api_key}")

    with pytest.raises(ProviderRequestFailed) as raised:
        await complete_chat(http, target, request_for(protocol))

    assert "Backend refused key" in raised.value.message
    assert target.api_key not in raised.value.message


@PROTOCOLS
async def test_stream_error_message_scrubs_key(fake_provider: FakeProvider, http: ProviderHttp, protocol: str) -> None:
    target = target_for(fake_provider, protocol)
    assert target.api_key is not None
    fake_provider.fail_next(path_for(protocol), stream_error_after=1, message=f"Lost key {target.api_key}")

    _, end = await collect(stream_chat(http, target, request_for(protocol)))

    assert end.error is not None
    assert "Lost key" in end.error.message
    assert target.api_key not in end.error.message


@PROTOCOLS
@pytest.mark.parametrize("streaming", [False, True])
async def test_timeout_before_reply(fake_provider: FakeProvider, protocol: str, streaming: bool) -> None:
    fake_provider.fail_next(path_for(protocol), delay_seconds=PROVIDER_DELAY_SECONDS)
    target = target_for(fake_provider, protocol)

    async with provider_http(SHORT_TIMEOUT_SECONDS) as http:
        with pytest.raises(ProviderTimeout) as raised:
            await send(http, target, request_for(protocol), streaming=streaming)

    assert raised.value.status_code == 504


@PROTOCOLS
async def test_stream_stalls_after_text(fake_provider: FakeProvider, protocol: str) -> None:
    fake_provider.fail_next(path_for(protocol), stall_stream_after=1, delay_seconds=PROVIDER_DELAY_SECONDS)
    target = target_for(fake_provider, protocol)

    async with provider_http(SHORT_TIMEOUT_SECONDS) as http:
        texts, end = await collect(stream_chat(http, target, request_for(protocol)))

    assert texts == ["Hello"]
    assert end.incomplete is True
    assert isinstance(end.error, ProviderTimeout)


@PROTOCOLS
async def test_stream_breaks_after_text(fake_provider: FakeProvider, http: ProviderHttp, protocol: str) -> None:
    fake_provider.fail_next(path_for(protocol), break_stream_after=2)

    texts, end = await collect(stream_chat(http, target_for(fake_provider, protocol), request_for(protocol)))

    assert "".join(texts) == "Hello from"
    assert end.incomplete is True
    assert isinstance(end.error, ProviderRequestFailed)
    assert end.finish_reason is None


@PROTOCOLS
async def test_stream_breaks_before_text(fake_provider: FakeProvider, http: ProviderHttp, protocol: str) -> None:
    fake_provider.fail_next(path_for(protocol), break_stream_after=0)

    with pytest.raises(ProviderRequestFailed):
        await collect(stream_chat(http, target_for(fake_provider, protocol), request_for(protocol)))


@PROTOCOLS
async def test_malformed_json_reply(fake_provider: FakeProvider, http: ProviderHttp, protocol: str) -> None:
    fake_provider.fail_next(path_for(protocol), malformed_json=True)

    with pytest.raises(ProviderRequestFailed):
        await complete_chat(http, target_for(fake_provider, protocol), request_for(protocol))


@PROTOCOLS
@pytest.mark.parametrize("streaming", [False, True])
async def test_context_too_long(
    fake_provider: FakeProvider, http: ProviderHttp, protocol: str, streaming: bool
) -> None:
    # The fake counts one token per word and checks the prompt against the model's context length.
    for model in [*fake_provider.openai_models, *fake_provider.anthropic_models]:
        model.context_length = 50
    long_message = ChatMessage("user", "word " * 60)
    target = target_for(fake_provider, protocol)

    with pytest.raises(ContextLengthExceeded) as raised:
        await send(http, target, request_for(protocol, messages=[long_message], max_tokens=10), streaming=streaming)

    assert raised.value.status_code == 400
    assert raised.value.code == "context_length_exceeded"


async def test_openai_context_length_code(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    fake_provider.fail_next("/chat/completions", status=400, error_code="context_length_exceeded")

    with pytest.raises(ContextLengthExceeded) as raised:
        await complete_chat(http, openai_target(fake_provider), chat_request())

    assert "maximum context length" in raised.value.message


async def test_openai_context_length_message_only(fake_provider: FakeProvider, http: ProviderHttp) -> None:
    message = "This model's maximum context length is 4096 tokens, but you requested 5000 tokens."
    fake_provider.fail_next("/chat/completions", status=400, message=message)

    with pytest.raises(ContextLengthExceeded):
        await complete_chat(http, openai_target(fake_provider, "together"), chat_request())


@PROTOCOLS
async def test_other_bad_request_not_context_error(
    fake_provider: FakeProvider, http: ProviderHttp, protocol: str
) -> None:
    fake_provider.fail_next(path_for(protocol), status=400, message="Invalid value for 'model'.")

    with pytest.raises(ProviderRequestFailed) as raised:
        await complete_chat(http, target_for(fake_provider, protocol), request_for(protocol))

    assert "Invalid value for 'model'." in raised.value.message


# -- types ---------------------------------------------------------------------------------------------------


def test_token_usage_to_dict() -> None:
    usage = TokenUsage(prompt_tokens=3, completion_tokens=None, total_tokens=3)

    assert usage.to_dict() == {"prompt_tokens": 3, "completion_tokens": None, "total_tokens": 3}
