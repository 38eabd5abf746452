"""The REST bridge serving real handlers on a unix socket, spoken to as Envoy speaks to it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2

from potboiler.server import rest_bridge
from potboiler.server.auth import GATEWAY_HEADER, AuthInterceptor
from potboiler.server.decoding import GuardedServer
from potboiler.server.rest_bridge import BridgeContext, RestBridge, abstract
from potboiler.server.tokens import Role, TokenStore, hash_token
from tests.conftest import wait_for

StringValue = wrappers_pb2.StringValue


class Answer:
    """An HTTP/1.1 answer of the bridge: status line, headers, the gRPC message if any, trailers."""

    def __init__(
        self, status: bytes, headers: dict[str, str], message: bytes | None, trailers: dict[str, str]
    ):
        self.status, self.headers, self.message, self.trailers = status, headers, message, trailers

    @property
    def grpc_status(self) -> int:
        return int({**self.headers, **self.trailers}["grpc-status"])


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await reader.readuntil(b"\r\n\r\n")
    status, *lines = head[:-4].split(b"\r\n")
    headers = {k.decode(): v.strip().decode() for k, _, v in (line.partition(b":") for line in lines)}
    trailers: dict[str, str] = {}
    message = None
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            key, _, value = line[:-2].partition(b":")
            trailers[key.decode()] = value.strip().decode()
        assert body[0] == 0 and int.from_bytes(body[1:5], "big") == len(body) - 5
        message = body[5:]
    else:
        assert await reader.readexactly(int(headers["content-length"])) == b""
    return Answer(status, headers, message, trailers)


def request(method: str, message: bytes, headers: dict[str, str] | None = None) -> bytes:
    body = b"\x00" + len(message).to_bytes(4, "big") + message
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (
        (
            f"POST {method} HTTP/1.1\r\nhost: node\r\ncontent-type: application/grpc\r\n{extra}"
            f"transfer-encoding: chunked\r\n\r\n{len(body):x}\r\n"
        ).encode()
        + body
        + b"\r\n0\r\n\r\n"
    )


class Echo:
    """A servicer with a behaviour per case; `started` and `ended` say what the last call did."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.ended: str | None = None
        self.seen: Any = None

    async def Echo(self, request: StringValue, context: BridgeContext) -> StringValue:
        self.seen = context.invocation_metadata()
        if request.value == "abort":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: ünïcode 100%")
        if request.value == "crash":
            raise RuntimeError("a bug")
        if request.value == "cancelled":  # e.g. it awaited something that was cancelled
            raise asyncio.CancelledError
        if request.value == "created":
            context.set_trailing_metadata([("x-http-code", "201"), ("location", "/log/1")])
        if request.value == "wait":
            self.started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.ended = "cancelled"
                raise
            self.ended = "finished"
        return StringValue(value=request.value.upper())

    async def Stream(self, request: StringValue, context: BridgeContext) -> AsyncIterator[StringValue]:
        yield request


def handlers(echo: Echo) -> grpc.GenericRpcHandler:
    parse, serialize = StringValue.FromString, StringValue.SerializeToString
    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo.Echo, parse, serialize),
            "Stream": grpc.unary_stream_rpc_method_handler(echo.Stream, parse, serialize),
            "GetEcho": grpc.unary_unary_rpc_method_handler(echo.Echo, parse, serialize),
        },
    )


@pytest.fixture
async def served() -> AsyncIterator[tuple[RestBridge, Echo, str]]:
    server = grpc.aio.server()  # never started: the bridge only looks its handlers up
    guarded = GuardedServer(server)
    echo = Echo()
    guarded.add_generic_rpc_handlers([handlers(echo)])
    bridge = RestBridge(guarded.method_handler, max_body=1 << 20)
    path = new_address()
    await bridge.listen(path)
    yield bridge, echo, path
    await bridge.stop(grace=0.1)


def new_address() -> str:
    return f"@potboiler-test-{uuid.uuid4().hex}"


async def connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(abstract(address))
    except OSError:
        sock.close()
        raise
    return await asyncio.open_unix_connection(sock=sock)


async def exchange(address: str, *requests: bytes) -> list[Answer]:
    reader, writer = await connect(address)
    try:
        writer.write(b"".join(requests))
        return [await read_answer(reader) for _ in requests]
    finally:
        writer.close()


async def test_a_call_answers_its_message_and_trailing_metadata_as_trailers(
    served: tuple[RestBridge, Echo, str],
) -> None:
    _, echo, path = served
    [plain, created] = await exchange(
        path,
        request(
            "/test.Echo/Echo", StringValue(value="hi").SerializeToString(), {"x-envoy-original-path": "/e"}
        ),
        request("/test.Echo/Echo", StringValue(value="created").SerializeToString()),
    )
    assert plain.status == b"HTTP/1.1 200 OK" and plain.headers["content-type"] == "application/grpc"
    assert StringValue.FromString(plain.message or b"").value == "HI" and plain.trailers == {
        "grpc-status": "0"
    }
    assert created.trailers == {"grpc-status": "0", "x-http-code": "201", "location": "/log/1"}
    assert echo.seen == ((GATEWAY_HEADER, "1"),)


