"""OpenAI-compatible APIs (OpenAI, Groq, OpenRouter, Mistral, Gemini's OpenAI endpoint, Ollama, ...)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import httpx

from pocketllm.errors import PocketLLMError
from pocketllm.kit.sse import SseEvent
from pocketllm.providers.chat import (
    ChatRequest,
    ChatResult,
    ContentDelta,
    StreamEnd,
    StreamProgress,
    TokenUsage,
    context_length_error,
    is_json_response,
    parse_json,
    read_json_body,
    read_sse_events,
    read_to_end,
    selected_parameters,
    stream_with_end,
    token_count,
)
from pocketllm.providers.errors import ProviderAuthFailed, ProviderRateLimited, ProviderRequestFailed
from pocketllm.providers.http import ErrorMapper, JsonBody, ProviderHttp, scrub_secret
from pocketllm.providers.registry import ProviderSpec

if TYPE_CHECKING:
    # A runtime import would be circular, because the catalogue module imports this one.
    from pocketllm.providers.catalogue import ProviderTarget


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def list_models(
    http: ProviderHttp, *, provider: str, models_url: str, api_key: str | None, timeout: float
) -> list[Any]:
    """Fetch the raw model list. Accepts `{"data": [...]}` and a bare array (Together answers with one)."""
    body = await http.request_json(
        "GET", models_url, provider=provider, secret=api_key, headers=auth_headers(api_key), timeout=timeout
    )
    if isinstance(body, dict):
        body = body.get("data", body.get("models"))
    return body if isinstance(body, list) else []


# -- chat completions ----------------------------------------------------------------------------------------


def chat_url(target: ProviderTarget) -> str:
    return f"{target.base_url.rstrip('/')}/chat/completions"


def build_chat_body(spec: ProviderSpec, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
    """Build a chat completion request with only the fields that the provider accepts according to `spec`."""
    messages: list[dict[str, str]] = []
    if request.system_prompt and request.system_prompt.strip():
        messages.append({"role": "system", "content": request.system_prompt})
    messages.extend({"role": message.role, "content": message.content} for message in request.messages)

    body: dict[str, Any] = {
        "model": request.model,
        "messages": messages,
        spec.max_tokens_field: request.parameters.max_tokens,
    }
    body.update(selected_parameters(spec, request.parameters))
    if stream:
        body["stream"] = True
        if spec.stream_usage_option:
            body["stream_options"] = {"include_usage": True}
    return body


async def complete_chat(http: ProviderHttp, target: ProviderTarget, request: ChatRequest) -> ChatResult:
    body = await http.request_json(
        "POST",
        chat_url(target),
        provider=target.provider,
        secret=target.api_key,
        headers=auth_headers(target.api_key),
        json=build_chat_body(target.spec, request, stream=False),
        map_error=_context_length_mapper(target, request.model),
    )
    return parse_completion(body, target=target, model=request.model)


def stream_chat(
    http: ProviderHttp, target: ProviderTarget, request: ChatRequest
) -> AsyncGenerator[ContentDelta | StreamEnd, None]:
    progress = StreamProgress()
    pieces = _stream_text(http, target, request, progress)
    return stream_with_end(pieces, progress, provider=target.provider)


async def _stream_text(
    http: ProviderHttp, target: ProviderTarget, request: ChatRequest, progress: StreamProgress
) -> AsyncGenerator[str, None]:
    """Yield the text of each stream chunk, recording the finish reason, usage and model in `progress`."""
    model = request.model
    json_body = JsonBody(build_chat_body(target.spec, request, stream=True))
    # The stream can stay open for minutes and the prompt can be large, so this frame lets go of it. The
    # encoded body is the only copy left, and it goes once it is sent.
    del request
    async with http.stream(
        "POST",
        chat_url(target),
        provider=target.provider,
        secret=target.api_key,
        headers=auth_headers(target.api_key),
        json_body=json_body,
        map_error=_context_length_mapper(target, model),
    ) as response:
        if is_json_response(response):
            body = await read_json_body(response, provider=target.provider)
            result = parse_completion(body, target=target, model=model)
            progress.finish_reason, progress.usage, progress.model = result.finish_reason, result.usage, result.model
            progress.finished = True
            yield result.content
            return

        async with aclosing(read_sse_events(response, provider=target.provider)) as events:
            async for event in events:
                if event.data.strip() == "[DONE]":
                    progress.finished = True
                    await read_to_end(events, response)
                    return
                # Parsed in a function, so that this generator keeps no reference to the decoded chunk while it waits.
                yield _read_event(event, progress, target=target, model=model)


def _read_event(event: SseEvent, progress: StreamProgress, *, target: ProviderTarget, model: str) -> str:
    """Decode a stream event and return its text. An error event raises a domain error."""
    chunk = parse_json(event.data, provider=target.provider, description="a stream event")
    if not isinstance(chunk, dict):
        return ""
    if event.event == "error" or chunk.get("error") is not None:
        raise _error_from_object(chunk.get("error", chunk), target=target, model=model)
    return _read_chunk(chunk, progress)


def _read_chunk(chunk: dict[str, Any], progress: StreamProgress) -> str:
    """Record a stream chunk's model, usage and finish reason in `progress`, and return its text."""
    model = chunk.get("model")
    if isinstance(model, str) and model:
        progress.model = model
    usage = parse_usage(chunk)
    if usage is not None:
        progress.usage = usage

    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return ""
    texts: list[str] = []
    for choice in choices:
        # Only the first choice is read, because requests never ask for more than one (`n`).
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            texts.append(_content_text(delta.get("content")))
        finish_reason = choice.get("finish_reason")
        if isinstance(finish_reason, str) and finish_reason:
            progress.finish_reason = finish_reason
            progress.finished = True
    return "".join(texts)


