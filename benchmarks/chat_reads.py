"""Measure the CPU time of the read routes in process: one chat, its messages, the chat list, the saved
models and the profile.

The app from `create_app(settings)` runs in this process behind httpx's ASGI transport, on uvloop, with
a new SQLite file or a new PostgreSQL database (dropped at the end). One account has `--chats` chats, the
first with `--messages` messages, and one saved model of a provider whose URL is never called. Each route
gets 200 warm-up requests, then `--requests` timed ones. The figure is this process's CPU time (user plus
system, from getrusage) per request, which includes the test client's share, so it compares versions of
the server rather than giving the server's cost alone. Compare two versions by running this script on a
copy of each, alternately.

    python -m benchmarks.chat_reads [--databases sqlite,postgresql] [--chats 50] [--messages 20] [--requests 2000]
"""

from __future__ import annotations

import argparse
import os
import resource
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import machine_description, print_json_line, print_table, run_async, scratch_directory
from benchmarks.launch import DatabaseKind, database_url_for, parse_databases, server_environment

WARMUP_REQUESTS = 200
# Saved with "verify": false and imported with "sync": false, so nothing ever connects to it.
UNUSED_PROVIDER_URL = "http://127.0.0.1:9/v1"
ROUTES = {
    "chat": "GET /v1/chats/{id}",
    "messages": "GET /v1/chats/{id}/messages",
    "chat_list": "GET /v1/chats",
    "models_saved": "GET /v1/models/saved",
    "profile": "GET /v1/users/profile",
}


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(database: DatabaseKind, arguments: argparse.Namespace) -> dict[str, float]:
    with scratch_directory("bench-chat-reads-") as scratch:
        async with database_url_for(database, scratch, "bench_chat_reads") as database_url:
            return await measure_app(database_url, scratch, arguments)


async def measure_app(database_url: str, data_dir: Path, arguments: argparse.Namespace) -> dict[str, float]:
    # The settings are read from the environment, as `pocketllm serve` reads them.
    os.environ.update(server_environment(data_dir, database_url))
    from pocketllm.app import create_app
    from pocketllm.config import load_settings

    app = create_app(load_settings())
    figures: dict[str, float] = {}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            headers, chat_id = await set_up_account(client, chats=arguments.chats, messages=arguments.messages)
            paths = {
                "chat": f"/v1/chats/{chat_id}",
                "messages": f"/v1/chats/{chat_id}/messages",
                "chat_list": "/v1/chats",
                "models_saved": "/v1/models/saved",
                "profile": "/v1/users/profile",
            }
            for name, path in paths.items():
                figures[name] = await cpu_ms_per_request(client, path, headers, arguments.requests)
    return figures


async def set_up_account(client: httpx.AsyncClient, *, chats: int, messages: int) -> tuple[dict[str, str], str]:
    """Sign up, save one model, create `chats` chats and give the first `messages` system messages (no provider
    call needed). Return the auth headers and the first chat's id."""
    signup = await client.post("/v1/auth/signup", json={"email": "reads@example.com", "password": "bench password 1"})
    signup.raise_for_status()
    headers = {"Authorization": f"Bearer {signup.json()['tokens']['access_token']}"}
    provider = {"provider": "openai", "api_key": "sk-bench", "base_url": UNUSED_PROVIDER_URL, "verify": False}
    (await client.post("/v1/providers/activate", headers=headers, json=provider)).raise_for_status()
    models = {"provider": "openai", "models": ["bench-model"], "sync": False}
    (await client.post("/v1/models/import", headers=headers, json=models)).raise_for_status()
    chat_ids = []
    for index in range(max(1, chats)):
        chat = await client.post("/v1/chats", headers=headers, json={"title": f"Chat {index}"})
        chat.raise_for_status()
        chat_ids.append(chat.json()["id"])
    for index in range(messages):
        stored = await client.post(
            f"/v1/chats/{chat_ids[0]}/messages",
            headers=headers,
            json={"role": "system", "content": f"note {index} " * 10},
        )
        stored.raise_for_status()
    return headers, chat_ids[0]


async def cpu_ms_per_request(client: httpx.AsyncClient, path: str, headers: dict[str, str], requests: int) -> float:
    for _ in range(WARMUP_REQUESTS):
        (await client.get(path, headers=headers)).raise_for_status()
    started = process_cpu_seconds()
    for _ in range(requests):
        response = await client.get(path, headers=headers)
    response.raise_for_status()
    return (process_cpu_seconds() - started) / requests * 1000


async def main_async(arguments: argparse.Namespace) -> None:
    print(machine_description())
    results: dict[str, Any] = {}
    for database in parse_databases(arguments.databases):
        results[database] = await measure(database, arguments)
    rows = [[database, *(figures[name] for name in ROUTES)] for database, figures in results.items()]
    print_table(
        f"In-process CPU per request (ms), {arguments.chats} chats, the first with {arguments.messages} messages",
        ["database", *ROUTES.values()],
        rows,
        digits=3,
    )
    print_json_line("chat_reads", {"machine": machine_description(), "settings": vars(arguments), "results": results})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--databases", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql (default: %(default)s)"
    )
    parser.add_argument("--chats", type=int, default=50, help="chats of the account (default: %(default)s)")
    parser.add_argument("--messages", type=int, default=20, help="messages in the first chat (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per route (default: %(default)s)")
    run_async(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
