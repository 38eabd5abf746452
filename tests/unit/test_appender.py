"""The appender's group commit: one failing job of a batch fails alone; appends for services wait
for, or are refused behind, an own entry waiting for a dependency."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Sequence

import pytest
from google.protobuf.struct_pb2 import Value

from potboiler.server import appender as appender_module
from potboiler.server import logclient
from potboiler.server.appender import WIDE_BATCH, Appender
from potboiler.server.entries import Appended, NewEntry
from potboiler.server.errors import Unavailable
from potboiler.server.ids import parse_uuid
from potboiler.server.log import Log
from potboiler.server.logclient import LocalLogClient
from potboiler.server.storage import MemoryStore
from potboiler.server.turns import Turns
from potboiler.v1.entry_pb2 import Entry
from tests.conftest import loop_turns, wait_for


@contextlib.asynccontextmanager
async def started() -> AsyncIterator[Appender]:
    """A running appender on a fresh in-memory log, stopped at the end."""
    store = MemoryStore()
    appender = Appender(Log(store), store)
    appender.start()
    try:
        yield appender
    finally:
        await appender.stop()


def full(appended: Sequence[Appended]) -> list[Entry]:
    """Appended entries in full, as a peer receives them."""
    return [a.entry() for a in appended]


async def test_a_refused_ingest_whose_caller_gave_up_does_not_fail_the_batch() -> None:
    async with started() as origin, started() as appender:
        [first, second] = full(
            await origin.append([NewEntry(Value(number_value=n).SerializeToString()) for n in (1, 2)])
        )
        forged = type(first)()
        forged.CopyFrom(first)
        forged.prev = second.id  # refused when planned
        ingest = asyncio.create_task(appender.ingest([forged]))
        local = asyncio.create_task(appender.append([NewEntry(Value(number_value=3).SerializeToString())]))
        await asyncio.sleep(0)  # both queued for the same batch
        ingest.cancel()  # e.g. the replication stream that sent it ended meanwhile
        [entry] = await local
        assert entry.seq == 1
        assert appender.log.position == 1


async def test_a_service_append_waits_for_a_blocked_log_then_goes_ahead_or_is_refused() -> None:
    async with started() as origin, started() as appender:
        [dep] = full(await origin.append([NewEntry(Value(number_value=0).SerializeToString())]))
        [waiting] = await appender.append(
            [NewEntry(Value(number_value=1).SerializeToString(), (parse_uuid(dep.id),))]
        )
        with pytest.raises(Unavailable) as refused:
            await appender.wait_own_log_unblocked(0)
        assert f"its entry {waiting.id} (seq 1) depends on {dep.id}" in str(refused.value)
        # The writer refuses too (as for an append queued in the same batch behind the blocking one).
        with pytest.raises(Unavailable, match="held up"):
            await appender.append([NewEntry(Value(number_value=2).SerializeToString())], unless_blocked=True)
        assert appender.log.vector() == {appender.log.node_id: 1}
        # The dependency arrives while a service's append waits: it goes ahead.
        wait = asyncio.create_task(appender.wait_own_log_unblocked(10))
        await asyncio.sleep(0)
        assert not wait.done()
        await appender.ingest([dep])
        await wait
        [entry] = await appender.append(
            [NewEntry(Value(number_value=3).SerializeToString())], unless_blocked=True
        )
        assert entry.seq == 2 and not appender.log.own_log_blocked()


async def test_a_service_append_refused_in_its_batch_waits_for_the_dependency_like_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logclient, "BLOCKED_WAIT", 30.0)
    async with started() as origin, started() as appender:
        [dep] = full(await origin.append([NewEntry(Value(number_value=0).SerializeToString())]))
        # Queued first, in the same batch: the service's append passes the wait, then is refused in
        # the writer, and waits again for what is left of its moment.
        blocking = appender.queue_append(
            [NewEntry(Value(number_value=1).SerializeToString(), (parse_uuid(dep.id),))]
        )
        write = asyncio.create_task(LocalLogClient(appender).append(Value(number_value=2)))
        await blocking
        await asyncio.sleep(0.05)
        assert not write.done() and appender.log.vector() == {appender.log.node_id: 1}
        await appender.ingest([dep])
        entry = await write
        assert entry.seq == 2 and appender.log.pending == 0


async def test_a_failing_commit_listener_fails_nothing_and_delivery_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The batch is written when listeners run: one raising must not be reported as a failed write,
    nor keep subscribers asleep until the next commit."""
    async with started() as appender:

        def broken(plan: object) -> None:
            raise RuntimeError("a listener's bug")

        appender.on_commit(broken)
        subscription = LocalLogClient(appender).subscribe(0)
        assert isinstance(subscription, AsyncGenerator)
        waiting = asyncio.ensure_future(anext(subscription))
        await asyncio.sleep(0)  # the subscriber waits for a commit
        [entry] = await appender.append([NewEntry(Value(number_value=1).SerializeToString())])
        batch = await asyncio.wait_for(waiting, 10)
        assert [e.id for _, e in batch.entries] == [entry.id]
        assert "a commit listener failed" in caplog.text and "write batch failed" not in caplog.text
        await subscription.aclose()


