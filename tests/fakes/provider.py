"""A fake LLM and image provider for tests: a real HTTP server on 127.0.0.1 that speaks the OpenAI-compatible
and Anthropic wire formats, so provider code is tested at the network boundary.

Routes, relative to `fake.url`:

* `/openai/v1/models`, `/openai/v1/models/{id}`, `/openai/v1/chat/completions` (JSON or SSE) and
  `/openai/v1/images/generations`. Use `fake.openai_base_url` as the provider's base URL.
* `/anthropic/v1/models`, `/anthropic/v1/models/{id}` and `/anthropic/v1/messages` (JSON or SSE).
  Use `fake.anthropic_base_url` as the provider's base URL.
* `/imagerouter/v1/models` (ImageRouter's model list, an object keyed by model id, served without a key)
  and `/imagerouter/v1/openai/images/generations` (OpenAI-shaped, plus ImageRouter's top-level `cost` in
  USD and `latency` in milliseconds). Use `fake.imagerouter_base_url` as the provider's base URL.
* `/files/{name}`, the generated images behind the `url` results of both image endpoints. It needs no
  key, like a signed storage URL. `/files/big-{N}.png` sends N bytes with a Content-Length header, and
  `/files/stream-{N}.png` sends N bytes in chunks without one, both starting with the PNG signature, to
  test download size limits.
* Any other path returns the protocol's 404 error body.

The OpenAI image endpoint returns `revised_prompt` for dall-e-3, and for gpt-image-1 it always returns
base64 with a token `usage` block. With `strict_image_models = True` it also applies each model's rules:
accepted parameters, sizes, qualities, styles, image count and prompt length. By default it accepts any
model, like a lenient OpenAI-compatible server.

Attributes of the instance set what it returns (models, reply text, token usage, valid keys),
`fail_next()` scripts failures for matching requests, and `requests` contains every request received.
`reset()` restores all of it to the defaults. Token counts are whitespace-separated words (`count_tokens`),
not a real tokenizer.

Response and error shapes follow the public API references of OpenAI (models, chat completions, images)
and Anthropic (models, Messages, streaming, and the error list at https://docs.claude.com/en/api/errors).
Error message texts are close to the real ones but not exact copies, so tests should assert status codes,
error types and codes.

Use it from pytest through the `fake_provider` fixture (register this module with
`pytest_plugins = ["tests.fakes.provider"]` in the root conftest), or directly:

    with FakeProvider() as fake:
        fake.reply_text = "Hi"
        fake.fail_next("/chat/completions", status=429, retry_after=7)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import socket
import struct
import threading
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import pytest
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

VALID_API_KEY = "sk-test-valid"
VALID_ANTHROPIC_API_KEY = "sk-ant-test-valid"
DEFAULT_REPLY_TEXT = "Hello from the fake provider"
# The anthropic-version values in the version history at https://platform.claude.com/docs/en/api/versioning.
ANTHROPIC_VERSIONS = frozenset({"2023-01-01", "2023-06-01", "2026-10-21"})

ModelListShape = Literal["data", "bare", "openrouter", "odd", "data_not_list"]
ImageFormat = Literal["PNG", "JPEG", "WEBP"]
_Protocol = Literal["openai", "anthropic", "plain"]

_OPENAI_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_START_TIMEOUT_SECONDS = 10.0
_STOP_TIMEOUT_SECONDS = 10.0
_SSE_HEADERS = {"cache-control": "no-cache"}
_SSE_MEDIA_TYPE = "text/event-stream; charset=utf-8"

# Top-level fields of an Anthropic Messages request that the fake accepts. The real API rejects unknown
# fields with "<field>: Extra inputs are not permitted", and it gains fields over time, so add a newer one
# here when code under test has to send it.
_ANTHROPIC_MESSAGE_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "stream",
        "metadata",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
        "container",
        "mcp_servers",
    }
)


@dataclass(frozen=True)
class OpenAIImageModel:
    """What one OpenAI image model accepts, from OpenAI's Images API reference."""

    sizes: tuple[str, ...]
    qualities: tuple[str, ...]
    styles: tuple[str, ...]
    max_images: int
    max_prompt_length: int
    # Request fields the model rejects with 400 unknown_parameter.
    unknown_parameters: frozenset[str] = frozenset()


OPENAI_IMAGE_MODELS: dict[str, OpenAIImageModel] = {
    "dall-e-2": OpenAIImageModel(
        sizes=("256x256", "512x512", "1024x1024"),
        qualities=("standard",),
        styles=(),
        max_images=10,
        max_prompt_length=1000,
    ),
    "dall-e-3": OpenAIImageModel(
        sizes=("1024x1024", "1792x1024", "1024x1792"),
        qualities=("standard", "hd"),
        styles=("vivid", "natural"),
        max_images=1,
        max_prompt_length=4000,
    ),
    "gpt-image-1": OpenAIImageModel(
        sizes=("1024x1024", "1536x1024", "1024x1536", "auto"),
        qualities=("low", "medium", "high", "auto"),
        styles=(),
        max_images=10,
        max_prompt_length=32_000,
        unknown_parameters=frozenset({"response_format", "style"}),
    ),
}
# OpenAI's default model when a request names none.
DEFAULT_OPENAI_IMAGE_MODEL = "dall-e-2"
# Output image tokens of one gpt-image-1 image by quality and size: OpenAI's image generation guide, as
# quoted on community.openai.com in 2025. The fake counts "auto" as medium and 1024x1024.
GPT_IMAGE_OUTPUT_TOKENS: dict[tuple[str, str], int] = {
    ("low", "1024x1024"): 272,
    ("low", "1024x1536"): 408,
    ("low", "1536x1024"): 400,
    ("medium", "1024x1024"): 1056,
    ("medium", "1024x1536"): 1584,
    ("medium", "1536x1024"): 1568,
    ("high", "1024x1024"): 4160,
    ("high", "1024x1536"): 6240,
    ("high", "1536x1024"): 6208,
}
IMAGEROUTER_QUALITIES = frozenset({"auto", "low", "medium", "high"})
_IMAGEROUTER_SIZE = re.compile(r"^[0-9]+x[0-9]+$")
_SIZED_FILE = re.compile(r"^(big|stream)-([0-9]{1,10})\.png$")
_IMAGE_MEDIA_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp"}
_IMAGE_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


# -- data types ----------------------------------------------------------------------------------------------


@dataclass
class FakeModel:
    """A model in the fake's catalogue, rendered in the list shape that `model_list_shape` selects.

    Prices are USD per token as decimal strings, the way OpenRouter publishes them.
    """

    id: str
    name: str = ""
    created: int = 1_715_367_049
    owned_by: str = "fake-provider"
    description: str = ""
    context_length: int = 128_000
    max_output_tokens: int | None = None
    prompt_price: str = "0.00000015"
    completion_price: str = "0.0000006"
    input_modalities: list[str] = field(default_factory=lambda: ["text"])
    output_modalities: list[str] = field(default_factory=lambda: ["text"])

    @property
    def display_name(self) -> str:
        return self.name or self.id


