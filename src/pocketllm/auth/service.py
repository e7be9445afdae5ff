"""Account rules shared by both auth backends: who may sign up, account creation, deletion cancel-on-sign-in.

Functions here take the caller's session and only flush; the caller owns the transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from pocketllm.auth.schemas import AccountStatus, AuthUser
from pocketllm.config import Settings
from pocketllm.db.types import utcnow
from pocketllm.errors import Forbidden, InvalidInput, NotAuthenticated
from pocketllm.models import InviteCode, Profile, User, WaitlistApplication
from pocketllm.referrals import service as referrals


class InviteRequired(Forbidden):
    code = "invite_required"
    default_message = "An invite code or approved waitlist application is required to sign up."


class UserAlreadyExists(InvalidInput):
    code = "user_already_exists"
    default_message = "An account with this e-mail address already exists; sign in instead."


class InvalidCredentials(NotAuthenticated):
    code = "invalid_credentials"
    default_message = "Invalid email or password."


class IncorrectPassword(InvalidInput):
    # 400, not 401: the shipped client signs the user out on any 401.
    code = "incorrect_password"
    default_message = "The current password is incorrect."


@dataclass(frozen=True, slots=True)
class SignUpGrant:
    """Why a sign-up is allowed: the invite code it used, the approved application, or open sign-up."""

    invite: InviteCode | None = None
    application: WaitlistApplication | None = None


async def find_user_by_email(session: AsyncSession, email: str) -> User | None:
    return await session.scalar(select(User).where(User.email == email))


async def grant_sign_up(session: AsyncSession, settings: Settings, *, email: str, code: str | None) -> SignUpGrant:
    """Decide whether `email` may sign up, counting one use of `code` when it is used.

    With INVITE_CODE=false sign-up is open; a valid code is still counted so that referrals are credited,
    and an invalid one is ignored.
    """
    invite = await referrals.consume_invite_code(session, code) if code else None
    if invite is not None:
        return SignUpGrant(invite=invite)

    application = await referrals.find_approved_application(session, email)
    if application is not None or not settings.invite_code:
        return SignUpGrant(application=application)

    if code:
        raise InviteRequired(
            "The invite code is unknown, inactive, expired or used up. An invite code or approved waitlist "
            "application is required to sign up."
        )
    raise InviteRequired(
        "No invite code provided. An invite code or approved waitlist application is required to sign up."
    )


async def create_account(
    session: AsyncSession,
    *,
    email: str,
    password_hash: str | None,
    full_name: str | None,
    grant: SignUpGrant,
    user_id: uuid.UUID | None = None,
) -> tuple[User, Profile]:
    """Insert the user and its profile; a duplicate e-mail address raises UserAlreadyExists.

    A sign-up with someone's personal code also marks their referral of `email` joined (see
    referrals.service.record_referral_join).
    """
    now = utcnow()
    user = User(id=user_id or uuid.uuid4(), email=email, password_hash=password_hash, created_at=now)
    profile = Profile(id=user.id, full_name=full_name, survey_completed=False, created_at=now)
    if grant.invite is not None:
        profile.invite_code = grant.invite.code
        profile.referred_by = grant.invite.created_by
        profile.invite_status = "accepted"
        profile.invite_approved_at = now
    if grant.application is not None:
        profile.waitlist_status = "approved"
        profile.waitlist_applied_at = grant.application.created_at
        profile.invite_status = "accepted"
        profile.invite_approved_at = grant.application.approved_at or now

    session.add(user)
    try:
        await session.flush()
    except IntegrityError as error:
        if "email" in str(error.orig).lower():
            raise UserAlreadyExists() from error
        raise
    session.add(profile)
    await session.flush()
    if grant.invite is not None:
        # After the user insert: a duplicate e-mail has failed by now, so no referral is touched for it.
        await referrals.record_referral_join(
            session, invite=grant.invite, email=email, full_name=full_name, user_id=user.id
        )
    return user, profile


async def cancel_scheduled_deletion(session: AsyncSession, profile: Profile) -> AccountStatus:
    """Cancel a pending account deletion (signing in means the user wants the account) and report it."""
    if profile.deletion_status != "pending":
        return AccountStatus()

    status = AccountStatus(
        deletion_canceled=True,
        previous_deletion_requested_at=profile.deletion_requested_at,
        previous_deletion_scheduled_for=profile.deletion_scheduled_for,
    )
    profile.deletion_status = "canceled"
    profile.deletion_requested_at = None
    profile.deletion_scheduled_for = None
    await session.flush()
    return status


def to_auth_user(user: User, profile: Profile | None) -> AuthUser:
    return AuthUser(
        id=user.id,
        email=user.email,
        full_name=profile.full_name if profile else None,
        created_at=user.created_at,
        last_sign_in_at=user.last_sign_in_at,
    )
