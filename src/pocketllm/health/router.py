"""Liveness and readiness probes. `/health` has no /v1 prefix because the shipped client calls it there."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from pocketllm import __version__
from pocketllm.db.dependencies import get_database
from pocketllm.db.types import utcnow
from pocketllm.kit.routing import JsonBodyRoute

router = APIRouter(tags=["health"], route_class=JsonBodyRoute)
log = structlog.get_logger(__name__)


class HealthResponse(BaseModel):
    status: Literal["ok"] = "ok"
    timestamp: datetime
    version: str


class ReadinessResponse(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str]


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
    """Report whether the server can take traffic: the database must answer. `checks.worker` tells whether
    this process runs background jobs."""
    try:
        async with get_database(request).engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        database = "ok"
    except (SQLAlchemyError, OSError) as error:
        log.warning("health.database_unreachable", error=type(error).__name__)
        database = "unreachable"

    ready = database == "ok"
    # Informational: whether this process runs background jobs (RUN_WORKER); it does not affect readiness.
    worker = "running" if getattr(request.app.state, "job_worker", None) is not None else "off"
    body = ReadinessResponse(status="ok" if ready else "unavailable", checks={"database": database, "worker": worker})
    return JSONResponse(status_code=200 if ready else 503, content=body.model_dump())
