"""Chat through a real OpenAI-compatible server (see docs/real-model.md). Skipped unless
POCKETLLM_E2E_OPENAI_BASE_URL names one, e.g. http://127.0.0.1:8089/v1."""

from __future__ import annotations

import os
from typing import Any

import httpx
import pytest

from tests.asgi import parse_sse
from tests.helpers import auth_headers, sign_up

BASE_URL = os.environ.get("POCKETLLM_E2E_OPENAI_BASE_URL")
MODEL = os.environ.get("POCKETLLM_E2E_MODEL")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not BASE_URL, reason="POCKETLLM_E2E_OPENAI_BASE_URL is not set"),
]


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # A model server on this machine listens on loopback; CPU inference of a reply takes seconds.
    return {"allow_private_provider_urls": True, "provider_read_timeout_seconds": 120.0}


@pytest.fixture
async def chat_path(client: httpx.AsyncClient, unique_email: str) -> tuple[dict[str, str], str]:
    headers = auth_headers(await sign_up(client, unique_email))
    activated = await client.post(
        "/v1/providers/activate", headers=headers, json={"provider": "custom", "base_url": BASE_URL}
    )
    assert activated.status_code == 200, activated.text
    catalogue = (await client.get("/v1/providers/custom/models", headers=headers)).json()
    model = MODEL or catalogue[0]["id"]
    imported = await client.post(
        "/v1/models/import",
        headers=headers,
        json={"provider": "custom", "models": [model], "settings": {"max_tokens": 48, "temperature": 0.2}},
    )
    assert imported.status_code == 200, imported.text
    chat = (await client.post("/v1/chats", headers=headers, json={})).json()
    return headers, f"/v1/chats/{chat['id']}/messages"


async def test_reply_from_real_model(client: httpx.AsyncClient, chat_path: tuple[dict[str, str], str]) -> None:
    headers, path = chat_path

    response = await client.post(
        path, headers=headers, json={"content": "What is the capital of France?", "role": "user", "stream": False}
    )

    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["role"] == "assistant"
    assert reply["content"].strip()
    assert reply["metadata"]["finish_reason"] in ("stop", "length")
    assert reply["metadata"]["usage"]["completion_tokens"] > 0


async def test_streamed_reply_from_real_model(client: httpx.AsyncClient, chat_path: tuple[dict[str, str], str]) -> None:
    headers, path = chat_path

    response = await client.post(
        path, headers=headers, json={"content": "Name three colours.", "role": "user", "stream": True}
    )

    assert response.status_code == 200, response.text
    events = [(name, data) for name, data in parse_sse(response.text) if name != "comment"]
    assert events[0][0] == "user_message"
    assert events[-1][0] == "assistant_message"
    streamed = "".join(data["content"] for name, data in events if name == "delta")
    assert streamed.strip()
    assert events[-1][1]["content"] == streamed
