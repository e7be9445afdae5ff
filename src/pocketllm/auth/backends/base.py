"""The interface both auth backends implement, and the identity they hand to route handlers."""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

from pocketllm.auth.schemas import (
    PasswordChangeResponse,
    RefreshTokenResponse,
    SignInRequest,
    SignInResponse,
    SignOutResponse,
    SignUpRequest,
    SignUpResponse,
)

SignOutScope = Literal["local", "global", "others"]


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """Origin of a sign-in (user agent and IP address), kept on the session for the user's own review."""

    user_agent: str | None = None
    ip_address: str | None = None


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller of a request."""

    user_id: uuid.UUID
    email: str
    session_id: uuid.UUID | None
    access_token: str


class AuthBackend(ABC):
    """Signs users up and in, refreshes and revokes sessions, and authenticates access tokens.

    Every method opens its own short transactions and is called while the request holds none, because
    the Supabase backend must not hold a database connection while it waits for GoTrue.
    """

    @abstractmethod
    async def sign_up(self, request: SignUpRequest, client: ClientInfo) -> SignUpResponse: ...

    @abstractmethod
    async def sign_in(self, request: SignInRequest, client: ClientInfo) -> SignInResponse: ...

    @abstractmethod
    async def refresh(self, refresh_token: str) -> RefreshTokenResponse: ...

    @abstractmethod
    async def sign_out(self, principal: Principal, scope: SignOutScope) -> SignOutResponse: ...

    @abstractmethod
    async def change_password(self, principal: Principal, old: str, new: str) -> PasswordChangeResponse: ...

    @abstractmethod
    async def authenticate(self, token: str) -> Principal:
        """Verify an access token and check that its session is still live.

        Runs in its own short read-only transaction, finished before the route handler opens the request's
        transaction, so a request never holds two database connections at once.
        """

    async def start(self) -> None:  # noqa: B027  (optional hook)
        """Start background work, such as listening for notices; called when the app starts."""

    async def close(self) -> None:  # noqa: B027  (optional hook)
        """Release network clients; called when the app shuts down."""