@dataclass(frozen=True)
class RecordedRequest:
    """A request as the fake received it. Header names are lower case, and `body` is the parsed JSON or None."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    raw_body: bytes
    # The port of the connection the request came on: equal ports mean that the client reused a connection.
    client_port: int | None = None


@dataclass
class ScriptedFailure:
    """One `fail_next()` rule. `remaining` is None for a rule that applies until `reset()`."""

    path_suffix: str | None
    method: str | None
    remaining: int | None
    status: int | None
    retry_after: float | str | None
    delay_seconds: float
    malformed_json: bool
    redirect_to: str | None
    truncate_body: bool
    break_stream_after: int | None
    stream_error_after: int | None
    stall_stream_after: int | None
    error_type: str | None
    error_code: str | None
    message: str | None
    headers: dict[str, str]

    @property
    def streaming_only(self) -> bool:
        return (
            self.break_stream_after is not None
            or self.stream_error_after is not None
            or self.stall_stream_after is not None
        )

    def matches(self, request: RecordedRequest) -> bool:
        if self.path_suffix is not None and not request.path.endswith(self.path_suffix):
            return False
        if self.method is not None and self.method.upper() != request.method:
            return False
        streaming = _is_streaming(request.body)
        if self.streaming_only and not streaming:
            return False
        return not (self.truncate_body and streaming)


@dataclass(frozen=True)
class _Call:
    request: Request
    record: RecordedRequest
    rule: ScriptedFailure | None


_Handler = Callable[[_Call], Awaitable[Response]]


def default_openai_models() -> list[FakeModel]:
    return [
        FakeModel("gpt-4o-mini", name="GPT-4o mini", owned_by="system", max_output_tokens=16_384),
        FakeModel(
            "gpt-4o",
            name="GPT-4o",
            owned_by="system",
            max_output_tokens=16_384,
            prompt_price="0.0000025",
            completion_price="0.00001",
            input_modalities=["text", "image"],
        ),
        FakeModel(
            "dall-e-3",
            name="DALL-E 3",
            owned_by="system",
            context_length=4_000,
            prompt_price="0",
            completion_price="0",
            output_modalities=["image"],
        ),
    ]


def default_anthropic_models() -> list[FakeModel]:
    return [
        FakeModel(
            "claude-sonnet-4-5-20250929",
            name="Claude Sonnet 4.5",
            created=1_759_104_000,
            owned_by="anthropic",
            context_length=200_000,
            max_output_tokens=64_000,
        ),
        FakeModel(
            "claude-3-5-haiku-20241022",
            name="Claude Haiku 3.5",
            created=1_729_555_200,
            owned_by="anthropic",
            context_length=200_000,
            max_output_tokens=8_192,
        ),
    ]


def default_imagerouter_models() -> dict[str, Any]:
    """ImageRouter's `GET /v1/models` body: a fixed-price image model, one priced by a range, a free one, and
    a video model."""
    return {
        "test/fixed-image": {
            "providers": [
                {"id": "deepinfra", "model_name": "fixed-image", "pricing": {"type": "fixed", "value": 0.04}}
            ],
            "release_date": "2024-11-02",
            "output": ["image"],
            "supported_params": {"quality": False, "edit": False, "mask": False},
        },
        "test/range-image": {
            "providers": [
                {
                    "id": "runware",
                    "model_name": "runware:100@1",
                    "pricing": {"type": "calculated", "range": {"min": 0.0006, "average": 0.0013, "max": 0.0019}},
                }
            ],
            "release_date": "2024-08-01",
            "output": ["image"],
            "supported_params": {"quality": True, "edit": False, "mask": False},
        },
        "test/free-image:free": {
            "providers": [{"id": "deepinfra", "model_name": "free-image", "pricing": {"type": "fixed", "value": 0}}],
            "release_date": "2024-08-01",
            "output": ["image"],
            "supported_params": {"quality": False, "edit": False, "mask": False},
        },
        "test/video": {
            "providers": [{"id": "fal", "model_name": "video", "pricing": {"type": "fixed", "value": 0.9}}],
            "release_date": "2025-05-20",
            "output": ["video"],
            "supported_params": {},
        },
    }


# Entries that a careless parser trips over, appended to the valid ones by `model_list_shape = "odd"`.
# Only the entries with a usable string id ("odd/...") name a model at all, and their other fields are wrong.
ODD_MODEL_ENTRIES: list[Any] = [
    {"object": "model", "owned_by": "nobody"},
    {"id": 12345, "object": "model"},
    {"id": None, "object": "model"},
    {"id": "", "object": "model"},
    {"id": "   ", "object": "model"},
    {"id": "odd/negative-price", "name": "Negative price", "pricing": {"prompt": "-1", "completion": "-0.5"}},
    {"id": "odd/text-price", "name": "Text price", "pricing": {"prompt": "free", "completion": "n/a"}},
    {"id": "odd/wrong-types", "name": 7, "context_length": "lots", "pricing": "cheap", "architecture": ["text"]},
    "a-bare-string",
    None,
    42,
    ["nested", "list"],
]


# -- small helpers -------------------------------------------------------------------------------------------


def count_tokens(text: str) -> int:
    """Count tokens the way the fake does: one per whitespace-separated word."""
    return len(text.split())


def split_into_chunks(text: str) -> list[str]:
    """Split text into stream chunks at word boundaries, each chunk keeping its leading whitespace.

    Joining the chunks gives the text back unchanged.
    """
    return [piece for piece in re.split(r"(?<=\S)(?=\s)", text) if piece]


def make_png(width: int, height: int, rgb: tuple[int, int, int] = (40, 120, 200)) -> bytes:
    """Encode a valid single-colour PNG (8-bit RGB, no interlacing)."""
    if width < 1 or height < 1:
        raise ValueError(f"PNG size must be at least 1x1, got {width}x{height}")

    def chunk(kind: bytes, data: bytes) -> bytes:
        checksum = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", checksum)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + bytes(rgb) * width  # filter type 0 (None) before every scanline
    pixels = zlib.compress(row * height)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def make_image(width: int, height: int, rgb: tuple[int, int, int], image_format: ImageFormat = "PNG") -> bytes:
    """Encode a valid single-colour image as PNG (with `make_png`), JPEG or WEBP (with Pillow)."""
    if image_format == "PNG":
        return make_png(width, height, rgb)
    output = io.BytesIO()
    Image.new("RGB", (width, height), rgb).save(output, format=image_format)
    return output.getvalue()


def _is_streaming(body: Any) -> bool:
    return isinstance(body, dict) and body.get("stream") is True


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _iso_timestamp(epoch_seconds: int) -> str:
    return datetime.fromtimestamp(epoch_seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _mask_key(key: str) -> str:
    """Mask a key the way OpenAI quotes it in errors: a short prefix, stars, and the last four characters."""
    if len(key) <= 8:
        return "*" * len(key)
    return key[:3] + "*" * (len(key) - 7) + key[-4:]


def _message_text(content: Any) -> str:
    """Join the text of a message's content, given as a string or as a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict)]
        return " ".join(text for text in texts if isinstance(text, str))
    return ""


def _prompt_tokens(messages: list[Any], system: Any = None) -> int:
    total = count_tokens(_message_text(system))
    for message in messages:
        if isinstance(message, dict):
            total += count_tokens(_message_text(message.get("content")))
    return total


def _find_model(models: list[FakeModel], model_id: Any) -> FakeModel | None:
    return next((model for model in models if model.id == model_id), None)


def _sse_data(payload: Any) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _sse_event(event: str, payload: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(payload)}\n\n".encode()


# -- model lists ---------------------------------------------------------------------------------------------


def _openai_model_entry(model: FakeModel) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": model.owned_by}


def _openrouter_model_entry(model: FakeModel) -> dict[str, Any]:
    inputs = "+".join(model.input_modalities)
    outputs = "+".join(model.output_modalities)
    return {
        "id": model.id,
        "canonical_slug": model.id,
        "name": model.display_name,
        "created": model.created,
        "description": model.description,
        "context_length": model.context_length,
        "architecture": {
            "modality": f"{inputs}->{outputs}",
            "input_modalities": list(model.input_modalities),
            "output_modalities": list(model.output_modalities),
            "tokenizer": "Other",
            "instruct_type": None,
        },
        "pricing": {"prompt": model.prompt_price, "completion": model.completion_price},
        "top_provider": {
            "context_length": model.context_length,
            "max_completion_tokens": model.max_output_tokens,
            "is_moderated": False,
        },
        "per_request_limits": None,
    }


def render_openai_model_list(models: list[FakeModel], shape: ModelListShape) -> Any:
    """Build the body of `GET /models` in one of the shapes that OpenAI-compatible providers return.

    * "data": OpenAI's `{"object": "list", "data": [...]}`.
    * "bare": a JSON array of the same entries, as Together returns it.
    * "openrouter": entries with name, description, context length, pricing and modalities.
    * "odd": the OpenRouter entries followed by `ODD_MODEL_ENTRIES`.
    * "data_not_list": an object where the list should be.
    """
    if shape == "data":
        return {"object": "list", "data": [_openai_model_entry(model) for model in models]}
    if shape == "bare":
        return [_openai_model_entry(model) for model in models]
    if shape == "openrouter":
        return {"data": [_openrouter_model_entry(model) for model in models]}
    if shape == "odd":
        return {"object": "list", "data": [_openrouter_model_entry(model) for model in models] + ODD_MODEL_ENTRIES}
    if shape == "data_not_list":
        first = _openai_model_entry(models[0]) if models else {}
        return {"object": "list", "data": first}
    raise ValueError(f"unknown model list shape {shape!r}")