async def a_chain_waiting_for_one() -> tuple[Entry, list[Entry]]:
    """An entry of one node, and 10 entries of another node's chain, the first depending on it."""
    async with started() as origin, started() as writer:
        [awaited] = full(await origin.append([NewEntry(Value(number_value=0).SerializeToString())]))
        chain = full(
            await writer.append(
                [NewEntry(Value(number_value=1).SerializeToString(), (parse_uuid(awaited.id),))]
            )
        )
        chain += full(
            await writer.append([NewEntry(Value(number_value=n).SerializeToString()) for n in range(2, 11)])
        )
    return awaited, chain


async def test_entries_waiting_for_one_are_delivered_over_several_writes_the_loop_turning_between() -> None:
    awaited, chain = await a_chain_waiting_for_one()
    store = MemoryStore()
    appender = Appender(Log(store, cascade_budget=3), store)
    appender.start()
    try:
        await appender.ingest(chain)
        assert appender.log.pending == 10
        batches = appender.batches
        async with loop_turns() as turns:
            await appender.ingest([awaited])  # 1 + 3 delivered by this write, the rest by three more
            assert appender.log.position == 4
            assert await appender.wait_delivered(10, timeout=10)
        assert appender.batches - batches == 4
        assert turns.count >= 3
        assert [e.id for _, e in appender.delivered(0, 20)] == [awaited.id, *(e.id for e in chain)]
    finally:
        await appender.stop()


async def test_a_restarted_writer_delivers_what_its_last_run_left_deliverable() -> None:
    awaited, chain = await a_chain_waiting_for_one()
    store = MemoryStore()
    log = Log(store, cascade_budget=3)
    for entries in (chain, [awaited]):  # as a writer that stops right after the second write
        plan = log.begin()
        log.plan_remote(plan, entries)
        log.finish(plan)
        store.write(plan.writes)
        log.apply(plan)
    assert log.position == 4 and log.resuming
    appender = Appender(Log(store, cascade_budget=3), store)
    appender.start()
    try:
        assert await appender.wait_delivered(10, timeout=10)
        assert appender.log.pending == 0
    finally:
        await appender.stop()


def _last(batch: list[tuple[int, Entry]]) -> int | None:
    return batch[-1][0] if batch else None


async def test_readers_that_are_behind_take_turns_and_a_live_one_does_not() -> None:
    async with started() as appender:
        appender.turns = Turns(every=50)
        await appender.append([NewEntry(Value(number_value=n).SerializeToString()) for n in range(12)])
        read_in: list[tuple[str, int]] = []
        positions = {"a": 0, "b": 0}

        async def follow(name: str) -> None:
            def read(after: int) -> list[tuple[int, Entry]]:
                batch = appender.delivered(after, 3)
                if batch:
                    read_in.append((name, counted.count))
                return batch

            async for batch in appender.follow(0, read, _last):
                positions[name] = batch[-1][0]

        async with loop_turns() as counted:
            readers = [asyncio.create_task(follow(name)) for name in positions]
            await wait_for(lambda: positions == {"a": 12, "b": 12})
            # Each reader's first read is at once; every later one of the catch-up waits for a
            # turn, one reader at a time.
            assert len(read_in) == 8
            later = sorted(at for name in positions for _, at in [r for r in read_in if r[0] == name][1:])
            assert all(b - a >= 50 for a, b in itertools.pairwise(later))
            # Caught up, a reader gets what is appended next without a turn: none is handed out now.
            appender.turns = Turns(every=10**9)
            await appender.turns.take()
            await appender.append([NewEntry(Value(number_value=99).SerializeToString())])
            await wait_for(lambda: positions == {"a": 13, "b": 13})
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


