"""Process-wide structured logging: constant event names with ids as fields, never secrets."""

from __future__ import annotations

import logging
import sys

import structlog

from pocketllm.kit.request_id import add_route


def configure_logging(level: str = "INFO", fmt: str = "console") -> None:
    """Route structlog and the standard library's loggers through one renderer on stderr."""
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=False)

    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_route,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        # Dropping lines below the level first spares every request the work of rendering its INFO lines
        # when the server runs at WARNING.
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    # Uvicorn's access log repeats what our request log already records, with the query string included.
    logging.getLogger("uvicorn.access").disabled = True
    # httpx logs every request URL at INFO; provider URLs are users' own and some carry keys in the query.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # Alembic reports each migration step at INFO; the CLI prints the resulting revision itself.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # aiosqlite logs every statement with its parameters at DEBUG.
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)
