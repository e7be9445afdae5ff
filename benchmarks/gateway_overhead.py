"""Measure the latency the server adds to a chat reply, and its cost per streamed chunk.

Against a zero-delay fake provider (benchmarks/upstream.py), in alternating batches so that machine noise
hits both sides alike:

* Added latency per reply: a non-streaming `POST /v1/chats/{id}/messages` (authentication, database reads
  and writes, key decryption and the provider call) minus a `POST /v1/chat/completions` sent straight to the
  fake provider with a prompt of the same shape. p50 and p99 at each concurrency, on each database. The
  difference of two percentiles is reported, because the two sides are separate samples.
* Time to first token of a streamed reply (`"stream": true`) at concurrency 1: the first `delta` event
  through the server minus the first content chunk straight from the fake provider.
* Relay cost per streamed chunk: server CPU time (from /proc) for replies of M chunks minus the same number
  of replies of 1 chunk, divided by the number of extra chunks.

Every chat is seeded with 10 earlier messages and cut back to them after each batch. Requests go to at
least 32 chats in turn, so that a batch adds only a few messages to each history. The server is
`pocketllm serve --no-worker`, pinned to its own core where there are two.

    python -m benchmarks.gateway_overhead                # full run
    python -m benchmarks.gateway_overhead --requests 300 --stream-requests 100 --relay-replies 40
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from benchmarks.common import (
    ProcessGroup,
    cpu_seconds,
    machine_description,
    percentile,
    pin,
    plan_cores,
    print_json_line,
    print_table,
    raise_file_limit,
    run_async,
    scratch_directory,
)
from benchmarks.launch import (
    DatabaseKind,
    Server,
    Upstream,
    database_url_for,
    parse_databases,
    server_environment,
    set_up_account,
    start_server,
    start_upstream,
)
from benchmarks.rawhttp import JSON_HEADERS, HttpConnection, HttpResult, json_request_body, run_closed_loop
from benchmarks.seed import SEED_TEXT, ChatStore
from benchmarks.upstream import MODEL

HISTORY_MESSAGES = 10
# Requests go to the chats in turn, and each reply adds two messages until the batch ends. With this many
# chats a batch of 100 adds at most four replies to any chat, so every history stays close to
# HISTORY_MESSAGES even at concurrency 1.
MIN_CHATS = 32
NEW_MESSAGE = "What is the capital of France? Answer in one word."
# Published overhead figures of other gateways, for context only; each was measured on other hardware.
COMPARISON_POINTS_MS = {"LiteLLM": 4.3, "Portkey": 2.5, "Bifrost": 0.5}
TARGET_P50_MS = 2.0
TARGET_P99_MS = 6.0
TARGET_TTFT_MS = 2.0
WARMUP_REQUESTS = 50
SERVER_DELTA_MARKER = b"event: delta"
UPSTREAM_DELTA_MARKER = b'{"content":" word"}'


def direct_body(stream: bool) -> bytes:
    """Build a chat completion request shaped like the server's for a chat with HISTORY_MESSAGES earlier turns."""
    messages = [
        {"role": "user" if index % 2 == 0 else "assistant", "content": SEED_TEXT} for index in range(HISTORY_MESSAGES)
    ]
    messages.append({"role": "user", "content": NEW_MESSAGE})
    body: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": 4096}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json_request_body(body)


class Sides:
    """Request factories for the direct and the through-server side, with one chat per connection slot."""

    def __init__(self, server: Server, upstream: Upstream, headers: dict[str, str], chat_ids: list[str]) -> None:
        self.server = server
        self.upstream = upstream
        self.chat_ids = chat_ids
        self._server_headers = {**headers, **JSON_HEADERS}
        self._direct_headers = {"Authorization": "Bearer sk-bench", **JSON_HEADERS}
        self._reply = json_request_body({"content": NEW_MESSAGE, "role": "user"})
        self._stream_reply = json_request_body({"content": NEW_MESSAGE, "role": "user", "stream": True})
        self._direct = direct_body(stream=False)
        self._direct_stream = direct_body(stream=True)

    async def through(self, connection: HttpConnection, ticket: int, *, stream: bool = False) -> HttpResult:
        chat_id = self.chat_ids[ticket % len(self.chat_ids)]
        return await connection.request(
            "POST",
            f"/v1/chats/{chat_id}/messages",
            headers=self._server_headers,
            body=self._stream_reply if stream else self._reply,
            marker=SERVER_DELTA_MARKER if stream else None,
        )

    async def direct(self, connection: HttpConnection, ticket: int, *, stream: bool = False) -> HttpResult:
        return await connection.request(
            "POST",
            "/v1/chat/completions",
            headers=self._direct_headers,
            body=self._direct_stream if stream else self._direct,
            marker=UPSTREAM_DELTA_MARKER if stream else None,
        )


