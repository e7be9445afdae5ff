"""All log output of real auth, provider, chat and image job flows, checked for passwords, tokens, API keys
and user content.

The flows run against the fake provider server with LOG_LEVEL=DEBUG, in both log formats. The capture
is the stream of the handler that `configure_logging` installs, so it contains exactly what an
operator would see on standard error.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from fastapi import FastAPI

from pocketllm.app import create_app
from pocketllm.config import Settings
from pocketllm.jobs.handlers import build_job_worker
from tests.asgi import parse_sse
from tests.conftest import make_settings
from tests.fakes.gotrue import FakeGoTrue
from tests.fakes.provider import FakeProvider
from tests.helpers import auth_headers, bearer

PASSWORD = "Quill-Secrecy-Pass-1!"
WRONG_PASSWORD = "Wrong-Secrecy-Pass-2!"
NEW_PASSWORD = "Newer-Secrecy-Pass-3!"
SHORT_PASSWORD = "Shrt-4!"
API_KEY = "sk-secrecy-5f0c2a9e7b41d3c8a6e2f9b0d7c4e1a3"
WRONG_API_KEY = "sk-secrecy-wrong-8d2b6f1e9c3a7d5b0e4f2c8a"
MESSAGE_TEXT = "Marmalade-Quokka-7731: please keep this sentence out of the logs"
STREAMED_MESSAGE_TEXT = "Tangerine-Ibis-2290: stream this one back"
FAILED_MESSAGE_TEXT = "Saffron-Narwhal-6604: this one meets a provider error"
REPLY_TEXT = "Juniper-Pangolin-5518 is the reply that must stay private"
STREAMED_REPLY_TEXT = "Cobalt-Axolotl-4127 arrives word by word"
IMAGE_PROMPT = "Vermilion-Okapi-3395 painting of a lighthouse"
FAILED_IMAGE_PROMPT = "Indigo-Tapir-9951 painting that the provider rejects"
FORGED_TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJmb3JnZWQtc2VjcmVjeSJ9.Zm9yZ2VkLXNpZ25hdHVyZS1zZWNyZWN5"
GOTRUE_ANON_KEY = "gotrue-anon-key-secrecy-3e9a51c07d24b86f"
GOTRUE_JWT_SECRET = "gotrue-jwt-secret-secrecy-0b7d3f19e62a48c5d1f0a9e7"


@pytest.fixture(params=["console", "json"])
def settings_overrides(request: pytest.FixtureRequest) -> dict[str, Any]:
    # The fake provider listens on 127.0.0.1, which the outbound guard blocks by default.
    return {
        "log_level": "DEBUG",
        "log_format": request.param,
        "allow_private_provider_urls": True,
        "provider_read_timeout_seconds": 5.0,
        "job_max_attempts": 1,
    }


@contextmanager
def capture_log_output() -> Iterator[io.StringIO]:
    """Redirect the handler that `configure_logging` installed into a buffer for the duration of the block.

    `create_app` configures logging, so call this after the app was created.
    """
    root = logging.getLogger()
    handlers = [
        handler
        for handler in root.handlers
        if isinstance(handler, logging.StreamHandler)
        and isinstance(handler.formatter, structlog.stdlib.ProcessorFormatter)
    ]
    assert len(handlers) == 1, f"expected the one handler of configure_logging, found {root.handlers}"
    buffer = io.StringIO()
    previous = handlers[0].setStream(buffer)
    try:
        yield buffer
    finally:
        handlers[0].setStream(previous)


def lines_containing(text: str, secret: str) -> list[str]:
    return [line for line in text.splitlines() if secret in line]


class Secrets:
    """Every secret and piece of user content that the flows send or receive, and the server's own secrets."""

    def __init__(self, settings: Settings) -> None:
        assert settings.jwt_secret is not None
        assert settings.encryption_key is not None
        self.values: dict[str, str] = {
            "JWT secret": settings.jwt_secret,
            "encryption key": settings.encryption_key,
            "password": PASSWORD,
            "wrong password": WRONG_PASSWORD,
            "new password": NEW_PASSWORD,
            "too short password": SHORT_PASSWORD,
            "API key": API_KEY,
            "wrong API key": WRONG_API_KEY,
            "message text": MESSAGE_TEXT,
            "streamed message text": STREAMED_MESSAGE_TEXT,
            "failed message text": FAILED_MESSAGE_TEXT,
            "reply text": REPLY_TEXT,
            "streamed reply text": STREAMED_REPLY_TEXT,
            "image prompt": IMAGE_PROMPT,
            "failed image prompt": FAILED_IMAGE_PROMPT,
            "forged token": FORGED_TOKEN,
        }

    def add_tokens(self, label: str, body: dict[str, Any]) -> None:
        tokens = body["tokens"]
        self.values[f"{label} access token"] = tokens["access_token"]
        # A log line could contain a cut token, and the signature part alone is as unique as the whole token.
        self.values[f"{label} access token signature"] = tokens["access_token"].rsplit(".", 1)[-1]
        self.values[f"{label} refresh token"] = tokens["refresh_token"]


