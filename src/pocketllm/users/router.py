"""/v1/users: the caller's profile, onboarding answers, avatar and account deletion."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated, Any

import anyio
import structlog
from fastapi import File, Request, UploadFile

from pocketllm.auth import service as auth_service
from pocketllm.auth.dependencies import CurrentUser
from pocketllm.db.dependencies import Db, DbSession
from pocketllm.db.types import AnyRow
from pocketllm.errors import Forbidden, NotAuthenticated, UnparsableBody, error_responses
from pocketllm.kit.routing import JsonBodyRoute, PrefixRouter
from pocketllm.models import Profile, User
from pocketllm.storage.service import FileStorage, new_key
from pocketllm.users import avatars, service
from pocketllm.users.schemas import (
    CancelDeletionResponse,
    DeleteAccountResponse,
    OnboardingSurvey,
    UserProfile,
    UserProfileUpdate,
)

router = PrefixRouter(prefix="/v1/users", tags=["users"], route_class=JsonBodyRoute)
log = structlog.get_logger(__name__)


def get_storage(request: Request) -> FileStorage:
    storage: FileStorage = request.app.state.storage
    return storage


def public_base_url(request: Request) -> str:
    """Return the server's own address for absolute file URLs: PUBLIC_BASE_URL, else the request's base URL."""
    configured: str | None = request.app.state.settings.public_base_url
    return (configured or str(request.base_url)).rstrip("/")


def render_profile(request: Request, user: User | AnyRow, profile: Profile | AnyRow) -> UserProfile:
    avatar_url = None
    if profile.avatar_key:
        avatar_url = get_storage(request).url_for(profile.avatar_key, base_url=public_base_url(request))
    return UserProfile.from_rows(user, profile, avatar_url=avatar_url)


async def _delete_file(request: Request, key: str | None) -> None:
    if key:
        await get_storage(request).delete(key)


@router.get(
    "/profile", response_model=UserProfile, responses=error_responses(NotAuthenticated, service.ProfileNotFound)
)
async def get_profile(user: CurrentUser, database: Db, request: Request) -> UserProfile:
    """Return the caller's profile."""
    async with database.driver_connection() as connection:
        row = await service.read_profile(connection, user.user_id)
    return render_profile(request, row, row)


@router.put(
    "/profile",
    response_model=UserProfile,
    responses=error_responses(NotAuthenticated, service.ProfileNotFound, service.UsernameTaken, UnparsableBody),
)
async def update_profile(payload: UserProfileUpdate, user: CurrentUser, database: Db, request: Request) -> UserProfile:
    """Change the fields sent; omitted fields stay and an explicit null clears one."""
    return await _apply_update(payload, user.user_id, database, request)


async def _apply_update(payload: UserProfileUpdate, user_id: uuid.UUID, database: Db, request: Request) -> UserProfile:
    async with database.transaction() as session:
        account, profile, removed_avatar = await service.update_profile(session, user_id, payload)
    # Only after the commit: a failed update must not lose the avatar it still points to.
    await _delete_file(request, removed_avatar)
    return render_profile(request, account, profile)


@router.post(
    "/profile/onboarding",
    response_model=UserProfile,
    responses=error_responses(NotAuthenticated, service.ProfileNotFound, service.UsernameTaken, UnparsableBody),
)
async def submit_onboarding(
    payload: OnboardingSurvey, user: CurrentUser, database: Db, request: Request
) -> UserProfile:
    """Store the onboarding answers as sent, with the profile fields in the same body; marks the survey done."""
    # survey_completed defaults to true here, so it applies even when the body leaves it out.
    payload.model_fields_set.add("survey_completed")
    profile = await _apply_update(payload, user.user_id, database, request)
    log.info("profile.onboarded", user_id=str(user.user_id))
    return profile