def _anthropic_model_entry(model: FakeModel) -> dict[str, Any]:
    return {
        "type": "model",
        "id": model.id,
        "display_name": model.display_name,
        "created_at": _iso_timestamp(model.created),
    }


# -- error bodies --------------------------------------------------------------------------------------------

# Default (type, code, message) of an OpenAI error body for each status.
_OPENAI_STATUS_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "The request is invalid."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("request_forbidden", "unsupported_country_region_territory", "Country, region, or territory not supported"),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request. Sorry about that!"),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}

# Default (type, message) of an Anthropic error body for each status.
_ANTHROPIC_STATUS_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "The request is invalid."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of requests has exceeded your rate limit. Please try again later."),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}

_CONTEXT_LENGTH_MESSAGE = (
    "This model's maximum context length is {limit} tokens. However, your messages resulted in {used} tokens. "
    "Please reduce the length of the messages."
)


def openai_error_body(message: str, error_type: str, code: str | None = None, param: str | None = None) -> Any:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def anthropic_error_body(error_type: str, message: str) -> Any:
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": _new_id("req_")}


def _openai_error(
    status: int,
    message: str,
    error_type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(openai_error_body(message, error_type, code, param), status_code=status, headers=headers)


def _anthropic_error(status: int, error_type: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = anthropic_error_body(error_type, message)
    all_headers = {"request-id": body["request_id"], **(headers or {})}
    return JSONResponse(body, status_code=status, headers=all_headers)


def _scripted_error(protocol: _Protocol, rule: ScriptedFailure, status: int) -> Response:
    """Build the error response of a `fail_next(status=...)` rule in the protocol's error shape."""
    headers = {}
    if rule.retry_after is not None:
        headers["retry-after"] = str(rule.retry_after)

    if protocol == "openai":
        default_type, default_code, default_message = _OPENAI_STATUS_ERRORS.get(
            status,
            ("server_error" if status >= 500 else "invalid_request_error", None, f"Request failed with {status}."),
        )
        code = rule.error_code if rule.error_code is not None else default_code
        if rule.message is not None:
            message = rule.message
        elif code == "context_length_exceeded":
            message = _CONTEXT_LENGTH_MESSAGE.format(limit=128_000, used=130_000)
        else:
            message = default_message
        return _openai_error(status, message, rule.error_type or default_type, code, headers=headers)

    if protocol == "anthropic":
        default_type, default_message = _ANTHROPIC_STATUS_ERRORS.get(
            status, ("api_error" if status >= 500 else "invalid_request_error", f"Request failed with {status}.")
        )
        return _anthropic_error(status, rule.error_type or default_type, rule.message or default_message, headers)

    return Response(rule.message or f"Request failed with {status}.", status_code=status, headers=headers)


def _stream_error_frame(protocol: _Protocol, rule: ScriptedFailure) -> bytes:
    """Build the error event that a `fail_next(stream_error_after=...)` rule sends mid-stream."""
    if protocol == "anthropic":
        error = {"type": rule.error_type or "overloaded_error", "message": rule.message or "Overloaded"}
        return _sse_event("error", {"type": "error", "error": error})
    message = rule.message or "The server had an error while processing your request."
    return _sse_data(openai_error_body(message, rule.error_type or "server_error", rule.error_code))


# -- responses with broken or paused bodies ------------------------------------------------------------------


class _EventStreamResponse(Response):
    """A server-sent event stream sent frame by frame.

    It can pause before the frame at `pause_at`, and with `complete=False` it ends without the final empty
    body message, so the server closes the connection and the client sees an incomplete chunked body.
    """

    def __init__(
        self,
        frames: list[bytes],
        *,
        pause: Callable[[float], Awaitable[None]],
        pause_at: int | None = None,
        pause_seconds: float = 0.0,
        complete: bool = True,
    ) -> None:
        super().__init__(status_code=200, headers=_SSE_HEADERS, media_type=_SSE_MEDIA_TYPE)
        # Response sets "content-length: 0" for the empty initial body, but a stream is sent chunked.
        self.raw_headers = [(name, value) for name, value in self.raw_headers if name != b"content-length"]
        self.frames = frames
        self.pause = pause
        self.pause_at = pause_at
        self.pause_seconds = pause_seconds
        self.complete = complete

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        for index, frame in enumerate(self.frames):
            if index == self.pause_at:
                await self.pause(self.pause_seconds)
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        if self.pause_at is not None and self.pause_at >= len(self.frames):
            await self.pause(self.pause_seconds)
        if self.complete:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        # Otherwise returning here leaves the response incomplete, and uvicorn closes the connection
        # (it logs "ASGI callable returned without completing response").


class _TruncatedResponse(Response):
    """Sends the headers of `full`, including its Content-Length, then only the first half of its body."""

    def __init__(self, full: Response) -> None:
        super().__init__(status_code=full.status_code)
        self.full = full

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = bytes(self.full.body)
        await send({"type": "http.response.start", "status": self.full.status_code, "headers": self.full.raw_headers})
        await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})


@dataclass
class _StreamFrames:
    """The frames of a complete stream, and where the text deltas sit in it."""

    protocol: _Protocol
    frames: list[bytes]
    first_delta: int
    delta_ends: list[int]

    def position_after(self, delta_count: int) -> int:
        """Return the frame index just after the first `delta_count` text deltas."""
        if delta_count <= 0 or not self.delta_ends:
            return self.first_delta
        return self.delta_ends[min(delta_count, len(self.delta_ends)) - 1]


# -- the server ----------------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """A uvicorn server that reports when it is listening, and the event loop it runs on."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[asyncio.AbstractEventLoop], None]) -> None:
        super().__init__(config)
        self.on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.on_started(asyncio.get_running_loop())


