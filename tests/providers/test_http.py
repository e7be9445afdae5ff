"""ProviderHttp against the fake provider: response size limits, Retry-After forms and key scrubbing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from pocketllm.providers.errors import ProviderRateLimited
from pocketllm.providers.guard import OutboundGuard
from pocketllm.providers.http import ProviderHttp, ProviderResponseTooLarge, retry_after_seconds, scrub_secret
from tests.conftest import loopback_only_resolver
from tests.fakes.provider import VALID_API_KEY, FakeProvider


@pytest.fixture
async def provider_http() -> AsyncIterator[ProviderHttp]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield ProviderHttp(client, OutboundGuard(allow_private=True, resolver=loopback_only_resolver))


async def list_models(provider_http: ProviderHttp, fake: FakeProvider, **options: int) -> object:
    return await provider_http.request_json(
        "GET",
        f"{fake.openai_base_url}/models",
        provider="openai",
        secret=VALID_API_KEY,
        headers={"Authorization": f"Bearer {VALID_API_KEY}"},
        **options,
    )


async def test_response_within_limit_is_decoded(provider_http: ProviderHttp, fake_provider: FakeProvider) -> None:
    body = await list_models(provider_http, fake_provider)

    assert isinstance(body, dict)
    assert body["data"]


async def test_response_over_limit_is_refused(provider_http: ProviderHttp, fake_provider: FakeProvider) -> None:
    fake_provider.model_list_body = {"data": [], "padding": "x" * 200_000}

    with pytest.raises(ProviderResponseTooLarge):
        await list_models(provider_http, fake_provider, max_response_bytes=100_000)


async def test_retry_after_date_becomes_seconds(provider_http: ProviderHttp, fake_provider: FakeProvider) -> None:
    moment = datetime.now(UTC) + timedelta(seconds=90)
    fake_provider.fail_next("/models", status=429, retry_after=format_datetime(moment, usegmt=True))

    with pytest.raises(ProviderRateLimited) as raised:
        await list_models(provider_http, fake_provider)

    assert raised.value.headers is not None
    assert 85 <= int(raised.value.headers["Retry-After"]) <= 91


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120),
        (" 7 ", 7),
        ("Fri, 04 Dec 2026 23:31:00 GMT", 60),
        ("Fri, 04 Dec 2026 23:00:00 GMT", 0),
        ("soon", None),
        ("-5", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_forms(value: str | None, expected: int | None) -> None:
    now = datetime(2026, 12, 4, 23, 30, tzinfo=UTC)

    assert retry_after_seconds(value, now=now) == expected


def test_secret_scrubbed_in_any_case() -> None:
    text = scrub_secret("Incorrect key SK-TEST-VALID given", VALID_API_KEY)

    assert "SK-TEST-VALID" not in text
    assert "[redacted]" in text
