"""Encryption of secrets at rest (provider API keys) with Fernet, rotatable through MultiFernet."""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class SecretDecryptionFailed(Exception):
    """A stored secret could not be decrypted with any configured ENCRYPTION_KEY."""


class SecretBox:
    """Encrypts with the first key of ENCRYPTION_KEY and decrypts with any of them."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise ValueError("at least one encryption key is required")
        self._fernet = MultiFernet([Fernet(key.encode()) for key in keys])

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as error:
            raise SecretDecryptionFailed("no ENCRYPTION_KEY entry decrypts this secret") from error

    def rotate(self, token: str) -> str:
        """Re-encrypt `token` under the primary key; raises SecretDecryptionFailed if no key fits."""
        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken as error:
            raise SecretDecryptionFailed("no ENCRYPTION_KEY entry decrypts this secret") from error


def preview_secret(secret: str) -> str:
    """Return a recognisable but useless fragment of a key, such as `sk-…9f3a`.

    Long keys show their first three and last four characters; keys under 20 characters show only their
    last two, so a preview never reveals a large part of a short key.
    """
    if len(secret) >= 20:
        return f"{secret[:3]}…{secret[-4:]}"
    if len(secret) >= 8:
        return f"…{secret[-2:]}"
    return "…"
