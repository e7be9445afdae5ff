"""The Supabase auth backend: a GoTrue server owns credentials and sessions, and our database the rest.

Sign-up, sign-in, refresh, sign-out and password changes are forwarded to GoTrue over HTTP. Access tokens
are verified locally (HS256 with the JWT secret, or the project's JWKS). Users and profiles live in our
database keyed by the GoTrue user id, and are created on first sight when a user was made in GoTrue
directly. Sessions signed out through this server are recorded as revoked `AuthSession` rows, so their
access tokens stop working here at once instead of when they expire.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, NoReturn, TypeVar

import anyio
import httpx
import jwt
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import and_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from pocketllm.auth import service
from pocketllm.auth.backends.base import AuthBackend, ClientInfo, Principal, SignOutScope
from pocketllm.auth.backends.local import PasswordUnchanged, RefreshTokenInvalid, SessionRevoked
from pocketllm.auth.emails import InvalidEmail, canonicalize_email
from pocketllm.auth.schemas import (
    AccountStatus,
    AuthSessionInfo,
    AuthTokens,
    PasswordChangeResponse,
    RefreshTokenResponse,
    SignInRequest,
    SignInResponse,
    SignOutResponse,
    SignUpRequest,
    SignUpResponse,
)
from pocketllm.auth.tokens import AccessTokenClaims, AccessTokenVerifier, TokenInvalid
from pocketllm.config import ConfigurationError, Settings
from pocketllm.db.engine import Database
from pocketllm.db.types import utcnow
from pocketllm.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotAuthenticated,
    PocketLLMError,
    RateLimited,
    UpstreamError,
)
from pocketllm.models import AuthSession, Profile, User
from pocketllm.providers.network import ProviderClient
from pocketllm.referrals import service as referrals

log = structlog.get_logger(__name__)

CONFIRM_EMAIL_MESSAGE = "Check your inbox and confirm your e-mail address, then sign in."
# GoTrue's own messages are shown to users only for password rules, cut to this length.
MAX_UPSTREAM_MESSAGE_LENGTH = 300
_RETRY_AFTER_SECONDS = re.compile(r"\d{1,9}")

ModelT = TypeVar("ModelT", bound=BaseModel)


class WeakPassword(InvalidInput):
    code = "weak_password"
    default_message = "The password is too weak. Choose a longer password that is harder to guess."


class EmailNotConfirmed(Forbidden):
    code = "email_not_confirmed"
    default_message = "The e-mail address is not confirmed yet. Open the link in the confirmation e-mail first."


class SignUpDisabled(Forbidden):
    code = "signup_disabled"
    default_message = "The auth server does not accept new sign-ups."


class ReauthenticationRequired(Forbidden):
    code = "reauthentication_required"
    default_message = "The auth server requires a recent sign-in to change the password. Sign in again first."


class AccountMismatch(Conflict):
    code = "account_mismatch"
    default_message = (
        "The e-mail address belongs to a different local account than the auth server's user. "
        "Ask the operator to reconcile the two."
    )


class GoTrueRejection(Exception):
    """A 4xx response from GoTrue other than 429, which each operation maps to a domain error."""

    def __init__(self, status_code: int, error_code: str | None, message: str) -> None:
        super().__init__(f"GoTrue rejected the request with HTTP {status_code} ({error_code})")
        self.status_code = status_code
        self.error_code = error_code
        self.message = message

    def matches(self, codes: frozenset[str], phrases: tuple[str, ...] = ()) -> bool:
        """Tell whether the rejection has one of `codes` or, for GoTrue versions without error codes, a phrase."""
        if self.error_code in codes:
            return True
        text = self.message.lower()
        return any(phrase in text for phrase in phrases)


class GoTrueUser(BaseModel):
    """The parts of GoTrue's user object that this server reads."""

    model_config = ConfigDict(extra="ignore")

    id: uuid.UUID
    email: str | None = None
    # GoTrue returns an empty list instead of an error when an e-mail address that already has a
    # confirmed account signs up again while confirmation is on, so as not to reveal the account.
    identities: list[dict[str, Any]] | None = None
    user_metadata: dict[str, Any] = Field(default_factory=dict)

    @property
    def full_name(self) -> str | None:
        value = self.user_metadata.get("full_name")
        return value.strip()[:200] if isinstance(value, str) and value.strip() else None


