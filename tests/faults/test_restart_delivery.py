"""Causal delivery across a restart: a regression test, in process, for what the nemesis found.

In a long nemesis run (POTBOILER_NEMESIS_S=150, seeds 7 and 11) the node that had been killed and
restarted most kept hundreds of entries stored but never delivered: every entry of some owners' chains
after a certain point waited, forever, for an entry that had been delivered long before (it had a
delivery position) but that the restarted node counted as undelivered. Such an entry was one that
arrived in the same write batch as an entry it depends on, ahead of it: stored as waiting (a `u` key),
then delivered in that same batch, and its `u` key was not deleted, because `Log._deliver` deleted it
only for entries waiting since an earlier batch (`if raw in self._undelivered`). In memory all was well
until the node restarted and read the `u` keys back.
"""

from __future__ import annotations

import uuid

from google.protobuf.struct_pb2 import Value

from potboiler.server.appender import Appender
from potboiler.server.log import Log
from potboiler.server.storage import MemoryStore
from potboiler.v1.entry_pb2 import Entry


def remote_entry(owner: str, seq: int, prev: str = "", dependencies: tuple[str, ...] = ()) -> Entry:
    entry = Entry(id=str(uuid.uuid4()), owner=owner, seq=seq, prev=prev, data=Value(number_value=seq))
    entry.dependencies.extend(dependencies)
    entry.when.wall_ms = 1_700_000_000_000 + seq
    return entry


async def test_an_entry_delivered_in_the_batch_that_stored_it_is_still_delivered_after_a_restart() -> None:
    store = MemoryStore()
    log = Log(store)
    appender = Appender(log, store)
    appender.start()
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    needed = remote_entry(a, 1)
    waiter = remote_entry(b, 1, dependencies=(needed.id,))
    # One batch from a peer with the dependent entry ahead of the one it depends on.
    await appender.ingest([waiter, needed])
    assert (log.pending, log.position) == (0, 2), "both delivered in the batch"
    await appender.stop()

    restarted = Log(store)  # the node starts again on the same store
    appender = Appender(restarted, store)
    appender.start()
    try:
        assert restarted.pending == 0, "an entry delivered before the restart counts as undelivered after it"
        await appender.ingest([remote_entry(b, 2, prev=waiter.id)])
        assert restarted.position == 3, "the next entry of the chain is never delivered"
    finally:
        await appender.stop()
