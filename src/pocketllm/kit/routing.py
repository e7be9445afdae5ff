"""The route class every router uses: checks that JSON request bodies can be stored before handlers run."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from pocketllm.errors import PocketLLMError

# Chat messages are the largest JSON bodies (100,000 characters, up to four bytes each in UTF-8).
MAX_JSON_BODY_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 32
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class PayloadTooLarge(PocketLLMError):
    status_code = 413
    code = "payload_too_large"
    default_message = f"The request body is larger than {MAX_JSON_BODY_BYTES // 1024} KiB."


class JsonBodyRoute(APIRoute):
    """Rejects JSON bodies over MAX_JSON_BODY_BYTES (413), and with 422: strings containing NUL characters
    or unpaired surrogates, and nesting deeper than MAX_JSON_DEPTH.

    PostgreSQL cannot store U+0000, neither database driver can encode an unpaired surrogate, and very
    deep nesting cannot be serialised back into a response. Stored, any of them would turn later reads
    into server errors; rejecting them up front gives every route the same clear answer.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def check_then_handle(request: Request) -> Response:
            if request.method in _BODY_METHODS and "json" in request.headers.get("content-type", ""):
                await _check_json_body(request)
            return await handler(request)

        return check_then_handle


async def _check_json_body(request: Request) -> None:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_JSON_BODY_BYTES:
        raise PayloadTooLarge()
    # Starlette keeps the body on the request, so the handler below does not read it again.
    body = await request.body()
    if len(body) > MAX_JSON_BODY_BYTES:
        raise PayloadTooLarge()

    # Cheap tests first, so that ordinary bodies are not parsed twice.
    suspicious = b"\\u0000" in body or b"\x00" in body or b"\\ud" in body.lower()
    if not suspicious and body.count(b"[") + body.count(b"{") <= MAX_JSON_DEPTH:
        return
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return  # not JSON: the handler's own parsing reports it
    problem = _find_problem(document, ("body",), depth=0)
    if problem is not None:
        location, message = problem
        raise RequestValidationError([{"type": "string_not_storable", "loc": location, "msg": message}])


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "Text must not contain NUL characters (U+0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "Text must not contain unpaired surrogates (invalid \\ud800-\\udfff escapes)"
    return None


def _find_problem(
    value: Any, location: tuple[str | int, ...], *, depth: int
) -> tuple[tuple[str | int, ...], str] | None:
    if depth > MAX_JSON_DEPTH:
        return location, f"Nesting deeper than {MAX_JSON_DEPTH} levels is not accepted"
    if isinstance(value, str):
        message = _string_problem(value)
        return (location, message) if message else None
    if isinstance(value, dict):
        for key, item in value.items():
            message = _string_problem(key)
            if message:
                return location, message
            found = _find_problem(item, (*location, key), depth=depth + 1)
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _find_problem(item, (*location, index), depth=depth + 1)
            if found is not None:
                return found
    return None