async def run_auth_flow(client: httpx.AsyncClient, email: str, secrets: Secrets) -> dict[str, str]:
    """Sign up, sign in, refresh and change the password, with rejected attempts, and return auth headers."""
    too_short = await client.post("/v1/auth/signup", json={"email": email, "password": SHORT_PASSWORD})
    assert too_short.status_code == 422, too_short.text

    signed_up = await client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})
    assert signed_up.status_code == 200, signed_up.text
    secrets.add_tokens("sign-up", signed_up.json())

    rejected = await client.post("/v1/auth/signin", json={"email": email, "password": WRONG_PASSWORD})
    assert rejected.status_code in (400, 401), rejected.text
    signed_in = await client.post("/v1/auth/signin", json={"email": email, "password": PASSWORD})
    assert signed_in.status_code == 200, signed_in.text
    secrets.add_tokens("sign-in", signed_in.json())

    refresh_token = signed_in.json()["tokens"]["refresh_token"]
    refreshed = await client.post("/v1/auth/refresh", json={"refresh_token": refresh_token})
    assert refreshed.status_code == 200, refreshed.text
    secrets.add_tokens("refresh", refreshed.json())
    headers = auth_headers(refreshed.json())

    forged = await client.get("/v1/users/profile", headers=bearer(FORGED_TOKEN))
    assert forged.status_code == 401, forged.text

    wrong_old = await client.post(
        "/v1/auth/password/change", headers=headers, json={"old": WRONG_PASSWORD, "new": NEW_PASSWORD}
    )
    assert wrong_old.status_code == 400, wrong_old.text
    changed = await client.post(
        "/v1/auth/password/change", headers=headers, json={"old": PASSWORD, "new": NEW_PASSWORD}
    )
    assert changed.status_code == 200, changed.text

    signed_in_again = await client.post("/v1/auth/signin", json={"email": email, "password": NEW_PASSWORD})
    assert signed_in_again.status_code == 200, signed_in_again.text
    secrets.add_tokens("second sign-in", signed_in_again.json())
    return auth_headers(signed_in_again.json())


async def run_provider_flow(client: httpx.AsyncClient, headers: dict[str, str], fake: FakeProvider) -> str:
    """Activate OpenAI with a rejected key and a valid one, list the catalogue, import a model and return its id."""
    fake.valid_keys.add(API_KEY)

    # Provider error messages can quote the key that was sent.
    fake.fail_next("/models", status=401, message=f"Incorrect API key provided: {WRONG_API_KEY}")
    rejected = await client.post(
        "/v1/providers/activate",
        headers=headers,
        json={"provider": "openai", "api_key": WRONG_API_KEY, "base_url": fake.openai_base_url},
    )
    assert rejected.status_code == 400, rejected.text
    fake.fail_next("/models", status=500, message=f"Internal error while checking key {API_KEY}")
    failed = await client.post(
        "/v1/providers/activate",
        headers=headers,
        json={"provider": "openai", "api_key": API_KEY, "base_url": fake.openai_base_url},
    )
    assert failed.status_code == 400, failed.text

    activated = await client.post(
        "/v1/providers/activate",
        headers=headers,
        json={"provider": "openai", "api_key": API_KEY, "base_url": fake.openai_base_url},
    )
    assert activated.status_code == 200, activated.text

    catalogue = await client.get("/v1/models", headers=headers)
    assert catalogue.status_code == 200, catalogue.text
    imported = await client.post(
        "/v1/models/import", headers=headers, json={"provider": "openai", "models": ["gpt-4o-mini"], "sync": True}
    )
    assert imported.status_code == 200, imported.text
    model_id: str = imported.json()[0]["id"]
    return model_id