class GoTrueSession(BaseModel):
    """GoTrue's session response (password and refresh_token grants, and sign-up without confirmation)."""

    model_config = ConfigDict(extra="ignore")

    access_token: str
    refresh_token: str
    expires_in: int | None = None
    user: GoTrueUser


@dataclass(frozen=True, slots=True)
class VerifiedSession:
    """A GoTrue session whose access token passed our own verification."""

    upstream: GoTrueSession
    claims: AccessTokenClaims
    session_id: uuid.UUID


class GoTrueClient:
    """Calls GoTrue's REST API (`{SUPABASE_URL}/auth/v1`) and turns transport failures into domain errors.

    Timeouts, connection errors and 5xx responses raise UpstreamError, 429 raises RateLimited with GoTrue's
    Retry-After, and other 4xx responses raise GoTrueRejection. Request bodies, the API key and user tokens
    are never logged.
    """

    def __init__(self, settings: Settings, http_client: httpx.AsyncClient | None = None) -> None:
        if not settings.supabase_url or not settings.supabase_anon_key:
            raise ConfigurationError("AUTH_BACKEND=supabase needs SUPABASE_URL and SUPABASE_ANON_KEY to be set.")
        self._base_url = f"{settings.supabase_url}/auth/v1"
        self._api_key = settings.supabase_anon_key
        self._timeout_seconds = settings.supabase_timeout_seconds
        # A client passed in belongs to the caller, who also closes it.
        self._owns_http_client = http_client is None
        # One client serves every user, so it keeps no cookies, like the provider clients. A cookie that GoTrue
        # or a proxy in front of it sets for one user's request must not go out with another user's.
        self._http = http_client or ProviderClient(timeout=settings.supabase_timeout_seconds, follow_redirects=False)

    async def sign_up(self, email: str, password: str, full_name: str | None) -> GoTrueSession | GoTrueUser:
        """Create a GoTrue user. Returns only the user when GoTrue requires e-mail confirmation first."""
        data = {"full_name": full_name} if full_name else {}
        body = await self._call(
            "POST", "/signup", operation="sign_up", json={"email": email, "password": password, "data": data}
        )
        if "access_token" in body:
            return self._parse(GoTrueSession, body, operation="sign_up")
        return self._parse(GoTrueUser, body, operation="sign_up")

    async def sign_in_with_password(self, email: str, password: str) -> GoTrueSession:
        body = await self._call(
            "POST",
            "/token",
            operation="sign_in",
            params={"grant_type": "password"},
            json={"email": email, "password": password},
        )
        return self._parse(GoTrueSession, body, operation="sign_in")

    async def refresh(self, refresh_token: str) -> GoTrueSession:
        body = await self._call(
            "POST",
            "/token",
            operation="refresh",
            params={"grant_type": "refresh_token"},
            json={"refresh_token": refresh_token},
        )
        return self._parse(GoTrueSession, body, operation="refresh")

    async def sign_out(self, access_token: str, scope: SignOutScope) -> None:
        await self._call("POST", "/logout", operation="sign_out", params={"scope": scope}, access_token=access_token)

    async def update_password(self, access_token: str, password: str) -> None:
        await self._call(
            "PUT", "/user", operation="update_password", json={"password": password}, access_token=access_token
        )

    async def close(self) -> None:
        if self._owns_http_client:
            await self._http.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        *,
        operation: str,
        params: dict[str, str] | None = None,
        json: dict[str, Any] | None = None,
        access_token: str | None = None,
    ) -> dict[str, Any]:
        headers = {"apikey": self._api_key, "Authorization": f"Bearer {access_token or self._api_key}"}
        try:
            response = await self._http.request(
                method, f"{self._base_url}{path}", params=params, json=json, headers=headers
            )
        except httpx.TimeoutException as error:
            log.warning("auth.gotrue.timed_out", operation=operation, timeout_seconds=self._timeout_seconds)
            raise UpstreamError(
                f"The auth server did not respond within {self._timeout_seconds:g} seconds. Try again later."
            ) from error
        except httpx.RequestError as error:
            # Also a body that cannot be decoded with its Content-Encoding (httpx.DecodingError).
            log.warning("auth.gotrue.unreachable", operation=operation, error_type=type(error).__name__)
            raise UpstreamError("The auth server could not be reached. Try again later.") from error

        body = _json_object(response)
        if response.is_success:
            return body
        self._raise_for_status(response, body, operation=operation)

    def _raise_for_status(self, response: httpx.Response, body: dict[str, Any], *, operation: str) -> NoReturn:
        status = response.status_code
        error_code, message = _error_fields(body)
        if status == 429:
            log.info("auth.gotrue.rate_limited", operation=operation, error_code=error_code)
            retry_after = _retry_after(response.headers.get("retry-after"))
            raise RateLimited(headers={"Retry-After": retry_after} if retry_after else None)
        if status >= 500 or status < 400:
            log.warning("auth.gotrue.failed", operation=operation, status=status, error_code=error_code)
            raise UpstreamError(f"The auth server failed with HTTP {status}. Try again later.")
        if status == 401 and "api key" in message.lower():
            # The API gateway and GoTrue respond this way when SUPABASE_ANON_KEY is wrong, which users cannot fix.
            log.error("auth.gotrue.api_key_rejected", operation=operation)
            raise UpstreamError("The auth server rejected this server's credentials. Try again later.")
        log.info("auth.gotrue.rejected", operation=operation, status=status, error_code=error_code)
        raise GoTrueRejection(status, error_code, message)

    @staticmethod
    def _parse(model: type[ModelT], body: dict[str, Any], *, operation: str) -> ModelT:
        try:
            return model.model_validate(body)
        except ValidationError as error:
            # Only the field locations are logged, because the error text would echo the input, which contains tokens.
            fields = [".".join(str(part) for part in item["loc"]) for item in error.errors()]
            log.error("auth.gotrue.unexpected_response", operation=operation, fields=fields)
            raise UpstreamError("The auth server returned a response this server does not understand.") from None


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error_fields(body: dict[str, Any]) -> tuple[str | None, str]:
    """Read the error code and message from any of GoTrue's error shapes.

    Newer GoTrue sends `{"code": 400, "error_code": "...", "msg": "..."}`. Older versions and the OAuth-style
    token endpoint send `{"error": "...", "error_description": "..."}`, and the API gateway `{"message": "..."}`.
    """
    error_code = body.get("error_code") or body.get("error")
    message = body.get("msg") or body.get("error_description") or body.get("message") or ""
    return (error_code if isinstance(error_code, str) else None), (message if isinstance(message, str) else "")


