"""Request logs with LOG_FORMAT=json: one JSON object per line, with request id, route and user id."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import structlog
from fastapi import FastAPI

from pocketllm.kit.request_id import MAX_LOGGED_PATH_LENGTH
from tests.fakes.provider import VALID_API_KEY, FakeProvider
from tests.helpers import DEFAULT_PASSWORD, auth_headers, sign_up

CHAT_ROUTE = "/v1/chats/{chat_id}"
MESSAGES_ROUTE = "/v1/chats/{chat_id}/messages"
PROMPT = "Tell me about the lighthouse keeper's secret"


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # The fake provider listens on 127.0.0.1, which the outbound guard blocks by default.
    return {"log_format": "json", "allow_private_provider_urls": True, "provider_read_timeout_seconds": 5.0}


@contextmanager
def capture_log_output() -> Iterator[io.StringIO]:
    """Redirect the handler that `configure_logging` installed into a buffer, for the duration of the block.

    `create_app` configures logging, so call this after the app was created.
    """
    handlers = [
        handler
        for handler in logging.getLogger().handlers
        if isinstance(handler, logging.StreamHandler)
        and isinstance(handler.formatter, structlog.stdlib.ProcessorFormatter)
    ]
    assert len(handlers) == 1, f"expected the one handler of configure_logging, found {logging.getLogger().handlers}"
    buffer = io.StringIO()
    previous = handlers[0].setStream(buffer)
    try:
        yield buffer
    finally:
        handlers[0].setStream(previous)


@pytest.fixture
def log_output(app: FastAPI) -> Iterator[io.StringIO]:
    with capture_log_output() as buffer:
        yield buffer


def parse_lines(output: io.StringIO) -> list[dict[str, Any]]:
    """Parse every line written to the log; a line that is not a JSON object fails the test."""
    lines: list[dict[str, Any]] = []
    for line in output.getvalue().splitlines():
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        lines.append(entry)
    return lines


def completed_lines(output: io.StringIO) -> list[dict[str, Any]]:
    return [entry for entry in parse_lines(output) if entry["event"] == "request.completed"]


def completed_line_for(output: io.StringIO, response: httpx.Response) -> dict[str, Any]:
    request_id = response.headers["x-request-id"]
    [line] = [entry for entry in completed_lines(output) if entry["request_id"] == request_id]
    return line


async def setup_chat(client: httpx.AsyncClient, headers: dict[str, str], fake: FakeProvider) -> str:
    activated = await client.post(
        "/v1/providers/activate",
        headers=headers,
        json={"provider": "openai", "api_key": VALID_API_KEY, "base_url": fake.openai_base_url},
    )
    assert activated.status_code == 200, activated.text
    imported = await client.post(
        "/v1/models/import", headers=headers, json={"provider": "openai", "models": ["gpt-4o-mini"]}
    )
    assert imported.status_code == 200, imported.text
    created = await client.post("/v1/chats", headers=headers, json={"model_config_id": imported.json()[0]["id"]})
    assert created.status_code == 200, created.text
    chat_id: str = created.json()["id"]
    return chat_id


async def test_completed_lines_are_json_with_fields(
    client: httpx.AsyncClient, unique_email: str, log_output: io.StringIO
) -> None:
    body = await sign_up(client, unique_email)
    headers = auth_headers(body)
    created = await client.post("/v1/chats", headers=headers, json={})
    chat_id = created.json()["id"]
    await client.get(f"/v1/chats/{chat_id}", headers=headers)
    await client.get("/v1/nowhere")

    lines = completed_lines(log_output)

    assert len(lines) == 4
    for line in lines:
        assert isinstance(line["request_id"], str)
        assert line["request_id"]
        assert isinstance(line["route"], str)
        assert isinstance(line["status"], int)
        assert isinstance(line["duration_ms"], float | int)
        assert line["method"] in {"GET", "POST"}
        assert line["level"] == "info"
        assert line["timestamp"]
    assert [line["route"] for line in lines] == ["/v1/auth/signup", "/v1/chats", CHAT_ROUTE, "unmatched"]
    assert [line["status"] for line in lines] == [200, 200, 200, 404]


async def test_user_id_only_when_authenticated(
    client: httpx.AsyncClient, unique_email: str, log_output: io.StringIO
) -> None:
    body = await sign_up(client, unique_email)
    user_id = body["user"]["id"]

    signed_up = completed_lines(log_output)[0]
    profile = await client.get("/v1/users/profile", headers=auth_headers(body))
    anonymous = await client.get("/v1/users/profile")
    bad_token = await client.get("/v1/users/profile", headers={"Authorization": "Bearer not-a-token"})

    assert profile.status_code == 200
    assert completed_line_for(log_output, profile)["user_id"] == user_id
    assert "user_id" not in signed_up
    assert anonymous.status_code == 401
    assert "user_id" not in completed_line_for(log_output, anonymous)
    assert bad_token.status_code == 401
    assert "user_id" not in completed_line_for(log_output, bad_token)


async def test_request_id_matches_header(client: httpx.AsyncClient, log_output: io.StringIO) -> None:
    response = await client.get("/health", headers={"X-Request-ID": "trace-42.abc"})

    line = completed_line_for(log_output, response)

    assert response.headers["x-request-id"] == "trace-42.abc"
    assert line["request_id"] == "trace-42.abc"
    assert line["route"] == "/health"


async def test_streamed_reply_line_has_user_and_route(
    client: httpx.AsyncClient, app: FastAPI, unique_email: str, fake_provider: FakeProvider, log_output: io.StringIO
) -> None:
    body = await sign_up(client, unique_email)
    headers = auth_headers(body)
    chat_id = await setup_chat(client, headers, fake_provider)

    response = await client.post(
        f"/v1/chats/{chat_id}/messages", headers=headers, json={"content": PROMPT, "role": "user", "stream": True}
    )
    await app.state.replies.drain()

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    line = completed_line_for(log_output, response)
    assert line["route"] == MESSAGES_ROUTE
    assert line["user_id"] == body["user"]["id"]
    assert line["status"] == 200


async def test_lines_inside_request_have_route(
    client: httpx.AsyncClient, unique_email: str, log_output: io.StringIO
) -> None:
    body = await sign_up(client, unique_email)

    response = await client.post("/v1/chats", headers=auth_headers(body), json={})

    request_id = response.headers["x-request-id"]
    [created] = [entry for entry in parse_lines(log_output) if entry["event"] == "chat.created"]
    assert created["request_id"] == request_id
    assert created["route"] == "/v1/chats"
    assert created["user_id"] == body["user"]["id"]


async def test_long_unmatched_path_is_cut(client: httpx.AsyncClient, log_output: io.StringIO) -> None:
    response = await client.get("/v1/" + "a" * 1000)

    line = completed_line_for(log_output, response)

    assert response.status_code == 404
    assert line["route"] == "unmatched"
    assert len(line["path"]) == MAX_LOGGED_PATH_LENGTH
    assert line["path"].startswith("/v1/aaa")


async def test_logs_hold_no_prompt_or_secrets(
    client: httpx.AsyncClient, app: FastAPI, unique_email: str, fake_provider: FakeProvider, log_output: io.StringIO
) -> None:
    body = await sign_up(client, unique_email)
    headers = auth_headers(body)
    chat_id = await setup_chat(client, headers, fake_provider)

    for stream in (False, True):
        response = await client.post(
            f"/v1/chats/{chat_id}/messages", headers=headers, json={"content": PROMPT, "role": "user", "stream": stream}
        )
        assert response.status_code == 200, response.text
    await app.state.replies.drain()

    logged = log_output.getvalue()
    assert "request.completed" in logged
    for secret in (PROMPT, fake_provider.reply_text, VALID_API_KEY, DEFAULT_PASSWORD, body["tokens"]["access_token"]):
        assert secret not in logged
