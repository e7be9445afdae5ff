"""Profile reads and writes, always scoped to the calling user."""

from __future__ import annotations

import uuid

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from pocketllm.errors import NotFound
from pocketllm.models import Profile, User


class ProfileNotFound(NotFound):
    code = "profile_not_found"
    default_message = "No profile exists for this account."


async def get_profile(session: AsyncSession, user_id: uuid.UUID) -> tuple[User, Profile]:
    row = (
        await session.execute(select(User, Profile).join(Profile, Profile.id == User.id).where(User.id == user_id))
    ).one_or_none()
    if row is None:
        raise ProfileNotFound()
    return row[0], row[1]
