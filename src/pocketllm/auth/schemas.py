"""Request and response bodies of /v1/auth, named as the API documentation names them."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from pocketllm.auth.passwords import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH

EmailField = Field(min_length=3, max_length=320, examples=["ada@example.com"])
PasswordField = Field(min_length=MIN_PASSWORD_LENGTH, max_length=MAX_PASSWORD_LENGTH)


def _blank_to_none(value: object) -> object:
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return value


class SignUpRequest(BaseModel):
    email: str = EmailField
    password: str = PasswordField
    full_name: str | None = Field(default=None, max_length=200)
    invite_code: str | None = Field(default=None, max_length=64)
    # The shipped client sends the same code under both names.
    referral_code: str | None = Field(default=None, max_length=64)

    _blank_codes = field_validator("invite_code", "referral_code", "full_name", mode="before")(_blank_to_none)

    @property
    def code(self) -> str | None:
        return self.invite_code or self.referral_code


class SignInRequest(BaseModel):
    email: str = EmailField
    # Not bounded below: a too-short password must get the same 401 as any wrong password.
    password: str = Field(min_length=1, max_length=MAX_PASSWORD_LENGTH)


class RefreshTokenRequest(BaseModel):
    refresh_token: str = Field(min_length=1, max_length=512)


class SignOutRequest(BaseModel):
    scope: Literal["local", "global", "others"] = Field(
        default="local",
        description="local: this session; global: every session of the user; others: all but this one.",
    )


class PasswordChangeRequest(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    old: str = Field(min_length=1, max_length=MAX_PASSWORD_LENGTH, validation_alias=AliasChoices("old", "old_password"))
    new: str = Field(
        min_length=MIN_PASSWORD_LENGTH,
        max_length=MAX_PASSWORD_LENGTH,
        validation_alias=AliasChoices("new", "new_password"),
    )


class InviteCodeValidationRequest(BaseModel):
    code: str = Field(min_length=1, max_length=64)


class MagicLinkRequest(BaseModel):
    email: str = EmailField


class PhoneOtpRequest(BaseModel):
    phone: str = Field(min_length=8, max_length=32)


class OAuthProviderRequest(BaseModel):
    provider: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")


class AuthUser(BaseModel):
    id: uuid.UUID
    email: str
    full_name: str | None = None
    created_at: datetime
    last_sign_in_at: datetime | None = None


class AuthTokens(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105
    expires_in: int = Field(description="Seconds until the access token expires.")


class AuthSessionInfo(BaseModel):
    session_id: uuid.UUID
    expires_at: datetime = Field(description="When the access token expires.")
    refresh_expires_at: datetime | None = Field(
        default=None, description="When the session (and so its refresh token) expires unless refreshed."
    )


class AccountStatus(BaseModel):
    deletion_scheduled: bool = False
    deletion_canceled: bool = False
    deletion_requested_at: datetime | None = None
    deletion_scheduled_for: datetime | None = None
    previous_deletion_requested_at: datetime | None = None
    previous_deletion_scheduled_for: datetime | None = None


class SignUpResponse(BaseModel):
    user: AuthUser
    tokens: AuthTokens | None = Field(
        default=None, description="Absent when the auth server requires e-mail confirmation first."
    )
    session: AuthSessionInfo | None = None
    account_status: AccountStatus
    message: str | None = None


class SignInResponse(BaseModel):
    user: AuthUser
    tokens: AuthTokens
    session: AuthSessionInfo
    account_status: AccountStatus


class RefreshTokenResponse(BaseModel):
    tokens: AuthTokens
    session: AuthSessionInfo
    user: AuthUser | None = None


class SignOutResponse(BaseModel):
    revoked_sessions: int


class PasswordChangeResponse(BaseModel):
    message: str
    revoked_sessions: int = Field(description="Other sessions signed out by the change.")


class InviteCodeDetails(BaseModel):
    id: uuid.UUID
    code: str
    max_uses: int
    uses_count: int
    remaining_uses: int
    expires_at: datetime | None


class InviteCodeValidationResponse(BaseModel):
    valid: bool
    status: Literal["valid", "inactive", "expired", "exhausted"]
    message: str
    code: InviteCodeDetails


class AuthFeatureAvailabilityResponse(BaseModel):
    feature: str
    status: Literal["coming_soon"] = "coming_soon"
    message: str
