"""Access tokens (JWTs shaped like Supabase's) and opaque refresh tokens."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import jwt
from jwt.exceptions import InvalidSubjectError

from pocketllm.config import Settings
from pocketllm.db.types import utcnow
from pocketllm.errors import NotAuthenticated

SIGNING_ALGORITHM = "HS256"
AUTHENTICATED_ROLE = "authenticated"
# How many verified access tokens a process remembers; a few hundred bytes each.
VERIFIED_TOKEN_CACHE_SIZE = 4096


class TokenMalformed(NotAuthenticated):
    code = "token_malformed"
    default_message = "The access token is not a well-formed JWT."


class TokenAlgorithmRejected(NotAuthenticated):
    code = "token_algorithm_rejected"
    default_message = "The access token is signed with an algorithm this server does not accept."


class TokenSignatureInvalid(NotAuthenticated):
    code = "token_signature_invalid"
    default_message = "The access token's signature is invalid."


class TokenAudienceInvalid(NotAuthenticated):
    code = "token_audience_invalid"
    default_message = "The access token was issued for another audience."


class TokenIssuerInvalid(NotAuthenticated):
    code = "token_issuer_invalid"
    default_message = "The access token was issued by another server."


class TokenExpired(NotAuthenticated):
    code = "token_expired"
    default_message = "The access token has expired; refresh it with POST /v1/auth/refresh."


class TokenInvalid(NotAuthenticated):
    code = "token_invalid"
    default_message = "The access token is missing required claims."


@dataclass(frozen=True, slots=True)
class AccessTokenClaims:
    user_id: uuid.UUID
    email: str | None
    session_id: uuid.UUID | None
    expires_at: datetime


def issue_access_token(
    settings: Settings, *, user_id: uuid.UUID, email: str, session_id: uuid.UUID
) -> tuple[str, datetime]:
    """Sign an access token for a session; returns the token and its expiry."""
    issued_at = utcnow()
    expires_at = issued_at + timedelta(seconds=settings.access_token_ttl_seconds)
    claims = {
        "sub": str(user_id),
        "email": email,
        "role": AUTHENTICATED_ROLE,
        "aud": settings.jwt_audience,
        "iss": settings.token_issuer,
        "iat": int(issued_at.timestamp()),
        "exp": int(expires_at.timestamp()),
        "session_id": str(session_id),
        "aal": "aal1",
    }
    assert settings.jwt_secret is not None, "resolve_settings() fills in the JWT secret"
    token = jwt.encode(claims, settings.jwt_secret, algorithm=SIGNING_ALGORITHM)
    return token, expires_at


class AccessTokenVerifier:
    """Verifies access tokens against a fixed algorithm list; never trusts the token's own `alg` choice.

    HMAC tokens are checked with the JWT secret. When a JWKS URL is configured (Supabase projects with
    asymmetric signing keys), RS256/ES256 tokens are checked with the key named by their `kid`.
    """

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        self._settings = settings
        self._algorithms = list(settings.jwt_algorithms)
        self._jwks: jwt.PyJWKClient | None = None
        if settings.supabase_jwks_url:
            self._jwks = jwt.PyJWKClient(settings.supabase_jwks_url, cache_keys=True, timeout=5)
        self._clock = clock
        # Token -> (claims, time after which it is expired). Checking a token's signature and claims costs
        # more CPU than the rest of a small request, and a client sends the same token until it refreshes.
        self._verified: dict[str, tuple[AccessTokenClaims, float]] = {}

    async def verify(self, token: str) -> AccessTokenClaims:
        """Check the token's algorithm, signature and claims, and return its claims.

        A token that passed is remembered (at most VERIFIED_TOKEN_CACHE_SIZE of them) until it expires, so
        the same token again costs a dictionary lookup. Only HMAC tokens are remembered: their key is the
        JWT secret, which cannot change while the process runs. Whether the session behind a token is still
        signed in is not decided here, and is checked on every request.
        """
        remembered = self._verified.get(token)
        if remembered is not None:
            claims, expired_after = remembered
            if self._clock() < expired_after:
                return claims
            # The condition PyJWT applies: `exp` plus the leeway has passed.
            del self._verified[token]
            raise TokenExpired()
        return await self._verify(token)

    async def _verify(self, token: str) -> AccessTokenClaims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as error:
            raise TokenMalformed() from error

        algorithm = header.get("alg")
        if algorithm is None:
            raise TokenAlgorithmRejected(
                f"The access token's header names no algorithm; accepted: {', '.join(self._algorithms)}."
            )
        if not isinstance(algorithm, str) or algorithm not in self._algorithms:
            raise TokenAlgorithmRejected(
                f"The access token uses algorithm {str(algorithm)[:16]!r}; accepted: {', '.join(self._algorithms)}."
            )

        key = await self._key_for(token, algorithm)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=self._algorithms,
                audience=self._settings.jwt_audience,
                issuer=self._settings.token_issuer,
                leeway=self._settings.jwt_leeway_seconds,
                options={"require": ["exp", "sub", "aud"]},
            )
        except jwt.ExpiredSignatureError as error:
            raise TokenExpired() from error
        except jwt.InvalidAudienceError as error:
            raise TokenAudienceInvalid() from error
        except jwt.InvalidIssuerError as error:
            raise TokenIssuerInvalid() from error
        except jwt.InvalidSignatureError as error:
            raise TokenSignatureInvalid() from error
        except jwt.MissingRequiredClaimError as error:
            raise TokenInvalid(f"The access token has no '{error.claim}' claim.") from error
        except (InvalidSubjectError, jwt.InvalidIssuedAtError, jwt.ImmatureSignatureError) as error:
            raise TokenInvalid(f"The access token has an invalid claim: {error}.") from error
        except jwt.InvalidTokenError as error:
            raise TokenMalformed() from error

        parsed = _parse_claims(claims)
        if algorithm.startswith("HS"):
            self._remember(token, parsed)
        return parsed

    def _remember(self, token: str, claims: AccessTokenClaims) -> None:
        if len(self._verified) >= VERIFIED_TOKEN_CACHE_SIZE:
            # Dictionaries keep insertion order: drop the token remembered first.
            del self._verified[next(iter(self._verified))]
        # PyJWT accepts a token until `exp` plus the leeway, so the remembered token is accepted as long.
        self._verified[token] = (claims, claims.expires_at.timestamp() + self._settings.jwt_leeway_seconds)

    async def _key_for(self, token: str, algorithm: str) -> Any:
        if algorithm.startswith("HS"):
            return self._settings.jwt_secret
        if self._jwks is None:
            raise TokenAlgorithmRejected("Asymmetric access tokens need SUPABASE_JWKS_URL to be configured.")
        jwks = self._jwks
        try:
            # PyJWKClient fetches with urllib, which blocks; it caches the keys between calls.
            signing_key = await anyio.to_thread.run_sync(jwks.get_signing_key_from_jwt, token)
        except jwt.PyJWKClientConnectionError as error:
            raise TokenSignatureInvalid("The signing keys (JWKS) could not be fetched to check the token.") from error
        except (jwt.PyJWKClientError, jwt.DecodeError) as error:
            raise TokenSignatureInvalid("No signing key matches the access token's key id.") from error
        return signing_key.key


def _parse_claims(claims: dict[str, Any]) -> AccessTokenClaims:
    if claims.get("role") != AUTHENTICATED_ROLE:
        raise TokenInvalid("The token does not belong to a signed-in user (role is not 'authenticated').")
    try:
        user_id = uuid.UUID(str(claims["sub"]))
        session_id = uuid.UUID(str(claims["session_id"])) if claims.get("session_id") else None
    except ValueError as error:
        raise TokenInvalid("The access token's 'sub' or 'session_id' claim is not a UUID.") from error
    try:
        expires_at = datetime.fromtimestamp(int(claims["exp"]), tz=UTC)
    except (OverflowError, OSError, ValueError) as error:
        raise TokenInvalid("The access token's 'exp' claim is out of range.") from error
    email = claims.get("email")
    return AccessTokenClaims(
        user_id=user_id,
        email=email if isinstance(email, str) and email else None,
        session_id=session_id,
        expires_at=expires_at,
    )


def new_refresh_token() -> tuple[str, str]:
    """Return a new opaque refresh token and the hash under which it is stored."""
    token = secrets.token_urlsafe(32)
    return token, hash_refresh_token(token)


def hash_refresh_token(token: str) -> str:
    # A plain SHA-256 is enough: the token is 256 random bits, so there is nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()
