"""Access-token checks on a protected route, and the refresh-token helpers in pocketllm.auth.tokens.

Tokens are forged with PyJWT from the claims of a real sign-up token, so each test changes one thing
(header, signature or one claim) and the server must return the matching 401 code.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import update

from pocketllm.auth.tokens import (
    VERIFIED_TOKEN_CACHE_SIZE,
    AccessTokenVerifier,
    TokenExpired,
    TokenSignatureInvalid,
    hash_refresh_token,
    new_refresh_token,
)
from pocketllm.config import Settings
from pocketllm.db.engine import create_engine
from pocketllm.models import AuthSession
from tests.conftest import TEST_JWT_SECRET
from tests.helpers import auth_headers, bearer, sign_up

PROFILE_PATH = "/v1/users/profile"


@pytest.fixture(scope="module")
def rsa_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def signed_up(client: httpx.AsyncClient, unique_email: str) -> dict[str, Any]:
    """The response body of a real sign-up."""
    return await sign_up(client, unique_email)


@pytest.fixture
def claims(signed_up: dict[str, Any]) -> dict[str, Any]:
    """The claims of the sign-up's access token, read without verifying it."""
    token = signed_up["tokens"]["access_token"]
    decoded: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return decoded


def forge(claims: dict[str, Any], *, key: Any = TEST_JWT_SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, key, algorithm=algorithm)