class FakeProvider:
    """An OpenAI-compatible and Anthropic provider served by uvicorn in a background thread.

    Call `start()` before use and `stop()` after, or use it as a context manager. Test code sets the
    public attributes from its own thread while the server runs. `reset()` restores their defaults.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._rules: list[ScriptedFailure] = []
        self._queued_replies: list[str] = []
        self._images: dict[str, bytes] = {}
        self._image_counter = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._release: asyncio.Event | None = None
        self._ready = threading.Event()
        self._set_defaults()
        self.app = Starlette(routes=self._routes())

    def _set_defaults(self) -> None:
        # Keys accepted by both protocols. With require_api_key False any key, or none, is accepted.
        self.valid_keys: set[str] = {VALID_API_KEY, VALID_ANTHROPIC_API_KEY}
        self.require_api_key = True
        self.openai_models = default_openai_models()
        self.anthropic_models = default_anthropic_models()
        self.model_list_shape: ModelListShape = "data"
        # When set, `GET /openai/v1/models` returns this JSON value as it is, whatever the shape.
        self.model_list_body: Any = None
        self.reply_text = DEFAULT_REPLY_TEXT
        # Chunks for streamed replies. None streams `reply_text` split at word boundaries.
        self.stream_chunks: list[str] | None = None
        self.finish_reason = "stop"
        self.stop_reason = "end_turn"
        # Token counts to report. None counts the words of the prompt or the reply.
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        # False leaves `usage` out of OpenAI replies and streams, as some compatible providers do.
        self.include_usage = True
        # OpenAI-compatible request fields rejected with 400 "Unrecognized request argument supplied".
        self.rejected_parameters: set[str] = set()
        # True rejects chat requests for a model that is not in the catalogue with 404.
        self.reject_unknown_models = False
        # Size in pixels and format of generated images.
        self.image_width = 8
        self.image_height = 8
        self.image_format: ImageFormat = "PNG"
        # When set, both image endpoints return this JSON value as it is, after checking the request.
        self.image_response_override: Any = None
        # When set, both image endpoints return "url" or "b64_json" items whatever the request contains, like
        # servers that ignore `response_format`. gpt-image-1 still returns base64.
        self.image_response_format: Literal["url", "b64_json"] | None = None
        # True applies each OpenAI image model's own rules (see OPENAI_IMAGE_MODELS) to image requests.
        self.strict_image_models = False
        # The body of `GET /imagerouter/v1/models`, returned as it is.
        self.imagerouter_models: Any = default_imagerouter_models()
        # When set, ImageRouter responses report this `cost` instead of the model's price times the images.
        self.imagerouter_cost: Any = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The server's root URL, e.g. `http://127.0.0.1:54321`."""
        if self._port is None:
            raise RuntimeError("FakeProvider is not running: call start() first")
        return f"http://127.0.0.1:{self._port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.url}/openai/v1"

    @property
    def anthropic_base_url(self) -> str:
        return f"{self.url}/anthropic"

    @property
    def imagerouter_base_url(self) -> str:
        return f"{self.url}/imagerouter/v1/openai"

    def start(self) -> None:
        """Start serving on a free port of 127.0.0.1 and return once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("FakeProvider is already running")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        self._port = listener.getsockname()[1]

        # log_config=None keeps uvicorn from reconfiguring the test process's logging.
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=2,
        )
        self._ready.clear()
        self._server = _Server(config, self._on_started)
        self._thread = threading.Thread(target=self._serve, args=(listener,), name="fake-provider", daemon=True)
        self._thread.start()

        if not self._ready.wait(_START_TIMEOUT_SECONDS) or not self._server.started:
            self._server.should_exit = True
            self._thread.join(_STOP_TIMEOUT_SECONDS)
            self._server = None
            self._thread = None
            self._port = None
            raise RuntimeError(
                f"FakeProvider failed to start within {_START_TIMEOUT_SECONDS} s (the uvicorn log shows why)"
            )

    def _serve(self, listener: socket.socket) -> None:
        assert self._server is not None
        try:
            self._server.run(sockets=[listener])
        finally:
            listener.close()
            self._ready.set()  # wakes start() when the server exits before it started

    def _on_started(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._release = asyncio.Event()
        self._ready.set()

    def stop(self) -> None:
        """Release paused responses, stop the server and wait for its thread to end."""
        if self._server is None or self._thread is None:
            return
        self._release_pauses()
        self._server.should_exit = True
        self._thread.join(_STOP_TIMEOUT_SECONDS)
        if self._thread.is_alive():
            raise RuntimeError(f"FakeProvider did not stop within {_STOP_TIMEOUT_SECONDS} s")
        self._server = None
        self._thread = None
        self._loop = None
        self._release = None
        self._port = None

    def __enter__(self) -> FakeProvider:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Restore the default settings and forget requests, rules, queued replies and generated images.

        Responses that a rule paused are released at once.
        """
        with self._condition:
            self._requests.clear()
            self._rules.clear()
            self._queued_replies.clear()
            self._images.clear()
            self._set_defaults()
        self._release_pauses()

    async def _pause(self, seconds: float) -> None:
        """Wait `seconds`, or less when `reset()` or `stop()` releases paused responses."""
        release = self._release
        if release is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), seconds)

    def _release_pauses(self) -> None:
        loop = self._loop
        if loop is None or not loop.is_running():
            return

        async def swap_release_event() -> None:
            released = self._release
            self._release = asyncio.Event()
            if released is not None:
                released.set()

        # Wait until the swap ran, so a request sent after reset() can't be released by it.
        asyncio.run_coroutine_threadsafe(swap_release_event(), loop).result(_STOP_TIMEOUT_SECONDS)

    # -- scripting -------------------------------------------------------------------------------------------

    def fail_next(
        self,
        path_suffix: str | None = None,
        *,
        status: int | None = None,
        times: int | None = 1,
        method: str | None = None,
        retry_after: float | str | None = None,
        delay_seconds: float = 0.0,
        malformed_json: bool = False,
        redirect_to: str | None = None,
        truncate_body: bool = False,
        break_stream_after: int | None = None,
        stream_error_after: int | None = None,
        stall_stream_after: int | None = None,
        error_type: str | None = None,
        error_code: str | None = None,
        message: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> ScriptedFailure:
        """Make the next `times` requests whose path ends with `path_suffix` misbehave (None: every path).

        Choose one outcome:

        * `status`: that status with the protocol's error body (`error_type`, `error_code` and `message`
          override its fields). `retry_after` adds a Retry-After header.
        * `redirect_to`: a redirect (`status` 301, 302, 303, 307 or 308, default 302) to that Location.
          The fake never requests the target.
        * `malformed_json`: 200 with a body that is not JSON (for a streaming request, an event stream
          whose first data line is not JSON).
        * `truncate_body`: the normal response with its body cut in half and the connection closed.
          Matches only requests that do not stream.
        * `break_stream_after=N`: the stream stops after N text deltas, and the connection is closed
          without `[DONE]` or `message_stop`.
        * `stream_error_after=N`: an error event after N text deltas, then the stream ends. The error is
          Anthropic's `overloaded_error` or OpenAI's `server_error` unless `error_type` or `message` is given.
        * `stall_stream_after=N`: the stream pauses for `delay_seconds` after N text deltas, then finishes.

        `headers` adds response headers to whatever the rule sends. The three stream outcomes match only
        requests with `"stream": true`. `delay_seconds` on its own sends the normal response late, and with
        another outcome it waits before that outcome. A waiting response does not hold up other requests.
        `times=None` applies the rule until `reset()`. Rules are tried in the order they were added, and
        each request consumes at most one.
        """
        outcomes = [
            status is not None and redirect_to is None,
            redirect_to is not None,
            malformed_json,
            truncate_body,
            break_stream_after is not None,
            stream_error_after is not None,
            stall_stream_after is not None,
        ]
        if sum(outcomes) > 1:
            raise ValueError(
                "fail_next() takes one outcome: status, redirect_to, malformed_json, truncate_body, "
                "break_stream_after, stream_error_after or stall_stream_after"
            )
        if sum(outcomes) == 0 and delay_seconds <= 0:
            raise ValueError("fail_next() needs an outcome or a positive delay_seconds")
        if stall_stream_after is not None and delay_seconds <= 0:
            raise ValueError("stall_stream_after needs a positive delay_seconds, the length of the stall")
        if redirect_to is not None and status is not None and status not in {301, 302, 303, 307, 308}:
            raise ValueError(f"redirect status must be 301, 302, 303, 307 or 308, got {status}")
        if times is not None and times < 1:
            raise ValueError(f"times must be at least 1 or None, got {times}")

        rule = ScriptedFailure(
            path_suffix=path_suffix,
            method=method,
            remaining=times,
            status=status,
            retry_after=retry_after,
            delay_seconds=delay_seconds,
            malformed_json=malformed_json,
            redirect_to=redirect_to,
            truncate_body=truncate_body,
            break_stream_after=break_stream_after,
            stream_error_after=stream_error_after,
            stall_stream_after=stall_stream_after,
            error_type=error_type,
            error_code=error_code,
            message=message,
            headers=dict(headers or {}),
        )
        with self._condition:
            self._rules.append(rule)
        return rule

    def queue_replies(self, *texts: str) -> None:
        """Use these texts, one per chat request of either protocol, before falling back to `reply_text`."""
        with self._condition:
            self._queued_replies.extend(texts)

    def _take_rule(self, record: RecordedRequest) -> ScriptedFailure | None:
        with self._condition:
            for rule in self._rules:
                if not rule.matches(record):
                    continue
                if rule.remaining is not None:
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._rules.remove(rule)
                return rule
        return None

    def _next_reply(self) -> tuple[str, list[str]]:
        """Return the reply text and its stream chunks for one chat request."""
        with self._condition:
            if self._queued_replies:
                text = self._queued_replies.pop(0)
                return text, split_into_chunks(text)
        chunks = self.stream_chunks if self.stream_chunks is not None else split_into_chunks(self.reply_text)
        return self.reply_text, list(chunks)

    # -- recorded requests and images ------------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received since the last `reset()`, oldest first."""
        with self._condition:
            return list(self._requests)

    def requests_to(self, path_suffix: str) -> list[RecordedRequest]:
        """The recorded requests whose path ends with `path_suffix`."""
        return [record for record in self.requests if record.path.endswith(path_suffix)]

    def last_request(self, path_suffix: str = "") -> RecordedRequest:
        """The most recent request whose path ends with `path_suffix`. Raises LookupError when there is none."""
        matching = self.requests_to(path_suffix)
        if not matching:
            seen = [f"{record.method} {record.path}" for record in self.requests]
            raise LookupError(f"no request to a path ending with {path_suffix!r} was received (received: {seen})")
        return matching[-1]

    def wait_for_requests(
        self, path_suffix: str = "", *, count: int = 1, timeout: float = 5.0
    ) -> list[RecordedRequest]:
        """Block until `count` requests to paths ending with `path_suffix` have arrived, and return them all.

        Raises TimeoutError after `timeout` seconds. From async code, run it in a thread
        (`await asyncio.to_thread(fake.wait_for_requests, ...)`) so the event loop can send the requests.
        """

        def matching() -> list[RecordedRequest]:
            return [record for record in self._requests if record.path.endswith(path_suffix)]

        with self._condition:
            if not self._condition.wait_for(lambda: len(matching()) >= count, timeout):
                raise TimeoutError(
                    f"expected {count} request(s) to a path ending with {path_suffix!r} within {timeout} s, "
                    f"received {len(matching())}"
                )
            return matching()

    @property
    def generated_images(self) -> dict[str, bytes]:
        """A copy of the image files generated since the last `reset()`, by file name."""
        with self._condition:
            return dict(self._images)

    def image_url(self, name: str) -> str:
        return f"{self.url}/files/{name}"

    # -- routing ---------------------------------------------------------------------------------------------

    def _routes(self) -> list[Route]:
        def route(
            path: str, methods: list[str] | None, protocol: _Protocol, handler: _Handler, authenticate: bool = True
        ) -> Route:
            async def endpoint(request: Request) -> Response:
                return await self._dispatch(request, protocol, handler, authenticate)

            return Route(path, endpoint, methods=methods)

        return [
            route("/openai/v1/models", ["GET"], "openai", self._openai_models),
            route("/openai/v1/models/{model_id:path}", ["GET"], "openai", self._openai_model),
            route("/openai/v1/chat/completions", ["POST"], "openai", self._openai_chat),
            route("/openai/v1/images/generations", ["POST"], "openai", self._openai_images),
            route("/anthropic/v1/models", ["GET"], "anthropic", self._anthropic_models),
            route("/anthropic/v1/models/{model_id:path}", ["GET"], "anthropic", self._anthropic_model),
            route("/anthropic/v1/messages", ["POST"], "anthropic", self._anthropic_messages),
            route("/imagerouter/v1/models", ["GET"], "openai", self._imagerouter_models, authenticate=False),
            route("/imagerouter/v1/openai/images/generations", ["POST"], "openai", self._imagerouter_images),
            route("/files/{name}", ["GET"], "plain", self._file, authenticate=False),
            # Unknown paths, and known paths with the wrong method, get the protocol's 404.
            route("/openai/{rest:path}", None, "openai", self._openai_not_found, authenticate=False),
            route("/anthropic/{rest:path}", None, "anthropic", self._anthropic_not_found, authenticate=False),
            route("/{rest:path}", None, "plain", self._plain_not_found, authenticate=False),
        ]

    async def _dispatch(self, request: Request, protocol: _Protocol, handler: _Handler, authenticate: bool) -> Response:
        """Record the request, apply a matching rule, check the key, and run the handler."""
        record = await self._record(request)
        rule = self._take_rule(record)
        if rule is None:
            return await self._respond(request, record, None, protocol, handler, authenticate)

        if rule.delay_seconds > 0 and rule.stall_stream_after is None:
            await self._pause(rule.delay_seconds)
        response = self._scripted_response(protocol, rule, record)
        if response is None:
            response = await self._respond(request, record, rule, protocol, handler, authenticate)
        for name, value in rule.headers.items():
            response.headers[name] = value
        if rule.truncate_body:
            return _TruncatedResponse(response)
        return response

    async def _respond(
        self,
        request: Request,
        record: RecordedRequest,
        rule: ScriptedFailure | None,
        protocol: _Protocol,
        handler: _Handler,
        authenticate: bool,
    ) -> Response:
        """Check the key or the Anthropic headers, then run the handler."""
        denied: Response | None = None
        if authenticate and protocol == "openai":
            denied = self._check_openai_key(record)
        elif authenticate and protocol == "anthropic":
            denied = self._check_anthropic_headers(record)
        if denied is not None:
            return denied
        return await handler(_Call(request, record, rule))

    async def _record(self, request: Request) -> RecordedRequest:
        raw = await request.body()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                body = None
        record = RecordedRequest(
            method=request.method,
            path=request.url.path,
            query=dict(request.query_params),
            headers={key.lower(): value for key, value in request.headers.items()},
            body=body,
            raw_body=raw,
            client_port=request.client.port if request.client else None,
        )
        with self._condition:
            self._requests.append(record)
            self._condition.notify_all()
        return record

    def _scripted_response(
        self, protocol: _Protocol, rule: ScriptedFailure, record: RecordedRequest
    ) -> Response | None:
        """Return the response that replaces normal handling, or None when the rule only changes it."""
        if rule.redirect_to is not None:
            return Response(status_code=rule.status or 302, headers={"location": rule.redirect_to})
        if rule.status is not None:
            return _scripted_error(protocol, rule, rule.status)
        if rule.malformed_json:
            return self._malformed_response(protocol, _is_streaming(record.body))
        return None

    def _malformed_response(self, protocol: _Protocol, streaming: bool) -> Response:
        if not streaming:
            return Response(b'{"id": "broken", "choices": [', media_type="application/json")
        if protocol == "anthropic":
            frames = [
                b"event: message_start\ndata: {not json\n\n",
                _sse_event("message_stop", {"type": "message_stop"}),
            ]
        else:
            frames = [b'data: {"id": "broken", "choices": [\n\n', b"data: [DONE]\n\n"]
        return _EventStreamResponse(frames, pause=self._pause)

    def _key_is_valid(self, key: str | None) -> bool:
        return not self.require_api_key or (key is not None and key in self.valid_keys)

    def _check_openai_key(self, record: RecordedRequest) -> Response | None:
        authorization = record.headers.get("authorization")
        if not self.require_api_key:
            return None
        if authorization is None or not authorization.lower().startswith("bearer "):
            message = (
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            )
            return _openai_error(401, message)
        key = authorization[len("bearer ") :].strip()
        if self._key_is_valid(key):
            return None
        message = f"Incorrect API key provided: {_mask_key(key)}. You can find your API key in your account settings."
        return _openai_error(401, message, code="invalid_api_key")

    def _check_anthropic_headers(self, record: RecordedRequest) -> Response | None:
        key = record.headers.get("x-api-key")
        if self.require_api_key and key is None:
            return _anthropic_error(401, "authentication_error", "x-api-key header is required")
        if not self._key_is_valid(key):
            return _anthropic_error(401, "authentication_error", "invalid x-api-key")
        version = record.headers.get("anthropic-version")
        if version is None:
            return _anthropic_error(400, "invalid_request_error", "anthropic-version: header is required")
        if version not in ANTHROPIC_VERSIONS:
            return _anthropic_error(400, "invalid_request_error", f"anthropic-version: invalid version {version!r}")
        return None

    def _stream_response(self, stream: _StreamFrames, rule: ScriptedFailure | None) -> _EventStreamResponse:
        """Return the stream unchanged, or broken, ended by an error event or stalled, as the rule specifies."""
        if rule is not None and rule.break_stream_after is not None:
            cut = stream.position_after(rule.break_stream_after)
            return _EventStreamResponse(stream.frames[:cut], pause=self._pause, complete=False)
        if rule is not None and rule.stream_error_after is not None:
            cut = stream.position_after(rule.stream_error_after)
            frames = [*stream.frames[:cut], _stream_error_frame(stream.protocol, rule)]
            return _EventStreamResponse(frames, pause=self._pause)
        if rule is not None and rule.stall_stream_after is not None:
            return _EventStreamResponse(
                stream.frames,
                pause=self._pause,
                pause_at=stream.position_after(rule.stall_stream_after),
                pause_seconds=rule.delay_seconds,
            )
        return _EventStreamResponse(stream.frames, pause=self._pause)

    async def _file(self, call: _Call) -> Response:
        name = call.request.path_params["name"]
        with self._condition:
            data = self._images.get(name)
        if data is not None:
            extension = name.rsplit(".", 1)[-1]
            return Response(data, media_type=_IMAGE_MEDIA_TYPES.get(extension, "application/octet-stream"))

        sized = _SIZED_FILE.match(name)
        if sized is None:
            return Response(f"file {name} not found", status_code=404, media_type="text/plain")
        kind, size = sized.group(1), int(sized.group(2))
        if size > MAX_SIZED_FILE_BYTES:
            return Response(f"file {name} is larger than the fake serves", status_code=404, media_type="text/plain")
        if kind == "big":
            return Response(_sized_file_bytes(size), media_type="image/png")

        async def chunks() -> AsyncIterator[bytes]:
            body = _sized_file_bytes(size)
            for start in range(0, len(body), 64 * 1024):
                yield body[start : start + 64 * 1024]

        # A streamed body is sent chunked, without a Content-Length header.
        return StreamingResponse(chunks(), media_type="image/png")

    async def _plain_not_found(self, call: _Call) -> Response:
        return Response("Not Found", status_code=404, media_type="text/plain")

    # -- OpenAI-compatible endpoints -------------------------------------------------------------------------

    async def _openai_not_found(self, call: _Call) -> Response:
        path = call.record.path.removeprefix("/openai")
        return _openai_error(404, f"Invalid URL ({call.record.method} {path})")

    async def _openai_models(self, call: _Call) -> Response:
        if self.model_list_body is not None:
            return JSONResponse(self.model_list_body)
        return JSONResponse(render_openai_model_list(self.openai_models, self.model_list_shape))

    async def _openai_model(self, call: _Call) -> Response:
        model_id = call.request.path_params["model_id"]
        model = _find_model(self.openai_models, model_id)
        if model is None:
            message = f"The model '{model_id}' does not exist"
            return _openai_error(404, message, code="model_not_found", param="model")
        return JSONResponse(_openai_model_entry(model))

    def _check_openai_chat_request(self, body: Any) -> Response | None:
        if not isinstance(body, dict):
            message = "We could not parse the JSON body of your request. The body must be a JSON object."
            return _openai_error(400, message)
        rejected = sorted(self.rejected_parameters & body.keys())
        if rejected:
            return _openai_error(400, f"Unrecognized request argument supplied: {rejected[0]}")
        if not isinstance(body.get("model"), str) or not body["model"]:
            return _openai_error(400, "you must provide a model parameter")
        messages = body.get("messages")
        if messages is None:
            return _openai_error(
                400, "Missing required parameter: 'messages'.", code="missing_required_parameter", param="messages"
            )
        if not isinstance(messages, list) or not messages:
            message = "Invalid 'messages': expected a non-empty array."
            return _openai_error(400, message, code="invalid_value", param="messages")
        for index, item in enumerate(messages):
            if not isinstance(item, dict) or item.get("role") not in _OPENAI_ROLES:
                message = f"Invalid value for 'messages[{index}].role'."
                return _openai_error(400, message, code="invalid_value", param=f"messages[{index}].role")
        temperature = body.get("temperature")
        if temperature is not None and (not isinstance(temperature, int | float) or not 0 <= temperature <= 2):
            message = f"Invalid 'temperature': expected a number from 0 to 2, but got {temperature!r} instead."
            return _openai_error(400, message, code="invalid_value", param="temperature")
        if "stream" in body and not isinstance(body["stream"], bool):
            return _openai_error(
                400, "Invalid type for 'stream': expected a boolean.", code="invalid_type", param="stream"
            )
        return None

    async def _openai_chat(self, call: _Call) -> Response:
        body = call.record.body
        problem = self._check_openai_chat_request(body)
        if problem is not None:
            return problem

        model_id: str = body["model"]
        model = _find_model(self.openai_models, model_id)
        if model is None and self.reject_unknown_models:
            message = f"The model `{model_id}` does not exist or you do not have access to it."
            return _openai_error(404, message, code="model_not_found")

        counted_prompt_tokens = _prompt_tokens(body["messages"])
        requested = body.get("max_completion_tokens", body.get("max_tokens"))
        completion_limit = requested if isinstance(requested, int) else 0
        if model is not None and counted_prompt_tokens + completion_limit > model.context_length:
            message = _CONTEXT_LENGTH_MESSAGE.format(
                limit=model.context_length, used=counted_prompt_tokens + completion_limit
            )
            return _openai_error(400, message, code="context_length_exceeded", param="messages")

        text, chunks = self._next_reply()
        prompt_tokens = self.prompt_tokens if self.prompt_tokens is not None else counted_prompt_tokens
        completion_tokens = self.completion_tokens if self.completion_tokens is not None else count_tokens(text)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

        if body.get("stream") is True:
            stream_options = body.get("stream_options")
            wants_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
            stream = self._openai_stream_frames(model_id, chunks, usage if wants_usage else None)
            return self._stream_response(stream, call.rule)

        completion: dict[str, Any] = {
            "id": _new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": self.finish_reason,
                }
            ],
            "system_fingerprint": "fp_fake",
        }
        if self.include_usage:
            completion["usage"] = usage
        return JSONResponse(completion, headers={"x-request-id": _new_id("req_")})

    def _openai_stream_frames(self, model_id: str, chunks: list[str], usage: dict[str, int] | None) -> _StreamFrames:
        """Build a chat completion stream: a role chunk, one chunk per text delta, a finish chunk, an
        optional usage chunk, and `[DONE]`."""
        completion_id = _new_id("chatcmpl-")
        created = int(time.time())
        send_usage = usage is not None and self.include_usage

        def chunk(choices: list[Any], usage_value: Any = None) -> bytes:
            payload: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_id,
                "system_fingerprint": "fp_fake",
                "choices": choices,
            }
            if send_usage:
                payload["usage"] = usage_value  # null on every chunk but the last, as OpenAI sends it
            return _sse_data(payload)

        def choice(delta: dict[str, Any], finish_reason: str | None = None) -> list[Any]:
            return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

        frames = [chunk(choice({"role": "assistant", "content": "", "refusal": None}))]
        first_delta = len(frames)
        delta_ends: list[int] = []
        for text in chunks:
            frames.append(chunk(choice({"content": text})))
            delta_ends.append(len(frames))
        frames.append(chunk(choice({}, self.finish_reason)))
        if send_usage:
            frames.append(chunk([], usage))
        frames.append(b"data: [DONE]\n\n")

        return _StreamFrames("openai", frames, first_delta, delta_ends)

    async def _openai_images(self, call: _Call) -> Response:
        body = call.record.body
        if not isinstance(body, dict):
            message = "We could not parse the JSON body of your request. The body must be a JSON object."
            return _openai_error(400, message)
        rejected = sorted(self.rejected_parameters & body.keys())
        if rejected:
            message = f"Unknown parameter: '{rejected[0]}'."
            return _openai_error(400, message, code="unknown_parameter", param=rejected[0])
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return _openai_error(
                400, "Missing required parameter: 'prompt'.", code="missing_required_parameter", param="prompt"
            )
        count = body.get("n", 1)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 10:
            message = f"Invalid 'n': expected an integer from 1 to 10, but got {count!r} instead."
            return _openai_error(400, message, code="invalid_value", param="n")
        response_format = body.get("response_format", "url")
        if response_format not in {"url", "b64_json"}:
            message = f"Invalid value: {response_format!r}. Supported values are: 'url' and 'b64_json'."
            return _openai_error(400, message, code="invalid_value", param="response_format")
        model_id = body.get("model", DEFAULT_OPENAI_IMAGE_MODEL)
        if self.strict_image_models:
            problem = _openai_image_model_problem(body, model_id, prompt, count)
            if problem is not None:
                return problem
        if self.image_response_override is not None:
            return JSONResponse(self.image_response_override)

        # gpt-image-1 always returns base64. dall-e-3 rewrites every prompt and returns the rewrite.
        if self.image_response_format is not None:
            response_format = self.image_response_format
        always_base64 = model_id == "gpt-image-1"
        data: list[dict[str, str]] = []
        for _ in range(count):
            name, image = self._new_image()
            if response_format == "b64_json" or always_base64:
                item = {"b64_json": base64.b64encode(image).decode("ascii")}
            else:
                item = {"url": self.image_url(name)}
            if model_id == "dall-e-3":
                item["revised_prompt"] = revise_prompt(prompt)
            data.append(item)

        result: dict[str, Any] = {"created": int(time.time()), "data": data}
        if model_id == "gpt-image-1":
            result["usage"] = _gpt_image_usage(prompt, count, body.get("quality"), body.get("size"))
        return JSONResponse(result)

    def _new_image(self) -> tuple[str, bytes]:
        """Generate an image, store it under a new file name, and return both. Each image gets another colour."""
        with self._condition:
            self._image_counter += 1
            shade = (self._image_counter * 37) % 256
            image = make_image(self.image_width, self.image_height, (shade, 255 - shade, 128), self.image_format)
            name = f"img-{uuid.uuid4().hex[:16]}.{_IMAGE_EXTENSIONS[self.image_format]}"
            self._images[name] = image
        return name, image

    # -- ImageRouter endpoints -------------------------------------------------------------------------------

    async def _imagerouter_models(self, call: _Call) -> Response:
        return JSONResponse(self.imagerouter_models)

    async def _imagerouter_images(self, call: _Call) -> Response:
        """Generate one image the way ImageRouter's OpenAI-compatible endpoint does.

        Like ImageRouter, the fake ignores fields it does not know, `n` among them, so every request gets
        one image. Errors are 400 with an OpenAI-shaped body.
        """
        started = time.monotonic()
        body = call.record.body
        if not isinstance(body, dict):
            return _openai_error(400, "The request body must be a JSON object.")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return _openai_error(400, "'prompt' is a required parameter")
        model_id = body.get("model")
        if not isinstance(model_id, str) or not model_id:
            return _openai_error(400, "'model' is a required parameter")
        response_format = body.get("response_format", "url")
        if response_format not in {"url", "b64_json"}:
            return _openai_error(400, "'response_format' must be 'url' or 'b64_json'")
        if body.get("quality", "auto") not in IMAGEROUTER_QUALITIES:
            return _openai_error(400, "'quality' must be one of 'auto', 'low', 'medium' or 'high'")
        size = body.get("size", "auto")
        if size != "auto" and (not isinstance(size, str) or _IMAGEROUTER_SIZE.match(size) is None):
            return _openai_error(400, "'size' must be in the format 'WIDTHxHEIGHT' (e.g. '1024x768')")
        model = self.imagerouter_models.get(model_id) if isinstance(self.imagerouter_models, dict) else None
        if not isinstance(model, dict) or "image" not in model.get("output", []):
            return _openai_error(400, f"model '{model_id}' is not available")
        if self.image_response_override is not None:
            return JSONResponse(self.image_response_override)

        name, image = self._new_image()
        if (self.image_response_format or response_format) == "b64_json":
            item = {"b64_json": base64.b64encode(image).decode("ascii")}
        else:
            item = {"url": self.image_url(name)}
        cost = self.imagerouter_cost if self.imagerouter_cost is not None else _imagerouter_price(model)
        return JSONResponse(
            {
                "created": int(time.time()),
                "data": [item],
                "latency": int((time.monotonic() - started) * 1000),
                "cost": cost,
            }
        )

    # -- Anthropic endpoints ---------------------------------------------------------------------------------

    async def _anthropic_not_found(self, call: _Call) -> Response:
        return _anthropic_error(404, "not_found_error", "Not Found")

    async def _anthropic_models(self, call: _Call) -> Response:
        """List models a page at a time, with Anthropic's `limit`, `after_id` and `before_id` parameters."""
        query = call.record.query
        try:
            limit = int(query.get("limit", "20"))
        except ValueError:
            return _anthropic_error(400, "invalid_request_error", "limit: Input should be a valid integer")
        if not 1 <= limit <= 1000:
            return _anthropic_error(400, "invalid_request_error", "limit: Input should be between 1 and 1000")

        models = list(self.anthropic_models)
        ids = [model.id for model in models]
        # NOTE: for an unknown after_id or before_id the fake returns an empty page. What the real API
        # returns in that case is unverified.
        if "after_id" in query:
            start = ids.index(query["after_id"]) + 1 if query["after_id"] in ids else len(models)
            page = models[start : start + limit]
            has_more = start + limit < len(models)
        elif "before_id" in query:
            end = ids.index(query["before_id"]) if query["before_id"] in ids else 0
            page = models[max(0, end - limit) : end]
            has_more = end - limit > 0
        else:
            page = models[:limit]
            has_more = limit < len(models)

        return JSONResponse(
            {
                "data": [_anthropic_model_entry(model) for model in page],
                "has_more": has_more,
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
            }
        )

    async def _anthropic_model(self, call: _Call) -> Response:
        model_id = call.request.path_params["model_id"]
        model = _find_model(self.anthropic_models, model_id)
        if model is None:
            return _anthropic_error(404, "not_found_error", f"model: {model_id}")
        return JSONResponse(_anthropic_model_entry(model))

    async def _anthropic_messages(self, call: _Call) -> Response:
        body = call.record.body
        problem = _anthropic_request_problem(body)
        if problem is not None:
            return _anthropic_error(400, "invalid_request_error", problem)

        model_id: str = body["model"]
        model = _find_model(self.anthropic_models, model_id)
        if model is None and self.reject_unknown_models:
            return _anthropic_error(404, "not_found_error", f"model: {model_id}")
        max_tokens: int = body["max_tokens"]
        counted_input_tokens = _prompt_tokens(body["messages"], body.get("system"))
        if model is not None:
            problem = _anthropic_limit_problem(model, counted_input_tokens, max_tokens)
            if problem is not None:
                return _anthropic_error(400, "invalid_request_error", problem)

        text, chunks = self._next_reply()
        input_tokens = self.prompt_tokens if self.prompt_tokens is not None else counted_input_tokens
        output_tokens = self.completion_tokens if self.completion_tokens is not None else count_tokens(text)

        if body.get("stream") is True:
            stream = self._anthropic_stream_frames(model_id, chunks, input_tokens, output_tokens)
            return self._stream_response(stream, call.rule)

        message_id = _new_id("msg_")
        return JSONResponse(
            {
                "id": message_id,
                "type": "message",
                "role": "assistant",
                "model": model_id,
                "content": [{"type": "text", "text": text}],
                "stop_reason": self.stop_reason,
                "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
            },
            headers={"request-id": _new_id("req_")},
        )

    def _anthropic_stream_frames(
        self, model_id: str, chunks: list[str], input_tokens: int, output_tokens: int
    ) -> _StreamFrames:
        """Build a Messages stream: message_start, content_block_start, ping, one content_block_delta per
        text delta, content_block_stop, message_delta and message_stop."""
        message: dict[str, Any] = {
            "id": _new_id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": model_id,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": 1},
        }
        frames = [
            _sse_event("message_start", {"type": "message_start", "message": message}),
            _sse_event(
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            _sse_event("ping", {"type": "ping"}),
        ]
        first_delta = len(frames)
        delta_ends: list[int] = []
        for text in chunks:
            delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
            frames.append(_sse_event("content_block_delta", delta))
            delta_ends.append(len(frames))
        frames += [
            _sse_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _sse_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": output_tokens},
                },
            ),
            _sse_event("message_stop", {"type": "message_stop"}),
        ]
        return _StreamFrames("anthropic", frames, first_delta, delta_ends)


