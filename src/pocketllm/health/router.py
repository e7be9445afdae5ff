"""Liveness and readiness probes. `/health` has no /v1 prefix because the shipped client calls it there."""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Literal

import structlog
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from pocketllm import __version__
from pocketllm.db.dependencies import get_database
from pocketllm.db.engine import SQLITE_BEGIN_OPTION
from pocketllm.db.migrate import head_revision
from pocketllm.db.types import utcnow
from pocketllm.kit.routing import JsonBodyRoute, PrefixRouter

router = PrefixRouter(tags=["health"], route_class=JsonBodyRoute)
log = structlog.get_logger(__name__)


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    timestamp: datetime
    version: str


class ReadinessResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str]


@functools.cache
def _expected_revision() -> str | None:
    return head_revision()


async def _schema_state(connection: AsyncConnection) -> str:
    """Return `ok` when the database is at this version's migration head, else `not_migrated` or `outdated`.

    A server started with MIGRATE_ON_START=false before `pocketllm migrate` ran would otherwise report
    ready and fail every request.
    """
    try:
        async with connection.begin_nested() if connection.in_transaction() else connection.begin():
            current = await connection.scalar(text("SELECT version_num FROM alembic_version"))
    except SQLAlchemyError:
        return "not_migrated"
    if current is None:
        return "not_migrated"
    return "ok" if current == _expected_revision() else "outdated"


@router.get("/health", response_model=HealthResponse)
@router.get("/v1/health", response_model=HealthResponse)
async def health() -> HealthResponse:
    """Report that the process is up; touches no dependency."""
    return HealthResponse(timestamp=utcnow(), version=__version__)


@router.get(
    "/health/ready",
    response_model=ReadinessResponse,
    responses={503: {"model": ReadinessResponse, "description": "A dependency is unreachable."}},
)
async def readiness(request: Request) -> JSONResponse:
    """Report whether the server can take traffic: the database must respond and have the schema this version
    needs (`checks.schema`). `checks.worker` shows whether this process runs background jobs."""
    schema = "unknown"
    try:
        async with get_database(request).engine.connect() as raw_connection:
            # A read: on SQLite it must not wait for the write lock.
            connection = await raw_connection.execution_options(**{SQLITE_BEGIN_OPTION: "DEFERRED"})
            await connection.execute(text("SELECT 1"))
            database = "ok"
            schema = await _schema_state(connection)
    except (SQLAlchemyError, OSError) as error:
        log.warning("health.database_unreachable", error=type(error).__name__)
        database = "unreachable"
    if schema not in ("ok", "unknown"):
        log.warning("health.schema_not_current", schema=schema)

    ready = database == "ok" and schema == "ok"
    # Informational: whether this process runs background jobs (RUN_WORKER); it does not affect readiness.
    worker = "running" if getattr(request.app.state, "job_worker", None) is not None else "off"
    checks = {"database": database, "schema": schema, "worker": worker}
    body = ReadinessResponse(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(status_code=200 if ready else 503, content=body.model_dump())
