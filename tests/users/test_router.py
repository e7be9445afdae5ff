"""/v1/users: profile, onboarding, avatar and account deletion, on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from PIL import Image
from sqlalchemy import func, select, text

from pocketllm.db.base import Base
from pocketllm.db.engine import Database
from pocketllm.users.service import purge_deleted_accounts
from tests.fakes.provider import VALID_API_KEY, FakeProvider
from tests.helpers import DEFAULT_PASSWORD, auth_headers, sign_up


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    return {"allow_private_provider_urls": True}


@pytest.fixture
async def account(client: httpx.AsyncClient, unique_email: str) -> dict[str, Any]:
    return await sign_up(client, unique_email)


@pytest.fixture
def headers(account: dict[str, Any]) -> dict[str, str]:
    return auth_headers(account)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    return body


def png_bytes(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


class TestProfile:
    async def test_get_has_client_fields(
        self, client: httpx.AsyncClient, headers: dict[str, str], account: dict[str, Any]
    ) -> None:
        profile = (await client.get("/v1/users/profile", headers=headers)).json()

        assert profile["id"] == account["user"]["id"]
        assert profile["email"] == account["user"]["email"]
        assert profile["survey_completed"] is False
        assert profile["onboarding"] is None
        assert profile["onboarding_responses"] is None
        assert profile["avatar_url"] is None

    async def test_partial_update_and_null_clears(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        await client.put("/v1/users/profile", headers=headers, json={"full_name": "Ada", "bio": "Analyst"})

        response = await client.put("/v1/users/profile", headers=headers, json={"bio": None, "username": "ada_l"})

        profile = response.json()
        assert response.status_code == 200, response.text
        assert profile["full_name"] == "Ada"
        assert profile["bio"] is None
        assert profile["username"] == "ada_l"

    async def test_preferences_merge_by_key(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        appearance = {
            "themeMode": "dark",
            "followSystemTheme": False,
            "colorSchemeType": "standard",
            "messageRadius": 16,
            "primaryColor": 4286141175,
            "secondaryColor": 4294309365,
        }
        await client.put("/v1/users/profile", headers=headers, json={"preferences": {"appearance": appearance}})

        response = await client.put("/v1/users/profile", headers=headers, json={"preferences": {"language": "fr"}})

        assert response.json()["preferences"] == {"appearance": appearance, "language": "fr"}

    async def test_onboarding_object_and_string(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        answers = {"age_range": "25-34", "language": "de", "custom_key": [1, 2]}

        as_object = (await client.put("/v1/users/profile", headers=headers, json={"onboarding": answers})).json()
        as_string = (
            await client.put("/v1/users/profile", headers=headers, json={"onboarding": '{"language": "it"}'})
        ).json()

        assert as_object["onboarding"] == answers
        assert as_object["onboarding_responses"] == answers
        assert as_string["onboarding"] == {"language": "it"}

    @pytest.mark.parametrize("age", [0, 34, 150])
    async def test_age_range_is_lenient(self, client: httpx.AsyncClient, headers: dict[str, str], age: int) -> None:
        response = await client.put("/v1/users/profile", headers=headers, json={"age": age})

        assert response.json()["age"] == age

    @pytest.mark.parametrize(
        "payload",
        [
            {"age": -1},
            {"age": 151},
            {"username": "a"},
            {"username": "has space"},
            {"full_name": "x" * 201},
            {"onboarding": "not json"},
            {"onboarding": [1, 2]},
            {"date_of_birth": "yesterday"},
        ],
    )
    async def test_invalid_values_are_422(
        self, client: httpx.AsyncClient, headers: dict[str, str], payload: dict[str, Any]
    ) -> None:
        response = await client.put("/v1/users/profile", headers=headers, json=payload)

        assert response.status_code == 422
        assert next(iter(payload)) in response.json()["message"]

    async def test_unknown_fields_are_ignored(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        response = await client.put(
            "/v1/users/profile", headers=headers, json={"full_name": "Ada", "favourite_colour": "blue", "id": "x"}
        )

        assert response.status_code == 200
        assert response.json()["full_name"] == "Ada"

    async def test_date_of_birth_takes_date_part(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        response = await client.put(
            "/v1/users/profile", headers=headers, json={"date_of_birth": "1990-12-10T00:00:00.000Z"}
        )

        assert response.json()["date_of_birth"] == "1990-12-10"

    async def test_username_unique_ignoring_case(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        await client.put("/v1/users/profile", headers=headers, json={"username": "Ada"})
        other = auth_headers(await sign_up(client, "grace@example.com"))

        response = await client.put("/v1/users/profile", headers=other, json={"username": "aDA"})

        assert_error(response, 422, "username_taken")
        keep_own = await client.put("/v1/users/profile", headers=headers, json={"username": "ADA"})
        assert keep_own.status_code == 200

    async def test_get_by_id_only_own(
        self, client: httpx.AsyncClient, headers: dict[str, str], account: dict[str, Any]
    ) -> None:
        own = await client.get(f"/v1/users/{account['user']['id']}", headers=headers)
        other = await client.get(f"/v1/users/{uuid.uuid4()}", headers=headers)
        garbage = await client.get("/v1/users/not-an-id", headers=headers)

        assert own.status_code == 200
        assert own.json()["id"] == account["user"]["id"]
        assert_error(other, 403, "forbidden")
        assert_error(garbage, 403, "forbidden")

    async def test_requires_authentication(self, client: httpx.AsyncClient) -> None:
        for method, path in [
            ("GET", "/v1/users/profile"),
            ("PUT", "/v1/users/profile"),
            ("DELETE", "/v1/users/profile"),
        ]:
            response = await client.request(method, path, json={} if method == "PUT" else None)
            assert_error(response, 401, "not_authenticated")


class TestOnboarding:
    async def test_stores_answers_and_fields(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        payload = {
            "full_name": "Ada Lovelace",
            "username": "ada",
            "date_of_birth": "1990-12-10",
            "profession": "Engineer",
            "heard_from": "Friend",
            "survey_completed": True,
            "age": 34,
            "onboarding": {
                "age_range": "25-34",
                "experience_level": "intermediate",
                "usage_frequency": "daily",
                "interests": ["coding", "research"],
            },
        }

        response = await client.post("/v1/users/profile/onboarding", headers=headers, json=payload)

        profile = response.json()
        assert response.status_code == 200, response.text
        assert profile["survey_completed"] is True
        assert profile["full_name"] == "Ada Lovelace"
        assert profile["username"] == "ada"
        assert profile["onboarding"] == payload["onboarding"]
        assert (await client.get("/v1/users/profile", headers=headers)).json()["onboarding_responses"] == payload[
            "onboarding"
        ]

    async def test_marks_survey_done_by_default(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        response = await client.post(
            "/v1/users/profile/onboarding", headers=headers, json={"onboarding": {"surveyCompleted": True}}
        )

        assert response.json()["survey_completed"] is True


class TestAvatar:
    async def test_upload_returns_loadable_url(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        response = await client.post(
            "/v1/users/profile/avatar", headers=headers, files={"file": ("me.png", png_bytes(), "image/png")}
        )

        assert response.status_code == 200, response.text
        avatar_url = response.json()["avatar_url"]
        assert avatar_url.startswith("http://pocketllm.test/")
        image = await client.get(avatar_url)
        assert image.status_code == 200
        assert image.headers["content-type"].startswith("image/")
        assert Image.open(io.BytesIO(image.content)).size == (64, 48)

    async def test_replacing_deletes_old_file(
        self, client: httpx.AsyncClient, headers: dict[str, str], app: FastAPI, account: dict[str, Any]
    ) -> None:
        first = (
            await client.post(
                "/v1/users/profile/avatar", headers=headers, files={"file": ("a.png", png_bytes(), "image/png")}
            )
        ).json()["avatar_url"]

        second = (
            await client.post(
                "/v1/users/profile/avatar",
                headers=headers,
                files={"file": ("b.png", png_bytes(color=(0, 0, 255)), "image/png")},
            )
        ).json()["avatar_url"]

        assert first != second
        assert (await client.get(first)).status_code == 404
        assert (await client.get(second)).status_code == 200
        keys = await app.state.storage.list_keys(f"users/{account['user']['id']}/")
        assert len(keys) == 1

    async def test_null_avatar_url_removes_it(
        self, client: httpx.AsyncClient, headers: dict[str, str], app: FastAPI, account: dict[str, Any]
    ) -> None:
        uploaded = await client.post(
            "/v1/users/profile/avatar", headers=headers, files={"file": ("a.png", png_bytes(), "image/png")}
        )

        response = await client.put("/v1/users/profile", headers=headers, json={"avatar_url": None})

        assert response.json()["avatar_url"] is None
        assert (await client.get(uploaded.json()["avatar_url"])).status_code == 404
        assert await app.state.storage.list_keys(f"users/{account['user']['id']}/") == []

    @pytest.mark.parametrize(
        ("content", "status", "code"),
        [
            (b"", 400, "empty_file"),
            (b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>', 415, "unsupported_media_type"),
            (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", 415, "unsupported_media_type"),
            (png_bytes()[:60], 400, "invalid_image"),
        ],
    )
    async def test_bad_files_rejected(
        self,
        client: httpx.AsyncClient,
        headers: dict[str, str],
        app: FastAPI,
        account: dict[str, Any],
        content: bytes,
        status: int,
        code: str,
    ) -> None:
        response = await client.post(
            "/v1/users/profile/avatar", headers=headers, files={"file": ("avatar.png", content, "image/png")}
        )

        assert_error(response, status, code)
        assert (await client.get("/v1/users/profile", headers=headers)).json()["avatar_url"] is None
        assert await app.state.storage.list_keys(f"users/{account['user']['id']}/") == []

    @pytest.mark.parametrize("settings_overrides", [{"avatar_max_bytes": 2048}])
    async def test_too_large_is_413(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        noisy = Image.effect_noise((200, 200), 100)
        buffer = io.BytesIO()
        noisy.save(buffer, format="PNG")

        response = await client.post(
            "/v1/users/profile/avatar", headers=headers, files={"file": ("big.png", buffer.getvalue(), "image/png")}
        )

        assert response.status_code == 413
        assert response.json()["code"] in ("payload_too_large", "avatar_too_large")


class TestDeletion:
    async def test_schedules_and_repeating_keeps_date(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        first = await client.delete("/v1/users/profile", headers=headers)
        second = await client.delete("/v1/users/profile", headers=headers)

        body = first.json()
        assert first.status_code == 200
        assert body["status"] == "pending"
        requested = datetime.fromisoformat(body["deletion_requested_at"])
        scheduled = datetime.fromisoformat(body["deletion_scheduled_for"])
        assert scheduled - requested == timedelta(days=30)
        assert second.json() == body
        profile = (await client.get("/v1/users/profile", headers=headers)).json()
        assert profile["deletion_status"] == "pending"

    async def test_cancel(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        scheduled = (await client.delete("/v1/users/profile", headers=headers)).json()

        response = await client.post("/v1/users/profile/deletion/cancel", headers=headers, json={})
        again = await client.post("/v1/users/profile/deletion/cancel", headers=headers, json={})

        body = response.json()
        assert body["canceled"] is True
        assert body["previous_deletion_scheduled_for"] == scheduled["deletion_scheduled_for"]
        assert body["profile"]["deletion_status"] != "pending"
        assert again.json()["canceled"] is False

    async def test_sign_in_cancels(
        self, client: httpx.AsyncClient, headers: dict[str, str], account: dict[str, Any]
    ) -> None:
        await client.post(
            "/v1/users/profile/deletion", headers=headers, json={"requested_at": "x", "scheduled_for": "y"}
        )

        signin = await client.post(
            "/v1/auth/signin", json={"email": account["user"]["email"], "password": DEFAULT_PASSWORD}
        )

        assert signin.json()["account_status"]["deletion_canceled"] is True


async def count_rows(database: Database) -> dict[str, int]:
    counts = {}
    async with database.transaction() as session:
        for table in Base.metadata.sorted_tables:
            counts[table.name] = int(await session.scalar(select(func.count()).select_from(table)) or 0)
    return counts


async def test_purge_deletes_everything(
    client: httpx.AsyncClient,
    app: FastAPI,
    database: Database,
    fake_provider: FakeProvider,
    unique_email: str,
) -> None:
    before = await count_rows(database)
    doomed = await sign_up(client, unique_email)
    headers = auth_headers(doomed)
    user_id = doomed["user"]["id"]
    await client.post("/v1/users/profile/avatar", headers=headers, files={"file": ("a.png", png_bytes(), "image/png")})
    await client.post(
        "/v1/providers/activate",
        headers=headers,
        json={"provider": "openai", "api_key": VALID_API_KEY, "base_url": fake_provider.openai_base_url},
    )
    await client.post("/v1/models/import", headers=headers, json={"provider": "openai", "models": ["gpt-4o-mini"]})
    chat = (await client.post("/v1/chats", headers=headers, json={})).json()
    await client.post(f"/v1/chats/{chat['id']}/messages", headers=headers, json={"content": "hi"})
    survivor = auth_headers(await sign_up(client, "survivor@example.com"))
    await client.delete("/v1/users/profile", headers=headers)

    not_yet = await purge_deleted_accounts(database, app.state.storage, now=datetime.now(UTC) + timedelta(days=29))
    purged = await purge_deleted_accounts(database, app.state.storage, now=datetime.now(UTC) + timedelta(days=31))
    again = await purge_deleted_accounts(database, app.state.storage, now=datetime.now(UTC) + timedelta(days=31))

    assert (not_yet, purged, again) == (0, 1, 0)
    after = await count_rows(database)
    for table, count in after.items():
        expected = before[table] + (1 if table in ("users", "profiles", "auth_sessions", "refresh_tokens") else 0)
        assert count == expected, table
    assert await app.state.storage.list_keys(f"users/{user_id}/") == []
    assert (await client.get("/v1/users/profile", headers=headers)).status_code == 401
    assert (await client.get("/v1/users/profile", headers=survivor)).status_code == 200
    async with database.transaction() as session:
        leftovers = await session.scalar(
            text("SELECT count(*) FROM users WHERE email = :email"), {"email": unique_email}
        )
    assert leftovers == 0


async def test_purge_catches_up_and_skips_cancelled(
    client: httpx.AsyncClient, app: FastAPI, database: Database
) -> None:
    first = auth_headers(await sign_up(client, "first@example.com"))
    second = auth_headers(await sign_up(client, "second@example.com"))
    third = auth_headers(await sign_up(client, "third@example.com"))
    for headers in (first, second, third):
        await client.delete("/v1/users/profile", headers=headers)
    await client.post("/v1/users/profile/deletion/cancel", headers=third, json={})

    # Months of downtime: both due accounts go in one run, the cancelled one stays.
    purged = await purge_deleted_accounts(database, app.state.storage, now=datetime.now(UTC) + timedelta(days=120))

    assert purged == 2
    assert (await client.get("/v1/users/profile", headers=third)).status_code == 200
