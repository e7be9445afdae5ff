"""Sign-ups with a personal invite code through the Supabase backend, against the fake GoTrue server."""

from __future__ import annotations

import uuid

import httpx
from sqlalchemy import select

from pocketllm.db.engine import Database
from pocketllm.models import Profile, Referral
from tests.auth.test_supabase import (  # noqa: F401  (fixtures used by name)
    database,
    gotrue,
    gotrue_server,
    settings_overrides,
    sign_up,
)
from tests.helpers import auth_headers


async def test_sign_up_with_personal_code_joins_referral(client: httpx.AsyncClient, database: Database) -> None:  # noqa: F811
    ada = await sign_up(client, "ada@example.com")
    headers = auth_headers(ada)
    sent = await client.post("/v1/referral/send", headers=headers, json={"email": "Grace@Example.com"})
    assert sent.status_code == 201, sent.text

    grace = await sign_up(client, "grace@example.com", referral_code=sent.json()["invite_code"])

    async with database.read_only() as session:
        [row] = list(await session.scalars(select(Referral)))
        profile = await session.get_one(Profile, uuid.UUID(grace["user"]["id"]))
    assert row.status == "joined"
    assert row.reward_status == "pending"
    assert str(row.referred_user_id) == grace["user"]["id"]
    assert str(profile.referred_by) == ada["user"]["id"]
    listed = (await client.get("/v1/referral/list", headers=headers)).json()
    assert listed["uses_count"] == 1
    assert listed["stats"]["total_joined"] == 1
