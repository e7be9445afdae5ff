"""/v1/auth: sign-up, sign-in, refresh, sign-out, password change and invite-code checks."""

from __future__ import annotations

from typing import Annotated

from fastapi import Body, Request, status

from pocketllm.auth import service
from pocketllm.auth.backends.local import PasswordUnchanged, RefreshTokenInvalid, SessionRevoked
from pocketllm.auth.backends.supabase import (
    AccountMismatch,
    EmailNotConfirmed,
    ReauthenticationRequired,
    SignUpDisabled,
    WeakPassword,
)
from pocketllm.auth.dependencies import Backend, Client, CurrentUser
from pocketllm.auth.emails import InvalidEmail, canonicalize_email
from pocketllm.auth.schemas import (
    AuthFeatureAvailabilityResponse,
    InviteCodeDetails,
    InviteCodeValidationRequest,
    InviteCodeValidationResponse,
    MagicLinkRequest,
    OAuthProviderRequest,
    PasswordChangeRequest,
    PasswordChangeResponse,
    PhoneOtpRequest,
    RefreshTokenRequest,
    RefreshTokenResponse,
    SignInRequest,
    SignInResponse,
    SignOutRequest,
    SignOutResponse,
    SignUpRequest,
    SignUpResponse,
)
from pocketllm.db.dependencies import DbSession
from pocketllm.errors import (
    InvalidInput,
    NotAuthenticated,
    RateLimited,
    UnparsableBody,
    UpstreamError,
    error_responses,
)
from pocketllm.kit.ratelimit import ClientAddress, Limiter
from pocketllm.kit.routing import JsonBodyRoute, PrefixRouter
from pocketllm.referrals import service as referrals

router = PrefixRouter(prefix="/v1/auth", tags=["auth"], route_class=JsonBodyRoute)

_INVITE_STATUS_MESSAGES = {
    "valid": "The invite code is valid.",
    "inactive": "The invite code has been deactivated.",
    "expired": "The invite code has expired.",
    "exhausted": "The invite code has no uses left.",
}


class InviteCodeNotFound(InvalidInput):
    code = "invite_code_not_found"
    default_message = "No invite code matches; check the code for typos."


@router.post(
    "/signup",
    response_model=SignUpResponse,
    responses=error_responses(
        InvalidEmail,
        service.UserAlreadyExists,
        service.InviteRequired,
        WeakPassword,
        SignUpDisabled,
        AccountMismatch,
        RateLimited,
        UpstreamError,
        UnparsableBody,
    ),
)
async def sign_up(
    payload: SignUpRequest,
    backend: Backend,
    client: Client,
    limiter: Limiter,
    address: ClientAddress,
    request: Request,
) -> SignUpResponse:
    """Create an account; needs an invite code or an approved waitlist application unless INVITE_CODE=false."""
    await limiter.hit("signup", address, request.app.state.settings.rate_limit_signup)
    return await backend.sign_up(payload, client)


@router.post(
    "/signin",
    response_model=SignInResponse,
    responses=error_responses(
        service.InvalidCredentials, EmailNotConfirmed, AccountMismatch, RateLimited, UpstreamError, UnparsableBody
    ),
)
async def sign_in(
    payload: SignInRequest,
    backend: Backend,
    client: Client,
    limiter: Limiter,
    address: ClientAddress,
    request: Request,
) -> SignInResponse:
    """Sign in with e-mail and password; cancels a scheduled account deletion."""
    settings = request.app.state.settings
    # Both limits are checked before the password hash is verified. The per-address limit slows one client
    # guessing many accounts, and the per-e-mail limit slows many clients guessing one account.
    await limiter.hit("signin", address, settings.rate_limit_signin)
    await limiter.hit("signin-email", _rate_limit_email_key(payload.email), settings.rate_limit_signin_per_email)
    return await backend.sign_in(payload, client)


def _rate_limit_email_key(email: str) -> str:
    """Return the canonical address, so that spelling variants of one account share a count."""
    try:
        return canonicalize_email(email)
    except InvalidEmail:
        return email.strip().lower()


