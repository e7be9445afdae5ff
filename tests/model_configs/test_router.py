"""/v1/models: the aggregated catalogue and saved model configurations, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from pocketllm.db.engine import Database
from pocketllm.models import ModelConfig
from tests.fakes.provider import VALID_ANTHROPIC_API_KEY, VALID_API_KEY, FakeProvider
from tests.helpers import auth_headers, sign_up


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # The fake provider listens on 127.0.0.1, which the outbound guard blocks by default.
    return {"allow_private_provider_urls": True, "catalogue_timeout_seconds": 1.0}


@pytest.fixture
async def headers(client: httpx.AsyncClient, unique_email: str) -> dict[str, str]:
    return auth_headers(await sign_up(client, unique_email))


async def activate_openai(client: httpx.AsyncClient, headers: dict[str, str], fake: FakeProvider) -> None:
    response = await client.post(
        "/v1/providers/activate",
        headers=headers,
        json={"provider": "openai", "api_key": VALID_API_KEY, "base_url": fake.openai_base_url},
    )
    assert response.status_code == 200, response.text


async def activate_anthropic(client: httpx.AsyncClient, headers: dict[str, str], fake: FakeProvider) -> None:
    response = await client.post(
        "/v1/providers/activate",
        headers=headers,
        json={"provider": "anthropic", "api_key": VALID_ANTHROPIC_API_KEY, "base_url": fake.anthropic_base_url},
    )
    assert response.status_code == 200, response.text


async def import_models(
    client: httpx.AsyncClient, headers: dict[str, str], models: list[str], **extra: Any
) -> httpx.Response:
    return await client.post(
        "/v1/models/import", headers=headers, json={"provider": "openai", "models": models, "sync": True, **extra}
    )


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    return body


class TestCatalogue:
    async def test_gathers_all_active_providers(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        await activate_anthropic(client, headers, fake_provider)

        response = await client.get("/v1/models", headers=headers)

        assert response.status_code == 200
        by_provider: dict[str, set[str]] = {}
        for model in response.json():
            by_provider.setdefault(model["provider"], set()).add(model["id"])
        assert "gpt-4o-mini" in by_provider["openai"]
        assert "claude-sonnet-4-5-20250929" in by_provider["anthropic"]

    async def test_entries_have_client_fields(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        fake_provider.model_list_shape = "openrouter"
        await activate_openai(client, headers, fake_provider)

        models = {model["id"]: model for model in (await client.get("/v1/models", headers=headers)).json()}

        gpt4o = models["gpt-4o"]
        assert gpt4o["name"] == "GPT-4o"
        assert gpt4o["context_window"] == 128_000
        assert gpt4o["pricing"]["input"] == pytest.approx(2.5)
        assert gpt4o["pricing"]["output"] == pytest.approx(10.0)
        assert "vision" in gpt4o["capabilities"]
        assert gpt4o["metadata"]["capabilities"] == gpt4o["capabilities"]
        assert gpt4o["architecture"]["input_modalities"] == ["text", "image"]

    async def test_failing_provider_is_left_out(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        await activate_anthropic(client, headers, fake_provider)
        fake_provider.fail_next("/openai/v1/models", status=500)

        response = await client.get("/v1/models", headers=headers)

        assert response.status_code == 200
        assert {model["provider"] for model in response.json()} == {"anthropic"}

    async def test_slow_provider_is_left_out(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        await activate_anthropic(client, headers, fake_provider)
        fake_provider.fail_next("/anthropic/v1/models", delay_seconds=5)

        response = await client.get("/v1/models", headers=headers)

        assert response.status_code == 200
        assert {model["provider"] for model in response.json()} == {"openai"}

    @pytest.mark.parametrize("shape", ["bare", "odd", "openrouter"])
    async def test_list_shapes(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, shape: str
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        fake_provider.model_list_shape = shape  # type: ignore[assignment]

        response = await client.get("/v1/models", headers=headers)

        assert response.status_code == 200
        ids = [model["id"] for model in response.json()]
        assert "gpt-4o-mini" in ids
        for model in response.json():
            assert isinstance(model["id"], str)
            assert model["id"].strip()
            pricing = model["pricing"]
            if pricing is not None:
                for price in (pricing["input"], pricing["output"]):
                    assert price is None or price >= 0

    @pytest.mark.parametrize("body", [{"data": "nope"}, "text", 42, {"models": None}, [None, 1, "x"]])
    async def test_garbage_list_is_empty(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, body: Any
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        fake_provider.model_list_body = body

        response = await client.get("/v1/models", headers=headers)

        assert response.status_code == 200
        assert response.json() == []

    async def test_filters(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        await activate_anthropic(client, headers, fake_provider)

        only_anthropic = (await client.get("/v1/models", headers=headers, params={"provider": "anthropic"})).json()
        haiku = (await client.get("/v1/models", headers=headers, params={"query": "haiku"})).json()

        assert {model["provider"] for model in only_anthropic} == {"anthropic"}
        assert [model["id"] for model in haiku] == ["claude-3-5-haiku-20241022"]

    async def test_unknown_provider_filter(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        assert_error(
            await client.get("/v1/models", headers=headers, params={"provider": "nope"}), 400, "unsupported_provider"
        )

    async def test_second_call_is_cached(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        await client.get("/v1/models", headers=headers)
        calls = len(fake_provider.requests_to("/models"))

        await client.get("/v1/models", headers=headers)

        assert len(fake_provider.requests_to("/models")) == calls

    async def test_no_providers_is_empty(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        response = await client.get("/v1/models", headers=headers)

        assert response.status_code == 200
        assert response.json() == []


@pytest.mark.parametrize(
    "settings_overrides",
    [
        {
            "allow_private_provider_urls": True,
            "redis_url": os.environ.get("POCKETLLM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"),
        }
    ],
)
async def test_catalogue_cache_in_redis(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, app: Any
) -> None:
    from pocketllm.kit.cache import RedisCache

    assert isinstance(app.state.providers.cache, RedisCache)
    await activate_openai(client, headers, fake_provider)
    first = (await client.get("/v1/models", headers=headers)).json()
    calls = len(fake_provider.requests_to("/models"))

    second = (await client.get("/v1/models", headers=headers)).json()

    assert second == first
    assert len(fake_provider.requests_to("/models")) == calls


class TestImport:
    async def test_creates_configurations(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)

        response = await import_models(client, headers, ["gpt-4o-mini", "gpt-4o"])

        assert response.status_code == 200, response.text
        saved = response.json()
        assert [entry["model"] for entry in saved] == ["gpt-4o-mini", "gpt-4o"]
        first = saved[0]
        assert isinstance(first["id"], str)
        assert first["provider"] == "openai"
        # OpenAI's list has no display names, so the id stands in for one.
        assert first["name"] == "gpt-4o-mini"
        assert first["display_name"] == "gpt-4o-mini"
        assert first["is_default"] is True
        assert saved[1]["is_default"] is False
        assert first["base_url"] == fake_provider.openai_base_url
        assert first["context_window"] is None  # plain OpenAI lists carry no limits
        assert "api_key" not in first
        assert first["created_at"]
        assert first["updated_at"]

    async def test_applies_settings(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        settings = {"temperature": 0.2, "max_tokens": 512, "top_p": 0.9, "system_prompt": "Be brief.", "seed": 7}

        saved = (await import_models(client, headers, ["gpt-4o-mini"], settings=settings, provider_id="x")).json()

        assert saved[0]["settings"]["temperature"] == 0.2
        assert saved[0]["settings"]["max_tokens"] == 512
        assert saved[0]["settings"]["system_prompt"] == "Be brief."
        assert saved[0]["settings"]["seed"] == 7

    async def test_reimport_updates_in_place(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, database: Database
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        first = (await import_models(client, headers, ["gpt-4o-mini"])).json()[0]

        second = (await import_models(client, headers, ["gpt-4o-mini"], settings={"temperature": 1.1})).json()[0]

        assert second["id"] == first["id"]
        assert second["settings"]["temperature"] == 1.1
        async with database.transaction() as session:
            assert await session.scalar(select(func.count()).select_from(ModelConfig)) == 1

    async def test_unknown_model_is_rejected(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)

        response = await import_models(client, headers, ["gpt-4o-mini", "gpt-9000"])

        body = assert_error(response, 400, "unknown_model")
        assert "gpt-9000" in body["detail"]
        assert (await client.get("/v1/models/saved", headers=headers)).json() == []

    async def test_without_sync_takes_ids_as_given(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        calls = len(fake_provider.requests)

        response = await import_models(client, headers, ["my-finetune"], sync=False)

        assert response.status_code == 200
        assert response.json()[0]["display_name"] == "my-finetune"
        assert len(fake_provider.requests) == calls

    async def test_without_models_imports_catalogue(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)

        response = await client.post("/v1/models/import", headers=headers, json={"provider": "openai"})

        assert {entry["model"] for entry in response.json()} >= {"gpt-4o-mini", "gpt-4o"}

    async def test_without_sync_needs_models(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)

        response = await client.post("/v1/models/import", headers=headers, json={"provider": "openai", "sync": False})

        assert_error(response, 400, "models_required")

    async def test_inactive_provider(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        assert_error(await import_models(client, headers, ["gpt-4o-mini"]), 400, "provider_not_configured")

    @pytest.mark.parametrize(
        "model_settings",
        [{"temperature": 5}, {"top_p": -1}, {"max_tokens": 0}, {"frequency_penalty": 3}, {"temperature": "hot"}],
    )
    async def test_invalid_settings_are_422(
        self,
        client: httpx.AsyncClient,
        headers: dict[str, str],
        fake_provider: FakeProvider,
        model_settings: dict[str, Any],
    ) -> None:
        await activate_openai(client, headers, fake_provider)

        response = await import_models(client, headers, ["gpt-4o-mini"], settings=model_settings)

        assert response.status_code == 422
        body = response.json()
        assert body["code"] == "validation_error"
        assert next(iter(model_settings)) in body["message"]


class TestSavedModels:
    async def test_list_get_patch_delete(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        saved = (
            await import_models(client, headers, ["gpt-4o-mini"], settings={"temperature": 0.5, "top_p": 0.8})
        ).json()
        model_id = saved[0]["id"]

        listed = (await client.get("/v1/models/saved", headers=headers)).json()
        fetched = (await client.get(f"/v1/models/{model_id}", headers=headers)).json()
        patched = await client.patch(
            f"/v1/models/{model_id}",
            headers=headers,
            json={"display_name": "Mini", "description": "fast", "settings": {"temperature": 1.0, "top_p": None}},
        )
        deleted = await client.delete(f"/v1/models/{model_id}", headers=headers)

        assert [entry["id"] for entry in listed] == [model_id]
        assert fetched["model"] == "gpt-4o-mini"
        assert patched.status_code == 200, patched.text
        assert patched.json()["display_name"] == "Mini"
        assert patched.json()["description"] == "fast"
        assert patched.json()["settings"]["temperature"] == 1.0
        assert patched.json()["settings"]["top_p"] is None
        assert deleted.status_code == 204
        assert (await client.get("/v1/models/saved", headers=headers)).json() == []
        assert_error(await client.get(f"/v1/models/{model_id}", headers=headers), 404, "model_not_found")

    async def test_patch_token_limits(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        model_id = (await import_models(client, headers, ["gpt-4o-mini"])).json()[0]["id"]

        patched = await client.patch(
            f"/v1/models/{model_id}", headers=headers, json={"context_window": 32_000, "max_output_tokens": 4_000}
        )
        renamed = await client.patch(f"/v1/models/{model_id}", headers=headers, json={"display_name": "Mini"})
        cleared = await client.patch(f"/v1/models/{model_id}", headers=headers, json={"context_window": None})

        assert patched.status_code == 200, patched.text
        assert patched.json()["context_window"] == 32_000
        assert patched.json()["max_output_tokens"] == 4_000
        assert renamed.json()["context_window"] == 32_000
        assert renamed.json()["max_output_tokens"] == 4_000
        assert cleared.json()["context_window"] is None
        assert cleared.json()["max_output_tokens"] == 4_000
        fetched = (await client.get(f"/v1/models/{model_id}", headers=headers)).json()
        assert fetched["context_window"] is None
        assert fetched["max_output_tokens"] == 4_000

    @pytest.mark.parametrize(
        "body",
        [
            {"context_window": 0},
            {"context_window": 2**31},
            {"context_window": "large"},
            {"max_output_tokens": -5},
            {"max_output_tokens": 1_000_001},
        ],
    )
    async def test_invalid_token_limits_are_422(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, body: dict[str, Any]
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        model_id = (await import_models(client, headers, ["gpt-4o-mini"])).json()[0]["id"]
        before = (await client.get(f"/v1/models/{model_id}", headers=headers)).json()

        response = await client.patch(f"/v1/models/{model_id}", headers=headers, json={**body, "description": "new"})

        assert response.status_code == 422
        assert next(iter(body)) in response.json()["message"]
        assert (await client.get(f"/v1/models/{model_id}", headers=headers)).json() == before

    @pytest.mark.parametrize("model_id", ["not-a-uuid", "00000000-0000-0000-0000-000000000000"])
    async def test_missing_is_404(self, client: httpx.AsyncClient, headers: dict[str, str], model_id: str) -> None:
        assert_error(await client.get(f"/v1/models/{model_id}", headers=headers), 404, "model_not_found")
        assert_error(await client.delete(f"/v1/models/{model_id}", headers=headers), 404, "model_not_found")
        assert_error(
            await client.post(f"/v1/models/{model_id}/default", headers=headers, json={}), 404, "model_not_found"
        )

    async def test_invalid_patch_is_422(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        model_id = (await import_models(client, headers, ["gpt-4o-mini"])).json()[0]["id"]

        response = await client.patch(f"/v1/models/{model_id}", headers=headers, json={"settings": {"max_tokens": -1}})

        assert response.status_code == 422
        assert "max_tokens" in response.json()["message"]

    async def test_empty_id_default_is_400(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        assert_error(await client.post("/v1/models//default", headers=headers, json={}), 400, "model_id_required")


class TestDefault:
    async def test_switches_default(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        _first, second = (await import_models(client, headers, ["gpt-4o-mini", "gpt-4o"])).json()

        response = await client.post(f"/v1/models/{second['id']}/default", headers=headers, json={})

        assert response.status_code == 200
        assert response.json()["is_default"] is True
        defaults = [
            entry["id"]
            for entry in (await client.get("/v1/models/saved", headers=headers)).json()
            if entry["is_default"]
        ]
        assert defaults == [second["id"]]

    async def test_body_is_optional(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        model_id = (await import_models(client, headers, ["gpt-4o-mini", "gpt-4o"])).json()[1]["id"]

        response = await client.post(f"/v1/models/{model_id}/default", headers=headers)

        assert response.status_code == 200, response.text
        assert response.json()["is_default"] is True

    async def test_unset_default(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        model_id = (await import_models(client, headers, ["gpt-4o-mini"])).json()[0]["id"]

        response = await client.post(f"/v1/models/{model_id}/default", headers=headers, json={"is_default": False})

        assert response.json()["is_default"] is False

    async def test_deleting_default_promotes_another(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        first, second = (await import_models(client, headers, ["gpt-4o-mini", "gpt-4o"])).json()

        await client.delete(f"/v1/models/{first['id']}", headers=headers)

        remaining = (await client.get("/v1/models/saved", headers=headers)).json()
        assert [(entry["id"], entry["is_default"]) for entry in remaining] == [(second["id"], True)]

    async def test_concurrent_defaults_leave_exactly_one(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await activate_openai(client, headers, fake_provider)
        saved = (await import_models(client, headers, ["gpt-4o-mini", "gpt-4o", "dall-e-3"])).json()

        responses = await asyncio.gather(
            *(client.post(f"/v1/models/{entry['id']}/default", headers=headers, json={}) for entry in saved * 3)
        )

        assert [response.status_code for response in responses] == [200] * 9
        defaults = [
            entry for entry in (await client.get("/v1/models/saved", headers=headers)).json() if entry["is_default"]
        ]
        assert len(defaults) == 1


async def test_other_users_get_404(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
) -> None:
    await activate_openai(client, headers, fake_provider)
    model_id = (await import_models(client, headers, ["gpt-4o-mini"])).json()[0]["id"]
    other = auth_headers(await sign_up(client, "intruder@example.com"))

    assert (await client.get("/v1/models/saved", headers=other)).json() == []
    assert (await client.get("/v1/models", headers=other)).json() == []
    assert_error(await client.get(f"/v1/models/{model_id}", headers=other), 404, "model_not_found")
    assert_error(
        await client.patch(f"/v1/models/{model_id}", headers=other, json={"display_name": "x"}), 404, "model_not_found"
    )
    assert_error(await client.post(f"/v1/models/{model_id}/default", headers=other, json={}), 404, "model_not_found")
    assert_error(await client.delete(f"/v1/models/{model_id}", headers=other), 404, "model_not_found")
    assert (await client.get(f"/v1/models/{model_id}", headers=headers)).status_code == 200


async def test_requires_authentication(client: httpx.AsyncClient) -> None:
    for method, path in [("GET", "/v1/models"), ("GET", "/v1/models/saved"), ("POST", "/v1/models/import")]:
        response = await client.request(method, path, json={} if method == "POST" else None)
        assert response.status_code == 401
        assert response.json()["code"] == "not_authenticated"


async def test_client_setup_sequence(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert (await client.get("/v1/providers", headers=headers)).json() == []
    await activate_openai(client, headers, fake_provider)
    catalogue = await client.get("/v1/models", headers=headers)
    imported = await client.post(
        "/v1/models/import", headers=headers, json={"provider": "openai", "models": ["gpt-4o-mini"], "sync": True}
    )
    saved = (await client.get("/v1/models/saved", headers=headers)).json()
    default = await client.post(f"/v1/models/{saved[0]['id']}/default", headers=headers, json={})

    assert isinstance(catalogue.json(), list)
    assert isinstance(imported.json(), list)
    assert saved[0]["is_default"] is True
    assert isinstance(default.json(), dict)
    assert VALID_API_KEY not in caplog.text
