"""KvService's read-your-writes waits, against an in-memory log whose delivery the test holds."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from potboiler.kv import service as kv_service
from potboiler.kv.crdts import CrdtType
from potboiler.kv.service import KvService
from potboiler.kv.state import CURSOR_KEY, state_key
from potboiler.server.errors import InvalidArgument, Unavailable
from potboiler.server.hlc import HybridClock
from potboiler.server.jsonvalue import from_value
from potboiler.server.plugin import NodeContext
from potboiler.server.storage import MemoryStore
from tests.fakelog import FakeLog

WAIT = 1.0


@pytest.fixture
async def kv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[KvService, FakeLog]]:
    monkeypatch.setattr(kv_service, "APPLY_WAIT", WAIT)
    log = FakeLog(HybridClock())
    service = KvService(NodeContext(log, tmp_path, log.clock), store=MemoryStore())
    await service.start()
    try:
        yield service, log
    finally:
        await service.stop()


async def test_a_read_shows_the_write_answered_before_it(
    kv: tuple[KvService, FakeLog], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kv_service, "APPLY_WAIT", 60.0)  # the read must not give up meanwhile
    service, log = kv
    await service.write(service.state.plan_write("_config", "t", "set", {"crdt": "LWW"}))
    log.held = True
    await service.write(service.state.plan_write("t", "k", "set", 1))
    read = asyncio.create_task(service.current())
    await asyncio.sleep(0.05)
    assert not read.done()  # the write is not applied yet
    log.release()
    state = await asyncio.wait_for(read, 10)
    assert from_value(state.get_message("t", "k")[1]) == 1


async def test_reads_and_state_planned_writes_are_unavailable_while_a_write_is_not_applied(
    kv: tuple[KvService, FakeLog],
) -> None:
    """A stale state would hide the write, and an OR-Set remove planned on it would carry none of
    the tags it saw added: after APPLY_WAIT both are refused, and they work again once it applies."""
    service, log = kv
    await service.write(service.state.plan_write("_config", "t", "set", {"crdt": "ORSET"}))
    await service.write(service.state.plan_write("_config", "lww", "set", {"crdt": "LWW"}))
    await asyncio.wait_for(service.current(), WAIT)
    log.held = True
    await service.write(service.state.plan_write("t", "k", "add", {"item": "x", "key": "a"}))
    with pytest.raises(Unavailable, match="not applied to its KV state yet"):
        await service.current()
    with pytest.raises(Unavailable, match="not applied to its KV state yet"):
        await service.state_to_plan("t")
    # A write that reads no state (an LWW set) is still taken, planned on the state as it is, also
    # while a _config write of this node for another table is not applied yet.
    await service.write(service.state.plan_write("_config", "other", "set", {"crdt": "LWW"}))
    assert not (await service.state_to_plan("lww")).plan_write("lww", "k", "set", 1).pending
    log.release()
    state = await asyncio.wait_for(service.current(), WAIT)
    remove = state.plan_write("t", "k", "remove", {"item": "x", "key": "a"})
    await service.write(remove)
    assert from_value((await asyncio.wait_for(service.current(), WAIT)).get_message("t", "k")[1]) == []


async def test_a_set_waits_for_this_nodes_retype_of_its_table(kv: tuple[KvService, FakeLog]) -> None:
    """This node answered a retype of `t` to ORSET: an LWW set of `t` checked against the type before
    it would be taken for LWW and never show (read-your-writes). It is a 503 until the retype applies,
    then a 400 (the op does not fit); sets of other tables go on meanwhile."""
    service, log = kv
    await service.write(service.state.plan_write("_config", "t", "set", {"crdt": "LWW"}))
    await service.write(service.state.plan_write("_config", "u", "set", {"crdt": "LWW"}))
    await asyncio.wait_for(service.current(), WAIT)
    log.held = True
    await service.write(service.state.plan_write("_config", "t", "set", {"crdt": "ORSET"}))
    with pytest.raises(Unavailable, match="not applied to its KV state yet"):
        await service.state_to_plan("t")
    assert not (await service.state_to_plan("u")).plan_write("u", "k", "set", 1).pending
    log.release()
    state = await asyncio.wait_for(service.state_to_plan("t"), WAIT)
    with pytest.raises(InvalidArgument, match="does not apply to ORSET tables"):
        state.plan_write("t", "k", "set", 1)


async def test_reads_after_a_restart_show_the_writes_answered_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write answered just before the node stopped, not applied by then, is applied when the
    service starts again: a read meanwhile waits for it (for up to APPLY_WAIT)."""
    monkeypatch.setattr(kv_service, "APPLY_WAIT", WAIT)
    log = FakeLog(HybridClock())
    store = MemoryStore()
    first = KvService(NodeContext(log, tmp_path, log.clock), store=store)
    await first.start()
    await first.write(first.state.plan_write("_config", "t", "set", {"crdt": "LWW"}))
    await asyncio.wait_for(first.current(), WAIT / 2)
    log.held = True
    await first.write(first.state.plan_write("t", "k", "set", 1))  # durable, not applied
    assert first._task is not None
    first._task.cancel()  # the node stops (its store stays as it was)
    log.release()  # delivered by the time the node is back
    again = KvService(NodeContext(log, tmp_path, log.clock), store=store)
    await again.start()
    try:
        async with asyncio.timeout(WAIT / 2):
            state = await again.current()  # awaited here: before the applier has had a turn
        assert from_value(state.get_message("t", "k")[1]) == 1
    finally:
        await again.stop()


