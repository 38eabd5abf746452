"""The connections webhook POSTs travel on: an httpx transport that speaks HTTP/1.1 with h11 over
asyncio streams, and keeps idle connections for the next POST to the same origin.

httpx's own transport (httpcore over anyio) spent about 1.2 ms of CPU per POST on a 2-core machine,
most of a node's cost of delivering an entry; this one a fifth of that (`benchmarks/webhooks.py`).
It does what a webhook needs and no more: HTTP/1.1 only, no proxies (deliveries use
none), and connections to the address in the request's URL (`GuardedTransport` puts the checked
address there) with TLS checked against the `sni_hostname` extension, else the URL's host.

A connection is kept for the next request only once a response has been read to its end and both
sides may go on (h11 says so), and for IDLE_TIMEOUT_S at most; one left with part of a response
unread, or broken, is closed. A POST
on a kept connection that the receiver closed meanwhile (a keep-alive timeout) is sent again, once,
on a new one: it had not been answered, and deliveries are at-least-once anyway.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import h11
import httpx

#: Idle connections kept per origin (each webhook's task uses one connection at a time).
MAX_IDLE = 100
#: How long a kept connection waits for its next request before it is closed: receivers come and
#: go (a webhook registered, delivered to and deregistered), and their connections must not stay.
IDLE_TIMEOUT_S = 30.0
_READ_SIZE = 64 << 10


class _Connection:
    """One HTTP/1.1 connection and its h11 state."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.state = h11.Connection(h11.CLIENT)
        #: Bytes received since the last request was sent.
        self.received = 0

    def usable(self) -> bool:
        """Whether a kept connection can take another request (the peer has not closed it)."""
        return not (self.writer.is_closing() or self.reader.at_eof())

    async def send(self, request: httpx.Request, body: bytes, timeout: float | None) -> None:
        state = self.state
        try:
            data = state.send(
                h11.Request(method=request.method, target=request.url.raw_path, headers=request.headers.raw)
            )
            data += state.send(h11.Data(data=body)) if body else b""
            data += state.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise httpx.LocalProtocolError(str(exc), request=request) from None
        self.received = 0
        try:
            self.writer.write(data)
            async with asyncio.timeout(timeout):
                await self.writer.drain()
        except TimeoutError:
            raise httpx.WriteTimeout("no room to send the request in time", request=request) from None
        except OSError as exc:
            raise httpx.WriteError(str(exc) or type(exc).__name__, request=request) from None

    async def next_event(self, request: httpx.Request, timeout: float | None) -> object:
        """The next event of the response (reading as needed)."""
        state = self.state
        while True:
            try:
                event = state.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx.RemoteProtocolError(str(exc), request=request) from None
            if event is not h11.NEED_DATA:
                return event
            try:
                async with asyncio.timeout(timeout):
                    data = await self.reader.read(_READ_SIZE)
            except TimeoutError:
                raise httpx.ReadTimeout("no answer in time", request=request) from None
            except OSError as exc:
                raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from None
            self.received += len(data)
            state.receive_data(data)  # b"": the peer closed its side

    def reuse(self) -> bool:
        """Make ready for the next request if both sides are done with this one; whether it is."""
        if self.state.our_state is h11.DONE and self.state.their_state is h11.DONE:
            self.state.start_next_cycle()
            return True
        return False

    def close(self) -> None:
        self.writer.transport.abort()


class _Body(httpx.AsyncByteStream):
    """A response's body, read from its connection as it is iterated; closing it keeps the
    connection (when the body was read to its end and the connection may go on) or closes it."""

    def __init__(
        self,
        transport: H11Transport,
        key: tuple[str, str, int, str],
        connection: _Connection,
        request: httpx.Request,
        timeout: float | None,
    ) -> None:
        self._transport = transport
        self._key = key
        self._connection: _Connection | None = connection
        self._request = request
        self._timeout = timeout
        self._complete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            return
        while True:
            event = await connection.next_event(self._request, self._timeout)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._complete = True
                return
            else:  # the peer closed the connection mid-body
                raise httpx.RemoteProtocolError("the connection closed mid-answer", request=self._request)

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if self._complete and connection.reuse():
            self._transport.keep(self._key, connection)
        else:
            connection.close()