def base64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A JWT with an empty signature segment, as an `alg: none` attacker would send it."""
    header_segment = base64url(json.dumps(header).encode())
    payload_segment = base64url(json.dumps(claims).encode())
    return f"{header_segment}.{payload_segment}."


async def get_profile(client: httpx.AsyncClient, headers: dict[str, str]) -> httpx.Response:
    return await client.get(PROFILE_PATH, headers=headers)


def assert_unauthorized(response: httpx.Response, code: str) -> None:
    """Assert the status, header and body that every rejected access token must produce."""
    assert response.status_code == 401, response.text
    assert response.headers.get("www-authenticate") == "Bearer"
    body = response.json()
    assert set(body) == {"detail", "code"}
    assert isinstance(body["detail"], str)
    assert body["detail"].strip() != ""
    assert body["code"] == code


async def test_valid_token_accepted(client: httpx.AsyncClient, signed_up: dict[str, Any]) -> None:
    response = await get_profile(client, auth_headers(signed_up))

    assert response.status_code == 200, response.text
    assert response.json()["id"] == signed_up["user"]["id"]
    assert response.json()["email"] == signed_up["user"]["email"]


async def test_issued_token_claims(signed_up: dict[str, Any], claims: dict[str, Any]) -> None:
    header = jwt.get_unverified_header(signed_up["tokens"]["access_token"])

    assert header["alg"] == "HS256"
    assert claims["sub"] == signed_up["user"]["id"]
    assert claims["session_id"] == signed_up["session"]["session_id"]
    assert claims["role"] == "authenticated"
    assert claims["aud"] == "authenticated"
    assert claims["iss"] == "pocketllm"
    assert claims["email"] == signed_up["user"]["email"]
    assert claims["exp"] > claims["iat"]


async def test_forged_copy_accepted(client: httpx.AsyncClient, claims: dict[str, Any]) -> None:
    # Guards the other tests: a forged token with unchanged claims must pass, so each rejection below
    # comes from the one thing that test changes.
    response = await get_profile(client, bearer(forge(claims)))

    assert response.status_code == 200, response.text


async def test_missing_header_rejected(client: httpx.AsyncClient) -> None:
    response = await client.get(PROFILE_PATH)

    assert_unauthorized(response, "not_authenticated")


@pytest.mark.parametrize("scheme", ["Basic", "Token", "JWT"])
async def test_non_bearer_scheme_rejected(client: httpx.AsyncClient, signed_up: dict[str, Any], scheme: str) -> None:
    token = signed_up["tokens"]["access_token"]

    response = await get_profile(client, {"Authorization": f"{scheme} {token}"})

    assert_unauthorized(response, "not_authenticated")


@pytest.mark.parametrize("header_value", ["Bearer", "Bearer ", "Bearer    "])
async def test_empty_bearer_rejected(client: httpx.AsyncClient, header_value: str) -> None:
    response = await get_profile(client, {"Authorization": header_value})

    assert_unauthorized(response, "not_authenticated")


async def test_lowercase_bearer_accepted(client: httpx.AsyncClient, signed_up: dict[str, Any]) -> None:
    # HTTP authentication scheme names are case-insensitive (RFC 7235).
    token = signed_up["tokens"]["access_token"]

    response = await get_profile(client, {"Authorization": f"bearer {token}"})

    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        "a.b",
        "a.b.c",
        "....",
        f"{base64url(b'not json')}.{base64url(b'{}')}.",
        f"{base64url(b'[1, 2]')}.{base64url(b'{}')}.",
    ],
)
async def test_malformed_token_rejected(client: httpx.AsyncClient, token: str) -> None:
    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_malformed")


async def test_non_json_payload_rejected(client: httpx.AsyncClient) -> None:
    # Correctly signed with an accepted algorithm, so only the payload check can reject it.
    token = jwt.api_jws.encode(b"not json", TEST_JWT_SECRET, algorithm="HS256")

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_malformed")


@pytest.mark.parametrize("algorithm", ["none", "None", "NONE"])
async def test_alg_none_rejected(client: httpx.AsyncClient, claims: dict[str, Any], algorithm: str) -> None:
    token = unsigned_token({"alg": algorithm, "typ": "JWT"}, claims)

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_algorithm_rejected")


async def test_missing_alg_rejected(client: httpx.AsyncClient, claims: dict[str, Any]) -> None:
    token = unsigned_token({"typ": "JWT"}, claims)

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_algorithm_rejected")
    assert "names no algorithm" in response.json()["detail"]


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
async def test_hs512_rejected(client: httpx.AsyncClient, claims: dict[str, Any]) -> None:
    token = forge(claims, algorithm="HS512")

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_algorithm_rejected")


async def test_rs256_not_configured_rejected(
    client: httpx.AsyncClient, claims: dict[str, Any], rsa_private_key: rsa.RSAPrivateKey
) -> None:
    token = forge(claims, key=rsa_private_key, algorithm="RS256")

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_algorithm_rejected")


@pytest.mark.parametrize("settings_overrides", [{"jwt_algorithms": ["HS256", "RS256"]}])
async def test_rs256_without_jwks_rejected(
    client: httpx.AsyncClient, claims: dict[str, Any], rsa_private_key: rsa.RSAPrivateKey
) -> None:
    # RS256 is in JWT_ALGORITHMS, but without SUPABASE_JWKS_URL there is no public key to check it with.
    token = forge(claims, key=rsa_private_key, algorithm="RS256")

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_algorithm_rejected")


async def test_other_secret_rejected(client: httpx.AsyncClient, claims: dict[str, Any]) -> None:
    token = forge(claims, key="another-secret-that-is-also-long-enough-0123456789")

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_signature_invalid")


async def test_tampered_payload_rejected(client: httpx.AsyncClient, claims: dict[str, Any]) -> None:
    # Keeps the original signature but swaps in a payload naming another user.
    header_segment, _, signature = forge(claims).split(".")
    tampered = {**claims, "sub": str(uuid.uuid4())}
    payload_segment = base64url(json.dumps(tampered).encode())

    response = await get_profile(client, bearer(f"{header_segment}.{payload_segment}.{signature}"))

    assert_unauthorized(response, "token_signature_invalid")


async def test_stripped_signature_rejected(client: httpx.AsyncClient, claims: dict[str, Any]) -> None:
    header_segment, payload_segment, _ = forge(claims).split(".")

    response = await get_profile(client, bearer(f"{header_segment}.{payload_segment}."))

    assert_unauthorized(response, "token_signature_invalid")


@pytest.mark.parametrize("audience", ["anon", "service_role", ["anon", "public"]])
async def test_wrong_audience_rejected(client: httpx.AsyncClient, claims: dict[str, Any], audience: Any) -> None:
    token = forge({**claims, "aud": audience})

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_audience_invalid")


async def test_audience_list_accepted(client: httpx.AsyncClient, claims: dict[str, Any]) -> None:
    token = forge({**claims, "aud": ["other-api", "authenticated"]})

    response = await get_profile(client, bearer(token))

    assert response.status_code == 200, response.text


@pytest.mark.parametrize("issuer", ["https://evil.example/auth/v1", "pocketllm-other", ""])
async def test_wrong_issuer_rejected(client: httpx.AsyncClient, claims: dict[str, Any], issuer: str) -> None:
    token = forge({**claims, "iss": issuer})

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_issuer_invalid")


async def test_expired_token_rejected(client: httpx.AsyncClient, claims: dict[str, Any]) -> None:
    now = int(time.time())
    # The default leeway is 30 seconds, so 120 seconds past expiry is well beyond it.
    token = forge({**claims, "iat": now - 3600, "exp": now - 120})

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_expired")


async def test_expired_within_leeway_accepted(client: httpx.AsyncClient, claims: dict[str, Any]) -> None:
    now = int(time.time())
    token = forge({**claims, "iat": now - 3600, "exp": now - 5})

    response = await get_profile(client, bearer(token))

    assert response.status_code == 200, response.text


@pytest.mark.parametrize("expiry", [10**20, 253_402_300_800])
async def test_far_future_expiry_rejected(client: httpx.AsyncClient, claims: dict[str, Any], expiry: int) -> None:
    # Signed correctly, but past what the platform's time functions can represent.
    token = forge({**claims, "exp": expiry})

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_invalid")


@pytest.mark.parametrize("settings_overrides", [{"jwt_leeway_seconds": 0}])
async def test_zero_leeway_rejects_expired(client: httpx.AsyncClient, claims: dict[str, Any]) -> None:
    # The same 5-second-old expiry as above must be rejected when there is no leeway.
    now = int(time.time())
    token = forge({**claims, "iat": now - 3600, "exp": now - 5})

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_expired")


@pytest.mark.parametrize("claim", ["session_id", "sub", "exp", "aud", "iss", "role"])
async def test_missing_claim_rejected(client: httpx.AsyncClient, claims: dict[str, Any], claim: str) -> None:
    token = forge({name: value for name, value in claims.items() if name != claim})

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_invalid")


@pytest.mark.parametrize(
    "subject",
    [
        pytest.param("not-a-uuid", id="text"),
        pytest.param("", id="empty"),
        pytest.param("12345", id="digits"),
        pytest.param(12345, id="integer"),
    ],
)
async def test_non_uuid_sub_rejected(client: httpx.AsyncClient, claims: dict[str, Any], subject: Any) -> None:
    token = forge({**claims, "sub": subject})

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_invalid")


async def test_future_nbf_rejected(client: httpx.AsyncClient, claims: dict[str, Any]) -> None:
    # Ten minutes ahead is far beyond the 30-second default leeway.
    token = forge({**claims, "nbf": int(time.time()) + 600})

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_invalid")


async def test_future_iat_rejected(client: httpx.AsyncClient, claims: dict[str, Any]) -> None:
    token = forge({**claims, "iat": int(time.time()) + 600})

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_invalid")


async def test_non_numeric_iat_rejected(client: httpx.AsyncClient, claims: dict[str, Any]) -> None:
    token = forge({**claims, "iat": "yesterday"})

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_invalid")


@pytest.mark.parametrize("session_id", ["not-a-uuid", "", 42])
async def test_non_uuid_session_id_rejected(client: httpx.AsyncClient, claims: dict[str, Any], session_id: Any) -> None:
    token = forge({**claims, "session_id": session_id})

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_invalid")


@pytest.mark.parametrize("role", ["anon", "service_role", "Authenticated", "", None])
async def test_wrong_role_rejected(client: httpx.AsyncClient, claims: dict[str, Any], role: Any) -> None:
    token = forge({**claims, "role": role})

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "token_invalid")


async def test_signed_out_session_rejected(client: httpx.AsyncClient, signed_up: dict[str, Any]) -> None:
    headers = auth_headers(signed_up)
    sign_out = await client.post("/v1/auth/signout", headers=headers)
    assert sign_out.status_code == 200, sign_out.text

    response = await get_profile(client, headers)

    assert_unauthorized(response, "session_revoked")


async def test_unknown_session_rejected(client: httpx.AsyncClient, claims: dict[str, Any]) -> None:
    token = forge({**claims, "session_id": str(uuid.uuid4())})

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "session_revoked")


async def test_other_users_session_rejected(
    client: httpx.AsyncClient, claims: dict[str, Any], unique_email: str
) -> None:
    # A live session of another user must not authenticate a token whose `sub` is this user.
    other = await sign_up(client, f"other-{unique_email}")
    token = forge({**claims, "session_id": other["session"]["session_id"]})

    response = await get_profile(client, bearer(token))

    assert_unauthorized(response, "session_revoked")


async def test_expired_session_rejected(
    client: httpx.AsyncClient, database_url: str, signed_up: dict[str, Any]
) -> None:
    session_id = uuid.UUID(signed_up["session"]["session_id"])
    engine = create_engine(database_url)
    async with engine.begin() as connection:
        await connection.execute(
            update(AuthSession).where(AuthSession.id == session_id).values(expires_at=datetime(2000, 1, 1, tzinfo=UTC))
        )
    await engine.dispose()

    response = await get_profile(client, auth_headers(signed_up))

    assert_unauthorized(response, "session_expired")


def test_refresh_hash_is_sha256_hex() -> None:
    # The widely published SHA-256 digest of "abc".
    assert hash_refresh_token("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_refresh_hash_is_stable() -> None:
    token = "a-refresh-token-value"

    assert hash_refresh_token(token) == hash_refresh_token(token)


def test_refresh_hash_differs_per_token() -> None:
    assert hash_refresh_token("token-a") != hash_refresh_token("token-b")


def test_new_refresh_token_hash_matches() -> None:
    token, token_hash = new_refresh_token()

    assert token_hash == hash_refresh_token(token)
    assert len(token_hash) == 64
    assert token_hash != token


def test_new_refresh_tokens_distinct() -> None:
    tokens = [new_refresh_token()[0] for _ in range(100)]

    assert len(set(tokens)) == len(tokens)


def test_new_refresh_token_length() -> None:
    token, _ = new_refresh_token()

    # 32 random bytes in unpadded URL-safe base64 are 43 characters.
    assert len(token) >= 43


# -- verified tokens are remembered until they expire ----------------------------------------------------------


class Clock:
    """A wall clock the test moves by hand, for the verifier's `clock` parameter."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_remembered_token_expires_with_leeway(settings: Settings, claims: dict[str, Any]) -> None:
    clock = Clock()
    verifier = AccessTokenVerifier(settings, clock=clock)
    token = forge({**claims, "exp": int(clock.now) + 60})
    first = await verifier.verify(token)

    # Within exp plus the leeway the remembered claims are returned; after it, the full check runs again.
    clock.now = first.expires_at.timestamp() + settings.jwt_leeway_seconds - 1
    assert await verifier.verify(token) == first
    clock.now = first.expires_at.timestamp() + settings.jwt_leeway_seconds
    with pytest.raises(TokenExpired):
        await verifier.verify(token)


