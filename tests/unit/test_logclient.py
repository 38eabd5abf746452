"""The services' applier loop over the log (`apply_forever`), and when they apply it again from 0
(`discard_if_stale`)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import cast

import pytest
from google.protobuf.struct_pb2 import Value

from potboiler.server.appender import Appender
from potboiler.server.entries import NewEntry
from potboiler.server.log import Log
from potboiler.server.log_delivered import DeliveredBatch
from potboiler.server.logclient import Linger, LocalLogClient, LogClient, apply_forever, discard_if_stale
from potboiler.server.storage import MemoryStore, mark_format, stored_format
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
        await appender.append([NewEntry(Value(number_value=n).SerializeToString()) for n in range(1000)])
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


class _AtPosition:
    """A log whose last delivered position is `end` (all `discard_if_stale` asks of it)."""

    def __init__(self, end: int) -> None:
        self.end = end

    def position(self) -> int:
        return self.end


def _service_store(cursor: int, written_in: int | None) -> MemoryStore:
    store = MemoryStore()
    store.write([(b"c", cursor.to_bytes(8, "big")), (b"s-state", b"x")])
    if written_in is not None:
        mark_format(store, written_in)
    return store


@pytest.mark.parametrize(
    ("cursor", "written_in", "state_format", "rebuilt"),
    [
        (0, None, 2, False),  # a new store
        (5, None, 1, False),  # unmarked: written in format 1
        (5, None, 2, True),
        (5, 2, 2, False),
        (5, 1, 2, True),  # older code's
        (5, 3, 2, True),  # newer code's (a downgrade)
        (11, 2, 2, True),  # ahead of the log
    ],
)
def test_a_service_store_in_another_format_or_ahead_of_the_log_is_rebuilt(
    cursor: int, written_in: int | None, state_format: int, rebuilt: bool, caplog: pytest.LogCaptureFixture
) -> None:
    store = _service_store(cursor, written_in)
    log = cast(LogClient, _AtPosition(10))
    assert discard_if_stale(log, cursor, store, "KV", state_format) is rebuilt
    assert (store.get(b"s-state") is None) is rebuilt
    assert stored_format(store) == state_format  # marked, whatever it was
    if rebuilt and cursor <= 10:
        assert f"written in format {written_in or 1}, and this node's code writes format 2" in caplog.text
    assert not discard_if_stale(log, 0 if rebuilt else cursor, store, "KV", state_format)  # once
