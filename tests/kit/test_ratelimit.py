"""The rate limiter, in memory and on the real Redis server at 127.0.0.1:6379, and client address selection."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest
from pydantic import ValidationError
from redis.asyncio import Redis
from starlette.requests import Request
from structlog.testing import capture_logs

from pocketllm.config import Settings
from pocketllm.errors import RateLimited
from pocketllm.kit.ratelimit import RateLimiter, build_rate_limiter, client_address, parse_trusted_proxies

REDIS_URL = os.environ.get("POCKETLLM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


async def _redis_unreachable_reason() -> str | None:
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
        return None
    except Exception as error:  # redis raises its own ConnectionError, which is not an OSError
        return f"{type(error).__name__}: {error}"
    finally:
        await client.aclose()


async def require_redis() -> None:
    reason = await _redis_unreachable_reason()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Redis is required under CI but unreachable at {REDIS_URL}: {reason}")
    pytest.skip(f"Redis unreachable at {REDIS_URL}: {reason}")


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[RateLimiter]:
    if request.param == "memory":
        yield build_rate_limiter(None)
        return
    await require_redis()
    redis_limiter = build_rate_limiter(REDIS_URL, key_prefix=f"test-{uuid.uuid4().hex}")
    yield redis_limiter
    await redis_limiter.reset()
    await redis_limiter.close()


async def test_hits_within_limit_pass(limiter: RateLimiter) -> None:
    for _ in range(3):
        await limiter.hit("signin", "203.0.113.7", "3/minute")


async def test_hit_over_limit_raises(limiter: RateLimiter) -> None:
    for _ in range(3):
        await limiter.hit("signin", "203.0.113.7", "3/minute")

    with pytest.raises(RateLimited) as raised:
        await limiter.hit("signin", "203.0.113.7", "3/minute")

    assert raised.value.code == "rate_limited"
    assert raised.value.headers is not None
    retry_after = raised.value.headers["Retry-After"]
    assert retry_after.isdigit()
    assert 1 <= int(retry_after) <= 60


async def test_keys_and_scopes_count_apart(limiter: RateLimiter) -> None:
    await limiter.hit("signin", "203.0.113.7", "1/minute")

    await limiter.hit("signin", "203.0.113.8", "1/minute")
    await limiter.hit("signup", "203.0.113.7", "1/minute")
    with pytest.raises(RateLimited):
        await limiter.hit("signin", "203.0.113.7", "1/minute")


async def test_disabled_limiter_never_raises() -> None:
    limiter = build_rate_limiter(None, enabled=False)

    for _ in range(5):
        await limiter.hit("signin", "203.0.113.7", "1/minute")


async def test_two_limiters_share_redis_counts() -> None:
    await require_redis()
    prefix = f"test-{uuid.uuid4().hex}"
    first = build_rate_limiter(REDIS_URL, key_prefix=prefix)
    second = build_rate_limiter(REDIS_URL, key_prefix=prefix)

    await first.hit("signin", "203.0.113.7", "2/minute")
    await second.hit("signin", "203.0.113.7", "2/minute")
    with pytest.raises(RateLimited):
        await first.hit("signin", "203.0.113.7", "2/minute")
    await first.reset()
    await first.close()
    await second.close()


async def test_redis_outage_allows_and_logs_once() -> None:
    # Port 1 on loopback refuses connections, which is how a stopped Redis looks.
    limiter = build_rate_limiter("redis://127.0.0.1:1/0", key_prefix=f"test-{uuid.uuid4().hex}")

    with capture_logs() as logs:
        for _ in range(3):
            await limiter.hit("signin", "203.0.113.7", "1/minute")

    failures = [entry for entry in logs if entry["event"] == "ratelimit.storage_failed"]
    assert len(failures) == 1
    assert failures[0]["scope"] == "signin"


def _request(peer: str | None, forwarded_for: list[str] | None = None) -> Request:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded_for or []]
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": headers,
        "client": (peer, 1234) if peer is not None else None,
    }
    return Request(scope)


def test_client_address_untrusted_peer_ignores_header() -> None:
    trusted = parse_trusted_proxies(["10.0.0.0/8"])

    address = client_address(_request("198.51.100.9", ["203.0.113.7"]), trusted)

    assert address == "198.51.100.9"


def test_client_address_no_trusted_proxies_ignores_header() -> None:
    assert client_address(_request("10.0.0.2", ["203.0.113.7"]), []) == "10.0.0.2"


def test_client_address_trusted_peer_uses_header() -> None:
    trusted = parse_trusted_proxies(["10.0.0.0/8"])

    address = client_address(_request("10.0.0.2", ["203.0.113.7"]), trusted)

    assert address == "203.0.113.7"


def test_client_address_skips_trusted_hops_from_right() -> None:
    trusted = parse_trusted_proxies(["10.0.0.0/8", "192.168.1.1"])
    # The left-most entry is whatever the client sent; the proxies appended the rest.
    request = _request("10.0.0.2", ["1.2.3.4, 203.0.113.7", "192.168.1.1, 10.1.1.1"])

    assert client_address(request, trusted) == "203.0.113.7"


def test_client_address_trusted_peer_without_header() -> None:
    trusted = parse_trusted_proxies(["10.0.0.2"])

    assert client_address(_request("10.0.0.2"), trusted) == "10.0.0.2"


def test_client_address_all_hops_trusted_uses_left_most() -> None:
    trusted = parse_trusted_proxies(["10.0.0.0/8"])

    assert client_address(_request("10.0.0.2", ["10.3.3.3, 10.1.1.1"]), trusted) == "10.3.3.3"


def test_client_address_missing_client() -> None:
    assert client_address(_request(None), []) == "unknown"


def test_trusted_proxies_rejects_invalid_entry() -> None:
    with pytest.raises(ValueError, match=r"'proxy\.example'"):
        parse_trusted_proxies(["proxy.example"])


def test_settings_split_trusted_proxies() -> None:
    settings = Settings(_env_file=None, trusted_proxies="10.0.0.0/8, 192.168.1.1")  # type: ignore[call-arg]

    assert settings.trusted_proxies == ["10.0.0.0/8", "192.168.1.1"]


def test_settings_reject_invalid_trusted_proxy() -> None:
    with pytest.raises(ValidationError, match=r"TRUSTED_PROXIES entry 'proxy\.example'"):
        Settings(_env_file=None, trusted_proxies="proxy.example")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "field",
    [
        "rate_limit_signin",
        "rate_limit_signin_per_email",
        "rate_limit_signup",
        "rate_limit_password_change",
        "rate_limit_waitlist",
        "rate_limit_referral_send",
        "rate_limit_chat_messages",
    ],
)
def test_settings_reject_invalid_limit(field: str) -> None:
    with pytest.raises(ValidationError, match=f"{field.upper()}='5/minit' is not a valid rate limit"):
        Settings(_env_file=None, **{field: "5/minit"})  # type: ignore[arg-type]


def test_settings_accept_limit_notations() -> None:
    settings = Settings(_env_file=None, rate_limit_signin="100 per 2 hours", rate_limit_signup="3/second")  # type: ignore[call-arg]

    assert settings.rate_limit_signin == "100 per 2 hours"
    assert settings.rate_limit_signup == "3/second"
