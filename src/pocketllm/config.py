"""Settings read from the environment and `.env`, and the embedded defaults behind them."""

from __future__ import annotations

import ipaddress
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

from cryptography.fernet import Fernet
from limits import parse as parse_rate_limit

try:
    import fcntl
except ImportError:  # Windows has no fcntl; concurrent first starts there may race for the secret files.
    fcntl = None  # type: ignore[assignment]
from pydantic import AliasChoices, Field, PrivateAttr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pocketllm.db.engine import is_in_memory_sqlite

# Values that people paste from examples; a server must never sign tokens with them in production.
PLACEHOLDER_SECRETS = frozenset(
    {
        "",
        "changeme",
        "change-me",
        "secret",
        "your-secret",
        "your-jwt-secret",
        "super-secret-jwt-token",
        # The example value in Supabase's self-hosting guide.
        "your-super-secret-jwt-token-with-at-least-32-characters-long",
    }
)
MIN_JWT_SECRET_LENGTH = 32
JWT_SECRET_FILE = "jwt_secret"  # noqa: S105  (a file name)
ENCRYPTION_KEY_FILE = "encryption_key"
SQLITE_FILE = "pocketllm.db"
# The drivers the server is built and tested with (see pyproject.toml's dependencies).
SUPPORTED_DATABASE_DRIVERS = frozenset({"sqlite+aiosqlite", "postgresql+asyncpg"})


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class AuthBackend(StrEnum):
    LOCAL = "local"
    SUPABASE = "supabase"


class ConfigurationError(Exception):
    """Settings that the server must not start with; the message names the setting to fix."""


