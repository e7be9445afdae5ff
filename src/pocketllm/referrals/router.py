"""/v1/waitlist (public applications for access) and /v1/referral (the caller's personal invite code).

The shipped client requests the referral routes under a doubled prefix (`/v1/v1/referral/...`), so
`legacy_referral_router` serves the same handlers there, left out of the OpenAPI document.
"""

from __future__ import annotations

from datetime import timedelta

from fastapi import Request, status

from pocketllm.auth.dependencies import CurrentUser
from pocketllm.auth.emails import InvalidEmail, canonicalize_email
from pocketllm.db.dependencies import Db, DbSession
from pocketllm.errors import NotAuthenticated, RateLimited, UnparsableBody, error_responses
from pocketllm.kit.ratelimit import ClientAddress, Limiter
from pocketllm.kit.routing import JsonBodyRoute, PrefixRouter
from pocketllm.referrals import service
from pocketllm.referrals.schemas import (
    ReferralEntry,
    ReferralListResponse,
    ReferralSendRequest,
    ReferralSendResponse,
    ReferralStatsBody,
    WaitlistEntry,
    WaitlistEntryCreate,
)

# Newest first; older referrals still count in `stats`.
MAX_LISTED_REFERRALS = 500

waitlist_router = PrefixRouter(prefix="/v1/waitlist", tags=["waitlist"], route_class=JsonBodyRoute)
referral_router = PrefixRouter(prefix="/v1/referral", tags=["referrals"], route_class=JsonBodyRoute)
legacy_referral_router = PrefixRouter(prefix="/v1/v1/referral", include_in_schema=False, route_class=JsonBodyRoute)


@waitlist_router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=WaitlistEntry,
    responses=error_responses(InvalidEmail, RateLimited, UnparsableBody),
)
async def submit_waitlist_entry(
    payload: WaitlistEntryCreate, session: DbSession, limiter: Limiter, address: ClientAddress, request: Request
) -> WaitlistEntry:
    """Apply for access, or update the application of this e-mail address. No authentication is needed."""
    await limiter.hit("waitlist", address, request.app.state.settings.rate_limit_waitlist)
    email = canonicalize_email(payload.email)
    fields = service.ApplicationFields(
        full_name=payload.full_name,
        occupation=payload.occupation,
        motivation=payload.motivation,
        use_case=payload.use_case,
        links=payload.links,
        source=payload.source,
        metadata=payload.metadata,
    )
    application = await service.submit_application(session, email, fields)
    return WaitlistEntry.from_row(application)


def share_base_url(request: Request) -> str:
    """Return the invite link without its code: REFERRAL_SHARE_BASE_URL, else the base URL + "/invite/"."""
    settings = request.app.state.settings
    if settings.referral_share_base_url:
        configured: str = settings.referral_share_base_url
        return configured
    base: str = settings.public_base_url or str(request.base_url)
    return base.rstrip("/") + "/invite/"


@referral_router.get("/list", response_model=ReferralListResponse, responses=error_responses(NotAuthenticated))
@legacy_referral_router.get("/list", response_model=ReferralListResponse)
async def list_referrals(user: CurrentUser, database: Db, request: Request) -> ReferralListResponse:
    """Return the caller's personal invite code (created on the first call), its usage and the referrals."""
    # A transaction, not a read-only session: the first call creates the personal code.
    async with database.transaction() as session:
        invite = await service.get_or_create_personal_code(
            session, user.user_id, request.app.state.settings.referral_max_uses
        )
        referrals = await service.list_referrals(session, user.user_id, MAX_LISTED_REFERRALS)
        stats = await service.referral_stats(session, user.user_id)
        entries = [ReferralEntry.from_row(referral) for referral in referrals]

    invite_link = share_base_url(request) + invite.code
    return ReferralListResponse(
        invite_code=invite.code,
        max_uses=invite.max_uses,
        uses_count=invite.uses_count,
        remaining_uses=max(0, invite.max_uses - invite.uses_count),
        invite_link=invite_link,
        share_message=(f"Join me on PocketLLM! Sign up with my invite code {invite.code} or open {invite_link}"),
        stats=ReferralStatsBody(
            total_sent=stats.total_sent,
            total_joined=stats.total_joined,
            pending=stats.pending,
            rewards_issued=stats.rewards_issued,
        ),
        referrals=entries,
    )


_SEND_ERRORS = error_responses(
    NotAuthenticated,
    InvalidEmail,
    service.CannotInviteSelf,
    service.AlreadyRegistered,
    service.PersonalCodeUnusable,
    RateLimited,
    UnparsableBody,
)


@referral_router.post(
    "/send", status_code=status.HTTP_201_CREATED, response_model=ReferralSendResponse, responses=_SEND_ERRORS
)
@legacy_referral_router.post("/send", status_code=status.HTTP_201_CREATED, response_model=ReferralSendResponse)
async def send_referral(
    payload: ReferralSendRequest, user: CurrentUser, session: DbSession, request: Request, limiter: Limiter
) -> ReferralSendResponse:
    """Invite someone by e-mail with the caller's personal code.

    Sending to the same address again returns the existing referral; a new e-mail is queued only after
    REFERRAL_RESEND_COOLDOWN_SECONDS.
    """
    settings = request.app.state.settings
    await limiter.hit("referral-send", str(user.user_id), settings.rate_limit_referral_send)
    result = await service.send_referral(
        session,
        referrer_id=user.user_id,
        email=canonicalize_email(payload.email),
        full_name=payload.full_name,
        message=payload.message,
        max_uses=settings.referral_max_uses,
        cooldown=timedelta(seconds=settings.referral_resend_cooldown_seconds),
        share_base_url=share_base_url(request),
    )
    return ReferralSendResponse(
        referral_id=result.referral.id,
        invite_code=result.invite.code,
        status=result.referral.status,
        email=result.referral.email,
        invite_sent=result.mail_queued,
    )
