"""The webhook delivery transport (h11 over asyncio streams) against real local servers: connections
kept and not kept, a kept connection the receiver closed, bodies read in part, informational
answers, timeouts, and TLS checked against the name given for SNI."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import trustme

from potboiler.server import webhook_transport
from potboiler.server.webhook_transport import H11Transport
from tests.conftest import wait_for

#: One connection's handling: (reader, writer, its number from 1) -> None.
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One request's head and body (the body by content-length); b"" at the end of the stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return b""
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    return head + await reader.readexactly(length)


def answering(*answers: bytes, close: bool = False) -> Handler:
    """A handler that reads a request and sends the next answer, for every request of a connection
    (then closes it, if `close`)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        for answer in answers:
            if not await read_request(reader):
                return
            writer.write(answer)
            await writer.drain()
            if close:
                return

    return handle


NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"


class Server:
    """A local TCP (or TLS) server whose connections `handler` serves; counts the connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def start(self, tls: ssl.SSLContext | None = None) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        assert self._server is not None
        self._server.close()


@contextlib.asynccontextmanager
async def serving(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = await Server(handler).start(tls)
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def client(
    transport: H11Transport | None = None, **timeouts: float
) -> AsyncIterator[httpx.AsyncClient]:
    timeout = httpx.Timeout(timeouts.get("read", 5.0), connect=timeouts.get("connect", 5.0))
    async with httpx.AsyncClient(transport=transport or H11Transport(), timeout=timeout) as http:
        yield http


async def post(http: httpx.AsyncClient, url: str, body: bytes = b'{"n": 1}') -> httpx.Response:
    return await http.post(url, content=body, headers={"content-type": "application/json"})


async def test_a_connection_is_kept_for_the_next_post() -> None:
    async with (
        serving(
            answering(NO_CONTENT, NO_CONTENT, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        ) as server,
        client() as http,
    ):
        statuses = [(await post(http, f"http://127.0.0.1:{server.port}/in")).status_code for _ in range(3)]
    assert statuses == [204, 204, 200]
    assert server.connections == 1


async def test_a_kept_connection_is_closed_once_idle_for_too_long(monkeypatch: pytest.MonkeyPatch) -> None:
    """(Kept for ever, a receiver registered, delivered to once and deregistered left its socket
    open: one per receiver.)"""
    monkeypatch.setattr(webhook_transport, "IDLE_TIMEOUT_S", 0.05)
    transport = H11Transport()
    async with serving(answering(NO_CONTENT, NO_CONTENT)) as server, client(transport) as http:
        url = f"http://127.0.0.1:{server.port}/in"
        assert (await post(http, url)).status_code == 204
        assert transport.idle == 1
        await wait_for(lambda: transport.idle == 0, message="the idle connection closed")
        assert (await post(http, url)).status_code == 204  # on a new connection
    assert server.connections == 2


async def test_a_post_on_a_kept_connection_the_receiver_closed_goes_again_on_a_new_one() -> None:
    async with serving(answering(NO_CONTENT, close=True)) as server, client() as http:
        url = f"http://127.0.0.1:{server.port}/in"
        assert (await post(http, url)).status_code == 204
        # The receiver closes after each answer; the client may not have seen it yet.
        assert (await post(http, url)).status_code == 204
        assert (await post(http, url)).status_code == 204
    assert server.connections == 3


async def test_a_post_a_kept_connection_drops_unanswered_goes_again_on_a_new_one() -> None:
    async def drop_the_second(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
    ) -> None:
        await answering(NO_CONTENT)(reader, writer, number)
        if number == 1:
            await read_request(reader)  # then closes, unanswered (as at a keep-alive timeout)
        else:
            await answering(NO_CONTENT)(reader, writer, number)

    async with serving(drop_the_second) as server, client() as http:
        url = f"http://127.0.0.1:{server.port}/in"
        assert [(await post(http, url)).status_code for _ in range(3)] == [204, 204, 204]
    assert server.connections == 2


async def test_a_fresh_connection_closed_unanswered_is_an_error_not_a_retry() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)

    async with serving(hang_up) as server, client() as http:
        with pytest.raises(httpx.RemoteProtocolError):
            await post(http, f"http://127.0.0.1:{server.port}/in")
    assert server.connections == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
    ],
    ids=["chunked", "informational first"],
)
async def test_answers_read_to_their_end_keep_the_connection(answer: bytes) -> None:
    async with serving(answering(answer, answer)) as server, client() as http:
        url = f"http://127.0.0.1:{server.port}/in"
        first = await post(http, url)
        second = await post(http, url)
    assert first.status_code == second.status_code and first.status_code in (200, 201)
    assert server.connections == 1


async def test_an_answer_left_unread_or_saying_close_closes_the_connection() -> None:
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"x" * 200_000
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    async with serving(answering(big, big)) as server, client() as http:
        url = f"http://127.0.0.1:{server.port}/in"
        for _ in range(2):
            async with http.stream("POST", url, content=b"{}") as response:
                async for _chunk in response.aiter_raw():
                    break  # as a delivery reading at most 64 KiB
    assert server.connections == 2
    async with serving(answering(closing, closing)) as server, client() as http:
        for _ in range(2):
            assert (await post(http, f"http://127.0.0.1:{server.port}/in")).status_code == 200
    assert server.connections == 2


async def test_a_receiver_that_does_not_answer_times_out_and_a_closed_port_is_a_connect_error() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await read_request(reader)
        await asyncio.sleep(30)

    async with serving(silent) as server, client(read=0.2) as http:
        with pytest.raises(httpx.ReadTimeout):
            await post(http, f"http://127.0.0.1:{server.port}/in")
    port = server.port  # stopped now: nothing listens there
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await post(http, f"http://127.0.0.1:{port}/in")


def tls_pair(*names: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for `names`, and a client context trusting its CA."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(server)
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    return server, trusting


async def test_tls_is_checked_against_the_name_given_for_sni_not_the_address_connected_to() -> None:
    server_tls, trusting = tls_pair("hooks.example")
    async with serving(answering(NO_CONTENT, NO_CONTENT), server_tls) as server:
        url = f"https://127.0.0.1:{server.port}/in"
        async with client(H11Transport(tls=trusting)) as http:
            named = await http.post(
                url,
                content=b"{}",
                headers={"host": "hooks.example"},
                extensions={"sni_hostname": "hooks.example"},
            )
            assert named.status_code == 204
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.post(url, content=b"{}", extensions={"sni_hostname": "other.example"})
        async with client() as http:  # the default CAs do not know this one
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.post(url, content=b"{}", extensions={"sni_hostname": "hooks.example"})
