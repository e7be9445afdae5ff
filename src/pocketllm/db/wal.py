"""Background checkpoints of SQLite's write-ahead log in `pocketllm serve` (see `Database.checkpoint_wal`)."""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from pocketllm.db.engine import Database

log = structlog.get_logger(__name__)

# A checkpoint with nothing to copy costs one statement.
# NOTE: SQLite starts the log over only at a write that begins after a checkpoint copied all of it. Writers
# that follow each other without a pause leave no such moment, so under a sustained burst of writes the log
# grows until a commit reaches SQLITE_BACKGROUND_AUTOCHECKPOINT_PAGES (about 40 MB). The file shrinks back
# to SQLITE_BACKGROUND_WAL_SIZE_LIMIT_BYTES at the next start-over.
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
