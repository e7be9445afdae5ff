"""Anthropic's Messages API."""

from __future__ import annotations

from typing import Any

from pocketllm.providers.http import ProviderHttp

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
