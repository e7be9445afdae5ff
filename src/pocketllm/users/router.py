"""/v1/users: the caller's profile."""

from __future__ import annotations

from fastapi import APIRouter

from pocketllm.auth.dependencies import CurrentUser
from pocketllm.db.dependencies import DbSession
from pocketllm.errors import NotAuthenticated, error_responses
from pocketllm.kit.routing import JsonBodyRoute
from pocketllm.users import service
from pocketllm.users.schemas import UserProfile

router = APIRouter(prefix="/v1/users", tags=["users"], route_class=JsonBodyRoute)


@router.get(
    "/profile", response_model=UserProfile, responses=error_responses(NotAuthenticated, service.ProfileNotFound)
)
async def get_profile(user: CurrentUser, session: DbSession) -> UserProfile:
    """Return the caller's profile."""
    account, profile = await service.get_profile(session, user.user_id)
    return UserProfile.from_rows(account, profile)