async def alternate(
    sides: Sides,
    store: ChatStore,
    *,
    concurrency: int,
    requests: int,
    batch: int,
    stream: bool,
) -> dict[str, list[HttpResult]]:
    """Run `requests` per side in alternating batches; return the results of each side."""
    results: dict[str, list[HttpResult]] = {"direct": [], "through": []}
    rounds = max(1, math.ceil(requests / batch))
    for _ in range(rounds):
        direct, _ = await run_closed_loop(
            concurrency,
            total_requests=batch,
            port=sides.upstream.port,
            make_request=lambda connection, ticket: sides.direct(connection, ticket, stream=stream),
        )
        through, _ = await run_closed_loop(
            concurrency,
            total_requests=batch,
            port=sides.server.port,
            make_request=lambda connection, ticket: sides.through(connection, ticket, stream=stream),
        )
        await store.truncate(sides.chat_ids, HISTORY_MESSAGES)
        results["direct"].extend(direct)
        results["through"].extend(through)
    return results


def latency_figures(results: dict[str, list[HttpResult]], *, first_token: bool) -> dict[str, float]:
    def milliseconds(result: HttpResult) -> float:
        if first_token:
            if result.marker is None:
                raise RuntimeError(f"a streamed reply had no first token: {result.body[:300]!r}")
            return (result.marker - result.started) * 1000
        return result.elapsed * 1000

    figures: dict[str, float] = {}
    for side, side_results in results.items():
        values = [milliseconds(result) for result in side_results]
        figures[f"{side}_p50_ms"] = percentile(values, 0.50)
        figures[f"{side}_p99_ms"] = percentile(values, 0.99)
    figures["added_p50_ms"] = figures["through_p50_ms"] - figures["direct_p50_ms"]
    figures["added_p99_ms"] = figures["through_p99_ms"] - figures["direct_p99_ms"]
    figures["requests_per_side"] = float(len(results["through"]))
    return figures


async def relay_cost(sides: Sides, store: ChatStore, *, replies: int, chunks: int, rounds: int) -> dict[str, float]:
    """Return the server CPU time per extra streamed chunk and per reply.

    Per chunk: (CPU for replies of `chunks` chunks - CPU for as many 1-chunk replies) / the extra chunks.
    """
    cpu = {1: 0.0, chunks: 0.0}
    for _ in range(rounds):
        for chunk_count in (chunks, 1):
            await sides.upstream.configure(chunks=chunk_count)
            before = cpu_seconds(sides.server.pid)
            results, _ = await run_closed_loop(
                1,
                total_requests=replies,
                port=sides.server.port,
                make_request=lambda connection, ticket: sides.through(connection, ticket, stream=True),
            )
            cpu[chunk_count] += cpu_seconds(sides.server.pid) - before
            if any(result.marker is None for result in results):
                raise RuntimeError("a streamed reply had no delta event")
            await store.truncate(sides.chat_ids, HISTORY_MESSAGES)
    await sides.upstream.configure(chunks=16)
    total_replies = replies * rounds
    extra_chunks = total_replies * (chunks - 1)
    return {
        "replies_per_case": float(total_replies),
        "chunks_per_reply": float(chunks),
        "server_cpu_ms_per_reply_1_chunk": cpu[1] / total_replies * 1000,
        "server_cpu_ms_per_reply_m_chunks": cpu[chunks] / total_replies * 1000,
        "relay_cpu_us_per_chunk": (cpu[chunks] - cpu[1]) / extra_chunks * 1e6,
    }


async def measure_database(database: DatabaseKind, arguments: argparse.Namespace) -> dict[str, Any]:
    plan = plan_cores()
    processes = ProcessGroup()
    concurrencies = [int(item) for item in arguments.concurrency.split(",")]
    try:
        with scratch_directory("bench-overhead-") as scratch:
            upstream = await start_upstream(processes, scratch, plan.upstream)
            async with database_url_for(database, scratch, "bench_overhead") as database_url:
                server = await start_server(
                    processes,
                    kind="cli",
                    environment=server_environment(scratch, database_url),
                    data_dir=scratch,
                    cores=plan.server,
                )
                account = await set_up_account(server, upstream, chats=max(*concurrencies, MIN_CHATS))
                store = ChatStore(database_url)
                try:
                    for chat_id in account.chat_ids:
                        await store.seed(chat_id, HISTORY_MESSAGES)
                    sides = Sides(server, upstream, account.headers, account.chat_ids)
                    figures = await measure_all(sides, store, concurrencies, arguments)
                finally:
                    await store.close()
                processes.stop_all()
                return figures
    finally:
        processes.stop_all()


async def measure_all(
    sides: Sides, store: ChatStore, concurrencies: list[int], arguments: argparse.Namespace
) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    await alternate(sides, store, concurrency=1, requests=WARMUP_REQUESTS, batch=WARMUP_REQUESTS, stream=False)
    for concurrency in concurrencies:
        batch = max(arguments.batch, concurrency * 10)
        cpu_before = cpu_seconds(sides.server.pid)
        results = await alternate(
            sides, store, concurrency=concurrency, requests=arguments.requests, batch=batch, stream=False
        )
        reply_figures = latency_figures(results, first_token=False)
        reply_figures["server_cpu_ms_per_reply"] = (
            (cpu_seconds(sides.server.pid) - cpu_before) / len(results["through"]) * 1000
        )
        figures[f"reply_c{concurrency}"] = reply_figures

    await alternate(sides, store, concurrency=1, requests=WARMUP_REQUESTS, batch=WARMUP_REQUESTS, stream=True)
    results = await alternate(
        sides, store, concurrency=1, requests=arguments.stream_requests, batch=arguments.batch, stream=True
    )
    figures["ttft_c1"] = latency_figures(results, first_token=True)
    figures["relay"] = await relay_cost(
        sides, store, replies=arguments.relay_replies, chunks=arguments.relay_chunks, rounds=arguments.relay_rounds
    )
    return figures


