"""Schemathesis fuzzing of every operation in the app's own /openapi.json.

For each generated request, valid and invalid, the checks are: no 5xx (`not_a_server_error`), the status
is documented (`status_code_conformance`) and the body matches the documented schema
(`response_schema_conformance`).

How the run is set up:

* The document is fetched from `/openapi.json` of an app built by `create_app`, over ASGI in-process, when
  the module is imported. NOTE: `schemathesis.pytest.from_fixture` would load it per test instead, but in
  schemathesis 4.32.5 it fails on pytest 9.2, because it reads `Node._nodeid`, which pytest 9 removed.
* Each operation gets a fresh app on the suite's `database_url`, on SQLite only. Each operation runs
  MAX_EXAMPLES fuzzing examples, plus the schema examples and the coverage phase's boundary cases. The
  module took about 50 s on 2 otherwise idle cores. Running the fuzz tests on PostgreSQL as well took
  about 30 s more. Every other API test runs on both databases, and JsonBodyRoute rejects the strings
  PostgreSQL cannot store before any handler runs.
* Runs are reproducible: a fixed schemathesis seed and `derandomize=True`, which also keeps Hypothesis
  from storing failing examples between runs. The deadline is off because one example can wait for a
  provider call to time out.
* Before the run, each app gets one user, an OpenAI provider pointing at the fake provider on
  127.0.0.1, an imported model, a chat with a reply and an image job. Every generated request to an
  operation with a security requirement carries that user's access token. In the fuzzing phase, the
  `flatmap_path_parameters` hook lets Hypothesis pick either the generated path parameters or the ids of
  those resources, so operations on one resource get past their 404s. The coverage phase does not call
  the hook.
* `test_fuzz_without_token` sends MAX_EXAMPLES_WITHOUT_TOKEN requests without a token to every operation
  with a security requirement, and each must be rejected.
* Provider requests can reach loopback only. Private addresses are allowed so that the fake provider is
  reachable, DNS resolves `localhost` only (`loopback_only_resolver`), and LoopbackOnlyGuard rejects every
  other checked address, including literal public IP addresses in a generated base URL. Every provider
  request, catalogue fetch and chat reply goes through the guard's `check`. No image job runs, because
  the app starts no worker, and mail is only logged, because SMTP_URL is unset.
* No operation is excluded. The avatar upload is fuzzed with generated multipart bodies, and streamed chat
  replies are read up to schemathesis' event limit.
"""

from __future__ import annotations

import ipaddress
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import strategies as st
from schemathesis.python import asgi as schemathesis_asgi

from pocketllm.app import create_app
from pocketllm.config import Settings
from pocketllm.providers.guard import CheckedTarget, OutboundGuard, ProviderUrlNotAllowed
from tests.conftest import loopback_only_resolver, make_settings
from tests.fakes.provider import VALID_API_KEY, FakeProvider
from tests.helpers import auth_headers, sign_up

MAX_EXAMPLES = 25
MAX_EXAMPLES_WITHOUT_TOKEN = 5
SEED = 20240611
# Path parameters that the `flatmap_path_parameters` hook can set to the id of a resource made in `seeded`.
SEEDED_PATH_PARAMETERS = ("chat_id", "model_id", "job_id", "provider", "user_id")


class LoopbackOnlyGuard(OutboundGuard):
    """The outbound guard with one more rule: every checked address must be a loopback address."""

    async def check(self, url: str) -> CheckedTarget:
        target = await super().check(url)
        if not ipaddress.ip_address(target.address).is_loopback:
            raise ProviderUrlNotAllowed(f"Fuzz tests send provider requests to loopback only, not {target.address}.")
        return target


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # The fake provider listens on 127.0.0.1, which the outbound guard blocks by default.
    return {"allow_private_provider_urls": True, "provider_read_timeout_seconds": 2.0}


def fuzz_config(*, max_examples: int, coverage_phase: bool) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            # The access token is set by the tests, so generating Authorization headers would be wasted.
            "generation": {"max-examples": max_examples, "with-security-parameters": False},
            "phases": {"coverage": {"enabled": coverage_phase}},
            "checks": {
                "enabled": False,
                "not_a_server_error": {"enabled": True},
                "status_code_conformance": {"enabled": True},
                "response_schema_conformance": {"enabled": True},
            },
        }
    )


