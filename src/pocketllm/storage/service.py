"""File storage for avatars and generated images, on obstore: a local directory or an S3-compatible bucket.

Database rows keep storage keys, never URLs. `FileStorage.url_for` renders an absolute URL for each
response, and every URL points at this server's own file route (`FILES_PATH`), for both backends:

* Public keys are avatar keys made by `new_key` under `users/<user id>/avatars/`. Their file name
  carries 128 random bits, so knowing the URL is the permission. The URL has no signature and stays
  the same for as long as the avatar exists, so clients can cache the image.
* Every other key is private. Its URL carries `expires` and `signature` query parameters: an
  HMAC-SHA256 over the key and the expiry time, with a key derived from JWT_SECRET. The URL is valid
  for SIGNED_URL_TTL_SECONDS.

S3 presigned URLs are not used: the route adds the same security headers for both backends, and the
S3 endpoint (often a private MinIO or moto address) need not be reachable from phones. The cost is
that file bytes pass through this server.

The content type of a stored file follows from its key's extension (`CONTENT_TYPES`), because
obstore's local store cannot keep per-object attributes. An uploaded file therefore cannot choose to be
served as HTML or SVG.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode, urlsplit

import obstore
import structlog
from obstore.exceptions import BaseError as ObstoreError
from obstore.exceptions import NotFoundError as ObstoreNotFoundError
from obstore.store import LocalStore, S3Store

from pocketllm.config import ConfigurationError, Settings
from pocketllm.errors import ServiceUnavailable
from pocketllm.storage.keys import (
    InvalidStorageKey,
    content_type_for_key,
    is_public_key,
    new_key,
    validate_key,
    validate_prefix,
)
from pocketllm.storage.signing import UrlSigner, derive_signing_key

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Config

__all__ = [
    "FILES_PATH",
    "FileStorage",
    "InvalidStorageKey",
    "ObjectStoreFileStorage",
    "StorageUnavailable",
    "StoredFile",
    "build_storage",
    "is_public_key",
    "new_key",
]

log = structlog.get_logger(__name__)

# The path of the file route; `url_for` and the router both use it.
FILES_PATH = "/v1/files"
LOCAL_FILES_DIRECTORY = "files"
# S3 deletes up to 1000 keys per DeleteObjects request.
_DELETE_BATCH_SIZE = 1000
_S3_CONNECT_TIMEOUT = timedelta(seconds=10)
_S3_REQUEST_TIMEOUT = timedelta(seconds=60)

# A local read of a missing key raises the built-in FileNotFoundError, not obstore's NotFoundError.
_NOT_FOUND_ERRORS = (FileNotFoundError, ObstoreNotFoundError)


class StorageUnavailable(ServiceUnavailable):
    code = "storage_unavailable"
    default_message = "File storage is unavailable; try again later."


@dataclass(frozen=True, slots=True)
class StoredFile:
    data: bytes
    content_type: str


class FileStorage(ABC):
    """Key-value file storage with URLs that clients can load without an Authorization header.

    One instance serves the whole process (`app.state.storage`). Keys must pass `validate_key`, and
    methods raise InvalidStorageKey for any other key. Backend failures raise StorageUnavailable (503).
    """

    def __init__(self, signer: UrlSigner) -> None:
        self.signer = signer

    @abstractmethod
    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        """Store `data` under `key`, replacing any file there.

        Raises ValueError unless `content_type` is the type that the key's extension is served with.
        """

    @abstractmethod
    async def get(self, key: str) -> StoredFile | None:
        """Return the file stored under `key`, or None when there is none."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Delete the file under `key`. A missing file is not an error."""

    @abstractmethod
    async def delete_prefix(self, prefix: str) -> int:
        """Delete every file under `prefix` (whole segments, e.g. `users/<id>/`) and return how many."""

    @abstractmethod
    async def list_keys(self, prefix: str) -> list[str]:
        """Return the sorted keys under `prefix`, which matches whole segments. An empty prefix lists every key."""

    def url_for(self, key: str, *, base_url: str) -> str:
        """Return the absolute URL of `key` on this server's file route, signed unless the key is public."""
        validate_key(key)
        url = f"{base_url.rstrip('/')}{FILES_PATH}/{quote(key, safe='/')}"
        if is_public_key(key):
            return url
        return f"{url}?{urlencode(self.signer.query_for(key))}"


