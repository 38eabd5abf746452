"""The appender's group commit: one failing job of a batch fails alone."""

from __future__ import annotations

import asyncio

from google.protobuf.struct_pb2 import Value

from potboiler.server.appender import Appender
from potboiler.server.log import Log, NewEntry
from potboiler.server.storage import MemoryStore


async def test_a_refused_ingest_whose_caller_gave_up_does_not_fail_the_batch() -> None:
    origin_store = MemoryStore()
    origin = Appender(Log(origin_store), origin_store)
    origin.start()
    store = MemoryStore()
    appender = Appender(Log(store), store)
    appender.start()
    try:
        [first, second] = await origin.append([NewEntry(Value(number_value=n)) for n in (1, 2)])
        forged = type(first)()
        forged.CopyFrom(first)
        forged.prev = second.id  # refused when planned
        ingest = asyncio.create_task(appender.ingest([forged]))
        local = asyncio.create_task(appender.append([NewEntry(Value(number_value=3))]))
        await asyncio.sleep(0)  # both queued for the same batch
        ingest.cancel()  # e.g. the replication stream that sent it ended meanwhile
        [entry] = await local
        assert entry.seq == 1
        assert appender.log.position == 1
    finally:
        await appender.stop()
        await origin.stop()
