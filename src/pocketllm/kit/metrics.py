"""Prometheus metrics: request latency by route and status, provider calls, job attempts and the job queue.

Each app has its own registry on `app.state.metrics`, so several apps in one process (as in the tests) do
not collide. Provider calls and job attempts are recorded in two process-wide histograms instead, because
the provider HTTP client and the job worker are built without an app, and `pocketllm worker` runs with
none. Every app's registry exports those two histograms as well.

Each process keeps its own values: a scrape of `/metrics` returns the numbers of the process that
accepted the connection.

NOTE: `pocketllm worker` serves no HTTP, so the provider calls and job attempts of a standalone worker
are recorded but not exported.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Literal

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, Histogram, generate_latest
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from pocketllm.config import Settings
from pocketllm.db.dependencies import get_database
from pocketllm.db.engine import Database
from pocketllm.errors import PocketLLMError
from pocketllm.models.job import ACTIVE_STATUSES, Job

log = structlog.get_logger(__name__)

METRICS_PATH = "/metrics"
# A scrape must return even when the database hangs, within Prometheus' default scrape timeout of 10 seconds.
QUEUE_DEPTH_TIMEOUT_SECONDS = 2.0
# The queue depth reported while the database cannot be queried.
QUEUE_DEPTH_UNKNOWN = -1

# The method label takes these values and "other", so a client cannot add label values at will.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Bucket bounds in seconds. Streamed replies and image jobs can take minutes.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
PROVIDER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
JOB_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

ProviderOperation = Literal["request", "stream"]
JobAttemptOutcome = Literal["completed", "failed", "retry_scheduled", "stopped", "released"]

# registry=None: these two are registered into every app's registry by AppMetrics.
PROVIDER_REQUEST_SECONDS = Histogram(
    "pocketllm_provider_request_duration_seconds",
    "Duration of HTTP calls to LLM and image providers, in seconds. For operation=request it covers the "
    "whole call. For operation=stream it ends when the response headers arrive (or at the error, if the "
    "call fails before them), while outcome is how the whole stream ended. outcome is ok, cancelled, or "
    "the API error code the call failed with (for example provider_timeout).",
    ["provider", "operation", "outcome"],
    buckets=PROVIDER_BUCKETS,
    registry=None,
)
JOB_DURATION_SECONDS = Histogram(
    "pocketllm_job_duration_seconds",
    "Duration of one job attempt in this process's worker, in seconds, from the start of the handler until "
    "the outcome was stored, by job type and outcome.",
    ["job_type", "outcome"],
    buckets=JOB_BUCKETS,
    registry=None,
)


class ProviderCallTimer:
    """Context manager that records the duration and outcome of the provider call made inside its block.

    Errors from the block are re-raised. `response_started` stops the clock at the response headers, for
    streams. `provider` must be a provider id from the registry, never a URL, because it becomes a label
    value. A class rather than a @contextmanager generator, because one stays alive per open stream.
    """

    __slots__ = ("_operation", "_provider", "_seconds", "_started")

    def __init__(self, provider: str, operation: ProviderOperation) -> None:
        self._provider = provider
        self._operation = operation
        self._started = time.perf_counter()
        self._seconds: float | None = None

    def __enter__(self) -> ProviderCallTimer:
        return self

    def __exit__(
        self, error_type: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        outcome = "ok" if error is None else provider_call_outcome(error)
        PROVIDER_REQUEST_SECONDS.labels(provider=self._provider, operation=self._operation, outcome=outcome).observe(
            self.seconds()
        )

    def response_started(self) -> None:
        if self._seconds is None:
            self._seconds = time.perf_counter() - self._started

    def seconds(self) -> float:
        if self._seconds is not None:
            return self._seconds
        return time.perf_counter() - self._started


def provider_call_outcome(error: BaseException) -> str:
    """Return the outcome label for a call that ended with `error`: a domain error's code, or a fixed word."""
    if isinstance(error, PocketLLMError):
        return error.code
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        return "cancelled"
    return "internal_error"


def record_job_attempt(job_type: str, outcome: JobAttemptOutcome, seconds: float) -> None:
    JOB_DURATION_SECONDS.labels(job_type=job_type, outcome=outcome).observe(seconds)


class AppMetrics:
    """One app's registry and the metrics that belong to the app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.request_duration = Histogram(
            "pocketllm_http_request_duration_seconds",
            "Duration of HTTP requests in seconds, until the last byte of the response was sent, by method, "
            "route template and status code. Requests that matched no route have route=unmatched.",
            ["method", "route", "status"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "pocketllm_job_queue_depth",
            "Jobs in the queue when the metrics were scraped, by status: pending (due or not) or processing. "
            "-1 when the database could not be queried.",
            ["status"],
            registry=self.registry,
        )
        self.registry.register(PROVIDER_REQUEST_SECONDS)
        self.registry.register(JOB_DURATION_SECONDS)
        self._queue_depth_failing = False

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one HTTP request's duration. `route` is the route template, never the raw path."""
        method_label = method if method in _KNOWN_METHODS else "other"
        self.request_duration.labels(method=method_label, route=route, status=str(status)).observe(seconds)

    async def update_queue_depth(self, database: Database) -> None:
        """Count the active jobs by status into the gauge, or set it to -1 when the database fails.

        A failure is logged when it starts and again when the query works again, not on every scrape.
        """
        try:
            async with asyncio.timeout(QUEUE_DEPTH_TIMEOUT_SECONDS):
                counts = await count_active_jobs(database)
        except (SQLAlchemyError, OSError, TimeoutError) as error:
            for status in ACTIVE_STATUSES:
                self.queue_depth.labels(status=status).set(QUEUE_DEPTH_UNKNOWN)
            if not self._queue_depth_failing:
                self._queue_depth_failing = True
                log.warning("metrics.queue_depth_failed", error=type(error).__name__)
            return

        for status in ACTIVE_STATUSES:
            self.queue_depth.labels(status=status).set(counts.get(status, 0))
        if self._queue_depth_failing:
            self._queue_depth_failing = False
            log.info("metrics.queue_depth_recovered")


async def count_active_jobs(database: Database) -> dict[str, int]:
    """Return the number of pending and processing jobs, keyed by status."""
    query = select(Job.status, func.count()).where(Job.status.in_(ACTIVE_STATUSES)).group_by(Job.status)
    async with database.read_only() as session:
        rows = (await session.execute(query)).all()
    return {status: int(count) for status, count in rows}


async def serve_metrics(request: Request) -> Response:
    """Return this process's metrics in the Prometheus text format."""
    metrics: AppMetrics = request.app.state.metrics
    await metrics.update_queue_depth(get_database(request))
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def install_metrics(app: FastAPI, settings: Settings) -> None:
    """Add the `/metrics` route and the request metrics to `app`, unless METRICS_ENABLED is false.

    Scrapes of `/metrics` are counted in the request histogram like any other route.
    """
    if not settings.metrics_enabled:
        app.state.metrics = None
        return

    # RequestIdMiddleware observes each request in app.state.metrics, so that one middleware times it for
    # both the log line and the histogram.
    app.state.metrics = AppMetrics()
    app.add_api_route(METRICS_PATH, serve_metrics, methods=["GET"], include_in_schema=False)
