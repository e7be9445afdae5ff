"""GET /v1/files/{key}: serves stored files to clients that send no Authorization header.

Public (avatar) keys need nothing else. Private keys need the `expires` and `signature` parameters
that `FileStorage.url_for` adds. The headers stop a stored file from running as active content. The
content type comes from a fixed list of image types, and nosniff stops browsers from guessing another.
A sandboxing Content-Security-Policy applies if the file is opened as a page.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Query, Request, Response

from pocketllm.errors import NotFound, error_responses
from pocketllm.kit.routing import JsonBodyRoute, PrefixRouter
from pocketllm.storage.keys import DEFAULT_CONTENT_TYPE, InvalidStorageKey, is_public_key, validate_key
from pocketllm.storage.service import FILES_PATH, FileStorage, StorageUnavailable
from pocketllm.storage.signing import InvalidSignature, SignatureExpired

router = PrefixRouter(tags=["files"], route_class=JsonBodyRoute)

# Avatar URLs change whenever the avatar does, so a cached copy never goes stale.
PUBLIC_CACHE_CONTROL = "public, max-age=31536000, immutable"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; sandbox",
    "Cross-Origin-Resource-Policy": "cross-origin",
}


class FileNotFound(NotFound):
    code = "file_not_found"
    default_message = "No file exists at this URL."


@router.get(
    f"{FILES_PATH}/{{key:path}}",
    response_class=Response,
    responses={
        200: {"content": {"image/webp": {}, "image/png": {}, "image/jpeg": {}}, "description": "The file."},
        **error_responses(InvalidSignature, SignatureExpired, FileNotFound, StorageUnavailable),
    },
)
async def get_file(
    key: str,
    request: Request,
    expires: Annotated[str | None, Query(description="Expiry time of a signed URL, in Unix seconds.")] = None,
    signature: Annotated[str | None, Query(description="Signature of a private file's URL.")] = None,
) -> Response:
    """Return a stored file. Private files need the signed URL from the API, and avatars need no signature."""
    try:
        validate_key(key)
    except InvalidStorageKey as error:
        # No file can exist under an invalid key, e.g. one with `..` or a decoded `%2e%2e`.
        raise FileNotFound() from error

    storage = _storage(request)
    if is_public_key(key):
        cache_control = PUBLIC_CACHE_CONTROL
    else:
        # Checked before the lookup, so an unsigned request cannot learn which private keys exist.
        expires_at = storage.signer.verify(key, expires, signature)
        cache_control = f"private, max-age={max(0, expires_at - int(time.time()))}"

    stored = await storage.get(key)
    if stored is None:
        raise FileNotFound()

    file_name = key.rsplit("/", 1)[-1]
    # Only the fixed image types display inline. Anything else downloads.
    disposition = "attachment" if stored.content_type == DEFAULT_CONTENT_TYPE else "inline"
    headers = {
        **SECURITY_HEADERS,
        "Cache-Control": cache_control,
        "Content-Disposition": f'{disposition}; filename="{file_name}"',
    }
    return Response(content=stored.data, media_type=stored.content_type, headers=headers)


def _storage(request: Request) -> FileStorage:
    storage: FileStorage = request.app.state.storage
    return storage
