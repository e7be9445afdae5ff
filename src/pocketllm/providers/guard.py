"""Outbound guard for requests to user-supplied provider URLs (protection against server-side request forgery).

Users can save any base URL for a provider, and the server then calls it with their key. Every such call
goes through `OutboundGuard`, which:

* accepts only http(s) URLs with a host, a port in 1-65535 and no user name or password;
* resolves the host and requires every resolved address to be allowed. Cloud metadata addresses are
  always blocked. Loopback, private, link-local, multicast, unspecified, reserved and shared (100.64/10)
  addresses are blocked unless the operator sets ALLOW_PRIVATE_PROVIDER_URLS=true;
* sends the request to the address it checked, so DNS rebinding cannot move it elsewhere. The URL host is
  replaced by that address, the original host name goes in the `Host` header and, for https, in the TLS
  server name (the `sni_hostname` request extension), so the certificate is still verified for the name;
* never follows redirects. A 3xx response is returned as is, and callers must treat it as an error.

The shared `httpx.AsyncClient` passed to the guard must not use a proxy (create it with `trust_env=False`):
a forward proxy connects on its own, and httpcore 1.0.9 ignores `sni_hostname` when tunnelling https through
an HTTP proxy, so certificate verification fails there.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from pocketllm.errors import InvalidInput
from pocketllm.providers.network import ProviderClient

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Resolves (host, port) to IP address strings. Raises socket.gaierror when the name does not resolve.
Resolver = Callable[[str, int], Awaitable[list[str]]]

ALLOWED_SCHEMES = ("http", "https")
# How many HTTPS host names get a connection pool of their own (see HostClients); users can name any host.
MAX_HOST_CLIENTS = 256
# How many provider URLs keep their parsed form and rule checks (see _parse_provider_url).
PARSED_URL_CACHE_SIZE = 256
DEFAULT_PORTS = {"http": 80, "https": 443}
# Two attempts at glibc's default 5-second resolver timeout (resolv.conf `timeout:5`, `attempts:2`).
DEFAULT_RESOLVE_TIMEOUT_SECONDS = 10.0
ALLOW_PRIVATE_HINT = (
    "Set ALLOW_PRIVATE_PROVIDER_URLS=true on the server to allow private and loopback addresses, "
    "for example for a local Ollama server."
)

# Blocked even when private addresses are allowed.
# 169.254.169.254 and fd00:ec2::254: instance metadata of AWS (IMDS, IPv4 and IPv6), also used by Google
# Cloud, Azure, Oracle Cloud and DigitalOcean. 169.254.170.2: AWS ECS task metadata and credentials.
# 169.254.170.23 and fd00:ec2::23: AWS EKS Pod Identity agent. 100.100.100.200: Alibaba Cloud metadata.
# 168.63.129.16: Azure platform endpoint (WireServer), a public-range address reachable only from Azure VMs.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",
        "169.254.170.2",
        "169.254.170.23",
        "100.100.100.200",
        "168.63.129.16",
        "fd00:ec2::254",
        "fd00:ec2::23",
    )
)
# Names of Google Cloud's metadata server, which Google Cloud VMs resolve to 169.254.169.254.
METADATA_HOST_NAMES = frozenset({"metadata.google.internal", "metadata"})

_RFC1918_NETWORKS = tuple(ipaddress.IPv4Network(net) for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_SHARED_ADDRESS_SPACE = ipaddress.IPv4Network("100.64.0.0/10")  # RFC 6598, carrier-grade NAT
_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_NAT64_WELL_KNOWN_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052
_IPV4_COMPATIBLE_PREFIX = ipaddress.IPv6Network("::/96")  # deprecated by RFC 4291
_UNIQUE_LOCAL_NETWORK = ipaddress.IPv6Network("fc00::/7")

# A host name after IDNA encoding: dot-separated labels of 1-63 letters, digits, '-' or '_'.
_HOST_NAME = re.compile(r"^(?=.{1,253}\.?$)[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*\.?$")
_DECIMAL = re.compile(r"^[0-9]+$")
_OCTAL = re.compile(r"^0[0-7]*$")
_HEXADECIMAL = re.compile(r"^0x[0-9a-f]*$")  # "0x" alone is 0, as in the WHATWG URL standard
_METADATA_REASON = "a cloud metadata address"


class ProviderUrlNotAllowed(InvalidInput):
    code = "provider_url_not_allowed"
    default_message = "The provider URL is not allowed."


class ProviderUnreachable(InvalidInput):
    code = "provider_unreachable"
    default_message = "The provider host could not be reached; check the base URL."


@dataclass(frozen=True, slots=True)
class CheckedTarget:
    """A provider URL that passed the guard, with the address every request to it must connect to."""

    url: str  # the URL as the caller passed it
    scheme: str  # "http" or "https"
    host: str  # lower-case, IDNA-encoded host as written in the URL, without IPv6 brackets
    port: int  # the explicit port, or 80/443 for the scheme
    address: str  # the checked IP address that requests are pinned to
    host_is_ip_address: bool  # True when the URL names an IP address instead of a host name
    parsed: httpx.URL  # `url` parsed once here, so that building each request does not parse it again
    pinned: httpx.URL  # `parsed` with its host replaced by `address`: where requests go


@dataclass(frozen=True, slots=True)
class _ParsedUrl:
    """A provider URL that passed the rules that need no name resolution, and its address if it names one."""

    parsed: httpx.URL
    scheme: str
    host: str
    port: int
    literal: IPAddress | None
    literal_reason: str | None  # why `literal` is blocked, or None when it is public or there is none
    pinned_literal: httpx.URL | None  # `parsed` with the literal address as host, for IP-literal URLs


async def resolve_host(host: str, port: int) -> list[str]:
    """Resolve a host name with the event loop's getaddrinfo and return its IP addresses in getaddrinfo's order."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]


