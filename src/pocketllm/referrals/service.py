"""Invite codes, waitlist applications and referrals: the ways through invite-gated sign-up.

Functions here take the caller's session and only flush, so the caller owns the transaction.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import structlog
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from pocketllm import mail
from pocketllm.db.types import utcnow
from pocketllm.errors import InvalidInput, NotFound
from pocketllm.models import InviteCode, Profile, Referral, User, WaitlistApplication

log = structlog.get_logger(__name__)

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


async def reject_application(session: AsyncSession, email: str) -> WaitlistApplication:
    """Reject the waitlist application for `email`. An approved application loses its approval.

    Raises WaitlistApplicationNotFound when that address has no application.
    """
    application = await session.scalar(select(WaitlistApplication).where(WaitlistApplication.email == email))
    if application is None:
        raise WaitlistApplicationNotFound(f"No waitlist application for {email}; check the address.")
    application.status = "rejected"
    application.approved_at = None
    await session.flush()
    return application


class WaitlistApplicationNotFound(NotFound):
    code = "waitlist_application_not_found"
    default_message = "No waitlist application matches that e-mail address."


async def list_applications(session: AsyncSession, status: str | None = None) -> list[WaitlistApplication]:
    statement = select(WaitlistApplication).order_by(WaitlistApplication.created_at.desc())
    if status is not None:
        statement = statement.where(WaitlistApplication.status == status)
    return list(await session.scalars(statement))


@dataclass(frozen=True, slots=True)
class ApplicationFields:
    """The fields an applicant submits. None leaves a stored value as it is."""

    full_name: str | None = None
    occupation: str | None = None
    motivation: str | None = None
    use_case: str | None = None
    links: list[str] | None = None
    source: str | None = None
    metadata: dict[str, Any] | None = None


async def submit_application(session: AsyncSession, email: str, fields: ApplicationFields) -> WaitlistApplication:
    """Create the application for the canonical address `email`, or update the one it already has.

    Submitted fields replace stored ones and omitted fields stay. The status never changes here, so an
    approved (or rejected) application keeps its decision. A concurrent first submission for the same
    address is caught by the unique index, and this one then updates the row the other created.
    """
    application = await session.scalar(
        select(WaitlistApplication).where(WaitlistApplication.email == email).with_for_update()
    )
    if application is None:
        try:
            async with session.begin_nested():
                application = WaitlistApplication(email=email, status="pending")
                _apply_fields(application, fields)
                session.add(application)
                await session.flush()
            return application
        except IntegrityError:
            application = await session.scalar(
                select(WaitlistApplication).where(WaitlistApplication.email == email).with_for_update()
            )
            if application is None:
                raise

    _apply_fields(application, fields)
    await session.flush()
    return application


def _apply_fields(application: WaitlistApplication, fields: ApplicationFields) -> None:
    if fields.full_name is not None:
        application.full_name = fields.full_name
    if fields.occupation is not None:
        application.occupation = fields.occupation
    if fields.motivation is not None:
        application.motivation = fields.motivation
    if fields.use_case is not None:
        application.use_case = fields.use_case
    if fields.links is not None:
        application.links = fields.links
    if fields.source is not None:
        application.source = fields.source
    if fields.metadata is not None:
        application.extra_metadata = fields.metadata


# Referrals


class CannotInviteSelf(InvalidInput):
    code = "cannot_invite_self"
    default_message = "You cannot invite your own e-mail address."


class AlreadyRegistered(InvalidInput):
    code = "already_registered"
    default_message = "An account with this e-mail address already exists, so it needs no invite."


class PersonalCodeUnusable(InvalidInput):
    code = "invite_code_unusable"
    default_message = "Your invite code is used up, expired or deactivated, so it cannot be sent."


@dataclass(frozen=True, slots=True)
class ReferralStats:
    total_sent: int
    total_joined: int
    pending: int
    rewards_issued: int


@dataclass(frozen=True, slots=True)
class SendResult:
    referral: Referral
    invite: InviteCode
    # False when an invite e-mail to this address was already queued within the cool-down.
    mail_queued: bool


async def get_or_create_personal_code(session: AsyncSession, user_id: uuid.UUID, max_uses: int) -> InviteCode:
    """Return the user's personal invite code (kind "referral"), creating it on first use.

    The user's row is locked first, so concurrent first requests create one code, not two. On SQLite
    write transactions already run one at a time. The new code is also stored as the profile's
    `referral_code`.
    """
    await session.execute(select(User.id).where(User.id == user_id).with_for_update())
    invite = await session.scalar(
        select(InviteCode)
        .where(InviteCode.created_by == user_id, InviteCode.kind == "referral")
        .order_by(InviteCode.created_at)
        .limit(1)
    )
    if invite is not None:
        return invite

    invite = await create_invite_code(session, max_uses=max_uses, created_by=user_id, kind="referral")
    profile = await session.get(Profile, user_id)
    if profile is not None:
        profile.referral_code = invite.code
        await session.flush()
    log.info("referrals.personal_code_created", user_id=str(user_id), invite_id=str(invite.id))
    return invite


async def list_referrals(session: AsyncSession, referrer_id: uuid.UUID, limit: int) -> list[Referral]:
    result = await session.scalars(
        select(Referral)
        .where(Referral.referrer_id == referrer_id)
        .order_by(Referral.created_at.desc(), Referral.id)
        .limit(limit)
    )
    return list(result)


async def referral_stats(session: AsyncSession, referrer_id: uuid.UUID) -> ReferralStats:
    row = (
        await session.execute(
            select(
                func.count(Referral.last_sent_at),
                func.count().filter(Referral.status == "joined"),
                func.count().filter(Referral.status == "pending"),
                func.count().filter(Referral.reward_status != "none"),
            ).where(Referral.referrer_id == referrer_id)
        )
    ).one()
    return ReferralStats(total_sent=row[0], total_joined=row[1], pending=row[2], rewards_issued=row[3])


async def send_referral(
    session: AsyncSession,
    *,
    referrer_id: uuid.UUID,
    email: str,
    full_name: str | None,
    message: str | None,
    max_uses: int,
    cooldown: timedelta,
    share_base_url: str,
) -> SendResult:
    """Record a pending referral of the canonical address `email` and queue the invite e-mail.

    Sending to an address that already has a referral from this user returns that referral, and queues
    the e-mail again only when the last one is older than `cooldown`. The personal code is fetched
    first, which locks the referrer's row, so concurrent sends to one address queue one e-mail.
    Raises CannotInviteSelf, AlreadyRegistered, or PersonalCodeUnusable when no e-mail can be sent.
    """
    referrer = await session.get_one(User, referrer_id)
    if email == referrer.email:
        raise CannotInviteSelf()
    if await session.scalar(select(User.id).where(User.email == email)) is not None:
        raise AlreadyRegistered()

    invite = await get_or_create_personal_code(session, referrer_id, max_uses)
    referral = await session.scalar(
        select(Referral).where(Referral.referrer_id == referrer_id, Referral.email == email)
    )
    now = utcnow()
    if referral is not None:
        if full_name:
            referral.full_name = full_name
        if message:
            referral.message = message
        if referral.last_sent_at is not None and now - referral.last_sent_at < cooldown:
            await session.flush()
            return SendResult(referral=referral, invite=invite, mail_queued=False)

    if invite_code_status(invite, now) != "valid":
        raise PersonalCodeUnusable()

    if referral is None:
        referral = Referral(
            referrer_id=referrer_id,
            email=email,
            full_name=full_name,
            message=message,
            status="pending",
            reward_status="none",
        )
        session.add(referral)
    referral.last_sent_at = now
    await session.flush()

    profile = await session.get(Profile, referrer_id)
    rendered = mail.render_referral_invite(
        inviter_name=inviter_display_name(referrer, profile),
        invite_link=share_base_url + invite.code,
        invite_code=invite.code,
        personal_message=message,
    )
    await mail.enqueue_mail(
        session, to=email, subject=rendered.subject, text_body=rendered.text_body, html_body=rendered.html_body
    )
    log.info("referrals.invite_queued", referrer_id=str(referrer_id), referral_id=str(referral.id))
    return SendResult(referral=referral, invite=invite, mail_queued=True)


def inviter_display_name(user: User, profile: Profile | None) -> str:
    """Return the inviter name for the e-mail: full name, else username, else the e-mail address."""
    if profile is not None and profile.full_name and profile.full_name.strip():
        return profile.full_name
    if profile is not None and profile.username:
        return profile.username
    return user.email


async def record_referral_join(
    session: AsyncSession, *, invite: InviteCode, email: str, full_name: str | None, user_id: uuid.UUID
) -> Referral | None:
    """Mark the referral of `email` joined after a sign-up with a personal code, and owe the referrer a reward.

    A referral is created when the referrer never invited this address by e-mail. The reward is recorded
    once per referrer and canonical address: a deleted account that signs up again with the same code
    finds its earlier row, whose reward is already recorded. Codes that are not personal return None.
    """
    if invite.kind != "referral" or invite.created_by is None:
        return None
    referrer_id = invite.created_by
    now = utcnow()
    referral = await session.scalar(
        select(Referral).where(Referral.referrer_id == referrer_id, Referral.email == email).with_for_update()
    )
    if referral is None:
        referral = Referral(referrer_id=referrer_id, email=email, full_name=full_name, reward_status="none")
        session.add(referral)
    elif full_name and not referral.full_name:
        referral.full_name = full_name
    referral.status = "joined"
    referral.referred_user_id = user_id
    referral.accepted_at = now
    reward_recorded = referral.reward_status == "none"
    if reward_recorded:
        referral.reward_status = "pending"
    await session.flush()
    log.info(
        "referrals.joined",
        referrer_id=str(referrer_id),
        referral_id=str(referral.id),
        reward_recorded=reward_recorded,
    )
    return referral