# -- Anthropic request validation ----------------------------------------------------------------------------


def _anthropic_request_problem(body: Any) -> str | None:
    """Return the invalid_request_error message Anthropic gives for this Messages request, or None if valid.

    NOTE: the fake rejects consecutive turns of the same role, as earlier API versions did. Newer versions
    may merge them instead (unverified). Either way, code under test must alternate roles, starting with user.
    """
    if not isinstance(body, dict):
        return "The request body is not valid JSON or is not a JSON object."
    extra = sorted(body.keys() - _ANTHROPIC_MESSAGE_FIELDS)
    if extra:
        return f"{extra[0]}: Extra inputs are not permitted"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required"
    if "max_tokens" not in body:
        return "max_tokens: Field required"
    max_tokens = body["max_tokens"]
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        return "max_tokens: Input should be a valid integer"
    if max_tokens < 1:
        return "max_tokens: Input should be greater than or equal to 1"
    if "stream" in body and not isinstance(body["stream"], bool):
        return "stream: Input should be a valid boolean"
    temperature = body.get("temperature")
    if temperature is not None and (not isinstance(temperature, int | float) or not 0 <= temperature <= 1):
        return "temperature: Input should be a number from 0 to 1"

    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        return "system: Input should be a valid string or a list of text blocks"
    if isinstance(system, list):
        for index, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
                return f"system.{index}: Input should be a text block"

    if "messages" not in body:
        return "messages: Field required"
    messages = body["messages"]
    if not isinstance(messages, list):
        return "messages: Input should be a valid list"
    if not messages:
        return "messages: at least one message is required"
    return _anthropic_messages_problem(messages)


