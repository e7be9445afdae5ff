"""Domain errors and the one place that renders every error response.

Every error body is `{"detail": "<readable sentence>", "code": "<machine_code>"}`. Validation errors keep
FastAPI's `detail` list and add a readable top-level `message`. The shipped client logs the user out on
401 and re-sends 404/405/409/5xx to another host, so business failures use 400, 403 or 422.
"""

from __future__ import annotations

import sqlite3
from http import HTTPStatus
from typing import Any, ClassVar

import sqlalchemy.exc
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from pocketllm.db.engine import WriterQueueTimeout

log = structlog.get_logger(__name__)


class PocketLLMError(Exception):
    """Base of all domain errors: carries the HTTP status, a stable machine code and a readable message."""

    status_code: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"
    default_message: ClassVar[str] = "The request could not be processed."

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None) -> None:
        self.message = message or self.default_message
        self.headers = headers
        super().__init__(self.message)


class InvalidInput(PocketLLMError):
    status_code = 400
    code = "invalid_input"


class NotAuthenticated(PocketLLMError):
    status_code = 401
    code = "not_authenticated"
    default_message = "Authentication required: send 'Authorization: Bearer <access_token>'."

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(PocketLLMError):
    status_code = 403
    code = "forbidden"
    default_message = "You are not allowed to do this."


class NotFound(PocketLLMError):
    status_code = 404
    code = "not_found"
    default_message = "The requested resource was not found."


class Conflict(PocketLLMError):
    # 422, not 409: the shipped client re-sends 409 responses to a fallback host.
    status_code = 422
    code = "conflict"


class RateLimited(PocketLLMError):
    status_code = 429
    code = "rate_limited"
    default_message = "Too many requests; wait a moment and try again."


class UpstreamError(PocketLLMError):
    status_code = 502
    code = "upstream_error"
    default_message = "An upstream service failed to respond."


class ServiceUnavailable(PocketLLMError):
    status_code = 503
    code = "service_unavailable"


class DatabaseBusy(ServiceUnavailable):
    """Every pooled database connection stayed in use for DATABASE_POOL_TIMEOUT_SECONDS, or another writer kept
    an SQLite database locked for longer than its busy timeout."""

    code = "database_busy"
    default_message = "The server's database connections are all in use. Try again in a moment."

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": "1"})


DATABASE_LOCKED_MESSAGE = "Another writer kept the database locked for too long. Try again in a moment."


def is_database_locked(error: BaseException) -> bool:
    """Tell whether `error` is SQLite's 'database is locked' after its busy timeout, as sqlite3 raised it or
    wrapped by SQLAlchemy, or a write that waited as long for this process's earlier writes."""
    if isinstance(error, WriterQueueTimeout):
        return True
    original = error.orig if isinstance(error, sqlalchemy.exc.DBAPIError) else error
    return (
        isinstance(original, sqlite3.OperationalError)
        and getattr(original, "sqlite_errorcode", None) == sqlite3.SQLITE_BUSY
    )


class UnparsableBody(PocketLLMError):
    """A request body that FastAPI cannot decode at all, such as bytes that are not UTF-8 text.

    FastAPI raises its own HTTPException(400) for it, which the HTTP exception handler renders with the code
    `bad_request`. No code raises this class. Routes list it in `error_responses`, so OpenAPI shows that 400.
    """

    status_code = 400
    code = "bad_request"
    default_message = "There was an error parsing the body"


class ErrorBody(BaseModel):
    """The body of every error response."""

    detail: str
    code: str


class ValidationErrorBody(BaseModel):
    """The body of a 422 request validation error."""

    detail: list[dict[str, Any]]
    code: str = "validation_error"
    message: str


# The 401 codes of a route behind an access token: no token, a token that fails a check (auth/tokens.py),
# or a session that has ended (auth/backends/local.py).
ACCESS_TOKEN_ERROR_CODES = (
    "not_authenticated",
    "token_malformed",
    "token_algorithm_rejected",
    "token_signature_invalid",
    "token_audience_invalid",
    "token_issuer_invalid",
    "token_expired",
    "token_invalid",
    "session_revoked",
    "session_expired",
)


