"""Streaming calls end once their token no longer allows them (`AuthInterceptor.end_revoked`), on
an in-process gRPC server with the node's auth interceptor and stand-in handlers under the real
method names (which decide the role each call needs): a revoked token's streams end with
UNAUTHENTICATED, a token whose role no longer suffices gets PERMISSION_DENIED (a replicating peer:
UNAUTHENTICATED), and streams whose token still allows them run on. A caller that stops reading
holds up no other stream, a request that arrives after the change is refused as its handler starts,
and a stream's handler is stopped whatever becomes of its status. A node whose reload fails goes on
watching its file."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import pytest

from potboiler.server import auth
from potboiler.server import node as node_module
from potboiler.server.auth import AuthInterceptor
from potboiler.server.config_files import file_version
from potboiler.server.node import Node
from potboiler.server.security import SecurityConfig
from potboiler.server.tokens import Role, TokenStore, token_line
from tests.conftest import grpc_only_config, wait_for

READER, WRITER, ADMIN = "reader-token-1357", "writer-token-2468", "admin-token-3579"


class Handlers:
    """Server-side behaviour of the stand-in calls: each yields what it is sent (or one item), then
    waits; `running` counts handlers not yet finished."""

    def __init__(self) -> None:
        self.running = 0
        self.release = asyncio.Event()
        self.finished = asyncio.Event()

    def done(self) -> None:
        self.running -= 1
        self.finished.set()

    async def until_running(self, count: int) -> None:
        """Until `count` handlers run (the others have finished)."""
        async with asyncio.timeout(10):
            while self.running != count:
                self.finished.clear()
                await self.finished.wait()

    async def flood(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        """Yields big messages without end (to a caller that stops reading, they queue up)."""
        self.running += 1
        try:
            while True:
                yield b"x" * 1_000_000
        finally:
            self.done()

    async def subscribe(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        self.running += 1
        try:
            yield b"first"
            await self.release.wait()
            yield b"second"
        finally:
            self.done()

    async def subscribe_written(self, request: bytes, context: Any) -> None:
        """The same, written with context.write (a coroutine, not a generator)."""
        self.running += 1
        try:
            await context.write(b"first")
            await self.release.wait()
            await context.write(b"second")
        finally:
            self.done()

    async def echo(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        self.running += 1
        try:
            async for request in requests:
                yield request
        finally:
            self.done()


class Served:
    def __init__(self, tokens: Path) -> None:
        self.tokens_file = tokens
        self.tokens = TokenStore.load(tokens)
        self.auth = AuthInterceptor(self.tokens, peer_certificates=False)
        self.handlers = Handlers()
        self.server = grpc.aio.server(interceptors=[self.auth])
        h = self.handlers
        self.server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "potboiler.v1.LogService",
                    {
                        "SubscribeEntries": grpc.unary_stream_rpc_method_handler(h.subscribe),
                        "SubscribeFlood": grpc.unary_stream_rpc_method_handler(h.flood),
                        "SubscribeWritten": grpc.unary_stream_rpc_method_handler(h.subscribe_written),
                        "AppendEntryStream": grpc.stream_stream_rpc_method_handler(h.echo),
                    },
                ),
                grpc.method_handlers_generic_handler(
                    "potboiler.v1.ReplicationService",
                    {"Replicate": grpc.stream_stream_rpc_method_handler(h.echo)},
                ),
            ]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")

    def call(self, method: str, token: str) -> Any:
        metadata = (("authorization", f"Bearer {token}"),)
        if method in ("AppendEntryStream", "Replicate"):
            service = "ReplicationService" if method == "Replicate" else "LogService"
            return self.channel.stream_stream(f"/potboiler.v1.{service}/{method}")(metadata=metadata)
        subscribe: Any = self.channel.unary_stream(f"/potboiler.v1.LogService/{method}")
        return subscribe(b"", metadata=metadata)

    def rewrite(self, *lines: tuple[str, Role]) -> None:
        self.tokens_file.write_text("".join(token_line(t, r) + "\n" for t, r in lines))
        self.tokens.reload()


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    tokens = tmp_path / "tokens"
    tokens.write_text(
        f"{token_line(READER, Role.READ)}\n{token_line(WRITER, Role.WRITE)}\n{token_line(ADMIN, Role.ADMIN)}\n"
    )
    served = Served(tokens)
    await served.server.start()
    try:
        yield served
    finally:
        await served.channel.close()
        await served.server.stop(None)


async def ended_with(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async with asyncio.timeout(10):
            while True:
                assert await call.read() is not grpc.aio.EOF
    return raised.value.code(), raised.value.details() or ""


@pytest.mark.parametrize("method", ["SubscribeEntries", "SubscribeWritten"])
async def test_a_revoked_tokens_streams_end_and_the_others_run_on(served: Served, method: str) -> None:
    revoked, kept = served.call(method, READER), served.call(method, WRITER)
    assert await revoked.read() == b"first" and await kept.read() == b"first"
    served.rewrite((WRITER, Role.WRITE), (ADMIN, Role.ADMIN))

    assert served.auth.end_revoked() == 1
    assert await ended_with(revoked) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "the token of this call was revoked",
    )
    await served.handlers.until_running(1)  # the revoked call's handler stopped too

    served.handlers.release.set()
    assert await kept.read() == b"second"
    assert await kept.code() == grpc.StatusCode.OK
    assert served.auth.end_revoked() == 0  # ended calls are not kept


async def test_a_token_whose_role_no_longer_suffices_ends_its_streams_as_a_new_call_is_refused(
    served: Served,
) -> None:
    append, replicate = served.call("AppendEntryStream", WRITER), served.call("Replicate", ADMIN)
    for call in (append, replicate):
        await call.write(b"hello")
        assert await call.read() == b"hello"
    served.rewrite((WRITER, Role.READ), (ADMIN, Role.WRITE))

    assert served.auth.end_revoked() == 2
    assert await ended_with(append) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "AppendEntryStream needs a write token; this one is a read token",
    )
    # To a replicating peer PERMISSION_DENIED would mean "removed from the cluster".
    assert await ended_with(replicate) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "replication needs an admin token",
    )
    await served.handlers.until_running(0)


async def test_streams_whose_token_still_allows_them_are_left_alone(served: Served) -> None:
    append = served.call("AppendEntryStream", WRITER)
    await append.write(b"one")
    assert await append.read() == b"one"
    served.rewrite((WRITER, Role.ADMIN))  # promoted: still allowed

    assert served.auth.end_revoked() == 0
    await append.write(b"two")
    assert await append.read() == b"two"
    await append.done_writing()
    assert await append.code() == grpc.StatusCode.OK


async def test_a_caller_that_stops_reading_holds_up_no_other_stream_and_is_stopped_in_time(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "END_STREAM_TIMEOUT", 0.5)
    stuck, reading = served.call("SubscribeFlood", READER), served.call("SubscribeEntries", READER)
    assert await stuck.read() and await reading.read() == b"first"  # then `stuck` reads no more
    served.rewrite((WRITER, Role.WRITE))

    assert served.auth.end_revoked() == 2
    assert (await ended_with(reading))[0] == grpc.StatusCode.UNAUTHENTICATED
    await served.handlers.until_running(0)  # the flood's handler too, its status never taken
    await served.auth.close()
    stuck.cancel()


class AbortingContext:
    """A stand-in ServicerContext that records abort (raising as grpc.aio's does), or whose abort
    fails with `error`, or never completes (`hang`: a caller that takes no more data)."""

    def __init__(self, error: Exception | None = None, hang: bool = False) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None
        self.error = error
        self.hang = hang

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        if self.error is not None:
            raise self.error
        if self.hang:
            await asyncio.Event().wait()
        self.aborted = (code, details)
        raise grpc.aio.AbortError()


async def test_a_stream_whose_request_arrives_after_the_tokens_changed_is_refused_as_it_starts(
    served: Served,
) -> None:
    """grpc.aio checks the headers, then waits for the request message: a revocation can fall
    between the two, before the call is tracked."""
    handler: Any = grpc.unary_stream_rpc_method_handler(served.handlers.subscribe)
    tracked = served.auth._tracked(handler, READER, "/potboiler.v1.LogService/SubscribeEntries", Role.READ)
    served.rewrite((WRITER, Role.WRITE))
    context = AbortingContext()
    behavior: Any = tracked.unary_stream
    with pytest.raises(grpc.aio.AbortError):
        async for _ in behavior(b"", context):
            pytest.fail("the revoked call ran")
    assert context.aborted == (grpc.StatusCode.UNAUTHENTICATED, "the token of this call was revoked")
    assert served.handlers.running == 0


@pytest.mark.parametrize(
    "context",
    [AbortingContext(), AbortingContext(RuntimeError("the call has ended")), AbortingContext(hang=True)],
    ids=["told", "ended by itself meanwhile", "caller takes no more data"],
)
async def test_ending_a_stream_stops_its_handler_whatever_becomes_of_its_status(
    context: AbortingContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(auth, "END_STREAM_TIMEOUT", 0.1)
    handler = asyncio.create_task(asyncio.Event().wait())
    stream = auth._Stream(READER, "/m/SubscribeX", Role.READ, cast(Any, context), handler)
    await auth._end_stream(stream, (grpc.StatusCode.UNAUTHENTICATED, "revoked"))
    with pytest.raises(asyncio.CancelledError):
        await handler


async def test_a_handler_aborting_by_itself_is_left_to_finish() -> None:
    handler = asyncio.create_task(asyncio.sleep(0))
    aborting = AbortingContext(grpc.aio.UsageError("Abort already called!"))
    stream = auth._Stream(READER, "/m/SubscribeX", Role.READ, cast(Any, aborting), handler)
    await auth._end_stream(stream, (grpc.StatusCode.UNAUTHENTICATED, "revoked"))
    await handler  # not cancelled


async def test_a_reload_that_fails_leaves_the_node_watching_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(node_module, "TOKENS_POLL_S", 0.01)
    tokens = tmp_path / "tokens"
    tokens.write_text(token_line(READER, Role.READ) + "\n")
    node = Node(grpc_only_config(tmp_path / "node", security=SecurityConfig(tokens=TokenStore.load(tokens))))
    await node.start()
    calls = 0
    called = asyncio.Event()

    async def failing() -> None:
        nonlocal calls
        calls += 1
        called.set()
        raise RuntimeError("a bug in a reload")

    try:
        watched = tmp_path / "watched"
        watched.write_text("1")
        node._watch(watched, file_version(watched), failing)
        for version in ("22", "333"):
            called.clear()
            watched.write_text(version)
            async with asyncio.timeout(10):
                await called.wait()
        assert calls == 2
    finally:
        await node.stop()


async def test_a_tokens_file_changed_while_the_node_starts_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tokens are read before the node starts; a rotation between then and the watch being set
    # up (a start can take a while: a KV rebuild) must not count as the version already read.
    monkeypatch.setattr(node_module, "TOKENS_POLL_S", 0.01)
    tokens = tmp_path / "tokens"
    tokens.write_text(token_line(READER, Role.READ) + "\n")
    store = TokenStore.load(tokens)
    rotated = tmp_path / "tokens.new"
    rotated.write_text(token_line(WRITER, Role.WRITE) + "\n")
    rotated.rename(tokens)
    node = Node(grpc_only_config(tmp_path / "node", security=SecurityConfig(tokens=store)))
    await node.start()
    try:
        await wait_for(lambda: store.role_of(READER) is None, message="the revoked token still works")
        assert store.role_of(WRITER) is Role.WRITE
    finally:
        await node.stop()
