"""When the group commit holds a write open: only while the writer's thread is saturated and holds
gather more appends, never for the first write after a pause, and not once enough are queued."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
from google.protobuf.struct_pb2 import Value

from potboiler.server import appender as appender_module
from potboiler.server.appender import Appender
from potboiler.server.commit_window import CommitWindow, thread_demand
from potboiler.server.entries import NewEntry
from potboiler.server.log import Log
from potboiler.server.storage import MemoryStore, Write


class Clocks:
    """A wall clock and a thread CPU clock that tests move by hand."""

    def __init__(self) -> None:
        self.wall = 100.0
        self.cpu = 10.0

    def run(self, seconds: float, busy: float) -> None:
        """Let `seconds` pass with the thread busy for the fraction `busy` of them."""
        self.wall += seconds
        self.cpu += seconds * busy


def window(clocks: Clocks) -> CommitWindow:
    return CommitWindow(
        max_wait=0.002,
        enough_jobs=16,
        start_busy=0.85,
        stop_busy=0.5,
        period=0.05,
        burst_gap=0.01,
        min_gathered=4.0,
        trial_holds=8,
        first_retry=0.1,
        retry_after=2.0,
        clock=lambda: clocks.wall,
        cpu_clock=lambda: clocks.cpu,
    )


def commit_for(w: CommitWindow, clocks: Clocks, seconds: float, busy: float, every: float = 0.001) -> None:
    """Commits every `every` seconds for `seconds`, the thread busy for the fraction `busy`."""
    for _ in range(round(seconds / every)):
        clocks.run(every, busy)
        w.committed()


def test_an_idle_or_lightly_loaded_writer_never_holds() -> None:
    clocks = Clocks()
    w = window(clocks)
    assert w.hold(1, 1) == 0.0
    commit_for(w, clocks, 0.5, busy=0.6)
    assert not w.holding
    assert w.hold(1, 1) == 0.0


def test_a_saturated_writer_holds_until_its_thread_has_time_to_spare() -> None:
    clocks = Clocks()
    w = window(clocks)
    commit_for(w, clocks, 0.1, busy=0.95)
    assert w.holding
    assert w.hold(1, 1) == 0.002
    # Hysteresis: busy between the two thresholds changes nothing.
    commit_for(w, clocks, 0.2, busy=0.7)
    assert w.holding
    commit_for(w, clocks, 0.1, busy=0.3)
    assert not w.holding
    assert w.hold(1, 1) == 0.0


def test_no_hold_once_enough_appends_are_queued() -> None:
    clocks = Clocks()
    w = window(clocks)
    commit_for(w, clocks, 0.1, busy=0.95)
    assert w.hold(15, 15) == 0.002
    assert w.hold(1, 255) == 0.002
    assert w.hold(1, 256) == 0.0
    assert w.hold(16, 16) == 0.0


def test_the_first_write_after_a_pause_is_not_held() -> None:
    clocks = Clocks()
    w = window(clocks)
    commit_for(w, clocks, 0.1, busy=0.95)
    clocks.run(0.5, busy=0.0)  # a lone request after load stopped: commit it at once
    assert w.hold(1, 1) == 0.0
    w.committed()  # and the long idle period turns holding off
    assert not w.holding


async def test_a_held_write_takes_the_appends_that_come_meanwhile() -> None:
    class Saturated(CommitWindow):
        """Holds every write until enough appends are queued (as if the thread were saturated;
        a hold longer than any test, so that only the appends end it)."""

        def __init__(self) -> None:
            super().__init__(enough_jobs=4)
            self.asked = asyncio.Event()

        def hold(self, queued_jobs: int, queued_entries: int) -> float:
            self.asked.set()
            return 0.0 if queued_jobs >= self.enough_jobs else 60.0

    store = MemoryStore()
    saturated = Saturated()
    appender = Appender(Log(store), store, window=saturated)
    appender.start()
    try:
        first = asyncio.create_task(appender.append([NewEntry(Value(number_value=0).SerializeToString())]))
        await asyncio.wait_for(saturated.asked.wait(), 10)
        assert not first.done()  # held open, waiting for more
        rest = [
            asyncio.create_task(appender.append([NewEntry(Value(number_value=n).SerializeToString())]))
            for n in (1, 2, 3)
        ]
        entries = [e for t in [first, *rest] for e in await asyncio.wait_for(t, 10)]
        assert [e.entry().data.number_value for e in entries] == [0, 1, 2, 3]
        assert appender.batches == 1  # the fourth append ended the hold: one write for all
    finally:
        await appender.stop()


async def test_stop_ends_a_held_write_and_commits_it() -> None:
    class Saturated(CommitWindow):
        def __init__(self) -> None:
            super().__init__()
            self.asked = asyncio.Event()

        def hold(self, queued_jobs: int, queued_entries: int) -> float:
            self.asked.set()
            return 30.0

    store = MemoryStore()
    window = Saturated()
    appender = Appender(Log(store), store, window=window)
    appender.start()
    pending = asyncio.create_task(appender.append([NewEntry(Value(number_value=1).SerializeToString())]))
    await asyncio.wait_for(window.asked.wait(), 1.0)  # the writer holds the write open now
    await asyncio.wait_for(appender.stop(), 1.0)
    [entry] = await pending
    assert entry.seq == 1


def fail_a_try(w: CommitWindow, clocks: Clocks) -> None:
    """Eight holds, each joined by one more job at most."""
    for _ in range(8):
        clocks.run(0.002, busy=0.95)
        w.committed(gathered=1)


def test_holds_that_gather_little_stop_and_are_tried_again_later_and_later() -> None:
    """A client streaming its appends has sent all it may already: holding its writes only delays
    them, so the window stops holding after a few holds, and tries again after 0.1 s, 0.2 s, ...
    up to `retry_after`, while tries keep failing."""
    clocks = Clocks()
    w = window(clocks)
    commit_for(w, clocks, 0.1, busy=0.95)
    assert w.holding
    for retry in (0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0):
        fail_a_try(w, clocks)
        assert not w.holding  # at once, within the period
        commit_for(w, clocks, retry - 0.06, busy=0.95)  # still saturated, but not yet
        assert not w.holding
        commit_for(w, clocks, 0.1, busy=0.95)
        assert w.holding  # tried again


def test_a_try_that_pays_makes_the_next_retry_soon() -> None:
    clocks = Clocks()
    w = window(clocks)
    commit_for(w, clocks, 0.1, busy=0.95)
    for _ in range(3):  # tries fail while 32 connections open: next retry after 0.8 s
        fail_a_try(w, clocks)
        commit_for(w, clocks, 1.0, busy=0.95)
    assert w.holding
    for _ in range(50):  # a period of holds that gather
        clocks.run(0.002, busy=0.9)
        w.committed(gathered=9)
    assert w.holding
    for _ in range(10):  # holds stop gathering (averaged with this period's earlier ones)
        fail_a_try(w, clocks)
        if not w.holding:
            break
    assert not w.holding
    commit_for(w, clocks, 0.15, busy=0.95)
    assert w.holding  # retried after 0.1 s again


def test_holds_that_gather_keep_holding() -> None:
    clocks = Clocks()
    w = window(clocks)
    commit_for(w, clocks, 0.1, busy=0.95)
    for _ in range(500):
        clocks.run(0.002, busy=0.9)
        w.committed(gathered=9)
    assert w.holding


def test_holds_that_gather_few_calls_of_many_entries_keep_holding() -> None:
    """Batches of 100 entries, 4 calls in flight: a hold gathers 2 or 3 calls, hundreds of entries
    for one write (with `--fsync`, one fsync)."""
    clocks = Clocks()
    w = window(clocks)
    commit_for(w, clocks, 0.1, busy=0.95)
    for _ in range(500):
        clocks.run(0.002, busy=0.9)
        w.committed(gathered=2, gathered_entries=200)
    assert w.holding
    for _ in range(80):  # then a streaming client's messages: few calls, few entries
        clocks.run(0.002, busy=0.95)
        w.committed(gathered=1, gathered_entries=16)
        if not w.holding:
            break
    assert not w.holding


class Recording(CommitWindow):
    """Holds every write (as if saturated) for up to `seconds`, and records what each write reports."""

    def __init__(self, seconds: float, enough_entries: int = 256) -> None:
        super().__init__(enough_entries=enough_entries)
        self.seconds = seconds
        self.asked: list[tuple[int, int]] = []
        self.reports: list[tuple[int, int] | None] = []

    def hold(self, queued_jobs: int, queued_entries: int) -> float:
        self.asked.append((queued_jobs, queued_entries))
        return 0.0 if self.enough(queued_jobs, queued_entries) else self.seconds

    def committed(self, gathered: int | None = None, gathered_entries: int = 0) -> None:
        self.reports.append(None if gathered is None else (gathered, gathered_entries))


def entries(n: int) -> list[NewEntry]:
    return [NewEntry(Value(number_value=i).SerializeToString()) for i in range(n)]


async def test_a_hold_ends_once_enough_entries_are_queued_and_reports_what_it_gathered() -> None:
    store = MemoryStore()
    window = Recording(5.0, enough_entries=6)
    appender = Appender(Log(store), store, window=window)
    appender.start()
    try:
        first = asyncio.create_task(appender.append(entries(3)))
        await asyncio.sleep(0.05)
        assert not first.done()
        second = asyncio.create_task(appender.append(entries(3)))  # 6 entries queued: enough
        await asyncio.wait_for(asyncio.gather(first, second), 1.0)
        assert window.reports == [(1, 3)]  # held once; one more job, of 3 entries, joined it
        assert appender.held_batches == appender.batches == 1
        await asyncio.wait_for(appender.append(entries(6)), 1.0)  # enough at once: not held
        assert window.reports == [(1, 3), None]
    finally:
        await appender.stop()


async def test_queued_entries_are_counted_across_a_batch_split_at_max_group(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(appender_module, "MAX_GROUP", 4)
    store = MemoryStore()
    window = Recording(0.0)  # never holds; records what the writer says is queued
    appender = Appender(Log(store), store, window=window)
    appender.start()
    try:
        jobs = [appender.queue_append(entries(n)) for n in (3, 3, 0, 3, 3)]  # queued in one turn
        await asyncio.wait_for(asyncio.gather(*jobs), 1.0)
        # Batches of at least MAX_GROUP entries: 3 + 3, then 0 + 3 + 3.
        assert window.asked == [(5, 12), (3, 6)]
        assert window.reports == [None, None]
        assert appender.log.position == 12
    finally:
        await appender.stop()


async def test_appends_are_refused_not_left_waiting_once_the_writer_has_died() -> None:
    class Broken(CommitWindow):
        def committed(self, gathered: int | None = None, gathered_entries: int = 0) -> None:
            raise ZeroDivisionError("a bug in the window")

    store = MemoryStore()
    appender = Appender(Log(store), store, window=Broken())
    appender.start()
    [entry] = await asyncio.wait_for(appender.append(entries(1)), 1.0)  # written before the bug
    assert entry.seq == 1  # the writer died in the same step, after answering
    with pytest.raises(RuntimeError, match="its writer has stopped"):
        await appender.append(entries(1))
    with pytest.raises(ZeroDivisionError):
        await appender.stop()


def test_a_busy_period_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        CommitWindow(period=0)


def test_thread_demand_counts_what_the_thread_ran() -> None:
    before = thread_demand()
    deadline = time.thread_time() + 0.02
    while time.thread_time() < deadline:  # 20 ms of this thread's CPU
        pass
    assert thread_demand() - before >= 0.015


async def test_synced_writes_count_as_the_writers_demand() -> None:
    """A synced write blocks the writer's thread in fsync, holding the GIL: the process does nothing
    else meanwhile, though the thread is neither running nor waiting to run. Counted as demand, a
    writer that spends its time syncing holds writes open, and each fsync takes many appends."""

    class SyncingStore(MemoryStore):
        def write(self, batch: Sequence[Write], *, sync: bool = False) -> None:
            super().write(batch, sync=sync)
            if sync:
                time.sleep(0.003)  # an fsync, the GIL held

    store = SyncingStore()
    appender = Appender(Log(store), store, sync=True)
    appender.start()

    async def client() -> None:
        for n in range(40):
            await appender.append([NewEntry(Value(number_value=n).SerializeToString())])

    try:
        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(8))), 60)
    finally:
        await appender.stop()
    assert appender.held_batches > 0
    assert appender.appended == 320
    assert appender.batches < 320 / 2  # one fsync per several appends
