"""`CurrentUser`: the one way a handler learns who is calling."""

from __future__ import annotations

from typing import Annotated

import structlog
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pocketllm.auth.backends.base import AuthBackend, ClientInfo, Principal
from pocketllm.errors import NotAuthenticated

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
    backend: Annotated[AuthBackend, Depends(get_auth_backend)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise NotAuthenticated()
    principal = await backend.authenticate(credentials.credentials)
    structlog.contextvars.bind_contextvars(user_id=str(principal.user_id))
    return principal


CurrentUser = Annotated[Principal, Depends(get_current_user)]
Backend = Annotated[AuthBackend, Depends(get_auth_backend)]
Client = Annotated[ClientInfo, Depends(get_client_info)]