@router.post(
    "/refresh",
    response_model=RefreshTokenResponse,
    responses=error_responses(RefreshTokenInvalid, RateLimited, UpstreamError, UnparsableBody),
)
async def refresh(payload: RefreshTokenRequest, backend: Backend) -> RefreshTokenResponse:
    """Exchange a refresh token for a new access token."""
    return await backend.refresh(payload.refresh_token)


@router.post("/signout", response_model=SignOutResponse, responses=error_responses(NotAuthenticated, UnparsableBody))
async def sign_out(
    user: CurrentUser, backend: Backend, payload: Annotated[SignOutRequest | None, Body()] = None
) -> SignOutResponse:
    """Revoke the current session (or, with `scope`, all or all other sessions); its tokens stop working."""
    return await backend.sign_out(user, (payload or SignOutRequest()).scope)


@router.post(
    "/password/change",
    response_model=PasswordChangeResponse,
    responses=error_responses(
        NotAuthenticated,
        SessionRevoked,
        service.IncorrectPassword,
        PasswordUnchanged,
        WeakPassword,
        ReauthenticationRequired,
        RateLimited,
        UpstreamError,
        UnparsableBody,
    ),
)
async def change_password(
    payload: PasswordChangeRequest, user: CurrentUser, backend: Backend, limiter: Limiter, request: Request
) -> PasswordChangeResponse:
    """Change the password after checking the current one; other sessions are signed out."""
    await limiter.hit("password-change", str(user.user_id), request.app.state.settings.rate_limit_password_change)
    return await backend.change_password(user, payload.old, payload.new)


@router.post(
    "/validate-invite-code",
    response_model=InviteCodeValidationResponse,
    responses=error_responses(InviteCodeNotFound, UnparsableBody),
)
async def validate_invite_code(
    payload: InviteCodeValidationRequest, session: DbSession
) -> InviteCodeValidationResponse:
    """Report whether an invite code can be used to sign up, without using it."""
    invite = await referrals.get_invite_code(session, payload.code)
    if invite is None:
        raise InviteCodeNotFound()

    invite_status = referrals.invite_code_status(invite)
    return InviteCodeValidationResponse(
        valid=invite_status == "valid",
        status=invite_status,
        message=_INVITE_STATUS_MESSAGES[invite_status],
        code=InviteCodeDetails(
            id=invite.id,
            code=invite.code,
            max_uses=invite.max_uses,
            uses_count=invite.uses_count,
            remaining_uses=max(0, invite.max_uses - invite.uses_count),
            expires_at=invite.expires_at,
        ),
    )


def _coming_soon(feature: str, what: str) -> AuthFeatureAvailabilityResponse:
    return AuthFeatureAvailabilityResponse(
        feature=feature, message=f"{what} is not available yet; sign in with e-mail and password."
    )


@router.post(
    "/signin/magic-link",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=AuthFeatureAvailabilityResponse,
    responses=error_responses(UnparsableBody),
)
async def magic_link(payload: MagicLinkRequest) -> AuthFeatureAvailabilityResponse:
    """Announce the upcoming passwordless e-mail sign-in; nothing is sent."""
    return _coming_soon("magic_link", "Magic-link sign-in")


@router.post(
    "/signin/otp",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=AuthFeatureAvailabilityResponse,
    responses=error_responses(UnparsableBody),
)
async def phone_otp(payload: PhoneOtpRequest) -> AuthFeatureAvailabilityResponse:
    """Announce the upcoming SMS one-time-passcode sign-in; nothing is sent."""
    return _coming_soon("sms_otp", "SMS one-time-passcode sign-in")


@router.post(
    "/signin/oauth",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=AuthFeatureAvailabilityResponse,
    responses=error_responses(UnparsableBody),
)
async def oauth(payload: OAuthProviderRequest) -> AuthFeatureAvailabilityResponse:
    """Announce upcoming sign-in through a third-party OAuth provider."""
    provider = payload.provider.lower()
    return _coming_soon(f"oauth:{provider}", f"Sign-in with {provider}")
