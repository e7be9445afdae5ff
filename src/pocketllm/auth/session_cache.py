"""Cache live sessions per process on PostgreSQL, and drop them when a database trigger reports a change.

Every authenticated request checks that its session is neither revoked nor expired. That check is a
database round trip, about a quarter of the CPU of a small authenticated read. On PostgreSQL, triggers
on `auth_sessions` and `users` (migration 0009) send a notice on SESSIONS_CHANNEL whenever a session is
revoked, refreshed or deleted, or a user's e-mail address changes or the user is deleted, from any source:
this server, another process, or an operator in psql. Each API process listens on that channel and keeps
a session it has checked until a notice names it, its user, or the whole table.

Rules that keep a remembered session from outliving its row:

* nothing is remembered while the listener is not listening; losing the connection forgets everything;
* a check that started before a notice arrived is not remembered (`generation`), because it may have
  read the row before the change committed;
* a sign-out in this process forgets the user's sessions as soon as it commits, without waiting for the
  notice to come back;
* an entry is trusted for at most SESSION_CACHE_SECONDS, and never past the session's own expiry.

A sign-out made in another process takes effect here once this process reads the notice: in
scripts/scale_out.py, on one host, within 50 ms. SQLite has no notices, so there every request checks its
session in the database.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import structlog

log = structlog.get_logger(__name__)

SESSIONS_CHANNEL = "pocketllm_sessions"
# Payloads the triggers send: the prefix, then a session id, a user id, or nothing for a TRUNCATE.
SESSION_NOTICE = "s:"
USER_NOTICE = "u:"
TABLE_NOTICE = "*"
MAX_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class LiveSession:
    user_id: uuid.UUID
    email: str
    expires_at: datetime
    # time.monotonic() after which the entry is no longer trusted.
    trusted_until: float


class SessionCheckCache:
    """Live sessions by id, at most MAX_ENTRIES, with the least recently used dropped first.

    `enabled` is false until the listener calls `listening`, so a cache without a listener returns nothing.
    """

    def __init__(self, max_age_seconds: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_age = max_age_seconds
        self._clock = clock
        self._entries: OrderedDict[uuid.UUID, LiveSession] = OrderedDict()
        self.enabled = False
        # Incremented whenever entries are dropped; see `remember`.
        self.generation = 0
        self._changed = asyncio.Event()

    def lookup(self, session_id: uuid.UUID, user_id: uuid.UUID, now: datetime) -> str | None:
        """Return the e-mail address of a remembered live session of `user_id`, or None to check the database."""
        if not self.enabled:
            return None
        entry = self._entries.get(session_id)
        if entry is None:
            return None
        if entry.user_id != user_id or entry.expires_at <= now or entry.trusted_until <= self._clock():
            # The database check decides: it may find the session expired, revoked or refreshed.
            del self._entries[session_id]
            return None
        self._entries.move_to_end(session_id)
        return entry.email

    def remember(
        self, session_id: uuid.UUID, user_id: uuid.UUID, email: str, expires_at: datetime, *, generation: int
    ) -> None:
        """Remember a session found live by a check that started at `generation`.

        A notice that arrived during the check may describe a change the check did not see, so a check that
        started before it is not remembered.
        """
        if not self.enabled or generation != self.generation or self._max_age <= 0:
            return
        self._entries[session_id] = LiveSession(user_id, email, expires_at, self._clock() + self._max_age)
        self._entries.move_to_end(session_id)
        while len(self._entries) > MAX_ENTRIES:
            self._entries.popitem(last=False)

    def forget_user(self, user_id: uuid.UUID) -> None:
        self._next_generation()
        for session_id in [key for key, entry in self._entries.items() if entry.user_id == user_id]:
            del self._entries[session_id]

    def forget_all(self) -> None:
        self._next_generation()
        self._entries.clear()

    def notice(self, payload: str) -> None:
        """Apply one notice from the triggers on SESSIONS_CHANNEL."""
        self._next_generation()
        try:
            if payload.startswith(SESSION_NOTICE):
                self._entries.pop(uuid.UUID(payload.removeprefix(SESSION_NOTICE)), None)
                return
            if payload.startswith(USER_NOTICE):
                self.forget_user(uuid.UUID(payload.removeprefix(USER_NOTICE)))
                return
        except ValueError:
            pass
        # A TRUNCATE, or a payload this version does not know: forget everything rather than guess.
        if payload != TABLE_NOTICE:
            log.warning("auth.session_notice_unknown", payload=payload[:80])
        self._entries.clear()

    def listening(self, reconnected: bool) -> None:
        """Enable the cache empty, because notices sent before the listener (re)started listening may be lost."""
        del reconnected
        self.forget_all()
        self.enabled = True

    def lost(self) -> None:
        """Disable and empty the cache, because the listener stopped listening and notices are no longer seen."""
        self.enabled = False
        self.forget_all()

    async def wait_for_change(self, generation: int) -> None:
        """Return once the cache has dropped entries since `generation`, for example on a notice (used by tests)."""
        while self.generation == generation:
            self._changed.clear()
            await self._changed.wait()

    def _next_generation(self) -> None:
        self.generation += 1
        self._changed.set()