@router.post(
    "/profile/avatar",
    response_model=UserProfile,
    responses=error_responses(
        NotAuthenticated,
        service.ProfileNotFound,
        avatars.EmptyFile,
        avatars.InvalidImage,
        avatars.UnsupportedMediaType,
        avatars.AvatarTooLarge,
        avatars.ImageTooLarge,
    ),
)
async def upload_avatar(
    file: Annotated[UploadFile, File(description="PNG, JPEG, WEBP or HEIC image.")],
    user: CurrentUser,
    database: Db,
    request: Request,
) -> UserProfile:
    """Replace the avatar: the image is checked, stripped of metadata, resized and stored."""
    settings = request.app.state.settings
    data = await avatars.read_upload_limited(file, settings.avatar_max_bytes)
    processed = await anyio.to_thread.run_sync(
        lambda: avatars.process_avatar(data, max_pixels=settings.avatar_max_pixels, max_side=settings.avatar_max_side)
    )
    key = new_key(f"users/{user.user_id}/avatars", processed.extension)
    storage = get_storage(request)
    await storage.put(key, processed.data, content_type=processed.content_type)

    try:
        async with database.transaction() as session:
            account, profile = await service.get_profile(session, user.user_id)
            previous, profile.avatar_key = profile.avatar_key, key
    except Exception:
        # The profile did not take the new file, so it must not stay behind in storage.
        await storage.delete(key)
        raise
    await _delete_file(request, previous)
    log.info("profile.avatar_replaced", user_id=str(user.user_id), bytes=len(processed.data))
    return render_profile(request, account, profile)


@router.delete(
    "/profile",
    response_model=DeleteAccountResponse,
    responses=error_responses(NotAuthenticated, service.ProfileNotFound),
)
async def delete_account(user: CurrentUser, session: DbSession, request: Request) -> DeleteAccountResponse:
    """Schedule the account's deletion after the grace period; signing in again before then cancels it."""
    return await _schedule(user.user_id, session, request)


@router.post(
    "/profile/deletion",
    response_model=DeleteAccountResponse,
    responses=error_responses(NotAuthenticated, service.ProfileNotFound),
)
async def request_deletion(user: CurrentUser, session: DbSession, request: Request) -> DeleteAccountResponse:
    """Same as `DELETE /v1/users/profile`, for clients that post their request; the dates sent are ignored."""
    return await _schedule(user.user_id, session, request)


async def _schedule(user_id: uuid.UUID, session: DbSession, request: Request) -> DeleteAccountResponse:
    grace = timedelta(days=request.app.state.settings.account_deletion_grace_days)
    schedule = await service.schedule_deletion(session, user_id, grace=grace)
    log.info("account.deletion_scheduled", user_id=str(user_id), scheduled_for=schedule.scheduled_for.isoformat())
    return DeleteAccountResponse(
        deletion_requested_at=schedule.requested_at, deletion_scheduled_for=schedule.scheduled_for
    )


@router.post(
    "/profile/deletion/cancel",
    response_model=CancelDeletionResponse,
    responses=error_responses(NotAuthenticated, service.ProfileNotFound),
)
async def cancel_deletion(user: CurrentUser, session: DbSession, request: Request) -> CancelDeletionResponse:
    """Cancel a scheduled deletion; `canceled` is false when none was scheduled."""
    account, profile = await service.get_profile(session, user.user_id)
    status = await auth_service.cancel_scheduled_deletion(session, profile)
    return CancelDeletionResponse(
        canceled=status.deletion_canceled,
        profile=render_profile(request, account, profile),
        previous_deletion_requested_at=status.previous_deletion_requested_at,
        previous_deletion_scheduled_for=status.previous_deletion_scheduled_for,
    )


@router.get(
    "/{user_id}",
    response_model=UserProfile,
    responses=error_responses(NotAuthenticated, Forbidden, service.ProfileNotFound),
)
async def get_user(user_id: str, user: CurrentUser, database: Db, request: Request) -> Any:
    """Return a profile by id; only the caller's own profile may be read."""
    try:
        requested = uuid.UUID(user_id)
    except ValueError:
        requested = None
    if requested != user.user_id:
        raise Forbidden("You can only read your own profile.")
    async with database.driver_connection() as connection:
        row = await service.read_profile(connection, user.user_id)
    return render_profile(request, row, row)
