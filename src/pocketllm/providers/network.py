"""The network layer of the provider HTTP clients: httpcore connections on plain asyncio protocols.

httpcore's default backend reads and writes through anyio socket streams. Each open connection then
carries a deque and two `asyncio.Event` objects in anyio's protocol, a cancel scope per read, and a
Python TLS layer over memory BIOs. With one provider connection per open reply stream, this backend
took about 6 KiB off the server's memory per stream (benchmarks/open_streams.py, docs/benchmarks.md).
It keeps the received bytes in a list, waits on a future that exists only while a read waits, and uses
the event loop's own TLS transport.

Address pinning is unaffected: the guard puts the checked IP address in the URL and the host name in
the `sni_hostname` extension, and httpcore passes both down to `connect_tcp` and `start_tls` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import socket
import ssl
from collections.abc import Coroutine, Iterable, Iterator
from http.cookiejar import Cookie, CookieJar
from typing import Any, TypeVar, cast

import httpcore
import httpx

# Reading from the socket stops while this many received bytes wait for httpcore, and resumes below half.
READ_BUFFER_LIMIT = 256 * 1024

_T = TypeVar("_T")

# The loop time after which this task's connects, reads and writes on provider connections time out.
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("provider_io_deadline", default=None)


@contextlib.contextmanager
def io_deadline(seconds: float) -> Iterator[None]:
    """Make provider connections time out in this block once `seconds` have passed, on top of their own timeouts.

    Every connect, TLS handshake, read and write of a provider connection in the block, in this task and
    in tasks it starts, waits at most until the deadline. httpcore then gets its usual timeout errors: it
    closes the connection and takes it out of its pool. Cancelling the task instead, with
    asyncio.timeout(), can interrupt httpcore while it closes a response, and httpcore 1.0.9 then keeps
    the connection checked out of its pool for good. Only this module's transport applies the deadline.
    A nested block can shorten the deadline but not extend it.
    """
    deadline = asyncio.get_running_loop().time() + seconds
    outer = _deadline.get()
    token = _deadline.set(deadline if outer is None else min(outer, deadline))
    try:
        yield
    finally:
        _deadline.reset(token)


def _until_deadline(timeout: float | None) -> float | None:
    """Return `timeout` shortened to what is left of this task's `io_deadline`, if there is one."""
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    remaining = max(deadline - asyncio.get_running_loop().time(), 0.0)
    return remaining if timeout is None else min(timeout, remaining)