async def test_errors_are_trailers_only_answers(served: tuple[RestBridge, Echo, str]) -> None:
    _, _, path = served
    aborted, crashed, unknown, streaming, garbage, unframed = await exchange(
        path,
        request("/test.Echo/Echo", StringValue(value="abort").SerializeToString()),
        request("/test.Echo/Echo", StringValue(value="crash").SerializeToString()),
        request("/test.Echo/Nope", b""),
        request("/test.Echo/Stream", b""),
        request("/test.Echo/Echo", b"\xff\xff\xff"),
        b"POST /test.Echo/Echo HTTP/1.1\r\ncontent-length: 2\r\n\r\nab",
    )
    assert (aborted.grpc_status, aborted.headers["grpc-message"]) == (
        grpc.StatusCode.NOT_FOUND.value[0],
        "no such thing: %C3%BCn%C3%AFcode 100%25",
    )
    assert aborted.message is None and aborted.headers["content-length"] == "0"
    assert (
        crashed.grpc_status == grpc.StatusCode.UNKNOWN.value[0] and "a bug" in crashed.headers["grpc-message"]
    )
    assert unknown.grpc_status == streaming.grpc_status == grpc.StatusCode.UNIMPLEMENTED.value[0]
    # GuardedServer's guard: a request that is not protobuf is the client's error, as over gRPC.
    assert garbage.grpc_status == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert unframed.grpc_status == grpc.StatusCode.INTERNAL.value[0]


async def test_what_is_not_http_from_envoy_closes_the_connection(
    served: tuple[RestBridge, Echo, str],
) -> None:
    _, _, path = served
    reader, writer = await connect(path)
    writer.write(b"GARBAGE / SPDY/3\r\n\r\n")
    refused = await read_answer(reader)
    assert refused.grpc_status == grpc.StatusCode.INTERNAL.value[0]
    assert await reader.read() == b""
    writer.close()


async def test_a_closed_connection_cancels_its_call(served: tuple[RestBridge, Echo, str]) -> None:
    """As a gRPC client's cancellation does: the servicer sees CancelledError (and gives back what
    it took, as Pigtail's claim does)."""
    _, echo, path = served
    _, writer = await connect(path)
    writer.write(request("/test.Echo/Echo", StringValue(value="wait").SerializeToString()))
    await asyncio.wait_for(echo.started.wait(), 10)
    writer.close()
    await wait_for(lambda: echo.ended == "cancelled", 10)


async def test_stop_lets_running_calls_finish_within_its_grace(served: tuple[RestBridge, Echo, str]) -> None:
    bridge, echo, path = served
    reader, writer = await connect(path)
    writer.write(request("/test.Echo/Echo", StringValue(value="wait").SerializeToString()))
    await asyncio.wait_for(echo.started.wait(), 10)
    stopping = asyncio.create_task(bridge.stop(grace=10))
    await wait_for(lambda: refused(path), 10)  # no new connections from here on
    echo.release.set()
    finished = await read_answer(reader)
    await stopping
    assert StringValue.FromString(finished.message or b"").value == "WAIT" and echo.ended == "finished"
    assert await reader.read() == b""  # then the connection is closed
    writer.close()
    assert refused(path)


