from __future__ import annotations

import pytest
from cryptography.fernet import Fernet

from pocketllm.kit.crypto import SecretBox, SecretDecryptionFailed, preview_secret


def test_round_trip() -> None:
    box = SecretBox([Fernet.generate_key().decode()])

    token = box.encrypt("sk-live-1234567890abcdef")

    assert "sk-live" not in token
    assert box.decrypt(token) == "sk-live-1234567890abcdef"


def test_old_key_still_decrypts_after_rotation() -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    token = SecretBox([old]).encrypt("secret-value")
    box = SecretBox([new, old])

    rotated = box.rotate(token)

    assert SecretBox([new]).decrypt(rotated) == "secret-value"
    with pytest.raises(SecretDecryptionFailed):
        SecretBox([new]).decrypt(token)


def test_unknown_key_fails_cleanly() -> None:
    token = SecretBox([Fernet.generate_key().decode()]).encrypt("secret-value")

    with pytest.raises(SecretDecryptionFailed):
        SecretBox([Fernet.generate_key().decode()]).decrypt(token)


@pytest.mark.parametrize(
    ("secret", "preview"),
    [
        ("sk-proj-abcdefghijklmnop1234", "sk-…1234"),
        ("short-key-123", "…23"),
        ("abc", "…"),
    ],
)
def test_preview_reveals_little(secret: str, preview: str) -> None:
    assert preview_secret(secret) == preview