async def test_rejected_token_stays_rejected(settings: Settings, claims: dict[str, Any]) -> None:
    verifier = AccessTokenVerifier(settings)
    token = forge(claims, key="another-secret-that-is-long-enough-for-hs256-0123456789")
    for _ in range(2):
        with pytest.raises(TokenSignatureInvalid):
            await verifier.verify(token)


async def test_remembered_tokens_are_bounded(settings: Settings, claims: dict[str, Any]) -> None:
    verifier = AccessTokenVerifier(settings)
    first = forge({**claims, "jti": "0"})
    await verifier.verify(first)
    for index in range(1, VERIFIED_TOKEN_CACHE_SIZE + 1):
        await verifier.verify(forge({**claims, "jti": str(index)}))

    # The token remembered first was dropped to make room for the last one.
    assert len(verifier._verified) == VERIFIED_TOKEN_CACHE_SIZE
    assert first not in verifier._verified


async def test_signed_out_session_rejected_after_token_was_remembered(
    client: httpx.AsyncClient, signed_up: dict[str, Any]
) -> None:
    headers = auth_headers(signed_up)
    assert (await get_profile(client, headers)).status_code == 200
    sign_out = await client.post("/v1/auth/signout", headers=headers)
    assert sign_out.status_code == 200, sign_out.text

    response = await get_profile(client, headers)

    assert_unauthorized(response, "session_revoked")
