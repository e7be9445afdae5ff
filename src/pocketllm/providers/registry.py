"""Every provider the server can talk to: how to reach it and what it can do."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pocketllm.errors import InvalidInput


class Protocol(StrEnum):
    """Wire protocol of a provider's API."""

    OPENAI = "openai"  # OpenAI-compatible chat completions and model list
    ANTHROPIC = "anthropic"  # Anthropic Messages API


class Capability(StrEnum):
    CHAT = "chat"
    IMAGES = "images"
    MODEL_LIST = "model_list"


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    id: str
    display_name: str
    protocol: Protocol
    # None only for `custom`, whose base URL the user must give.
    default_base_url: str | None
    requires_api_key: bool
    capabilities: frozenset[Capability]
    # Where the model list lives when it is not `{base_url}/models` (or `/v1/models` for Anthropic).
    models_url: str | None = None
    # Optional sampling parameters the chat endpoint accepts; anything else is left out of requests,
    # because several OpenAI-compatible providers reject unknown parameters with a 400.
    chat_parameters: frozenset[str] = frozenset({"temperature", "top_p"})
    # OpenAI's newer name for the output limit; the other OpenAI-compatible APIs take `max_tokens`.
    max_tokens_field: str = "max_tokens"
    # Whether `stream_options: {"include_usage": true}` is accepted, to get token usage in streams.
    stream_usage_option: bool = False

    @property
    def requires_base_url(self) -> bool:
        return self.default_base_url is None


class UnsupportedProvider(InvalidInput):
    code = "unsupported_provider"


_CHAT = frozenset({Capability.CHAT, Capability.MODEL_LIST})
_CHAT_AND_IMAGES = frozenset({Capability.CHAT, Capability.IMAGES, Capability.MODEL_LIST})
_SAMPLING = frozenset({"temperature", "top_p"})
_SAMPLING_AND_PENALTIES = frozenset({"temperature", "top_p", "frequency_penalty", "presence_penalty"})
# Anthropic takes temperature (0 to 1) and top_p, but no frequency or presence penalties.
_ANTHROPIC_SAMPLING = frozenset({"temperature", "top_p"})

PROVIDERS: dict[str, ProviderSpec] = {
    spec.id: spec
    for spec in (
        ProviderSpec(
            "openai",
            "OpenAI",
            Protocol.OPENAI,
            "https://api.openai.com/v1",
            True,
            _CHAT_AND_IMAGES,
            chat_parameters=_SAMPLING_AND_PENALTIES,
            max_tokens_field="max_completion_tokens",
            stream_usage_option=True,
        ),
        ProviderSpec(
            "anthropic",
            "Anthropic",
            Protocol.ANTHROPIC,
            "https://api.anthropic.com",
            True,
            _CHAT,
            chat_parameters=_ANTHROPIC_SAMPLING,
        ),
        ProviderSpec("groq", "Groq", Protocol.OPENAI, "https://api.groq.com/openai/v1", True, _CHAT),
        ProviderSpec(
            "openrouter",
            "OpenRouter",
            Protocol.OPENAI,
            "https://openrouter.ai/api/v1",
            True,
            _CHAT,
            chat_parameters=_SAMPLING_AND_PENALTIES,
            stream_usage_option=True,
        ),
        ProviderSpec(
            "deepseek",
            "DeepSeek",
            Protocol.OPENAI,
            "https://api.deepseek.com",
            True,
            _CHAT,
            chat_parameters=_SAMPLING_AND_PENALTIES,
            stream_usage_option=True,
        ),
        ProviderSpec(
            "mistral",
            "Mistral AI",
            Protocol.OPENAI,
            "https://api.mistral.ai/v1",
            True,
            _CHAT,
            chat_parameters=_SAMPLING_AND_PENALTIES,
        ),
        ProviderSpec(
            "googleai",
            "Google Gemini",
            Protocol.OPENAI,
            "https://generativelanguage.googleapis.com/v1beta/openai",
            True,
            _CHAT,
        ),
        ProviderSpec("xai", "xAI", Protocol.OPENAI, "https://api.x.ai/v1", True, _CHAT),
        ProviderSpec(
            "together",
            "Together AI",
            Protocol.OPENAI,
            "https://api.together.xyz/v1",
            True,
            _CHAT,
            chat_parameters=_SAMPLING_AND_PENALTIES,
        ),
        ProviderSpec(
            "fireworks",
            "Fireworks AI",
            Protocol.OPENAI,
            "https://api.fireworks.ai/inference/v1",
            True,
            _CHAT,
            chat_parameters=_SAMPLING_AND_PENALTIES,
        ),
        ProviderSpec(
            "ollama",
            "Ollama",
            Protocol.OPENAI,
            "http://localhost:11434/v1",
            False,
            _CHAT,
            chat_parameters=_SAMPLING_AND_PENALTIES,
        ),
        ProviderSpec("lmstudio", "LM Studio", Protocol.OPENAI, "http://localhost:1234/v1", False, _CHAT),
        ProviderSpec(
            "imagerouter",
            "ImageRouter",
            Protocol.OPENAI,
            "https://api.imagerouter.io/v1/openai",
            True,
            frozenset({Capability.IMAGES, Capability.MODEL_LIST}),
            models_url="https://api.imagerouter.io/v1/models",
        ),
        # Unknown servers get only the parameters every OpenAI-compatible server is known to take.
        ProviderSpec("custom", "Custom (OpenAI-compatible)", Protocol.OPENAI, None, False, _CHAT_AND_IMAGES),
    )
}


def get_provider_spec(provider: str) -> ProviderSpec:
    """Return the registry entry for `provider` (case-insensitive), or raise UnsupportedProvider."""
    spec = PROVIDERS.get(provider.strip().lower())
    if spec is None:
        raise UnsupportedProvider(f"Unsupported provider {provider[:40]!r}; supported: {', '.join(sorted(PROVIDERS))}.")
    return spec