def _anthropic_messages_problem(messages: list[Any]) -> str | None:
    previous_role: str | None = None
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages.{index}: Input should be a valid dictionary"
        role = message.get("role")
        if role == "system":
            return (
                'messages: Unexpected role "system". The Messages API accepts a top-level `system` parameter, '
                'not "system" as an input message role.'
            )
        if role not in {"user", "assistant"}:
            return f"messages.{index}.role: Input should be 'user' or 'assistant'"
        if index == 0 and role != "user":
            return 'messages: first message must use the "user" role'
        if role == previous_role:
            return (
                f'messages: roles must alternate between "user" and "assistant", '
                f'but found multiple "{role}" roles in a row'
            )
        previous_role = role

        is_final_assistant = index == len(messages) - 1 and role == "assistant"
        problem = _anthropic_content_problem(index, message.get("content"), is_final_assistant)
        if problem is not None:
            return problem
    return None


def _anthropic_content_problem(index: int, content: Any, is_final_assistant: bool) -> str | None:
    empty_message = (
        f"messages.{index}: all messages must have non-empty content except for the optional final assistant message"
    )
    if isinstance(content, str):
        if not content and not is_final_assistant:
            return empty_message
        if is_final_assistant and content != content.rstrip():
            return "messages: final assistant content cannot end with trailing whitespace"
        return None
    if not isinstance(content, list):
        return f"messages.{index}.content: Input should be a valid string or a list of content blocks"
    if not content and not is_final_assistant:
        return empty_message
    for block_index, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            return f"messages.{index}.content.{block_index}: Input should be a content block with a type"
        if block["type"] != "text":
            continue
        text = block.get("text")
        if not isinstance(text, str):
            return f"messages.{index}.content.{block_index}.text: Field required"
        if not text:
            return f"messages.{index}.content.{block_index}.text: text content blocks must be non-empty"
        if not text.strip():
            return f"messages.{index}.content.{block_index}.text: text content blocks must contain non-whitespace text"
    return None


