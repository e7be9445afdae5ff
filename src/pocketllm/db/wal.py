"""Background checkpoints of SQLite's write-ahead log in `pocketllm serve` (see `Database.checkpoint_wal`)."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from pocketllm.db.engine import Database

log = structlog.get_logger(__name__)

# Often enough that the log stays far below SQLITE_BACKGROUND_AUTOCHECKPOINT_PAGES at this server's write
# rates. A checkpoint with nothing to copy costs one statement.
CHECKPOINT_INTERVAL_SECONDS = 1.0


async def run_checkpoints(
    database: Database, stop: asyncio.Event, *, interval: float = CHECKPOINT_INTERVAL_SECONDS
) -> None:
    """Checkpoint every `interval` seconds until `stop` is set.

    A failed checkpoint is logged and tried again at the next interval. Meanwhile SQLite's own
    checkpoint in a commit still bounds the log.
    """
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
        if stop.is_set():
            return
        try:
            await database.checkpoint_wal()
        except Exception as error:  # the loop must outlive any one failure
            log.warning("sqlite.checkpoint_failed", error=type(error).__name__, detail=str(error)[:300])
