"""Measure what keeping provider connections alive saves on HTTPS, in one run.

The server sends HTTPS requests through the guard with one connection pool per host name (`HostClients`).
Before, it sent them on one shared client that closed every HTTPS connection (`Connection: close`). This
script sends the same requests both ways. Then it streams replies through the server's own stream reader
(`stream_chat`) on the pooled client, and reports the connections that the fake provider accepted per
streamed reply: 0 when each reply reuses the pooled connection, 1 when each opens its own.

A fake provider speaks HTTPS on 127.0.0.1 with a throwaway certificate for `provider.test`, which the
guard resolves to 127.0.0.1. Each request is a POST of a chat-sized JSON body, and each response a small
JSON body, like a non-streaming reply. The two ways alternate in batches. The figures are the latency p50
and p99 and this process's CPU time per request (the fake provider runs in a child process on another
core where there are two). On loopback a handshake costs CPU and no network round trips. Against a real
provider each new connection also waits for two round trips (TCP, then TLS 1.3).

    python -m benchmarks.provider_tls [--requests 2000] [--batch 100] [--stream-requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import ssl
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from benchmarks.common import (
    free_port,
    machine_description,
    percentile,
    pin,
    plan_cores,
    print_json_line,
    print_table,
    run_async,
)
from benchmarks.gateway_overhead import direct_body
from pocketllm.providers.catalogue import ProviderTarget
from pocketllm.providers.chat import ChatMessage, ChatParameters, ChatRequest, StreamEnd, stream_chat
from pocketllm.providers.guard import HostClients, OutboundGuard
from pocketllm.providers.http import ProviderHttp
from pocketllm.providers.registry import PROVIDERS

HOST_NAME = "provider.test"
RESPONSE_BODY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": "bench-model",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 600, "completion_tokens": 1, "total_tokens": 601},
    }
).encode()
STREAM_CHUNKS = 16


def _stream_body() -> bytes:
    """Build a chunked event stream as OpenAI sends it: content chunks, a finish chunk, usage and [DONE]."""

    def event(choices: list[Any], **extra: Any) -> bytes:
        chunk = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "model": "bench-model", "choices": choices}
        return b"data: " + json.dumps({**chunk, **extra}).encode() + b"\n\n"

    events = [event([{"index": 0, "delta": {"content": "word "}, "finish_reason": None}])] * STREAM_CHUNKS
    events.append(event([{"index": 0, "delta": {}, "finish_reason": "stop"}]))
    events.append(event([], usage={"prompt_tokens": 600, "completion_tokens": STREAM_CHUNKS, "total_tokens": 616}))
    events.append(b"data: [DONE]\n\n")
    return b"".join(b"%x\r\n%s\r\n" % (len(item), item) for item in events) + b"0\r\n\r\n"


STREAM_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + _stream_body()
)


def write_certificate(directory: Path) -> tuple[Path, Path, str]:
    """Write a throwaway CA-signed certificate for HOST_NAME; return its file, its key file and the CA in PEM."""
    now = datetime.now(UTC)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "PocketLLM benchmark CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST_NAME)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST_NAME)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    certificate_path = directory / "provider.pem"
    key_path = directory / "provider.key"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certificate_path, key_path, ca.public_bytes(serialization.Encoding.PEM).decode()


class _ProviderProtocol(asyncio.Protocol):
    """Respond to each request on a connection with RESPONSE_BODY, or STREAM_RESPONSE for a body that requests
    a stream, and keep the connection open unless the request has `Connection: close`. `GET /connections`
    returns the number of connections accepted so far."""

    accepted = 0

    def __init__(self) -> None:
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        _ProviderProtocol.accepted += 1

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while b"\r\n\r\n" in self._buffer:
            head, _, rest = self._buffer.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").lower().split("\r\n")
            length = next((int(line.split(":", 1)[1]) for line in lines if line.startswith("content-length:")), 0)
            if len(rest) < length:
                return
            body, self._buffer = rest[:length], rest[length:]
            closing = any(line.startswith("connection:") and "close" in line for line in lines)
            assert self._transport is not None
            if lines[0].startswith("get /connections"):
                count = str(_ProviderProtocol.accepted).encode()
                self._transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(count), count))
                continue
            if b'"stream":true' in body:
                self._transport.write(STREAM_RESPONSE)
                continue
            self._transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(RESPONSE_BODY)}\r\n".encode()
                + (b"Connection: close\r\n" if closing else b"")
                + b"\r\n"
                + RESPONSE_BODY
            )
            if closing:
                self._transport.close()
                return


def serve_provider(port: int, certificate: Path, key: Path, cores: set[int]) -> None:
    """Run the fake HTTPS provider until the process is terminated."""
    pin(0, cores)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            _ProviderProtocol, "127.0.0.1", port, ssl=context, backlog=1024
        )
        async with server:
            await server.serve_forever()

    asyncio.run(main())


async def resolve_to_loopback(host: str, port: int) -> list[str]:
    return ["127.0.0.1"]


async def measure(requests: int, batch: int, stream_requests: int) -> None:
    plan = plan_cores()
    pin(0, plan.server)
    with tempfile.TemporaryDirectory() as directory:
        certificate, key, ca_pem = write_certificate(Path(directory))
        port = free_port()
        provider = multiprocessing.get_context("spawn").Process(
            target=serve_provider, args=(port, certificate, key, plan.upstream), daemon=True
        )
        provider.start()
        try:
            tls_context = ssl.create_default_context(cadata=ca_pem)
            await _measure(port, tls_context, requests, batch, plan.describe())
            await _measure_streams(port, tls_context, stream_requests, plan.describe())
        finally:
            provider.terminate()
            provider.join(timeout=10)


async def _measure(port: int, tls_context: ssl.SSLContext, requests: int, batch: int, cores: str) -> None:
    def make_client() -> httpx.AsyncClient:
        return httpx.AsyncClient(verify=tls_context, trust_env=False, timeout=10.0)

    guard = OutboundGuard(allow_private=True, resolver=resolve_to_loopback)
    url = f"https://{HOST_NAME}:{port}/v1/chat/completions"
    body = direct_body(stream=False)
    headers = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
    host_clients = HostClients(make_client)
    closing_client = make_client()
    ways: dict[str, Callable[[], Any]] = {
        "pool per host name (now)": lambda: guard.request(host_clients, "POST", url, content=body, headers=headers),
        "Connection: close (before)": lambda: guard.request(closing_client, "POST", url, content=body, headers=headers),
    }
    # The provider process needs a moment to listen; the first requests also warm both ways up.
    for attempt in range(100):
        try:
            for send in ways.values():
                (await send()).raise_for_status()
            break
        except httpx.ConnectError:
            if attempt == 99:
                raise
            await asyncio.sleep(0.1)

    latencies: dict[str, list[float]] = {name: [] for name in ways}
    cpu: dict[str, float] = dict.fromkeys(ways, 0.0)
    while any(len(values) < requests for values in latencies.values()):
        for name, send in ways.items():
            started_cpu = time.process_time()
            for _ in range(min(batch, requests - len(latencies[name]))):
                started = time.perf_counter()
                response = await send()
                latencies[name].append((time.perf_counter() - started) * 1000)
                response.raise_for_status()
            cpu[name] += time.process_time() - started_cpu
    await host_clients.aclose()
    await closing_client.aclose()

    rows = []
    figures: dict[str, Any] = {}
    baseline = "Connection: close (before)"
    for name, values in latencies.items():
        figures[name] = {
            "p50_ms": percentile(values, 0.5),
            "p99_ms": percentile(values, 0.99),
            "cpu_ms_per_request": cpu[name] * 1000 / len(values),
            "requests": len(values),
        }
    for name, result in figures.items():
        rows.append(
            [
                name,
                result["p50_ms"],
                result["p50_ms"] / figures[baseline]["p50_ms"],
                result["p99_ms"],
                result["cpu_ms_per_request"],
                result["cpu_ms_per_request"] / figures[baseline]["cpu_ms_per_request"],
                result["requests"],
            ]
        )
    print(f"{cores}; {machine_description()}")
    print_table(
        "HTTPS provider requests through the guard, loopback",
        ["connections", "p50 ms", "p50 ratio", "p99 ms", "CPU ms/request", "CPU ratio", "requests"],
        rows,
    )
    print_json_line(
        "provider_tls",
        {"cores": cores, "machine": machine_description(), "results": figures, "settings": {"batch": batch}},
    )


async def _measure_streams(port: int, tls_context: ssl.SSLContext, requests: int, cores: str) -> None:
    """Stream `requests` replies one after another through `stream_chat` on the pooled client."""
    guard = OutboundGuard(allow_private=True, resolver=resolve_to_loopback)
    host_clients = HostClients(lambda: httpx.AsyncClient(verify=tls_context, trust_env=False, timeout=10.0))
    http = ProviderHttp(host_clients, guard)
    target = ProviderTarget(spec=PROVIDERS["openai"], base_url=f"https://{HOST_NAME}:{port}/v1", api_key="sk-bench")
    request = ChatRequest(
        model="bench-model",
        system_prompt=None,
        messages=[ChatMessage("user", "Tell me a story.")],
        parameters=ChatParameters(max_tokens=256),
    )

    async def accepted_connections() -> int:
        response = await guard.request(host_clients, "GET", f"https://{HOST_NAME}:{port}/connections")
        return int(response.text)

    async def stream_one() -> None:
        async for item in stream_chat(http, target, request):
            if isinstance(item, StreamEnd) and item.incomplete:
                raise RuntimeError("a streamed reply ended incomplete")

    for _ in range(20):  # warm-up
        await stream_one()
    before = await accepted_connections()
    latencies: list[float] = []
    started_cpu = time.process_time()
    for _ in range(requests):
        started = time.perf_counter()
        await stream_one()
        latencies.append((time.perf_counter() - started) * 1000)
    cpu_ms = (time.process_time() - started_cpu) * 1000 / requests
    opened = await accepted_connections() - before
    await host_clients.aclose()

    figures = {
        "p50_ms": percentile(latencies, 0.5),
        "p99_ms": percentile(latencies, 0.99),
        "cpu_ms_per_reply": cpu_ms,
        "connections_per_reply": opened / requests,
        "replies": requests,
    }
    print_table(
        f"Streamed replies of {STREAM_CHUNKS} chunks over HTTPS through stream_chat, loopback",
        ["p50 ms", "p99 ms", "CPU ms/reply", "connections/reply", "replies"],
        [[figures["p50_ms"], figures["p99_ms"], cpu_ms, figures["connections_per_reply"], requests]],
    )
    print_json_line("provider_tls_streams", {"cores": cores, "machine": machine_description(), "results": figures})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per way (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=100, help="requests per alternating batch (default: %(default)s)")
    parser.add_argument(
        "--stream-requests", type=int, default=1000, help="streamed replies to measure (default: %(default)s)"
    )
    arguments = parser.parse_args()
    run_async(measure(arguments.requests, arguments.batch, arguments.stream_requests))


if __name__ == "__main__":
    main()
