"""Application factory: routers, middleware, error handlers and the resources that live as long as the app."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import certifi
import httpx
import structlog
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from sqlalchemy.exc import IntegrityError

from pocketllm import __version__
from pocketllm.auth.backends.base import AuthBackend
from pocketllm.auth.dependencies import handle_account_deleted
from pocketllm.auth.passwords import PasswordHashing
from pocketllm.auth.router import router as auth_router
from pocketllm.chats.replies import SHUTDOWN_REPLY_WAIT_SECONDS, ReplyGenerator
from pocketllm.chats.router import router as chats_router
from pocketllm.config import AuthBackend as AuthBackendName
from pocketllm.config import Settings, load_settings, resolve_settings
from pocketllm.db.engine import SQLITE_BACKGROUND_AUTOCHECKPOINT_PAGES, Database, create_engine
from pocketllm.db.migrate import upgrade_database
from pocketllm.db.wal import run_checkpoints
from pocketllm.errors import ErrorBody, register_error_handlers
from pocketllm.health.router import router as health_router
from pocketllm.jobs.handlers import build_job_worker
from pocketllm.jobs.router import router as jobs_router
from pocketllm.kit.cache import build_cache
from pocketllm.kit.collector import tune_garbage_collector
from pocketllm.kit.crypto import SecretBox
from pocketllm.kit.logging import configure_logging
from pocketllm.kit.memory import MemoryTrimmer, can_trim
from pocketllm.kit.metrics import install_metrics
from pocketllm.kit.ratelimit import build_rate_limiter, parse_trusted_proxies
from pocketllm.kit.request_id import RequestIdMiddleware
from pocketllm.kit.security import install_security
from pocketllm.mail import MailSender
from pocketllm.model_configs.router import router as model_configs_router
from pocketllm.providers.catalogue import Catalogue
from pocketllm.providers.dependencies import ProviderRuntime
from pocketllm.providers.guard import HostClients, OutboundGuard
from pocketllm.providers.http import ProviderHttp
from pocketllm.providers.network import ProviderClient, ProviderTransport
from pocketllm.providers.router import router as providers_router
from pocketllm.referrals.router import legacy_referral_router, referral_router, waitlist_router
from pocketllm.storage.router import router as files_router
from pocketllm.storage.service import build_storage
from pocketllm.users.router import router as users_router

log = structlog.get_logger(__name__)


def build_auth_backend(settings: Settings, database: Database) -> AuthBackend:
    passwords = PasswordHashing(
        time_cost=settings.password_hash_time_cost,
        memory_kib=settings.password_hash_memory_kib,
        parallelism=settings.password_hash_parallelism,
    )
    if settings.auth_backend is AuthBackendName.SUPABASE:
        from pocketllm.auth.backends.supabase import SupabaseAuthBackend

        return SupabaseAuthBackend(settings, database)

    from pocketllm.auth.backends.local import LocalAuthBackend

    return LocalAuthBackend(settings, database, passwords)


def build_provider_runtime(settings: Settings) -> ProviderRuntime:
    # One TLS context for every client: each would otherwise load certifi's CA bundle again, which costs
    # about 0.8 MB and 18 ms per context.
    tls_context = ssl.create_default_context(cafile=certifi.where())

    limits = httpx.Limits(max_connections=settings.provider_max_connections, max_keepalive_connections=100)

    def make_client() -> httpx.AsyncClient:
        # ProviderClient keeps no cookies: the clients are shared by all users.
        return ProviderClient(
            transport=ProviderTransport(ssl_context=tls_context, limits=limits),
            timeout=httpx.Timeout(
                settings.provider_read_timeout_seconds, connect=settings.provider_connect_timeout_seconds
            ),
            follow_redirects=False,
            # Uncompressed bodies, so that every size limit counts the bytes that arrive. httpx still
            # decodes a provider that compresses anyway (see `read_limited`).
            headers={"Accept-Encoding": "identity"},
            # Proxy variables from the environment would bypass the guard's address pinning, and .netrc
            # credentials must never be attached to provider requests.
            trust_env=False,
        )

    http_client = HostClients(make_client)
    guard = OutboundGuard(allow_private=settings.allow_private_provider_urls)
    provider_http = ProviderHttp(http_client, guard)
    cache = build_cache(settings.redis_url)
    catalogue = Catalogue(
        provider_http,
        cache,
        ttl_seconds=settings.catalogue_cache_ttl_seconds,
        timeout_seconds=settings.catalogue_timeout_seconds,
    )
    return ProviderRuntime(
        http_client=http_client,
        http=provider_http,
        catalogue=catalogue,
        cache=cache,
        secrets=SecretBox(settings.encryption_keys),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the ASGI app. Settings are resolved here, so a production misconfiguration fails at once."""
    settings = resolve_settings(settings) if settings is not None else load_settings()
    configure_logging(settings.log_level, settings.log_format)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        database = Database(
            create_engine(
                settings.effective_database_url,
                pool_size=settings.database_pool_size,
                max_overflow=settings.database_max_overflow,
                pool_timeout=settings.database_pool_timeout_seconds,
                # Commits leave checkpoints to the task below (db/wal.py).
                sqlite_autocheckpoint_pages=SQLITE_BACKGROUND_AUTOCHECKPOINT_PAGES,
            )
        )
        if settings.migrate_on_start:
            await upgrade_database(database.engine)
        app.state.database = database
        app.state.auth_backend = build_auth_backend(settings, database)
        app.state.providers = build_provider_runtime(settings)
        app.state.replies = ReplyGenerator(
            database,
            app.state.providers.http,
            app.state.providers.secrets,
            max_characters=settings.reply_max_characters,
        )
        # Safe in every process at once: senders claim each message for one of them only.
        app.state.mail_sender = MailSender(database, settings)
        mail_stop = asyncio.Event()
        mail_task = asyncio.create_task(app.state.mail_sender.run(mail_stop), name="mail-sender")
        checkpoint_stop = asyncio.Event()
        checkpoint_task: asyncio.Task[None] | None = None
        if database.dialect == "sqlite":
            checkpoint_task = asyncio.create_task(run_checkpoints(database, checkpoint_stop), name="sqlite-checkpoints")
        worker_stop = asyncio.Event()
        worker_task: asyncio.Task[None] | None = None
        app.state.job_worker = None
        if settings.run_worker:
            app.state.job_worker = build_job_worker(settings, database, app.state.storage, app.state.providers)
            worker_task = asyncio.create_task(app.state.job_worker.run(worker_stop), name="job-worker")
        trim_stop = asyncio.Event()
        trim_task: asyncio.Task[None] | None = None
        app.state.memory_trimmer = None
        if can_trim():
            app.state.memory_trimmer = MemoryTrimmer(app.state.providers.close_idle_connections)
            trim_task = asyncio.create_task(app.state.memory_trimmer.run(trim_stop), name="memory-trimmer")
        await app.state.auth_backend.start()
        log.info(
            "app.started",
            version=__version__,
            environment=settings.environment.value,
            database=database.dialect,
            auth_backend=settings.auth_backend.value,
            worker=settings.run_worker,
        )
        try:
            yield
        finally:
            # `pocketllm serve` has uvicorn wait SHUTDOWN_GRACE_SECONDS for open requests before this runs.
            await app.state.replies.shutdown(timeout=SHUTDOWN_REPLY_WAIT_SECONDS)
            worker_stop.set()
            if worker_task is not None:
                # The worker gives running jobs JOB_SHUTDOWN_GRACE_SECONDS, then releases them to the queue.
                await worker_task
            mail_stop.set()
            # On timeout wait_for cancels the sender; the message it was sending is retried after its lease.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(mail_task, timeout=settings.smtp_timeout_seconds + 5)
            checkpoint_stop.set()
            if checkpoint_task is not None:
                await checkpoint_task
            trim_stop.set()
            if trim_task is not None:
                await trim_task
            await app.state.auth_backend.close()
            await app.state.providers.close()
            await app.state.rate_limiter.close()
            await database.dispose()
            log.info("app.stopped")

    app = FastAPI(
        title="PocketLLM Server",
        version=__version__,
        description="Accounts, bring-your-own-key LLM providers, chats and image jobs for the PocketLLM app.",
        lifespan=lifespan,
        # The shipped client never sends a trailing slash and does not follow redirects on POST.
        redirect_slashes=False,
    )
    app.state.settings = settings
    # Built here rather than in the lifespan, so that a bad STORAGE_URL fails at once.
    app.state.storage = build_storage(settings)
    # One limiter per app. With REDIS_URL its counts are shared by every process and app instance.
    app.state.rate_limiter = build_rate_limiter(settings.redis_url, enabled=settings.rate_limit_enabled)
    app.state.trusted_proxies = parse_trusted_proxies(settings.trusted_proxies)

    register_error_handlers(app)
    app.add_exception_handler(IntegrityError, handle_account_deleted)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID"],
        )
    install_security(app, settings)
    install_metrics(app, settings)
    app.add_middleware(RequestIdMiddleware, metrics=app.state.metrics)

    # Every route has a request body limit (kit/routing.py), so every route can return 413.
    too_large: dict[int | str, dict[str, Any]] = {
        413: {"model": ErrorBody, "description": "payload_too_large: the request body is over the limit."}
    }
    for router in (
        health_router,
        auth_router,
        users_router,
        providers_router,
        model_configs_router,
        chats_router,
        jobs_router,
        files_router,
        waitlist_router,
        referral_router,
        legacy_referral_router,
    ):
        app.include_router(router, responses=too_large)
    return app


def create_app_from_environment() -> FastAPI:
    """Factory for `uvicorn --factory pocketllm.app:create_app_from_environment` and `pocketllm serve`.

    Each server process calls it once, so it also tunes the process's garbage collector (kit/collector.py).
    """
    app = create_app(load_settings())
    tune_garbage_collector()
    return app