def _split_comma_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        populate_by_name=True,
    )

    environment: Environment = Environment.DEVELOPMENT
    data_dir: Path = Path("pocketllm-data")
    database_url: str | None = None
    # Connections past the pool are closed as soon as they are returned, so under steady load each request
    # would open one anew (several milliseconds of CPU with asyncpg). So the whole budget of 20 connections
    # is pooled by default, and requests past it wait for a free connection.
    database_pool_size: int = Field(default=20, ge=1, le=200)
    database_max_overflow: int = Field(default=0, ge=0, le=200)
    # How long a request waits for a free pooled connection before it gets 503 `database_busy`.
    database_pool_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    migrate_on_start: bool = True

    auth_backend: AuthBackend = AuthBackend.LOCAL
    jwt_secret: str | None = Field(default=None, validation_alias=AliasChoices("jwt_secret", "supabase_jwt_secret"))
    jwt_algorithms: Annotated[list[str], NoDecode] = ["HS256"]
    jwt_audience: str = "authenticated"
    jwt_issuer: str | None = None
    jwt_leeway_seconds: int = Field(default=30, ge=0, le=300)
    access_token_ttl_seconds: int = Field(default=3600, ge=60, le=86_400)
    session_ttl_seconds: int = Field(default=30 * 86_400, ge=3600)
    # On PostgreSQL, how long a process may serve a session check from memory. Trigger notices make it drop
    # a session as soon as it is signed out anywhere (auth/session_cache.py). 0 checks every request.
    session_cache_seconds: int = Field(default=30, ge=0, le=3600)
    refresh_token_rotation: bool = False
    refresh_token_reuse_interval_seconds: int = Field(default=10, ge=0, le=3600)
    # Argon2id cost parameters; the defaults are argon2-cffi's (RFC 9106 low-memory profile).
    password_hash_time_cost: int = Field(default=3, ge=1, le=20)
    password_hash_memory_kib: int = Field(default=65_536, ge=8, le=4_194_304)
    password_hash_parallelism: int = Field(default=4, ge=1, le=64)

    supabase_url: str | None = None
    supabase_anon_key: str | None = Field(default=None, repr=False)
    supabase_service_role_key: str | None = Field(default=None, repr=False)
    supabase_jwks_url: str | None = None
    supabase_timeout_seconds: float = Field(default=10.0, gt=0, le=120)

    encryption_key: str | None = Field(default=None, repr=False)

    # Lets provider base URLs point at loopback and private networks, e.g. a local Ollama. Cloud metadata
    # addresses stay blocked either way.
    allow_private_provider_urls: bool = False
    provider_connect_timeout_seconds: float = Field(default=10.0, gt=0, le=120)
    provider_read_timeout_seconds: float = Field(default=300.0, gt=0, le=3600)
    # The maximum number of provider connections one process keeps open. Each open reply stream uses one.
    provider_max_connections: int = Field(default=1000, ge=10, le=100_000)
    catalogue_timeout_seconds: float = Field(default=15.0, gt=0, le=120)
    catalogue_cache_ttl_seconds: int = Field(default=300, ge=0, le=86_400)
    redis_url: str | None = None
    # Outgoing mail (referral invites). Without SMTP_URL each message's recipient and subject are logged
    # instead. Form: smtp://user:password@host:port?starttls=true, or smtps://... for TLS from the start;
    # '@', ':' and '/' in the user name or password must be percent-encoded.
    smtp_url: str | None = Field(default=None, repr=False)
    mail_from: str = "PocketLLM <no-reply@localhost>"
    # A failed send is retried after MAIL_RETRY_BASE_SECONDS, doubling each time up to one hour; after
    # MAIL_MAX_ATTEMPTS attempts the message is marked failed. The defaults cover about five hours.
    mail_max_attempts: int = Field(default=12, ge=1, le=100)
    mail_retry_base_seconds: float = Field(default=30.0, gt=0, le=3600)
    # Limit for one whole delivery: connect, TLS, login and the message.
    smtp_timeout_seconds: float = Field(default=30.0, gt=0, le=300)

    # Absolute URLs in responses (avatars, files) start with this; unset, the request's own base URL is used.
    public_base_url: str | None = None
    # Unset: files are stored under DATA_DIR/files. s3://bucket[/prefix]: an S3-compatible bucket, which
    # needs both STORAGE_S3_* keys.
    storage_url: str | None = None
    storage_s3_endpoint: str | None = None
    storage_s3_region: str = "us-east-1"
    storage_s3_access_key_id: str | None = Field(default=None, repr=False)
    storage_s3_secret_access_key: str | None = Field(default=None, repr=False)
    signed_url_ttl_seconds: int = Field(default=3600, ge=60, le=7 * 86_400)
    avatar_max_bytes: int = Field(default=5 * 1024 * 1024, ge=1024, le=100 * 1024 * 1024)
    # Decoded size limit, checked before decoding, against images that unpack to gigabytes.
    avatar_max_pixels: int = Field(default=40_000_000, ge=10_000, le=500_000_000)
    avatar_max_side: int = Field(default=512, ge=32, le=4096)
    account_deletion_grace_days: int = Field(default=30, ge=0, le=365)

    # A comment line is sent on a quiet reply stream this often, so proxies do not close it as idle.
    stream_heartbeat_seconds: float = Field(default=15.0, gt=0, le=300)
    # A reply is cut at this many characters, stored as incomplete, and its provider stream closed.
    reply_max_characters: int = Field(default=1_000_000, ge=1000, le=100_000_000)
    # On shutdown, replies still being generated get this long to finish and be stored.
    shutdown_grace_seconds: float = Field(default=30.0, ge=0, le=600)
    invite_code: bool = True
    # A user's personal invite code (GET /v1/referral/list) is created with this many uses.
    referral_max_uses: int = Field(default=5, ge=1, le=10_000)
    # Invite links are this URL followed by the code. Unset: PUBLIC_BASE_URL (else the request's base URL)
    # followed by "/invite/".
    referral_share_base_url: str | None = None
    # A second POST /v1/referral/send to the same address within this many seconds sends no new e-mail.
    referral_resend_cooldown_seconds: int = Field(default=86_400, ge=0, le=30 * 86_400)
    cors_origins: Annotated[list[str], NoDecode] = []

    # Background jobs. `pocketllm serve` runs a worker in the API process unless RUN_WORKER is false (or
    # `--no-worker` is given); `pocketllm worker` runs workers on their own.
    run_worker: bool = True
    # Jobs one worker process runs at the same time.
    job_concurrency: int = Field(default=4, ge=1, le=256)
    # An idle worker looks for due jobs this often.
    job_poll_seconds: float = Field(default=0.5, gt=0, le=60)
    # A worker holds each job for this long and renews the lease every JOB_HEARTBEAT_SECONDS. A job whose
    # worker died is claimed again once its lease has run out. A cancelled job stops within one heartbeat.
    job_lease_seconds: float = Field(default=60.0, gt=0, le=3600)
    job_heartbeat_seconds: float = Field(default=2.0, gt=0, le=600)
    # Failed attempts are retried after JOB_RETRY_BASE_SECONDS, doubling each time up to one hour, until
    # a job has had JOB_MAX_ATTEMPTS attempts.
    job_max_attempts: int = Field(default=4, ge=1, le=50)
    job_retry_base_seconds: float = Field(default=10.0, gt=0, le=3600)
    # On shutdown, running jobs get this long to finish; then they are released for another worker.
    job_shutdown_grace_seconds: float = Field(default=20.0, ge=0, le=600)
    # Limits for one image generation call and for each image it returns.
    image_timeout_seconds: float = Field(default=180.0, gt=0, le=1800)
    image_max_bytes: int = Field(default=20 * 1024 * 1024, ge=1024, le=200 * 1024 * 1024)
    image_max_pixels: int = Field(default=50_000_000, ge=10_000, le=500_000_000)
    # How often each maintenance task runs; every worker schedules them, and each period runs once.
    account_purge_interval_seconds: int = Field(default=3600, ge=10, le=7 * 86_400)
    session_cleanup_interval_seconds: int = Field(default=3600, ge=10, le=7 * 86_400)
    job_file_sweep_interval_seconds: int = Field(default=3600, ge=10, le=7 * 86_400)

    # Rate limits, in the `limits` notation: "<count>/<period>" or "<count> per <period>", e.g. "10/minute"
    # or "100 per 2 hours". Each counts on a moving window, in Redis when REDIS_URL is set (shared by all
    # processes) and otherwise in each process's memory.
    rate_limit_enabled: bool = True
    # Addresses or CIDR networks of reverse proxies whose X-Forwarded-For header is believed. Requests from
    # any other peer are limited by the peer address, whatever the header says.
    trusted_proxies: Annotated[list[str], NoDecode] = []
    rate_limit_signin: str = "10/minute"  # per client address
    rate_limit_signin_per_email: str = "5/minute"  # per canonical e-mail address, from any client address
    rate_limit_signup: str = "5/minute"  # per client address
    rate_limit_password_change: str = "5/minute"  # noqa: S105  (a rate limit, per user)
    rate_limit_waitlist: str = "5/minute"  # per client address
    rate_limit_referral_send: str = "20/hour"  # per user
    rate_limit_chat_messages: str = "60/minute"  # per user
    rate_limit_jobs: str = "30/minute"  # image jobs queued, per user
    # Prometheus metrics at GET /metrics. Expose that path only to your monitoring network.
    metrics_enabled: bool = True
    # Strict-Transport-Security max-age sent on every response; 0 sends no header. Set it once the server is
    # only reachable over HTTPS (behind a TLS proxy).
    hsts_max_age_seconds: int = Field(default=0, ge=0, le=2 * 365 * 86_400)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["console", "json"] = "console"

    # Set by `resolve_settings` when a secret came from the data directory instead of the environment.
    _generated_secrets: frozenset[str] = PrivateAttr(default=frozenset())

    @property
    def generated_secrets(self) -> frozenset[str]:
        return self._generated_secrets

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("cors_origins", "jwt_algorithms", "trusted_proxies", mode="before")
    @classmethod
    def _split_lists(cls, value: Any) -> Any:
        return _split_comma_list(value)

    @field_validator("jwt_algorithms")
    @classmethod
    def _reject_none_algorithm(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("JWT_ALGORITHMS must name at least one algorithm")
        if any(algorithm.lower() == "none" for algorithm in value):
            raise ValueError("JWT_ALGORITHMS must not contain 'none'")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _check_trusted_proxies(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError as error:
                raise ValueError(
                    f"TRUSTED_PROXIES entry {entry!r} is not an IP address or CIDR network (e.g. 10.0.0.0/8)"
                ) from error
        return value

    @field_validator(
        "rate_limit_signin",
        "rate_limit_signin_per_email",
        "rate_limit_signup",
        "rate_limit_password_change",
        "rate_limit_waitlist",
        "rate_limit_referral_send",
        "rate_limit_chat_messages",
        "rate_limit_jobs",
    )
    @classmethod
    def _check_rate_limit(cls, value: str, info: ValidationInfo) -> str:
        setting = (info.field_name or "rate limit").upper()
        try:
            parse_rate_limit(value)
        except ValueError as error:
            raise ValueError(
                f"{setting}={value!r} is not a valid rate limit; write it as '<count>/<period>', "
                "e.g. '10/minute' or '100 per 2 hours'"
            ) from error
        return value.strip()

    @field_validator("referral_share_base_url")
    @classmethod
    def _require_http_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in {"http", "https"} or not parts.netloc:
            raise ValueError("REFERRAL_SHARE_BASE_URL must be an absolute http:// or https:// URL")
        return value.strip()

    @field_validator("supabase_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @model_validator(mode="after")
    def _check_supabase(self) -> Self:
        if self.auth_backend is AuthBackend.SUPABASE:
            if not self.supabase_url:
                raise ValueError("SUPABASE_URL is required when AUTH_BACKEND=supabase")
            if not self.supabase_anon_key:
                raise ValueError("SUPABASE_ANON_KEY is required when AUTH_BACKEND=supabase")
        return self

    @model_validator(mode="after")
    def _check_job_heartbeat(self) -> Self:
        if self.job_heartbeat_seconds >= self.job_lease_seconds:
            raise ValueError(
                f"JOB_HEARTBEAT_SECONDS ({self.job_heartbeat_seconds:g}) must be shorter than JOB_LEASE_SECONDS "
                f"({self.job_lease_seconds:g}), or leases run out while jobs run"
            )
        return self

    @property
    def is_production(self) -> bool:
        return self.environment is Environment.PRODUCTION

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / SQLITE_FILE).resolve()}"

    @property
    def is_sqlite(self) -> bool:
        return self.effective_database_url.startswith("sqlite")

    @property
    def token_issuer(self) -> str:
        if self.jwt_issuer:
            return self.jwt_issuer
        if self.auth_backend is AuthBackend.SUPABASE and self.supabase_url:
            return f"{self.supabase_url}/auth/v1"
        return "pocketllm"

    @property
    def encryption_keys(self) -> list[str]:
        return _split_comma_list(self.encryption_key or "")  # type: ignore[no-any-return]

    def check_production_safety(self) -> None:
        """Raise ConfigurationError when production would run on generated or missing secrets."""
        if not self.is_production:
            return

        problems: list[str] = []
        if "jwt_secret" in self.generated_secrets or not self.jwt_secret:
            problems.append("JWT_SECRET must be set explicitly (a generated secret is not allowed)")
        elif self.jwt_secret.strip().lower() in PLACEHOLDER_SECRETS:
            problems.append("JWT_SECRET is a placeholder value; set a random secret")
        elif len(self.jwt_secret) < MIN_JWT_SECRET_LENGTH:
            problems.append(f"JWT_SECRET must be at least {MIN_JWT_SECRET_LENGTH} characters long")
        if "encryption_key" in self.generated_secrets or not self.encryption_key:
            problems.append("ENCRYPTION_KEY must be set explicitly (a generated key is not allowed)")
        if self.is_sqlite:
            problems.append("DATABASE_URL must point to PostgreSQL (postgresql+asyncpg://...), not SQLite")
        if problems:
            raise ConfigurationError("Refusing to start with ENVIRONMENT=production: " + "; ".join(problems) + ".")


def _read_or_create_secret(path: Path, generate: Callable[[], str]) -> str:
    """Return the secret stored at `path`, creating it with owner-only permissions on first use.

    An exclusive lock on a file beside it makes processes that start at once agree on one secret. The
    secret is written to a temporary file and renamed into place, so a crash never leaves a half-written
    file, and an empty file (written by hand, or by a crash in older versions) is replaced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(path.parent / ".secrets.lock"):
        existing = _read_secret_file(path)
        if existing:
            return existing

        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                handle.write(generate() + "\n")
            os.chmod(temporary, 0o600)
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise

    value = _read_secret_file(path)
    if not value:
        raise ConfigurationError(f"Could not store a generated secret in {path}; check DATA_DIR permissions.")
    return value


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a") as lock_file:
        if fcntl is not None:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
        yield
    # Closing the file releases the lock.


def _read_secret_file(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def _validate_fernet_keys(keys: list[str]) -> None:
    for index, key in enumerate(keys):
        try:
            Fernet(key.encode())
        except ValueError as error:
            raise ConfigurationError(
                f"ENCRYPTION_KEY entry {index + 1} is not a valid Fernet key (32 url-safe base64-encoded "
                "bytes); generate one with `pocketllm keys generate`."
            ) from error


def _check_database_url(database_url: str) -> None:
    """Raise ConfigurationError unless `database_url` names a file or server database of a supported driver."""
    example = "sqlite+aiosqlite:///path/to/file.db or postgresql+asyncpg://user:password@host:5432/dbname"
    try:
        url = make_url(database_url)
        port = url.port
    except (ArgumentError, ValueError) as error:
        raise ConfigurationError(f"DATABASE_URL is not a valid database URL; use {example}.") from error
    if port is not None and not 1 <= port <= 65535:
        raise ConfigurationError(f"DATABASE_URL has the port {port}, outside 1-65535; use {example}.")
    if url.drivername not in SUPPORTED_DATABASE_DRIVERS:
        raise ConfigurationError(
            f"DATABASE_URL uses the driver {url.drivername!r}, which the server does not support; use {example}."
        )
    if is_in_memory_sqlite(url):
        raise ConfigurationError(
            "DATABASE_URL names an in-memory SQLite database, which exists separately in each connection: "
            "requests would not find the tables that the migrations create, and the data is lost at exit; "
            f"use {example}."
        )


def resolve_settings(settings: Settings) -> Settings:
    """Fill in the embedded defaults and refuse unsafe production settings.

    Outside production, a missing JWT secret or encryption key is generated once and kept in the data
    directory, so tokens and encrypted data stay valid across restarts.
    """
    if settings.database_url is not None:
        _check_database_url(settings.database_url)
    settings.check_production_safety()

    updates: dict[str, Any] = {}
    generated: set[str] = set(settings.generated_secrets)
    needs_data_dir = settings.database_url is None or not settings.jwt_secret or not settings.encryption_key
    if needs_data_dir:
        # Owner-only: the folder holds the secrets and, by default, the database.
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    if not settings.jwt_secret:
        updates["jwt_secret"] = _read_or_create_secret(
            settings.data_dir / JWT_SECRET_FILE, lambda: secrets.token_urlsafe(48)
        )
        generated.add("jwt_secret")
    if not settings.encryption_key:
        updates["encryption_key"] = _read_or_create_secret(
            settings.data_dir / ENCRYPTION_KEY_FILE, lambda: Fernet.generate_key().decode()
        )
        generated.add("encryption_key")

    resolved = settings.model_copy(update=updates)
    resolved._generated_secrets = frozenset(generated)
    _validate_fernet_keys(resolved.encryption_keys)
    return resolved


def load_settings() -> Settings:
    """Read the settings from the environment and `.env`, then resolve them."""
    return resolve_settings(Settings())
