"""Streaming calls end once their token no longer allows them (`AuthInterceptor.end_revoked`), on
an in-process gRPC server with the node's auth interceptor and stand-in handlers under the real
method names (which decide the role each call needs): a revoked token's streams end with
UNAUTHENTICATED, a token whose role no longer suffices gets PERMISSION_DENIED (a replicating peer:
UNAUTHENTICATED), and streams whose token still allows them run on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from potboiler.server.security import AuthInterceptor, Role, TokenStore, token_line

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

    assert await served.auth.end_revoked() == 1
    assert await ended_with(revoked) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "the token of this call was revoked",
    )
    await served.handlers.until_running(1)  # the revoked call's handler stopped too

    served.handlers.release.set()
    assert await kept.read() == b"second"
    assert await kept.code() == grpc.StatusCode.OK
    assert await served.auth.end_revoked() == 0  # ended calls are not kept


async def test_a_token_whose_role_no_longer_suffices_ends_its_streams_as_a_new_call_is_refused(
    served: Served,
) -> None:
    append, replicate = served.call("AppendEntryStream", WRITER), served.call("Replicate", ADMIN)
    for call in (append, replicate):
        await call.write(b"hello")
        assert await call.read() == b"hello"
    served.rewrite((WRITER, Role.READ), (ADMIN, Role.WRITE))

    assert await served.auth.end_revoked() == 2
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

    assert await served.auth.end_revoked() == 0
    await append.write(b"two")
    assert await append.read() == b"two"
    await append.done_writing()
    assert await append.code() == grpc.StatusCode.OK