class OutboundGuard:
    """Checks provider URLs and sends requests to the checked address only, never following redirects."""

    def __init__(
        self,
        *,
        allow_private: bool,
        resolver: Resolver | None = None,
        resolve_timeout: float = DEFAULT_RESOLVE_TIMEOUT_SECONDS,
    ) -> None:
        self.allow_private = allow_private
        self._resolve = resolver or resolve_host
        self._resolve_timeout = resolve_timeout

    async def check(self, url: str) -> CheckedTarget:
        """Validate `url` and resolve its host to the address that requests will be pinned to.

        Raises ProviderUrlNotAllowed when the URL breaks a rule or any resolved address is blocked, and
        ProviderUnreachable when the host name does not resolve in time.
        """
        checked = _parse_provider_url(url)
        host = checked.host
        literal = checked.literal
        if literal is not None:
            subject = f"The provider URL address {host} is"
            if ":" not in host and host != str(literal):
                subject = f"The provider URL host '{host}' is the IPv4 address {literal},"
            self._reject(checked.literal_reason, subject=subject)
            assert checked.pinned_literal is not None
            return CheckedTarget(
                url,
                checked.scheme,
                host,
                checked.port,
                str(literal),
                host_is_ip_address=True,
                parsed=checked.parsed,
                pinned=checked.pinned_literal,
            )

        if host.rstrip(".") in METADATA_HOST_NAMES:
            raise ProviderUrlNotAllowed(
                f"The provider URL host '{host}' is a cloud metadata server, which is always blocked."
            )

        addresses = await self._resolve_addresses(host, checked.port)
        for address in addresses:
            self._reject(_blocked_reason(address), subject=f"The provider URL host '{host}' resolves to")
        # NOTE: requests go to the first address only, with no fallback to the others when it is unreachable.
        pinned_address = str(addresses[0])
        return CheckedTarget(
            url,
            checked.scheme,
            host,
            checked.port,
            pinned_address,
            host_is_ip_address=False,
            parsed=checked.parsed,
            pinned=checked.parsed.copy_with(host=pinned_address),
        )

    async def request(self, clients: Clients, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """Check `url`, send the request to the checked address and return the response, never following redirects.

        `kwargs` are those of `httpx.Request` (params, headers, json, content, extensions, ...) and `timeout`.
        A 3xx response is returned as is, and callers must treat it as an error instead of requesting its Location.
        """
        response = await self.open_stream(clients, method, url, **kwargs)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    @asynccontextmanager
    async def stream(self, clients: Clients, method: str, url: str, **kwargs: Any) -> AsyncIterator[httpx.Response]:
        """Like `request`, but yield the response before its body is read, for server-sent events."""
        response = await self.open_stream(clients, method, url, **kwargs)
        try:
            yield response
        finally:
            await response.aclose()

    async def open_stream(self, clients: Clients, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """Like `stream`, but return the open response, which the caller must close with `aclose()`.

        Callers that keep the response open in a context manager of their own use it, and so save the
        generator and context manager objects of `stream` for as long as the response is open.
        """
        target = await self.check(url)
        transport, request = _build_pinned_request(clients, method, target, kwargs)
        response = await transport.handle_async_request(request)
        response.request = request
        return response

    async def _resolve_addresses(self, host: str, port: int) -> list[IPAddress]:
        try:
            async with asyncio.timeout(self._resolve_timeout):
                resolved = await self._resolve(host, port)
        except socket.gaierror as error:
            raise ProviderUnreachable(
                f"The provider URL host '{host}' could not be resolved ({error.strerror}); check the base URL."
            ) from error
        except TimeoutError as error:
            raise ProviderUnreachable(
                f"Resolving the provider URL host '{host}' timed out after {self._resolve_timeout:g} s; "
                "check the base URL or try again later."
            ) from error

        # dict.fromkeys drops duplicates (getaddrinfo repeats addresses per socket type) and keeps the order.
        addresses = list(dict.fromkeys(ipaddress.ip_address(address) for address in resolved))
        if not addresses:
            raise ProviderUnreachable(
                f"The provider URL host '{host}' has no IPv4 or IPv6 address; check the base URL."
            )
        return addresses

    def _reject(self, reason: str | None, *, subject: str) -> None:
        """Raise ProviderUrlNotAllowed for a metadata address, and for any blocked one unless private URLs are allowed.

        `reason` is what `_blocked_reason` found for the address. `subject` starts the message and is
        completed by the reason, as in "<subject> a loopback address".
        """
        if reason is None:
            return

        if reason == _METADATA_REASON:
            raise ProviderUrlNotAllowed(f"{subject} {reason}, which is always blocked.")
        if not self.allow_private:
            raise ProviderUrlNotAllowed(f"{subject} {reason}, which is blocked. {ALLOW_PRIVATE_HINT}")


@functools.lru_cache(maxsize=PARSED_URL_CACHE_SIZE)
def _parse_provider_url(url: str) -> _ParsedUrl:
    """Parse `url`, apply the rules that need no name resolution, and classify an IP-literal host.

    The result depends on the URL alone, so it is cached: a chat sends every reply to the same base URL.
    A URL that breaks a rule raises each time, because exceptions are not cached.
    """
    parsed = _parse_url(url)
    scheme = parsed.scheme
    host = parsed.raw_host.decode("ascii")
    port = parsed.port if parsed.port is not None else DEFAULT_PORTS[scheme]
    literal = _parse_ip_literal(host)
    if literal is None:
        return _ParsedUrl(parsed, scheme, host, port, None, None, None)
    pinned = parsed.copy_with(host=str(literal))
    return _ParsedUrl(parsed, scheme, host, port, literal, _blocked_reason(literal), pinned)


def _parse_url(url: str) -> httpx.URL:
    """Parse `url` and apply the scheme, host, user-info and port rules.

    Messages never quote the URL because its user info or query string may hold a key.
    """
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as error:
        raise ProviderUrlNotAllowed(
            "The provider URL is not a valid URL; use a form like https://api.example.com/v1."
        ) from error

    if parsed.scheme not in ALLOWED_SCHEMES:
        raise ProviderUrlNotAllowed("The provider URL must start with http:// or https://.")
    if not parsed.raw_host:
        raise ProviderUrlNotAllowed("The provider URL has no host; use a form like https://api.example.com/v1.")
    if parsed.userinfo:
        raise ProviderUrlNotAllowed(
            "The provider URL must not contain a user name or password; save the API key in the key field instead."
        )
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise ProviderUrlNotAllowed(f"The provider URL port {parsed.port} is invalid; use a port from 1 to 65535.")

    host = parsed.raw_host.decode("ascii")
    if ":" not in host and _HOST_NAME.match(host) is None:
        raise ProviderUrlNotAllowed(
            "The provider URL host is not a valid host name; use letters, digits, '-' and '.' only."
        )
    return parsed


def _parse_ip_literal(host: str) -> IPAddress | None:
    """Return the address that an IP-literal host names, or None when `host` is a host name.

    IPv4 follows the WHATWG URL standard, which matches inet_aton: a host whose last label is a number is
    an IPv4 address of 1-4 decimal, octal (leading 0) or hexadecimal (0x) parts, so 2130706433, 0x7f.1
    and 127.1 are all 127.0.0.1. Such a host that is no valid address is rejected instead of resolved.
    Any numeric form this misses is still safe, because the addresses the resolver returns for it are checked.
    """
    if ":" in host:
        if "%" in host:
            raise ProviderUrlNotAllowed("The provider URL must not contain an IPv6 zone identifier.")
        try:
            return ipaddress.IPv6Address(host)
        except ValueError as error:
            raise ProviderUrlNotAllowed("The provider URL host is not a valid IPv6 address.") from error

    labels = host.removesuffix(".").split(".")
    last_label = labels[-1]
    if not (_DECIMAL.match(last_label) or _HEXADECIMAL.match(last_label)):
        return None

    address = _parse_ipv4_parts(labels)
    if address is None:
        raise ProviderUrlNotAllowed(f"The provider URL host '{host}' is not a valid IPv4 address.")
    return address


def _parse_ipv4_parts(parts: list[str]) -> ipaddress.IPv4Address | None:
    if not 1 <= len(parts) <= 4:
        return None

    numbers: list[int] = []
    for part in parts:
        number = _parse_ipv4_number(part)
        if number is None:
            return None
        numbers.append(number)

    # Every part but the last is one byte; the last part fills the remaining bytes, so "127.1" is 127.0.0.1.
    *leading, last = numbers
    if any(number > 255 for number in leading) or last >= 256 ** (4 - len(leading)):
        return None
    value = last
    for index, number in enumerate(leading):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def _parse_ipv4_number(part: str) -> int | None:
    # The patterns are checked first because int() also accepts "_", "+" and surrounding whitespace.
    if _HEXADECIMAL.match(part):
        return int(part[2:] or "0", 16)
    if _OCTAL.match(part):
        return int(part, 8)
    if _DECIMAL.match(part):
        return int(part, 10)
    return None


def _blocked_reason(address: IPAddress) -> str | None:
    """Return why `address` is blocked (metadata first), or None for a public address."""
    carried = _addresses_to_classify(address)
    if any(candidate in METADATA_ADDRESSES for candidate in carried):
        return _METADATA_REASON
    for candidate in carried:
        reason = _ipv4_reason(candidate) if isinstance(candidate, ipaddress.IPv4Address) else _ipv6_reason(candidate)
        if reason is not None:
            return reason
    return None


def _addresses_to_classify(address: IPAddress) -> list[IPAddress]:
    """Return the addresses that decide whether `address` is blocked, including IPv4 addresses embedded in IPv6.

    For an IPv4-mapped (::ffff:a.b.c.d), NAT64 (64:ff9b::a.b.c.d) or 6to4 (2002:aabb:ccdd::) address,
    the packets end up at the embedded IPv4 address, so only that one is classified. The v6 forms lie in
    ranges that Python's ipaddress flags as reserved even when the embedded address is public.
    """
    if isinstance(address, ipaddress.IPv4Address):
        return [address]
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address in _NAT64_WELL_KNOWN_PREFIX:
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address.teredo is not None:
        server, client = address.teredo
        return [address, server, client]
    if address in _IPV4_COMPATIBLE_PREFIX and int(address) > 1:
        return [address, ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return [address]


def _ipv4_reason(address: ipaddress.IPv4Address) -> str | None:
    if address.is_loopback:
        return "a loopback address"
    if address in _THIS_NETWORK:
        return "an unspecified address (0.0.0.0/8)"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if any(address in network for network in _RFC1918_NETWORKS):
        return "a private network address"
    if address in _SHARED_ADDRESS_SPACE:
        return "a shared (carrier-grade NAT) address"
    if address.is_reserved or not address.is_global:
        return "a reserved or special-purpose address"
    return None


def _ipv6_reason(address: ipaddress.IPv6Address) -> str | None:
    if address.is_loopback:
        return "a loopback address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address in _UNIQUE_LOCAL_NETWORK or address.is_site_local:
        return "a private network address"
    if address.is_reserved or not address.is_global:
        return "a reserved or special-purpose address"
    return None


class HostClients:
    """HTTP clients for pinned requests that keep HTTPS connections alive without mixing host names.

    The guard sends each request to the checked IP address, and httpcore pools connections by scheme,
    address and port. In one shared pool, a TLS connection whose certificate was verified for one host name
    could then carry a request for another name that resolves to the same address (common behind CDNs),
    with that request's API key. So HTTPS requests to a host name go through a client of their own. Its
    pool contains only connections verified for that name, so they can be reused like any other.
    Plain HTTP and IP addresses, where no name is verified, share one client.

    At most `max_hosts` host names get a client; requests to further names use the shared client with
    `Connection: close`, so that each of them opens and verifies its own connection.
    """

    def __init__(self, make_client: Callable[[], httpx.AsyncClient], *, max_hosts: int = MAX_HOST_CLIENTS) -> None:
        self._make_client = make_client
        self.shared = make_client()
        self._max_hosts = max_hosts
        self._by_host: dict[str, httpx.AsyncClient] = {}

    def client_for(self, target: CheckedTarget) -> tuple[httpx.AsyncClient, bool]:
        """Return the client for `target`, and whether its connection may stay open for later requests."""
        if not _verifies_host_name(target):
            return self.shared, True
        name = target.host.rstrip(".")
        client = self._by_host.get(name)
        if client is None:
            if len(self._by_host) >= self._max_hosts:
                return self.shared, False
            client = self._by_host[name] = self._make_client()
        return client, True

    async def close_idle_connections(self) -> int:
        """Close the idle keep-alive connections of every `ProviderClient` here and return how many."""
        closed = 0
        for client in (self.shared, *self._by_host.values()):
            if isinstance(client, ProviderClient):
                closed += await client.close_idle_connections()
        return closed

    async def aclose(self) -> None:
        for client in (self.shared, *self._by_host.values()):
            await client.aclose()
        self._by_host.clear()


def _verifies_host_name(target: CheckedTarget) -> bool:
    """Tell whether the TLS certificate of `target` is checked against a host name, not an IP address."""
    return target.scheme == "https" and not target.host_is_ip_address


# A plain client is treated as HostClients with no room for host names: HTTPS to a name closes its connection.
Clients = HostClients | httpx.AsyncClient


def _build_pinned_request(
    clients: Clients, method: str, target: CheckedTarget, options: dict[str, Any]
) -> tuple[httpx.AsyncBaseTransport, httpx.Request]:
    """Pick the client for `target` and build the request with the URL host replaced by the checked address.

    Returns the client's transport, which the guard sends the request on. `AsyncClient.build_request` and
    `send` would add authentication, redirects, event hooks and cookies, which provider requests never use.
    Skipping them saves about 80 µs of CPU per call (docs/benchmarks.md, "Twelfth round"). The request gets
    what `build_request` would take from the client: its headers and its timeout, unless `options` has one.
    """
    if isinstance(clients, HostClients):
        client, reusable = clients.client_for(target)
    else:
        client, reusable = clients, not _verifies_host_name(target)
    options = dict(options)
    headers = client.headers.copy()
    headers.update(options.pop("headers", None) or {})
    extensions = dict(options.pop("extensions", None) or {})
    timeout = options.pop("timeout", httpx.USE_CLIENT_DEFAULT)
    timeout = client.timeout if timeout is httpx.USE_CLIENT_DEFAULT else httpx.Timeout(timeout)
    extensions["timeout"] = timeout.as_dict()

    # The Host header carries the host and port as written, so virtual hosting works. It replaces a caller's Host.
    headers["Host"] = target.parsed.netloc.decode("ascii")

    if _verifies_host_name(target):
        # httpcore 1.0.9 (httpcore/_async/connection.py, AsyncHTTPConnection._connect) passes this
        # extension as `server_hostname` to start_tls, falling back to the URL host only when it is
        # missing. AsyncioStream.start_tls (providers/network.py) hands it to the event loop's start_tls,
        # so it is both the SNI name and the name that check_hostname verifies the certificate against.
        extensions["sni_hostname"] = target.host.rstrip(".")
    if not reusable:
        # A client shared by several host names must not keep this connection: see HostClients.
        headers["Connection"] = "close"

    request = httpx.Request(method, target.pinned, headers=headers, extensions=extensions, **options)
    # A private method of httpx.AsyncClient (pyproject.toml keeps httpx below 0.30): the transport that the
    # client would send this URL on, which is its own, since the clients use no proxy.
    return client._transport_for_url(request.url), request
