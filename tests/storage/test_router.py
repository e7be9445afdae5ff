"""GET /v1/files/{key} on a minimal app with local storage: serving, signatures, traversal and headers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Message

from pocketllm.errors import register_error_handlers
from pocketllm.storage.keys import new_key
from pocketllm.storage.router import router
from pocketllm.storage.service import FILES_PATH, FileStorage, build_storage
from tests.storage.test_storage import USER_ID, make_settings

BASE_URL = "http://files.test"
SECRET_FILE_CONTENT = b"this must never be served"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir()
    # A file beside the storage directory, where a traversal out of DATA_DIR/files would land.
    (directory / "jwt_secret").write_bytes(SECRET_FILE_CONTENT)
    return directory


@pytest.fixture
def storage(data_dir: Path) -> FileStorage:
    return build_storage(make_settings(data_dir, signed_url_ttl_seconds=600))


@pytest.fixture
def app(storage: FileStorage) -> FastAPI:
    # As in the real app: no redirect to a URL with a trailing slash.
    application = FastAPI(redirect_slashes=False)
    register_error_handlers(application)
    application.include_router(router)
    application.state.storage = storage
    return application


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE_URL) as http:
        yield http


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    assert SECRET_FILE_CONTENT not in response.content


def assert_security_headers(response: httpx.Response) -> None:
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["content-security-policy"] == "default-src 'none'; sandbox"


def relative(url: str) -> str:
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}" == BASE_URL
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


async def raw_get(app: FastAPI, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as given: httpx would remove `.` and `..` segments before sending."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"files.test")],
        "client": ("127.0.0.1", 50000),
        "server": ("files.test", 80),
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(message["status"] for message in sent if message["type"] == "http.response.start")
    body = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    return status, body


# Public avatar keys.


async def test_avatar_served_without_signature(client: httpx.AsyncClient, storage: FileStorage) -> None:
    key = new_key(f"users/{USER_ID}/avatars", "webp")
    await storage.put(key, b"RIFF....WEBPVP8 ", content_type="image/webp")

    response = await client.get(relative(storage.url_for(key, base_url=BASE_URL)))

    assert response.status_code == 200, response.text
    assert response.content == b"RIFF....WEBPVP8 "
    assert response.headers["content-type"] == "image/webp"
    assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert response.headers["content-disposition"] == f'inline; filename="{key.rsplit("/", 1)[-1]}"'
    assert_security_headers(response)


async def test_avatar_ignores_signature_parameters(client: httpx.AsyncClient, storage: FileStorage) -> None:
    key = new_key(f"users/{USER_ID}/avatars", "webp")
    await storage.put(key, b"data", content_type="image/webp")

    response = await client.get(f"{FILES_PATH}/{key}", params={"expires": "1", "signature": "bogus"})

    assert response.status_code == 200, response.text


async def test_missing_avatar_is_404(client: httpx.AsyncClient, storage: FileStorage) -> None:
    key = new_key(f"users/{USER_ID}/avatars", "webp")

    response = await client.get(relative(storage.url_for(key, base_url=BASE_URL)))

    assert_error(response, 404, "file_not_found")


async def test_deleted_avatar_is_404(client: httpx.AsyncClient, storage: FileStorage) -> None:
    key = new_key(f"users/{USER_ID}/avatars", "webp")
    await storage.put(key, b"data", content_type="image/webp")
    url = relative(storage.url_for(key, base_url=BASE_URL))

    await storage.delete(key)

    assert_error(await client.get(url), 404, "file_not_found")


# Private keys.


async def test_private_file_served_with_signature(client: httpx.AsyncClient, storage: FileStorage) -> None:
    key = f"users/{USER_ID}/generated/{'b' * 32}.png"
    await storage.put(key, b"\x89PNG data", content_type="image/png")

    response = await client.get(relative(storage.url_for(key, base_url=BASE_URL)))

    assert response.status_code == 200, response.text
    assert response.content == b"\x89PNG data"
    assert response.headers["content-type"] == "image/png"
    cache_control = response.headers["cache-control"]
    assert cache_control.startswith("private, max-age=")
    assert 590 <= int(cache_control.removeprefix("private, max-age=")) <= 600
    assert_security_headers(response)


async def test_private_file_needs_signature(client: httpx.AsyncClient, storage: FileStorage) -> None:
    key = f"users/{USER_ID}/generated/{'b' * 32}.png"
    await storage.put(key, b"data", content_type="image/png")

    response = await client.get(f"{FILES_PATH}/{key}")

    assert_error(response, 403, "invalid_signature")


async def test_missing_private_file_needs_signature(client: httpx.AsyncClient) -> None:
    # The signature is checked first, so an unsigned request learns nothing about which keys exist.
    response = await client.get(f"{FILES_PATH}/users/{USER_ID}/generated/missing.png")

    assert_error(response, 403, "invalid_signature")


async def test_missing_private_file_is_404(client: httpx.AsyncClient, storage: FileStorage) -> None:
    url = storage.url_for(f"users/{USER_ID}/generated/missing.png", base_url=BASE_URL)

    assert_error(await client.get(relative(url)), 404, "file_not_found")


@pytest.mark.parametrize(
    "tamper",
    ["other_key", "later_expiry", "wrong_signature", "no_expires", "text_expires", "padded_signature"],
)
async def test_tampered_signature_is_403(client: httpx.AsyncClient, storage: FileStorage, tamper: str) -> None:
    key = f"users/{USER_ID}/generated/{'b' * 32}.png"
    other_key = f"users/{USER_ID}/generated/{'c' * 32}.png"
    for stored_key in (key, other_key):
        await storage.put(stored_key, b"data", content_type="image/png")
    signed_query = parse_qs(urlsplit(storage.url_for(key, base_url=BASE_URL)).query)
    query = {name: values[0] for name, values in signed_query.items()}
    path = f"{FILES_PATH}/{key}"
    if tamper == "other_key":
        path = f"{FILES_PATH}/{other_key}"
    elif tamper == "later_expiry":
        query["expires"] = str(int(query["expires"]) + 3600)
    elif tamper == "wrong_signature":
        query["signature"] = query["signature"][::-1]
    elif tamper == "no_expires":
        del query["expires"]
    elif tamper == "text_expires":
        query["expires"] = "tomorrow"
    elif tamper == "padded_signature":
        query["signature"] += "="

    response = await client.get(path, params=query)

    assert_error(response, 403, "invalid_signature")


async def test_expired_signature_is_403(client: httpx.AsyncClient, storage: FileStorage) -> None:
    key = f"users/{USER_ID}/generated/{'b' * 32}.png"
    await storage.put(key, b"data", content_type="image/png")
    expires = int(time.time()) - 1

    response = await client.get(
        f"{FILES_PATH}/{key}", params={"expires": str(expires), "signature": storage.signer.signature(key, expires)}
    )

    assert_error(response, 403, "signature_expired")


async def test_no_authorization_header_needed(client: httpx.AsyncClient, storage: FileStorage) -> None:
    key = f"generated/{'d' * 32}.png"
    await storage.put(key, b"data", content_type="image/png")

    response = await client.get(relative(storage.url_for(key, base_url=BASE_URL)), headers={"Authorization": ""})

    assert response.status_code == 200, response.text


# Content types and active content.


async def test_html_bytes_served_as_key_type(client: httpx.AsyncClient, storage: FileStorage) -> None:
    # The type follows the key, never the bytes, and nosniff stops browsers from guessing HTML.
    key = new_key(f"users/{USER_ID}/avatars", "png")
    await storage.put(key, b"<html><script>alert(1)</script></html>", content_type="image/png")

    response = await client.get(f"{FILES_PATH}/{key}")

    assert response.headers["content-type"] == "image/png"
    assert_security_headers(response)


async def test_unknown_type_downloads(client: httpx.AsyncClient, storage: FileStorage) -> None:
    key = "generated/report.html"
    await storage.put(key, b"<svg onload=alert(1)>", content_type="application/octet-stream")

    response = await client.get(relative(storage.url_for(key, base_url=BASE_URL)))

    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    assert response.headers["content-disposition"] == 'attachment; filename="report.html"'
    assert_security_headers(response)


# Traversal and directories.


@pytest.mark.parametrize(
    "path",
    [
        f"{FILES_PATH}/%2e%2e/jwt_secret",
        f"{FILES_PATH}/%2E%2E/jwt_secret",
        f"{FILES_PATH}/users/..%2f..%2fjwt_secret",
        f"{FILES_PATH}/users/%2e%2e%2f%2e%2e%2fjwt_secret",
        f"{FILES_PATH}/%252e%252e/jwt_secret",
        f"{FILES_PATH}/..%5cjwt_secret",
        f"{FILES_PATH}/%2fetc/passwd",
        f"{FILES_PATH}//etc/passwd",
        f"{FILES_PATH}/users/a%00.png",
        f"{FILES_PATH}/.%2e/jwt_secret",
    ],
)
async def test_encoded_traversal_is_404(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)

    assert_error(response, 404, "file_not_found")


@pytest.mark.parametrize(
    "path",
    [
        f"{FILES_PATH}/../jwt_secret",
        f"{FILES_PATH}/users/../../jwt_secret",
        f"{FILES_PATH}/./../jwt_secret",
    ],
)
async def test_literal_traversal_is_404(app: FastAPI, path: str) -> None:
    status, body = await raw_get(app, path)

    assert status == 404
    assert SECRET_FILE_CONTENT not in body


@pytest.mark.parametrize("suffix", ["", "/", "/avatars", "/avatars/"])
async def test_directories_are_not_listed(client: httpx.AsyncClient, storage: FileStorage, suffix: str) -> None:
    key = new_key(f"users/{USER_ID}/avatars", "webp")
    await storage.put(key, b"data", content_type="image/webp")
    directory = f"users/{USER_ID}{suffix}"
    signed = storage.url_for(directory.rstrip("/"), base_url=BASE_URL)

    unsigned_response = await client.get(f"{FILES_PATH}/{directory}")
    signed_response = await client.get(relative(signed))

    assert unsigned_response.status_code in (403, 404)
    assert key.rsplit("/", 1)[-1] not in unsigned_response.text
    assert signed_response.status_code == 404
    assert key.rsplit("/", 1)[-1] not in signed_response.text


async def test_files_root_is_not_listed(client: httpx.AsyncClient) -> None:
    assert (await client.get(f"{FILES_PATH}/")).status_code == 404
    assert (await client.get(FILES_PATH)).status_code == 404
