"""What is sent to the model: the system prompt, then as much recent history as fits the context window.

Token counts here are estimates (about four characters per token, plus a few tokens of framing per
message), because tokenizers differ per model and none ships with the server. The estimate errs high for
English text; a prompt the provider still finds too long comes back as 400 `context_length_exceeded`.
"""

from __future__ import annotations

from collections.abc import Sequence

from pocketllm.providers.chat import ChatMessage

# Used when neither the model configuration nor the catalogue gave a context window: small enough for
# most local models.
DEFAULT_CONTEXT_WINDOW = 8192
DEFAULT_MAX_TOKENS = 2048
_CHARACTERS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4


def estimate_tokens(text: str) -> int:
    return -(-len(text) // _CHARACTERS_PER_TOKEN) + _TOKENS_PER_MESSAGE


def output_limit(configured: int | None, model_maximum: int | None, context_window: int) -> int:
    """Return the `max_tokens` to request: the configured value, else the default, never above the model's
    maximum and never more than half the context window, so that some history always fits."""
    limit = configured or DEFAULT_MAX_TOKENS
    if model_maximum:
        limit = min(limit, model_maximum)
    return max(1, min(limit, context_window // 2))


def fit_history(
    newest_first: Sequence[Sequence[str]],
    *,
    system_prompt: str | None,
    new_message: str,
    context_window: int,
    max_tokens: int,
) -> list[ChatMessage]:
    """Return the newest earlier messages that fit, oldest first, followed by the new user message.

    `newest_first` contains (role, content) rows, the newest first, as the history query returns them.

    The new message is always included, even when it alone exceeds the budget: only the provider can
    count the tokens exactly.
    """
    budget = context_window - max_tokens - estimate_tokens(new_message)
    if system_prompt:
        budget -= estimate_tokens(system_prompt)

    kept: list[ChatMessage] = []
    for role, content in newest_first:
        if role not in ("user", "assistant", "system") or not content.strip():
            continue
        cost = estimate_tokens(content)
        if cost > budget:
            break
        budget -= cost
        kept.append(ChatMessage(role, content))  # type: ignore[arg-type]
    kept.reverse()
    kept.append(ChatMessage(role="user", content=new_message))
    return kept


def derive_title(content: str, max_length: int = 60) -> str:
    """Derive a title from the first line of a message, whitespace collapsed and cut at a word boundary."""
    first_line = next((line for line in content.splitlines() if line.strip()), content)
    title = " ".join(first_line.split())
    if len(title) <= max_length:
        return title
    cut = title[: max_length - 1].rsplit(" ", 1)[0] or title[: max_length - 1]
    return cut + "…"
