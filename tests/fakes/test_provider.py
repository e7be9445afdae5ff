"""Self-tests of the fake provider: plain httpx over the network against the running server, checking the
shapes, status codes, headers and SSE framing that provider code relies on."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.provider import (
    DEFAULT_REPLY_TEXT,
    ODD_MODEL_ENTRIES,
    VALID_ANTHROPIC_API_KEY,
    VALID_API_KEY,
    FakeModel,
    FakeProvider,
    count_tokens,
    make_png,
    split_into_chunks,
)

CLAUDE = "claude-3-5-haiku-20241022"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeProvider]:
    with FakeProvider() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeProvider) -> FakeProvider:
    server.reset()
    return server


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def openai_headers(key: str = VALID_API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def anthropic_headers(key: str = VALID_ANTHROPIC_API_KEY, version: str = "2023-06-01") -> dict[str, str]:
    return {"x-api-key": key, "anthropic-version": version}


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], **extra}


def messages_body(**extra: Any) -> dict[str, Any]:
    return {"model": CLAUDE, "max_tokens": 256, "messages": [{"role": "user", "content": "Say hello"}], **extra}


def post_chat(fake: FakeProvider, http: httpx.Client, **extra: Any) -> httpx.Response:
    return http.post(f"{fake.openai_base_url}/chat/completions", headers=openai_headers(), json=chat_body(**extra))


def post_messages(fake: FakeProvider, http: httpx.Client, body: Any = None, **extra: Any) -> httpx.Response:
    payload = body if body is not None else messages_body(**extra)
    return http.post(f"{fake.anthropic_base_url}/v1/messages", headers=anthropic_headers(), json=payload)


def parse_sse(text: str) -> list[dict[str, str]]:
    """Split an event stream into events, each a dict of its fields. Assumes one data line per event."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields = {}
        for line in block.split("\n"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        events.append(fields)
    return events


def read_until_broken(response: httpx.Response) -> str:
    """Read a response whose connection is closed mid-body, and return the text received before the break."""
    received: list[bytes] = []
    with pytest.raises(httpx.RemoteProtocolError):
        received.extend(response.iter_raw())  # keeps the chunks read before the error
    return b"".join(received).decode()


def png_size(data: bytes) -> tuple[int, int]:
    """Check a PNG's signature, chunk CRCs and pixel data length, and return its width and height."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position = 8
    chunks: dict[bytes, bytes] = {}
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        content = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + content) & 0xFFFFFFFF, kind
        chunks[kind] = content
        position += 12 + length
    assert list(chunks)[-1] == b"IEND"
    width, height, bit_depth, colour_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (bit_depth, colour_type) == (8, 2)
    assert len(zlib.decompress(chunks[b"IDAT"])) == height * (1 + 3 * width)
    return width, height


# -- helpers -------------------------------------------------------------------------------------------------


def test_split_into_chunks_joins_back() -> None:
    for text in ["Hello from the fake", "  leading", "trailing  ", "one", "", "a\nb  c"]:
        assert "".join(split_into_chunks(text)) == text
    assert split_into_chunks("Hello from the fake") == ["Hello", " from", " the", " fake"]


def test_count_tokens_counts_words() -> None:
    assert count_tokens("Say hello  to\nme") == 4
    assert count_tokens("") == 0


def test_make_png_is_valid() -> None:
    assert png_size(make_png(3, 2)) == (3, 2)


def test_make_png_rejects_empty_size() -> None:
    with pytest.raises(ValueError, match="at least 1x1"):
        make_png(0, 4)


# -- lifecycle -----------------------------------------------------------------------------------------------


def test_server_listens_on_loopback_until_stopped() -> None:
    provider = FakeProvider()
    with pytest.raises(RuntimeError, match="not running"):
        _ = provider.url

    provider.start()
    url = provider.url
    assert url.startswith("http://127.0.0.1:")
    assert provider.openai_base_url == f"{url}/openai/v1"
    assert provider.anthropic_base_url == f"{url}/anthropic"
    response = httpx.get(f"{provider.openai_base_url}/models", headers=openai_headers())
    assert response.status_code == 200

    provider.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/openai/v1/models", headers=openai_headers())


def test_start_twice_raises() -> None:
    with FakeProvider() as provider, pytest.raises(RuntimeError, match="already running"):
        provider.start()


async def test_stop_releases_paused_response() -> None:
    provider = FakeProvider()
    provider.start()
    provider.fail_next("/models", delay_seconds=60)
    async with httpx.AsyncClient(timeout=10) as client:
        slow = asyncio.create_task(client.get(f"{provider.openai_base_url}/models", headers=openai_headers()))
        await asyncio.to_thread(provider.wait_for_requests, "/models")

        await asyncio.to_thread(provider.stop)
        response = await slow
    assert response.status_code == 200


# -- OpenAI-compatible models --------------------------------------------------------------------------------


def test_openai_models_default_shape(fake: FakeProvider, http: httpx.Client) -> None:
    response = http.get(f"{fake.openai_base_url}/models", headers=openai_headers())

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["object"] == "list"
    assert [entry["id"] for entry in body["data"]] == ["gpt-4o-mini", "gpt-4o", "dall-e-3"]
    for entry in body["data"]:
        assert set(entry) == {"id", "object", "created", "owned_by"}
        assert entry["object"] == "model"
        assert isinstance(entry["created"], int)


def test_openai_models_custom_list(fake: FakeProvider, http: httpx.Client) -> None:
    fake.openai_models = [FakeModel("custom-1", owned_by="me")]

    body = http.get(f"{fake.openai_base_url}/models", headers=openai_headers()).json()

    assert body["data"] == [{"id": "custom-1", "object": "model", "created": 1_715_367_049, "owned_by": "me"}]


def test_openai_models_bare_array(fake: FakeProvider, http: httpx.Client) -> None:
    fake.model_list_shape = "bare"

    body = http.get(f"{fake.openai_base_url}/models", headers=openai_headers()).json()

    assert isinstance(body, list)
    assert [entry["id"] for entry in body] == ["gpt-4o-mini", "gpt-4o", "dall-e-3"]


def test_openai_models_openrouter_shape(fake: FakeProvider, http: httpx.Client) -> None:
    fake.model_list_shape = "openrouter"
    fake.openai_models = [
        FakeModel(
            "meta/llama-3-8b",
            name="Llama 3 8B",
            description="A small model",
            context_length=8192,
            prompt_price="0.0000001",
            completion_price="0.0000002",
            input_modalities=["text", "image"],
        )
    ]

    body = http.get(f"{fake.openai_base_url}/models", headers=openai_headers()).json()

    (entry,) = body["data"]
    assert entry["id"] == "meta/llama-3-8b"
    assert entry["name"] == "Llama 3 8B"
    assert entry["description"] == "A small model"
    assert entry["context_length"] == 8192
    assert entry["pricing"] == {"prompt": "0.0000001", "completion": "0.0000002"}
    assert entry["architecture"]["input_modalities"] == ["text", "image"]
    assert entry["architecture"]["output_modalities"] == ["text"]
    assert entry["architecture"]["modality"] == "text+image->text"


def test_openai_models_odd_entries(fake: FakeProvider, http: httpx.Client) -> None:
    fake.model_list_shape = "odd"

    data = http.get(f"{fake.openai_base_url}/models", headers=openai_headers()).json()["data"]

    assert [entry["id"] for entry in data[:3]] == ["gpt-4o-mini", "gpt-4o", "dall-e-3"]
    assert data[3:] == ODD_MODEL_ENTRIES
    assert any(isinstance(entry, dict) and "id" not in entry for entry in data)
    assert any(isinstance(entry, dict) and isinstance(entry.get("id"), int) for entry in data)
    assert any(not isinstance(entry, dict) for entry in data)
    negative = next(entry for entry in data if isinstance(entry, dict) and entry.get("id") == "odd/negative-price")
    assert float(negative["pricing"]["prompt"]) < 0


def test_openai_models_data_not_list(fake: FakeProvider, http: httpx.Client) -> None:
    fake.model_list_shape = "data_not_list"

    body = http.get(f"{fake.openai_base_url}/models", headers=openai_headers()).json()

    assert isinstance(body["data"], dict)


def test_openai_models_raw_body(fake: FakeProvider, http: httpx.Client) -> None:
    fake.model_list_body = {"models": [{"name": "llama3"}]}

    body = http.get(f"{fake.openai_base_url}/models", headers=openai_headers()).json()

    assert body == {"models": [{"name": "llama3"}]}


def test_openai_model_by_id(fake: FakeProvider, http: httpx.Client) -> None:
    fake.openai_models = [FakeModel("vendor/model-a")]

    found = http.get(f"{fake.openai_base_url}/models/vendor/model-a", headers=openai_headers())
    missing = http.get(f"{fake.openai_base_url}/models/nope", headers=openai_headers())

    assert found.status_code == 200
    assert found.json()["id"] == "vendor/model-a"
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


# -- OpenAI-compatible authentication ------------------------------------------------------------------------


def test_openai_missing_key_is_401(fake: FakeProvider, http: httpx.Client) -> None:
    response = http.get(f"{fake.openai_base_url}/models")

    assert response.status_code == 401
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] is None
    assert "didn't provide an API key" in error["message"]


def test_openai_wrong_key_is_401(fake: FakeProvider, http: httpx.Client) -> None:
    wrong_key = "sk-wrong-0123456789abcdef"

    response = http.post(
        f"{fake.openai_base_url}/chat/completions", headers=openai_headers(wrong_key), json=chat_body()
    )

    assert response.status_code == 401
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["param"] is None
    assert body["error"]["message"].startswith("Incorrect API key provided: sk-")
    assert "cdef" in body["error"]["message"]
    assert wrong_key not in body["error"]["message"]


def test_openai_valid_keys_are_configurable(fake: FakeProvider, http: httpx.Client) -> None:
    fake.valid_keys = {"sk-other"}

    old = http.get(f"{fake.openai_base_url}/models", headers=openai_headers())
    new = http.get(f"{fake.openai_base_url}/models", headers=openai_headers("sk-other"))

    assert old.status_code == 401
    assert new.status_code == 200


def test_openai_key_optional_when_not_required(fake: FakeProvider, http: httpx.Client) -> None:
    fake.require_api_key = False

    response = http.get(f"{fake.openai_base_url}/models")

    assert response.status_code == 200


# -- OpenAI-compatible chat completions ----------------------------------------------------------------------


def test_chat_completion_shape(fake: FakeProvider, http: httpx.Client) -> None:
    response = post_chat(fake, http)

    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "gpt-4o-mini"
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == DEFAULT_REPLY_TEXT
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}


def test_chat_completion_configured_reply(fake: FakeProvider, http: httpx.Client) -> None:
    fake.reply_text = "Configured"
    fake.finish_reason = "length"
    fake.prompt_tokens = 11
    fake.completion_tokens = 3

    body = post_chat(fake, http).json()

    assert body["choices"][0]["message"]["content"] == "Configured"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


def test_chat_completion_without_usage(fake: FakeProvider, http: httpx.Client) -> None:
    fake.include_usage = False

    body = post_chat(fake, http).json()

    assert "usage" not in body


def test_chat_queued_replies_come_first(fake: FakeProvider, http: httpx.Client) -> None:
    fake.queue_replies("first", "second")

    contents = [post_chat(fake, http).json()["choices"][0]["message"]["content"] for _ in range(3)]

    assert contents == ["first", "second", DEFAULT_REPLY_TEXT]


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, None, None),
        ({"model": "gpt-4o-mini"}, "missing_required_parameter", "messages"),
        ({"model": "gpt-4o-mini", "messages": []}, "invalid_value", "messages"),
        ({"model": "gpt-4o-mini", "messages": [{"role": "robot", "content": "hi"}]}, "invalid_value", None),
        (chat_body(temperature=3), "invalid_value", "temperature"),
        (chat_body(stream="yes"), "invalid_type", "stream"),
        (["not", "an", "object"], None, None),
    ],
)
def test_chat_invalid_request_is_400(
    fake: FakeProvider, http: httpx.Client, body: Any, code: str | None, param: str | None
) -> None:
    response = http.post(f"{fake.openai_base_url}/chat/completions", headers=openai_headers(), json=body)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code
    if param is not None:
        assert error["param"] == param


def test_chat_body_not_json_is_400(fake: FakeProvider, http: httpx.Client) -> None:
    response = http.post(
        f"{fake.openai_base_url}/chat/completions",
        headers={**openai_headers(), "content-type": "application/json"},
        content=b"{not json",
    )

    assert response.status_code == 400
    assert "could not parse the JSON body" in response.json()["error"]["message"]


def test_chat_rejected_parameter_is_400(fake: FakeProvider, http: httpx.Client) -> None:
    fake.rejected_parameters = {"frequency_penalty"}

    rejected = post_chat(fake, http, frequency_penalty=0.5)
    accepted = post_chat(fake, http)

    assert rejected.status_code == 400
    assert rejected.json()["error"]["message"] == "Unrecognized request argument supplied: frequency_penalty"
    assert accepted.status_code == 200


def test_chat_unknown_model_rejected_when_asked(fake: FakeProvider, http: httpx.Client) -> None:
    accepted = post_chat(fake, http, model="not-in-catalogue")
    fake.reject_unknown_models = True
    rejected = post_chat(fake, http, model="not-in-catalogue")

    assert accepted.status_code == 200
    assert rejected.status_code == 404
    assert rejected.json()["error"]["code"] == "model_not_found"


def test_chat_context_length_exceeded(fake: FakeProvider, http: httpx.Client) -> None:
    fake.openai_models = [FakeModel("tiny", context_length=5)]

    fits = post_chat(fake, http, model="tiny", messages=[{"role": "user", "content": "one two three four five"}])
    too_long = post_chat(
        fake, http, model="tiny", messages=[{"role": "user", "content": "one two three four five six"}]
    )
    with_completion = post_chat(
        fake, http, model="tiny", messages=[{"role": "user", "content": "one two"}], max_tokens=4
    )

    assert fits.status_code == 200
    for response in (too_long, with_completion):
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert error["type"] == "invalid_request_error"
        assert error["message"].startswith("This model's maximum context length is 5 tokens.")


def test_chat_counts_content_parts(fake: FakeProvider, http: httpx.Client) -> None:
    messages = [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": [{"type": "text", "text": "three words here"}, {"type": "image_url"}]},
    ]

    body = post_chat(fake, http, messages=messages).json()

    assert body["usage"]["prompt_tokens"] == 5


# -- OpenAI-compatible streaming -----------------------------------------------------------------------------


def test_chat_stream_framing(fake: FakeProvider, http: httpx.Client) -> None:
    response = post_chat(fake, http, stream=True)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert "content-length" not in response.headers
    assert response.text.endswith("data: [DONE]\n\n")
    events = parse_sse(response.text)
    assert all(set(event) == {"data"} for event in events)
    assert events[-1]["data"] == "[DONE]"

    chunks = [json.loads(event["data"]) for event in events[:-1]]
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert text == DEFAULT_REPLY_TEXT


def test_chat_stream_usage_chunk(fake: FakeProvider, http: httpx.Client) -> None:
    response = post_chat(fake, http, stream=True, stream_options={"include_usage": True})

    chunks = [json.loads(event["data"]) for event in parse_sse(response.text)[:-1]]
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"


def test_chat_stream_custom_chunks(fake: FakeProvider, http: httpx.Client) -> None:
    fake.stream_chunks = ["Al", "pha", " beta"]

    response = post_chat(fake, http, stream=True)

    chunks = [json.loads(event["data"]) for event in parse_sse(response.text)[:-1]]
    contents = [chunk["choices"][0]["delta"]["content"] for chunk in chunks[1:-1]]
    assert contents == ["Al", "pha", " beta"]


# -- Anthropic models ----------------------------------------------------------------------------------------


def test_anthropic_models_shape(fake: FakeProvider, http: httpx.Client) -> None:
    response = http.get(f"{fake.anthropic_base_url}/v1/models", headers=anthropic_headers())

    assert response.status_code == 200
    body = response.json()
    assert body["has_more"] is False
    assert body["first_id"] == "claude-sonnet-4-5-20250929"
    assert body["last_id"] == CLAUDE
    assert body["data"][0] == {
        "type": "model",
        "id": "claude-sonnet-4-5-20250929",
        "display_name": "Claude Sonnet 4.5",
        "created_at": "2025-09-29T00:00:00Z",
    }


def test_anthropic_models_pages(fake: FakeProvider, http: httpx.Client) -> None:
    fake.anthropic_models = [FakeModel(f"claude-{index}") for index in range(3)]
    url = f"{fake.anthropic_base_url}/v1/models"

    first = http.get(url, headers=anthropic_headers(), params={"limit": 2}).json()
    second = http.get(url, headers=anthropic_headers(), params={"limit": 2, "after_id": first["last_id"]}).json()
    before = http.get(url, headers=anthropic_headers(), params={"limit": 1, "before_id": "claude-2"}).json()

    assert [entry["id"] for entry in first["data"]] == ["claude-0", "claude-1"]
    assert first["has_more"] is True
    assert [entry["id"] for entry in second["data"]] == ["claude-2"]
    assert second["has_more"] is False
    assert [entry["id"] for entry in before["data"]] == ["claude-1"]
    assert before["has_more"] is True


def test_anthropic_models_limit_out_of_range(fake: FakeProvider, http: httpx.Client) -> None:
    response = http.get(f"{fake.anthropic_base_url}/v1/models", headers=anthropic_headers(), params={"limit": 0})

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_anthropic_model_by_id(fake: FakeProvider, http: httpx.Client) -> None:
    found = http.get(f"{fake.anthropic_base_url}/v1/models/{CLAUDE}", headers=anthropic_headers())
    missing = http.get(f"{fake.anthropic_base_url}/v1/models/claude-nope", headers=anthropic_headers())

    assert found.status_code == 200
    assert found.json()["display_name"] == "Claude Haiku 3.5"
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found_error"


# -- Anthropic authentication --------------------------------------------------------------------------------


def test_anthropic_wrong_key_is_401(fake: FakeProvider, http: httpx.Client) -> None:
    response = http.get(f"{fake.anthropic_base_url}/v1/models", headers=anthropic_headers("sk-ant-wrong"))

    assert response.status_code == 401
    body = response.json()
    assert body["type"] == "error"
    assert body["error"] == {"type": "authentication_error", "message": "invalid x-api-key"}
    assert body["request_id"].startswith("req_")
    assert response.headers["request-id"] == body["request_id"]


def test_anthropic_missing_key_is_401(fake: FakeProvider, http: httpx.Client) -> None:
    response = http.get(f"{fake.anthropic_base_url}/v1/models", headers={"anthropic-version": "2023-06-01"})

    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_anthropic_bearer_key_is_not_accepted(fake: FakeProvider, http: httpx.Client) -> None:
    headers = {**openai_headers(VALID_ANTHROPIC_API_KEY), "anthropic-version": "2023-06-01"}

    response = http.get(f"{fake.anthropic_base_url}/v1/models", headers=headers)

    assert response.status_code == 401


def test_anthropic_missing_version_is_400(fake: FakeProvider, http: httpx.Client) -> None:
    response = http.get(f"{fake.anthropic_base_url}/v1/models", headers={"x-api-key": VALID_ANTHROPIC_API_KEY})

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "anthropic-version" in error["message"]


def test_anthropic_unknown_version_is_400(fake: FakeProvider, http: httpx.Client) -> None:
    response = http.get(f"{fake.anthropic_base_url}/v1/models", headers=anthropic_headers(version="2099-01-01"))

    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


# -- Anthropic messages --------------------------------------------------------------------------------------


def test_anthropic_message_shape(fake: FakeProvider, http: httpx.Client) -> None:
    response = post_messages(fake, http)

    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("msg_")
    assert body["type"] == "message"
    assert body["role"] == "assistant"
    assert body["model"] == CLAUDE
    assert body["content"] == [{"type": "text", "text": DEFAULT_REPLY_TEXT}]
    assert body["stop_reason"] == "end_turn"
    assert body["stop_sequence"] is None
    assert body["usage"] == {"input_tokens": 2, "output_tokens": 5}


def test_anthropic_message_system_and_prefill(fake: FakeProvider, http: httpx.Client) -> None:
    fake.stop_reason = "max_tokens"
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Say hello"}]},
        {"role": "assistant", "content": "Sure"},
        {"role": "user", "content": "Now"},
        {"role": "assistant", "content": ""},
    ]

    response = post_messages(fake, http, messages=messages, system="You are terse and kind")

    assert response.status_code == 200
    body = response.json()
    assert body["stop_reason"] == "max_tokens"
    assert body["usage"]["input_tokens"] == 5 + 2 + 1 + 1


@pytest.mark.parametrize(
    ("body", "message_part"),
    [
        ({"model": CLAUDE, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens: Field required"),
        (messages_body(max_tokens=0), "max_tokens"),
        ({"max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}, "model: Field required"),
        ({"model": CLAUDE, "max_tokens": 10}, "messages: Field required"),
        (messages_body(messages=[]), "at least one message"),
        (messages_body(messages=[{"role": "assistant", "content": "hi"}]), 'first message must use the "user"'),
        (
            messages_body(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
            "roles must alternate",
        ),
        (
            messages_body(
                messages=[
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "assistant", "content": "c"},
                ]
            ),
            "roles must alternate",
        ),
        (
            messages_body(messages=[{"role": "system", "content": "Be brief"}, {"role": "user", "content": "hi"}]),
            'Unexpected role "system"',
        ),
        (messages_body(messages=[{"role": "user", "content": ""}]), "non-empty content"),
        (messages_body(messages=[{"role": "user", "content": []}]), "non-empty content"),
        (
            messages_body(messages=[{"role": "user", "content": [{"type": "text", "text": ""}]}]),
            "text content blocks must be non-empty",
        ),
        (
            messages_body(messages=[{"role": "user", "content": [{"type": "text", "text": "  "}]}]),
            "non-whitespace text",
        ),
        (
            messages_body(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure "}]),
            "trailing whitespace",
        ),
        (messages_body(frequency_penalty=0.5), "frequency_penalty: Extra inputs are not permitted"),
        (messages_body(temperature=1.5), "temperature"),
        (messages_body(system=42), "system"),
        (messages_body(stream="yes"), "stream"),
        (messages_body(max_tokens=9000), "maximum allowed number of output tokens"),
        (["not", "an", "object"], "JSON object"),
    ],
)
def test_anthropic_invalid_request_is_400(fake: FakeProvider, http: httpx.Client, body: Any, message_part: str) -> None:
    response = post_messages(fake, http, body=body)

    assert response.status_code == 400
    payload = response.json()
    assert payload["type"] == "error"
    assert payload["error"]["type"] == "invalid_request_error"
    assert message_part in payload["error"]["message"]


def test_anthropic_prompt_too_long(fake: FakeProvider, http: httpx.Client) -> None:
    fake.anthropic_models = [FakeModel("claude-small", context_length=10)]

    too_long = post_messages(fake, http, model="claude-small", max_tokens=1, system=" ".join(["word"] * 11))
    with_output = post_messages(fake, http, model="claude-small", max_tokens=9)

    assert too_long.status_code == 400
    assert too_long.json()["error"]["message"] == "prompt is too long: 13 tokens > 10 maximum"
    assert with_output.status_code == 400
    assert "exceed context limit: 2 + 9 > 10" in with_output.json()["error"]["message"]


def test_anthropic_unknown_model_rejected_when_asked(fake: FakeProvider, http: httpx.Client) -> None:
    accepted = post_messages(fake, http, model="claude-unknown")
    fake.reject_unknown_models = True
    rejected = post_messages(fake, http, model="claude-unknown")

    assert accepted.status_code == 200
    assert rejected.status_code == 404
    assert rejected.json()["error"]["type"] == "not_found_error"


def test_anthropic_stream_framing(fake: FakeProvider, http: httpx.Client) -> None:
    response = post_messages(fake, http, stream=True)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = parse_sse(response.text)
    names = [event["event"] for event in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    payloads = [json.loads(event["data"]) for event in events]
    assert all(payload["type"] == name for payload, name in zip(payloads, names, strict=True))

    start = payloads[0]["message"]
    assert start["id"].startswith("msg_")
    assert start["content"] == []
    assert start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 2
    assert payloads[1]["content_block"] == {"type": "text", "text": ""}
    deltas = [payload["delta"] for payload in payloads if payload["type"] == "content_block_delta"]
    assert all(delta["type"] == "text_delta" for delta in deltas)
    assert "".join(delta["text"] for delta in deltas) == DEFAULT_REPLY_TEXT
    assert payloads[-2]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert payloads[-2]["usage"] == {"output_tokens": 5}


# -- images --------------------------------------------------------------------------------------------------


def test_images_as_urls(fake: FakeProvider, http: httpx.Client) -> None:
    fake.image_width, fake.image_height = 5, 3

    response = http.post(
        f"{fake.openai_base_url}/images/generations",
        headers=openai_headers(),
        json={"model": "dall-e-3", "prompt": "a red fox", "n": 2},
    )

    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["created"], int)
    urls = [item["url"] for item in body["data"]]
    assert len(urls) == 2
    assert all(url.startswith(f"{fake.url}/files/img-") and url.endswith(".png") for url in urls)
    images = [http.get(url) for url in urls]
    assert all(image.status_code == 200 for image in images)
    assert all(image.headers["content-type"] == "image/png" for image in images)
    assert [png_size(image.content) for image in images] == [(5, 3), (5, 3)]
    assert images[0].content != images[1].content
    assert sorted(fake.generated_images.values()) == sorted(image.content for image in images)


def test_images_as_base64(fake: FakeProvider, http: httpx.Client) -> None:
    response = http.post(
        f"{fake.openai_base_url}/images/generations",
        headers=openai_headers(),
        json={"model": "gpt-image-1", "prompt": "a red fox", "response_format": "b64_json"},
    )

    assert response.status_code == 200
    (item,) = response.json()["data"]
    assert set(item) == {"b64_json"}
    assert png_size(base64.b64decode(item["b64_json"])) == (8, 8)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "dall-e-3"}, "prompt"),
        ({"prompt": "fox", "n": 0}, "n"),
        ({"prompt": "fox", "n": 11}, "n"),
        ({"prompt": "fox", "response_format": "gif"}, "response_format"),
    ],
)
def test_images_invalid_request_is_400(fake: FakeProvider, http: httpx.Client, body: Any, param: str) -> None:
    response = http.post(f"{fake.openai_base_url}/images/generations", headers=openai_headers(), json=body)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param


def test_images_require_key(fake: FakeProvider, http: httpx.Client) -> None:
    response = http.post(f"{fake.openai_base_url}/images/generations", json={"prompt": "fox"})

    assert response.status_code == 401


def test_unknown_file_is_404(fake: FakeProvider, http: httpx.Client) -> None:
    response = http.get(f"{fake.url}/files/missing.png")

    assert response.status_code == 404


# -- unknown paths -------------------------------------------------------------------------------------------


def test_unknown_paths_get_protocol_404(fake: FakeProvider, http: httpx.Client) -> None:
    openai = http.get(f"{fake.openai_base_url}/nothing-here", headers=openai_headers())
    wrong_method = http.get(f"{fake.openai_base_url}/chat/completions", headers=openai_headers())
    anthropic = http.get(f"{fake.anthropic_base_url}/v1/nothing-here", headers=anthropic_headers())
    other = http.get(f"{fake.url}/elsewhere")

    assert openai.status_code == 404
    assert openai.json()["error"]["message"] == "Invalid URL (GET /v1/nothing-here)"
    assert wrong_method.status_code == 404
    assert wrong_method.json()["error"]["message"] == "Invalid URL (GET /v1/chat/completions)"
    assert anthropic.status_code == 404
    assert anthropic.json()["error"]["type"] == "not_found_error"
    assert other.status_code == 404
    assert [record.path for record in fake.requests] == [
        "/openai/v1/nothing-here",
        "/openai/v1/chat/completions",
        "/anthropic/v1/nothing-here",
        "/elsewhere",
    ]


# -- recorded requests ---------------------------------------------------------------------------------------


def test_requests_are_recorded(fake: FakeProvider, http: httpx.Client) -> None:
    http.get(f"{fake.anthropic_base_url}/v1/models", headers=anthropic_headers(), params={"limit": 5})
    post_messages(fake, http, system="Be brief")

    listing, message = fake.requests
    assert listing.method == "GET"
    assert listing.path == "/anthropic/v1/models"
    assert listing.query == {"limit": "5"}
    assert listing.headers["x-api-key"] == VALID_ANTHROPIC_API_KEY
    assert listing.headers["anthropic-version"] == "2023-06-01"
    assert listing.body is None
    assert message.method == "POST"
    assert message.body["system"] == "Be brief"
    assert "temperature" not in message.body
    assert json.loads(message.raw_body) == message.body
    assert fake.requests_to("/v1/messages") == [message]
    assert fake.last_request("/models") == listing


def test_request_body_not_json_is_kept_raw(fake: FakeProvider, http: httpx.Client) -> None:
    http.post(f"{fake.openai_base_url}/chat/completions", headers=openai_headers(), content=b"\xff\x00 not json")

    record = fake.last_request()
    assert record.body is None
    assert record.raw_body == b"\xff\x00 not json"


def test_last_request_raises_when_none(fake: FakeProvider) -> None:
    with pytest.raises(LookupError, match="/chat/completions"):
        fake.last_request("/chat/completions")


def test_wait_for_requests_times_out(fake: FakeProvider) -> None:
    with pytest.raises(TimeoutError, match="received 0"):
        fake.wait_for_requests("/chat/completions", timeout=0.05)


def test_reset_restores_defaults(fake: FakeProvider, http: httpx.Client) -> None:
    fake.reply_text = "changed"
    fake.valid_keys = set()
    fake.model_list_shape = "bare"
    fake.queue_replies("queued")
    fake.fail_next("/models", status=500, times=None)
    post_chat(fake, http)

    fake.reset()

    assert fake.requests == []
    assert fake.generated_images == {}
    models = http.get(f"{fake.openai_base_url}/models", headers=openai_headers())
    assert models.status_code == 200
    assert models.json()["object"] == "list"
    assert post_chat(fake, http).json()["choices"][0]["message"]["content"] == DEFAULT_REPLY_TEXT


# -- scripted status errors ----------------------------------------------------------------------------------


def test_fail_next_openai_rate_limit(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/chat/completions", status=429, retry_after=7)

    limited = post_chat(fake, http)
    after = post_chat(fake, http)

    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "7"
    error = limited.json()["error"]
    assert error["type"] == "requests"
    assert error["code"] == "rate_limit_exceeded"
    assert after.status_code == 200


def test_fail_next_openai_server_error(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/chat/completions", status=500)

    response = post_chat(fake, http)

    assert response.status_code == 500
    assert response.json()["error"]["type"] == "server_error"


def test_fail_next_openai_context_length(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/chat/completions", status=400, error_code="context_length_exceeded")

    response = post_chat(fake, http)

    error = response.json()["error"]
    assert response.status_code == 400
    assert error["code"] == "context_length_exceeded"
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith("This model's maximum context length is")


def test_fail_next_overrides_error_fields(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next(
        "/chat/completions",
        status=429,
        error_type="insufficient_quota",
        error_code="insufficient_quota",
        message="You exceeded your current quota.",
        headers={"x-ratelimit-remaining-requests": "0"},
    )

    response = post_chat(fake, http)

    assert response.json()["error"] == {
        "message": "You exceeded your current quota.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
    assert response.headers["x-ratelimit-remaining-requests"] == "0"


def test_fail_next_anthropic_rate_limit(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/v1/messages", status=429, retry_after=12)

    response = post_messages(fake, http)

    assert response.status_code == 429
    assert response.headers["retry-after"] == "12"
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"


def test_fail_next_anthropic_overloaded(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/v1/messages", status=529)

    response = post_messages(fake, http)

    assert response.status_code == 529
    assert response.json()["error"] == {"type": "overloaded_error", "message": "Overloaded"}


def test_fail_next_times_and_matching(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/chat/completions", status=503, times=2)

    models = http.get(f"{fake.openai_base_url}/models", headers=openai_headers())
    statuses = [post_chat(fake, http).status_code for _ in range(3)]

    assert models.status_code == 200
    assert statuses == [503, 503, 200]


def test_fail_next_until_reset(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/models", status=500, times=None)

    statuses = [http.get(f"{fake.openai_base_url}/models", headers=openai_headers()).status_code for _ in range(3)]
    fake.reset()
    after_reset = http.get(f"{fake.openai_base_url}/models", headers=openai_headers())

    assert statuses == [500, 500, 500]
    assert after_reset.status_code == 200


def test_fail_next_method_filter(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next(status=500, method="POST")

    listing = http.get(f"{fake.openai_base_url}/models", headers=openai_headers())
    chat = post_chat(fake, http)

    assert listing.status_code == 200
    assert chat.status_code == 500


def test_fail_next_applies_before_key_check(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/models", status=503)

    response = http.get(f"{fake.openai_base_url}/models")

    assert response.status_code == 503


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({}, "needs an outcome"),
        ({"status": 500, "malformed_json": True}, "one outcome"),
        ({"break_stream_after": 1, "stream_error_after": 1}, "one outcome"),
        ({"stall_stream_after": 1}, "positive delay_seconds"),
        ({"redirect_to": "http://example.invalid/", "status": 500}, "redirect status"),
        ({"status": 500, "times": 0}, "times must be"),
    ],
)
def test_fail_next_rejects_bad_arguments(fake: FakeProvider, arguments: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fake.fail_next("/chat/completions", **arguments)


# -- scripted slow, malformed, redirected and broken responses -----------------------------------------------


async def test_delay_does_not_block_other_requests(fake: FakeProvider) -> None:
    fake.fail_next("/chat/completions", delay_seconds=60)
    async with httpx.AsyncClient(timeout=10) as client:
        slow = asyncio.create_task(
            client.post(f"{fake.openai_base_url}/chat/completions", headers=openai_headers(), json=chat_body())
        )
        await asyncio.to_thread(fake.wait_for_requests, "/chat/completions")

        fast = await client.get(f"{fake.openai_base_url}/models", headers=openai_headers())
        assert fast.status_code == 200
        assert not slow.done()

        await asyncio.to_thread(fake.reset)
        released = await slow
    assert released.status_code == 200
    assert released.json()["object"] == "chat.completion"


def test_delay_causes_client_timeout(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/models", delay_seconds=60)

    with pytest.raises(httpx.ReadTimeout):
        http.get(f"{fake.openai_base_url}/models", headers=openai_headers(), timeout=0.2)


def test_delay_before_status_error(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/v1/messages", status=529, delay_seconds=0.01)

    response = post_messages(fake, http)

    assert response.status_code == 529


def test_malformed_json(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/chat/completions", malformed_json=True)

    response = post_chat(fake, http)

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_malformed_json_in_stream(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/chat/completions", malformed_json=True)
    fake.fail_next("/v1/messages", malformed_json=True)

    openai = post_chat(fake, http, stream=True)
    anthropic = post_messages(fake, http, stream=True)

    for response in (openai, anthropic):
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        with pytest.raises(json.JSONDecodeError):
            json.loads(parse_sse(response.text)[0]["data"])


def test_redirect_emits_location_only(fake: FakeProvider, http: httpx.Client) -> None:
    target = "http://169.254.169.254/latest/meta-data/"
    fake.fail_next("/models", redirect_to=target)
    fake.fail_next("/chat/completions", redirect_to=target, status=307)

    listing = http.get(f"{fake.openai_base_url}/models", headers=openai_headers())
    chat = post_chat(fake, http)

    assert listing.status_code == 302
    assert listing.headers["location"] == target
    assert chat.status_code == 307
    assert chat.headers["location"] == target
    assert len(fake.requests) == 2


def test_truncated_body(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/chat/completions", truncate_body=True)

    with http.stream(
        "POST", f"{fake.openai_base_url}/chat/completions", headers=openai_headers(), json=chat_body()
    ) as response:
        assert response.status_code == 200
        received = read_until_broken(response)

    assert 0 < len(received) < int(response.headers["content-length"])


def test_truncate_body_skips_streaming_requests(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/chat/completions", truncate_body=True)

    streamed = post_chat(fake, http, stream=True)

    assert streamed.text.endswith("data: [DONE]\n\n")
    with pytest.raises(httpx.RemoteProtocolError):
        post_chat(fake, http)


def test_openai_stream_breaks_midway(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/chat/completions", break_stream_after=2)

    with http.stream(
        "POST", f"{fake.openai_base_url}/chat/completions", headers=openai_headers(), json=chat_body(stream=True)
    ) as response:
        received = read_until_broken(response)

    events = parse_sse(received)
    assert "[DONE]" not in received
    contents = [json.loads(event["data"])["choices"][0]["delta"].get("content") for event in events]
    assert contents == ["", "Hello", " from"]


def test_anthropic_stream_breaks_midway(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/v1/messages", break_stream_after=1)

    with http.stream(
        "POST", f"{fake.anthropic_base_url}/v1/messages", headers=anthropic_headers(), json=messages_body(stream=True)
    ) as response:
        received = read_until_broken(response)

    names = [event["event"] for event in parse_sse(received)]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta"]


def test_stream_break_rule_skips_plain_requests(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/chat/completions", break_stream_after=0)

    plain = post_chat(fake, http)
    with http.stream(
        "POST", f"{fake.openai_base_url}/chat/completions", headers=openai_headers(), json=chat_body(stream=True)
    ) as response:
        received = read_until_broken(response)

    assert plain.status_code == 200
    assert len(parse_sse(received)) == 1


def test_anthropic_stream_error_event(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/v1/messages", stream_error_after=2)

    response = post_messages(fake, http, stream=True)

    events = parse_sse(response.text)
    names = [event["event"] for event in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "error",
    ]
    assert json.loads(events[-1]["data"]) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }


def test_openai_stream_error_event(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/chat/completions", stream_error_after=1)

    response = post_chat(fake, http, stream=True)

    events = parse_sse(response.text)
    assert "[DONE]" not in response.text
    error = json.loads(events[-1]["data"])["error"]
    assert error["type"] == "server_error"
    assert len(events) == 3


def test_stream_stalls_midway(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/v1/messages", stall_stream_after=1, delay_seconds=60)
    received: list[str] = []

    with (
        http.stream(
            "POST",
            f"{fake.anthropic_base_url}/v1/messages",
            headers=anthropic_headers(),
            json=messages_body(stream=True),
            timeout=httpx.Timeout(10, read=0.3),
        ) as response,
        pytest.raises(httpx.ReadTimeout),
    ):
        received.extend(response.iter_text())

    names = [event["event"] for event in parse_sse("".join(received))]
    assert names == ["message_start", "content_block_start", "ping", "content_block_delta"]


def test_stalled_stream_finishes_after_delay(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/chat/completions", stall_stream_after=1, delay_seconds=0.01)

    response = post_chat(fake, http, stream=True)

    assert response.text.endswith("data: [DONE]\n\n")


def test_stream_error_type_override(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/v1/messages", stream_error_after=0, error_type="api_error", message="Internal server error")

    response = post_messages(fake, http, stream=True)

    events = parse_sse(response.text)
    assert [event["event"] for event in events] == ["message_start", "content_block_start", "ping", "error"]
    assert json.loads(events[-1]["data"])["error"] == {"type": "api_error", "message": "Internal server error"}


def test_fail_next_headers_on_normal_response(fake: FakeProvider, http: httpx.Client) -> None:
    fake.fail_next("/chat/completions", delay_seconds=0.01, headers={"x-ratelimit-remaining-requests": "9"})
    fake.fail_next("/chat/completions", break_stream_after=1, headers={"x-ratelimit-remaining-requests": "8"})

    plain = post_chat(fake, http)
    with http.stream(
        "POST", f"{fake.openai_base_url}/chat/completions", headers=openai_headers(), json=chat_body(stream=True)
    ) as streamed:
        read_until_broken(streamed)

    assert plain.status_code == 200
    assert plain.headers["x-ratelimit-remaining-requests"] == "9"
    assert streamed.headers["x-ratelimit-remaining-requests"] == "8"
