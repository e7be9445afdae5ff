"""ProviderHttp against the fake provider: response size limits, Retry-After forms and key scrubbing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.cookiejar import CookieJar
from pathlib import Path

import httpx
import pytest

from pocketllm.app import build_provider_runtime
from pocketllm.providers.chat import read_json_body
from pocketllm.providers.errors import ProviderRateLimited, ProviderRequestFailed, ProviderTimeout
from pocketllm.providers.guard import OutboundGuard
from pocketllm.providers.http import (
    MAX_ERROR_BODY_BYTES,
    MAX_RESPONSE_BYTES,
    JsonBody,
    ProviderHttp,
    ProviderResponseTooLarge,
    retry_after_seconds,
    scrub_secret,
)
from tests.conftest import loopback_only_resolver, make_settings
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


async def test_provider_cookie_not_sent_again(tmp_path: Path, fake_provider: FakeProvider) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/unused.db", tmp_path, allow_private_provider_urls=True)
    runtime = build_provider_runtime(settings)
    # A normal response, a millisecond late, with a cookie.
    fake_provider.fail_next("/models", delay_seconds=0.001, headers={"Set-Cookie": "affinity=first-caller; Path=/"})
    try:
        await list_models(runtime.http, fake_provider)
        await list_models(runtime.http, fake_provider)
    finally:
        await runtime.close()

    first, second = fake_provider.requests_to("/models")
    assert "cookie" not in first.headers
    assert "cookie" not in second.headers


async def test_cookie_added_by_code_not_sent(tmp_path: Path, fake_provider: FakeProvider) -> None:
    settings = make_settings(f"sqlite+aiosqlite:///{tmp_path}/unused.db", tmp_path, allow_private_provider_urls=True)
    runtime = build_provider_runtime(settings)
    # The clients share one cookie store, so a cookie added to it would go out for every user.
    store = runtime.http_client.shared.cookies
    store.update({"added": "by-update"})
    store["assigned"] = "by-item"
    store.set("set", "by-set")
    with pytest.raises(TypeError):
        store.jar = CookieJar()
    try:
        await list_models(runtime.http, fake_provider)
    finally:
        await runtime.close()

    assert len(store) == 0
    assert "cookie" not in fake_provider.last_request("/models").headers


async def test_malformed_json_message_matches_reply_path(
    provider_http: ProviderHttp, fake_provider: FakeProvider
) -> None:
    fake_provider.fail_next("/models", malformed_json=True)
    reply_body = httpx.Response(200, content=b"{not json", request=httpx.Request("POST", "http://127.0.0.1/"))
    with pytest.raises(ProviderRequestFailed) as listing:
        await list_models(provider_http, fake_provider)
    with pytest.raises(ProviderRequestFailed) as reply:
        await read_json_body(reply_body, provider="openai")

    assert listing.value.message == reply.value.message == "openai sent a response that is not valid JSON."


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


# Bodies of a provider that does not behave: a raw HTTP/1.1 server on 127.0.0.1


@asynccontextmanager
async def raw_provider(response_head: bytes, body_start: bytes) -> AsyncIterator[str]:
    """Serve one response head and the start of its body to every request, then hold the connection open.

    Yields the base URL. A client that reads the whole declared body waits until its read timeout.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response_head + body_start)
        await writer.drain()
        await reader.read()  # until the client closes

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def open_stream(provider_http: ProviderHttp, url: str) -> None:
    async with provider_http.stream(
        "POST", f"{url}/chat/completions", provider="custom", secret=None, json_body=JsonBody({}), timeout=3.0
    ):
        pass


ERROR_HEAD = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
LONG_CHUNK = b"x" * (MAX_ERROR_BODY_BYTES + 1024)


@pytest.mark.parametrize(
    ("head", "body_start"),
    [
        # Chunked, with more than the limit sent: the read stops at the limit.
        (ERROR_HEAD + b"Transfer-Encoding: chunked\r\n\r\n", f"{len(LONG_CHUNK):x}\r\n".encode() + LONG_CHUNK),
        # Declared far longer than the limit, with little sent: the body is not read.
        (ERROR_HEAD + b"Content-Length: 100000000\r\n\r\n", b'{"error": {"message": "overloaded"}}'),
    ],
    ids=["chunked", "declared"],
)
async def test_stream_error_body_read_in_part(provider_http: ProviderHttp, head: bytes, body_start: bytes) -> None:
    async with raw_provider(head, body_start) as url:
        started = time.monotonic()
        with pytest.raises(ProviderRequestFailed) as raised:
            await open_stream(provider_http, url)

    # Reading the whole declared body would have run into the read timeout instead.
    assert raised.value.code == "provider_unavailable"
    assert time.monotonic() - started < 2.5


async def test_undecodable_body_is_provider_error(provider_http: ProviderHttp, fake_provider: FakeProvider) -> None:
    # A JSON body sent as gzip. The fake takes a rule that only adds a header when it also has a delay.
    fake_provider.fail_next("/models", headers={"content-encoding": "gzip"}, delay_seconds=0.01)

    with pytest.raises(ProviderRequestFailed) as raised:
        await list_models(provider_http, fake_provider)

    assert raised.value.code == "provider_unavailable"
    assert "could not be decoded" in raised.value.message


async def test_full_pool_named_in_timeout(fake_provider: FakeProvider) -> None:
    fake_provider.fail_next("/models", delay_seconds=2.0)
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=httpx.Timeout(5.0, pool=0.2)) as client:
        provider_http = ProviderHttp(client, OutboundGuard(allow_private=True, resolver=loopback_only_resolver))
        slow = asyncio.create_task(list_models(provider_http, fake_provider))
        await asyncio.to_thread(fake_provider.wait_for_requests, "/models")
        with pytest.raises(ProviderTimeout) as raised:
            await list_models(provider_http, fake_provider)
        await slow

    assert "connections" in raised.value.message


async def test_stream_json_answer_over_limit(provider_http: ProviderHttp) -> None:
    declared = MAX_RESPONSE_BYTES + 1
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n".encode()

    async with (
        raw_provider(head, b'{"choices": [') as url,
        provider_http.stream(
            "POST", f"{url}/chat/completions", provider="custom", secret=None, json_body=JsonBody({}), timeout=3.0
        ) as response,
    ):
        with pytest.raises(ProviderResponseTooLarge):
            await read_json_body(response, provider="custom")


async def test_stream_body_sent_then_released(provider_http: ProviderHttp, fake_provider: FakeProvider) -> None:
    prompt = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "é" * 1000}], "stream": True}
    body = JsonBody(prompt)

    async with provider_http.stream(
        "POST",
        f"{fake_provider.openai_base_url}/chat/completions",
        provider="openai",
        secret=VALID_API_KEY,
        headers={"Authorization": f"Bearer {VALID_API_KEY}"},
        json_body=body,
    ) as response:
        released_while_open = body.sent
        await response.aread()

    received = fake_provider.last_request("/chat/completions")
    assert response.status_code == 200
    assert received.body == prompt
    assert received.headers["content-length"] == str(body.length)
    assert "transfer-encoding" not in received.headers
    assert released_while_open
