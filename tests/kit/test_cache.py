"""The JSON cache, in memory and on the real Redis server at 127.0.0.1:6379."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from pocketllm.kit.cache import JsonCache, MemoryCache, RedisCache

REDIS_URL = os.environ.get("POCKETLLM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


async def _redis_available() -> bool:
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        return bool(await client.ping())
    except OSError:
        return False
    except Exception:  # redis raises its own ConnectionError, which is not an OSError
        return False
    finally:
        await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def cache(request: pytest.FixtureRequest) -> AsyncIterator[JsonCache]:
    if request.param == "memory":
        yield MemoryCache()
        return
    if not await _redis_available():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"Redis is required under CI but unreachable at {REDIS_URL}")
        pytest.skip(f"Redis unreachable at {REDIS_URL}")
    redis_cache = RedisCache(REDIS_URL, prefix=f"test-{uuid.uuid4().hex}:")
    yield redis_cache
    await redis_cache.close()


async def test_set_then_get(cache: JsonCache) -> None:
    await cache.set("models", [{"id": "gpt-4o-mini", "context_window": 128000}], ttl_seconds=60)

    assert await cache.get("models") == [{"id": "gpt-4o-mini", "context_window": 128000}]


async def test_missing_key_is_none(cache: JsonCache) -> None:
    assert await cache.get("absent") is None


async def test_delete_removes(cache: JsonCache) -> None:
    await cache.set("models", [1, 2], ttl_seconds=60)

    await cache.delete("models")

    assert await cache.get("models") is None


async def test_zero_ttl_is_not_stored(cache: JsonCache) -> None:
    await cache.set("models", [1], ttl_seconds=0)

    assert await cache.get("models") is None


async def test_returned_value_is_a_copy(cache: JsonCache) -> None:
    await cache.set("models", {"ids": ["a"]}, ttl_seconds=60)
    first = await cache.get("models")
    first["ids"].append("b")

    assert await cache.get("models") == {"ids": ["a"]}


async def test_memory_cache_expires_entries() -> None:
    cache = MemoryCache()
    await cache.set("models", [1], ttl_seconds=1)
    # Age the entry instead of sleeping: move its expiry into the past.
    expires_at, payload = cache._entries["models"]
    cache._entries["models"] = (expires_at - 2, payload)

    assert await cache.get("models") is None


async def test_memory_cache_evicts_least_recently_used() -> None:
    cache = MemoryCache(max_entries=2)
    await cache.set("a", 1, ttl_seconds=60)
    await cache.set("b", 2, ttl_seconds=60)
    await cache.get("a")

    await cache.set("c", 3, ttl_seconds=60)

    assert await cache.get("a") == 1
    assert await cache.get("b") is None
    assert await cache.get("c") == 3


async def test_redis_failure_is_a_miss() -> None:
    cache = RedisCache("redis://127.0.0.1:1/0")

    await cache.set("models", [1], ttl_seconds=60)

    assert await cache.get("models") is None
    await cache.close()
