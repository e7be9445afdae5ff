"""Live model catalogues: fetched from each provider, normalised into `ProviderModel`, cached for a while."""

from __future__ import annotations

import asyncio
import hashlib
import math
from dataclasses import dataclass
from typing import Any

import structlog

from pocketllm.errors import PocketLLMError
from pocketllm.kit.cache import JsonCache
from pocketllm.providers.clients import anthropic, openai
from pocketllm.providers.http import ProviderHttp
from pocketllm.providers.network import io_deadline
from pocketllm.providers.registry import Capability, Protocol, ProviderSpec
from pocketllm.providers.schemas import ModelPricing, ProviderModel

log = structlog.get_logger(__name__)

MAX_MODELS_PER_PROVIDER = 2000
MAX_DESCRIPTION_LENGTH = 2000
_CONTEXT_WINDOW_KEYS = ("context_window", "context_length", "max_context_length", "max_model_len", "input_token_limit")
_MAX_OUTPUT_KEYS = ("max_output_tokens", "max_completion_tokens", "output_token_limit", "max_tokens")


@dataclass(frozen=True, slots=True)
class ProviderTarget:
    """Everything needed to call one provider for one user. Holds the decrypted key: never log it."""

    spec: ProviderSpec
    base_url: str
    api_key: str | None

    @property
    def provider(self) -> str:
        return self.spec.id

    @property
    def models_url(self) -> str:
        if self.spec.models_url:
            return _models_url_beside(self.spec, self.base_url)
        if self.spec.protocol is Protocol.ANTHROPIC:
            return f"{self.base_url}/v1/models"
        return f"{self.base_url}/models"

    def cache_key(self) -> str:
        # Per key as well as per URL: what a provider lists can depend on the account. Hashed, so the
        # key itself never reaches the cache.
        material = "\n".join((self.provider, self.base_url, self.models_url, self.api_key or ""))
        return "catalogue:" + hashlib.sha256(material.encode()).hexdigest()


def _models_url_beside(spec: ProviderSpec, base_url: str) -> str:
    """Return the model-list URL of a provider whose list lives apart from its API base URL.

    ImageRouter serves its OpenAI-compatible API at `.../v1/openai` and its model list at `.../v1/models`.
    A custom base URL (a proxy, a test server) keeps that layout: the part of the default base URL after
    the part it shares with the default model-list URL is replaced by the rest of the model-list URL.
    """
    assert spec.models_url is not None
    assert spec.default_base_url is not None
    if base_url == spec.default_base_url:
        return spec.models_url
    default_base, default_models = spec.default_base_url, spec.models_url
    shared = 0
    while shared < min(len(default_base), len(default_models)) and default_base[shared] == default_models[shared]:
        shared += 1
    shared = default_base.rfind("/", 0, shared + 1) + 1
    base_suffix, models_suffix = default_base[shared:], default_models[shared:]
    if base_suffix and base_url.endswith("/" + base_suffix):
        return base_url[: -len(base_suffix)] + models_suffix
    return f"{base_url}/models"


class Catalogue:
    def __init__(self, http: ProviderHttp, cache: JsonCache, *, ttl_seconds: int, timeout_seconds: float) -> None:
        self._http = http
        self._cache = cache
        self.ttl_seconds = ttl_seconds
        self.timeout_seconds = timeout_seconds

    async def fetch(self, target: ProviderTarget, *, use_cache: bool = True) -> list[ProviderModel]:
        """Return the provider's normalised catalogue; raises the provider's domain error on failure."""
        key = target.cache_key()
        if use_cache:
            cached = await self._cache.get(key)
            if isinstance(cached, list):
                return [ProviderModel.model_validate(entry) for entry in cached]

        client = anthropic if target.spec.protocol is Protocol.ANTHROPIC else openai
        # A paginated list makes several requests, so the whole fetch is bounded, not just each request.
        # A provider that sends its body a byte at a time would otherwise hold the connection for good.
        with io_deadline(self.timeout_seconds * 2):
            raw = await client.list_models(
                self._http,
                provider=target.provider,
                models_url=target.models_url,
                api_key=target.api_key,
                timeout=self.timeout_seconds,
            )

        models = normalise_models(target.spec, raw)
        await self._cache.set(key, [model.model_dump(mode="json") for model in models], self.ttl_seconds)
        return models

    async def invalidate(self, target: ProviderTarget) -> None:
        await self._cache.delete(target.cache_key())

    async def gather(self, targets: list[ProviderTarget]) -> tuple[list[ProviderModel], dict[str, str]]:
        """Fetch several catalogues at once. A failing provider is left out and reported, never fatal."""
        results = await asyncio.gather(*(self.fetch(target) for target in targets), return_exceptions=True)

        models: list[ProviderModel] = []
        failures: dict[str, str] = {}
        for target, result in zip(targets, results, strict=True):
            if isinstance(result, PocketLLMError):
                failures[target.provider] = result.message
                log.info("catalogue.provider_failed", provider=target.provider, code=result.code)
            elif isinstance(result, BaseException):
                # A bug in one provider's normalisation must not hide every other provider's models.
                failures[target.provider] = "The model list could not be read."
                log.error("catalogue.provider_crashed", provider=target.provider, exc_info=result)
            else:
                models.extend(result)
        return models, failures


