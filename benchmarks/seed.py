"""Direct database access for benchmark setup: seed chat history and cut chats back between batches.

Uses the project's engine factory and models, in the benchmark process, never in the server under test.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy import delete, insert, update

from pocketllm.db.engine import Database, create_engine
from pocketllm.db.types import utcnow
from pocketllm.models import Chat, StoredMessage

SEED_BATCH_ROWS = 1000
# About 60 tokens of English; seeded turns use it so that prompts have a realistic size.
SEED_TEXT = (
    "Could you explain how a write-ahead log keeps a database consistent after a crash, and why it is "
    "usually faster than writing every change to the data files at once? Please keep it short."
)


class ChatStore:
    def __init__(self, database_url: str) -> None:
        self._database = Database(create_engine(database_url, pool_size=2, max_overflow=0))

    async def seed(self, chat_id: str, count: int) -> None:
        """Give an empty chat `count` alternating user and assistant messages, oldest first."""
        parsed = uuid.UUID(chat_id)
        started = utcnow() - timedelta(seconds=count)
        for first in range(1, count + 1, SEED_BATCH_ROWS):
            rows = [
                {
                    "id": uuid.uuid4(),
                    "chat_id": parsed,
                    "sequence": sequence,
                    "role": "user" if sequence % 2 else "assistant",
                    "content": SEED_TEXT,
                    "status": "complete",
                    "extra_metadata": None,
                    "created_at": started + timedelta(seconds=sequence),
                }
                for sequence in range(first, min(first + SEED_BATCH_ROWS, count + 1))
            ]
            async with self._database.transaction() as session:
                await session.execute(insert(StoredMessage), rows)
        async with self._database.transaction() as session:
            await session.execute(update(Chat).where(Chat.id == parsed).values(last_sequence=count))

    async def truncate(self, chat_ids: list[str], keep: int) -> None:
        """Delete every message after sequence `keep` in the chats, so that the next reply sees the same history."""
        parsed = [uuid.UUID(chat_id) for chat_id in chat_ids]
        async with self._database.transaction() as session:
            await session.execute(
                delete(StoredMessage).where(StoredMessage.chat_id.in_(parsed), StoredMessage.sequence > keep)
            )
            await session.execute(update(Chat).where(Chat.id.in_(parsed)).values(last_sequence=keep))

    async def close(self) -> None:
        await self._database.dispose()