def refused(address: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(abstract(address))
        except ConnectionRefusedError:
            return True
    return False


async def test_only_the_nodes_own_user_may_connect(
    served: tuple[RestBridge, Echo, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bridge, _, address = served
    await bridge.listen(address)  # serving there already: nothing changes
    [answer] = await exchange(
        address, request("/test.Echo/Echo", StringValue(value="mine").SerializeToString())
    )
    assert StringValue.FromString(answer.message or b"").value == "MINE"
    monkeypatch.setattr(rest_bridge, "_peer_uid", lambda transport: os.getuid() + 1)  # another's
    reader, writer = await connect(address)
    writer.write(request("/test.Echo/Echo", StringValue(value="theirs").SerializeToString()))
    with contextlib.suppress(ConnectionResetError):  # closed with the request unread: reset
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, unanswered
    writer.close()


def test_an_address_must_be_abstract() -> None:
    assert abstract("@potboiler-rest-x") == "\0potboiler-rest-x"
    for bad in ["/tmp/rest.sock", "potboiler", "@" + "x" * 107]:
        with pytest.raises(ValueError, match="abstract"):
            abstract(bad)


async def test_calls_pass_the_interceptor() -> None:
    """With tokens on, a REST call needs one, as a gRPC call does."""
    server = grpc.aio.server()
    guarded = GuardedServer(server)
    echo = Echo()
    guarded.add_generic_rpc_handlers([handlers(echo)])
    tokens = TokenStore([(hash_token("reader"), Role.READ)])
    bridge = RestBridge(
        guarded.method_handler, AuthInterceptor(tokens, peer_certificates=True), max_body=1 << 20
    )
    path = new_address()
    await bridge.listen(path)
    try:
        value = StringValue(value="x").SerializeToString()
        none, read, write = await exchange(
            path,
            request("/test.Echo/GetEcho", value),
            request("/test.Echo/GetEcho", value, {"authorization": "Bearer reader"}),
            request("/test.Echo/Echo", value, {"authorization": "Bearer reader"}),
        )
        assert none.grpc_status == grpc.StatusCode.UNAUTHENTICATED.value[0]
        assert read.grpc_status == grpc.StatusCode.OK.value[0]
        assert write.grpc_status == grpc.StatusCode.PERMISSION_DENIED.value[0]
    finally:
        await bridge.stop(grace=0.1)


async def test_a_call_cancelled_on_its_own_closes_its_connection(
    served: tuple[RestBridge, Echo, str],
) -> None:
    """No answer can come: Envoy learns at once (a 503), not at its route's timeout."""
    _, _, path = served
    reader, writer = await connect(path)
    writer.write(request("/test.Echo/Echo", StringValue(value="cancelled").SerializeToString()))
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()


async def test_a_body_over_the_limit_is_resource_exhausted() -> None:
    server = grpc.aio.server()
    guarded = GuardedServer(server)
    guarded.add_generic_rpc_handlers([handlers(Echo())])
    bridge = RestBridge(guarded.method_handler, max_body=100)
    path = new_address()
    await bridge.listen(path)
    try:
        reader, writer = await connect(path)
        writer.write(request("/test.Echo/Echo", b"x" * 200))
        refused = await read_answer(reader)
        assert refused.grpc_status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert await reader.read() == b""
        writer.close()
    finally:
        await bridge.stop(grace=0.1)


@pytest.mark.parametrize("connection", ["open and idle", "not accepted yet"])
async def test_a_request_sent_before_the_stop_began_is_served(
    served: tuple[RestBridge, Echo, str], connection: str
) -> None:
    """A request already in its connection's socket, not read yet, when the stop begins (Envoy
    counts it at the node) runs like the calls already running: it is neither refused nor cut, also
    on a connection the bridge has not accepted yet."""
    bridge, _, path = served
    sent_in_time = request("/test.Echo/Echo", StringValue(value="sent in time").SerializeToString())
    if connection == "open and idle":
        reader, writer = await connect(path)
        writer.write(request("/test.Echo/Echo", StringValue(value="first").SerializeToString()))
        await read_answer(reader)
        writer.write(sent_in_time)
        stopping = asyncio.create_task(bridge.stop(grace=10))  # runs before the request is read
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(abstract(path))  # in the listening socket's backlog: the loop has not run
        sock.sendall(sent_in_time)
        stopping = asyncio.create_task(bridge.stop(grace=10))
        reader, writer = await asyncio.open_unix_connection(sock=sock)
    answer = await read_answer(reader)
    await stopping
    assert StringValue.FromString(answer.message or b"").value == "SENT IN TIME"
    writer.close()


async def test_a_call_that_arrives_while_the_node_stops_is_unavailable(
    served: tuple[RestBridge, Echo, str],
) -> None:
    """Stopping lets the calls running finish; one that comes after them on a kept-alive
    connection is refused as grpc refuses calls then, and idle connections are closed at once."""
    bridge, echo, path = served
    idle_reader, idle_writer = await connect(path)
    busy_reader, busy_writer = await connect(path)
    # A request pipelined behind a running call waits in the parser until that call is answered.
    busy_writer.write(
        request("/test.Echo/Echo", StringValue(value="wait").SerializeToString())
        + request("/test.Echo/Echo", StringValue(value="late").SerializeToString())
    )
    await asyncio.wait_for(echo.started.wait(), 10)
    stopping = asyncio.create_task(bridge.stop(grace=10))
    assert await asyncio.wait_for(idle_reader.read(), 10) == b""  # idle: closed at once
    echo.release.set()
    finished, late = await read_answer(busy_reader), await read_answer(busy_reader)
    await stopping
    assert StringValue.FromString(finished.message or b"").value == "WAIT"
    assert late.grpc_status == grpc.StatusCode.UNAVAILABLE.value[0]
    for writer in (idle_writer, busy_writer):
        writer.close()
