"""Normalisation of raw model-list entries into `ProviderModel`, and the bound on fetching a list."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pocketllm.kit.cache import MemoryCache
from pocketllm.providers.catalogue import Catalogue, ProviderTarget, normalise_model, normalise_models
from pocketllm.providers.errors import ProviderTimeout
from pocketllm.providers.registry import PROVIDERS
from tests.fakes.trickle import CHUNKED_JSON_HEAD, provider_http_on_server_transport, trickling_server

OPENAI = PROVIDERS["openai"]
OPENROUTER = PROVIDERS["openrouter"]


def test_plain_openai_entry() -> None:
    model = normalise_model(
        OPENAI, {"id": "gpt-4o-mini", "object": "model", "created": 1721172741, "owned_by": "system"}
    )

    assert model is not None
    assert model.id == "gpt-4o-mini"
    assert model.name == "gpt-4o-mini"
    assert model.provider == "openai"
    assert model.pricing is None
    assert model.metadata["owned_by"] == "system"
    assert "chat" in model.capabilities


def test_openrouter_entry_prices_per_million() -> None:
    entry = {
        "id": "anthropic/claude-3.5-sonnet",
        "name": "Claude 3.5 Sonnet",
        "description": "A model",
        "context_length": 200000,
        "pricing": {"prompt": "0.000003", "completion": "0.000015"},
        "architecture": {"input_modalities": ["text", "image"], "output_modalities": ["text"]},
        "top_provider": {"max_completion_tokens": 8192},
    }

    model = normalise_model(OPENROUTER, entry)

    assert model is not None
    assert model.name == "Claude 3.5 Sonnet"
    assert model.context_window == 200000
    assert model.max_output_tokens == 8192
    assert model.pricing is not None
    assert model.pricing.input == pytest.approx(3.0)
    assert model.pricing.output == pytest.approx(15.0)
    assert "vision" in model.capabilities
    assert model.architecture == {"input_modalities": ["text", "image"], "output_modalities": ["text"]}


def test_together_prices_are_already_per_million() -> None:
    model = normalise_model(PROVIDERS["together"], {"id": "m", "pricing": {"input": 0.88, "output": 0.88}})

    assert model is not None
    assert model.pricing is not None
    assert model.pricing.input == pytest.approx(0.88)


@pytest.mark.parametrize(
    "pricing",
    [{"prompt": "-1", "completion": "-1"}, {"prompt": "free", "completion": None}, {"input": float("nan")}, "cheap"],
)
def test_bad_prices_become_unknown(pricing: Any) -> None:
    model = normalise_model(OPENROUTER, {"id": "m", "pricing": pricing})

    assert model is not None
    assert model.pricing is None


@pytest.mark.parametrize(
    "entry", [{}, {"id": ""}, {"id": "   "}, {"id": 42}, {"id": None}, "gpt-4o", None, {"id": "x" * 256}]
)
def test_entry_without_usable_id_is_skipped(entry: Any) -> None:
    assert normalise_model(OPENAI, entry) is None


def test_groq_and_mistral_fields() -> None:
    groq = normalise_model(PROVIDERS["groq"], {"id": "llama-3.1-8b-instant", "context_window": 131072, "active": False})
    mistral = normalise_model(
        PROVIDERS["mistral"],
        {
            "id": "mistral-large-latest",
            "max_context_length": 131072,
            "capabilities": {"vision": True, "fine_tuning": False},
        },
    )

    assert groq is not None
    assert groq.context_window == 131072
    assert groq.is_active is False
    assert mistral is not None
    assert mistral.context_window == 131072
    assert "vision" in mistral.capabilities
    assert "fine_tuning" not in mistral.capabilities


def test_gemini_prefix_is_dropped() -> None:
    model = normalise_model(PROVIDERS["googleai"], {"id": "models/gemini-2.0-flash"})

    assert model is not None
    assert model.id == "gemini-2.0-flash"


def test_non_numeric_and_negative_limits_are_ignored() -> None:
    model = normalise_model(
        OPENAI, {"id": "m", "context_window": "lots", "max_output_tokens": -5, "context_length": True}
    )

    assert model is not None
    assert model.context_window is None
    assert model.max_output_tokens is None


def test_duplicates_are_dropped() -> None:
    models = normalise_models(OPENAI, [{"id": "a"}, {"id": "a", "name": "again"}, {"id": "b"}, "junk"])

    assert [model.id for model in models] == ["a", "b"]


def test_tags_from_comma_string() -> None:
    model = normalise_model(OPENAI, {"id": "m", "tags": "fast, cheap,,"})

    assert model is not None
    assert model.tags == ["fast", "cheap"]


def test_cache_key_depends_on_key_and_hides_it() -> None:
    first = ProviderTarget(spec=OPENAI, base_url="https://api.openai.com/v1", api_key="sk-one-1234567890")
    second = ProviderTarget(spec=OPENAI, base_url="https://api.openai.com/v1", api_key="sk-two-1234567890")

    assert first.cache_key() != second.cache_key()
    assert "sk-one" not in first.cache_key()


def test_models_url_follows_custom_base_url() -> None:
    imagerouter = PROVIDERS["imagerouter"]
    default = ProviderTarget(spec=imagerouter, base_url=imagerouter.default_base_url or "", api_key=None)
    custom = ProviderTarget(spec=imagerouter, base_url="http://127.0.0.1:9000/v1", api_key=None)
    anthropic = ProviderTarget(spec=PROVIDERS["anthropic"], base_url="http://127.0.0.1:9000", api_key=None)

    assert default.models_url == imagerouter.models_url
    assert custom.models_url == "http://127.0.0.1:9000/v1/models"
    assert anthropic.models_url == "http://127.0.0.1:9000/v1/models"


async def test_trickling_model_list_ends_at_deadline() -> None:
    async with (
        trickling_server(sent_at_once=CHUNKED_JSON_HEAD, trickled=None) as server,
        provider_http_on_server_transport() as http,
    ):
        catalogue = Catalogue(http, MemoryCache(), ttl_seconds=60, timeout_seconds=0.3)
        target = ProviderTarget(spec=PROVIDERS["custom"], base_url=f"{server.url}/v1", api_key=None)
        started = time.monotonic()
        with pytest.raises(ProviderTimeout):
            await catalogue.fetch(target)
        elapsed = time.monotonic() - started
        await asyncio.wait_for(server.closed_by_client.wait(), timeout=5)

    # Ended by the bound on the whole list (twice the timeout), not by the client's 10 s read timeout.
    assert elapsed < 3
    assert server.closed_by_client.is_set()