def normalise_models(spec: ProviderSpec, raw: list[Any]) -> list[ProviderModel]:
    """Turn raw list entries into `ProviderModel`s, skipping entries without a usable id and duplicates."""
    models: list[ProviderModel] = []
    seen: set[str] = set()
    for entry in raw[:MAX_MODELS_PER_PROVIDER]:
        model = normalise_model(spec, entry)
        if model is not None and model.id not in seen:
            seen.add(model.id)
            models.append(model)
    return models


def normalise_model(spec: ProviderSpec, entry: Any) -> ProviderModel | None:
    if not isinstance(entry, dict):
        return None
    model_id = entry.get("id")
    if not isinstance(model_id, str) or not model_id.strip() or len(model_id) > 255:
        return None
    model_id = model_id.strip()
    if spec.id == "googleai":
        # Gemini lists "models/gemini-2.0-flash" but its OpenAI endpoint takes the bare name as well.
        model_id = model_id.removeprefix("models/")

    top_provider: dict[str, Any] = entry["top_provider"] if isinstance(entry.get("top_provider"), dict) else {}
    architecture = _architecture(entry.get("architecture"))
    capabilities = _capabilities(spec, entry.get("capabilities"), architecture)
    tags = _string_list(entry.get("tags"))
    metadata: dict[str, Any] = {"capabilities": capabilities, "tags": tags}
    if architecture:
        metadata["architecture"] = architecture
    for key in ("owned_by", "created", "created_at", "type"):
        value = entry.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool):
            metadata[key] = value

    name = _first_string(entry, ("display_name", "name")) or model_id
    description = _first_string(entry, ("description",))
    return ProviderModel(
        id=model_id,
        name=name[:255],
        provider=spec.id,
        description=description[:MAX_DESCRIPTION_LENGTH] if description else None,
        context_window=_first_positive_int(entry, _CONTEXT_WINDOW_KEYS)
        or _first_positive_int(top_provider, ("context_length",)),
        max_output_tokens=_first_positive_int(entry, _MAX_OUTPUT_KEYS)
        or _first_positive_int(top_provider, ("max_completion_tokens",)),
        pricing=_pricing(entry.get("pricing")),
        is_active=entry.get("active") is not False,
        capabilities=capabilities,
        tags=tags,
        architecture=architecture,
        metadata=metadata,
    )


def _first_string(entry: dict[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = entry.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _first_positive_int(entry: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        number = _as_number(entry.get(key))
        if number is not None and 0 < number < 2**31:
            return int(number)
    return None


def _price(value: Any, per_million_factor: float) -> float | None:
    number = _as_number(value)
    if number is None or number < 0:
        return None
    return round(number * per_million_factor, 6)


def _pricing(raw: Any) -> ModelPricing | None:
    """Prices per million tokens. OpenRouter quotes `prompt`/`completion` per token; others use
    `input`/`output` per million (Together). Negative prices (OpenRouter's "-1" for variable pricing) are
    treated as unknown."""
    if not isinstance(raw, dict):
        return None
    if "prompt" in raw or "completion" in raw:
        pricing = ModelPricing(
            input=_price(raw.get("prompt"), 1_000_000), output=_price(raw.get("completion"), 1_000_000)
        )
    else:
        pricing = ModelPricing(input=_price(raw.get("input"), 1), output=_price(raw.get("output"), 1))
    return pricing if pricing.input is not None or pricing.output is not None else None


def _string_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()][:50]
    if isinstance(value, list):
        return [item.strip() for item in value if isinstance(item, str) and item.strip()][:50]
    return []


def _architecture(raw: Any) -> dict[str, Any] | None:
    if not isinstance(raw, dict):
        return None
    architecture: dict[str, Any] = {}
    for key in ("input_modalities", "output_modalities"):
        values = _string_list(raw.get(key))
        if values:
            architecture[key] = values
    modality = raw.get("modality")
    if isinstance(modality, str):
        architecture["modality"] = modality
    return architecture or None


def _capabilities(spec: ProviderSpec, raw: Any, architecture: dict[str, Any] | None) -> list[str]:
    capabilities: set[str] = set()
    if Capability.CHAT in spec.capabilities:
        capabilities.add("chat")
    if isinstance(raw, dict):
        # Mistral: {"completion_chat": true, "vision": false, ...}
        capabilities.update(key for key, enabled in raw.items() if enabled is True and isinstance(key, str))
    else:
        capabilities.update(_string_list(raw))
    if architecture and "image" in architecture.get("input_modalities", []):
        capabilities.add("vision")
    return sorted(capabilities)[:50]
