"""The OpenAPI document: every access-token error code in the 401 entries, and the streamed reply."""

from __future__ import annotations

from pathlib import Path

import pocketllm.auth.backends.local
import pocketllm.auth.tokens
from pocketllm.app import create_app
from pocketllm.errors import ACCESS_TOKEN_ERROR_CODES, NotAuthenticated
from tests.conftest import make_settings


def _codes_of(error: type[NotAuthenticated]) -> set[str]:
    return {error.code}.union(*(_codes_of(subclass) for subclass in error.__subclasses__()))


def test_access_token_codes_name_real_errors() -> None:
    # The modules that define the access-token and session errors, imported for their subclasses.
    assert pocketllm.auth.tokens.TokenExpired.code in ACCESS_TOKEN_ERROR_CODES
    assert pocketllm.auth.backends.local.SessionRevoked.code in ACCESS_TOKEN_ERROR_CODES

    assert set(ACCESS_TOKEN_ERROR_CODES) <= _codes_of(NotAuthenticated)


def test_profile_401_lists_session_codes(tmp_path: Path) -> None:
    app = create_app(make_settings(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}", tmp_path / "data"))

    description = app.openapi()["paths"]["/v1/users/profile"]["get"]["responses"]["401"]["description"]

    for code in ACCESS_TOKEN_ERROR_CODES:
        assert code in description


def test_post_message_lists_event_stream(tmp_path: Path) -> None:
    app = create_app(make_settings(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}", tmp_path / "data"))

    content = app.openapi()["paths"]["/v1/chats/{chat_id}/messages"]["post"]["responses"]["200"]["content"]

    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/Message"}
    assert content["text/event-stream"]["schema"]["properties"]["event"]["enum"] == [
        "user_message",
        "delta",
        "assistant_message",
        "error",
    ]
    assert "event: delta" in content["text/event-stream"]["example"]