def _retry_after(value: str | None) -> str | None:
    """Return GoTrue's Retry-After value if it is delay-seconds or an HTTP date (RFC 9110), else None."""
    if value is None:
        return None
    value = value.strip()
    if _RETRY_AFTER_SECONDS.fullmatch(value):
        return value
    try:
        parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return value


_CREDENTIALS_INVALID = frozenset({"invalid_credentials", "invalid_grant"})
_EMAIL_NOT_CONFIRMED = frozenset({"email_not_confirmed"})
_USER_EXISTS = frozenset({"user_already_exists", "email_exists"})
_WEAK_PASSWORD = frozenset({"weak_password"})
_SAME_PASSWORD = frozenset({"same_password"})
_SIGNUP_DISABLED = frozenset({"signup_disabled", "email_provider_disabled"})
_EMAIL_INVALID = frozenset({"email_address_invalid"})
_REAUTHENTICATION_NEEDED = frozenset({"reauthentication_needed", "reauthentication_not_valid"})


def _upstream_message(rejection: GoTrueRejection) -> str | None:
    return rejection.message[:MAX_UPSTREAM_MESSAGE_LENGTH] or None


def _unexpected_rejection(rejection: GoTrueRejection) -> UpstreamError:
    label = rejection.error_code or f"HTTP {rejection.status_code}"
    return UpstreamError(f"The auth server rejected the request unexpectedly ({label}).")


def _sign_up_error(rejection: GoTrueRejection) -> PocketLLMError:
    if rejection.matches(_USER_EXISTS, ("already registered", "already exists")):
        return service.UserAlreadyExists()
    if rejection.matches(_WEAK_PASSWORD, ("password should", "password is")):
        return WeakPassword(_upstream_message(rejection))
    if rejection.matches(_SIGNUP_DISABLED, ("signups not allowed",)):
        return SignUpDisabled()
    if rejection.matches(_EMAIL_INVALID, ("validate email",)):
        return InvalidEmail("The auth server rejected the e-mail address; check it for typos.")
    return _unexpected_rejection(rejection)


