"""Text from providers made storable: PostgreSQL rejects U+0000, and no driver encodes a lone surrogate."""

from __future__ import annotations


def storable_text(text: str) -> str:
    """Return `text` without NUL characters, with surrogate pairs joined and unpaired surrogates replaced.

    A JSON string can escape a character outside the Basic Multilingual Plane as two surrogates, and a
    provider that cuts its text into UTF-16 units can send them in two chunks. Joined again, such a pair is
    the one character it encodes. A surrogate without its other half becomes U+FFFD.
    """
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


def ends_with_high_surrogate(text: str) -> bool:
    """Tell whether `text` ends with the first half of a surrogate pair, whose second half may follow."""
    return bool(text) and "\ud800" <= text[-1] <= "\udbff"
