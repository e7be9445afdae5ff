"""Small typed helpers for API tests."""

from __future__ import annotations

from typing import Any

import httpx

DEFAULT_PASSWORD = "Sup3rSecret!"


async def sign_up(
    client: httpx.AsyncClient, email: str, password: str = DEFAULT_PASSWORD, **extra: Any
) -> dict[str, Any]:
    response = await client.post("/v1/auth/signup", json={"email": email, "password": password, **extra})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def bearer(access_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {access_token}"}


def auth_headers(body: dict[str, Any]) -> dict[str, str]:
    """Authorization header from a sign-up, sign-in or refresh response body."""
    return bearer(body["tokens"]["access_token"])
