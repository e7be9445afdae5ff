"""/v1/chats with replies from the fake provider server, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import uuid
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from fastapi import FastAPI
from sqlalchemy import delete, event, func, select, text, update

from pocketllm.chats import service
from pocketllm.db.engine import Database
from pocketllm.models import Chat, ModelConfig, ProviderConfig, StoredMessage
from pocketllm.providers.chat import ChatMessage, ChatRequest
from tests.asgi import disconnect_after_chunks, parse_sse
from tests.fakes.provider import VALID_ANTHROPIC_API_KEY, VALID_API_KEY, FakeProvider
from tests.helpers import auth_headers, sign_up


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    # The fake provider listens on 127.0.0.1, which the outbound guard blocks by default.
    return {"allow_private_provider_urls": True, "provider_read_timeout_seconds": 2.0}


@pytest.fixture
async def headers(client: httpx.AsyncClient, unique_email: str) -> dict[str, str]:
    return auth_headers(await sign_up(client, unique_email))


async def setup_openai_model(
    client: httpx.AsyncClient, headers: dict[str, str], fake: FakeProvider, **settings: Any
) -> dict[str, Any]:
    activated = await client.post(
        "/v1/providers/activate",
        headers=headers,
        json={"provider": "openai", "api_key": VALID_API_KEY, "base_url": fake.openai_base_url},
    )
    assert activated.status_code == 200, activated.text
    imported = await client.post(
        "/v1/models/import",
        headers=headers,
        json={"provider": "openai", "models": ["gpt-4o-mini"], "settings": settings or None},
    )
    assert imported.status_code == 200, imported.text
    model: dict[str, Any] = imported.json()[0]
    return model


async def patch_model(client: httpx.AsyncClient, headers: dict[str, str], model_id: str, **fields: Any) -> None:
    patched = await client.patch(f"/v1/models/{model_id}", headers=headers, json=fields)
    assert patched.status_code == 200, patched.text


async def new_chat(client: httpx.AsyncClient, headers: dict[str, str], **payload: Any) -> dict[str, Any]:
    response = await client.post("/v1/chats", headers=headers, json=payload)
    assert response.status_code == 200, response.text
    chat: dict[str, Any] = response.json()
    return chat


async def send(
    client: httpx.AsyncClient, headers: dict[str, str], chat_id: str, content: str = "Hello!", **extra: Any
) -> httpx.Response:
    payload = {"content": content, "role": "user", "stream": False, **extra}
    return await client.post(f"/v1/chats/{chat_id}/messages", headers=headers, json=payload)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    assert isinstance(body["detail"], str)
    return body


async def messages_of(client: httpx.AsyncClient, headers: dict[str, str], chat_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/chats/{chat_id}", headers=headers)
    assert response.status_code == 200, response.text
    messages: list[dict[str, Any]] = response.json()["messages"]
    return messages


class TestChatRoutes:
    async def test_create_with_empty_body(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        response = await client.post("/v1/chats", headers=headers, json={})

        assert response.status_code == 200
        chat = response.json()
        assert isinstance(chat["id"], str)
        assert chat["title"] == "New chat"
        assert chat["model_config_id"] is None
        assert chat["created_at"]
        assert chat["updated_at"]

    async def test_create_without_body(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        response = await client.post("/v1/chats", headers=headers)

        assert response.status_code == 200, response.text

    async def test_get_returns_chat_and_messages(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        chat = await new_chat(client, headers, title="Plans")

        response = await client.get(f"/v1/chats/{chat['id']}", headers=headers)

        assert response.json() == {"chat": chat, "messages": []}

    async def test_initial_message_names_chat(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        chat = await new_chat(client, headers, initial_message="  How do   tides work?\nAnd why?")

        messages = await messages_of(client, headers, chat["id"])

        assert chat["title"] == "How do tides work?"
        assert [(m["role"], m["content"]) for m in messages] == [("user", "How do   tides work?\nAnd why?")]

    async def test_model_config_must_be_own(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        model = await setup_openai_model(client, headers, fake_provider)
        other = auth_headers(await sign_up(client, "other@example.com"))

        mine = await new_chat(client, headers, model_config_id=model["id"])
        theirs = await client.post("/v1/chats", headers=other, json={"model_config_id": model["id"]})
        garbage = await client.post("/v1/chats", headers=headers, json={"model_config_id": "nope"})

        assert mine["model_config_id"] == model["id"]
        assert_error(theirs, 404, "model_not_found")
        assert_error(garbage, 404, "model_not_found")

    async def test_update_title_and_model(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        model = await setup_openai_model(client, headers, fake_provider)
        chat = await new_chat(client, headers)

        renamed = await client.put(f"/v1/chats/{chat['id']}", headers=headers, json={"title": "Renamed"})
        with_model = await client.put(f"/v1/chats/{chat['id']}", headers=headers, json={"model_config_id": model["id"]})
        cleared = await client.put(f"/v1/chats/{chat['id']}", headers=headers, json={"model_config_id": None})

        assert renamed.json()["title"] == "Renamed"
        assert with_model.json()["model_config_id"] == model["id"]
        assert with_model.json()["title"] == "Renamed"
        assert cleared.json()["model_config_id"] is None

    async def test_delete_removes_messages(
        self, client: httpx.AsyncClient, headers: dict[str, str], database: Database
    ) -> None:
        chat = await new_chat(client, headers, initial_message="hi")

        response = await client.delete(f"/v1/chats/{chat['id']}", headers=headers)

        assert response.status_code == 204
        assert_error(await client.get(f"/v1/chats/{chat['id']}", headers=headers), 404, "chat_not_found")
        async with database.transaction() as session:
            assert await session.scalar(select(func.count()).select_from(StoredMessage)) == 0

    async def test_list_order_and_pages(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        created = [await new_chat(client, headers, title=f"chat {index}") for index in range(5)]
        # A new message moves the oldest chat to the top.
        await client.post(
            f"/v1/chats/{created[0]['id']}/messages", headers=headers, json={"content": "note", "role": "assistant"}
        )

        everything = (await client.get("/v1/chats", headers=headers)).json()
        first_page = (await client.get("/v1/chats", headers=headers, params={"limit": 2})).json()
        second_page = (await client.get("/v1/chats", headers=headers, params={"limit": 2, "offset": 2})).json()

        assert everything[0]["id"] == created[0]["id"]
        assert len(everything) == 5
        assert [chat["id"] for chat in first_page + second_page] == [chat["id"] for chat in everything[:4]]

    async def test_messages_list_pages(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        chat = await new_chat(client, headers)
        for index in range(4):
            await client.post(
                f"/v1/chats/{chat['id']}/messages", headers=headers, json={"content": f"m{index}", "role": "assistant"}
            )

        page = (
            await client.get(f"/v1/chats/{chat['id']}/messages", headers=headers, params={"limit": 2, "offset": 1})
        ).json()

        assert [message["content"] for message in page] == ["m1", "m2"]

    @pytest.mark.parametrize("chat_id", ["not-a-uuid", str(uuid.UUID(int=0))])
    async def test_unknown_chat_is_404(self, client: httpx.AsyncClient, headers: dict[str, str], chat_id: str) -> None:
        assert_error(await client.get(f"/v1/chats/{chat_id}", headers=headers), 404, "chat_not_found")
        assert_error(
            await client.put(f"/v1/chats/{chat_id}", headers=headers, json={"title": "x"}), 404, "chat_not_found"
        )
        assert_error(await client.delete(f"/v1/chats/{chat_id}", headers=headers), 404, "chat_not_found")
        assert_error(await send(client, headers, chat_id), 404, "chat_not_found")

    async def test_chat_deleted_between_reads_is_404(
        self, app: FastAPI, client: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        chat = await new_chat(client, headers)
        for index in range(2):
            stored = await client.post(
                f"/v1/chats/{chat['id']}/messages", headers=headers, json={"content": f"m{index}", "role": "assistant"}
            )
            assert stored.status_code == 200, stored.text
        engine = app.state.database.engine.sync_engine
        deleted: list[str] = []

        def delete_chat_first(connection: Any, cursor: Any, statement: str, *_: Any) -> None:
            # Runs as the message list is about to be read: another connection deletes the chat and commits.
            if not deleted and "FROM messages" in statement and "ORDER BY messages.sequence" in statement:
                deleted.append(chat["id"])
                with engine.begin() as other:
                    other.execute(delete(Chat).where(Chat.id == uuid.UUID(chat["id"])))

        event.listen(engine, "before_cursor_execute", delete_chat_first)
        try:
            response = await client.get(f"/v1/chats/{chat['id']}", headers=headers)
        finally:
            event.remove(engine, "before_cursor_execute", delete_chat_first)

        assert deleted == [chat["id"]]
        assert_error(response, 404, "chat_not_found")

    @pytest.mark.parametrize(
        "payload",
        [{"content": ""}, {"content": "   "}, {"content": "hi", "role": "tool"}, {"role": "user"}, {"content": 5}],
    )
    async def test_bad_message_is_422(
        self, client: httpx.AsyncClient, headers: dict[str, str], payload: dict[str, Any]
    ) -> None:
        chat = await new_chat(client, headers)

        response = await client.post(f"/v1/chats/{chat['id']}/messages", headers=headers, json=payload)

        assert response.status_code == 422
        assert response.json()["code"] == "validation_error"
        assert await messages_of(client, headers, chat["id"]) == []


class TestReplies:
    async def test_reply_is_stored_and_returned(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        fake_provider.reply_text = "Hi there, human."
        chat = await new_chat(client, headers)

        response = await send(client, headers, chat["id"], "Hello!")

        assert response.status_code == 200, response.text
        reply = response.json()
        assert reply["role"] == "assistant"
        assert reply["content"] == "Hi there, human."
        assert reply["status"] == "complete"
        metadata = reply["metadata"]
        assert metadata["provider"] == "openai"
        assert metadata["model"] == "gpt-4o-mini"
        assert metadata["finish_reason"] == "stop"
        assert metadata["usage"]["completion_tokens"] == 3
        assert isinstance(metadata["latency_ms"], int)
        messages = await messages_of(client, headers, chat["id"])
        assert [(m["role"], m["content"]) for m in messages] == [("user", "Hello!"), ("assistant", "Hi there, human.")]
        assert [m["sequence"] for m in messages] == [1, 2]
        chats = (await client.get("/v1/chats", headers=headers)).json()
        assert chats[0]["title"] == "Hello!"

    async def test_sends_system_prompt_history_and_settings(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await setup_openai_model(
            client, headers, fake_provider, system_prompt="Be brief.", temperature=0.3, max_tokens=256
        )
        chat = await new_chat(client, headers)
        fake_provider.queue_replies("First answer")
        await send(client, headers, chat["id"], "First question")

        await send(client, headers, chat["id"], "Second question")

        body = fake_provider.last_request("/chat/completions").body
        assert body["model"] == "gpt-4o-mini"
        assert body["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "First question"},
            {"role": "assistant", "content": "First answer"},
            {"role": "user", "content": "Second question"},
        ]
        assert body["temperature"] == 0.3
        assert body["max_completion_tokens"] == 256
        assert "stream" not in body or body["stream"] is False

    async def test_failed_question_left_out_of_history(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        chat = await new_chat(client, headers)
        fake_provider.queue_replies("First answer")
        await send(client, headers, chat["id"], "First question")
        fake_provider.fail_next("/chat/completions", status=500)
        failed = await send(client, headers, chat["id"], "Question that failed")
        assert failed.status_code == 502

        await send(client, headers, chat["id"], "Question sent again")

        body = fake_provider.last_request("/chat/completions").body
        assert body["messages"] == [
            {"role": "user", "content": "First question"},
            {"role": "assistant", "content": "First answer"},
            {"role": "user", "content": "Question sent again"},
        ]

    async def test_history_is_cut_to_context_window(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        model = await setup_openai_model(client, headers, fake_provider, max_tokens=100)
        await patch_model(client, headers, model["id"], context_window=400)
        chat = await new_chat(client, headers)
        for index in range(6):
            await client.post(
                f"/v1/chats/{chat['id']}/messages",
                headers=headers,
                json={"content": f"old message {index} " + "word " * 40, "role": "assistant"},
            )

        await send(client, headers, chat["id"], "newest question")

        sent = fake_provider.last_request("/chat/completions").body["messages"]
        assert sent[-1] == {"role": "user", "content": "newest question"}
        assert 1 <= len(sent) - 1 < 6
        assert sent[-2]["content"].startswith("old message 5")

    async def test_max_output_tokens_caps_max_tokens(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        model = await setup_openai_model(client, headers, fake_provider, max_tokens=500)
        await patch_model(client, headers, model["id"], max_output_tokens=120)
        chat = await new_chat(client, headers)

        await send(client, headers, chat["id"], "Short answer, please")

        assert fake_provider.last_request("/chat/completions").body["max_completion_tokens"] == 120

    async def test_anthropic_reply(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await client.post(
            "/v1/providers/activate",
            headers=headers,
            json={
                "provider": "anthropic",
                "api_key": VALID_ANTHROPIC_API_KEY,
                "base_url": fake_provider.anthropic_base_url,
            },
        )
        await client.post(
            "/v1/models/import",
            headers=headers,
            json={
                "provider": "anthropic",
                "models": ["claude-3-5-haiku-20241022"],
                "settings": {"system_prompt": "Be kind."},
            },
        )
        fake_provider.reply_text = "Bonjour"
        chat = await new_chat(client, headers)

        response = await send(client, headers, chat["id"], "Salut")

        assert response.status_code == 200, response.text
        assert response.json()["content"] == "Bonjour"
        assert response.json()["metadata"]["finish_reason"] == "end_turn"
        body = fake_provider.last_request("/v1/messages").body
        assert body["system"] == "Be kind."
        assert body["messages"] == [{"role": "user", "content": "Salut"}]
        assert body["max_tokens"] > 0

    async def test_without_model_is_400_and_stores_nothing(
        self, client: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        chat = await new_chat(client, headers)

        response = await send(client, headers, chat["id"])

        assert_error(response, 400, "model_not_configured")
        assert await messages_of(client, headers, chat["id"]) == []

    async def test_inactive_provider_is_400(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        await client.delete("/v1/providers/openai", headers=headers)
        chat = await new_chat(client, headers)

        assert_error(await send(client, headers, chat["id"]), 400, "provider_not_configured")

    @pytest.mark.parametrize("case", ["deleted", "deactivated", "key_missing", "unknown_provider"])
    async def test_unusable_provider_stores_nothing(
        self,
        client: httpx.AsyncClient,
        headers: dict[str, str],
        fake_provider: FakeProvider,
        database: Database,
        case: str,
    ) -> None:
        model = await setup_openai_model(client, headers, fake_provider)
        chat = await new_chat(client, headers)
        if case == "deleted":
            assert (await client.delete("/v1/providers/openai", headers=headers)).status_code == 204
        elif case == "deactivated":
            patched = await client.patch("/v1/providers/openai", headers=headers, json={"is_active": False})
            assert patched.status_code == 200, patched.text
        else:
            async with database.transaction() as session:
                if case == "key_missing":
                    await session.execute(update(ProviderConfig).values(api_key_encrypted=None))
                else:
                    # Both rows still name a provider that this version of the server no longer has.
                    await session.execute(update(ProviderConfig).values(provider="retired-provider"))
                    await session.execute(
                        update(ModelConfig)
                        .where(ModelConfig.id == uuid.UUID(model["id"]))
                        .values(provider="retired-provider")
                    )
        calls = len(fake_provider.requests)

        response = await send(client, headers, chat["id"])

        assert_error(response, 400, "provider_not_configured")
        assert await messages_of(client, headers, chat["id"]) == []
        assert len(fake_provider.requests) == calls

    async def test_unreadable_key_marks_message_failed(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, database: Database
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        chat = await new_chat(client, headers)
        # Encrypted with a key that this server does not have.
        foreign_key = Fernet(Fernet.generate_key()).encrypt(b"sk-other-0123456789").decode()
        async with database.transaction() as session:
            await session.execute(update(ProviderConfig).values(api_key_encrypted=foreign_key))
        calls = len(fake_provider.requests)

        response = await send(client, headers, chat["id"], "Are you there?")

        body = assert_error(response, 400, "provider_key_unreadable")
        stored = await messages_of(client, headers, chat["id"])
        assert [message["content"] for message in stored] == ["Are you there?"]
        assert stored[0]["metadata"]["reply_error"]["code"] == body["code"]
        assert len(fake_provider.requests) == calls

    async def test_deleted_model_falls_back_to_default(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        model = await setup_openai_model(client, headers, fake_provider)
        chat = await new_chat(client, headers, model_config_id=model["id"])
        await client.delete(f"/v1/models/{model['id']}", headers=headers)

        chat_after = (await client.get(f"/v1/chats/{chat['id']}", headers=headers)).json()["chat"]
        response = await send(client, headers, chat["id"])

        assert chat_after["model_config_id"] is None
        assert_error(response, 400, "model_not_configured")

    async def test_chat_model_wins_over_default(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        default = await setup_openai_model(client, headers, fake_provider)
        imported = await client.post(
            "/v1/models/import", headers=headers, json={"provider": "openai", "models": ["gpt-4o"]}
        )
        chosen = imported.json()[0]
        assert default["is_default"]
        assert not chosen["is_default"]
        pinned = await new_chat(client, headers, model_config_id=chosen["id"])
        unpinned = await new_chat(client, headers)

        pinned_reply = await send(client, headers, pinned["id"])
        pinned_model = fake_provider.last_request("/chat/completions").body["model"]
        unpinned_reply = await send(client, headers, unpinned["id"])
        unpinned_model = fake_provider.last_request("/chat/completions").body["model"]

        assert pinned_reply.json()["metadata"]["model_config_id"] == chosen["id"]
        assert pinned_model == "gpt-4o"
        assert unpinned_reply.json()["metadata"]["model_config_id"] == default["id"]
        assert unpinned_model == "gpt-4o-mini"

    async def test_deactivated_chat_model_does_not_fall_back(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        imported = await client.post(
            "/v1/models/import", headers=headers, json={"provider": "openai", "models": ["gpt-4o"]}
        )
        chosen = imported.json()[0]
        chat = await new_chat(client, headers, model_config_id=chosen["id"])
        deactivated = await client.patch(f"/v1/models/{chosen['id']}", headers=headers, json={"is_active": False})
        assert deactivated.status_code == 200, deactivated.text

        response = await send(client, headers, chat["id"])

        assert_error(response, 400, "model_not_configured")
        assert await messages_of(client, headers, chat["id"]) == []
        assert [r for r in fake_provider.requests if r.path.endswith("/chat/completions")] == []

    @pytest.mark.parametrize("role", ["assistant", "system"])
    async def test_non_user_messages_are_only_stored(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, role: str
    ) -> None:
        chat = await new_chat(client, headers)

        response = await client.post(
            f"/v1/chats/{chat['id']}/messages",
            headers=headers,
            json={"content": "from the device", "role": role, "metadata": {"on_device": True}},
        )

        assert response.status_code == 200
        assert response.json()["role"] == role
        assert response.json()["metadata"] == {"on_device": True}
        assert fake_provider.requests == []

    async def test_concurrent_posts_keep_every_message(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        chat = await new_chat(client, headers)

        responses = await asyncio.gather(*(send(client, headers, chat["id"], f"question {i}") for i in range(5)))

        assert [response.status_code for response in responses] == [200] * 5
        messages = await messages_of(client, headers, chat["id"])
        assert [m["sequence"] for m in messages] == list(range(1, 11))
        assert sorted(m["content"] for m in messages if m["role"] == "user") == [f"question {i}" for i in range(5)]
        assert sum(m["role"] == "assistant" for m in messages) == 5
        again = await messages_of(client, headers, chat["id"])
        assert [m["id"] for m in again] == [m["id"] for m in messages]

    async def test_disconnect_keeps_reply(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, app: FastAPI
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        chat = await new_chat(client, headers)
        fake_provider.fail_next("/chat/completions", delay_seconds=1)

        request = asyncio.create_task(send(client, headers, chat["id"], "are you there?"))
        await asyncio.to_thread(fake_provider.wait_for_requests, "/chat/completions", count=1, timeout=10)
        request.cancel()
        await app.state.replies.drain(timeout=10)

        messages = await messages_of(client, headers, chat["id"])
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[1]["content"] == fake_provider.reply_text


class TestProviderFailures:
    @pytest.mark.parametrize(
        ("failure", "status", "code"),
        [
            ({"status": 401}, 400, "provider_auth_failed"),
            ({"status": 429, "retry_after": 7}, 429, "provider_rate_limited"),
            ({"status": 400, "error_code": "context_length_exceeded"}, 400, "context_length_exceeded"),
            ({"status": 500}, 502, "provider_unavailable"),
            ({"status": 503}, 502, "provider_unavailable"),
            ({"malformed_json": True}, 502, "provider_unavailable"),
            ({"delay_seconds": 5}, 504, "provider_timeout"),
        ],
    )
    async def test_failure_is_mapped_and_recorded(
        self,
        client: httpx.AsyncClient,
        headers: dict[str, str],
        fake_provider: FakeProvider,
        failure: dict[str, Any],
        status: int,
        code: str,
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        chat = await new_chat(client, headers)
        fake_provider.fail_next("/chat/completions", **failure)

        response = await send(client, headers, chat["id"], "please answer")

        body = assert_error(response, status, code)
        assert VALID_API_KEY not in response.text
        if code == "provider_rate_limited":
            assert response.headers["retry-after"] == "7"
        messages = await messages_of(client, headers, chat["id"])
        assert [m["role"] for m in messages] == ["user"]
        assert messages[0]["metadata"]["reply_error"]["code"] == code
        assert body["detail"]
        retried = await send(client, headers, chat["id"], "please answer")
        assert retried.status_code == 200, retried.text

    async def test_connection_refused_is_502(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        await client.patch(
            "/v1/providers/openai", headers=headers, json={"base_url": "http://127.0.0.1:1/v1", "verify": False}
        )
        chat = await new_chat(client, headers)

        assert_error(await send(client, headers, chat["id"]), 502, "provider_unavailable")

    async def test_error_text_never_echoes_key(
        self,
        client: httpx.AsyncClient,
        headers: dict[str, str],
        fake_provider: FakeProvider,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        caplog.set_level(logging.DEBUG)
        await setup_openai_model(client, headers, fake_provider)
        chat = await new_chat(client, headers)
        fake_provider.fail_next("/chat/completions", status=500, message=f"bad key {VALID_API_KEY} used")

        response = await send(client, headers, chat["id"])

        assert response.status_code == 502
        assert VALID_API_KEY not in response.text
        assert VALID_API_KEY not in caplog.text


class TestStreaming:
    async def test_event_sequence(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        fake_provider.stream_chunks = ["Hel", "lo ", "world"]
        chat = await new_chat(client, headers)

        response = await send(client, headers, chat["id"], "stream please", stream=True)

        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(response.text)
        names = [name for name, _ in events if name != "comment"]
        assert names[0] == "user_message"
        assert names[-1] == "assistant_message"
        assert set(names[1:-1]) == {"delta"}
        assert "".join(data["content"] for name, data in events if name == "delta") == "Hello world"
        user_message = events[0][1]
        final = events[-1][1]
        assert user_message["content"] == "stream please"
        assert final["content"] == "Hello world"
        assert final["status"] == "complete"
        stored = await messages_of(client, headers, chat["id"])
        assert [m["id"] for m in stored] == [user_message["id"], final["id"]]
        assert fake_provider.last_request("/chat/completions").body["stream"] is True

    async def test_provider_error_is_error_event(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        chat = await new_chat(client, headers)
        fake_provider.fail_next("/chat/completions", status=429, retry_after=3)

        response = await send(client, headers, chat["id"], stream=True)

        events = [(name, data) for name, data in parse_sse(response.text) if name != "comment"]
        assert [name for name, _ in events] == ["user_message", "error"]
        assert events[1][1]["code"] == "provider_rate_limited"
        assert events[1][1]["retry_after"] == 3
        stored = await messages_of(client, headers, chat["id"])
        assert stored[0]["metadata"]["reply_error"]["code"] == "provider_rate_limited"

    @pytest.mark.parametrize("failure", [{"break_stream_after": 2}, {"stream_error_after": 2}])
    async def test_broken_stream_keeps_text(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, failure: dict[str, Any]
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        fake_provider.stream_chunks = ["one ", "two ", "three ", "four"]
        chat = await new_chat(client, headers)
        fake_provider.fail_next("/chat/completions", **failure)

        response = await send(client, headers, chat["id"], stream=True)

        final = next(data for name, data in parse_sse(response.text) if name == "assistant_message")
        assert final["content"] == "one two "
        assert final["status"] == "incomplete"
        assert final["metadata"]["incomplete"] is True
        stored = await messages_of(client, headers, chat["id"])
        assert stored[1]["status"] == "incomplete"

    @pytest.mark.parametrize(
        "settings_overrides",
        [{"allow_private_provider_urls": True, "provider_read_timeout_seconds": 5.0, "stream_heartbeat_seconds": 0.1}],
    )
    async def test_quiet_stream_sends_heartbeats(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        chat = await new_chat(client, headers)
        fake_provider.fail_next("/chat/completions", stall_stream_after=1, delay_seconds=0.6)

        response = await send(client, headers, chat["id"], stream=True)

        events = parse_sse(response.text)
        assert ("comment", "heartbeat") in events
        assert events[-1][0] == "assistant_message"

    async def test_disconnect_mid_stream_keeps_reply(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, app: FastAPI
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        fake_provider.stream_chunks = ["a", "b", "c", "d"]
        chat = await new_chat(client, headers)
        fake_provider.fail_next("/chat/completions", stall_stream_after=1, delay_seconds=0.5)

        received = await disconnect_after_chunks(
            app,
            f"/v1/chats/{chat['id']}/messages",
            headers=headers,
            payload={"content": "long one", "role": "user", "stream": True},
            chunks=2,
        )
        await app.state.replies.drain(timeout=10)

        assert len(received) == 2
        stored = await messages_of(client, headers, chat["id"])
        assert [(m["role"], m["content"], m["status"]) for m in stored] == [
            ("user", "long one", "complete"),
            ("assistant", "abcd", "complete"),
        ]

    async def test_disconnect_ends_silent_stream(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, app: FastAPI
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        fake_provider.stream_chunks = ["a", "b"]
        chat = await new_chat(client, headers)
        # Far longer than the test runs: only the disconnect can end the response in time.
        fake_provider.fail_next("/chat/completions", stall_stream_after=1, delay_seconds=600)

        received = await disconnect_after_chunks(
            app,
            f"/v1/chats/{chat['id']}/messages",
            headers=headers,
            payload={"content": "and then?", "role": "user", "stream": True},
            chunks=2,
        )

        assert len(received) == 2
        # The response ended while the reply still waits on the provider; releasing the stall completes it.
        assert [m["role"] for m in await messages_of(client, headers, chat["id"])] == ["user"]
        fake_provider.reset()
        await app.state.replies.drain(timeout=10)
        stored = await messages_of(client, headers, chat["id"])
        assert [(m["role"], m["content"], m["status"]) for m in stored] == [
            ("user", "and then?", "complete"),
            ("assistant", "ab", "complete"),
        ]

    @pytest.mark.parametrize(
        "settings_overrides", [{"allow_private_provider_urls": True, "reply_max_characters": 1000}]
    )
    async def test_long_stream_cut_at_limit(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        fake_provider.stream_chunks = ["x" * 600, "y" * 600, "z" * 600]
        chat = await new_chat(client, headers)

        response = await send(client, headers, chat["id"], stream=True)

        events = [(name, data) for name, data in parse_sse(response.text) if name != "comment"]
        streamed = "".join(data["content"] for name, data in events if name == "delta")
        final = events[-1][1]
        assert streamed == "x" * 600 + "y" * 400
        assert events[-1][0] == "assistant_message"
        assert final["content"] == streamed
        assert final["status"] == "incomplete"
        assert final["metadata"]["error"] == "provider_response_too_large"
        stored = await messages_of(client, headers, chat["id"])
        assert stored[1]["content"] == streamed

    @pytest.mark.parametrize(
        "settings_overrides", [{"allow_private_provider_urls": True, "reply_max_characters": 1000}]
    )
    async def test_long_reply_cut_at_limit(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        fake_provider.reply_text = "w" * 1500
        chat = await new_chat(client, headers)

        response = await send(client, headers, chat["id"])

        assert response.status_code == 200, response.text
        reply = response.json()
        assert reply["content"] == "w" * 1000
        assert reply["status"] == "incomplete"
        assert reply["metadata"]["error"] == "provider_response_too_large"
        assert reply["metadata"]["finish_reason"] is None

    async def test_deltas_cleaned_like_stored_reply(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        # Halves of one surrogate pair in two chunks, then a lone surrogate and a NUL, neither of which can be
        # stored, and the first half of a pair whose second half never comes.
        fake_provider.stream_chunks = ["A\ud83d", "\ude00B", "C\udc00", "D\x00E", "F\ud83d"]
        chat = await new_chat(client, headers)

        response = await send(client, headers, chat["id"], stream=True)

        events = [(name, data) for name, data in parse_sse(response.text) if name != "comment"]
        streamed = "".join(data["content"] for name, data in events if name == "delta")
        stored = await messages_of(client, headers, chat["id"])
        assert streamed == "A\U0001f600BC\ufffdDEF\ufffd"
        assert events[-1][1]["content"] == streamed
        assert stored[1]["content"] == streamed

    async def test_open_stream_drops_prompt(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, app: FastAPI
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        chat = await new_chat(client, headers)
        marker = f"earlier message {uuid.uuid4().hex}"
        assert (await send(client, headers, chat["id"], content=marker)).status_code == 200
        fake_provider.stream_chunks = ["a", "b"]
        fake_provider.fail_next("/chat/completions", stall_stream_after=1, delay_seconds=600)

        # The response ends after the first delta, while the reply task still waits on the provider.
        await disconnect_after_chunks(
            app,
            f"/v1/chats/{chat['id']}/messages",
            headers=headers,
            payload={"content": "and then?", "role": "user", "stream": True},
            chunks=2,
        )
        gc.collect()
        live = gc.get_objects()
        prompts = [obj for obj in live if isinstance(obj, ChatRequest) and marker in repr(obj.messages)]
        prompt_messages = [obj for obj in live if isinstance(obj, ChatMessage) and marker in obj.content]
        del live
        sent = fake_provider.last_request("/chat/completions")
        fake_provider.reset()
        await app.state.replies.drain(timeout=10)

        # The provider got the history, and the open stream kept no copy of it as objects.
        assert marker in json.dumps(sent.body)
        assert prompts == []
        assert prompt_messages == []


async def test_provider_asked_for_uncompressed_body(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
) -> None:
    await setup_openai_model(client, headers, fake_provider)
    chat = await new_chat(client, headers)

    assert (await send(client, headers, chat["id"])).status_code == 200
    assert (await send(client, headers, chat["id"], stream=True)).status_code == 200

    requests = fake_provider.requests_to("/chat/completions")
    assert [request.headers["accept-encoding"] for request in requests] == ["identity", "identity"]


async def test_chat_count_matches_messages(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    chat = await new_chat(client, headers)
    path = f"/v1/chats/{chat['id']}"

    async def post(index: int) -> None:
        response = await client.post(
            f"{path}/messages", headers=headers, json={"role": "system", "content": f"note {index}"}
        )
        assert response.status_code == 200, response.text

    async def read() -> tuple[int, int]:
        body = (await client.get(path, headers=headers)).json()
        return body["chat"]["message_count"], len(body["messages"])

    # Reads run while messages are being stored, and each must list what its chat row counts.
    results = await asyncio.gather(*(post(index) for index in range(20)), *(read() for _ in range(40)))
    pairs = [result for result in results if result is not None]  # post() returns None

    assert len(pairs) == 40
    mismatched = [(count, listed) for count, listed in pairs if count != listed]
    assert mismatched == []


async def test_other_users_get_404(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
) -> None:
    await setup_openai_model(client, headers, fake_provider)
    chat = await new_chat(client, headers, initial_message="private")
    other = auth_headers(await sign_up(client, "snoop@example.com"))
    path = f"/v1/chats/{chat['id']}"

    assert (await client.get("/v1/chats", headers=other)).json() == []
    assert_error(await client.get(path, headers=other), 404, "chat_not_found")
    assert_error(await client.get(f"{path}/messages", headers=other), 404, "chat_not_found")
    assert_error(await client.put(path, headers=other, json={"title": "mine now"}), 404, "chat_not_found")
    assert_error(await send(client, other, chat["id"]), 404, "chat_not_found")
    assert_error(await client.delete(path, headers=other), 404, "chat_not_found")
    assert len(await messages_of(client, headers, chat["id"])) == 1
    assert fake_provider.requests_to("/chat/completions") == []


async def wait_for_lock_waiter(database: Database) -> None:
    """Return once a session of the test database waits for a lock, as pg_stat_activity shows it."""
    query = text(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    async with asyncio.timeout(10):
        while True:
            async with database.engine.connect() as connection:
                if await connection.scalar(query):
                    return
            await asyncio.sleep(0.01)


@pytest.mark.postgres_only
async def test_rename_racing_delete_gets_404(
    client: httpx.AsyncClient, headers: dict[str, str], database: Database
) -> None:
    chat = await new_chat(client, headers)
    async with database.engine.connect() as deleting:
        # The delete holds the chat's row lock until it commits below, while the rename waits for it.
        await deleting.execute(delete(Chat).where(Chat.id == uuid.UUID(chat["id"])))
        rename = asyncio.create_task(client.put(f"/v1/chats/{chat['id']}", headers=headers, json={"title": "renamed"}))
        await wait_for_lock_waiter(database)
        await deleting.commit()

    assert_error(await rename, 404, "chat_not_found")


@pytest.mark.postgres_only
async def test_model_change_racing_delete_gets_404(
    client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, database: Database
) -> None:
    model = await setup_openai_model(client, headers, fake_provider)
    chat = await new_chat(client, headers)
    async with database.engine.connect() as deleting:
        await deleting.execute(delete(ModelConfig).where(ModelConfig.id == uuid.UUID(model["id"])))
        change = asyncio.create_task(
            client.put(f"/v1/chats/{chat['id']}", headers=headers, json={"model_config_id": model["id"]})
        )
        await wait_for_lock_waiter(database)
        await deleting.commit()

    assert_error(await change, 404, "model_not_found")
    assert (await client.get(f"/v1/chats/{chat['id']}", headers=headers)).json()["chat"]["model_config_id"] is None


async def test_requires_authentication(client: httpx.AsyncClient) -> None:
    for method, path in [("GET", "/v1/chats"), ("POST", "/v1/chats"), ("GET", f"/v1/chats/{uuid.uuid4()}")]:
        response = await client.request(method, path)
        assert response.status_code == 401
        assert response.json()["code"] == "not_authenticated"


async def post_nested_chat(
    client: httpx.AsyncClient, headers: dict[str, str], *, levels: int, content_type: str = "application/json"
) -> httpx.Response:
    """Create a chat with a body nested `levels` deep: the body is the first level, the innermost object empty."""
    body = '{"title": "deep", "extra": ' * (levels - 1) + "{}" + "}" * (levels - 1)
    return await client.post("/v1/chats", headers={**headers, "Content-Type": content_type}, content=body)


# 40 levels: past the 32 that request bodies may nest.
DEEP_NESTING: Any = 1
for _ in range(40):
    DEEP_NESTING = [DEEP_NESTING]


class TestHardening:
    async def test_unstorable_reply_text_is_cleaned(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        fake_provider.reply_text = "half \x00end"
        chat = await new_chat(client, headers)

        response = await send(client, headers, chat["id"])

        assert response.status_code == 200, response.text
        assert "\x00" not in response.json()["content"]
        assert response.json()["content"] == "half end"
        assert len(await messages_of(client, headers, chat["id"])) == 2

    async def test_failed_turn_is_not_repeated_in_prompt(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        chat = await new_chat(client, headers)
        fake_provider.fail_next("/chat/completions", status=500)
        await send(client, headers, chat["id"], "please answer")

        await send(client, headers, chat["id"], "please answer")

        sent = fake_provider.last_request("/chat/completions").body["messages"]
        assert sent == [{"role": "user", "content": "please answer"}]

    async def test_clients_cannot_forge_server_metadata(
        self, client: httpx.AsyncClient, headers: dict[str, str]
    ) -> None:
        chat = await new_chat(client, headers)

        response = await client.post(
            f"/v1/chats/{chat['id']}/messages",
            headers=headers,
            json={"content": "x", "role": "assistant", "metadata": {"reply_error": {"code": "fake"}, "mine": 1}},
        )

        assert response.json()["metadata"] == {"mine": 1}

    @pytest.mark.parametrize(
        ("payload", "error_type"),
        [
            (b'{"content": "hi", "metadata": {"x": "\\ud800"}}', "string_not_storable"),
            ({"content": "hi", "metadata": {"x": DEEP_NESTING}}, "json_too_deep"),
            (b'{"content": "hi", "metadata": {"x": NaN}}', "number_not_storable"),
            (b'{"content": "hi", "metadata": {"x": [1, -Infinity]}}', "number_not_storable"),
            (b'{"content": "hi", "metadata": {"x": 1e400}}', "number_not_storable"),
        ],
    )
    async def test_unstorable_input_is_422(
        self,
        client: httpx.AsyncClient,
        headers: dict[str, str],
        fake_provider: FakeProvider,
        payload: dict[str, Any] | bytes,
        error_type: str,
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        chat = await new_chat(client, headers)
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()

        response = await client.post(
            f"/v1/chats/{chat['id']}/messages",
            headers={**headers, "Content-Type": "application/json"},
            content=body,
        )

        assert response.status_code == 422, response.text
        assert response.json()["code"] == "validation_error"
        assert [error["type"] for error in response.json()["detail"]] == [error_type]
        assert (await client.get(f"/v1/chats/{chat['id']}", headers=headers)).status_code == 200
        # Nothing was stored, so the chat's history still reads.
        later = await client.post(f"/v1/chats/{chat['id']}/messages", headers=headers, json={"content": "later"})
        assert later.status_code == 200, later.text

    async def test_nesting_at_limit_accepted(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        response = await post_nested_chat(client, headers, levels=32)

        assert response.status_code == 200, response.text

    @pytest.mark.parametrize(
        ("levels", "content_type"),
        [(33, "application/json"), (5000, "application/json"), (33, "Application/JSON; charset=utf-8")],
    )
    async def test_nesting_past_limit_is_422(
        self, client: httpx.AsyncClient, headers: dict[str, str], levels: int, content_type: str
    ) -> None:
        response = await post_nested_chat(client, headers, levels=levels, content_type=content_type)

        assert response.status_code == 422, response.text
        assert [error["type"] for error in response.json()["detail"]] == ["json_too_deep"]

    async def test_finite_numbers_are_stored(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        chat = await new_chat(client, headers)
        body = b'{"role": "assistant", "content": "NaN and Infinity", "metadata": {"big": 1e300, "small": -2.5E-300}}'

        response = await client.post(
            f"/v1/chats/{chat['id']}/messages",
            headers={**headers, "Content-Type": "application/json"},
            content=body,
        )

        assert response.status_code == 200, response.text
        assert response.json()["metadata"] == {"big": 1e300, "small": -2.5e-300}

    async def test_huge_offset_is_422(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        chat = await new_chat(client, headers)

        for path in ("/v1/chats", f"/v1/chats/{chat['id']}/messages"):
            response = await client.get(path, headers=headers, params={"offset": 2**63})
            assert response.status_code == 422

    async def test_shutdown_records_interrupted_reply(
        self, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, app: FastAPI
    ) -> None:
        await setup_openai_model(client, headers, fake_provider)
        chat = await new_chat(client, headers)
        fake_provider.fail_next("/chat/completions", delay_seconds=5)

        request = asyncio.create_task(send(client, headers, chat["id"], "slow one"))
        await asyncio.to_thread(fake_provider.wait_for_requests, "/chat/completions", count=1, timeout=10)
        await app.state.replies.shutdown(timeout=0.1)
        response = await request

        assert_error(response, 503, "reply_interrupted")
        messages = await messages_of(client, headers, chat["id"])
        assert [m["role"] for m in messages] == ["user"]
        assert messages[0]["metadata"]["reply_error"]["code"] == "reply_interrupted"


@pytest.mark.parametrize(
    "settings_overrides",
    [{"allow_private_provider_urls": True, "database_pool_size": 1, "database_pool_timeout_seconds": 0.2}],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_busy_pool_reply_gets_503(
    app: FastAPI, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider, stream: bool
) -> None:
    await setup_openai_model(client, headers, fake_provider)
    chat = await new_chat(client, headers)
    fake_provider.fail_next("/chat/completions", delay_seconds=60)
    sending = asyncio.create_task(send(client, headers, chat["id"], stream=stream))
    await asyncio.to_thread(fake_provider.wait_for_requests, "/chat/completions")

    # The provider responds while the test has the only pooled connection checked out, so the reply cannot
    # be stored.
    async with app.state.database.read_connection():
        fake_provider.reset()
        response = await sending

    if stream:
        events = [(name, data) for name, data in parse_sse(response.text) if name != "comment"]
        assert [events[0][0], events[-1][0]] == ["user_message", "error"]
        assert events[-1][1] == {**events[-1][1], "code": "database_busy", "status": 503, "retry_after": 1}
    else:
        body = assert_error(response, 503, "database_busy")
        assert response.headers["Retry-After"] == "1"
        assert "request id" not in body["detail"]


@pytest.mark.postgres_only
async def test_reply_prepared_in_one_statement(
    app: FastAPI, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
) -> None:
    await setup_openai_model(client, headers, fake_provider)
    chat = await new_chat(client, headers)
    fake_provider.reply_text = "First answer"
    assert (await send(client, headers, chat["id"], "First question")).status_code == 200
    engine = app.state.database.engine.sync_engine
    statements: list[str] = []
    parameters: list[Any] = []

    def record(connection: Any, cursor: Any, statement: str, sent: Any, *_: Any) -> None:
        statements.append(statement)
        parameters.append(sent)

    event.listen(engine, "before_cursor_execute", record)
    try:
        response = await send(client, headers, chat["id"], "Second question")
    finally:
        event.remove(engine, "before_cursor_execute", record)

    assert response.status_code == 200, response.text
    # The session check comes from the in-memory cache. One statement reads the model, stores the user's
    # message and reads the history, and one stores the reply.
    assert len(statements) == 2
    assert "JOIN model_configs" in statements[0]
    assert "INSERT INTO messages" in statements[0]
    assert "FROM messages" in statements[0]
    assert "JOIN model_configs" not in statements[1]
    # The first commits without waiting for the WAL flush; the stored reply waits for it.
    assert "set_config(" in statements[0]
    assert [value for value in parameters[0] if value in ("synchronous_commit", "off")] == ["synchronous_commit", "off"]
    assert "set_config(" not in statements[1]
    sent = fake_provider.last_request("/chat/completions").body["messages"]
    assert [message["content"] for message in sent] == ["First question", "First answer", "Second question"]


async def test_sqlite_reply_one_trip_per_transaction(
    app: FastAPI,
    client: httpx.AsyncClient,
    headers: dict[str, str],
    fake_provider: FakeProvider,
    thread_trips: list[str],
) -> None:
    if app.state.database.dialect == "postgresql":
        pytest.skip("runs against SQLite only")
    await setup_openai_model(client, headers, fake_provider)
    chat = await new_chat(client, headers)
    fake_provider.reply_text = "First answer"
    assert (await send(client, headers, chat["id"], "First question")).status_code == 200
    thread_trips.clear()

    response = await send(client, headers, chat["id"], "Second question")

    assert response.status_code == 200, response.text
    # The session check, then the reply's start (the model, the numbered user message and the history) and
    # the stored reply, each in one trip to the connection's thread with its BEGIN and its COMMIT.
    assert thread_trips == [
        "_execute_fetchall",
        "BEGIN IMMEDIATE; _call_then_commit",
        "BEGIN IMMEDIATE; _call_then_commit",
    ]
    sent = fake_provider.last_request("/chat/completions").body["messages"]
    assert [message["content"] for message in sent] == ["First question", "First answer", "Second question"]


@pytest.mark.postgres_only
async def test_commit_setting_stays_in_statement(
    app: FastAPI, client: httpx.AsyncClient, headers: dict[str, str], fake_provider: FakeProvider
) -> None:
    await setup_openai_model(client, headers, fake_provider)
    chat = await new_chat(client, headers)
    user_id = uuid.UUID((await client.get("/v1/users/profile", headers=headers)).json()["id"])
    database: Database = app.state.database

    async with database.statements() as connection:
        start = await service.start_reply(connection, user_id, uuid.UUID(chat["id"]), content="Hi", metadata=None)
        # The next statement on the same connection, as the pool would hand it to another request.
        setting = (await connection.exec_driver_sql("SHOW synchronous_commit")).scalar()

    assert start.message.sequence == 1
    assert setting == "on"
