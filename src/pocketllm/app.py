"""Application factory: routers, middleware, error handlers and the resources that live as long as the app."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from pocketllm import __version__
from pocketllm.auth.backends.base import AuthBackend
from pocketllm.auth.passwords import PasswordHashing
from pocketllm.auth.router import router as auth_router
from pocketllm.config import AuthBackend as AuthBackendName
from pocketllm.config import Settings, load_settings, resolve_settings
from pocketllm.db.engine import Database, create_engine
from pocketllm.db.migrate import upgrade_database
from pocketllm.errors import register_error_handlers
from pocketllm.health.router import router as health_router
from pocketllm.kit.logging import configure_logging
from pocketllm.kit.request_id import RequestIdMiddleware
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
            )
        )
        if settings.migrate_on_start:
            await upgrade_database(database.engine)
        app.state.database = database
        app.state.auth_backend = build_auth_backend(settings, database)
        log.info(
            "app.started",
            version=__version__,
            environment=settings.environment.value,
            database=database.dialect,
            auth_backend=settings.auth_backend.value,
        )
        try:
            yield
        finally:
            await app.state.auth_backend.close()
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

    register_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID"],
        )
    app.add_middleware(RequestIdMiddleware)

    app.include_router(health_router)
    app.include_router(auth_router)
    app.include_router(users_router)
    return app


def create_app_from_environment() -> FastAPI:
    """Factory for `uvicorn --factory pocketllm.app:create_app_from_environment` and `pocketllm serve`."""
    return create_app(load_settings())
