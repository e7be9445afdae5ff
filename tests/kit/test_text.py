from __future__ import annotations

import pytest

from pocketllm.kit.text import ends_with_high_surrogate, storable_text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plain text", "plain text"),
        ("a\x00b\x00", "ab"),
        ("A\ud83d\ude00B", "A\U0001f600B"),
        ("lone low \udc00", "lone low \ufffd"),
        ("lone high \ud83d!", "lone high \ufffd!"),
        ("\udc00\ud83d", "\ufffd\ufffd"),
        ("\x00\ud83d\x00\ude00", "\U0001f600"),
    ],
)
def test_storable_text_cases(text: str, expected: str) -> None:
    cleaned = storable_text(text)

    assert cleaned == expected
    assert cleaned.encode("utf-8").decode("utf-8") == cleaned


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", False),
        ("abc", False),
        ("a\ud83d", True),
        ("a" + chr(0xDBFF), True),
        ("a\ude00", False),
        ("\U0001f600", False),
    ],
)
def test_ends_with_high_surrogate_cases(text: str, expected: bool) -> None:
    assert ends_with_high_surrogate(text) is expected