def report(all_figures: dict[str, dict[str, Any]], arguments: argparse.Namespace) -> None:
    rows = []
    for database, figures in all_figures.items():
        for key, values in figures.items():
            if not key.startswith("reply_c"):
                continue
            rows.append(
                [
                    database,
                    key.removeprefix("reply_c"),
                    values["direct_p50_ms"],
                    values["through_p50_ms"],
                    values["added_p50_ms"],
                    values["direct_p99_ms"],
                    values["through_p99_ms"],
                    values["added_p99_ms"],
                    values["server_cpu_ms_per_reply"],
                    int(values["requests_per_side"]),
                ]
            )
    print_table(
        "Added latency per non-streaming reply, ms "
        f"(targets at concurrency 1: p50 < {TARGET_P50_MS}, p99 < {TARGET_P99_MS})",
        [
            "database",
            "conc.",
            "direct p50",
            "server p50",
            "added p50",
            "direct p99",
            "server p99",
            "added p99",
            "server CPU/reply",
            "requests/side",
        ],
        rows,
    )
    comparison = ", ".join(f"{name} ~{value} ms" for name, value in COMPARISON_POINTS_MS.items())
    print(f"Published overhead of other gateways, measured elsewhere: {comparison}.")

    ttft_rows = [
        [
            database,
            f["ttft_c1"]["direct_p50_ms"],
            f["ttft_c1"]["through_p50_ms"],
            f["ttft_c1"]["added_p50_ms"],
            f["ttft_c1"]["added_p99_ms"],
            int(f["ttft_c1"]["requests_per_side"]),
        ]
        for database, f in all_figures.items()
    ]
    print_table(
        f"Time to first token, streaming, concurrency 1, ms (target: added p50 < {TARGET_TTFT_MS})",
        ["database", "direct p50", "server p50", "added p50", "added p99", "requests/side"],
        ttft_rows,
    )
    relay_rows = [
        [
            database,
            int(f["relay"]["chunks_per_reply"]),
            int(f["relay"]["replies_per_case"]),
            f["relay"]["server_cpu_ms_per_reply_1_chunk"],
            f["relay"]["server_cpu_ms_per_reply_m_chunks"],
            f["relay"]["relay_cpu_us_per_chunk"],
        ]
        for database, f in all_figures.items()
    ]
    print_table(
        "Relay cost per streamed chunk (server CPU time from /proc, 10 ms clock ticks)",
        ["database", "chunks M", "replies/case", "CPU ms/reply M=1", "CPU ms/reply M", "CPU us/chunk"],
        relay_rows,
    )


async def main_async(arguments: argparse.Namespace) -> None:
    pin(0, plan_cores().client)
    print(f"{plan_cores().describe()}; {machine_description()}")
    all_figures: dict[str, dict[str, Any]] = {}
    for database in parse_databases(arguments.databases):
        all_figures[database] = await measure_database(database, arguments)
    report(all_figures, arguments)
    print_json_line(
        "gateway_overhead",
        {
            "machine": machine_description(),
            "cores": plan_cores().describe(),
            "settings": vars(arguments),
            "targets_ms": {
                "added_p50_c1": TARGET_P50_MS,
                "added_p99_c1": TARGET_P99_MS,
                "ttft_added_p50": TARGET_TTFT_MS,
            },
            "results": all_figures,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--databases", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql (default: %(default)s)"
    )
    parser.add_argument(
        "--concurrency", default="1,32", help="comma-separated concurrency levels (default: %(default)s)"
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=2000,
        help="non-streaming requests per side per concurrency (default: %(default)s)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=100,
        help="requests per side in one alternating batch; at least 10 per connection (default: %(default)s)",
    )
    parser.add_argument(
        "--stream-requests",
        type=int,
        default=1000,
        help="streamed requests per side for time to first token (default: %(default)s)",
    )
    parser.add_argument(
        "--relay-replies",
        type=int,
        default=200,
        help="streamed replies per case and round for the relay cost (default: %(default)s)",
    )
    parser.add_argument(
        "--relay-chunks",
        type=int,
        default=256,
        help="content chunks per reply in the many-chunk case (default: %(default)s)",
    )
    parser.add_argument(
        "--relay-rounds", type=int, default=3, help="alternating rounds of the two relay cases (default: %(default)s)"
    )

    arguments = parser.parse_args()
    raise_file_limit()
    run_async(main_async(arguments))


if __name__ == "__main__":
    main()
