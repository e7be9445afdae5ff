"""OpenAI-compatible APIs (OpenAI, Groq, OpenRouter, Mistral, Gemini's OpenAI endpoint, Ollama, ...)."""

from __future__ import annotations

from typing import Any

from pocketllm.providers.http import ProviderHttp


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
