"""`CurrentUser`: the one way a handler learns who is calling."""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from pocketllm.auth.backends.base import AuthBackend, ClientInfo, Principal
from pocketllm.auth.backends.local import SessionRevoked
from pocketllm.db.engine import Database
from pocketllm.errors import NotAuthenticated, error_json
from pocketllm.models import User

log = structlog.get_logger(__name__)

# Every dependency here is `async def`: FastAPI runs plain functions in a thread pool, which costs a thread
# hand-off on every request for what is only an attribute lookup.
_bearer = HTTPBearer(auto_error=False, description="An access token from sign-in, sign-up or refresh.")


async def get_auth_backend(request: Request) -> AuthBackend:
    backend: AuthBackend = request.app.state.auth_backend
    return backend


async def get_client_info(request: Request) -> ClientInfo:
    return ClientInfo(
        user_agent=request.headers.get("user-agent"),
        ip_address=request.client.host if request.client else None,
    )


async def get_current_user(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise NotAuthenticated()
    # The backend comes from the app's state directly, because as a dependency of its own FastAPI would
    # resolve it on every authenticated request.
    backend: AuthBackend = request.app.state.auth_backend
    principal = await backend.authenticate(credentials.credentials)
    structlog.contextvars.bind_contextvars(user_id=str(principal.user_id))
    # For handle_account_deleted, which runs after the handler has failed.
    request.state.principal = principal
    return principal


async def handle_account_deleted(request: Request, error: Exception) -> Response:
    """Return 401 `session_revoked` when a write failed because the caller's account was deleted meanwhile.

    The session check passed, but the account was deleted before the handler wrote a row that refers to
    it, so the foreign key to `users` failed. Any other integrity error is a bug and stays a 500.
    """
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None or not _is_foreign_key_violation(error):
        raise error
    database: Database = request.app.state.database
    async with database.read_connection() as connection:
        account = await connection.scalar(select(User.id).where(User.id == principal.user_id))
    if account is not None:
        raise error
    log.info("auth.account_deleted_during_request", user_id=str(principal.user_id))
    return error_json(401, SessionRevoked.code, SessionRevoked.default_message)


def _is_foreign_key_violation(error: Exception) -> bool:
    if not isinstance(error, IntegrityError):
        return False
    # SQLSTATE 23503 on PostgreSQL. SQLite gives only this message, without the constraint's name.
    return getattr(error.orig, "sqlstate", None) == "23503" or str(error.orig) == "FOREIGN KEY constraint failed"


CurrentUser = Annotated[Principal, Depends(get_current_user)]
Backend = Annotated[AuthBackend, Depends(get_auth_backend)]
Client = Annotated[ClientInfo, Depends(get_client_info)]
