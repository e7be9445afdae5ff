"""Argon2id password hashing, run in worker threads so that it never blocks the event loop."""

from __future__ import annotations

import os
import secrets

import anyio
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

MIN_PASSWORD_LENGTH = 8
# Argon2 accepts any length, but hashing a megabyte-long "password" costs time for nothing.
MAX_PASSWORD_LENGTH = 256


class PasswordHashing:
    """Hashes and verifies passwords with Argon2id.

    At most one hash per CPU core runs at a time: each takes `memory_kib` of memory, so an unbounded
    burst of sign-ins would otherwise exhaust memory instead of queueing.
    """

    def __init__(self, *, time_cost: int, memory_kib: int, parallelism: int) -> None:
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism)
        self._limiter = anyio.CapacityLimiter(os.cpu_count() or 1)
        # Made up front so that the first unknown e-mail address is not slower than later ones.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))

    async def hash(self, password: str) -> str:
        return await anyio.to_thread.run_sync(self._hasher.hash, password, limiter=self._limiter)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """Check `password` against `password_hash`.

        With no hash (unknown user) a dummy hash is verified instead, so that an unknown e-mail address
        and a wrong password take about the same time.
        """
        target = password_hash or self._dummy_hash
        matches = await anyio.to_thread.run_sync(self._verify, target, password, limiter=self._limiter)
        return matches and password_hash is not None

    def needs_rehash(self, password_hash: str) -> bool:
        return self._hasher.check_needs_rehash(password_hash)

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerificationError, InvalidHashError):
            return False
