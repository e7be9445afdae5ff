"""Measure the CPU cost of a provider call in the server's HTTP client, with and without its network layer.

The server's provider clients are httpx clients whose connections run on `ProviderTransport`
(src/pocketllm/providers/network.py). This script sends the same requests through a client with that
transport and through one with httpx's default transport, which runs on anyio socket streams, in
alternating batches from this process. The fake provider (`benchmarks/upstream.py`) runs in a child
process, on another core where there are two. Both clients keep their connection alive.

* Non-streaming: `POST /v1/chat/completions` with a small JSON body, response read and decoded. A third
  case sends it as the server does, through `OutboundGuard.request`, which checks the URL and sends on the
  client's transport without `AsyncClient.send`.
* Streaming: the same request with `"stream": true` and 256 content chunks, read line by line.

The figures are this process's CPU time (user plus system, from getrusage) per request, and the
wall-clock p50, per transport. Run on uvloop, as the server does.

    python -m benchmarks.provider_client [--requests 3000] [--stream-requests 600] [--batch 100]
"""

from __future__ import annotations

import argparse
import resource
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from benchmarks.common import (
    ProcessGroup,
    machine_description,
    percentile,
    pin,
    plan_cores,
    print_json_line,
    print_table,
    run_async,
    scratch_directory,
)
from benchmarks.launch import start_upstream
from pocketllm.providers.guard import OutboundGuard
from pocketllm.providers.network import ProviderTransport

STREAM_CHUNKS = 256
REQUEST_BODY = {"model": "bench-model", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 64}
TRANSPORTS = ("httpx default (anyio)", "ProviderTransport")
# The guard's case uses the client of the ProviderTransport case.
GUARDED = "ProviderTransport, through the guard"
GUARD = OutboundGuard(allow_private=True)


def make_client(kind: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
    if kind == "ProviderTransport":
        transport = ProviderTransport(ssl_context=ssl.create_default_context(), limits=limits)
        return httpx.AsyncClient(transport=transport, trust_env=False)
    return httpx.AsyncClient(limits=limits, trust_env=False)


def process_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def complete(client: httpx.AsyncClient, url: str) -> None:
    response = await client.post(url, json=REQUEST_BODY)
    response.raise_for_status()
    response.json()


async def complete_through_guard(client: httpx.AsyncClient, url: str) -> None:
    response = await GUARD.request(client, "POST", url, json=REQUEST_BODY)
    response.raise_for_status()
    response.json()


async def stream(client: httpx.AsyncClient, url: str) -> None:
    async with client.stream("POST", url, json={**REQUEST_BODY, "stream": True}) as response:
        response.raise_for_status()
        async for _ in response.aiter_lines():
            pass


Call = Callable[[httpx.AsyncClient, str], Awaitable[None]]


async def measure(
    cases: dict[str, tuple[str, Call]], url: str, requests: int, batch: int
) -> dict[str, dict[str, float]]:
    """Send alternating batches of each case's call through its transport's client, and return each case's
    CPU µs per request and p50 latency in ms. `cases` maps a case's name to a transport and a call."""
    clients = {kind: make_client(kind) for kind in TRANSPORTS}
    cpu = dict.fromkeys(cases, 0.0)
    latencies: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for kind, call in cases.values():
            for _ in range(20):  # warm-up: open the connection, fill caches
                await call(clients[kind], url)
        for _ in range(max(1, requests // batch)):
            for name, (kind, call) in cases.items():
                client = clients[kind]
                started_cpu = process_cpu_seconds()
                for _ in range(batch):
                    started = time.perf_counter()
                    await call(client, url)
                    latencies[name].append((time.perf_counter() - started) * 1000)
                cpu[name] += process_cpu_seconds() - started_cpu
    finally:
        for client in clients.values():
            await client.aclose()
    return {
        name: {
            "cpu_us_per_request": cpu[name] / len(latencies[name]) * 1e6,
            "p50_ms": percentile(latencies[name], 0.5),
            "requests": len(latencies[name]),
        }
        for name in cases
    }


async def main_async(arguments: argparse.Namespace) -> None:
    plan = plan_cores()
    pin(0, plan.server)
    print(f"client cores {sorted(plan.server)}, upstream cores {sorted(plan.upstream)}; {machine_description()}")
    processes = ProcessGroup()
    try:
        with scratch_directory("bench-provider-client-") as scratch:
            upstream = await start_upstream(processes, scratch, plan.upstream)
            url = f"{upstream.base_url}/v1/chat/completions"
            results: dict[str, Any] = {}
            await upstream.configure(chunks=STREAM_CHUNKS, hold_seconds=0)
            complete_cases = {kind: (kind, complete) for kind in TRANSPORTS}
            complete_cases[GUARDED] = (TRANSPORTS[1], complete_through_guard)
            results["complete"] = await measure(complete_cases, url, arguments.requests, arguments.batch)
            stream_cases = {kind: (kind, stream) for kind in TRANSPORTS}
            results["stream"] = await measure(stream_cases, url, arguments.stream_requests, arguments.batch)
    finally:
        processes.stop_all()

    for case, title in (("complete", "non-streaming"), ("stream", f"streaming, {STREAM_CHUNKS} chunks")):
        baseline = results[case][TRANSPORTS[0]]["cpu_us_per_request"]
        rows = [
            [kind, figures["cpu_us_per_request"], figures["cpu_us_per_request"] / baseline, figures["p50_ms"]]
            for kind, figures in results[case].items()
        ]
        print_table(
            f"Provider call, {title}: client CPU per request",
            ["transport", "CPU us/request", "CPU ratio", "p50 ms"],
            rows,
        )
    print_json_line(
        "provider_client", {"machine": machine_description(), "settings": vars(arguments), "results": results}
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--requests", type=int, default=3000, help="non-streaming requests per transport (default: %(default)s)"
    )
    parser.add_argument(
        "--stream-requests", type=int, default=600, help="streaming requests per transport (default: %(default)s)"
    )
    parser.add_argument("--batch", type=int, default=100, help="requests per batch (default: %(default)s)")
    run_async(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
