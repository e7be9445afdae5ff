"""Anthropic's Messages API."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

import httpx

from pocketllm.errors import InvalidInput, PocketLLMError
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
from pocketllm.providers.errors import ProviderAuthFailed, ProviderRateLimited, ProviderRequestFailed, ProviderTimeout
from pocketllm.providers.http import ErrorMapper, JsonBody, ProviderHttp, scrub_secret
from pocketllm.providers.registry import ProviderSpec

if TYPE_CHECKING:
    # A runtime import would be circular, because the catalogue module imports this one.
    from pocketllm.providers.catalogue import ProviderTarget

ANTHROPIC_VERSION = "2023-06-01"
_MAX_MODEL_PAGES = 10


def auth_headers(api_key: str | None) -> dict[str, str]:
    headers = {"anthropic-version": ANTHROPIC_VERSION}
    if api_key:
        headers["x-api-key"] = api_key
    return headers


async def list_models(
    http: ProviderHttp, *, provider: str, models_url: str, api_key: str | None, timeout: float
) -> list[Any]:
    """Fetch every page of the model list (at most ten pages of 1000)."""
    models: list[Any] = []
    params: dict[str, Any] = {"limit": 1000}
    for _ in range(_MAX_MODEL_PAGES):
        body = await http.request_json(
            "GET",
            models_url,
            provider=provider,
            secret=api_key,
            headers=auth_headers(api_key),
            params=params,
            timeout=timeout,
        )
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            break
        models.extend(body["data"])
        last_id = body.get("last_id")
        if not body.get("has_more") or not isinstance(last_id, str):
            break
        params = {"limit": 1000, "after_id": last_id}
    return models


# -- messages ------------------------------------------------------------------------------------------------

# Anthropic error types that map to ProviderAuthFailed. Rate limits, timeouts and prompts that are too long
# have their own errors too, and the others (api_error, overloaded_error, ...) map to ProviderRequestFailed.
_AUTH_ERROR_TYPES = frozenset({"authentication_error", "permission_error"})


def messages_url(target: ProviderTarget) -> str:
    return f"{target.base_url.rstrip('/')}/v1/messages"


def build_messages_body(spec: ProviderSpec, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
    """Build a Messages request that the API accepts for any conversation with some user text.

    System text goes to the top-level `system` field. Empty turns are dropped, the conversation starts
    with the first user turn, and consecutive turns of one role are merged, because the API requires
    non-empty content and alternating roles starting with `user`. Raises InvalidInput when no user text
    is left.
    """
    system_parts = [request.system_prompt] if request.system_prompt and request.system_prompt.strip() else []
    turns: list[dict[str, str]] = []
    for message in request.messages:
        if not message.content.strip():
            continue
        if message.role == "system":
            system_parts.append(message.content)
        elif turns and turns[-1]["role"] == message.role:
            turns[-1]["content"] += "\n\n" + message.content
        elif turns or message.role == "user":
            turns.append({"role": message.role, "content": message.content})
    if not turns:
        raise InvalidInput("The conversation has no user message with text to send; write a message first.")
    if turns[-1]["role"] == "assistant":
        # NOTE: the API continues a final assistant turn instead of replying to it (a "prefill"), and rejects
        # one that ends in whitespace. Chats normally end with the user's new message.
        turns[-1]["content"] = turns[-1]["content"].rstrip()

    body: dict[str, Any] = {"model": request.model, "max_tokens": request.parameters.max_tokens, "messages": turns}
    if system_parts:
        body["system"] = "\n\n".join(system_parts)

    parameters = selected_parameters(spec, request.parameters)
    if "temperature" in parameters:
        parameters["temperature"] = min(max(parameters["temperature"], 0.0), 1.0)
        # Newer models (Claude Sonnet 4.5, Haiku 4.5, Opus 4.1) reject a request that sets both with
        # "`temperature` and `top_p` cannot both be specified for this model", as reported in
        # https://github.com/BerriAI/litellm/issues/15097. Temperature is kept.
        parameters.pop("top_p", None)
    body.update(parameters)
    if stream:
        body["stream"] = True
    return body


async def complete_chat(http: ProviderHttp, target: ProviderTarget, request: ChatRequest) -> ChatResult:
    body = await http.request_json(
        "POST",
        messages_url(target),
        provider=target.provider,
        secret=target.api_key,
        headers=auth_headers(target.api_key),
        json=build_messages_body(target.spec, request, stream=False),
        map_error=_context_length_mapper(target, request.model),
    )
    return parse_message(body, target=target, model=request.model)


def stream_chat(
    http: ProviderHttp, target: ProviderTarget, request: ChatRequest
) -> AsyncGenerator[ContentDelta | StreamEnd, None]:
    progress = StreamProgress()
    pieces = _stream_text(http, target, request, progress)
    return stream_with_end(pieces, progress, provider=target.provider)


async def _stream_text(
    http: ProviderHttp, target: ProviderTarget, request: ChatRequest, progress: StreamProgress
) -> AsyncGenerator[str, None]:
    """Yield the text of each `text_delta`, recording the stop reason, usage and model in `progress`."""
    model = request.model
    json_body = JsonBody(build_messages_body(target.spec, request, stream=True))
    # The stream can stay open for minutes and the prompt can be large, so this frame lets go of it. The
    # encoded body is the only copy left, and it goes once it is sent.
    del request
    async with http.stream(
        "POST",
        messages_url(target),
        provider=target.provider,
        secret=target.api_key,
        headers=auth_headers(target.api_key),
        json_body=json_body,
        map_error=_context_length_mapper(target, model),
    ) as response:
        if is_json_response(response):
            result = parse_message(await read_json_body(response, provider=target.provider), target=target, model=model)
            progress.finish_reason, progress.usage, progress.model = result.finish_reason, result.usage, result.model
            progress.finished = True
            yield result.content
            return

        usage: dict[str, Any] = {}
        async with aclosing(read_sse_events(response, provider=target.provider)) as events:
            async for event in events:
                payload = parse_json(event.data, provider=target.provider, description="a stream event")
                if not isinstance(payload, dict):
                    continue
                event_type = payload.get("type", event.event)
                if event_type == "error":
                    raise _error_from_object(payload.get("error"), target=target, model=model)
                if event_type == "message_stop":
                    progress.finished = True
                    await read_to_end(events, response)
                    return
                text = _read_event(event_type, payload, progress, usage)
                if text:
                    yield text


def _read_event(event_type: Any, payload: dict[str, Any], progress: StreamProgress, usage: dict[str, Any]) -> str:
    """Record a stream event in `progress`, and return the text it adds.

    `usage` collects the counts of message_start and message_delta. Event types not handled here (ping,
    content_block_start, content_block_stop, and those added to the API later) are ignored.
    """
    if event_type == "message_start":
        message = payload.get("message")
        if isinstance(message, dict):
            model = message.get("model")
            if isinstance(model, str) and model:
                progress.model = model
            if isinstance(message.get("usage"), dict):
                usage.update(message["usage"])
                progress.usage = parse_usage(usage)
    elif event_type == "content_block_delta":
        delta = payload.get("delta")
        # Other delta types (thinking, tool input JSON, signatures) carry no reply text.
        if isinstance(delta, dict) and delta.get("type") == "text_delta" and isinstance(delta.get("text"), str):
            text: str = delta["text"]
            return text
    elif event_type == "message_delta":
        delta = payload.get("delta")
        stop_reason = delta.get("stop_reason") if isinstance(delta, dict) else None
        if isinstance(stop_reason, str) and stop_reason:
            progress.finish_reason = stop_reason
            progress.finished = True
        # The counts in message_delta are cumulative, so they replace those of message_start.
        if isinstance(payload.get("usage"), dict):
            usage.update({key: value for key, value in payload["usage"].items() if value is not None})
            progress.usage = parse_usage(usage)
    return ""


def parse_message(body: Any, *, target: ProviderTarget, model: str) -> ChatResult:
    """Read a Messages response: the text blocks joined, the stop reason, usage and model."""
    provider = target.provider
    if not isinstance(body, dict):
        raise ProviderRequestFailed(f"{provider} returned a message that is not a JSON object.")
    if body.get("type") == "error":
        raise _error_from_object(body.get("error"), target=target, model=model)
    content = body.get("content")
    if not isinstance(content, list):
        raise ProviderRequestFailed(f"{provider} returned a message without content blocks.")

    text = "".join(
        block["text"]
        for block in content
        if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)
    )
    stop_reason = body.get("stop_reason")
    reply_model = body.get("model")
    usage = body.get("usage")
    return ChatResult(
        content=text,
        finish_reason=stop_reason if isinstance(stop_reason, str) and stop_reason else None,
        usage=parse_usage(usage) if isinstance(usage, dict) else None,
        model=reply_model if isinstance(reply_model, str) and reply_model else None,
    )


def parse_usage(usage: dict[str, Any]) -> TokenUsage | None:
    """Map Anthropic's counts to prompt and completion tokens. Returns None when no count is given.

    The prompt is `input_tokens` plus the cache write and read counts, which Anthropic reports apart.
    """
    input_counts = [
        token_count(usage.get(key))
        for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    ]
    prompt_tokens = sum(count for count in input_counts if count is not None) if input_counts[0] is not None else None
    completion_tokens = token_count(usage.get("output_tokens"))
    if prompt_tokens is None and completion_tokens is None:
        return None
    total_tokens = (
        prompt_tokens + completion_tokens if prompt_tokens is not None and completion_tokens is not None else None
    )
    return TokenUsage(prompt_tokens, completion_tokens, total_tokens)


def _is_context_length_error(error_type: Any, message: str) -> bool:
    lowered = message.lower()
    return error_type == "invalid_request_error" and (
        "prompt is too long" in lowered or "exceed context limit" in lowered
    )


def _context_length_mapper(target: ProviderTarget, model: str) -> ErrorMapper:
    """Map a 4xx invalid_request_error reporting that the prompt is too long to ContextLengthExceeded."""

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
        if not _is_context_length_error(error.get("type"), message):
            return None
        return context_length_error(target.provider, model, scrub_secret(message, target.api_key))

    return map_error


def _error_from_object(error: Any, *, target: ProviderTarget, model: str) -> PocketLLMError:
    """Map the `error` object of a stream `error` event or an error body sent with 200 to a domain error."""
    provider = target.provider
    error_type: Any = None
    message: Any = None
    if isinstance(error, dict):
        error_type, message = error.get("type"), error.get("message")
    message = message if isinstance(message, str) else ""
    detail = scrub_secret(message, target.api_key)

    if _is_context_length_error(error_type, message):
        return context_length_error(provider, model, detail)
    if error_type in _AUTH_ERROR_TYPES:
        return ProviderAuthFailed(f"{provider} rejected the API key; check the key and save it again.")
    if error_type == "rate_limit_error":
        return ProviderRateLimited(f"{provider} is rate-limiting requests with this key; try again later.")
    if error_type == "timeout_error":
        return ProviderTimeout(f"{provider} timed out while generating the reply; try again later.")
    kind = f" ({error_type})" if isinstance(error_type, str) and error_type else ""
    suffix = f": {detail}" if detail else "."
    return ProviderRequestFailed(f"{provider} reported an error{kind}{suffix}")