def _sign_in_error(rejection: GoTrueRejection) -> PocketLLMError:
    if rejection.matches(_EMAIL_NOT_CONFIRMED, ("email not confirmed",)):
        return EmailNotConfirmed()
    if rejection.matches(_CREDENTIALS_INVALID, ("invalid login credentials",)):
        return service.InvalidCredentials()
    return _unexpected_rejection(rejection)


def _password_update_error(rejection: GoTrueRejection) -> PocketLLMError:
    if rejection.matches(_SAME_PASSWORD, ("should be different",)):
        return PasswordUnchanged()
    if rejection.matches(_WEAK_PASSWORD, ("password should", "password is")):
        return WeakPassword(_upstream_message(rejection))
    if rejection.matches(_REAUTHENTICATION_NEEDED, ("reauthentication",)):
        return ReauthenticationRequired()
    if rejection.status_code in (401, 403):
        return SessionRevoked("The session has ended on the auth server. Sign in again.")
    return _unexpected_rejection(rejection)


class SupabaseAuthBackend(AuthBackend):
    def __init__(self, settings: Settings, database: Database, http_client: httpx.AsyncClient | None = None) -> None:
        self._settings = settings
        self._database = database
        self._gotrue = GoTrueClient(settings, http_client)
        self._verifier = AccessTokenVerifier(settings)

    async def sign_up(self, request: SignUpRequest, client: ClientInfo) -> SignUpResponse:
        email = canonicalize_email(request.email)

        async with self._database.transaction() as session:
            if await service.find_user_by_email(session, email) is not None:
                raise service.UserAlreadyExists()

        # The invite use is committed before GoTrue is called, so no transaction stays open while the
        # request waits on the network. It is given back if the sign-up does not complete.
        async with self._database.transaction() as session:
            grant = await service.grant_sign_up(session, self._settings, email=email, code=request.code)

        try:
            return await self._complete_sign_up(request, email, grant, client)
        except BaseException:
            if grant.invite is not None:
                # Shielded, so that a request cancelled while waiting on GoTrue still gives the use back.
                with anyio.CancelScope(shield=True):
                    await self._release_invite(grant.invite.id)
            raise

    async def _complete_sign_up(
        self, request: SignUpRequest, email: str, grant: service.SignUpGrant, client: ClientInfo
    ) -> SignUpResponse:
        try:
            result = await self._gotrue.sign_up(email, request.password, request.full_name)
        except GoTrueRejection as rejection:
            raise _sign_up_error(rejection) from None

        verified: VerifiedSession | None = None
        if isinstance(result, GoTrueUser):
            gotrue_user = result
            if result.identities == []:
                raise service.UserAlreadyExists()
        else:
            gotrue_user = result.user
            verified = await self._verify_issued(result, operation="sign_up")

        try:
            async with self._database.transaction() as session:
                user, profile = await service.create_account(
                    session,
                    email=email,
                    password_hash=None,
                    full_name=request.full_name,
                    grant=grant,
                    user_id=gotrue_user.id,
                )
                if verified is not None:
                    user.last_sign_in_at = utcnow()
                    await _track_session(session, user.id, verified, client)
        except IntegrityError as error:
            log.error("auth.account_mismatch", user_id=str(gotrue_user.id))
            raise AccountMismatch() from error

        log.info(
            "auth.signed_up",
            user_id=str(user.id),
            via_invite=grant.invite is not None,
            confirmation_required=verified is None,
        )
        if verified is None:
            return SignUpResponse(
                user=service.to_auth_user(user, profile),
                account_status=AccountStatus(),
                message=CONFIRM_EMAIL_MESSAGE,
            )
        tokens, session_info = _session_output(verified)
        return SignUpResponse(
            user=service.to_auth_user(user, profile),
            tokens=tokens,
            session=session_info,
            account_status=AccountStatus(),
        )

    async def sign_in(self, request: SignInRequest, client: ClientInfo) -> SignInResponse:
        try:
            email = canonicalize_email(request.email)
        except InvalidInput:
            log.info("auth.sign_in_rejected")
            raise service.InvalidCredentials() from None

        try:
            upstream = await self._password_grant(email, request.password)
        except service.InvalidCredentials:
            log.info("auth.sign_in_rejected")
            raise
        verified = await self._verify_issued(upstream, operation="sign_in")
        gotrue_user = upstream.user
        await self._ensure_account(gotrue_user.id, _local_email(gotrue_user, email), gotrue_user.full_name)

        async with self._database.transaction() as session:
            user = await session.get_one(User, gotrue_user.id)
            profile = await session.get_one(Profile, gotrue_user.id)
            user.last_sign_in_at = utcnow()
            account_status = await service.cancel_scheduled_deletion(session, profile)
            await _track_session(session, user.id, verified, client)

        log.info("auth.signed_in", user_id=str(user.id), deletion_canceled=account_status.deletion_canceled)
        tokens, session_info = _session_output(verified)
        return SignInResponse(
            user=service.to_auth_user(user, profile),
            tokens=tokens,
            session=session_info,
            account_status=account_status,
        )

    async def refresh(self, refresh_token: str) -> RefreshTokenResponse:
        try:
            upstream = await self._gotrue.refresh(refresh_token)
        except GoTrueRejection:
            raise RefreshTokenInvalid() from None
        verified = await self._verify_issued(upstream, operation="refresh")
        gotrue_user = upstream.user
        await self._ensure_account(
            gotrue_user.id, _local_email(gotrue_user, verified.claims.email), gotrue_user.full_name
        )

        async with self._database.transaction() as session:
            revoked_at = await session.scalar(
                select(AuthSession.revoked_at).where(AuthSession.id == verified.session_id)
            )
            if revoked_at is None:
                await _track_session(session, gotrue_user.id, verified, ClientInfo())
            user = await session.get_one(User, gotrue_user.id)
            profile = await session.get(Profile, gotrue_user.id)

        if revoked_at is not None:
            # GoTrue still had a session that was signed out here, because its logout call failed then.
            log.warning("auth.refresh_of_revoked_session", session_id=str(verified.session_id))
            await self._end_upstream_session(upstream.access_token, operation="refresh")
            raise RefreshTokenInvalid()

        tokens, session_info = _session_output(verified)
        return RefreshTokenResponse(tokens=tokens, session=session_info, user=service.to_auth_user(user, profile))

    async def sign_out(self, principal: Principal, scope: SignOutScope) -> SignOutResponse:
        # Recorded here first, so the access token stops working even if GoTrue cannot be reached.
        async with self._database.transaction() as session:
            revoked = await _revoke_sessions(session, principal, scope=scope, reason="signed_out")

        try:
            await self._gotrue.sign_out(principal.access_token, scope)
        except GoTrueRejection as rejection:
            # A 401, 403 or 404 means that GoTrue has already ended the session or that the token has expired there.
            log.info("auth.gotrue.sign_out_rejected", user_id=str(principal.user_id), status=rejection.status_code)
        except (UpstreamError, RateLimited) as error:
            log.warning("auth.gotrue.sign_out_failed", user_id=str(principal.user_id), code=error.code)

        log.info("auth.signed_out", user_id=str(principal.user_id), scope=scope, revoked=revoked)
        return SignOutResponse(revoked_sessions=revoked)

    async def change_password(self, principal: Principal, old: str, new: str) -> PasswordChangeResponse:
        if old == new:
            raise PasswordUnchanged()

        # GoTrue's user update does not check the current password, so a password grant checks it. The
        # grant opens a session of its own, which is ended again at once.
        try:
            check = await self._password_grant(principal.email, old)
        except service.InvalidCredentials:
            log.info("auth.password_change_rejected", user_id=str(principal.user_id))
            raise service.IncorrectPassword() from None
        await self._end_upstream_session(check.access_token, operation="change_password")
        if check.user.id != principal.user_id:
            log.warning("auth.password_change_user_mismatch", user_id=str(principal.user_id))
            raise service.IncorrectPassword()

        try:
            await self._gotrue.update_password(principal.access_token, new)
        except GoTrueRejection as rejection:
            raise _password_update_error(rejection) from None

        # Anyone who knew the old password may have other sessions open, so those end. This device stays signed in.
        async with self._database.transaction() as session:
            revoked = await _revoke_sessions(session, principal, scope="others", reason="password_changed")
        await self._end_upstream_session(principal.access_token, operation="change_password", scope="others")

        log.info("auth.password_changed", user_id=str(principal.user_id), revoked_sessions=revoked)
        return PasswordChangeResponse(message="Password changed.", revoked_sessions=revoked)

    async def authenticate(self, token: str) -> Principal:
        claims = await self._verifier.verify(token)
        if claims.session_id is None:
            raise TokenInvalid("The access token has no 'session_id' claim.")

        async with self._database.read_only() as session:
            row = (
                await session.execute(
                    select(User.email, AuthSession.revoked_at)
                    .select_from(User)
                    .outerjoin(AuthSession, and_(AuthSession.id == claims.session_id, AuthSession.user_id == User.id))
                    .where(User.id == claims.user_id)
                )
            ).one_or_none()

        if row is None:
            # A valid token of a GoTrue user this server has not seen yet, e.g. one made in GoTrue directly.
            email = _claims_email(claims)
            await self._ensure_account(claims.user_id, email, full_name=None)
            return Principal(user_id=claims.user_id, email=email, session_id=claims.session_id, access_token=token)
        if row.revoked_at is not None:
            raise SessionRevoked()
        return Principal(user_id=claims.user_id, email=row.email, session_id=claims.session_id, access_token=token)

    async def close(self) -> None:
        await self._gotrue.close()

    async def _password_grant(self, email: str, password: str) -> GoTrueSession:
        try:
            return await self._gotrue.sign_in_with_password(email, password)
        except GoTrueRejection as rejection:
            raise _sign_in_error(rejection) from None

    async def _verify_issued(self, upstream: GoTrueSession, *, operation: str) -> VerifiedSession:
        """Verify an access token GoTrue has just issued, so that a wrong secret or JWKS URL fails here, loudly."""
        try:
            claims = await self._verifier.verify(upstream.access_token)
        except NotAuthenticated as error:
            log.error(
                "auth.gotrue.token_unverifiable",
                operation=operation,
                code=error.code,
                hint="check SUPABASE_JWT_SECRET, SUPABASE_JWKS_URL and JWT_ALGORITHMS",
            )
            raise UpstreamError("The auth server issued an access token that this server cannot verify.") from None
        if claims.session_id is None or claims.user_id != upstream.user.id:
            log.error("auth.gotrue.token_unexpected", operation=operation, has_session_id=claims.session_id is not None)
            raise UpstreamError("The auth server issued an access token without the expected claims.")
        return VerifiedSession(upstream=upstream, claims=claims, session_id=claims.session_id)

    async def _ensure_account(self, user_id: uuid.UUID, email: str, full_name: str | None) -> None:
        """Create the local user and profile of a GoTrue user unless they exist. No invite is needed.

        NOTE: an account purged here still exists in GoTrue, so a token GoTrue issued before the purge
        creates a fresh, empty local account until it expires. Deleting the GoTrue user through its admin
        API during the purge (needs SUPABASE_SERVICE_ROLE_KEY) would close this gap.
        """
        try:
            async with self._database.transaction() as session:
                user = await session.get(User, user_id)
                if user is None:
                    await service.create_account(
                        session,
                        email=email,
                        password_hash=None,
                        full_name=full_name,
                        grant=service.SignUpGrant(),
                        user_id=user_id,
                    )
                    log.info("auth.account_created_from_gotrue", user_id=str(user_id))
                elif await session.get(Profile, user_id) is None:
                    session.add(Profile(id=user_id, full_name=full_name, survey_completed=False, created_at=utcnow()))
            return
        except (service.UserAlreadyExists, IntegrityError):
            pass

        # Either a concurrent request has created the same account, or the e-mail address belongs to
        # another local user id.
        async with self._database.read_only() as session:
            if await session.get(User, user_id) is not None:
                return
        log.error("auth.account_mismatch", user_id=str(user_id))
        raise AccountMismatch()

    async def _release_invite(self, invite_id: uuid.UUID) -> None:
        async with self._database.transaction() as session:
            await referrals.release_invite_code(session, invite_id)
        log.info("auth.invite_use_released", invite_id=str(invite_id))

    async def _end_upstream_session(self, access_token: str, *, operation: str, scope: SignOutScope = "local") -> None:
        """Sign out at GoTrue where a failure must not fail the request, so a failure is only logged."""
        try:
            await self._gotrue.sign_out(access_token, scope)
        except (GoTrueRejection, UpstreamError, RateLimited) as error:
            log.warning("auth.gotrue.sign_out_failed", operation=operation, error_type=type(error).__name__)