def error_responses(*errors: type[PocketLLMError]) -> dict[int | str, dict[str, Any]]:
    """Build the OpenAPI `responses` entry listing the domain errors a route can return.

    NotAuthenticated is listed as every code of ACCESS_TOKEN_ERROR_CODES. A 422 entry replaces FastAPI's own
    request validation entry, so it documents both bodies: ErrorBody for the domain errors and
    ValidationErrorBody for request validation errors.
    """
    by_status: dict[int, list[type[PocketLLMError]]] = {}
    for error in errors:
        by_status.setdefault(error.status_code, []).append(error)

    responses: dict[int | str, dict[str, Any]] = {}
    for status, classes in sorted(by_status.items()):
        codes = sorted({error.code for error in classes})
        if NotAuthenticated in classes:
            codes = sorted({*codes, *ACCESS_TOKEN_ERROR_CODES})
        if status == 422:
            codes = sorted({*codes, "validation_error"})
            model: Any = ErrorBody | ValidationErrorBody
        else:
            model = ErrorBody
        responses[status] = {"model": model, "description": f"Error codes: {', '.join(codes)}."}
    return responses


def error_json(status_code: int, code: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"detail": detail, "code": code}, headers=headers)


def _describe_validation_error(error: dict[str, Any]) -> str:
    location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    field = ".".join(location)
    message = str(error.get("msg", "is invalid"))
    return f"{field}: {message}" if field else message


def _jsonable_validation_errors(errors: list[Any]) -> list[dict[str, Any]]:
    # Pydantic puts the offending exception object into `ctx`; keep only JSON-safe values and never echo
    # the submitted input, which may be a password.
    cleaned: list[dict[str, Any]] = []
    for error in errors:
        item = {key: value for key, value in dict(error).items() if key not in ("input", "ctx", "url")}
        context = error.get("ctx")
        if isinstance(context, dict):
            item["ctx"] = {key: str(value) for key, value in context.items()}
        cleaned.append(item)
    return cleaned


async def _handle_domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PocketLLMError)
    if exc.status_code >= 500:
        log.warning("request.upstream_failed", code=exc.code, status=exc.status_code)
    return error_json(exc.status_code, exc.code, exc.message, exc.headers)


async def _handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = _jsonable_validation_errors(list(exc.errors()))
    summary = "; ".join(_describe_validation_error(error) for error in errors[:5])
    message = f"Invalid request: {summary}." if summary else "Invalid request."
    return JSONResponse(status_code=422, content={"detail": errors, "code": "validation_error", "message": message})


_HTTP_STATUS_CODES = {
    400: "bad_request",
    401: "not_authenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


async def _handle_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_STATUS_CODES.get(exc.status_code, "http_error")
    detail = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    return error_json(exc.status_code, code, detail, dict(exc.headers) if exc.headers else None)


def _database_busy_json(message: str | None = None) -> JSONResponse:
    busy = DatabaseBusy(message)
    return error_json(busy.status_code, busy.code, busy.message, busy.headers)


async def _handle_pool_timeout(request: Request, exc: Exception) -> JSONResponse:
    # The request's path is in its request.completed line, with the same request id.
    log.warning("database.pool_timeout")
    return _database_busy_json()


async def _handle_database_locked(request: Request, exc: Exception) -> JSONResponse:
    # Every other operational error (a lost connection, a full disk) stays a 500.
    if not is_database_locked(exc):
        raise exc
    log.warning("database.locked")
    return _database_busy_json(DATABASE_LOCKED_MESSAGE)


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(PocketLLMError, _handle_domain_error)
    # SQLAlchemy raises its TimeoutError only when no pooled connection became free in time.
    app.add_exception_handler(sqlalchemy.exc.TimeoutError, _handle_pool_timeout)
    # DriverQuery raises sqlite3's own errors, and SQLAlchemy's execution wraps them.
    app.add_exception_handler(sqlalchemy.exc.OperationalError, _handle_database_locked)
    app.add_exception_handler(sqlite3.OperationalError, _handle_database_locked)
    app.add_exception_handler(WriterQueueTimeout, _handle_database_locked)
    app.add_exception_handler(RequestValidationError, _handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, _handle_http_exception)