def load_openapi_document() -> dict[str, Any]:
    """Fetch /openapi.json from an app that is never started: no database connection, no network."""
    with tempfile.TemporaryDirectory() as data_dir:
        app = create_app(make_settings(f"sqlite+aiosqlite:///{Path(data_dir) / 'unused.db'}", Path(data_dir)))
        # Outside a `with` block the client does not run the app's lifespan.
        response = schemathesis_asgi.get_client(app).get("/openapi.json")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def requires_token(operation: schemathesis.APIOperation) -> bool:
    return bool(operation.definition.raw.get("security"))


OPENAPI_DOCUMENT = load_openapi_document()
schema = schemathesis.openapi.from_dict(
    OPENAPI_DOCUMENT, config=fuzz_config(max_examples=MAX_EXAMPLES, coverage_phase=True)
)
# Without a token every request stops at authentication, so the coverage phase's boundary values of the
# other parameters would add time and no new paths through the code.
schema_without_token = schemathesis.openapi.from_dict(
    OPENAPI_DOCUMENT, config=fuzz_config(max_examples=MAX_EXAMPLES_WITHOUT_TOKEN, coverage_phase=False)
).include(lambda context: requires_token(context.operation))


@schema.hook
def flatmap_path_parameters(context: schemathesis.HookContext, path_parameters: dict[str, Any] | None) -> Any:
    # The ids differ per app, so the hook draws a placeholder and the test replaces it with the real id.
    # Schemathesis percent-encodes path parameters, so the placeholder uses only unreserved characters.
    generated = path_parameters or {}
    placeholders = {name: f"seeded-{name}" for name in generated if name in SEEDED_PATH_PARAMETERS}
    if not placeholders:
        return st.just(path_parameters)
    return st.sampled_from([generated, {**generated, **placeholders}])


@dataclass
class Seeded:
    """The user and resources made before the fuzz run of one operation."""

    access_token: str
    path_parameters: dict[str, str]


@pytest.fixture
def fuzz_app(settings: Settings) -> Iterator[FastAPI]:
    """An app whose lifespan runs on schemathesis' ASGI event loop, where every generated request runs."""
    app = create_app(settings)
    with schemathesis_asgi.get_client(app):
        app.state.providers.http.guard = LoopbackOnlyGuard(allow_private=True, resolver=loopback_only_resolver)
    yield app
    # NOTE: schemathesis 4.32 has no public call that stops the lifespan of one app, so this stops them all.
    schemathesis_asgi.shutdown_lifespans()


def _post(client: schemathesis_asgi.ASGIClient, path: str, access_token: str | None, body: Any) -> Any:
    headers = {"Authorization": f"Bearer {access_token}"} if access_token else {}
    response = client.post(path, json=body, headers=headers)
    assert response.status_code < 300, f"POST {path} returned {response.status_code}: {response.text}"
    return response.json()


@pytest.fixture
def seeded(fuzz_app: FastAPI, fake_provider: FakeProvider) -> Seeded:
    client = schemathesis_asgi.get_client(fuzz_app)
    signup = _post(client, "/v1/auth/signup", None, {"email": "fuzz@example.com", "password": "Sup3rSecret!"})
    token = signup["tokens"]["access_token"]
    provider = {"provider": "openai", "api_key": VALID_API_KEY, "base_url": fake_provider.openai_base_url}
    _post(client, "/v1/providers/activate", token, provider)
    model = _post(client, "/v1/models/import", token, {"provider": "openai", "models": ["gpt-4o-mini"]})[0]
    chat = _post(client, "/v1/chats", token, {"model_config_id": model["id"]})
    _post(client, f"/v1/chats/{chat['id']}/messages", token, {"content": "Hello", "stream": False})
    job = _post(client, "/v1/jobs/image-generation", token, {"input_data": {"prompt": "a cat", "model": "dall-e-3"}})
    return Seeded(
        access_token=token,
        path_parameters={
            "chat_id": chat["id"],
            "model_id": model["id"],
            "job_id": job["job_id"],
            "provider": "openai",
            "user_id": signup["user"]["id"],
        },
    )