class ObjectStoreFileStorage(FileStorage):
    """FileStorage on an obstore LocalStore or S3Store."""

    def __init__(self, store: LocalStore | S3Store, signer: UrlSigner) -> None:
        super().__init__(signer)
        self._store = store
        # The local store rejects object attributes. S3 keeps the content type, for downloads from the bucket.
        self._stores_attributes = isinstance(store, S3Store)

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        validate_key(key)
        expected = content_type_for_key(key)
        if content_type.split(";", 1)[0].strip().lower() != expected:
            raise ValueError(
                f"The content type {content_type!r} does not match the key {key!r}, which is served as {expected}."
            )

        with _backend_errors("put", key):
            if self._stores_attributes:
                await obstore.put_async(self._store, key, data, attributes={"Content-Type": expected})
            else:
                await obstore.put_async(self._store, key, data)

    async def get(self, key: str) -> StoredFile | None:
        validate_key(key)
        with _backend_errors("get", key):
            try:
                result = await obstore.get_async(self._store, key)
                data = await result.bytes_async()
            except _NOT_FOUND_ERRORS:
                # Also raised by the local store for a key that names a directory, e.g. `users/<id>`.
                return None
        return StoredFile(data=bytes(data), content_type=content_type_for_key(key))

    async def delete(self, key: str) -> None:
        validate_key(key)
        with _backend_errors("delete", key), suppress(*_NOT_FOUND_ERRORS):
            await obstore.delete_async(self._store, key)

    async def delete_prefix(self, prefix: str) -> int:
        directory = validate_prefix(prefix)
        if not directory:
            raise InvalidStorageKey("delete_prefix requires a non-empty prefix, so it never deletes every stored file.")

        keys = await self.list_keys(directory)
        for start in range(0, len(keys), _DELETE_BATCH_SIZE):
            batch = keys[start : start + _DELETE_BATCH_SIZE]
            with _backend_errors("delete_prefix", directory):
                try:
                    await obstore.delete_async(self._store, batch)
                except _NOT_FOUND_ERRORS:
                    # The local store fails the whole batch when one file vanished since the listing, e.g.
                    # deleted by a concurrent request. Deleting one by one skips the missing files.
                    for key in batch:
                        await self.delete(key)
        if keys:
            log.info("storage.prefix_deleted", prefix=directory, files=len(keys))
        return len(keys)

    async def list_keys(self, prefix: str) -> list[str]:
        directory = validate_prefix(prefix)
        keys: list[str] = []
        with _backend_errors("list", directory):
            async for chunk in obstore.list(self._store, directory or None):
                keys.extend(meta["path"] for meta in chunk)
        return sorted(keys)


@contextmanager
def _backend_errors(operation: str, key: str) -> Iterator[None]:
    """Turn a backend failure into StorageUnavailable, logged with the operation and key."""
    try:
        yield
    except (ObstoreError, OSError) as error:
        log.error("storage.failed", operation=operation, key=key, error_type=type(error).__name__, error=str(error))
        raise StorageUnavailable() from error


def build_storage(settings: Settings) -> FileStorage:
    """Build the storage that STORAGE_URL names: unset is the directory DATA_DIR/files, `s3://` is a bucket."""
    if not settings.jwt_secret:
        raise ConfigurationError("JWT_SECRET is required to sign file URLs; resolve the settings first.")
    signer = UrlSigner(derive_signing_key(settings.jwt_secret), settings.signed_url_ttl_seconds)

    if not settings.storage_url:
        directory = settings.data_dir / LOCAL_FILES_DIRECTORY
        # automatic_cleanup removes directories that a delete leaves empty, e.g. a purged user's folder.
        store = LocalStore(directory, mkdir=True, automatic_cleanup=True)
        log.info("storage.configured", backend="local", directory=str(directory))
        return ObjectStoreFileStorage(store, signer)

    s3_store = _build_s3_store(settings.storage_url, settings)
    log.info("storage.configured", backend="s3", bucket=s3_store.config.get("bucket"), prefix=s3_store.prefix)
    return ObjectStoreFileStorage(s3_store, signer)


def _build_s3_store(storage_url: str, settings: Settings) -> S3Store:
    parts = urlsplit(storage_url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ConfigurationError(
            "STORAGE_URL must be s3://<bucket>[/<prefix>]; leave it unset to store files under DATA_DIR/files."
        )
    try:
        prefix = validate_prefix(parts.path.strip("/"))
    except InvalidStorageKey as error:
        raise ConfigurationError(f"STORAGE_URL has an invalid prefix: {error}") from error

    access_key_id = settings.storage_s3_access_key_id
    secret_access_key = settings.storage_s3_secret_access_key
    if not access_key_id or not secret_access_key:
        # Both keys are required because with them object_store (under obstore) signs with static credentials
        # and never queries the cloud instance metadata service (AmazonS3Builder::build in aws/builder.rs).
        raise ConfigurationError(
            "STORAGE_URL=s3://... needs STORAGE_S3_ACCESS_KEY_ID and STORAGE_S3_SECRET_ACCESS_KEY."
        )

    endpoint = settings.storage_s3_endpoint
    client_options: ClientConfig = {
        "connect_timeout": _S3_CONNECT_TIMEOUT,
        "timeout": _S3_REQUEST_TIMEOUT,
        # Plain HTTP only for an http:// endpoint, e.g. a MinIO container on a private network.
        "allow_http": bool(endpoint and endpoint.startswith("http://")),
    }
    config: S3Config = {
        "region": settings.storage_s3_region,
        "access_key_id": access_key_id,
        "secret_access_key": secret_access_key,
    }
    if endpoint:
        config["endpoint"] = endpoint
    # NOTE: obstore also reads AWS_* environment variables for any option not passed here. AWS_SESSION_TOKEN,
    # for example, is sent along with the keys above.
    return S3Store(parts.netloc, prefix=prefix or None, config=config, client_options=client_options)
