"""A small TTL cache for JSON values: in-process by default, Redis when REDIS_URL is set.

Cached values are shared by all processes only with Redis; the in-process cache is per process.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

log = structlog.get_logger(__name__)


class JsonCache(ABC):
    @abstractmethod
    async def get(self, key: str) -> Any | None: ...

    @abstractmethod
    async def set(self, key: str, value: Any, ttl_seconds: int) -> None: ...

    @abstractmethod
    async def delete(self, key: str) -> None: ...

    async def close(self) -> None:  # noqa: B027  (optional hook)
        """Release connections; called when the app shuts down."""


class MemoryCache(JsonCache):
    """An LRU dictionary with per-entry expiry, bounded to `max_entries`."""

    def __init__(self, max_entries: int = 1024) -> None:
        self._entries: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._max_entries = max_entries

    async def get(self, key: str) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires_at, payload = entry
        if expires_at <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return json.loads(payload)

    async def set(self, key: str, value: Any, ttl_seconds: int) -> None:
        if ttl_seconds <= 0:
            return
        # Stored as JSON text so that callers get a fresh copy they may change, as they would from Redis.
        self._entries[key] = (time.monotonic() + ttl_seconds, json.dumps(value))
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    async def delete(self, key: str) -> None:
        self._entries.pop(key, None)


class RedisCache(JsonCache):
    """Redis-backed cache. A Redis failure is logged and treated as a miss, so the cache never breaks a request."""

    def __init__(self, url: str, prefix: str = "pocketllm:") -> None:
        self._redis = Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._prefix = prefix

    async def get(self, key: str) -> Any | None:
        try:
            payload = await self._redis.get(self._prefix + key)
        except RedisError as error:
            log.warning("cache.redis_failed", operation="get", error=type(error).__name__)
            return None
        return None if payload is None else json.loads(payload)

    async def set(self, key: str, value: Any, ttl_seconds: int) -> None:
        if ttl_seconds <= 0:
            return
        try:
            await self._redis.set(self._prefix + key, json.dumps(value), ex=ttl_seconds)
        except RedisError as error:
            log.warning("cache.redis_failed", operation="set", error=type(error).__name__)

    async def delete(self, key: str) -> None:
        try:
            await self._redis.delete(self._prefix + key)
        except RedisError as error:
            log.warning("cache.redis_failed", operation="delete", error=type(error).__name__)

    async def close(self) -> None:
        await self._redis.aclose()


def build_cache(redis_url: str | None) -> JsonCache:
    return RedisCache(redis_url) if redis_url else MemoryCache()