@pytest.mark.parametrize("migrated_database", ["sqlite"], indirect=True)
@schema.parametrize()
@hypothesis.settings(
    deadline=None,
    derandomize=True,
    max_examples=MAX_EXAMPLES,
    # One app per operation is the intent: examples of one operation share its user and resources.
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)
def test_fuzz_with_token(case: schemathesis.Case, fuzz_app: FastAPI, seeded: Seeded) -> None:
    for name, value in case.path_parameters.items():
        if value == f"seeded-{name}":
            case.path_parameters[name] = seeded.path_parameters[name]
    if requires_token(case.operation):
        case.headers["Authorization"] = f"Bearer {seeded.access_token}"

    case.call_and_validate(app=fuzz_app)


@pytest.mark.parametrize("migrated_database", ["sqlite"], indirect=True)
@schema_without_token.parametrize()
@hypothesis.settings(
    deadline=None,
    derandomize=True,
    max_examples=MAX_EXAMPLES_WITHOUT_TOKEN,
    suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture],
)
def test_fuzz_without_token(case: schemathesis.Case, fuzz_app: FastAPI) -> None:
    response = case.call_and_validate(app=fuzz_app)

    # The request body is read and checked before authentication, so a malformed one is rejected first.
    assert response.status_code in (400, 401, 413, 422), response.text


# Regression tests for failures the fuzz run found.


def _json_body_operations() -> list[tuple[str, str]]:
    return [
        (method.upper(), path)
        for path, operations in OPENAPI_DOCUMENT["paths"].items()
        for method, operation in operations.items()
        if "application/json" in operation.get("requestBody", {}).get("content", {})
    ]


async def test_validation_error_matches_documented_422(client: httpx.AsyncClient, unique_email: str) -> None:
    # These routes also return domain errors with 422, whose ErrorBody once replaced the validation body.
    headers = auth_headers(await sign_up(client, unique_email))

    for path in ("/v1/auth/signup", "/v1/jobs/image-generation", "/v1/users/profile/onboarding"):
        response = await client.post(path, headers=headers)

        assert response.status_code == 422, response.text
        assert isinstance(response.json()["detail"], list)
        schema[path]["POST"].validate_response(response)


@pytest.mark.parametrize("migrated_database", ["sqlite"], indirect=True)
async def test_undecodable_json_body_is_documented_400(client: httpx.AsyncClient) -> None:
    # For bytes that are not UTF-8, FastAPI returns 400 before authentication or validation runs.
    for method, path in _json_body_operations():
        url = path.format(chat_id=uuid.uuid4(), model_id=uuid.uuid4(), provider="openai")

        response = await client.request(method, url, content=b"\xff\x03", headers={"Content-Type": "application/json"})

        assert response.status_code == 400, f"{method} {path}: {response.text}"
        assert response.json()["code"] == "bad_request", f"{method} {path}"
        assert "400" in OPENAPI_DOCUMENT["paths"][path][method.lower()]["responses"], f"{method} {path}"
        schema[path][method].validate_response(response)


async def test_loopback_only_guard_rejects_public_address() -> None:
    guard = LoopbackOnlyGuard(allow_private=True, resolver=loopback_only_resolver)

    with pytest.raises(ProviderUrlNotAllowed):
        await guard.check("http://93.184.216.34/v1")
    with pytest.raises(ProviderUrlNotAllowed):
        await guard.check("http://10.0.0.1/v1")
    target = await guard.check("http://localhost:8080/v1")
    assert target.address == "127.0.0.1"


async def test_activation_with_public_address_is_rejected(
    app: FastAPI, client: httpx.AsyncClient, unique_email: str
) -> None:
    app.state.providers.http.guard = LoopbackOnlyGuard(allow_private=True, resolver=loopback_only_resolver)
    headers = auth_headers(await sign_up(client, unique_email))

    response = await client.post(
        "/v1/providers/activate",
        headers=headers,
        json={"provider": "openai", "api_key": VALID_API_KEY, "base_url": "http://93.184.216.34/v1"},
    )

    assert response.status_code == 400, response.text
    assert response.json()["code"] == "provider_url_not_allowed"
