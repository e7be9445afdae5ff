"""A fake Supabase GoTrue server for tests: real HTTP on 127.0.0.1, GoTrue's response shapes and errors.

It implements the calls the Supabase auth backend makes: `POST /auth/v1/signup`, `POST /auth/v1/token`
with the `password` and `refresh_token` grants, `POST /auth/v1/logout?scope=...` and `PUT /auth/v1/user`,
plus `GET /auth/v1/.well-known/jwks.json`. Access tokens carry the claims GoTrue puts in them and are
signed with HS256 and the given secret, or with RS256 and a key published in the JWKS.

Switches on the instance make it respond as a misbehaving or differently configured server would: e-mail
confirmation required, an HTTP error status, slow responses, 429 with Retry-After, and the older error body
shape without `error_code`. `reset()` turns them off and clears all users, sessions and recorded requests.

Error bodies follow the shapes documented for supabase/auth (GoTrue) v2: `{"code", "error_code", "msg"}`,
and the older `{"code", "msg"}` or, on the token endpoint, `{"error", "error_description"}`.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
import uvicorn
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

JWKS_PATH = "/auth/v1/.well-known/jwks.json"
RSA_KEY_ID = "fake-gotrue-rs256"
AUTHENTICATED = "authenticated"


@dataclass
class FakeUser:
    id: uuid.UUID
    email: str
    password: str
    user_metadata: dict[str, Any]
    created_at: datetime
    confirmed_at: datetime | None
    last_sign_in_at: datetime | None = None


@dataclass
class FakeSession:
    id: uuid.UUID
    user_id: uuid.UUID
    revoked: bool = False


@dataclass
class FakeRefreshToken:
    session_id: uuid.UUID
    used: bool = False


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any] | None


@dataclass
class _State:
    users: dict[uuid.UUID, FakeUser] = field(default_factory=dict)
    sessions: dict[uuid.UUID, FakeSession] = field(default_factory=dict)
    refresh_tokens: dict[str, FakeRefreshToken] = field(default_factory=dict)
    requests: list[RecordedRequest] = field(default_factory=list)


class FakeGoTrue:
    """A GoTrue stand-in served by uvicorn in a background thread. Call start() before use and stop() after."""

    def __init__(self, *, jwt_secret: str, anon_key: str, access_token_ttl_seconds: int = 3600) -> None:
        self.jwt_secret = jwt_secret
        self.anon_key = anon_key
        self.access_token_ttl_seconds = access_token_ttl_seconds
        self.rsa_private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._lock = threading.Lock()
        self._state = _State()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self.reset()
        self.app = Starlette(
            routes=[
                Route("/auth/v1/signup", self._sign_up, methods=["POST"]),
                Route("/auth/v1/token", self._token, methods=["POST"]),
                Route("/auth/v1/logout", self._logout, methods=["POST"]),
                Route("/auth/v1/user", self._update_user, methods=["PUT"]),
                Route(JWKS_PATH, self._jwks, methods=["GET"]),
            ]
        )

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL to use as SUPABASE_URL, e.g. `http://127.0.0.1:54321`."""
        assert self._port is not None, "start() the fake first"
        return f"http://127.0.0.1:{self._port}"

    @property
    def jwks_url(self) -> str:
        return f"{self.url}{JWKS_PATH}"

    def start(self) -> None:
        # The socket is bound and listening before the thread starts, so the first request waits in the
        # backlog instead of failing, and no readiness polling is needed.
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self._port = listener.getsockname()[1]
        config = uvicorn.Config(self.app, lifespan="off", log_level="warning", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [listener]}, name="fake-gotrue", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        assert self._server is not None, "start() the fake first"
        assert self._thread is not None
        # force_exit skips waiting for requests still held by the slow-response switch.
        self._server.should_exit = True
        self._server.force_exit = True
        self._thread.join(timeout=10)

    def reset(self) -> None:
        """Turn every switch off and clear all users, sessions and recorded requests."""
        self.require_email_confirmation = False
        self.min_password_length = 6
        self.fail_with_status: int | None = None
        # When set, only requests to these paths fail with fail_with_status. When None, all paths but the JWKS fail.
        self.failing_paths: set[str] | None = None
        self.delay_seconds = 0.0
        self.rate_limited = False
        self.retry_after: str | None = None
        self.legacy_errors = False
        self.signing_algorithm = "HS256"
        # When set, token responses carry this Set-Cookie header, as a load balancer in front of GoTrue might add.
        self.set_cookie: str | None = None
        # Set when a request has been recorded, before the slow-response switch delays it.
        self.request_received = threading.Event()
        with self._lock:
            self._state = _State()

    # -- helpers for tests -----------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._state.requests)

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [request for request in self.requests if request.path == path]

    def create_user(
        self, email: str, password: str, *, confirmed: bool = True, full_name: str | None = None
    ) -> FakeUser:
        """Create a user directly in GoTrue, as the Supabase dashboard or another app would."""
        now = datetime.now(UTC)
        user = FakeUser(
            id=uuid.uuid4(),
            email=email.lower(),
            password=password,
            user_metadata={"full_name": full_name} if full_name else {},
            created_at=now,
            confirmed_at=now if confirmed else None,
        )
        with self._lock:
            self._state.users[user.id] = user
        return user

    def confirm_email(self, email: str) -> None:
        """Mark the address confirmed, as following the link in the confirmation e-mail does."""
        with self._lock:
            user = self._find_user(email)
            assert user is not None, f"no fake user with e-mail {email}"
            user.confirmed_at = datetime.now(UTC)

    def user_by_email(self, email: str) -> FakeUser | None:
        with self._lock:
            return self._find_user(email)

    def start_session(self, user: FakeUser) -> dict[str, Any]:
        """Sign the user in directly at GoTrue, not through the server under test, and return the session body."""
        with self._lock:
            return self._new_session(user)

    def session_is_live(self, session_id: uuid.UUID | str) -> bool:
        with self._lock:
            session = self._state.sessions.get(uuid.UUID(str(session_id)))
            return session is not None and not session.revoked

    def live_session_count(self, user_id: uuid.UUID | str) -> int:
        with self._lock:
            return sum(
                1
                for session in self._state.sessions.values()
                if session.user_id == uuid.UUID(str(user_id)) and not session.revoked
            )

    def sign_token(self, claims: dict[str, Any], *, private_key: rsa.RSAPrivateKey | None = None) -> str:
        """Sign claims the way GoTrue signs access tokens, with the current algorithm or the given RSA key."""
        if private_key is not None or self.signing_algorithm == "RS256":
            key = private_key or self.rsa_private_key
            return jwt.encode(claims, key, algorithm="RS256", headers={"kid": RSA_KEY_ID})
        return jwt.encode(claims, self.jwt_secret, algorithm="HS256")

    def access_token_claims(self, user: FakeUser, session_id: uuid.UUID) -> dict[str, Any]:
        issued_at = int(datetime.now(UTC).timestamp())
        return {
            "iss": f"{self.url}/auth/v1",
            "sub": str(user.id),
            "aud": AUTHENTICATED,
            "exp": issued_at + self.access_token_ttl_seconds,
            "iat": issued_at,
            "email": user.email,
            "phone": "",
            "app_metadata": {"provider": "email", "providers": ["email"]},
            "user_metadata": user.user_metadata,
            "role": AUTHENTICATED,
            "aal": "aal1",
            "amr": [{"method": "password", "timestamp": issued_at}],
            "session_id": str(session_id),
            "is_anonymous": False,
        }

    # -- request handling ------------------------------------------------------------------------

    async def _intercept(self, request: Request) -> tuple[dict[str, Any] | None, Response | None]:
        """Record the request and apply the switches.

        Returns the JSON body and, when the request ends here, the response to send.
        """
        raw = await request.body()
        body: dict[str, Any] | None = None
        if raw:
            decoded = json.loads(raw)
            body = decoded if isinstance(decoded, dict) else None
        with self._lock:
            self._state.requests.append(
                RecordedRequest(
                    method=request.method,
                    path=request.url.path,
                    query=dict(request.query_params),
                    headers={key.lower(): value for key, value in request.headers.items()},
                    body=body,
                )
            )
        self.request_received.set()

        if self.delay_seconds:
            await asyncio.sleep(self.delay_seconds)
        if request.headers.get("apikey") != self.anon_key:
            return body, JSONResponse({"message": "Invalid API key"}, status_code=401)
        if self.rate_limited:
            headers = {"Retry-After": self.retry_after} if self.retry_after else None
            return body, self._error(429, "over_request_rate_limit", "Request rate limit reached", headers=headers)
        failing = self.failing_paths is None or request.url.path in self.failing_paths
        if self.fail_with_status is not None and failing:
            message = "Unexpected failure, please check server logs for more information"
            return body, self._error(self.fail_with_status, "unexpected_failure", message)
        return body, None

    def _error(
        self,
        status: int,
        error_code: str,
        message: str,
        *,
        oauth_error: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> JSONResponse:
        if not self.legacy_errors:
            content: dict[str, Any] = {"code": status, "error_code": error_code, "msg": message}
        elif oauth_error is not None:
            content = {"error": oauth_error, "error_description": message}
        else:
            content = {"code": status, "msg": message}
        return JSONResponse(content, status_code=status, headers=headers)

    async def _sign_up(self, request: Request) -> Response:
        body, early = await self._intercept(request)
        if early is not None:
            return early
        assert body is not None
        email = str(body.get("email", "")).lower()
        password = str(body.get("password", ""))
        if len(password) < self.min_password_length:
            message = f"Password should be at least {self.min_password_length} characters."
            return self._error(422, "weak_password", message)

        with self._lock:
            existing = self._find_user(email)
            if existing is not None and self.require_email_confirmation:
                # GoTrue hides that the address is taken by returning a made-up user without identities.
                return JSONResponse(_user_json(_obfuscated(existing)) | {"identities": []})
            if existing is not None:
                return self._error(422, "user_already_exists", "User already registered")

            now = datetime.now(UTC)
            data = body.get("data")
            user = FakeUser(
                id=uuid.uuid4(),
                email=email,
                password=password,
                user_metadata=dict(data) if isinstance(data, dict) else {},
                created_at=now,
                confirmed_at=None if self.require_email_confirmation else now,
            )
            self._state.users[user.id] = user
            if self.require_email_confirmation:
                return JSONResponse(_user_json(user))
            return JSONResponse(self._new_session(user))

    async def _token(self, request: Request) -> Response:
        body, early = await self._intercept(request)
        if early is not None:
            return early
        assert body is not None
        grant_type = request.query_params.get("grant_type")
        if grant_type == "password":
            response = self._password_grant(body)
        elif grant_type == "refresh_token":
            response = self._refresh_grant(body)
        else:
            return self._error(400, "validation_failed", "unsupported_grant_type", oauth_error="unsupported_grant_type")
        if self.set_cookie is not None:
            response.headers["Set-Cookie"] = self.set_cookie
        return response

    def _password_grant(self, body: dict[str, Any]) -> Response:
        with self._lock:
            user = self._find_user(str(body.get("email", "")))
            if user is None or not secrets.compare_digest(user.password, str(body.get("password", ""))):
                return self._error(400, "invalid_credentials", "Invalid login credentials", oauth_error="invalid_grant")
            if user.confirmed_at is None:
                return self._error(400, "email_not_confirmed", "Email not confirmed", oauth_error="invalid_grant")
            user.last_sign_in_at = datetime.now(UTC)
            return JSONResponse(self._new_session(user))

    def _refresh_grant(self, body: dict[str, Any]) -> Response:
        with self._lock:
            stored = self._state.refresh_tokens.get(str(body.get("refresh_token", "")))
            session = self._state.sessions.get(stored.session_id) if stored else None
            if stored is None or session is None or session.revoked:
                message = "Invalid Refresh Token: Refresh Token Not Found"
                return self._error(400, "refresh_token_not_found", message, oauth_error="invalid_grant")
            if stored.used:
                message = "Invalid Refresh Token: Already Used"
                return self._error(400, "refresh_token_already_used", message, oauth_error="invalid_grant")
            stored.used = True
            user = self._state.users[session.user_id]
            return JSONResponse(self._session_body(user, session))

    async def _logout(self, request: Request) -> Response:
        _, early = await self._intercept(request)
        if early is not None:
            return early
        with self._lock:
            session, failure = self._authenticate(request)
            if failure is not None:
                return failure
            assert session is not None
            scope = request.query_params.get("scope", "global")
            for candidate in self._state.sessions.values():
                if candidate.user_id != session.user_id:
                    continue
                if scope == "local" and candidate.id != session.id:
                    continue
                if scope == "others" and candidate.id == session.id:
                    continue
                candidate.revoked = True
        return Response(status_code=204)

    async def _update_user(self, request: Request) -> Response:
        body, early = await self._intercept(request)
        if early is not None:
            return early
        assert body is not None
        with self._lock:
            session, failure = self._authenticate(request)
            if failure is not None:
                return failure
            assert session is not None
            user = self._state.users[session.user_id]
            password = body.get("password")
            if isinstance(password, str):
                if password == user.password:
                    return self._error(422, "same_password", "New password should be different from the old password.")
                if len(password) < self.min_password_length:
                    message = f"Password should be at least {self.min_password_length} characters."
                    return self._error(422, "weak_password", message)
                user.password = password
            return JSONResponse(_user_json(user))

    async def _jwks(self, request: Request) -> Response:
        public_jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.rsa_private_key.public_key(), as_dict=True)
        public_jwk.update({"kid": RSA_KEY_ID, "alg": "RS256", "use": "sig"})
        return JSONResponse({"keys": [public_jwk]})

    # -- internals (callers hold self._lock) -----------------------------------------------------

    def _find_user(self, email: str) -> FakeUser | None:
        email = email.lower()
        return next((user for user in self._state.users.values() if user.email == email), None)

    def _authenticate(self, request: Request) -> tuple[FakeSession | None, Response | None]:
        authorization = request.headers.get("authorization", "")
        token = authorization.removeprefix("Bearer ").strip()
        try:
            if self.signing_algorithm == "RS256":
                key: Any = self.rsa_private_key.public_key()
            else:
                key = self.jwt_secret
            claims = jwt.decode(token, key, algorithms=[self.signing_algorithm], audience=AUTHENTICATED)
            session_id = uuid.UUID(str(claims["session_id"]))
        except (jwt.InvalidTokenError, KeyError, ValueError):
            return None, self._error(401, "bad_jwt", "invalid JWT: unable to parse or verify signature")
        session = self._state.sessions.get(session_id)
        if session is None or session.revoked:
            message = "Session from session_id claim in JWT does not exist"
            return None, self._error(403, "session_not_found", message)
        return session, None

    def _new_session(self, user: FakeUser) -> dict[str, Any]:
        session = FakeSession(id=uuid.uuid4(), user_id=user.id)
        self._state.sessions[session.id] = session
        user.last_sign_in_at = datetime.now(UTC)
        return self._session_body(user, session)

    def _session_body(self, user: FakeUser, session: FakeSession) -> dict[str, Any]:
        refresh_token = secrets.token_urlsafe(12)
        self._state.refresh_tokens[refresh_token] = FakeRefreshToken(session_id=session.id)
        claims = self.access_token_claims(user, session.id)
        return {
            "access_token": self.sign_token(claims),
            "token_type": "bearer",
            "expires_in": self.access_token_ttl_seconds,
            "expires_at": claims["exp"],
            "refresh_token": refresh_token,
            "user": _user_json(user),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def _obfuscated(user: FakeUser) -> FakeUser:
    now = datetime.now(UTC)
    return FakeUser(
        id=uuid.uuid4(),
        email=user.email,
        password="",
        user_metadata={},
        created_at=now,
        confirmed_at=None,
    )


def _user_json(user: FakeUser) -> dict[str, Any]:
    identity = {
        "identity_id": str(uuid.uuid5(user.id, "email")),
        "id": str(user.id),
        "user_id": str(user.id),
        "identity_data": {"email": user.email, "email_verified": user.confirmed_at is not None, "sub": str(user.id)},
        "provider": "email",
        "created_at": _iso(user.created_at),
        "updated_at": _iso(user.created_at),
        "email": user.email,
    }
    return {
        "id": str(user.id),
        "aud": AUTHENTICATED,
        "role": AUTHENTICATED,
        "email": user.email,
        "email_confirmed_at": _iso(user.confirmed_at),
        "phone": "",
        "confirmation_sent_at": _iso(user.created_at) if user.confirmed_at is None else None,
        "confirmed_at": _iso(user.confirmed_at),
        "last_sign_in_at": _iso(user.last_sign_in_at),
        "app_metadata": {"provider": "email", "providers": ["email"]},
        "user_metadata": user.user_metadata,
        "identities": [identity],
        "created_at": _iso(user.created_at),
        "updated_at": _iso(user.last_sign_in_at or user.created_at),
        "is_anonymous": False,
    }


def unused_local_url() -> str:
    """Return an http://127.0.0.1 URL on a port that nothing listens on (free when checked)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"