async def test_a_reader_naming_its_mark_gets_wide_batches_of_other_entries_from_the_tail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mark = b"\n\x04mine"

    def data(mine: bool) -> Value:
        value = Value()
        value.struct_value.fields["mine" if mine else "other"].number_value = 1
        return value

    async with started() as appender:
        await appender.append([NewEntry(data(mine=n % 100 == 0).SerializeToString()) for n in range(3000)])
        # Without a mark, or with the mark in more than `limit` of the entries: `limit` entries.
        assert len(appender.delivered_batch(0, 10).entries) == 10
        assert len(appender.delivered_batch(0, 10, b"\n\x05other").entries) == 10
        # With the mark in at most `limit` of them: as many as the tail holds, up to WIDE_BATCH.
        batch = appender.delivered_batch(0, 30, mark)
        assert [p for p, _ in batch.entries] == list(range(1, 3001))
        assert [sum(blob.count(mark) for blob in batch.blobs)] == [30]
        assert len(appender.delivered_batch(0, 29, mark).entries) == 29
        # Caught up but for a few: what there is.
        assert [p for p, _ in appender.delivered_batch(2990, 30, mark).entries] == list(range(2991, 3001))
        # Entries the tail no longer holds come from the store, `limit` at a time.
        monkeypatch.setattr(appender_module, "TAIL_ENTRIES", 100)
        await appender.append(
            [NewEntry(data(mine=False).SerializeToString())]
        )  # the tail keeps its newest half
        from_store = appender.delivered_batch(0, 30, mark)
        assert [p for p, _ in from_store.entries] == list(range(1, 31))
        assert from_store.blobs == batch.blobs[:30]


async def test_a_service_applier_keeps_up_within_the_tail_under_batches_of_other_entries() -> None:
    """A subscription with a mark catches up on thousands of other entries in few batches."""
    async with started() as appender:
        await appender.append(
            [NewEntry(Value(number_value=n).SerializeToString()) for n in range(WIDE_BATCH + 500)]
        )
        sizes: list[int] = []
        async for batch in LocalLogClient(appender).subscribe(0, 100, b"\n\x05table"):
            sizes.append(len(batch.entries))
            if batch.entries[-1][0] == WIDE_BATCH + 500:
                break
        assert sizes == [WIDE_BATCH, 500]


async def test_appended_entries_read_from_the_tail_are_those_the_store_holds() -> None:
    """This node's new entries are kept serialized only; read from the in-memory tail they are the
    same entries, with the same bytes, as read back from the store."""
    async with started() as appender:
        deps = full(await appender.append([NewEntry(Value(number_value=0).SerializeToString())]))
        appended = await appender.append(
            [NewEntry(Value(string_value=f"e{i}").SerializeToString()) for i in range(5)]
            + [NewEntry(Value(bool_value=True).SerializeToString(), (parse_uuid(deps[0].id),))]
        )
        from_tail = appender.delivered_batch(0, 100)
        from_store = appender.log.delivered_batch(0, 100)
        assert from_tail.blobs == from_store.blobs
        assert from_tail.entries == from_store.entries
        assert [e.id for _, e in from_tail.entries[1:]] == [a.id for a in appended]
        assert [a.entry() for a in appended] == [e for _, e in from_tail.entries[1:]]
        assert [(a.seq, a.when) for a in appended] == [
            (e.seq, (e.when.wall_ms, e.when.logical)) for _, e in from_tail.entries[1:]
        ]
