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
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class PayloadTooLarge(PocketLLMError):
    status_code = 413
    code = "payload_too_large"
    default_message = f"The request body is larger than {MAX_JSON_BODY_BYTES // 1024} KiB."


class JsonBodyRoute(APIRoute):
    """Rejects JSON bodies over MAX_JSON_BODY_BYTES (413) and strings containing NUL characters (422).

    PostgreSQL cannot store U+0000 in text or JSON columns, so a NUL would otherwise fail deep inside a
    transaction as a server error; rejecting it up front gives every route the same clear answer.
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

    # Cheap test first: a NUL can only be in the body as a raw byte or as the escape \u0000.
    if b"\\u0000" not in body and b"\x00" not in body:
        return
    try:
        document = json.loads(body)
    except ValueError:
        return  # not JSON: the handler's own parsing reports it
    location = _find_nul(document, ("body",))
    if location is not None:
        raise RequestValidationError(
            [
                {
                    "type": "string_contains_nul",
                    "loc": location,
                    "msg": "Text must not contain NUL characters (U+0000)",
                }
            ]
        )


def _find_nul(value: Any, location: tuple[str | int, ...]) -> tuple[str | int, ...] | None:
    if isinstance(value, str):
        return location if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            if "\x00" in key:
                return location
            found = _find_nul(item, (*location, key))
            if found is not None:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _find_nul(item, (*location, index))
            if found is not None:
                return found
    return None
