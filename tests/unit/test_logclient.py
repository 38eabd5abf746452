"""The services' applier loop over the log (`apply_forever`)."""

from __future__ import annotations

import asyncio
import contextlib

from google.protobuf.struct_pb2 import Value

from potboiler.server.appender import Appender
from potboiler.server.entries import NewEntry
from potboiler.server.log import Log
from potboiler.server.log_delivered import DeliveredBatch
from potboiler.server.logclient import Linger, LocalLogClient, apply_forever
from potboiler.server.storage import MemoryStore
from tests.conftest import loop_turns


async def test_an_applier_with_a_backlog_lets_the_event_loop_turn_between_batches() -> None:
    """A service rebuilding its state from a long log applies full batch after full batch; the node
    must go on serving meanwhile (a whole rebuild held its event loop, for 11 s at 250k entries)."""
    store = MemoryStore()
    appender = Appender(Log(store), store)
    appender.start()
    applied = 0
    done = asyncio.Event()

    async def apply(batch: DeliveredBatch) -> None:  # synchronous work, as KV's and Pigtail's
        nonlocal applied
        applied = batch.entries[-1][0]
        if applied == 1000:
            done.set()

    try:
        await appender.append([NewEntry(Value(number_value=n)) for n in range(1000)])
        async with loop_turns() as turns:
            applier = asyncio.create_task(
                apply_forever(LocalLogClient(appender), lambda: applied, apply, Linger(0.05), 100, "test")
            )
            await asyncio.wait_for(done.wait(), 10)
        assert turns.count >= 9  # one at least between each two of the 10 batches
    finally:
        applier.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await applier
        await appender.stop()
