"""Prometheus metrics: request latency by route and status, provider calls, and the job queue."""

from __future__ import annotations

from fastapi import FastAPI

from pocketllm.config import Settings


def install_metrics(app: FastAPI, settings: Settings) -> None:
    """Add the `/metrics` route and the request metrics to `app`."""
