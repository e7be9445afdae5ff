"""/v1/providers against the fake provider server, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from pocketllm.db.engine import Database
from pocketllm.models import ProviderConfig
from pocketllm.providers.registry import PROVIDERS
from tests.fakes.provider import VALID_ANTHROPIC_API_KEY, VALID_API_KEY, FakeProvider
from tests.helpers import auth_headers, sign_up


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # The fake provider listens on 127.0.0.1, which the outbound guard blocks by default.
    return {"allow_private_provider_urls": True}


@pytest.fixture
async def headers(client: httpx.AsyncClient, unique_email: str) -> dict[str, str]:
    return auth_headers(await sign_up(client, unique_email))


async def activate(
    client: httpx.AsyncClient, headers: dict[str, str], fake: FakeProvider, **overrides: Any
) -> httpx.Response:
    payload = {"provider": "openai", "api_key": VALID_API_KEY, "base_url": fake.openai_base_url, **overrides}
    return await client.post("/v1/providers/activate", headers=headers, json=payload)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    assert isinstance(body["detail"], str)
    return body


class TestActivate:
    async def test_verifies_and_saves(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        response = await activate(client, headers, fake_provider)

        assert response.status_code == 200, response.text
        provider = response.json()["provider"]
        assert provider["provider"] == "openai"
        assert provider["is_active"] is True
        assert provider["has_api_key"] is True
        assert provider["api_key_preview"] == "…id"
        assert provider["base_url"] == fake_provider.openai_base_url
        assert provider["last_verified_at"] is not None
        sent = fake_provider.last_request("/models")
        assert sent.headers["authorization"] == f"Bearer {VALID_API_KEY}"

    async def test_rejected_key_is_provider_auth_failed(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        response = await activate(client, headers, fake_provider, api_key="sk-wrong-key-0123456789abcdef")

        body = assert_error(response, 400, "provider_auth_failed")
        assert "sk-wrong" not in body["detail"]
        listed = await client.get("/v1/providers", headers=headers)
        assert listed.json() == []

    async def test_unreachable_url(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        response = await activate(client, headers, fake_provider, base_url="http://127.0.0.1:1/v1")

        assert_error(response, 400, "provider_unreachable")

    @pytest.mark.parametrize("failure", [{"status": 500}, {"malformed_json": True}, {"delay_seconds": 3}])
    async def test_provider_failure_is_unreachable(
        self,
        client: httpx.AsyncClient,
        headers: dict[str, str],
        fake_provider: FakeProvider,
        app: Any,
        failure: dict[str, Any],
    ) -> None:
        app.state.providers.catalogue.timeout_seconds = 1
        fake_provider.fail_next("/models", **failure)

        response = await activate(client, headers, fake_provider)

        assert_error(response, 400, "provider_unreachable")

    async def test_redirect_is_not_followed(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        fake_provider.fail_next("/models", redirect_to="http://169.254.169.254/latest/meta-data/")

        response = await activate(client, headers, fake_provider)

        assert_error(response, 400, "provider_unreachable")
        assert len(fake_provider.requests) == 1

    async def test_verify_false_skips_the_call(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        response = await activate(client, headers, fake_provider, api_key="sk-unchecked-0123456789abc", verify=False)

        assert response.status_code == 200
        assert response.json()["provider"]["last_verified_at"] is None
        assert fake_provider.requests == []

    async def test_anthropic_protocol(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        response = await activate(
            client,
            headers,
            fake_provider,
            provider="anthropic",
            api_key=VALID_ANTHROPIC_API_KEY,
            base_url=fake_provider.anthropic_base_url,
        )

        assert response.status_code == 200, response.text
        sent = fake_provider.last_request("/v1/models")
        assert sent.headers["x-api-key"] == VALID_ANTHROPIC_API_KEY
        assert sent.headers["anthropic-version"]
        assert response.json()["provider"]["message"] == "Verified: the provider accepted the key."

    async def test_keyless_provider_needs_no_key(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        fake_provider.require_api_key = False

        response = await client.post(
            "/v1/providers/activate",
            headers=headers,
            json={"provider": "ollama", "base_url": fake_provider.openai_base_url},
        )

        assert response.status_code == 200, response.text
        assert response.json()["provider"]["has_api_key"] is False
        assert response.json()["provider"]["message"] == "Verified: the provider listed its models."
        assert "authorization" not in fake_provider.last_request("/models").headers

    @pytest.mark.parametrize("api_key", ["sk-ключ-1234567890123", "sk-with space-123456", "sk-line\nbreak-12345"])
    async def test_key_must_be_visible_ascii(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, api_key: str
    ) -> None:
        response = await activate(client, headers, fake_provider, api_key=api_key)

        assert response.status_code == 422
        assert "visible ASCII" in response.json()["message"]
        assert api_key not in response.text

    async def test_key_required_for_openai(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        response = await client.post("/v1/providers/activate", headers=headers, json={"provider": "openai"})

        assert_error(response, 400, "api_key_required")

    async def test_custom_needs_base_url(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        response = await client.post(
            "/v1/providers/activate", headers=headers, json={"provider": "custom", "api_key": VALID_API_KEY}
        )

        assert_error(response, 400, "base_url_required")

    @pytest.mark.parametrize("provider", ["pocketllm", "OPENAI-NOT", "", "../etc"])
    async def test_unknown_provider(self, client: httpx.AsyncClient, headers: dict[str, str], provider: str) -> None:
        response = await client.post(
            "/v1/providers/activate", headers=headers, json={"provider": provider, "api_key": VALID_API_KEY}
        )

        assert response.status_code in (400, 422)
        assert response.json()["code"] in ("unsupported_provider", "validation_error")

    @pytest.mark.parametrize(
        "base_url", ["ftp://example.com/v1", "http://user:hunter2@127.0.0.1/v1", "not a url", "http://127.0.0.1/v1?x=1"]
    )
    async def test_invalid_base_url(self, client: httpx.AsyncClient, headers: dict[str, str], base_url: str) -> None:
        response = await client.post(
            "/v1/providers/activate",
            headers=headers,
            json={"provider": "custom", "api_key": VALID_API_KEY, "base_url": base_url},
        )

        body = assert_error(response, 400, "invalid_base_url")
        assert "hunter2" not in body["detail"]

    async def test_reactivation_updates_in_place(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, database: Database
    ) -> None:
        first = (await activate(client, headers, fake_provider)).json()["provider"]
        await client.delete("/v1/providers/openai", headers=headers)

        again = await client.post(
            "/v1/providers/activate",
            headers=headers,
            json={"provider": "openai", "base_url": fake_provider.openai_base_url},
        )

        assert again.status_code == 200, again.text
        assert again.json()["provider"]["id"] == first["id"]
        assert again.json()["provider"]["is_active"] is True
        async with database.transaction() as session:
            rows = list(await session.scalars(select(ProviderConfig)))
        assert len(rows) == 1

    async def test_key_is_encrypted_at_rest(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, database: Database
    ) -> None:
        await activate(client, headers, fake_provider)

        async with database.transaction() as session:
            row = await session.scalar(select(ProviderConfig))
        assert row is not None
        assert row.api_key_encrypted is not None
        assert VALID_API_KEY not in row.api_key_encrypted

    async def test_requires_authentication(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/providers/activate", json={"provider": "openai"})

        assert_error(response, 401, "not_authenticated")


class TestGuardOnSave:
    @pytest.mark.parametrize(
        "base_url", ["http://169.254.169.254/v1", "http://0xa9fea9fe/v1", "http://metadata.google.internal/v1"]
    )
    async def test_metadata_rejected_without_verification(
        self, client: httpx.AsyncClient, headers: dict[str, str], base_url: str
    ) -> None:
        response = await client.post(
            "/v1/providers/activate",
            headers=headers,
            json={"provider": "custom", "api_key": VALID_API_KEY, "base_url": base_url, "verify": False},
        )

        assert_error(response, 400, "provider_url_not_allowed")
        assert (await client.get("/v1/providers", headers=headers)).json() == []

    @pytest.mark.parametrize("settings_overrides", [{"allow_private_provider_urls": False}])
    async def test_private_rejected_without_verification(
        self, client: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        response = await client.post(
            "/v1/providers/activate",
            headers=headers,
            json={"provider": "ollama", "verify": False},
        )

        assert_error(response, 400, "provider_url_not_allowed")

    async def test_patch_to_metadata_rejected_without_verification(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate(client, headers, fake_provider)

        response = await client.patch(
            "/v1/providers/openai", headers=headers, json={"base_url": "http://[fd00:ec2::254]/v1", "verify": False}
        )

        assert_error(response, 400, "provider_url_not_allowed")
        listed = (await client.get("/v1/providers", headers=headers)).json()
        assert listed[0]["base_url"] == fake_provider.openai_base_url

    async def test_unresolvable_host_saved_without_verification(
        self, client: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        response = await client.post(
            "/v1/providers/activate",
            headers=headers,
            json={"provider": "openai", "api_key": VALID_API_KEY, "verify": False},
        )

        assert response.status_code == 200, response.text

    @pytest.mark.parametrize("settings_overrides", [{"allow_private_provider_urls": False}])
    @pytest.mark.parametrize(
        "base_url",
        [
            "http://127.0.0.1:11434/v1",
            "http://localhost:11434/v1",
            "http://[::1]:8080/v1",
            "http://10.0.0.5/v1",
            "http://192.168.1.20/v1",
            "http://169.254.169.254/latest",
        ],
    )
    async def test_private_addresses_rejected(
        self, client: httpx.AsyncClient, headers: dict[str, str], base_url: str
    ) -> None:
        response = await client.post(
            "/v1/providers/activate",
            headers=headers,
            json={"provider": "custom", "api_key": VALID_API_KEY, "base_url": base_url},
        )

        assert_error(response, 400, "provider_url_not_allowed")

    async def test_metadata_rejected_even_when_private_allowed(
        self, client: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        response = await client.post(
            "/v1/providers/activate",
            headers=headers,
            json={"provider": "custom", "api_key": VALID_API_KEY, "base_url": "http://169.254.169.254/v1"},
        )

        assert_error(response, 400, "provider_url_not_allowed")


class TestListAndStatus:
    async def test_list_is_empty_array_at_first(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        response = await client.get("/v1/providers", headers=headers)

        assert response.status_code == 200
        assert response.json() == []

    async def test_status_covers_every_provider(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate(client, headers, fake_provider)

        statuses = {
            entry["provider"]: entry for entry in (await client.get("/v1/providers/status", headers=headers)).json()
        }

        assert set(statuses) == set(PROVIDERS)
        assert statuses["openai"]["configured"] is True
        assert statuses["openai"]["is_active"] is True
        assert statuses["openai"]["has_api_key"] is True
        assert statuses["openai"]["api_key_preview"] == "…id"
        assert statuses["anthropic"]["configured"] is False
        assert statuses["anthropic"]["message"] == "Not configured."
        for entry in statuses.values():
            assert isinstance(entry["display_name"], str)
            assert isinstance(entry["message"], str)

    async def test_list_shows_configuration(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate(client, headers, fake_provider, display_name="My OpenAI", metadata={"team": "core"})

        listed = (await client.get("/v1/providers", headers=headers)).json()

        assert len(listed) == 1
        assert listed[0]["display_name"] == "My OpenAI"
        assert listed[0]["metadata"] == {"team": "core"}
        assert "api_key" not in listed[0]


class TestUpdate:
    async def test_rotates_key_after_verifying(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate(client, headers, fake_provider)
        fake_provider.valid_keys.add("sk-second-valid-key-000111222")

        response = await client.patch(
            "/v1/providers/openai", headers=headers, json={"api_key": "sk-second-valid-key-000111222"}
        )

        assert response.status_code == 200, response.text
        assert response.json()["api_key_preview"] == "sk-…1222"
        assert fake_provider.last_request("/models").headers["authorization"] == "Bearer sk-second-valid-key-000111222"

    async def test_rejected_new_key_keeps_old(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate(client, headers, fake_provider)

        response = await client.patch(
            "/v1/providers/openai", headers=headers, json={"api_key": "sk-bad-key-0123456789abc"}
        )

        assert_error(response, 400, "provider_auth_failed")
        listed = (await client.get("/v1/providers", headers=headers)).json()
        assert listed[0]["api_key_preview"] == "…id"

    async def test_null_key_removes_it(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        fake_provider.require_api_key = False
        await client.post(
            "/v1/providers/activate",
            headers=headers,
            json={"provider": "custom", "api_key": VALID_API_KEY, "base_url": fake_provider.openai_base_url},
        )

        response = await client.patch("/v1/providers/custom", headers=headers, json={"api_key": None})

        assert response.status_code == 200, response.text
        assert response.json()["has_api_key"] is False
        assert response.json()["api_key_preview"] is None

    async def test_null_key_on_keyed_provider_is_rejected(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate(client, headers, fake_provider)

        response = await client.patch("/v1/providers/openai", headers=headers, json={"api_key": None})

        assert_error(response, 400, "api_key_required")

    async def test_deactivate_then_remove_key(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate(client, headers, fake_provider)

        response = await client.patch(
            "/v1/providers/openai", headers=headers, json={"api_key": None, "is_active": False}
        )

        assert response.status_code == 200, response.text
        assert response.json()["is_active"] is False
        assert response.json()["has_api_key"] is False

    async def test_metadata_and_name_without_verification(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate(client, headers, fake_provider)
        calls = len(fake_provider.requests)

        response = await client.patch(
            "/v1/providers/openai", headers=headers, json={"display_name": "Work", "metadata": {"a": 1}}
        )

        assert response.json()["display_name"] == "Work"
        assert response.json()["metadata"] == {"a": 1}
        assert len(fake_provider.requests) == calls

    async def test_not_configured_is_404(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        response = await client.patch("/v1/providers/openai", headers=headers, json={"display_name": "x"})

        assert_error(response, 404, "provider_not_found")


class TestDeactivate:
    async def test_keeps_row(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate(client, headers, fake_provider)

        response = await client.delete("/v1/providers/openai", headers=headers)

        assert response.status_code == 204
        assert response.content == b""
        listed = (await client.get("/v1/providers", headers=headers)).json()
        assert listed[0]["is_active"] is False
        assert listed[0]["has_api_key"] is True

    async def test_unconfigured_is_404(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        assert_error(await client.delete("/v1/providers/groq", headers=headers), 404, "provider_not_found")

    async def test_unknown_is_400(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        assert_error(await client.delete("/v1/providers/nope", headers=headers), 400, "unsupported_provider")


class TestProviderModels:
    async def test_lists_normalised_models(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate(client, headers, fake_provider)

        response = await client.get("/v1/providers/openai/models", headers=headers)

        assert response.status_code == 200
        ids = [model["id"] for model in response.json()]
        assert "gpt-4o-mini" in ids
        for model in response.json():
            assert model["provider"] == "openai"

    async def test_query_filters(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate(client, headers, fake_provider)

        response = await client.get("/v1/providers/openai/models", headers=headers, params={"query": "MINI"})

        assert [model["id"] for model in response.json()] == ["gpt-4o-mini"]

    async def test_inactive_provider_is_not_configured(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate(client, headers, fake_provider)
        await client.delete("/v1/providers/openai", headers=headers)

        response = await client.get("/v1/providers/openai/models", headers=headers)

        assert_error(response, 400, "provider_not_configured")

    async def test_revoked_key_is_provider_auth_failed(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate(client, headers, fake_provider, verify=False, api_key="sk-revoked-key-0123456789")

        response = await client.get("/v1/providers/openai/models", headers=headers)

        assert_error(response, 400, "provider_auth_failed")

    async def test_rate_limit_passes_retry_after(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate(client, headers, fake_provider, verify=False)
        fake_provider.fail_next("/models", status=429, retry_after=7)

        response = await client.get("/v1/providers/openai/models", headers=headers)

        assert_error(response, 429, "provider_rate_limited")
        assert response.headers["retry-after"] == "7"


async def test_other_users_cannot_see_or_change(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
) -> None:
    await activate(client, headers, fake_provider)
    other = auth_headers(await sign_up(client, "someone-else@example.com"))

    assert (await client.get("/v1/providers", headers=other)).json() == []
    assert_error(
        await client.patch("/v1/providers/openai", headers=other, json={"is_active": False}), 404, "provider_not_found"
    )
    assert_error(await client.delete("/v1/providers/openai", headers=other), 404, "provider_not_found")
    assert_error(await client.get("/v1/providers/openai/models", headers=other), 400, "provider_not_configured")
    statuses = {entry["provider"]: entry for entry in (await client.get("/v1/providers/status", headers=other)).json()}
    assert statuses["openai"]["configured"] is False
    mine = (await client.get("/v1/providers", headers=headers)).json()
    assert mine[0]["is_active"] is True


async def test_key_never_in_responses_or_logs(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bodies = [
        (await activate(client, headers, fake_provider)).text,
        (await client.get("/v1/providers", headers=headers)).text,
        (await client.get("/v1/providers/status", headers=headers)).text,
        (await client.get("/v1/providers/openai/models", headers=headers)).text,
        (await client.patch("/v1/providers/openai", headers=headers, json={"api_key": "sk-bad-0123456789abcdef"})).text,
        (await client.get("/v1/models", headers=headers)).text,
    ]
    fake_provider.fail_next("/models", status=500, message=f"upstream echo {VALID_API_KEY}")
    bodies.append((await client.get("/v1/providers/openai/models", headers=headers)).text)

    for body in bodies:
        assert VALID_API_KEY not in body
        assert "sk-bad-0123456789abcdef" not in body
    assert VALID_API_KEY not in caplog.text
    assert "sk-bad-0123456789abcdef" not in caplog.text