def _local_email(gotrue_user: GoTrueUser, fallback: str | None) -> str:
    """Return the canonical form of the user's e-mail address in GoTrue, or `fallback` if it has none."""
    if gotrue_user.email:
        try:
            return canonicalize_email(gotrue_user.email)
        except InvalidEmail:
            pass
    if fallback is None:
        raise UpstreamError("The auth server returned a user without a valid e-mail address.")
    return fallback


def _claims_email(claims: AccessTokenClaims) -> str:
    if claims.email is None:
        raise TokenInvalid("The access token has no 'email' claim, which this server needs to create the account.")
    try:
        return canonicalize_email(claims.email)
    except InvalidEmail:
        raise TokenInvalid("The access token's 'email' claim is not a valid e-mail address.") from None


def _session_output(verified: VerifiedSession) -> tuple[AuthTokens, AuthSessionInfo]:
    expires_at = verified.claims.expires_at
    tokens = AuthTokens(
        access_token=verified.upstream.access_token,
        refresh_token=verified.upstream.refresh_token,
        expires_in=max(0, int((expires_at - utcnow()).total_seconds())),
    )
    # GoTrue does not say when the session itself ends, so refresh_expires_at stays empty.
    return tokens, AuthSessionInfo(session_id=verified.session_id, expires_at=expires_at)


