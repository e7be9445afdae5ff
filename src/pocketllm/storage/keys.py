"""Storage keys: their syntax, fresh random keys, which keys are public and the content type of each key."""

from __future__ import annotations

import re
import secrets

MAX_KEY_LENGTH = 255
MAX_SEGMENT_LENGTH = 128

# A segment starts with a letter or digit, so ".", "..", hidden files and empty segments are all rejected.
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_EXTENSION = re.compile(r"[a-z0-9]{1,10}")

# Public keys: the avatar directory of one user, and a file name of 32 hex digits (128 random bits) as
# produced by `new_key`. Any other key is private.
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_PUBLIC_KEY = re.compile(rf"users/{_UUID}/avatars/[0-9a-f]{{32}}\.[a-z0-9]{{1,10}}")

# The only types a stored file is ever served with, chosen by the key's extension. None of them is a
# type that browsers run as active content (HTML, SVG, XML, JavaScript, PDF).
CONTENT_TYPES: dict[str, str] = {
    "webp": "image/webp",
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
}
DEFAULT_CONTENT_TYPE = "application/octet-stream"


class InvalidStorageKey(ValueError):
    """A key or prefix that is not a relative path of allowed segments."""


def validate_key(key: str) -> str:
    """Return `key` unchanged, or raise InvalidStorageKey unless it is a relative path of allowed segments.

    Allowed: segments of ASCII letters, digits, `.`, `_` and `-` joined by `/`, each starting with a letter
    or digit. Rejected, among others: a leading or trailing `/`, `..`, backslashes, `%`, NUL and spaces.
    """
    if not key:
        raise InvalidStorageKey("The storage key is empty.")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidStorageKey(f"The storage key is longer than {MAX_KEY_LENGTH} characters.")
    for segment in key.split("/"):
        _validate_segment(segment, key)
    return key


def validate_prefix(prefix: str) -> str:
    """Return `prefix` without its trailing `/`, or raise InvalidStorageKey if it is invalid.

    An empty prefix stays empty and covers every key. Prefixes match whole segments, so `users/1/` covers
    `users/1/a.png` but not `users/10/a.png`.
    """
    stripped = prefix.removesuffix("/")
    if stripped:
        validate_key(stripped)
    elif prefix:
        raise InvalidStorageKey("The storage prefix '/' is not relative. Use '' to cover every key.")
    return stripped


def _validate_segment(segment: str, key: str) -> None:
    if len(segment) > MAX_SEGMENT_LENGTH:
        raise InvalidStorageKey(f"A segment of the storage key {key!r} is longer than {MAX_SEGMENT_LENGTH} characters.")
    if not _SEGMENT.fullmatch(segment):
        raise InvalidStorageKey(
            f"The storage key {key!r} is invalid: each '/'-separated segment must start with a letter or digit "
            "and contain only ASCII letters, digits, '.', '_' and '-'."
        )


def new_key(prefix: str, extension: str) -> str:
    """Return a fresh key `<prefix>/<32 random hex digits>.<extension>`, e.g. for `users/<id>/avatars`.

    The 128 random bits make the key unguessable, which is what lets avatar keys be served without a
    signature. `prefix` may end with `/`, and `extension` may start with `.`.
    """
    directory = validate_prefix(prefix)
    suffix = extension.removeprefix(".").lower()
    if not _EXTENSION.fullmatch(suffix):
        raise InvalidStorageKey(f"The file extension {extension!r} is invalid: use 1 to 10 letters or digits.")
    name = f"{secrets.token_hex(16)}.{suffix}"
    return validate_key(f"{directory}/{name}" if directory else name)


def is_public_key(key: str) -> bool:
    """Return whether `key` is served without a signature: an avatar key as made by `new_key`."""
    return _PUBLIC_KEY.fullmatch(key) is not None


def content_type_for_key(key: str) -> str:
    """Return the content type that a file stored under `key` is served with, from its extension."""
    name = key.rsplit("/", 1)[-1]
    _, dot, extension = name.rpartition(".")
    if not dot:
        return DEFAULT_CONTENT_TYPE
    return CONTENT_TYPES.get(extension.lower(), DEFAULT_CONTENT_TYPE)