def _anthropic_limit_problem(model: FakeModel, input_tokens: int, max_tokens: int) -> str | None:
    if model.max_output_tokens is not None and max_tokens > model.max_output_tokens:
        return (
            f"max_tokens: {max_tokens} > {model.max_output_tokens}, which is the maximum allowed number of "
            f"output tokens for {model.id}"
        )
    if input_tokens > model.context_length:
        return f"prompt is too long: {input_tokens} tokens > {model.context_length} maximum"
    if input_tokens + max_tokens > model.context_length:
        return (
            f"input length and `max_tokens` exceed context limit: {input_tokens} + {max_tokens} > "
            f"{model.context_length}, decrease input length or `max_tokens` and try again"
        )
    return None


# -- image helpers -------------------------------------------------------------------------------------------


def revise_prompt(prompt: str) -> str:
    """Return the rewritten prompt that the fake's dall-e-3 reports in `revised_prompt`."""
    return f"A detailed illustration of {prompt.strip()}"


def _openai_image_model_problem(body: dict[str, Any], model_id: Any, prompt: str, count: int) -> Response | None:
    """Return the 400 that OpenAI gives when the request breaks its model's rules, or None.

    NOTE: OpenAI's exact status and wording for an unknown image model are unverified. The fake returns
    400 invalid_value on `model`, as it does for other invalid values.
    """
    model = OPENAI_IMAGE_MODELS.get(model_id) if isinstance(model_id, str) else None
    if model is None:
        supported = ", ".join(f"'{name}'" for name in OPENAI_IMAGE_MODELS)
        message = f"Invalid value: {model_id!r}. Supported values are: {supported}."
        return _openai_error(400, message, code="invalid_value", param="model")

    unknown = sorted(model.unknown_parameters & body.keys())
    if unknown:
        return _openai_error(400, f"Unknown parameter: '{unknown[0]}'.", code="unknown_parameter", param=unknown[0])
    if len(prompt) > model.max_prompt_length:
        message = (
            f"Invalid 'prompt': string too long. Expected a string with maximum length {model.max_prompt_length}, "
            f"but got a string with length {len(prompt)} instead."
        )
        return _openai_error(400, message, code="string_above_max_length", param="prompt")
    if count > model.max_images:
        message = f"Invalid 'n': integer above maximum value. Expected a value <= {model.max_images}, but got {count}."
        return _openai_error(400, message, code="integer_above_max_value", param="n")

    for param, accepted in (("size", model.sizes), ("quality", model.qualities), ("style", model.styles)):
        value = body.get(param)
        if value is not None and value not in accepted:
            supported = ", ".join(f"'{name}'" for name in accepted)
            message = f"Invalid value: {value!r}. Supported values are: {supported}."
            return _openai_error(400, message, code="invalid_value", param=param)
    return None


