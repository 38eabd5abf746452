"""A replication stream torn down at the worst moment, reproduced deterministically in process.

When a connection is reset, grpc.aio finishes the call; a write on a finished call raises
`asyncio.InvalidStateError("RPC already finished.")` (grpc/aio/_call.py, `_write`), not an RpcError.
The proxy tests (test_proxy.py) hit this by chance when they reset links; here a fake channel whose
calls are already finished makes it happen on the first write, every time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import grpc

from potboiler.server.appender import Appender
from potboiler.server.backoff import Backoff
from potboiler.server.log import Log
from potboiler.server.membership import Membership
from potboiler.server.replicator import Replicator
from potboiler.server.storage import MemoryStore
from potboiler.v1 import replication_pb2
from tests.conftest import wait_for

PEER = "http://127.0.0.1:7"
PEER_ID = "00000000-0000-4000-8000-000000000007"


class FinishedCall:
    """A bidi call that the transport has already finished (as after a connection reset)."""

    async def write(self, message: Any) -> None:
        raise asyncio.InvalidStateError("RPC already finished.")

    async def read(self) -> Any:
        return grpc.aio.EOF

    def cancel(self) -> bool:
        return False

    def done(self) -> bool:
        return True


class FinishedCallChannel:
    """A stand-in for a peer's channel whose every Replicate call is already finished."""

    def __init__(self) -> None:
        self.calls = 0

    def open(self, target: str) -> FinishedCallChannel:
        return self

    async def __aenter__(self) -> FinishedCallChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        def call(*a: Any, **k: Any) -> FinishedCall:
            self.calls += 1
            return FinishedCall()

        return call


@contextlib.asynccontextmanager
async def replicating(channel: FinishedCallChannel, backoff: Backoff) -> AsyncIterator[Replicator]:
    """A node's replicator (no gossip) dialling through `channel`, started and, at the end, stopped."""
    store = MemoryStore()
    appender = Appender(Log(store), store)
    appender.start()
    membership = Membership(store, "http://127.0.0.1:9")
    replicator = Replicator(
        appender,
        membership,
        gossip=False,
        backoff=backoff,
        channel=cast(Callable[[str], grpc.aio.Channel], channel.open),
    )
    replicator.start()
    try:
        yield replicator
    finally:
        with contextlib.suppress(Exception):
            await replicator.stop()
        await appender.stop()


async def test_dial_loop_survives_a_write_on_a_finished_call() -> None:
    channel = FinishedCallChannel()
    async with replicating(channel, Backoff(first=0.01, cap=0.01)) as replicator:
        replicator.membership.add(PEER)
        task = replicator.peers[PEER].task
        assert task is not None
        await wait_for(lambda: channel.calls >= 3 or task.done(), timeout=10, message="redials")
        died = task.exception() if task.done() and not task.cancelled() else None
        assert died is None, f"the dial loop of {PEER} died: {died!r}; it never dials again"
        assert channel.calls >= 3, "the dial loop should keep redialing a peer whose streams fail"


class HelloThenEndCall(FinishedCall):
    """A call on which the peer answers the hello, then ends the stream at once (as a peer that
    refuses what it is sent would)."""

    def __init__(self) -> None:
        self._answers: list[Any] = [
            replication_pb2.ReplicateResponse(hello=replication_pb2.Hello(node_id=PEER_ID, url=PEER))
        ]

    async def write(self, message: Any) -> None:
        return None

    async def read(self) -> Any:
        return self._answers.pop(0) if self._answers else grpc.aio.EOF

    def done(self) -> bool:
        return False


class HelloThenEndChannel(FinishedCallChannel):
    def stream_stream(self, *args: Any, **kwargs: Any) -> Any:
        def call(*a: Any, **k: Any) -> HelloThenEndCall:
            self.calls += 1
            return HelloThenEndCall()

        return call


@dataclass(frozen=True)
class CountingBackoff(Backoff):
    """No wait at all, noting how many failures in a row each wait was asked for."""

    asked: list[int] = field(default_factory=list)

    def delay(self, failures: int) -> float:
        self.asked.append(failures)
        return 0.0


async def test_streams_that_end_right_after_their_hello_back_off_like_any_failure() -> None:
    """A hello alone is no sign the stream works: the backoff grows until one lasts."""
    backoff = CountingBackoff()
    async with replicating(HelloThenEndChannel(), backoff) as replicator:
        replicator.membership.add(PEER)
        await wait_for(lambda: len(backoff.asked) >= 4, timeout=10, message="redials")
        assert backoff.asked[:4] == [1, 2, 3, 4]


class RefusingCall(FinishedCall):
    """A call whose peer refuses a hello that does not ask to join (PERMISSION_DENIED: it removed
    this node), once `refuse` is set; records the hellos sent on it."""

    def __init__(self, refuse: asyncio.Event, hellos: list[replication_pb2.Hello]) -> None:
        self._refuse = refuse
        self._hellos = hellos

    async def write(self, message: Any) -> None:
        if message.HasField("hello"):
            self._hellos.append(message.hello)

    async def read(self) -> Any:
        await self._refuse.wait()
        if self._hellos[-1].join:
            return grpc.aio.EOF  # a join is taken (here the stream then simply ends)
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.PERMISSION_DENIED, grpc.aio.Metadata(), grpc.aio.Metadata(), "removed"
        )

    def done(self) -> bool:
        return False


async def test_a_refusal_answering_a_hello_sent_before_an_operator_added_the_peer_removes_nothing() -> None:
    """The peer refuses a hello that did not ask to join; an operator's POST /nodes meanwhile means
    this node asks to join now, rather than taking the refusal as the peer's word and removing it."""
    refuse = asyncio.Event()
    hellos: list[replication_pb2.Hello] = []
    channel = FinishedCallChannel()
    channel.stream_stream = lambda *a, **k: lambda *b, **c: RefusingCall(refuse, hellos)  # type: ignore[method-assign]
    async with replicating(channel, Backoff(first=60.0, cap=60.0)) as replicator:
        membership = replicator.membership
        membership.learn(PEER)  # heard of, not added by an operator: its hello does not ask to join
        await wait_for(lambda: len(hellos) == 1, timeout=10, message="the first hello")
        membership.add(PEER)  # the operator's POST /nodes, while the peer is still answering
        refuse.set()
        await wait_for(lambda: len(hellos) == 2, timeout=10, message="a second hello")
        assert not hellos[0].join and hellos[1].join
        assert PEER in membership.urls()


async def test_adding_a_known_peer_again_ends_its_wait_between_attempts() -> None:
    channel = FinishedCallChannel()
    async with replicating(channel, Backoff(first=60.0, cap=60.0)) as replicator:
        replicator.membership.add(PEER)
        await wait_for(lambda: channel.calls == 1, timeout=10, message="the first attempt")
        replicator.membership.add(PEER)  # again, by an operator: no 60 s wait for the next attempt
        await wait_for(lambda: channel.calls == 2, timeout=10, message="a second attempt")