async def applied_then_lost(tmp_path: Path) -> tuple[FakeLog, MemoryStore]:
    """A KV state that applied a table's config and a write, then stopped (its store as it was), and
    a log that came back without the write: the state is ahead of the log."""
    log = FakeLog(HybridClock())
    store = MemoryStore()
    first = KvService(NodeContext(log, tmp_path, log.clock), store=store)
    await first.start()
    await first.write(first.state.plan_write("_config", "t", "set", {"crdt": "LWW"}))
    await first.write(first.state.plan_write("t", "lost", "set", 1))
    await asyncio.wait_for(first.current(), WAIT)
    assert first.state.position == 2
    assert first._task is not None
    first._task.cancel()  # the node stops (its store stays as it was)
    del log.entries[1:]  # the log comes back without the second write
    return log, store


async def test_a_state_ahead_of_the_log_is_rebuilt_from_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The log lost entries the KV state had applied (a power cut without --fsync): on start, the
    state is rebuilt from the log as it is, not resumed past entries that will take those positions."""
    log, store = await applied_then_lost(tmp_path)
    again = KvService(NodeContext(log, tmp_path, log.clock), store=store)
    assert "rebuilding the KV state from the log" in caplog.text
    await again.start()
    try:
        await again.write(again.state.plan_write("t", "kept", "set", 2))  # takes position 2
        state = await asyncio.wait_for(again.current(), WAIT)
        assert state.position == 2
        assert state.keys("t") == ["kept"]
    finally:
        await again.stop()


async def test_a_rebuild_cut_short_is_made_again_on_the_next_start(tmp_path: Path) -> None:
    """A clear of the state interrupted (a power cut in the middle of it) may have deleted the cursor
    and left states: the next start clears again, though the cursor is no longer ahead of the log."""
    log, store = await applied_then_lost(tmp_path)
    store.write([(b"\x00clearing", b""), (CURSOR_KEY, None)])  # as a clear cut short leaves it
    again = KvService(NodeContext(log, tmp_path, log.clock), store=store)
    await again.start()
    try:
        state = await asyncio.wait_for(again.current(), WAIT)
        assert state.position == 1
        assert state.keys("t") == []
    finally:
        await again.stop()


async def test_a_state_written_by_older_code_is_rebuilt_from_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A store of format 1 may hold states this code would not make (an OR-Set key that a remove of
    nothing created): at start it is applied again from the log, which makes them as this code does."""
    log = FakeLog(HybridClock())
    store = MemoryStore()
    first = KvService(NodeContext(log, tmp_path, log.clock), store=store)
    await first.start()
    await first.write(first.state.plan_write("_config", "t", "set", {"crdt": "ORSET"}))
    await first.write(first.state.plan_write("t", "k", "add", {"item": "x", "key": "a"}))
    await asyncio.wait_for(first.current(), WAIT)
    assert first._task is not None
    first._task.cancel()  # the node stops (its store stays as it was)
    # As format 1 left it: no format mark, and a key the log does not make (a copy of k's state).
    store.write(
        [
            (b"\x00format", None),
            (state_key(CrdtType.ORSET, "t", "ghost"), store.get(state_key(CrdtType.ORSET, "t", "k"))),
        ]
    )
    again = KvService(NodeContext(log, tmp_path, log.clock), store=store)
    assert "written in format 1, and this node's code writes format 2" in caplog.text
    await again.start()
    try:
        state = await asyncio.wait_for(again.current(), WAIT)
        assert state.keys("t") == ["k"]
    finally:
        await again.stop()