def parse_completion(body: Any, *, target: ProviderTarget, model: str) -> ChatResult:
    """Read a chat completion body. An error object or a body without choices raises a domain error."""
    provider = target.provider
    if not isinstance(body, dict):
        raise ProviderRequestFailed(f"{provider} returned a chat completion that is not a JSON object.")
    choices = body.get("choices")
    if body.get("error") is not None and not choices:
        raise _error_from_object(body["error"], target=target, model=model)
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ProviderRequestFailed(f"{provider} returned a chat completion without choices.")

    choice = choices[0]
    message = choice.get("message")
    content = _content_text(message.get("content")) if isinstance(message, dict) else ""
    finish_reason = choice.get("finish_reason")
    reply_model = body.get("model")
    return ChatResult(
        content=content,
        finish_reason=finish_reason if isinstance(finish_reason, str) and finish_reason else None,
        usage=parse_usage(body),
        model=reply_model if isinstance(reply_model, str) and reply_model else None,
    )


def parse_usage(payload: dict[str, Any]) -> TokenUsage | None:
    """Read `usage`, or Groq's `x_groq.usage` in streams. Returns None when no count is given."""
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        groq = payload.get("x_groq")
        usage = groq.get("usage") if isinstance(groq, dict) else None
    if not isinstance(usage, dict):
        return None

    prompt_tokens = token_count(usage.get("prompt_tokens"))
    completion_tokens = token_count(usage.get("completion_tokens"))
    total_tokens = token_count(usage.get("total_tokens"))
    if total_tokens is None and prompt_tokens is not None and completion_tokens is not None:
        total_tokens = prompt_tokens + completion_tokens
    if prompt_tokens is None and completion_tokens is None and total_tokens is None:
        return None
    return TokenUsage(prompt_tokens, completion_tokens, total_tokens)


def _content_text(content: Any) -> str:
    """Return message content given as a string, null, or a list of parts (Mistral sends text and thinking parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        )
    return ""


def _is_context_length_error(code: Any, message: str) -> bool:
    lowered = message.lower()
    return (
        code == "context_length_exceeded" or "maximum context length" in lowered or "context_length_exceeded" in lowered
    )


def _context_length_mapper(target: ProviderTarget, model: str) -> ErrorMapper:
    """Map a 4xx response reporting that the prompt exceeds the context window to ContextLengthExceeded."""

    def map_error(response: httpx.Response) -> PocketLLMError | None:
        if not 400 <= response.status_code < 500:
            return None
        try:
            body: Any = response.json()
        except ValueError:
            return None
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return None
        message = error.get("message")
        message = message if isinstance(message, str) else ""
        if not _is_context_length_error(error.get("code"), message):
            return None
        return context_length_error(target.provider, model, scrub_secret(message, target.api_key))

    return map_error


def _error_from_object(error: Any, *, target: ProviderTarget, model: str) -> PocketLLMError:
    """Map an error object sent with a 200 status, in a body or a stream event, to a domain error.

    OpenAI-compatible servers send `{"message", "type", "code"}`, where OpenRouter's code is an HTTP status.
    """
    provider = target.provider
    message: Any = error
    code: Any = None
    error_type: Any = None
    if isinstance(error, dict):
        message, code, error_type = error.get("message"), error.get("code"), error.get("type")
    message = message if isinstance(message, str) else ""
    detail = scrub_secret(message, target.api_key)

    if _is_context_length_error(code, message):
        return context_length_error(provider, model, detail)
    if code in (401, 403, "401", "403", "invalid_api_key") or error_type == "authentication_error":
        return ProviderAuthFailed(f"{provider} rejected the API key; check the key and save it again.")
    if code in (429, "429", "rate_limit_exceeded") or error_type in ("rate_limit_error", "requests", "tokens"):
        return ProviderRateLimited(f"{provider} is rate-limiting requests with this key; try again later.")
    suffix = f": {detail}" if detail else "."
    return ProviderRequestFailed(f"{provider} reported an error{suffix}")
