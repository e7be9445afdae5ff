"""FileStorage on both backends: the local directory, and S3 against a moto server on 127.0.0.1.

The S3 tests send every request to that moto server: the endpoint is set explicitly, the credentials are
dummies passed explicitly (so obstore never queries an instance metadata service), and AWS_* and proxy
variables are removed from the environment while the store is built.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import obstore
import pytest
from moto.server import ThreadedMotoServer
from obstore.store import S3Store

from pocketllm.config import ConfigurationError, Environment, Settings
from pocketllm.storage.keys import (
    InvalidStorageKey,
    content_type_for_key,
    is_public_key,
    new_key,
    validate_key,
    validate_prefix,
)
from pocketllm.storage.service import (
    FILES_PATH,
    FileStorage,
    ObjectStoreFileStorage,
    StorageUnavailable,
    StoredFile,
    build_storage,
)
from pocketllm.storage.signing import InvalidSignature, SignatureExpired, UrlSigner, derive_signing_key

JWT_SECRET = "storage-test-jwt-secret-long-enough-0123456789abcdef"
BASE_URL = "https://api.example.test"
USER_ID = "4f8d2c1e-9a7b-4c3d-8e2f-1a2b3c4d5e6f"
OTHER_USER_ID = "4f8d2c1e-9a7b-4c3d-8e2f-1a2b3c4d5e60"
_ENVIRONMENT_PREFIXES_TO_CLEAR = ("AWS_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": Environment.TEST,
        "data_dir": data_dir,
        "jwt_secret": JWT_SECRET,
        "storage_url": None,
        "storage_s3_endpoint": None,
        "storage_s3_access_key_id": None,
        "storage_s3_secret_access_key": None,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def clean_aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove AWS_* and proxy variables, which obstore would read when it builds an S3 store."""
    for name in list(os.environ):
        if name.startswith(_ENVIRONMENT_PREFIXES_TO_CLEAR):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """An S3 API served by moto on a free port of 127.0.0.1, for this module."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    """A new, empty bucket on the moto server. Moto does not check signatures, so a plain PUT creates it."""
    name = f"pocketllm-test-{uuid.uuid4().hex[:12]}"
    response = httpx.put(f"{moto_endpoint}/{name}", trust_env=False)
    assert response.status_code == 200, response.text
    return name


def s3_settings(tmp_path: Path, endpoint: str, bucket: str, prefix: str = "") -> Settings:
    storage_url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    return make_settings(
        tmp_path / "data",
        storage_url=storage_url,
        storage_s3_endpoint=endpoint,
        storage_s3_access_key_id="moto-test-access-key",
        storage_s3_secret_access_key="moto-test-secret-key",
    )


def raw_s3_store(endpoint: str, bucket: str) -> S3Store:
    return S3Store(
        bucket,
        region="us-east-1",
        access_key_id="moto-test-access-key",
        secret_access_key="moto-test-secret-key",
        endpoint=endpoint,
        client_options={"allow_http": True},
    )


@pytest.fixture(params=["local", "s3"])
async def storage(
    request: pytest.FixtureRequest, tmp_path: Path, clean_aws_environment: None
) -> AsyncIterator[FileStorage]:
    if request.param == "local":
        yield build_storage(make_settings(tmp_path / "data"))
        return
    endpoint: str = request.getfixturevalue("moto_endpoint")
    bucket: str = request.getfixturevalue("s3_bucket")
    yield build_storage(s3_settings(tmp_path, endpoint, bucket, prefix="deployments/test"))


def avatar_key(user_id: str = USER_ID) -> str:
    return new_key(f"users/{user_id}/avatars", "webp")


# Keys and prefixes.


def test_new_key_format() -> None:
    key = new_key(f"users/{USER_ID}/avatars/", ".WEBP")

    directory, name = key.rsplit("/", 1)
    stem, extension = name.split(".")
    assert directory == f"users/{USER_ID}/avatars"
    assert extension == "webp"
    assert len(stem) == 32
    assert int(stem, 16) >= 0


def test_new_key_is_random() -> None:
    keys = {new_key("generated", "png") for _ in range(100)}

    assert len(keys) == 100


def test_new_key_without_prefix() -> None:
    key = new_key("", "png")

    assert "/" not in key
    assert key.endswith(".png")


@pytest.mark.parametrize(("prefix", "extension"), [("../up", "png"), ("/abs", "png"), ("ok", "p/ng"), ("ok", "")])
def test_new_key_rejects_bad_parts(prefix: str, extension: str) -> None:
    with pytest.raises(InvalidStorageKey):
        new_key(prefix, extension)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/users/a.png",
        "users/a.png/",
        "users//a.png",
        "..",
        "users/../secret",
        "users/./a.png",
        ".hidden",
        "users/.hidden",
        "users\\a.png",
        "users/a\x00.png",
        "users/a b.png",
        "users/a%2e%2e.png",
        "users/%2e%2e/a.png",
        "users/ü.png",
        "users/a.png?x=1",
        "users/a#1.png",
        "x" * 256,
        "users/" + "y" * 129,
    ],
)
def test_validate_key_rejects(key: str) -> None:
    with pytest.raises(InvalidStorageKey):
        validate_key(key)


@pytest.mark.parametrize("key", ["a", "a.png", "users/1/avatars/0a.webp", "generated/2026-12/x_y-z.png"])
def test_validate_key_accepts(key: str) -> None:
    assert validate_key(key) == key


def test_validate_prefix_strips_slash() -> None:
    assert validate_prefix(f"users/{USER_ID}/") == f"users/{USER_ID}"
    assert validate_prefix("") == ""


@pytest.mark.parametrize("prefix", ["/", "//", "../", "users//", "users/../"])
def test_validate_prefix_rejects(prefix: str) -> None:
    with pytest.raises(InvalidStorageKey):
        validate_prefix(prefix)


def test_avatar_keys_are_public() -> None:
    assert is_public_key(avatar_key())


@pytest.mark.parametrize(
    "key",
    [
        f"users/{USER_ID}/generated/{'a' * 32}.png",
        f"users/{USER_ID}/avatars/avatar.webp",
        f"users/{USER_ID}/avatars/{'a' * 31}.webp",
        f"users/{USER_ID}/avatars/{'A' * 32}.webp",
        f"users/{USER_ID}/avatars/nested/{'a' * 32}.webp",
        f"users/not-a-uuid/avatars/{'a' * 32}.webp",
        f"generated/{'a' * 32}.png",
    ],
)
def test_other_keys_are_private(key: str) -> None:
    assert not is_public_key(key)


@pytest.mark.parametrize(
    ("key", "content_type"),
    [
        ("a/b.webp", "image/webp"),
        ("a/b.PNG", "image/png"),
        ("a/b.jpg", "image/jpeg"),
        ("a/b.jpeg", "image/jpeg"),
        ("a/b.svg", "application/octet-stream"),
        ("a/b.html", "application/octet-stream"),
        ("a/b", "application/octet-stream"),
        ("a.d/b", "application/octet-stream"),
    ],
)
def test_content_type_follows_extension(key: str, content_type: str) -> None:
    assert content_type_for_key(key) == content_type


# Signed URLs.


def test_signing_key_is_derived() -> None:
    derived = derive_signing_key(JWT_SECRET)

    assert len(derived) == 32
    assert JWT_SECRET.encode() not in derived
    assert derived != derive_signing_key(JWT_SECRET + "x")


def test_signer_accepts_own_signature() -> None:
    signer = UrlSigner(derive_signing_key(JWT_SECRET), ttl_seconds=3600)
    now = time.time()

    query = signer.query_for("generated/a.png", now=now)

    assert int(query["expires"]) == int(now) + 3600
    assert signer.verify("generated/a.png", query["expires"], query["signature"], now=now) == int(now) + 3600


# Each case turns a valid (expires, signature) pair for "generated/a.png" into the arguments to verify.
_INVALID_SIGNATURE_CASES: dict[str, Callable[[str, str], tuple[str, str | None, str | None]]] = {
    "missing expires": lambda expires, signature: ("generated/a.png", None, signature),
    "missing signature": lambda expires, signature: ("generated/a.png", expires, None),
    "empty parameters": lambda expires, signature: ("generated/a.png", "", ""),
    "other key": lambda expires, signature: ("generated/b.png", expires, signature),
    "later expiry": lambda expires, signature: ("generated/a.png", str(int(expires) + 60), signature),
    "wrong signature": lambda expires, signature: ("generated/a.png", expires, "A" * 43),
    "truncated signature": lambda expires, signature: ("generated/a.png", expires, signature[:-1]),
    "negative expiry": lambda expires, signature: ("generated/a.png", "-1", signature),
    "exponent expiry": lambda expires, signature: ("generated/a.png", "1e12", signature),
    "huge expiry": lambda expires, signature: ("generated/a.png", "9" * 40, signature),
    "non-ASCII signature": lambda expires, signature: ("generated/a.png", expires, "\u00fc" * 43),
}


@pytest.mark.parametrize("case", _INVALID_SIGNATURE_CASES.values(), ids=_INVALID_SIGNATURE_CASES.keys())
def test_signer_rejects_invalid(case: Callable[[str, str], tuple[str, str | None, str | None]]) -> None:
    signer = UrlSigner(derive_signing_key(JWT_SECRET), ttl_seconds=3600)
    valid = signer.query_for("generated/a.png")
    key, expires, signature = case(valid["expires"], valid["signature"])

    with pytest.raises(InvalidSignature):
        signer.verify(key, expires, signature)


def test_signer_rejects_other_secret() -> None:
    query = UrlSigner(derive_signing_key("another-secret-of-enough-length-0123456789"), 3600).query_for("a.png")

    with pytest.raises(InvalidSignature):
        UrlSigner(derive_signing_key(JWT_SECRET), 3600).verify("a.png", query["expires"], query["signature"])


def test_signer_reports_expiry() -> None:
    signer = UrlSigner(derive_signing_key(JWT_SECRET), ttl_seconds=60)
    query = signer.query_for("generated/a.png", now=time.time() - 61)

    with pytest.raises(SignatureExpired):
        signer.verify("generated/a.png", query["expires"], query["signature"])


# build_storage.


def test_default_storage_is_local_directory(tmp_path: Path) -> None:
    storage = build_storage(make_settings(tmp_path / "data"))

    assert isinstance(storage, ObjectStoreFileStorage)
    assert (tmp_path / "data" / "files").is_dir()


@pytest.mark.parametrize(
    "storage_url", ["file:///tmp/files", "https://bucket.example.test", "s3://", "s3://bucket?x=1", "s3://b/../up"]
)
def test_build_storage_rejects_urls(tmp_path: Path, storage_url: str) -> None:
    settings = make_settings(
        tmp_path,
        storage_url=storage_url,
        storage_s3_access_key_id="id",
        storage_s3_secret_access_key="secret",
    )

    with pytest.raises(ConfigurationError, match="STORAGE_URL"):
        build_storage(settings)


@pytest.mark.parametrize(
    "credentials",
    [{}, {"storage_s3_access_key_id": "id"}, {"storage_s3_secret_access_key": "secret"}],
)
def test_s3_needs_explicit_credentials(tmp_path: Path, credentials: dict[str, str]) -> None:
    settings = make_settings(
        tmp_path, storage_url="s3://bucket", storage_s3_endpoint="http://127.0.0.1:9", **credentials
    )

    with pytest.raises(ConfigurationError, match="STORAGE_S3_ACCESS_KEY_ID"):
        build_storage(settings)


# Operations, on both backends.


async def test_put_then_get(storage: FileStorage) -> None:
    key = avatar_key()

    await storage.put(key, b"RIFF-webp-bytes", content_type="image/webp")

    assert await storage.get(key) == StoredFile(data=b"RIFF-webp-bytes", content_type="image/webp")


async def test_put_replaces_file(storage: FileStorage) -> None:
    key = "generated/image.png"
    await storage.put(key, b"first", content_type="image/png")

    await storage.put(key, b"second", content_type="image/png")

    stored = await storage.get(key)
    assert stored is not None
    assert stored.data == b"second"


async def test_get_missing_returns_none(storage: FileStorage) -> None:
    assert await storage.get(avatar_key()) is None


async def test_get_directory_returns_none(storage: FileStorage) -> None:
    await storage.put(avatar_key(), b"data", content_type="image/webp")

    assert await storage.get(f"users/{USER_ID}/avatars") is None
    assert await storage.get(f"users/{USER_ID}") is None


@pytest.mark.parametrize(
    ("key", "content_type"),
    [
        ("generated/a.webp", "image/svg+xml"),
        ("generated/a.png", "text/html"),
        ("generated/a.svg", "image/svg+xml"),
        ("generated/a.html", "text/html"),
        ("generated/a.png", "image/webp"),
    ],
)
async def test_put_rejects_mismatched_content_type(storage: FileStorage, key: str, content_type: str) -> None:
    with pytest.raises(ValueError, match="does not match"):
        await storage.put(key, b"<svg/>", content_type=content_type)

    assert await storage.list_keys("") == []


async def test_put_accepts_content_type_parameters(storage: FileStorage) -> None:
    await storage.put("generated/a.png", b"png", content_type="IMAGE/PNG; charset=binary")

    stored = await storage.get("generated/a.png")
    assert stored is not None
    assert stored.content_type == "image/png"


@pytest.mark.parametrize("key", ["../outside.png", "/abs.png", "a/../../b.png", "a\\b.png", "a\x00.png", ""])
async def test_operations_reject_invalid_keys(storage: FileStorage, key: str) -> None:
    with pytest.raises(InvalidStorageKey):
        await storage.put(key, b"x", content_type="image/png")
    with pytest.raises(InvalidStorageKey):
        await storage.get(key)
    with pytest.raises(InvalidStorageKey):
        await storage.delete(key)
    with pytest.raises(InvalidStorageKey):
        storage.url_for(key, base_url=BASE_URL)


async def test_delete_removes_file(storage: FileStorage) -> None:
    key = avatar_key()
    await storage.put(key, b"data", content_type="image/webp")

    await storage.delete(key)

    assert await storage.get(key) is None
    assert await storage.list_keys("") == []


async def test_delete_missing_is_fine(storage: FileStorage) -> None:
    await storage.delete(avatar_key())
    await storage.delete("never/stored/file.png")


async def test_list_keys_by_segment(storage: FileStorage) -> None:
    mine = sorted([avatar_key(), avatar_key(), f"users/{USER_ID}/generated/a.png"])
    other = avatar_key(OTHER_USER_ID)
    for key in [*mine, other, "generated/b.png"]:
        await storage.put(key, b"data", content_type=content_type_for_key(key))

    assert await storage.list_keys(f"users/{USER_ID}/") == mine
    assert await storage.list_keys(f"users/{USER_ID}") == mine
    assert await storage.list_keys(f"users/{USER_ID}/avatars/") == [key for key in mine if "/avatars/" in key]
    assert await storage.list_keys("users/4f8d2c1e") == []
    assert await storage.list_keys("nothing/here") == []
    assert await storage.list_keys("") == sorted([*mine, other, "generated/b.png"])


async def test_delete_prefix_removes_only_that_user(storage: FileStorage) -> None:
    mine = [avatar_key(), f"users/{USER_ID}/generated/a.png", f"users/{USER_ID}/generated/deep/b.png"]
    # OTHER_USER_ID starts with USER_ID's characters, so a plain string prefix would match it too.
    other = avatar_key(OTHER_USER_ID[:-1] + "0")
    assert other.startswith(f"users/{USER_ID[:-1]}")
    for key in [*mine, other]:
        await storage.put(key, b"data", content_type=content_type_for_key(key))

    deleted = await storage.delete_prefix(f"users/{USER_ID}/")

    assert deleted == 3
    assert await storage.list_keys(f"users/{USER_ID}/") == []
    assert await storage.list_keys("") == [other]
    assert await storage.get(other) is not None


async def test_delete_prefix_twice_is_fine(storage: FileStorage) -> None:
    await storage.put(avatar_key(), b"data", content_type="image/webp")

    assert await storage.delete_prefix(f"users/{USER_ID}/") == 1
    assert await storage.delete_prefix(f"users/{USER_ID}/") == 0


async def test_delete_prefix_skips_vanished_file(storage: FileStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    kept = [avatar_key(), f"users/{USER_ID}/generated/a.png"]
    for key in kept:
        await storage.put(key, b"data", content_type=content_type_for_key(key))
    list_keys = storage.list_keys

    async def list_with_vanished_file(prefix: str) -> list[str]:
        # As if a concurrent request deleted this file between the listing and the delete.
        return [*await list_keys(prefix), f"users/{USER_ID}/generated/vanished.png"]

    monkeypatch.setattr(storage, "list_keys", list_with_vanished_file)

    await storage.delete_prefix(f"users/{USER_ID}/")

    assert await list_keys("") == []


async def test_delete_prefix_many_files(storage: FileStorage) -> None:
    keys = [f"users/{USER_ID}/generated/{index:04d}.png" for index in range(30)]
    for key in keys:
        await storage.put(key, b"data", content_type="image/png")

    assert await storage.delete_prefix(f"users/{USER_ID}") == 30
    assert await storage.list_keys("") == []


@pytest.mark.parametrize("prefix", ["", "/", "../users"])
async def test_delete_prefix_rejects_everything(storage: FileStorage, prefix: str) -> None:
    await storage.put("generated/a.png", b"data", content_type="image/png")

    with pytest.raises(InvalidStorageKey):
        await storage.delete_prefix(prefix)

    assert await storage.list_keys("") == ["generated/a.png"]


# URLs, on both backends.


async def test_url_for_public_avatar(storage: FileStorage) -> None:
    key = avatar_key()

    url = storage.url_for(key, base_url=BASE_URL + "/")

    assert url == f"{BASE_URL}{FILES_PATH}/{key}"
    assert storage.url_for(key, base_url=BASE_URL) == url


async def test_url_for_private_key_is_signed(storage: FileStorage) -> None:
    key = f"users/{USER_ID}/generated/{'a' * 32}.png"
    before = int(time.time())

    url = storage.url_for(key, base_url=BASE_URL)

    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{BASE_URL}{FILES_PATH}/{key}"
    assert sorted(query) == ["expires", "signature"]
    expires_at = storage.signer.verify(key, query["expires"][0], query["signature"][0])
    assert before + 3600 <= expires_at <= int(time.time()) + 3600


async def test_url_ttl_follows_setting(tmp_path: Path) -> None:
    storage = build_storage(make_settings(tmp_path / "data", signed_url_ttl_seconds=120))

    url = storage.url_for("generated/a.png", base_url=BASE_URL)

    expires = int(parse_qs(urlsplit(url).query)["expires"][0])
    assert expires - time.time() == pytest.approx(120, abs=5)


# Backend specifics.


async def test_local_files_live_under_data_dir(tmp_path: Path) -> None:
    storage = build_storage(make_settings(tmp_path / "data"))
    key = avatar_key()

    await storage.put(key, b"data", content_type="image/webp")

    assert (tmp_path / "data" / "files" / key).read_bytes() == b"data"


async def test_local_purge_removes_empty_directories(tmp_path: Path) -> None:
    storage = build_storage(make_settings(tmp_path / "data"))
    await storage.put(avatar_key(), b"data", content_type="image/webp")
    await storage.put(avatar_key(OTHER_USER_ID), b"data", content_type="image/webp")

    await storage.delete_prefix(f"users/{USER_ID}/")

    assert sorted(path.name for path in (tmp_path / "data" / "files" / "users").iterdir()) == [OTHER_USER_ID]


async def test_local_backend_failure_is_unavailable(tmp_path: Path) -> None:
    storage = build_storage(make_settings(tmp_path / "data"))
    await storage.put("generated", b"a file where a directory is needed", content_type="application/octet-stream")

    with pytest.raises(StorageUnavailable):
        await storage.put("generated/a.png", b"data", content_type="image/png")


async def test_s3_keys_live_under_url_prefix(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str, clean_aws_environment: None
) -> None:
    prefixed = build_storage(s3_settings(tmp_path, moto_endpoint, s3_bucket, prefix="deployments/test"))
    whole_bucket = build_storage(s3_settings(tmp_path, moto_endpoint, s3_bucket))
    key = avatar_key()

    await prefixed.put(key, b"data", content_type="image/webp")

    assert await whole_bucket.list_keys("") == [f"deployments/test/{key}"]
    assert await prefixed.list_keys("") == [key]


async def test_s3_object_keeps_content_type(
    tmp_path: Path, moto_endpoint: str, s3_bucket: str, clean_aws_environment: None
) -> None:
    storage = build_storage(s3_settings(tmp_path, moto_endpoint, s3_bucket))
    key = avatar_key()

    await storage.put(key, b"data", content_type="image/webp")

    # Read back with a separate client, as a direct download from the bucket would see the object.
    result = await obstore.get_async(raw_s3_store(moto_endpoint, s3_bucket), key)
    assert result.attributes.get("Content-Type") == "image/webp"


async def test_s3_unreachable_is_unavailable(clean_aws_environment: None) -> None:
    # Port 9 (discard) on loopback refuses connections. Retries are off, because the default ones take minutes.
    store = S3Store(
        "bucket",
        region="us-east-1",
        access_key_id="id",
        secret_access_key="secret",
        endpoint="http://127.0.0.1:9",
        client_options={"allow_http": True},
        retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=1)},
    )
    storage = ObjectStoreFileStorage(store, UrlSigner(derive_signing_key(JWT_SECRET), 3600))

    with pytest.raises(StorageUnavailable):
        await storage.get("generated/a.png")
    with pytest.raises(StorageUnavailable):
        await storage.put("generated/a.png", b"data", content_type="image/png")
