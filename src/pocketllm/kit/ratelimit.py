"""Request rate limits on a moving window, counted in memory or, with REDIS_URL, in Redis.

Counts in memory are per process, and with Redis every process shares them. A Redis outage lets requests
through, because a limiter that fails closed would turn the Redis outage into a full service outage.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Sequence
from typing import Annotated, Any

import structlog
from fastapi import Depends, Request
from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from redis.asyncio import Redis

from pocketllm.errors import RateLimited

log = structlog.get_logger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
REDIS_KEY_PREFIX = "pocketllm-ratelimit"


class RateLimiter:
    """Counts hits per (scope, key) and raises RateLimited once a limit string such as "10/minute" is reached."""

    def __init__(self, storage: Storage, *, enabled: bool = True) -> None:
        self._storage = storage
        self._strategy = MovingWindowRateLimiter(storage)
        self._enabled = enabled
        self._items: dict[str, RateLimitItem] = {}
        self._storage_failing = False

    @property
    def enabled(self) -> bool:
        return self._enabled

    async def hit(self, scope: str, key: str, limit: str) -> None:
        """Count one request for `key` in `scope`, and raise RateLimited with Retry-After once `limit` is exceeded."""
        if not self._enabled:
            return

        item = self._parsed(limit)
        try:
            allowed = await self._strategy.hit(item, scope, key)
            reset_time = None if allowed else (await self._strategy.get_window_stats(item, scope, key)).reset_time
        except StorageError as error:
            self._report_storage_failure(scope, error)
            return
        self._report_storage_recovery()

        if reset_time is not None:
            retry_after = max(1, math.ceil(reset_time - time.time()))
            log.info("ratelimit.exceeded", scope=scope, limit=limit, retry_after=retry_after)
            raise RateLimited(
                f"Too many requests; try again in {retry_after} seconds.", headers={"Retry-After": str(retry_after)}
            )

    async def reset(self) -> None:
        """Forget every count under this limiter's storage prefix. Tests use it to clean up."""
        await self._storage.reset()

    async def close(self) -> None:
        """Release the Redis client's connections. The app calls this when it shuts down."""
        # NOTE: limits 5.8 has no public close method for its async Redis storage, so this reaches the
        # redis-py client through the storage's `bridge.storage` attributes, which later versions may rename.
        client = getattr(getattr(self._storage, "bridge", None), "storage", None)
        if isinstance(client, Redis):
            await client.aclose()

    def _parsed(self, limit: str) -> RateLimitItem:
        item = self._items.get(limit)
        if item is None:
            item = self._items[limit] = parse(limit)
        return item

    def _report_storage_failure(self, scope: str, error: StorageError) -> None:
        # Logged once per outage rather than once per request, so an outage does not flood the log.
        if not self._storage_failing:
            self._storage_failing = True
            log.warning(
                "ratelimit.storage_failed",
                scope=scope,
                error=type(error.storage_error).__name__,
                detail=str(error.storage_error),
                action="requests are allowed without rate limits until the storage answers again",
            )

    def _report_storage_recovery(self) -> None:
        if self._storage_failing:
            self._storage_failing = False
            log.info("ratelimit.storage_recovered")


def build_rate_limiter(
    redis_url: str | None, *, enabled: bool = True, key_prefix: str = REDIS_KEY_PREFIX
) -> RateLimiter:
    """Build the app's limiter: Redis-backed when `redis_url` is set, otherwise in this process's memory."""
    if not redis_url:
        return RateLimiter(MemoryStorage(), enabled=enabled)

    options: dict[str, Any] = {"socket_timeout": 2, "socket_connect_timeout": 2}
    # The "async+" scheme selects limits' asyncio storage. redis-py is chosen because the project already
    # depends on it, while limits' default Redis client (coredis) is not installed.
    storage = RedisStorage(
        "async+" + redis_url,
        wrap_exceptions=True,
        implementation="redispy",
        key_prefix=key_prefix,
        **options,
    )
    return RateLimiter(storage, enabled=enabled)


def parse_trusted_proxies(entries: Sequence[str]) -> list[IPNetwork]:
    """Parse TRUSTED_PROXIES entries (addresses or CIDR networks), raising ValueError that names a bad entry."""
    networks: list[IPNetwork] = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as error:
            raise ValueError(f"{entry!r} is not an IP address or CIDR network") from error
    return networks


def _is_trusted(address: str, trusted_proxies: Sequence[IPNetwork]) -> bool:
    try:
        parsed = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    return any(parsed in network for network in trusted_proxies)


def client_address(request: Request, trusted_proxies: Sequence[IPNetwork]) -> str:
    """Return the address to rate-limit the request by.

    X-Forwarded-For is read only when the direct peer is a trusted proxy, because any client can send the
    header. The right-most entry that is not itself a trusted proxy is the one that the nearest trusted
    proxy saw, and entries to its left are client-supplied.
    """
    peer = request.client.host if request.client else "unknown"
    if not trusted_proxies or not _is_trusted(peer, trusted_proxies):
        return peer

    forwarded: list[str] = []
    for header in request.headers.getlist("x-forwarded-for"):
        forwarded.extend(part.strip() for part in header.split(",") if part.strip())
    for address in reversed(forwarded):
        if not _is_trusted(address, trusted_proxies):
            return address
    # Every hop is a trusted proxy (or the header is missing): the left-most hop is the best remaining guess.
    return forwarded[0] if forwarded else peer


async def get_rate_limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.rate_limiter
    return limiter


async def get_client_address(request: Request) -> str:
    trusted: list[IPNetwork] = request.app.state.trusted_proxies
    return client_address(request, trusted)


Limiter = Annotated[RateLimiter, Depends(get_rate_limiter)]
ClientAddress = Annotated[str, Depends(get_client_address)]