async def run_chat_flow(
    client: httpx.AsyncClient, headers: dict[str, str], fake: FakeProvider, model_id: str
) -> list[httpx.Response]:
    """Send a JSON message, a streamed one and some that meet provider errors, and return the responses."""
    created = await client.post("/v1/chats", headers=headers, json={"model_config_id": model_id})
    assert created.status_code == 200, created.text
    messages_path = f"/v1/chats/{created.json()['id']}/messages"

    fake.reply_text = REPLY_TEXT
    replied = await client.post(messages_path, headers=headers, json={"content": MESSAGE_TEXT, "stream": False})
    assert replied.status_code == 200, replied.text
    assert replied.json()["content"] == REPLY_TEXT

    fake.queue_replies(STREAMED_REPLY_TEXT)
    streamed = await client.post(
        messages_path, headers=headers, json={"content": STREAMED_MESSAGE_TEXT, "stream": True}
    )
    assert streamed.status_code == 200, streamed.text
    streamed_events = [event for event, _ in parse_sse(streamed.text)]
    assert "assistant_message" in streamed_events, streamed.text

    # Provider error messages that quote the key and the user's text, in each failure shape.
    echoed = f"Incorrect API key provided: {API_KEY}. Request: {FAILED_MESSAGE_TEXT}"
    failures: list[dict[str, Any]] = [
        {"status": 401, "message": echoed},
        {"status": 429, "message": echoed, "retry_after": 1},
        {"status": 400, "message": echoed},
        {"status": 500, "message": echoed},
    ]
    responses = [replied, streamed]
    for failure in failures:
        fake.fail_next("/chat/completions", **failure)
        failed = await client.post(
            messages_path, headers=headers, json={"content": FAILED_MESSAGE_TEXT, "stream": False}
        )
        assert failed.status_code >= 400, failed.text
        responses.append(failed)

    fake.fail_next("/chat/completions", stream_error_after=1, message=echoed)
    stream_failed = await client.post(
        messages_path, headers=headers, json={"content": FAILED_MESSAGE_TEXT, "stream": True}
    )
    # Text arrived before the error, so the reply is stored and sent as incomplete.
    last_event, last_data = parse_sse(stream_failed.text)[-1]
    assert (last_event, last_data["status"]) == ("assistant_message", "incomplete"), stream_failed.text
    responses.append(stream_failed)
    return responses


async def run_image_flow(
    client: httpx.AsyncClient, headers: dict[str, str], fake: FakeProvider, app: FastAPI
) -> list[httpx.Response]:
    """Run an image job that succeeds and one whose provider error quotes the key and the prompt."""
    state = app.state
    worker = build_job_worker(state.settings, state.database, state.storage, state.providers)
    responses = []
    for prompt, expected_status in ((IMAGE_PROMPT, "completed"), (FAILED_IMAGE_PROMPT, "failed")):
        if expected_status == "failed":
            fake.fail_next("/images/generations", status=400, message=f"Key {API_KEY} may not draw: {prompt}")
        queued = await client.post(
            "/v1/jobs/image-generation",
            headers=headers,
            json={"job_type": "image_generation", "input_data": {"prompt": prompt, "model": "dall-e-2"}},
        )
        assert queued.status_code == 202, queued.text

        assert await worker.run_due() == 1

        job = await client.get(f"/v1/jobs/{queued.json()['job_id']}", headers=headers)
        assert job.status_code == 200, job.text
        assert job.json()["status"] == expected_status, job.text
        responses.append(job)
    return responses


async def test_flows_log_no_secrets(
    app: FastAPI, client: httpx.AsyncClient, fake_provider: FakeProvider, unique_email: str, settings: Settings
) -> None:
    secrets = Secrets(settings)
    assert logging.getLogger().level == logging.DEBUG

    with capture_log_output() as output:
        headers = await run_auth_flow(client, unique_email, secrets)
        model_id = await run_provider_flow(client, headers, fake_provider)
        chat_responses = await run_chat_flow(client, headers, fake_provider, model_id)
        image_responses = await run_image_flow(client, headers, fake_provider, app)
        signed_out = await client.post("/v1/auth/signout", headers=headers)
        assert signed_out.status_code == 200, signed_out.text

    logged = output.getvalue()
    assert "request.completed" in logged
    assert "provider.request_failed" in logged
    for label, secret in secrets.values.items():
        assert secret not in logged, f"the {label} is in the log: {lines_containing(logged, secret)}"

    # Provider error messages are not passed on to the client either.
    for response in [*chat_responses, *image_responses]:
        assert API_KEY not in response.text, f"{response.request.url.path} returned the API key: {response.text}"


@pytest.fixture(scope="module")
def gotrue() -> Iterator[FakeGoTrue]:
    fake = FakeGoTrue(jwt_secret=GOTRUE_JWT_SECRET, anon_key=GOTRUE_ANON_KEY)
    fake.start()
    yield fake
    fake.stop()


async def test_supabase_auth_logs_no_secrets(
    database_url: str, tmp_path: Path, gotrue: FakeGoTrue, settings_overrides: dict[str, Any], unique_email: str
) -> None:
    gotrue.reset()
    settings = make_settings(
        database_url,
        tmp_path / "data",
        **settings_overrides,
        auth_backend="supabase",
        supabase_url=gotrue.url,
        supabase_anon_key=GOTRUE_ANON_KEY,
        jwt_secret=GOTRUE_JWT_SECRET,
        supabase_timeout_seconds=5.0,
    )
    secrets = Secrets(settings)
    secrets.values["GoTrue anon key"] = GOTRUE_ANON_KEY
    app = create_app(settings)

    with capture_log_output() as output:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://pocketllm.test") as client:
                headers = await run_auth_flow(client, unique_email, secrets)
                signed_out = await client.post("/v1/auth/signout", headers=headers)
                assert signed_out.status_code == 200, signed_out.text

    logged = output.getvalue()
    assert "auth.signed_in" in logged
    for label, secret in secrets.values.items():
        assert secret not in logged, f"the {label} is in the log: {lines_containing(logged, secret)}"
