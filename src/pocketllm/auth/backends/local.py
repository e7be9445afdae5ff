"""The default auth backend: users, password hashes and sessions live in our own database."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta

import structlog
from sqlalchemy import bindparam, select, text, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from pocketllm.auth import service
from pocketllm.auth.backends.base import AuthBackend, ClientInfo, Principal, SignOutScope
from pocketllm.auth.emails import canonicalize_email
from pocketllm.auth.passwords import PasswordHashing
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
from pocketllm.auth.session_cache import SESSIONS_CHANNEL, SessionCheckCache
from pocketllm.auth.tokens import (
    AccessTokenVerifier,
    TokenInvalid,
    hash_refresh_token,
    issue_access_token,
    new_refresh_token,
)
from pocketllm.config import Settings
from pocketllm.db.driver_query import DriverQuery
from pocketllm.db.engine import Database
from pocketllm.db.notices import NoticeListener, listener_dsn
from pocketllm.db.types import utcnow
from pocketllm.errors import InvalidInput, NotAuthenticated
from pocketllm.models import AuthSession, Profile, RefreshToken, User

log = structlog.get_logger(__name__)


# Runs on every authenticated request. Built once, so that each run skips building the expression and
# looking up its compiled form.
_SESSION_CHECK = DriverQuery(
    select(AuthSession.revoked_at, AuthSession.expires_at, User.email)
    .join(User, User.id == AuthSession.user_id)
    .where(AuthSession.id == bindparam("p_session_id"), AuthSession.user_id == bindparam("p_user_id"))
)


# The triggers of migration 0009 that send the notices the session cache relies on.
SESSION_TRIGGERS = ("auth_sessions_changed", "auth_sessions_emptied", "users_changed", "users_emptied")
_SESSION_TRIGGERS_INSTALLED = text("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal AND tgname = ANY(:names)")
# How long shutting down waits for the session listener to stop before cancelling it.
LISTENER_STOP_SECONDS = 5.0


class SessionRevoked(NotAuthenticated):
    code = "session_revoked"
    default_message = "The session has been signed out; sign in again."


class SessionExpired(NotAuthenticated):
    code = "session_expired"
    default_message = "The session has expired; sign in again."


class RefreshTokenInvalid(NotAuthenticated):
    code = "refresh_token_invalid"
    default_message = "Invalid refresh token; sign in again."


class PasswordUnchanged(InvalidInput):
    code = "password_unchanged"
    default_message = "The new password must differ from the current one."


class _RefreshTokenReplayed(Exception):
    def __init__(self, session_id: uuid.UUID, user_id: uuid.UUID) -> None:
        self.session_id = session_id
        self.user_id = user_id


class LocalAuthBackend(AuthBackend):
    def __init__(self, settings: Settings, database: Database, passwords: PasswordHashing) -> None:
        self._settings = settings
        self._database = database
        self._passwords = passwords
        self._verifier = AccessTokenVerifier(settings)
        self.session_cache = SessionCheckCache(settings.session_cache_seconds)
        self.session_listener: NoticeListener | None = None
        dsn = listener_dsn(settings.effective_database_url)
        if dsn is not None and settings.session_cache_seconds > 0:
            self.session_listener = NoticeListener(
                dsn,
                SESSIONS_CHANNEL,
                self.session_cache.notice,
                log_prefix="auth.session_cache",
                on_listening=self.session_cache.listening,
                on_lost=self.session_cache.lost,
            )
        self._listener_stop = asyncio.Event()
        self._listener_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.session_listener is None:
            return
        # Without the triggers no notice would ever come, and a sign-out would reach other processes only
        # after SESSION_CACHE_SECONDS. So the cache stays off: every request checks its session.
        try:
            async with self._database.read_connection() as connection:
                installed = await connection.scalar(_SESSION_TRIGGERS_INSTALLED, {"names": list(SESSION_TRIGGERS)})
        except (OSError, SQLAlchemyError) as error:
            log.warning("auth.session_cache_off", reason="trigger check failed", error=type(error).__name__)
            return
        if installed != len(SESSION_TRIGGERS):
            log.warning(
                "auth.session_cache_off",
                reason="session triggers missing; run `pocketllm migrate` and restart",
                triggers_found=installed,
            )
            return
        self._listener_task = asyncio.create_task(
            self.session_listener.run(self._listener_stop), name="session-listener"
        )

    async def close(self) -> None:
        self._listener_stop.set()
        if self._listener_task is not None:
            # The listener may be waiting for a connection to an unreachable server; do not wait that long.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._listener_task, timeout=LISTENER_STOP_SECONDS)
            self._listener_task = None

    async def sign_up(self, request: SignUpRequest, client: ClientInfo) -> SignUpResponse:
        email = canonicalize_email(request.email)

        # Checked before hashing so that a duplicate costs no Argon2 run; the unique index still decides.
        async with self._database.transaction() as session:
            if await service.find_user_by_email(session, email) is not None:
                raise service.UserAlreadyExists()
        password_hash = await self._passwords.hash(request.password)

        async with self._database.transaction() as session:
            grant = await service.grant_sign_up(session, self._settings, email=email, code=request.code)
            user, profile = await service.create_account(
                session, email=email, password_hash=password_hash, full_name=request.full_name, grant=grant
            )
            user.last_sign_in_at = utcnow()
            tokens, session_info = await self._start_session(session, user, client)

        log.info("auth.signed_up", user_id=str(user.id), via_invite=grant.invite is not None)
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
            email = None

        async with self._database.transaction() as session:
            user = await service.find_user_by_email(session, email) if email else None
        password_hash = user.password_hash if user else None
        if not await self._passwords.verify(password_hash, request.password) or user is None:
            log.info("auth.sign_in_rejected")
            raise service.InvalidCredentials()
        new_hash = await self._rehash_if_outdated(password_hash, request.password)

        async with self._database.transaction() as session:
            user = await session.get_one(User, user.id)
            profile = await session.get_one(Profile, user.id)
            user.last_sign_in_at = utcnow()
            if new_hash is not None:
                user.password_hash = new_hash
            account_status = await service.cancel_scheduled_deletion(session, profile)
            tokens, session_info = await self._start_session(session, user, client)

        log.info("auth.signed_in", user_id=str(user.id), deletion_canceled=account_status.deletion_canceled)
        return SignInResponse(
            user=service.to_auth_user(user, profile),
            tokens=tokens,
            session=session_info,
            account_status=account_status,
        )

    async def refresh(self, refresh_token: str) -> RefreshTokenResponse:
        try:
            return await self._refresh(refresh_token)
        except _RefreshTokenReplayed as replay:
            async with self._revoking(replay.user_id) as session:
                await self._revoke_sessions(
                    session, replay.user_id, scope="local", current=replay.session_id, reason="token_reused"
                )
            log.warning("auth.refresh_token_reused", session_id=str(replay.session_id))
            raise RefreshTokenInvalid("This refresh token was already used; the session has been signed out.") from None

    async def _refresh(self, refresh_token: str) -> RefreshTokenResponse:
        now = utcnow()
        async with self._database.transaction() as session:
            stored = await session.scalar(
                select(RefreshToken)
                .where(RefreshToken.token_hash == hash_refresh_token(refresh_token))
                .with_for_update()
            )
            if stored is None:
                raise RefreshTokenInvalid()
            auth_session = await session.get_one(AuthSession, stored.session_id, with_for_update=True)
            if auth_session.revoked_at is not None or auth_session.expires_at <= now:
                raise RefreshTokenInvalid()

            if self._settings.refresh_token_rotation:
                refresh_token = await self._rotate(session, auth_session, stored, now)
            elif stored.revoked_at is not None:
                raise RefreshTokenInvalid()

            auth_session.refreshed_at = now
            auth_session.expires_at = now + timedelta(seconds=self._settings.session_ttl_seconds)
            user = await session.get_one(User, auth_session.user_id)
            profile = await session.get(Profile, user.id)
            access_token, access_expires_at = issue_access_token(
                self._settings, user_id=user.id, email=user.email, session_id=auth_session.id
            )

        return RefreshTokenResponse(
            tokens=self._tokens(access_token, refresh_token, access_expires_at),
            session=AuthSessionInfo(
                session_id=auth_session.id,
                expires_at=access_expires_at,
                refresh_expires_at=auth_session.expires_at,
            ),
            user=service.to_auth_user(user, profile),
        )

    async def sign_out(self, principal: Principal, scope: SignOutScope) -> SignOutResponse:
        async with self._revoking(principal.user_id) as session:
            revoked = await self._revoke_sessions(
                session, principal.user_id, scope=scope, current=principal.session_id, reason="signed_out"
            )
        log.info("auth.signed_out", user_id=str(principal.user_id), scope=scope, revoked=revoked)
        return SignOutResponse(revoked_sessions=revoked)

    async def change_password(self, principal: Principal, old: str, new: str) -> PasswordChangeResponse:
        async with self._database.transaction() as session:
            user = await session.get_one(User, principal.user_id)
        if not await self._passwords.verify(user.password_hash, old):
            log.info("auth.password_change_rejected", user_id=str(user.id))
            raise service.IncorrectPassword()
        if old == new:
            raise PasswordUnchanged()
        new_hash = await self._passwords.hash(new)

        async with self._revoking(principal.user_id) as session:
            await session.execute(
                update(User)
                .where(User.id == principal.user_id)
                .values(password_hash=new_hash, password_changed_at=utcnow(), updated_at=utcnow())
            )
            # Anyone who knew the old password may have other sessions open, so those end. This device stays signed in.
            revoked = await self._revoke_sessions(
                session,
                principal.user_id,
                scope="others",
                current=principal.session_id,
                reason="password_changed",
            )
        log.info("auth.password_changed", user_id=str(principal.user_id), revoked_sessions=revoked)
        return PasswordChangeResponse(message="Password changed.", revoked_sessions=revoked)

    async def authenticate(self, token: str) -> Principal:
        claims = await self._verifier.verify(token)
        if claims.session_id is None:
            raise TokenInvalid("The access token has no 'session_id' claim.")

        cache = self.session_cache
        email = cache.lookup(claims.session_id, claims.user_id, utcnow())
        if email is not None:
            return Principal(user_id=claims.user_id, email=email, session_id=claims.session_id, access_token=token)

        generation = cache.generation
        # One query with the driver's own call: no transaction, so no BEGIN and no ROLLBACK.
        async with self._database.driver_connection() as connection:
            row = await _SESSION_CHECK.first(
                connection, {"p_session_id": claims.session_id, "p_user_id": claims.user_id}
            )
        if row is None or row.revoked_at is not None:
            raise SessionRevoked()
        if row.expires_at <= utcnow():
            raise SessionExpired()
        cache.remember(claims.session_id, claims.user_id, row.email, row.expires_at, generation=generation)
        return Principal(user_id=claims.user_id, email=row.email, session_id=claims.session_id, access_token=token)

    @asynccontextmanager
    async def _revoking(self, user_id: uuid.UUID) -> AsyncIterator[AsyncSession]:
        """Yield a transaction that revokes sessions of `user_id`, and drop them from this process's cache after it.

        Other processes drop them when the trigger's notice arrives. Dropping them only after the commit
        matters, because a check running meanwhile could read the row before the commit and cache it again.
        """
        try:
            async with self._database.transaction() as session:
                yield session
        finally:
            self.session_cache.forget_user(user_id)

    async def _start_session(
        self, session: AsyncSession, user: User, client: ClientInfo
    ) -> tuple[AuthTokens, AuthSessionInfo]:
        now = utcnow()
        auth_session = AuthSession(
            id=uuid.uuid4(),
            user_id=user.id,
            created_at=now,
            expires_at=now + timedelta(seconds=self._settings.session_ttl_seconds),
            user_agent=(client.user_agent or "")[:512] or None,
            ip_address=client.ip_address,
        )
        session.add(auth_session)
        refresh_token, token_hash = new_refresh_token()
        session.add(RefreshToken(session_id=auth_session.id, token_hash=token_hash, created_at=now))
        await session.flush()

        access_token, access_expires_at = issue_access_token(
            self._settings, user_id=user.id, email=user.email, session_id=auth_session.id
        )
        session_info = AuthSessionInfo(
            session_id=auth_session.id,
            expires_at=access_expires_at,
            refresh_expires_at=auth_session.expires_at,
        )
        return self._tokens(access_token, refresh_token, access_expires_at), session_info

    async def _rotate(
        self, session: AsyncSession, auth_session: AuthSession, stored: RefreshToken, now: datetime
    ) -> str:
        """Revoke `stored` and return a new child token, or end the session when an old token is replayed.

        A token used again within REFRESH_TOKEN_REUSE_INTERVAL_SECONDS of its first use gets a sibling,
        so two requests racing with the same token both succeed. Later reuse means the token leaked: the
        whole session is revoked, as GoTrue does.
        """
        if stored.revoked_at is not None:
            reuse_window = timedelta(seconds=self._settings.refresh_token_reuse_interval_seconds)
            if now - stored.revoked_at > reuse_window:
                raise _RefreshTokenReplayed(auth_session.id, auth_session.user_id)
        else:
            stored.revoked_at = now

        child, child_hash = new_refresh_token()
        session.add(
            RefreshToken(session_id=auth_session.id, token_hash=child_hash, parent_id=stored.id, created_at=now)
        )
        await session.flush()
        return child

    @staticmethod
    async def _revoke_sessions(
        session: AsyncSession,
        user_id: uuid.UUID,
        *,
        scope: SignOutScope,
        current: uuid.UUID | None,
        reason: str,
    ) -> int:
        statement = update(AuthSession).where(AuthSession.user_id == user_id, AuthSession.revoked_at.is_(None))
        if scope == "local":
            statement = statement.where(AuthSession.id == current)
        elif scope == "others":
            statement = statement.where(AuthSession.id != current)
        result = await session.execute(
            statement.values(revoked_at=utcnow(), revoked_reason=reason).execution_options(synchronize_session=False)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def _rehash_if_outdated(self, password_hash: str | None, password: str) -> str | None:
        if password_hash is None or not self._passwords.needs_rehash(password_hash):
            return None
        return await self._passwords.hash(password)

    def _tokens(self, access_token: str, refresh_token: str, expires_at: datetime) -> AuthTokens:
        return AuthTokens(
            access_token=access_token,
            refresh_token=refresh_token,
            expires_in=max(0, int((expires_at - utcnow()).total_seconds())),
        )
