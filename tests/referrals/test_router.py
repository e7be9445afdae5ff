"""/v1/waitlist, /v1/referral and sign-ups with a personal invite code, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from pocketllm.db.engine import Database
from pocketllm.models import InviteCode, OutgoingMail, Profile, Referral, User, WaitlistApplication
from pocketllm.referrals import service as referrals
from pocketllm.users.service import delete_account_rows
from tests.helpers import DEFAULT_PASSWORD, auth_headers, bearer, sign_up

IDN_EMAIL = "  Grace@Bücher.Example "
IDN_CANONICAL = "grace@xn--bcher-kva.example"


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == code
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


def assert_validation_error(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == "validation_error"
    assert isinstance(body["message"], str)
    return body


async def mails_to(database: Database, address: str) -> list[OutgoingMail]:
    async with database.read_only() as session:
        return list(await session.scalars(select(OutgoingMail).where(OutgoingMail.to_address == address)))


async def referral_rows(database: Database, referrer_id: str) -> list[Referral]:
    async with database.read_only() as session:
        return list(await session.scalars(select(Referral).where(Referral.referrer_id == uuid.UUID(referrer_id))))


async def uses_of(database: Database, code: str) -> int:
    async with database.read_only() as session:
        invite = await session.scalar(select(InviteCode).where(InviteCode.code == code))
    assert invite is not None
    return invite.uses_count


async def personal_code(client: httpx.AsyncClient, headers: dict[str, str]) -> str:
    response = await client.get("/v1/referral/list", headers=headers)
    assert response.status_code == 200, response.text
    code: str = response.json()["invite_code"]
    return code


async def sign_up_with_code(client: httpx.AsyncClient, email: str, code: str) -> httpx.Response:
    return await client.post(
        "/v1/auth/signup", json={"email": email, "password": DEFAULT_PASSWORD, "invite_code": code}
    )


class TestWaitlist:
    async def test_creates_entry(self, client: httpx.AsyncClient) -> None:
        payload = {
            "name": "Ada L",
            "email": "Ada@Example.com",
            "occupation": "Engineer",
            "use_case": "testing",
            "links": ["https://x.y"],
            "source": "app_auth",
            "metadata": {"platform": "flutter_app", "build": "release"},
        }

        response = await client.post("/v1/waitlist", json=payload)

        assert response.status_code == 201, response.text
        body = response.json()
        assert body["email"] == "ada@example.com"
        assert body["full_name"] == "Ada L"
        assert body["name"] == "Ada L"
        assert body["occupation"] == "Engineer"
        assert body["motivation"] is None
        assert body["use_case"] == "testing"
        assert body["links"] == ["https://x.y"]
        assert body["source"] == "app_auth"
        assert body["metadata"] == {"platform": "flutter_app", "build": "release"}
        assert body["status"] == "pending"
        assert uuid.UUID(body["id"])
        assert body["created_at"]

    async def test_resubmission_updates_one_row(self, client: httpx.AsyncClient, database: Database) -> None:
        first = await client.post(
            "/v1/waitlist", json={"full_name": "Grace", "email": IDN_EMAIL, "occupation": "Admiral"}
        )
        second = await client.post(
            "/v1/waitlist", json={"email": IDN_CANONICAL.upper(), "motivation": "COBOL", "full_name": "Grace H"}
        )

        assert first.status_code == 201, first.text
        assert second.status_code == 201, second.text
        assert second.json()["id"] == first.json()["id"]
        assert second.json()["email"] == IDN_CANONICAL
        assert second.json()["full_name"] == "Grace H"
        assert second.json()["occupation"] == "Admiral"
        assert second.json()["motivation"] == "COBOL"
        async with database.read_only() as session:
            count = await session.scalar(select(func.count()).select_from(WaitlistApplication))
        assert count == 1

    async def test_approved_status_is_kept(self, client: httpx.AsyncClient, database: Database) -> None:
        async with database.transaction() as session:
            await referrals.approve_application(session, "ada@example.com")

        response = await client.post("/v1/waitlist", json={"email": "ada@example.com", "name": "Ada"})

        assert response.status_code == 201
        assert response.json()["status"] == "approved"
        assert response.json()["full_name"] == "Ada"

    async def test_concurrent_first_submissions_make_one_row(
        self, client: httpx.AsyncClient, database: Database
    ) -> None:
        responses = await asyncio.gather(
            *(client.post("/v1/waitlist", json={"email": "race@example.com", "name": f"N{i}"}) for i in range(5))
        )

        assert [response.status_code for response in responses] == [201] * 5
        assert len({response.json()["id"] for response in responses}) == 1

    async def test_ignores_stale_bearer_token(self, client: httpx.AsyncClient, unique_email: str) -> None:
        account = await sign_up(client, unique_email)
        headers = auth_headers(account)
        await client.post("/v1/auth/signout", headers=headers, json={})

        revoked = await client.post("/v1/waitlist", headers=headers, json={"email": "a@example.com"})
        garbage = await client.post("/v1/waitlist", headers=bearer("not-a-token"), json={"email": "b@example.com"})

        assert revoked.status_code == 201, revoked.text
        assert garbage.status_code == 201, garbage.text

    async def test_splits_links_string(self, client: httpx.AsyncClient) -> None:
        response = await client.post(
            "/v1/waitlist", json={"email": "ada@example.com", "links": "https://a.example, https://b.example\n"}
        )

        assert response.status_code == 201
        assert response.json()["links"] == ["https://a.example", "https://b.example"]

    async def test_missing_email_is_422(self, client: httpx.AsyncClient) -> None:
        body = assert_validation_error(await client.post("/v1/waitlist", json={"name": "Ada"}))

        assert "email" in body["message"]

    @pytest.mark.parametrize(
        "payload",
        [
            {"email": "ada@example.com", "links": [f"https://{index}.example" for index in range(21)]},
            {"email": "ada@example.com", "metadata": ["not", "an", "object"]},
            {"email": "ada@example.com", "metadata": {"blob": "x" * 20_000}},
            {"email": "ada@example.com", "name": "x" * 201},
        ],
    )
    async def test_invalid_fields_are_422(self, client: httpx.AsyncClient, payload: dict[str, Any]) -> None:
        assert_validation_error(await client.post("/v1/waitlist", json=payload))

    async def test_invalid_email_is_400(self, client: httpx.AsyncClient) -> None:
        assert_error(await client.post("/v1/waitlist", json={"email": "not an address"}), 400, "invalid_email")


class TestReferralList:
    async def test_creates_personal_code_once(
        self, client: httpx.AsyncClient, database: Database, unique_email: str
    ) -> None:
        account = await sign_up(client, unique_email)
        headers = auth_headers(account)

        first = await client.get("/v1/referral/list", headers=headers)
        second = await client.get("/v1/referral/list", headers=headers)

        assert first.status_code == 200, first.text
        body = first.json()
        code = body["invite_code"]
        assert second.json()["invite_code"] == code
        assert body["max_uses"] == 5
        assert body["uses_count"] == 0
        assert body["remaining_uses"] == 5
        assert body["invite_link"] == f"http://pocketllm.test/invite/{code}"
        assert code in body["share_message"]
        assert body["stats"] == {"total_sent": 0, "total_joined": 0, "pending": 0, "rewards_issued": 0}
        assert body["referrals"] == []
        async with database.read_only() as session:
            invites = list(await session.scalars(select(InviteCode).where(InviteCode.code == code)))
            profile = await session.get_one(Profile, uuid.UUID(account["user"]["id"]))
        assert len(invites) == 1
        assert invites[0].kind == "referral"
        assert str(invites[0].created_by) == account["user"]["id"]
        assert profile.referral_code == code

    async def test_concurrent_first_calls_create_one_code(
        self, client: httpx.AsyncClient, database: Database, unique_email: str
    ) -> None:
        headers = auth_headers(await sign_up(client, unique_email))

        responses = await asyncio.gather(*(client.get("/v1/referral/list", headers=headers) for _ in range(5)))

        assert [response.status_code for response in responses] == [200] * 5
        assert len({response.json()["invite_code"] for response in responses}) == 1
        async with database.read_only() as session:
            count = await session.scalar(
                select(func.count()).select_from(InviteCode).where(InviteCode.kind == "referral")
            )
        assert count == 1

    @pytest.mark.parametrize(
        "settings_overrides",
        [{"referral_max_uses": 2, "referral_share_base_url": "https://app.example/join?code="}],
    )
    async def test_uses_settings(self, client: httpx.AsyncClient, unique_email: str) -> None:
        headers = auth_headers(await sign_up(client, unique_email))

        body = (await client.get("/v1/referral/list", headers=headers)).json()

        assert body["max_uses"] == 2
        assert body["invite_link"] == f"https://app.example/join?code={body['invite_code']}"

    @pytest.mark.parametrize("settings_overrides", [{"public_base_url": "https://api.example/"}])
    async def test_default_link_uses_public_base_url(self, client: httpx.AsyncClient, unique_email: str) -> None:
        headers = auth_headers(await sign_up(client, unique_email))

        body = (await client.get("/v1/referral/list", headers=headers)).json()

        assert body["invite_link"] == f"https://api.example/invite/{body['invite_code']}"

    @pytest.mark.parametrize("path", ["/v1/referral/list", "/v1/v1/referral/list"])
    async def test_auth_ladder(self, client: httpx.AsyncClient, unique_email: str, path: str) -> None:
        headers = auth_headers(await sign_up(client, unique_email))
        await client.post("/v1/auth/signout", headers=headers, json={})

        assert_error(await client.get(path), 401, "not_authenticated")
        assert_error(await client.get(path, headers=bearer("abc")), 401, "token_malformed")
        assert_error(await client.get(path, headers=headers), 401, "session_revoked")

    async def test_users_see_only_their_referrals(self, client: httpx.AsyncClient) -> None:
        ada = auth_headers(await sign_up(client, "ada@example.com"))
        bob = auth_headers(await sign_up(client, "bob@example.com"))
        sent = await client.post("/v1/referral/send", headers=ada, json={"email": "grace@example.com"})
        assert sent.status_code == 201, sent.text

        ada_list = (await client.get("/v1/referral/list", headers=ada)).json()
        bob_list = (await client.get("/v1/referral/list", headers=bob)).json()

        assert [entry["email"] for entry in ada_list["referrals"]] == ["grace@example.com"]
        assert bob_list["referrals"] == []
        assert bob_list["stats"]["total_sent"] == 0
        assert bob_list["invite_code"] != ada_list["invite_code"]

    async def test_double_prefix_alias(self, client: httpx.AsyncClient, unique_email: str) -> None:
        headers = auth_headers(await sign_up(client, unique_email))

        single = await client.get("/v1/referral/list", headers=headers)
        double = await client.get("/v1/v1/referral/list", headers=headers)

        assert double.status_code == 200, double.text
        assert double.json() == single.json()
        paths = (await client.get("/openapi.json")).json()["paths"]
        assert "/v1/referral/list" in paths
        assert "/v1/referral/send" in paths
        assert "/v1/waitlist" in paths
        assert not any(path.startswith("/v1/v1/") for path in paths)


class TestReferralSend:
    async def test_records_referral_and_queues_mail(
        self, client: httpx.AsyncClient, database: Database, unique_email: str
    ) -> None:
        account = await sign_up(client, unique_email, full_name="Ada Lovelace")
        headers = auth_headers(account)

        response = await client.post(
            "/v1/referral/send",
            headers=headers,
            json={"email": IDN_EMAIL, "full_name": "Grace", "message": "Try it!"},
        )

        assert response.status_code == 201, response.text
        body = response.json()
        code = await personal_code(client, headers)
        assert body["invite_code"] == code
        assert body["status"] == "pending"
        assert body["email"] == IDN_CANONICAL
        assert body["invite_sent"] is True
        mails = await mails_to(database, IDN_CANONICAL)
        assert len(mails) == 1
        assert mails[0].subject == "Ada Lovelace invited you to PocketLLM"
        assert code in mails[0].text_body
        assert f"http://pocketllm.test/invite/{code}" in mails[0].text_body
        assert "Try it!" in mails[0].text_body
        listed = (await client.get("/v1/referral/list", headers=headers)).json()
        assert listed["stats"] == {"total_sent": 1, "total_joined": 0, "pending": 1, "rewards_issued": 0}
        entry = listed["referrals"][0]
        assert entry["referral_id"] == body["referral_id"]
        assert entry["full_name"] == "Grace"
        assert entry["status"] == "pending"
        assert entry["reward_status"] == "none"
        assert entry["accepted_at"] is None

    async def test_repeat_within_cooldown_sends_one_mail(
        self, client: httpx.AsyncClient, database: Database, unique_email: str
    ) -> None:
        account = await sign_up(client, unique_email)
        headers = auth_headers(account)

        first = await client.post("/v1/referral/send", headers=headers, json={"email": IDN_EMAIL})
        second = await client.post("/v1/referral/send", headers=headers, json={"email": IDN_CANONICAL})
        third = await client.post("/v1/v1/referral/send", headers=headers, json={"email": "GRACE@bücher.example"})

        assert [first.status_code, second.status_code, third.status_code] == [201, 201, 201]
        assert first.json()["referral_id"] == second.json()["referral_id"] == third.json()["referral_id"]
        assert second.json()["invite_sent"] is False
        assert third.json()["invite_sent"] is False
        assert len(await mails_to(database, IDN_CANONICAL)) == 1
        assert len(await referral_rows(database, account["user"]["id"])) == 1

    async def test_concurrent_sends_queue_one_mail(
        self, client: httpx.AsyncClient, database: Database, unique_email: str
    ) -> None:
        account = await sign_up(client, unique_email)
        headers = auth_headers(account)

        responses = await asyncio.gather(
            *(client.post("/v1/referral/send", headers=headers, json={"email": "grace@example.com"}) for _ in range(5))
        )

        assert [response.status_code for response in responses] == [201] * 5
        assert sum(response.json()["invite_sent"] for response in responses) == 1
        assert len(await mails_to(database, "grace@example.com")) == 1
        assert len(await referral_rows(database, account["user"]["id"])) == 1

    @pytest.mark.parametrize("settings_overrides", [{"referral_resend_cooldown_seconds": 0}])
    async def test_repeat_after_cooldown_sends_again(
        self, client: httpx.AsyncClient, database: Database, unique_email: str
    ) -> None:
        headers = auth_headers(await sign_up(client, unique_email))

        first = await client.post("/v1/referral/send", headers=headers, json={"email": "grace@example.com"})
        second = await client.post("/v1/referral/send", headers=headers, json={"email": "grace@example.com"})

        assert second.json()["referral_id"] == first.json()["referral_id"]
        assert second.json()["invite_sent"] is True
        assert len(await mails_to(database, "grace@example.com")) == 2

    async def test_double_prefix_alias(self, client: httpx.AsyncClient, database: Database, unique_email: str) -> None:
        headers = auth_headers(await sign_up(client, unique_email))

        response = await client.post(
            "/v1/v1/referral/send", headers=headers, json={"email": "grace@example.com", "full_name": None}
        )

        assert response.status_code == 201, response.text
        assert response.json()["status"] == "pending"
        assert len(await mails_to(database, "grace@example.com")) == 1

    async def test_rejects_own_address(self, client: httpx.AsyncClient, database: Database) -> None:
        headers = auth_headers(await sign_up(client, "ada@example.com"))

        response = await client.post("/v1/referral/send", headers=headers, json={"email": " ADA@example.com"})

        assert_error(response, 400, "cannot_invite_self")
        assert await mails_to(database, "ada@example.com") == []

    async def test_rejects_registered_address(self, client: httpx.AsyncClient, database: Database) -> None:
        headers = auth_headers(await sign_up(client, "ada@example.com"))
        await sign_up(client, "bob@example.com")

        response = await client.post("/v1/referral/send", headers=headers, json={"email": "Bob@Example.com"})

        assert_error(response, 400, "already_registered")
        assert await mails_to(database, "bob@example.com") == []

    async def test_rejects_used_up_code(self, client: httpx.AsyncClient, database: Database) -> None:
        headers = auth_headers(await sign_up(client, "ada@example.com"))
        code = await personal_code(client, headers)
        async with database.transaction() as session:
            await session.execute(update(InviteCode).where(InviteCode.code == code).values(uses_count=5))

        response = await client.post("/v1/referral/send", headers=headers, json={"email": "grace@example.com"})

        assert_error(response, 400, "invite_code_unusable")
        assert await mails_to(database, "grace@example.com") == []

    async def test_invalid_input(self, client: httpx.AsyncClient, unique_email: str) -> None:
        headers = auth_headers(await sign_up(client, unique_email))

        invalid = await client.post("/v1/referral/send", headers=headers, json={"email": "nope"})
        missing = await client.post("/v1/referral/send", headers=headers, json={"full_name": "Grace"})
        too_long = await client.post(
            "/v1/referral/send", headers=headers, json={"email": "grace@example.com", "message": "x" * 2001}
        )

        assert_error(invalid, 400, "invalid_email")
        assert_validation_error(missing)
        assert_validation_error(too_long)

    @pytest.mark.parametrize("path", ["/v1/referral/send", "/v1/v1/referral/send"])
    async def test_auth_ladder(
        self, client: httpx.AsyncClient, database: Database, unique_email: str, path: str
    ) -> None:
        headers = auth_headers(await sign_up(client, unique_email))
        await client.post("/v1/auth/signout", headers=headers, json={})
        payload = {"email": "grace@example.com"}

        assert_error(await client.post(path, json=payload), 401, "not_authenticated")
        assert_error(await client.post(path, headers=bearer("abc"), json=payload), 401, "token_malformed")
        assert_error(await client.post(path, headers=headers, json=payload), 401, "session_revoked")
        assert await mails_to(database, "grace@example.com") == []


class TestJoinWithPersonalCode:
    async def test_marks_invited_referral_joined(self, client: httpx.AsyncClient, database: Database) -> None:
        ada = await sign_up(client, "ada@example.com")
        headers = auth_headers(ada)
        sent = (await client.post("/v1/referral/send", headers=headers, json={"email": IDN_EMAIL})).json()

        joined = await sign_up_with_code(client, IDN_CANONICAL.upper(), sent["invite_code"].lower())

        assert joined.status_code == 200, joined.text
        grace_headers = auth_headers(joined.json())
        profile = (await client.get("/v1/users/profile", headers=grace_headers)).json()
        assert profile["referred_by"] == ada["user"]["id"]
        listed = (await client.get("/v1/referral/list", headers=headers)).json()
        assert listed["uses_count"] == 1
        assert listed["remaining_uses"] == 4
        assert listed["stats"] == {"total_sent": 1, "total_joined": 1, "pending": 0, "rewards_issued": 1}
        [entry] = listed["referrals"]
        assert entry["referral_id"] == sent["referral_id"]
        assert entry["status"] == "joined"
        assert entry["reward_status"] == "pending"
        assert entry["accepted_at"] is not None

    async def test_creates_referral_for_uninvited_joiner(self, client: httpx.AsyncClient, database: Database) -> None:
        ada = await sign_up(client, "ada@example.com")
        headers = auth_headers(ada)
        code = await personal_code(client, headers)

        joined = await client.post(
            "/v1/auth/signup",
            json={"email": "grace@example.com", "password": DEFAULT_PASSWORD, "referral_code": code, "full_name": "G"},
        )

        assert joined.status_code == 200, joined.text
        [row] = await referral_rows(database, ada["user"]["id"])
        assert row.email == "grace@example.com"
        assert row.full_name == "G"
        assert row.status == "joined"
        assert row.reward_status == "pending"
        assert row.last_sent_at is None
        assert str(row.referred_user_id) == joined.json()["user"]["id"]
        stats = (await client.get("/v1/referral/list", headers=headers)).json()["stats"]
        assert stats == {"total_sent": 0, "total_joined": 1, "pending": 0, "rewards_issued": 1}

    async def test_admin_code_records_no_referral(self, client: httpx.AsyncClient, database: Database) -> None:
        async with database.transaction() as session:
            invite = await referrals.create_invite_code(session, max_uses=2)

        await sign_up(client, "grace@example.com", invite_code=invite.code)

        async with database.read_only() as session:
            count = await session.scalar(select(func.count()).select_from(Referral))
        assert count == 0

    @pytest.mark.parametrize("settings_overrides", [{"invite_code": True, "referral_max_uses": 3}])
    async def test_concurrent_sign_ups_respect_max_uses(self, client: httpx.AsyncClient, database: Database) -> None:
        ada = await sign_up(client, "ada@example.com", invite_code=await admin_code(database))
        code = await personal_code(client, auth_headers(ada))

        responses = await asyncio.gather(
            *(sign_up_with_code(client, f"racer-{index}@example.com", code) for index in range(8))
        )

        statuses = sorted(response.status_code for response in responses)
        assert statuses == [200] * 3 + [403] * 5
        assert await uses_of(database, code) == 3
        rows = await referral_rows(database, ada["user"]["id"])
        assert len(rows) == 3
        assert {row.status for row in rows} == {"joined"}

    async def test_reward_once_across_delete_and_rejoin(self, client: httpx.AsyncClient, database: Database) -> None:
        ada = await sign_up(client, "ada@example.com")
        headers = auth_headers(ada)
        code = await personal_code(client, headers)
        first = await sign_up_with_code(client, "grace@example.com", code)
        assert first.status_code == 200, first.text
        first_id = uuid.UUID(first.json()["user"]["id"])
        async with database.transaction() as session:
            await delete_account_rows(session, first_id)

        [after_delete] = await referral_rows(database, ada["user"]["id"])
        second = await sign_up_with_code(client, " Grace@Example.COM ", code)

        assert after_delete.referred_user_id is None
        assert after_delete.reward_status == "pending"
        assert second.status_code == 200, second.text
        [row] = await referral_rows(database, ada["user"]["id"])
        assert str(row.referred_user_id) == second.json()["user"]["id"]
        assert row.status == "joined"
        assert row.reward_status == "pending"
        assert await uses_of(database, code) == 2
        stats = (await client.get("/v1/referral/list", headers=headers)).json()["stats"]
        assert stats["rewards_issued"] == 1
        assert stats["total_joined"] == 1

    async def test_referrer_deletion_removes_referrals(self, client: httpx.AsyncClient, database: Database) -> None:
        ada = await sign_up(client, "ada@example.com")
        code = await personal_code(client, auth_headers(ada))
        joined = await sign_up_with_code(client, "grace@example.com", code)
        assert joined.status_code == 200

        async with database.transaction() as session:
            await delete_account_rows(session, uuid.UUID(ada["user"]["id"]))

        async with database.read_only() as session:
            assert await session.scalar(select(func.count()).select_from(Referral)) == 0
            grace = await session.get_one(Profile, uuid.UUID(joined.json()["user"]["id"]))
            assert await session.scalar(select(func.count()).select_from(User)) == 1
        assert grace.referred_by is None


async def admin_code(database: Database) -> str:
    async with database.transaction() as session:
        invite = await referrals.create_invite_code(session, max_uses=1)
    return invite.code
