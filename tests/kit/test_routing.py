"""PrefixRouter: a router that declines paths without its prefix must still find every route of its own."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from pocketllm.kit.routing import PrefixRouter


def make_app(router_prefix: str, include_prefix: str = "") -> FastAPI:
    things = PrefixRouter(prefix=router_prefix)

    @things.get("/{thing_id}")
    async def read_thing(thing_id: str) -> dict[str, str]:
        return {"thing_id": thing_id}

    other = PrefixRouter(prefix="/v1/others")

    @other.get("")
    async def list_others() -> list[str]:
        return []

    app = FastAPI()
    app.include_router(other)
    app.include_router(things, prefix=include_prefix)
    return app


def client_for(app: FastAPI, root_path: str = "") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app, root_path=root_path), base_url="http://test")


async def test_route_found_and_other_paths_declined() -> None:
    async with client_for(make_app("/v1/things")) as client:
        found = await client.get("/v1/things/7")
        others = await client.get("/v1/others")
        missing = await client.get("/v1/thing/7")
        wrong_method = await client.post("/v1/things/7")

    assert found.json() == {"thing_id": "7"}
    assert others.json() == []
    assert missing.status_code == 404
    assert wrong_method.status_code == 405


async def test_route_found_under_include_prefix() -> None:
    async with client_for(make_app("/v1/things", include_prefix="/api")) as client:
        found = await client.get("/api/v1/things/7")
        missing = await client.get("/v1/things/7")

    assert found.json() == {"thing_id": "7"}
    assert missing.status_code == 404


async def test_route_found_under_root_path() -> None:
    async with client_for(make_app("/v1/things"), root_path="/base") as client:
        found = await client.get("/base/v1/things/7")

    assert found.json() == {"thing_id": "7"}


async def test_path_parameter_prefix_fully_checked() -> None:
    async with client_for(make_app("/v1/users/{user_id}/things")) as client:
        found = await client.get("/v1/users/42/things/7")

    assert found.json() == {"thing_id": "7"}
