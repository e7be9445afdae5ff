"""Signed file URLs: an HMAC-SHA256 over the key and the expiry time, checked by the file route."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from pocketllm.errors import Forbidden

# Makes the signing key differ from every other key derived from JWT_SECRET. Changing the version
# invalidates every signed URL at once.
_SIGNING_KEY_LABEL = b"pocketllm file URL signing v1"
# A Unix time in seconds has 10 digits until the year 2286. The bound keeps int() cheap on hostile input.
_MAX_EXPIRES_DIGITS = 12


class InvalidSignature(Forbidden):
    code = "invalid_signature"
    default_message = "The file URL is missing a valid signature; request a fresh URL from the API."


class SignatureExpired(Forbidden):
    code = "signature_expired"
    default_message = "The file URL has expired; request a fresh URL from the API."


def derive_signing_key(jwt_secret: str) -> bytes:
    """Derive the URL signing key from JWT_SECRET, so deployments need no extra secret."""
    return hmac.new(jwt_secret.encode(), _SIGNING_KEY_LABEL, hashlib.sha256).digest()


class UrlSigner:
    """Signer of storage keys with an expiry time, and checker of those signatures."""

    def __init__(self, signing_key: bytes, ttl_seconds: int) -> None:
        self._signing_key = signing_key
        self.ttl_seconds = ttl_seconds

    def signature(self, key: str, expires: int) -> str:
        """Return the unpadded base64url HMAC-SHA256 of `key` and `expires` (a Unix time in seconds)."""
        message = f"{key}\n{expires}".encode()
        digest = hmac.new(self._signing_key, message, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def query_for(self, key: str, *, now: float | None = None) -> dict[str, str]:
        """Return the `expires` and `signature` query parameters for a URL valid for `ttl_seconds`."""
        expires = int(now if now is not None else time.time()) + self.ttl_seconds
        return {"expires": str(expires), "signature": self.signature(key, expires)}

    def verify(self, key: str, expires: str | None, signature: str | None, *, now: float | None = None) -> int:
        """Return the expiry time of a valid signature for `key`.

        Raises InvalidSignature when a parameter is missing or the signature does not match, and
        SignatureExpired when a matching signature is past its expiry time. The signature is checked
        first, so an edited expiry time reads as invalid, not as expired.
        """
        # compare_digest raises TypeError for non-ASCII strings, so those are rejected here.
        if not expires or not signature or not signature.isascii():
            raise InvalidSignature()
        if len(expires) > _MAX_EXPIRES_DIGITS or not expires.isascii() or not expires.isdigit():
            raise InvalidSignature()

        expires_at = int(expires)
        if not hmac.compare_digest(self.signature(key, expires_at), signature):
            raise InvalidSignature()
        if expires_at <= (now if now is not None else time.time()):
            raise SignatureExpired()
        return expires_at
