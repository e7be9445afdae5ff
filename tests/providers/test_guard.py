"""Tests for the outbound guard on provider URLs.

Host names other than `localhost` are resolved only by fake resolvers, and every HTTP request goes through
`LoopbackOnlyTransport`, which connects to 127.0.0.1 only. The end-to-end tests use HTTP and HTTPS servers
started here on 127.0.0.1; nothing is sent to any other address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pocketllm.errors import InvalidInput
from pocketllm.providers.errors import ProviderRequestFailed
from pocketllm.providers.guard import HostClients, OutboundGuard, ProviderUnreachable, ProviderUrlNotAllowed
from pocketllm.providers.http import ProviderHttp
from pocketllm.providers.network import ProviderTransport

METADATA_LOCATION = "http://169.254.169.254/latest/meta-data/iam/security-credentials/"
PRIVATE_HINT = "ALLOW_PRIVATE_PROVIDER_URLS=true"


# Fake resolvers


class FakeResolver:
    """Returns the configured answers per host name; later calls for a name get its next answer, or the last one."""

    def __init__(self, answers: dict[str, list[list[str]]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        if host not in self.answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        answers = self.answers[host]
        calls_for_host = sum(1 for called_host, _ in self.calls if called_host == host)
        return answers[min(calls_for_host, len(answers)) - 1]


def resolver_for(**names: list[str]) -> FakeResolver:
    """Build a resolver with one fixed answer per name. The keyword `a_b` is the name `a.b`."""
    return FakeResolver({name.replace("_", "."): [addresses] for name, addresses in names.items()})


async def unused_resolver(host: str, port: int) -> list[str]:
    raise AssertionError(f"the resolver must not be called, but was called for {host}:{port}")


# Test servers on 127.0.0.1


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class ProviderStub:
    """A provider stand-in on 127.0.0.1 that records every request and every TLS server name it receives."""

    tls_context: ssl.SSLContext | None = None
    requests: list[RecordedRequest] = field(default_factory=list)
    server_names: list[str | None] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _RecordingHandler)
        server.daemon_threads = True
        setattr(server, "stub", self)  # noqa: B010  (read back by the handler)
        if self.tls_context is not None:
            self.tls_context.sni_callback = self._record_server_name
            server.socket = self.tls_context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="provider-stub", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        assert self._server is not None
        assert self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _record_server_name(self, connection: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext) -> None:
        self.server_names.append(server_name)


class _RecordingHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._record_and_answer()

    def do_POST(self) -> None:
        self._record_and_answer()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep the test output clean

    def _record_and_answer(self) -> None:
        stub: ProviderStub = getattr(self.server, "stub")  # noqa: B009
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        headers = {name.lower(): value for name, value in self.headers.items()}
        stub.requests.append(RecordedRequest(self.command, self.path, headers, body))

        if self.path.startswith("/redirect"):
            self._answer(302, b"", {"Location": METADATA_LOCATION})
        elif self.path.startswith("/events"):
            self._answer(200, b"data: one\n\ndata: two\n\n", {"Content-Type": "text/event-stream"})
        else:
            self._answer(200, b'{"ok": true}', {"Content-Type": "application/json"})

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class LoopbackOnlyTransport(httpx.AsyncBaseTransport):
    """Records every request and connects only to 127.0.0.1, failing any request for another host."""

    def __init__(self, verify: ssl.SSLContext | None = None) -> None:
        # The server's own transport, so that connections and TLS handshakes run as in production.
        context = verify if verify is not None else ssl.create_default_context()
        self._inner = ProviderTransport(ssl_context=context, limits=httpx.Limits())
        self.requests: list[httpx.Request] = []

    @property
    def hosts(self) -> list[str]:
        return [request.url.host for request in self.requests]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.host != "127.0.0.1":
            raise httpx.ConnectError(f"the test transport connects to 127.0.0.1 only, not {request.url.host}")
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class CertificateFiles:
    ca_pem: str
    certificate: Path
    key: Path


def issue_certificate(directory: Path, dns_names: list[str]) -> CertificateFiles:
    """Create a throwaway CA and a server certificate for `dns_names` (no IP address in it)."""
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "PocketLLM guard test CA")])
    ca_certificate = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name) for name in dns_names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    certificate_path = directory / "server.pem"
    key_path = directory / "server.key"
    certificate_path.write_bytes(server_certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    ca_pem = ca_certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
    return CertificateFiles(ca_pem=ca_pem, certificate=certificate_path, key=key_path)


@pytest.fixture
def http_stub() -> Iterator[ProviderStub]:
    stub = ProviderStub()
    stub.start()
    yield stub
    stub.stop()


@pytest.fixture
def transport() -> LoopbackOnlyTransport:
    return LoopbackOnlyTransport()


@pytest.fixture
async def client(transport: LoopbackOnlyTransport) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=transport, trust_env=False, timeout=5) as http:
        yield http


async def rejection(guard: OutboundGuard, url: str) -> ProviderUrlNotAllowed:
    """Run `guard.check(url)` and return the ProviderUrlNotAllowed it must raise."""
    with pytest.raises(ProviderUrlNotAllowed) as caught:
        await guard.check(url)
    return caught.value


# Error classes


def test_errors_are_invalid_input_with_codes() -> None:
    assert issubclass(ProviderUrlNotAllowed, InvalidInput)
    assert issubclass(ProviderUnreachable, InvalidInput)
    assert ProviderUrlNotAllowed.status_code == 400
    assert ProviderUnreachable.status_code == 400
    assert ProviderUrlNotAllowed.code == "provider_url_not_allowed"
    assert ProviderUnreachable.code == "provider_unreachable"


# URL rules


@pytest.mark.parametrize(
    "url",
    [
        "ftp://provider.test/",
        "file:///etc/passwd",
        "gopher://provider.test/",
        "ws://provider.test/",
        "//provider.test/v1",
        "provider.test/v1",
    ],
)
async def test_check_rejects_non_http_scheme(url: str) -> None:
    error = await rejection(OutboundGuard(allow_private=True, resolver=unused_resolver), url)

    assert "http:// or https://" in error.message


@pytest.mark.parametrize("url", ["http://", "http:///v1", "https:provider.test"])
async def test_check_rejects_missing_host(url: str) -> None:
    error = await rejection(OutboundGuard(allow_private=True, resolver=unused_resolver), url)

    assert "no host" in error.message


@pytest.mark.parametrize(
    "url",
    [
        "http://someone:topsecret@provider.test/",
        "https://someone@provider.test/",
        "https://:topsecret@provider.test/",
    ],
)
async def test_check_rejects_userinfo(url: str) -> None:
    error = await rejection(OutboundGuard(allow_private=True, resolver=unused_resolver), url)

    assert "user name or password" in error.message
    assert "topsecret" not in error.message
    assert "someone" not in error.message


@pytest.mark.parametrize(
    "url", ["http://provider.test:0/", "http://provider.test:65536/", "http://provider.test:99999/"]
)
async def test_check_rejects_port_out_of_range(url: str) -> None:
    error = await rejection(OutboundGuard(allow_private=True, resolver=unused_resolver), url)

    assert "1 to 65535" in error.message


@pytest.mark.parametrize("port", [1, 65535])
async def test_check_accepts_port_range_ends(port: int) -> None:
    guard = OutboundGuard(allow_private=False, resolver=resolver_for(provider_test=["104.18.6.192"]))

    target = await guard.check(f"https://provider.test:{port}/v1")

    assert target.port == port


@pytest.mark.parametrize(
    ("url", "message_part"),
    [
        ("http://provider .test/", "not a valid host name"),
        ("http://1.2.3.4.5/", "not a valid IPv4 address"),
        ("http://256.0.0.1/", "not a valid URL"),
        ("http://0x100.0.0.1/", "not a valid IPv4 address"),
        ("http://1.256.1/", "not a valid IPv4 address"),
        ("http://4294967296/", "not a valid IPv4 address"),
        ("http://[::1/", "not a valid URL"),
        ("http://[fe80::1%25eth0]/", "zone identifier"),
    ],
)
async def test_check_rejects_invalid_host(url: str, message_part: str) -> None:
    error = await rejection(OutboundGuard(allow_private=True, resolver=unused_resolver), url)

    assert message_part in error.message


@pytest.mark.parametrize(
    "url",
    [
        "http://someone:topsecret@provider.test/?api_key=topsecret",
        "ftp://provider.test/?api_key=topsecret",
        "http://provider.test:0/?api_key=topsecret",
        "http://10.0.0.1/v1?api_key=topsecret",
        "http://169.254.169.254/latest?token=topsecret",
        "http://metadata.google.internal/?token=topsecret",
        "http://[::1/?api_key=topsecret",
    ],
)
async def test_check_message_omits_secrets(url: str) -> None:
    error = await rejection(OutboundGuard(allow_private=False, resolver=unused_resolver), url)

    assert "topsecret" not in error.message
    assert "api_key" not in error.message
    assert "token" not in error.message


# Cloud metadata: blocked even with private addresses allowed


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://169.254.170.2/v2/credentials",
        "http://100.100.100.200/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[2002:a9fe:a9fe::1]/",
        "http://2852039166/",
        "http://0xa9fea9fe/",
        "http://169.254.43518/",
    ],
)
async def test_check_blocks_metadata_address_always(url: str) -> None:
    error = await rejection(OutboundGuard(allow_private=True, resolver=unused_resolver), url)

    assert "cloud metadata" in error.message
    assert "always blocked" in error.message


@pytest.mark.parametrize(
    "url", ["http://metadata.google.internal/", "http://METADATA.Google.Internal./", "http://metadata/"]
)
async def test_check_blocks_metadata_host_name_always(url: str) -> None:
    error = await rejection(OutboundGuard(allow_private=True, resolver=unused_resolver), url)

    assert "cloud metadata server" in error.message


@pytest.mark.parametrize("metadata_address", ["169.254.169.254", "fd00:ec2::254"])
async def test_check_blocks_name_resolving_to_metadata(metadata_address: str) -> None:
    guard = OutboundGuard(allow_private=True, resolver=resolver_for(provider_test=[metadata_address]))

    error = await rejection(guard, "https://provider.test/v1")

    assert "resolves to a cloud metadata address" in error.message


# Loopback, in every spelling


LOOPBACK_URLS = [
    ("http://127.0.0.1:11434/", "127.0.0.1"),
    ("http://127.255.255.254/", "127.255.255.254"),
    ("http://127.0.0.1./", "127.0.0.1"),
    ("http://2130706433/", "127.0.0.1"),
    ("http://0x7f000001/", "127.0.0.1"),
    ("http://017700000001/", "127.0.0.1"),
    ("http://0x7f.1/", "127.0.0.1"),
    ("http://0177.1/", "127.0.0.1"),
    ("http://127.1/", "127.0.0.1"),
    ("http://127.0.1/", "127.0.0.1"),
    ("http://[::1]:11434/", "::1"),
    ("http://[0:0:0:0:0:0:0:1]/", "::1"),
    ("http://[::ffff:127.0.0.1]/", "::ffff:7f00:1"),
    ("http://[::ffff:7f00:1]/", "::ffff:7f00:1"),
    ("http://[::127.0.0.1]/", "::7f00:1"),
    ("http://[64:ff9b::127.0.0.1]/", "64:ff9b::7f00:1"),
    ("http://[2002:7f00:1::1]/", "2002:7f00:1::1"),
]


@pytest.mark.parametrize(("url", "address"), LOOPBACK_URLS)
async def test_check_blocks_loopback_literal(url: str, address: str) -> None:
    error = await rejection(OutboundGuard(allow_private=False, resolver=unused_resolver), url)

    assert "loopback" in error.message
    assert PRIVATE_HINT in error.message


@pytest.mark.parametrize(("url", "address"), LOOPBACK_URLS)
async def test_check_allows_loopback_literal_when_private_allowed(url: str, address: str) -> None:
    guard = OutboundGuard(allow_private=True, resolver=unused_resolver)

    target = await guard.check(url)

    assert target.address == address
    assert target.host_is_ip_address


async def test_check_blocks_localhost() -> None:
    # The default resolver, so `localhost` resolves through the system (/etc/hosts) as in production.
    error = await rejection(OutboundGuard(allow_private=False), "http://localhost:11434/v1")

    assert "'localhost' resolves to a loopback address" in error.message
    assert PRIVATE_HINT in error.message


async def test_check_allows_localhost_when_private_allowed() -> None:
    target = await OutboundGuard(allow_private=True).check("http://localhost:11434/v1")

    assert ipaddress.ip_address(target.address).is_loopback
    assert target.host == "localhost"
    assert not target.host_is_ip_address


# Private and other special-purpose ranges


PRIVATE_URLS = [
    ("http://10.0.0.1/", "private network"),
    ("http://10.255.255.255/", "private network"),
    ("http://0xa000001/", "private network"),
    ("http://172.16.0.1/", "private network"),
    ("http://172.31.255.255/", "private network"),
    ("http://192.168.0.1/", "private network"),
    ("http://192.168.255.255/", "private network"),
    ("http://100.64.0.1/", "shared (carrier-grade NAT)"),
    ("http://100.127.255.255/", "shared (carrier-grade NAT)"),
    ("http://169.254.0.1/", "link-local"),
    ("http://169.254.255.254/", "link-local"),
    ("http://224.0.0.251/", "multicast"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://0/", "unspecified"),
    ("http://240.0.0.1/", "reserved"),
    ("http://255.255.255.255/", "reserved"),
    ("http://192.0.2.1/", "reserved or special-purpose"),
    ("http://[fc00::1]/", "private network"),
    ("http://[fd12:3456:789a::1]/", "private network"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[ff02::1]/", "multicast"),
    ("http://[::]/", "unspecified"),
    ("http://[2001:db8::1]/", "reserved or special-purpose"),
    ("http://[::ffff:10.0.0.1]/", "private network"),
    ("http://[::ffff:192.168.1.1]/", "private network"),
    ("http://[64:ff9b::10.1.2.3]/", "private network"),
    ("http://[2002:c0a8:101::1]/", "private network"),
]


@pytest.mark.parametrize(("url", "reason"), PRIVATE_URLS)
async def test_check_blocks_private_literal(url: str, reason: str) -> None:
    error = await rejection(OutboundGuard(allow_private=False, resolver=unused_resolver), url)

    assert reason in error.message
    assert PRIVATE_HINT in error.message


@pytest.mark.parametrize(("url", "reason"), PRIVATE_URLS)
async def test_check_allows_private_literal_when_private_allowed(url: str, reason: str) -> None:
    target = await OutboundGuard(allow_private=True, resolver=unused_resolver).check(url)

    assert target.host_is_ip_address


async def test_cached_literal_follows_each_guard() -> None:
    # The parsed URL is cached across guards; whether private addresses are allowed is not part of it.
    allowing = OutboundGuard(allow_private=True, resolver=unused_resolver)
    blocking = OutboundGuard(allow_private=False, resolver=unused_resolver)
    url = "http://10.20.30.40:8080/v1"

    first = await allowing.check(url)
    await rejection(blocking, url)
    second = await allowing.check(url)
    await rejection(blocking, url)

    assert first.address == second.address == "10.20.30.40"
    assert str(second.pinned) == "http://10.20.30.40:8080/v1"


@pytest.mark.parametrize(
    "url",
    [
        "https://104.18.6.192/v1",
        "https://11.0.0.1/",
        "https://172.15.255.255/",
        "https://172.32.0.1/",
        "https://100.63.255.255/",
        "https://100.128.0.1/",
        "https://192.169.0.1/",
        "https://[2606:4700:4700::1111]/",
        "https://[::ffff:104.18.6.192]/",
        "https://[2002:6812:6c0::1]/",
    ],
)
async def test_check_accepts_public_literal(url: str) -> None:
    target = await OutboundGuard(allow_private=False, resolver=unused_resolver).check(url)

    assert target.host_is_ip_address


# Host names resolved by the injected resolver


async def test_check_returns_target_for_public_name() -> None:
    resolver = resolver_for(api_provider_test=["104.18.6.192", "2606:4700::6812:6c0", "104.18.6.192"])
    guard = OutboundGuard(allow_private=False, resolver=resolver)
    url = "https://API.Provider.test/v1/chat/completions?api-version=1"

    target = await guard.check(url)

    assert target.url == url
    assert target.scheme == "https"
    assert target.host == "api.provider.test"
    assert target.port == 443
    assert target.address == "104.18.6.192"
    assert str(target.pinned) == "https://104.18.6.192/v1/chat/completions?api-version=1"
    assert not target.host_is_ip_address
    assert resolver.calls == [("api.provider.test", 443)]


async def test_check_uses_port_80_for_http() -> None:
    guard = OutboundGuard(allow_private=False, resolver=resolver_for(provider_test=["104.18.6.192"]))

    target = await guard.check("http://provider.test/v1")

    assert target.port == 80
    assert target.scheme == "http"


@pytest.mark.parametrize(
    ("addresses", "reason"),
    [
        (["104.18.6.192", "10.0.0.5"], "private network"),
        (["10.0.0.5", "104.18.6.192"], "private network"),
        (["2606:4700::6812:6c0", "::1"], "loopback"),
        (["104.18.6.192", "::ffff:192.168.0.10"], "private network"),
        (["104.18.6.192", "100.64.1.1"], "shared (carrier-grade NAT)"),
    ],
)
async def test_check_blocks_name_with_any_private_address(addresses: list[str], reason: str) -> None:
    guard = OutboundGuard(allow_private=False, resolver=resolver_for(mixed_provider_test=addresses))

    error = await rejection(guard, "https://mixed.provider.test/v1")

    assert f"'mixed.provider.test' resolves to a {reason}" in error.message
    assert PRIVATE_HINT in error.message


async def test_check_blocks_mixed_metadata_when_private_allowed() -> None:
    resolver = resolver_for(mixed_provider_test=["10.0.0.5", "169.254.169.254"])
    guard = OutboundGuard(allow_private=True, resolver=resolver)

    error = await rejection(guard, "https://mixed.provider.test/v1")

    assert "cloud metadata" in error.message


async def test_check_allows_private_name_when_private_allowed() -> None:
    guard = OutboundGuard(allow_private=True, resolver=resolver_for(ollama_lan=["192.168.1.20", "fd00::20"]))

    target = await guard.check("http://ollama.lan:11434/v1")

    assert target.address == "192.168.1.20"


# Resolution failures


async def test_check_raises_unreachable_for_unknown_name() -> None:
    guard = OutboundGuard(allow_private=False, resolver=resolver_for())

    with pytest.raises(ProviderUnreachable) as caught:
        await guard.check("https://missing.provider.test/v1?api_key=topsecret")

    assert "'missing.provider.test' could not be resolved" in caught.value.message
    assert "topsecret" not in caught.value.message


async def test_check_raises_unreachable_for_empty_answer() -> None:
    guard = OutboundGuard(allow_private=False, resolver=resolver_for(empty_provider_test=[]))

    with pytest.raises(ProviderUnreachable) as caught:
        await guard.check("https://empty.provider.test/v1")

    assert "no IPv4 or IPv6 address" in caught.value.message


async def test_check_raises_unreachable_on_resolve_timeout() -> None:
    async def slow_resolver(host: str, port: int) -> list[str]:
        await asyncio.sleep(10)
        return ["104.18.6.192"]

    guard = OutboundGuard(allow_private=False, resolver=slow_resolver, resolve_timeout=0.05)

    with pytest.raises(ProviderUnreachable) as caught:
        await guard.check("https://slow.provider.test/v1")

    assert "timed out" in caught.value.message


# End to end against a server on 127.0.0.1


async def test_request_sends_to_checked_address_with_host_header(
    http_stub: ProviderStub, client: httpx.AsyncClient, transport: LoopbackOnlyTransport
) -> None:
    guard = OutboundGuard(allow_private=True, resolver=resolver_for(provider_test=["127.0.0.1"]))
    url = f"http://provider.test:{http_stub.port}/v1/chat?x=1"
    # httpx 0.29 replaces the URL's query with `params`; the guard must send what httpx itself would.
    expected_path = client.build_request("POST", url, params={"y": "2"}).url.raw_path.decode("ascii")

    response = await guard.request(
        client,
        "POST",
        url,
        params={"y": "2"},
        headers={"Authorization": "Bearer test-key"},
        json={"model": "m"},
        timeout=httpx.Timeout(2.5),
    )

    assert response.status_code == 200
    assert response.json() == {"ok": True}
    assert transport.hosts == ["127.0.0.1"]
    # The request's own timeout, not the client's 5 s.
    assert transport.requests[0].extensions["timeout"]["read"] == 2.5
    assert len(http_stub.requests) == 1
    seen = http_stub.requests[0]
    assert seen.method == "POST"
    assert seen.path == expected_path
    assert seen.path == "/v1/chat?y=2"
    assert seen.headers["host"] == f"provider.test:{http_stub.port}"
    assert seen.headers["authorization"] == "Bearer test-key"
    assert json.loads(seen.body) == {"model": "m"}


async def test_request_takes_client_headers_and_timeout(
    http_stub: ProviderStub, transport: LoopbackOnlyTransport
) -> None:
    guard = OutboundGuard(allow_private=True, resolver=resolver_for(provider_test=["127.0.0.1"]))
    timeout = httpx.Timeout(7.0, connect=3.0)
    async with httpx.AsyncClient(
        transport=transport, trust_env=False, timeout=timeout, headers={"Accept-Encoding": "identity"}
    ) as client:
        response = await guard.request(
            client, "GET", f"http://provider.test:{http_stub.port}/v1/models", headers={"X-Api-Key": "test-key"}
        )

    assert response.status_code == 200
    assert transport.requests[0].extensions["timeout"] == timeout.as_dict()
    seen = http_stub.requests[0].headers
    assert seen["accept-encoding"] == "identity"
    assert seen["x-api-key"] == "test-key"
    assert seen["user-agent"].startswith("python-httpx/")


async def test_request_keeps_url_query(
    http_stub: ProviderStub, client: httpx.AsyncClient, transport: LoopbackOnlyTransport
) -> None:
    guard = OutboundGuard(allow_private=True, resolver=resolver_for(provider_test=["127.0.0.1"]))

    response = await guard.request(client, "GET", f"http://provider.test:{http_stub.port}/v1/models?api-version=2")

    assert response.status_code == 200
    assert [request.path for request in http_stub.requests] == ["/v1/models?api-version=2"]


async def test_request_to_ip_literal_keeps_host_header(
    http_stub: ProviderStub, client: httpx.AsyncClient, transport: LoopbackOnlyTransport
) -> None:
    guard = OutboundGuard(allow_private=True, resolver=unused_resolver)

    response = await guard.request(client, "GET", f"http://127.0.0.1:{http_stub.port}/v1/models")

    assert response.status_code == 200
    assert transport.hosts == ["127.0.0.1"]
    assert [request.headers["host"] for request in http_stub.requests] == [f"127.0.0.1:{http_stub.port}"]


@pytest.mark.parametrize("host", ["127.0.0.1", "provider.test"])
async def test_request_rejected_before_connecting(
    host: str, http_stub: ProviderStub, client: httpx.AsyncClient, transport: LoopbackOnlyTransport
) -> None:
    guard = OutboundGuard(allow_private=False, resolver=resolver_for(provider_test=["127.0.0.1"]))

    with pytest.raises(ProviderUrlNotAllowed):
        await guard.request(client, "GET", f"http://{host}:{http_stub.port}/v1/models")
    with pytest.raises(ProviderUrlNotAllowed):
        async with guard.stream(client, "GET", f"http://{host}:{http_stub.port}/events"):
            pass

    assert transport.requests == []
    assert http_stub.requests == []


async def test_request_does_not_follow_redirect(
    http_stub: ProviderStub, client: httpx.AsyncClient, transport: LoopbackOnlyTransport
) -> None:
    guard = OutboundGuard(allow_private=True, resolver=resolver_for(provider_test=["127.0.0.1"]))

    response = await guard.request(client, "GET", f"http://provider.test:{http_stub.port}/redirect")

    assert response.status_code == 302
    assert response.headers["location"] == METADATA_LOCATION
    assert transport.hosts == ["127.0.0.1"]
    assert [request.path for request in http_stub.requests] == ["/redirect"]


async def test_stream_does_not_follow_redirect(
    http_stub: ProviderStub, client: httpx.AsyncClient, transport: LoopbackOnlyTransport
) -> None:
    guard = OutboundGuard(allow_private=True, resolver=resolver_for(provider_test=["127.0.0.1"]))

    async with guard.stream(client, "POST", f"http://provider.test:{http_stub.port}/redirect", json={}) as response:
        status = response.status_code

    assert status == 302
    assert transport.hosts == ["127.0.0.1"]
    assert [request.path for request in http_stub.requests] == ["/redirect"]


async def test_stream_yields_server_sent_events(
    http_stub: ProviderStub, client: httpx.AsyncClient, transport: LoopbackOnlyTransport
) -> None:
    guard = OutboundGuard(allow_private=True, resolver=resolver_for(provider_test=["127.0.0.1"]))

    async with guard.stream(
        client, "POST", f"http://provider.test:{http_stub.port}/events", json={"stream": True}
    ) as response:
        lines = [line async for line in response.aiter_lines()]

    assert response.is_closed
    assert response.headers["content-type"] == "text/event-stream"
    assert [line for line in lines if line] == ["data: one", "data: two"]
    assert http_stub.requests[0].headers["host"] == f"provider.test:{http_stub.port}"
    assert transport.hosts == ["127.0.0.1"]


@pytest.mark.parametrize("rebound_address", ["10.0.0.1", "169.254.169.254"])
async def test_request_pinned_against_dns_rebinding(
    rebound_address: str, http_stub: ProviderStub, client: httpx.AsyncClient, transport: LoopbackOnlyTransport
) -> None:
    # The first lookup passes the check; any later lookup (by httpx, say) would name another address.
    resolver = FakeResolver({"rebind.provider.test": [["127.0.0.1"], [rebound_address]]})
    guard = OutboundGuard(allow_private=True, resolver=resolver)

    response = await guard.request(client, "GET", f"http://rebind.provider.test:{http_stub.port}/v1/models")

    assert response.status_code == 200
    assert resolver.calls == [("rebind.provider.test", http_stub.port)]
    assert transport.hosts == ["127.0.0.1"]
    assert [request.headers["host"] for request in http_stub.requests] == [f"rebind.provider.test:{http_stub.port}"]


async def test_next_request_rechecks_rebound_name(
    http_stub: ProviderStub, client: httpx.AsyncClient, transport: LoopbackOnlyTransport
) -> None:
    resolver = FakeResolver({"rebind.provider.test": [["127.0.0.1"], ["169.254.169.254"]]})
    guard = OutboundGuard(allow_private=True, resolver=resolver)
    url = f"http://rebind.provider.test:{http_stub.port}/v1/models"

    first = await guard.request(client, "GET", url)
    with pytest.raises(ProviderUrlNotAllowed):
        await guard.request(client, "GET", url)

    assert first.status_code == 200
    assert len(resolver.calls) == 2
    assert transport.hosts == ["127.0.0.1"]
    assert len(http_stub.requests) == 1


# HTTPS: the certificate is verified for the host name, not the pinned address


def start_tls_stub(directory: Path, dns_names: list[str]) -> tuple[ProviderStub, ssl.SSLContext]:
    """Start an HTTPS stub with a certificate for `dns_names`; return it and a client context trusting its CA."""
    files = issue_certificate(directory, dns_names)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(files.certificate, files.key)
    stub = ProviderStub(tls_context=server_context)
    stub.start()
    return stub, ssl.create_default_context(cadata=files.ca_pem)


async def test_https_verifies_certificate_for_host_name(tmp_path: Path) -> None:
    stub, client_context = start_tls_stub(tmp_path, ["provider.test"])
    transport = LoopbackOnlyTransport(verify=client_context)
    guard = OutboundGuard(allow_private=True, resolver=resolver_for(provider_test=["127.0.0.1"]))
    try:
        async with httpx.AsyncClient(transport=transport, trust_env=False, timeout=5) as client:
            response = await guard.request(client, "GET", f"https://provider.test:{stub.port}/v1/models")
    finally:
        stub.stop()

    # The certificate names only provider.test, so verifying it against 127.0.0.1 would have failed.
    assert response.status_code == 200
    assert transport.hosts == ["127.0.0.1"]
    assert transport.requests[0].extensions["sni_hostname"] == "provider.test"
    assert stub.server_names == ["provider.test"]
    assert stub.requests[0].headers["host"] == f"provider.test:{stub.port}"
    assert stub.requests[0].headers["connection"] == "close"


async def test_https_rejects_certificate_for_other_name(tmp_path: Path) -> None:
    stub, client_context = start_tls_stub(tmp_path, ["other.test"])
    transport = LoopbackOnlyTransport(verify=client_context)
    guard = OutboundGuard(allow_private=True, resolver=resolver_for(provider_test=["127.0.0.1"]))
    try:
        async with httpx.AsyncClient(transport=transport, trust_env=False, timeout=5) as client:
            with pytest.raises(httpx.ConnectError) as caught:
                await guard.request(client, "GET", f"https://provider.test:{stub.port}/v1/models")
    finally:
        stub.stop()

    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    assert stub.server_names == ["provider.test"]
    assert stub.requests == []


async def test_https_connection_not_reused_across_names(tmp_path: Path) -> None:
    # Both names resolve to 127.0.0.1; a pooled connection verified for one must not carry the other.
    stub, client_context = start_tls_stub(tmp_path, ["a.provider.test", "b.provider.test"])
    transport = LoopbackOnlyTransport(verify=client_context)
    resolver = resolver_for(a_provider_test=["127.0.0.1"], b_provider_test=["127.0.0.1"])
    guard = OutboundGuard(allow_private=True, resolver=resolver)
    try:
        async with httpx.AsyncClient(transport=transport, trust_env=False, timeout=5) as client:
            first = await guard.request(client, "GET", f"https://a.provider.test:{stub.port}/v1/models")
            second = await guard.request(client, "GET", f"https://b.provider.test:{stub.port}/v1/models")
    finally:
        stub.stop()

    assert first.status_code == 200
    assert second.status_code == 200
    assert stub.server_names == ["a.provider.test", "b.provider.test"]
    assert [request.headers["host"] for request in stub.requests] == [
        f"a.provider.test:{stub.port}",
        f"b.provider.test:{stub.port}",
    ]


# HTTPS through HostClients: connections are kept per host name


def host_clients(
    client_context: ssl.SSLContext, *, max_hosts: int = 8
) -> tuple[HostClients, list[LoopbackOnlyTransport]]:
    """HostClients whose clients connect to 127.0.0.1 only; also returns every transport they were given."""
    transports: list[LoopbackOnlyTransport] = []

    def make_client() -> httpx.AsyncClient:
        transport = LoopbackOnlyTransport(verify=client_context)
        transports.append(transport)
        return httpx.AsyncClient(transport=transport, trust_env=False, timeout=5)

    return HostClients(make_client, max_hosts=max_hosts), transports


async def test_https_connection_reused_for_same_name(tmp_path: Path) -> None:
    stub, client_context = start_tls_stub(tmp_path, ["provider.test"])
    clients, _ = host_clients(client_context)
    guard = OutboundGuard(allow_private=True, resolver=resolver_for(provider_test=["127.0.0.1"]))
    try:
        for _ in range(3):
            response = await guard.request(clients, "GET", f"https://provider.test:{stub.port}/v1/models")
            assert response.status_code == 200
    finally:
        await clients.aclose()
        stub.stop()

    # One TLS handshake for three requests, each verified for the name and sent to the checked address.
    assert stub.server_names == ["provider.test"]
    assert len(stub.requests) == 3
    assert [request.headers["connection"] for request in stub.requests] == ["keep-alive"] * 3


async def request_names(stub: ProviderStub, clients: HostClients, names: list[str]) -> list[int]:
    """Send GET /v1/models to `<name>.provider.test` for each name in turn (all resolve to 127.0.0.1), then
    close the clients and the stub and return the status codes."""
    resolver = resolver_for(a_provider_test=["127.0.0.1"], b_provider_test=["127.0.0.1"])
    guard = OutboundGuard(allow_private=True, resolver=resolver)
    statuses: list[int] = []
    try:
        for name in names:
            response = await guard.request(clients, "GET", f"https://{name}.provider.test:{stub.port}/v1/models")
            statuses.append(response.status_code)
    finally:
        await clients.aclose()
        stub.stop()
    return statuses


async def test_host_clients_keep_names_apart(tmp_path: Path) -> None:
    # Both names resolve to 127.0.0.1; each keeps its own connection, verified for its own name.
    stub, client_context = start_tls_stub(tmp_path, ["a.provider.test", "b.provider.test"])
    clients, transports = host_clients(client_context)
    statuses = await request_names(stub, clients, ["a", "b", "a", "b"])

    assert statuses == [200] * 4

    assert stub.server_names == ["a.provider.test", "b.provider.test"]
    assert [request.headers["host"] for request in stub.requests] == [
        f"{name}.provider.test:{stub.port}" for name in ("a", "b", "a", "b")
    ]
    # The shared client (made first) sent nothing; each name had a client of its own.
    assert [transport.hosts for transport in transports] == [[], ["127.0.0.1"] * 2, ["127.0.0.1"] * 2]


async def test_host_clients_past_limit_close_connections(tmp_path: Path) -> None:
    stub, client_context = start_tls_stub(tmp_path, ["a.provider.test", "b.provider.test"])
    clients, _ = host_clients(client_context, max_hosts=1)
    statuses = await request_names(stub, clients, ["a", "b", "b", "a"])

    assert statuses == [200] * 4

    # The second name found no room, so each of its requests used and closed a connection of its own.
    assert stub.server_names == ["a.provider.test", "b.provider.test", "b.provider.test"]
    assert [request.headers["connection"] for request in stub.requests] == [
        "keep-alive",
        "close",
        "close",
        "keep-alive",
    ]


async def test_plain_http_uses_shared_client(http_stub: ProviderStub) -> None:
    clients, transports = host_clients(ssl.create_default_context())
    guard = OutboundGuard(allow_private=True, resolver=resolver_for(provider_test=["127.0.0.1"]))
    try:
        response = await guard.request(clients, "GET", f"http://provider.test:{http_stub.port}/v1/models")
    finally:
        await clients.aclose()

    assert response.status_code == 200
    assert [transport.hosts for transport in transports] == [["127.0.0.1"]]


async def test_unverified_certificate_named_in_provider_error(tmp_path: Path) -> None:
    stub, client_context = start_tls_stub(tmp_path, ["other.test"])
    transport = LoopbackOnlyTransport(verify=client_context)
    guard = OutboundGuard(allow_private=True, resolver=resolver_for(provider_test=["127.0.0.1"]))
    try:
        async with httpx.AsyncClient(transport=transport, trust_env=False, timeout=5) as client:
            with pytest.raises(ProviderRequestFailed) as caught:
                await ProviderHttp(client, guard).request_json(
                    "GET", f"https://provider.test:{stub.port}/v1/models", provider="custom", secret=None
                )
    finally:
        stub.stop()

    assert caught.value.message == (
        "The TLS certificate of custom could not be verified (Hostname mismatch, certificate is not valid "
        "for 'provider.test'.); check the base URL and the server's certificate."
    )
    assert stub.requests == []
