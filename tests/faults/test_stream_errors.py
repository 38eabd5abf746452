"""A replication stream torn down at the worst moment, reproduced deterministically in process.

When a connection is reset, grpc.aio finishes the call; a write on a finished call raises
`asyncio.InvalidStateError("RPC already finished.")` (grpc/aio/_call.py, `_write`), not an RpcError.
The proxy tests (test_proxy.py) hit this by chance when they reset links; here a fake channel whose
calls are already finished makes it happen on the first write, every time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, cast

import grpc

from potboiler.server.appender import Appender
from potboiler.server.backoff import Backoff
from potboiler.server.log import Log
from potboiler.server.membership import Membership
from potboiler.server.replication import Replicator
from potboiler.server.storage import MemoryStore
from tests.conftest import wait_for

PEER = "http://127.0.0.1:7"


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


async def test_dial_loop_survives_a_write_on_a_finished_call() -> None:
    store = MemoryStore()
    log = Log(store)
    appender = Appender(log, store)
    appender.start()
    membership = Membership(store, "http://127.0.0.1:9")
    channel = FinishedCallChannel()
    replicator = Replicator(
        appender,
        membership,
        gossip=False,
        backoff=Backoff(first=0.01, cap=0.01),
        channel=cast(Callable[[str], grpc.aio.Channel], channel.open),
    )
    replicator.start()
    try:
        membership.add(PEER)
        task = replicator.peers[PEER].task
        assert task is not None
        await wait_for(lambda: channel.calls >= 3 or task.done(), timeout=10, message="redials")
        died = task.exception() if task.done() and not task.cancelled() else None
        assert died is None, f"the dial loop of {PEER} died: {died!r}; it never dials again"
        assert channel.calls >= 3, "the dial loop should keep redialing a peer whose streams fail"
    finally:
        with contextlib.suppress(Exception):
            await replicator.stop()
        await appender.stop()