class H11Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 over asyncio streams, with kept connections (see the module's text)."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        """`tls`: the context of HTTPS connections (default: certifi's CAs, as httpx's own)."""
        self._idle: dict[tuple[str, str, int, str], list[_Connection]] = {}
        #: When each kept connection is closed unless used meanwhile.
        self._expiry: dict[_Connection, asyncio.TimerHandle] = {}
        self._tls = tls

    def keep(self, key: tuple[str, str, int, str], connection: _Connection) -> None:
        """Keep `connection` for the next request to its origin, for IDLE_TIMEOUT_S at most
        (closing it now if enough are kept)."""
        idle = self._idle.setdefault(key, [])
        if len(idle) < MAX_IDLE:
            idle.append(connection)
            loop = asyncio.get_running_loop()
            self._expiry[connection] = loop.call_later(IDLE_TIMEOUT_S, self._expire, key, connection)
        else:
            connection.close()

    def _expire(self, key: tuple[str, str, int, str], connection: _Connection) -> None:
        self._expiry.pop(connection, None)
        idle = self._idle.get(key, [])
        if connection in idle:
            idle.remove(connection)
            connection.close()
        if not idle:
            self._idle.pop(key, None)

    def _kept(self, key: tuple[str, str, int, str]) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if (expiry := self._expiry.pop(connection, None)) is not None:
                expiry.cancel()
            if connection.usable():
                return connection
            connection.close()
        return None

    @property
    def idle(self) -> int:
        """How many connections are kept."""
        return sum(map(len, self._idle.values()))

    async def _connect(
        self, request: httpx.Request, key: tuple[str, str, int, str], timeout: float | None
    ) -> _Connection:
        scheme, host, port, name = key
        tls: ssl.SSLContext | None = None
        if scheme == "https":
            if self._tls is None:
                self._tls = httpx.create_ssl_context()
            tls = self._tls
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=name if tls is not None else None, limit=_READ_SIZE
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(
                f"cannot connect to {host} port {port} in time", request=request
            ) from None
        except OSError as exc:  # refused, unreachable, TLS (certificate) failures
            raise httpx.ConnectError(str(exc) or type(exc).__name__, request=request) from None
        return _Connection(reader, writer)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"cannot deliver to a {url.scheme!r} URL", request=request)
        port = url.port or (443 if url.scheme == "https" else 80)
        name = str(request.extensions.get("sni_hostname") or url.host)
        key = (url.scheme, url.host, port, name)
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        body = await request.aread()
        connection = self._kept(key)
        for attempt in (1, 2):
            fresh = connection is None
            if connection is None:
                connection = await self._connect(request, key, timeouts.get("connect"))
            try:
                await connection.send(request, body, timeouts.get("write"))
                event = await connection.next_event(request, timeouts.get("read"))
                while isinstance(event, h11.InformationalResponse):  # 100 Continue and the like
                    event = await connection.next_event(request, timeouts.get("read"))
                if not isinstance(event, h11.Response):
                    raise httpx.RemoteProtocolError(
                        "the receiver closed the connection unanswered", request=request
                    )
            except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
                retry = not fresh and attempt == 1 and not connection.received
                connection.close()
                if retry:  # a kept connection the receiver had closed: once more on a new one
                    connection = None
                    continue
                raise
            except BaseException:  # a timeout, a cancellation: the connection is in an unknown state
                connection.close()
                raise
            return httpx.Response(
                event.status_code,
                headers=event.headers,
                stream=_Body(self, key, connection, request, timeouts.get("read")),
                extensions={"http_version": b"HTTP/1.1", "reason_phrase": bytes(event.reason)},
            )
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for expiry in self._expiry.values():
            expiry.cancel()
        self._expiry.clear()
        for connections in idle.values():
            for connection in connections:
                connection.close()