def _insert_auth_session(session: AsyncSession, values: dict[str, Any]) -> Any:
    """Build an INSERT into `auth_sessions` in the dialect's own form, which offers ON CONFLICT."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(AuthSession).values(**values)
    if dialect == "sqlite":
        return sqlite.insert(AuthSession).values(**values)
    raise ConfigurationError(f"The Supabase auth backend supports SQLite and PostgreSQL, not {dialect}.")


async def _track_session(
    session: AsyncSession, user_id: uuid.UUID, verified: VerifiedSession, client: ClientInfo
) -> None:
    """Record a GoTrue session that was started or refreshed through this server.

    The row lets a later global sign-out revoke the session. A session that is already revoked stays revoked.
    """
    now = utcnow()
    statement = _insert_auth_session(
        session,
        {
            "id": verified.session_id,
            "user_id": user_id,
            "created_at": now,
            "expires_at": verified.claims.expires_at,
            "user_agent": (client.user_agent or "")[:512] or None,
            "ip_address": client.ip_address,
        },
    )
    statement = statement.on_conflict_do_update(
        index_elements=[AuthSession.id],
        set_={"expires_at": verified.claims.expires_at, "refreshed_at": now},
        where=and_(AuthSession.revoked_at.is_(None), AuthSession.user_id == user_id),
    )
    await session.execute(statement)


async def _revoke_sessions(session: AsyncSession, principal: Principal, *, scope: SignOutScope, reason: str) -> int:
    """Mark sessions revoked: the caller's (local), all of the user's (global) or all but the caller's (others).

    The caller's own session gets a row even if it was never tracked, expiring with its access token.
    Other sessions are revoked only if they have a row, that is, if they were started through this server.
    """
    now = utcnow()
    revoked = 0
    current = principal.session_id
    if current is not None and scope in ("local", "global"):
        statement = _insert_auth_session(
            session,
            {
                "id": current,
                "user_id": principal.user_id,
                "created_at": now,
                "expires_at": _token_expiry(principal.access_token) or now,
                "revoked_at": now,
                "revoked_reason": reason,
            },
        )
        statement = statement.on_conflict_do_update(
            index_elements=[AuthSession.id],
            set_={"revoked_at": now, "revoked_reason": reason},
            where=and_(AuthSession.revoked_at.is_(None), AuthSession.user_id == principal.user_id),
        )
        result = await session.execute(statement)
        revoked += int(result.rowcount)  # type: ignore[attr-defined]

    if scope in ("global", "others"):
        others = update(AuthSession).where(AuthSession.user_id == principal.user_id, AuthSession.revoked_at.is_(None))
        if current is not None:
            others = others.where(AuthSession.id != current)
        result = await session.execute(
            others.values(revoked_at=now, revoked_reason=reason).execution_options(synchronize_session=False)
        )
        revoked += int(result.rowcount)  # type: ignore[attr-defined]
    return revoked


def _token_expiry(access_token: str) -> datetime | None:
    # No signature check: authenticate() has verified this token earlier in the same request.
    try:
        claims = jwt.decode(access_token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        return None
    expiry = claims.get("exp")
    return datetime.fromtimestamp(expiry, tz=utcnow().tzinfo) if isinstance(expiry, int) else None
