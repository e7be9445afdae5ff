"""Invite codes and waitlist approvals: the two ways through invite-gated sign-up."""

from __future__ import annotations

import secrets
import uuid
from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from pocketllm.db.types import utcnow
from pocketllm.models import InviteCode, WaitlistApplication

InviteCodeStatus = Literal["valid", "inactive", "expired", "exhausted"]

# No 0/O or 1/I/L, so a code read aloud or copied by hand survives.
_CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
_CODE_GROUP_LENGTH = 4


def normalize_code(code: str) -> str:
    return code.strip().upper()


def generate_code(groups: int = 3) -> str:
    """Return a random code such as `K7QM-2XPD-WN4H` (about 62 bits of entropy for three groups)."""
    return "-".join("".join(secrets.choice(_CODE_ALPHABET) for _ in range(_CODE_GROUP_LENGTH)) for _ in range(groups))


def invite_code_status(invite: InviteCode, now: datetime | None = None) -> InviteCodeStatus:
    now = now or utcnow()
    if not invite.is_active:
        return "inactive"
    if invite.expires_at is not None and invite.expires_at <= now:
        return "expired"
    if invite.uses_count >= invite.max_uses:
        return "exhausted"
    return "valid"


async def create_invite_code(
    session: AsyncSession,
    *,
    max_uses: int = 1,
    expires_in_days: float | None = None,
    created_by: uuid.UUID | None = None,
    kind: str = "admin",
    code: str | None = None,
) -> InviteCode:
    expires_at = utcnow() + timedelta(days=expires_in_days) if expires_in_days is not None else None
    invite = InviteCode(
        code=normalize_code(code) if code else generate_code(),
        max_uses=max_uses,
        uses_count=0,
        is_active=True,
        expires_at=expires_at,
        kind=kind,
        created_by=created_by,
    )
    session.add(invite)
    await session.flush()
    return invite


async def list_invite_codes(session: AsyncSession) -> list[InviteCode]:
    result = await session.scalars(select(InviteCode).order_by(InviteCode.created_at.desc()))
    return list(result)


async def get_invite_code(session: AsyncSession, code: str) -> InviteCode | None:
    return await session.scalar(select(InviteCode).where(InviteCode.code == normalize_code(code)))


async def consume_invite_code(session: AsyncSession, code: str) -> InviteCode | None:
    """Count one use of `code` if it is still usable, and return it; return None when it is not.

    A single conditional UPDATE does the check and the count, so concurrent sign-ups cannot use a code
    more often than `max_uses`: on PostgreSQL the second writer waits on the row lock and re-checks the
    condition against the committed count; SQLite runs one write transaction at a time.
    """
    now = utcnow()
    statement = (
        update(InviteCode)
        .where(
            InviteCode.code == normalize_code(code),
            InviteCode.is_active.is_(True),
            InviteCode.uses_count < InviteCode.max_uses,
            or_(InviteCode.expires_at.is_(None), InviteCode.expires_at > now),
        )
        .values(uses_count=InviteCode.uses_count + 1, updated_at=now)
        .returning(InviteCode.id)
        .execution_options(synchronize_session=False)
    )
    invite_id = (await session.execute(statement)).scalar_one_or_none()
    if invite_id is None:
        return None
    invite = await session.get(InviteCode, invite_id, populate_existing=True)
    return invite


async def release_invite_code(session: AsyncSession, invite_id: uuid.UUID) -> None:
    """Give back one use of a code whose sign-up failed after the use was counted."""
    await session.execute(
        update(InviteCode)
        .where(and_(InviteCode.id == invite_id, InviteCode.uses_count > 0))
        .values(uses_count=InviteCode.uses_count - 1, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )


async def find_approved_application(session: AsyncSession, email: str) -> WaitlistApplication | None:
    return await session.scalar(
        select(WaitlistApplication).where(WaitlistApplication.email == email, WaitlistApplication.status == "approved")
    )


async def approve_application(session: AsyncSession, email: str) -> tuple[WaitlistApplication, bool]:
    """Approve the waitlist application for `email`, creating an approved one if there is none.

    Returns the application and whether it was created.
    """
    application = await session.scalar(select(WaitlistApplication).where(WaitlistApplication.email == email))
    created = application is None
    if application is None:
        application = WaitlistApplication(email=email, source="admin")
        session.add(application)
    application.status = "approved"
    application.approved_at = application.approved_at or utcnow()
    await session.flush()
    return application, created