def _gpt_image_usage(prompt: str, count: int, quality: Any, size: Any) -> dict[str, Any]:
    """Build gpt-image-1's `usage` block: prompt words as text tokens, and output tokens from the table."""
    priced_quality = quality if quality in {"low", "medium", "high"} else "medium"
    priced_size = size if size in {"1024x1536", "1536x1024"} else "1024x1024"
    input_tokens = count_tokens(prompt)
    output_tokens = GPT_IMAGE_OUTPUT_TOKENS[(priced_quality, priced_size)] * count
    return {
        "total_tokens": input_tokens + output_tokens,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_tokens_details": {"text_tokens": input_tokens, "image_tokens": 0},
    }


def _imagerouter_price(model: dict[str, Any]) -> float:
    """Return the price ImageRouter charges for one image of `model`: the first provider's fixed value or
    range average, and 0 when it lists neither."""
    providers = model.get("providers")
    pricing = providers[0].get("pricing") if isinstance(providers, list) and providers else None
    if not isinstance(pricing, dict):
        return 0.0
    if isinstance(pricing.get("value"), int | float):
        return float(pricing["value"])
    price_range = pricing.get("range")
    if isinstance(price_range, dict) and isinstance(price_range.get("average"), int | float):
        return float(price_range["average"])
    return 0.0


# Files above this size are not served by `/files/big-{N}.png` and `/files/stream-{N}.png`.
MAX_SIZED_FILE_BYTES = 256 * 1024 * 1024


def _sized_file_bytes(size: int) -> bytes:
    """Return `size` bytes that start with the PNG signature (the rest is zeros, so not a valid PNG)."""
    signature = b"\x89PNG\r\n\x1a\n"
    return (signature + bytes(max(0, size - len(signature))))[:size]


# -- pytest fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fake_provider_server() -> Iterator[FakeProvider]:
    """One running FakeProvider for the whole test session. Tests should use `fake_provider` instead."""
    with FakeProvider() as fake:
        yield fake


@pytest.fixture
def fake_provider(fake_provider_server: FakeProvider) -> FakeProvider:
    """The session's FakeProvider, reset to its defaults for this test."""
    fake_provider_server.reset()
    return fake_provider_server