class _ConnectionProtocol(asyncio.Protocol):
    """Collects the bytes received on one connection and wakes the read or write that waits for them."""

    __slots__ = (
        "buffered",
        "chunks",
        "eof",
        "error",
        "read_waiter",
        "reading_paused",
        "transport",
        "write_waiter",
        "writing_paused",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.eof = False
        self.error: BaseException | None = None
        self.read_waiter: asyncio.Future[None] | None = None
        self.write_waiter: asyncio.Future[None] | None = None
        self.reading_paused = False
        self.writing_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > READ_BUFFER_LIMIT and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        _wake(self.read_waiter)

    def eof_received(self) -> bool:
        self.eof = True
        _wake(self.read_waiter)
        # False closes the transport, because an HTTP/1.1 client has nothing more to send once the server is done.
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        self.eof = True
        self.error = exc
        _wake(self.read_waiter)
        _wake(self.write_waiter)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        _wake(self.write_waiter)

    def take(self, max_bytes: int) -> bytes:
        """Remove and return up to `max_bytes` of the received bytes, without a copy when one chunk waits."""
        if len(self.chunks) == 1 and self.buffered <= max_bytes:
            data = self.chunks[0]
            self.chunks.clear()
        else:
            joined = b"".join(self.chunks)
            data = joined[:max_bytes]
            self.chunks = [joined[max_bytes:]] if len(joined) > max_bytes else []
        self.buffered -= len(data)
        if self.reading_paused and self.buffered < READ_BUFFER_LIMIT // 2 and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()
        return data


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


async def _wait(waiter: asyncio.Future[None], timeout: float | None) -> None:
    """Wait for `waiter`, raising TimeoutError after `timeout` seconds (None waits without a limit).

    A timer that fails the future costs less than asyncio.timeout(), which would cancel the task.
    """
    if timeout is None:
        await waiter
        return
    timer = asyncio.get_running_loop().call_later(timeout, _expire, waiter)
    try:
        await waiter
    finally:
        timer.cancel()


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One TCP connection, or the TLS connection over it after `start_tls`, as httpcore reads and writes it."""

    __slots__ = ("_protocol", "_transport")

    def __init__(self, transport: asyncio.Transport, protocol: _ConnectionProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Return up to `max_bytes` received bytes, or b"" once the server closed the connection cleanly."""
        protocol = self._protocol
        if not protocol.chunks and not protocol.eof:
            timeout = _until_deadline(timeout)
            waiter = protocol.read_waiter = asyncio.get_running_loop().create_future()
            try:
                await _wait(waiter, timeout)
            except TimeoutError:
                raise httpcore.ReadTimeout(f"no data received within {timeout} s") from None
            finally:
                protocol.read_waiter = None
        if protocol.chunks:
            return protocol.take(max_bytes)
        if protocol.error is not None:
            raise httpcore.ReadError(f"the connection was lost: {protocol.error}")
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        """Send `buffer`, waiting while the transport's write buffer is over its limit."""
        if not buffer:
            return
        protocol = self._protocol
        if protocol.error is not None or self._transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        self._transport.write(buffer)
        if not protocol.writing_paused:
            return
        timeout = _until_deadline(timeout)
        waiter = protocol.write_waiter = asyncio.get_running_loop().create_future()
        try:
            await _wait(waiter, timeout)
        except TimeoutError:
            raise httpcore.WriteTimeout(f"the request could not be sent within {timeout} s") from None
        finally:
            protocol.write_waiter = None
        if protocol.error is not None:
            raise httpcore.WriteError(f"the connection was lost: {protocol.error}")

    async def aclose(self) -> None:
        # close() sends what is still buffered, then the FIN (or TLS close_notify); it returns at once.
        self._transport.close()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        """Run the TLS handshake, verifying the certificate for `server_hostname`, and return the TLS stream."""
        loop = asyncio.get_running_loop()
        timeout = _until_deadline(timeout)
        try:
            async with asyncio.timeout(timeout):
                tls_transport = await loop.start_tls(
                    self._transport, self._protocol, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError:
            self._transport.abort()
            raise httpcore.ConnectTimeout(f"the TLS handshake did not finish within {timeout} s") from None
        except OSError as error:
            # ssl.SSLError, including certificate verification failures, is a subclass of OSError.
            self._transport.abort()
            raise httpcore.ConnectError(str(error)) from error
        if tls_transport is None:
            raise httpcore.ConnectError("the connection closed during the TLS handshake")
        self._protocol.transport = tls_transport
        return AsyncioStream(tls_transport, self._protocol)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # httpcore checks this before it reuses an idle connection. Data or an EOF then means the server closed it.
            protocol = self._protocol
            return protocol.eof or bool(protocol.chunks)
        name = _EXTRA_INFO_NAMES.get(info)
        return self._transport.get_extra_info(name) if name else None


# httpcore's extra-info names and the asyncio transport's names for the same values.
_EXTRA_INFO_NAMES = {
    "ssl_object": "ssl_object",
    "client_addr": "sockname",
    "server_addr": "peername",
    "socket": "socket",
}


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """Opens `AsyncioStream` connections for httpcore's connection pool."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        opening = loop.create_connection(
            _ConnectionProtocol, host, port, local_addr=(local_address, 0) if local_address else None
        )
        timeout = _until_deadline(timeout)
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await _outside_request_context(opening)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"no connection to {host} port {port} within {timeout} s") from None
        except OSError as error:
            raise httpcore.ConnectError(str(error)) from error

        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Requests and stream chunks are small writes that must not wait for Nagle's algorithm.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for option in socket_options or ():
                sock.setsockopt(*option)
        return AsyncioStream(transport, protocol)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
    ) -> httpcore.AsyncNetworkStream:
        # Provider base URLs are http(s) URLs, checked by the outbound guard, so no request names a socket path.
        raise httpcore.ConnectError("provider connections over Unix sockets are not supported")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def _outside_request_context(coroutine: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
    """Run `coroutine` in a task with empty context variables.

    An event loop transport keeps the context that was current when it was made, because it runs its
    protocol's callbacks in it. A connection opened in a request's task would then keep that request's
    context variables, its ASGI scope among them, alive for as long as the pool keeps the connection.
    Cancelling the awaiting task cancels this one too.
    """
    return asyncio.get_running_loop().create_task(coroutine, context=contextvars.Context())


class ProviderTransport(httpx.AsyncHTTPTransport):
    """httpx's HTTP transport with its connection pool on `AsyncioBackend`.

    `httpx.AsyncHTTPTransport` (httpx 0.29) takes no network backend, so the pool it builds is replaced
    by an equal one that has this backend. Requests and errors go through httpx's code unchanged.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext, limits: httpx.Limits) -> None:
        super().__init__(verify=ssl_context, limits=limits, trust_env=False)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=AsyncioBackend(),
        )

    async def close_idle_connections(self) -> int:
        """Close the pool's idle keep-alive connections and return how many were closed.

        httpcore closes an idle connection whose keep-alive time has run out only when the pool handles its
        next request, so after a burst the pool can keep up to `max_keepalive_connections` of them. The
        pool drops closed connections when it handles its next request. A request that the pool gave one
        of them to, and that had not started on it, moves to another connection.
        """
        closed = 0
        for connection in self._pool.connections:
            # Checked again for each connection, in case a request took it while an earlier one closed.
            if connection.is_idle():
                await connection.aclose()
                closed += 1
        return closed


class _NoCookieJar(CookieJar):
    """A cookie jar that stores nothing: every way of adding a cookie ends in `set_cookie`."""

    def set_cookie(self, cookie: Cookie) -> None:
        """Drop the cookie."""


class _NoCookies(httpx.Cookies):
    """A cookie store that keeps no cookie, and so sends none. Its jar cannot be replaced."""

    def __init__(self) -> None:
        self._jar = _NoCookieJar()

    @property
    def jar(self) -> CookieJar:
        return self._jar

    @jar.setter
    def jar(self, jar: CookieJar) -> None:
        raise TypeError("This cookie store keeps no cookies.")

    def extract_cookies(self, response: httpx.Response) -> None:
        """Ignore the response's Set-Cookie headers without parsing them."""


# One store serves every client, because it stays empty.
_NO_COOKIES = _NoCookies()


class ProviderClient(httpx.AsyncClient):
    """The HTTP client for provider requests, which neither stores nor sends cookies.

    The clients are shared by all users, so a cookie that a provider sets in its response to one user's
    request must not be sent with another user's. An empty cookie jar with a policy that rejects every
    cookie did that too, but httpx still parsed each response's Set-Cookie headers with http.cookiejar,
    which took about 3% of the server's CPU per reply.
    """

    def __init__(self, *, transport: ProviderTransport | None = None, **options: Any) -> None:
        super().__init__(transport=transport, **options)
        self._provider_transport = transport

    async def close_idle_connections(self) -> int:
        """Close the idle keep-alive connections of this client's pool and return how many were closed.

        A client on httpx's default transport closes none.
        """
        if self._provider_transport is None:
            return 0
        return await self._provider_transport.close_idle_connections()

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: Any) -> None:
        raise TypeError("Provider clients keep no cookies.")
