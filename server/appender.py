"""Group commit: the single writer of a `Log`.

Every change (local appends, entries received from peers) is queued; one task takes everything
queued so far, plans it as one batch, writes that batch (one WAL write, and one fsync when `sync` is
on) and only then resolves the callers and wakes readers. Concurrent appends
therefore share a write, which is how one Python process reaches tens of thousands of durable
appends per second. While the event loop's thread is saturated, a write is held open for a moment
so that more appends join it (see `CommitWindow`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from potboiler.server.commit_window import CommitWindow, thread_demand
from potboiler.server.entries import AppendedEntries, NewEntry
from potboiler.server.errors import PotboilerError, Unavailable
from potboiler.server.log import Log
from potboiler.server.log_delivered import DeliveredBatch, take_delivered
from potboiler.server.log_plan import Plan
from potboiler.server.storage import Store
from potboiler.server.turns import Turns
from potboiler.v1.entry_pb2 import Entry

log = logging.getLogger(__name__)
_Batch = TypeVar("_Batch")

#: Most entries planned into one write batch.
MAX_GROUP = 20_000
#: The newest delivered entries kept in memory for subscribers that keep up (count, and bytes).
TAIL_ENTRIES = 20_000
TAIL_BYTES = 64 << 20
#: Most entries of a batch from the in-memory tail for a reader that names the mark of the entries
#: it applies (see `delivered_batch`).
WIDE_BATCH = 10_000


@dataclass
class _Job:
    local: Sequence[NewEntry] | None
    remote: Sequence[Entry] | None
    #: Resolves to the entries appended (`AppendedEntries`, for local ones) or taken (a list of
    #: `Entry`, for remote ones).
    done: asyncio.Future[Any]
    #: The remote entries serialized, as received.
    blobs: Sequence[bytes] | None = None
    #: Refuse the local entries while this node's own log is blocked (see `Log.plan_local`).
    unless_blocked: bool = False
    #: Where the remote entries came from, for the log's lines (a peer's id and URL).
    source: str = ""

    @property
    def size(self) -> int:
        """How many entries it writes."""
        return len(self.local or self.remote or ())


class Appender:
    """Serialises every write to a Log and batches concurrent ones together."""

    def __init__(
        self, log: Log, store: Store, *, sync: bool = False, window: CommitWindow | None = None
    ) -> None:
        self.log = log
        self._store = store
        self._sync = sync
        #: Seconds spent in synced writes, which hold the GIL: the process does nothing else then,
        #: so the commit window counts them as its thread's demand (a thread blocked in fsync is
        #: neither running nor waiting to run).
        self._synced_seconds = 0.0
        self._window = window or CommitWindow(cpu_clock=lambda: thread_demand() + self._synced_seconds)
        self._queue: list[_Job] = []
        self._queued_entries = 0
        self._wake = asyncio.Event()
        #: Set once enough appends are queued while a write is held open (see CommitWindow).
        self._enough = asyncio.Event()
        self._holding = False
        self._delivered = asyncio.Condition()
        self._listeners: list[Callable[[Plan], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        #: The newest delivered entries: the position of the first, the entries (None for those not
        #: parsed: this node's own new ones) and each entry serialized.
        self._tail_first = 0
        self._tail: list[Entry | None] = []
        self._tail_blobs: list[bytes] = []
        self._tail_bytes = 0
        #: Turns at catching up on the log, which readers that are behind (`follow`) and webhooks
        #: take, so that the node's requests are not held up behind all of them at once.
        self.turns = Turns()
        self.batches = 0
        self.held_batches = 0
        self.appended = 0
        self.ingested = 0

    def start(self) -> None:
        """Start the writer task."""
        self._window.reset()
        self._task = asyncio.create_task(self._run(), name="appender")
        if self.log.resuming:  # left by the last run of the node
            self._wake.set()

    async def stop(self) -> None:
        """Commit what is queued, then stop the writer task."""
        if self._task is None:
            return
        self._closing = True
        self._wake.set()
        self._enough.set()
        await self._task
        self._task = None

    def on_commit(self, listener: Callable[[Plan], None]) -> None:
        """Call `listener` with every plan once it is durable (on the event loop)."""
        self._listeners.append(listener)

    async def append(self, entries: Sequence[NewEntry], *, unless_blocked: bool = False) -> AppendedEntries:
        """Append validated entries to this node's log; returns them once durable. `unless_blocked`:
        Unavailable instead while an entry of this node's own log waits for a dependency (the new
        ones would wait behind it)."""
        return await self.queue_append(entries, unless_blocked=unless_blocked)

    def queue_append(
        self, entries: Sequence[NewEntry], *, unless_blocked: bool = False
    ) -> asyncio.Future[AppendedEntries]:
        """Queue appending validated entries; the future resolves to them once they are durable
        (for a caller that keeps several appends in flight without a task for each)."""
        done: asyncio.Future[AppendedEntries] = asyncio.get_running_loop().create_future()
        self._submit(_Job(entries, None, done, unless_blocked=unless_blocked))
        return done

    async def wait_own_log_unblocked(self, timeout: float) -> None:
        """Wait up to `timeout` seconds while an entry of this node's own log waits for a dependency;
        Unavailable, saying what it waits for, if one still does."""
        if not self.log.own_log_blocked():
            return
        async with self._delivered:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._delivered.wait_for(lambda: not self.log.own_log_blocked())
        blocked = self.log.own_blocked()
        if blocked is not None:
            raise Unavailable(blocked.describe())

    async def ingest(
        self, entries: Sequence[Entry], blobs: Sequence[bytes] | None = None, source: str = ""
    ) -> list[Entry]:
        """Store entries received from a peer, `source` (and, if given, each serialized as received,
        which is then stored as it is); returns those that were new, once durable."""
        done: asyncio.Future[list[Entry]] = asyncio.get_running_loop().create_future()
        self._submit(_Job(None, entries, done, blobs, source=source))
        return await done

    def _submit(self, job: _Job) -> None:
        if self._task is None or self._closing:
            raise RuntimeError("the log is not accepting writes: the node is stopping")
        if self._task.done():  # the writer failed outside a write (a bug): never wait on it
            raise RuntimeError("the log is not accepting writes: its writer has stopped")
        size = job.size
        queue = self._queue
        queue.append(job)
        self._queued_entries += size
        self._wake.set()
        if self._holding and self._window.enough(len(queue), self._queued_entries):
            self._enough.set()

    def delivered_blobs(
        self, after: int, limit: int, max_bytes: int | None = None
    ) -> list[tuple[int, bytes]]:
        """Up to `limit` delivered entries after position `after`, serialized, as (position, bytes);
        with `max_bytes`, only as many as fit in it (but at least one): from the in-memory tail when
        it reaches back that far, else from the store."""
        start = self._tail_index(after)
        if start is None:
            return self.log.delivered_blobs(after, limit, max_bytes)
        blobs = self._tail_blobs[start : start + limit]
        return take_delivered(zip(itertools.count(after + 1), blobs), limit, max_bytes)

    async def follow(
        self, after: int, read: Callable[[int], _Batch], last: Callable[[_Batch], int | None]
    ) -> AsyncIterator[_Batch]:
        """The batches `read(position)` returns of what is delivered after `position`, from `after`
        on, forever, each as soon as there is one (`last(batch)`: the position of its last entry,
        None when it is empty). A reader that is behind (more was delivered after its last batch)
        takes a turn (`turns`) before reading the next."""
        position = after
        behind = False
        while True:
            if behind:
                await self.turns.take()
            batch = read(position)
            end = last(batch)
            if end is None:
                behind = False
                await self.wait_delivered(position)
                continue
            position = end
            behind = position < self.log.position
            yield batch

    def delivered(self, after: int, limit: int) -> list[tuple[int, Entry]]:
        """Up to `limit` delivered (position, entry) after position `after` (see `delivered_batch`)."""
        return self.delivered_batch(after, limit).entries

    def delivered_batch(self, after: int, limit: int, mark: bytes | None = None) -> DeliveredBatch:
        """Up to `limit` delivered entries after position `after`, with their serialized forms: from
        the in-memory tail when it reaches back that far, else from the store. The entries are
        shared: do not change them.

        With `mark` (the bytes every entry the reader applies holds, as a service skips the others
        by their bytes), a batch from the tail holds up to WIDE_BATCH entries when `mark` occurs at
        most `limit` times in them: a reader that is behind gets a turn only every few passes of the
        loop, and under a heavy load of other entries (batches of 1,000 appended at 50,000 a second)
        it fell further and further behind, out of the tail and into reading the store."""
        start = self._tail_index(after)
        if start is None:
            return self.log.delivered_batch(after, limit)
        end = start + limit
        blobs = self._tail_blobs
        if mark is not None and len(blobs) > end:
            wide = start + WIDE_BATCH
            if b"".join(blobs[start:wide]).count(mark) <= limit:
                end = wide
        end = min(end, len(blobs))
        first = self._tail_first + start
        return DeliveredBatch(range(first, first + end - start), blobs[start:end], self._tail[start:end])

    def _tail_index(self, after: int) -> int | None:
        """Where the entry after position `after` is in the in-memory tail (None when the tail does
        not reach back that far)."""
        first = self._tail_first
        return after + 1 - first if self._tail and first <= after + 1 else None

    def _remember(self, plan: Plan) -> None:
        entries = plan.delivered_entries
        if not entries:
            return
        first = plan.position - len(entries) + 1
        tail = self._tail
        blobs = self._tail_blobs
        if not tail or self._tail_first + len(tail) != first:
            tail.clear()  # empty, or not contiguous (cannot happen with one writer; be safe)
            blobs.clear()
            self._tail_bytes = 0
            self._tail_first = first
        tail.extend(entries)
        blobs.extend(plan.delivered_blobs)
        self._tail_bytes += sum(map(len, plan.delivered_blobs))
        if len(tail) > TAIL_ENTRIES or self._tail_bytes > TAIL_BYTES:
            drop = len(tail) - len(tail) // 2
            self._tail_bytes -= sum(map(len, blobs[:drop]))
            self._tail_first += drop
            del tail[:drop]
            del blobs[:drop]

    async def wait_delivered(self, position: int, timeout: float | None = None) -> bool:
        """Wait until the delivery position exceeds `position`; False on timeout."""
        async with self._delivered:
            try:
                async with asyncio.timeout(timeout):
                    await self._delivered.wait_for(lambda: self.log.position > position)
            except TimeoutError:
                return False
        return True

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            # One turn of the loop first, so that requests already received join this batch.
            await asyncio.sleep(0)
            self._wake.clear()
            # Waiting entries left deliverable by a write (see `Log.resuming`) are delivered by the
            # next ones, with a turn of the loop between them; a stopping node leaves them for its
            # restart.
            while self._queue or (self.log.resuming and not self._closing):
                if self._queue:
                    hold = 0.0 if self._closing else self._window.hold(len(self._queue), self._queued_entries)
                    gathered = await self._hold_open(hold) if hold else None
                else:
                    gathered = None
                    await asyncio.sleep(0)
                jobs = self._take()
                try:
                    await self._commit(jobs)
                except Exception as exc:  # the write failed: every caller of this batch must hear it
                    log.exception("write batch failed")
                    for job in jobs:
                        if not job.done.done():
                            job.done.set_exception(exc)
                    if not jobs:  # the next append tries again
                        break
                if gathered is None:
                    self._window.committed()
                else:
                    self._window.committed(*gathered)
            if self._closing:
                return

    async def _hold_open(self, seconds: float) -> tuple[int, int]:
        """Let appends gather for up to `seconds`, or until enough are queued; how many came (jobs,
        and entries)."""
        before, entries_before = len(self._queue), self._queued_entries
        self.held_batches += 1
        self._enough.clear()
        self._holding = True
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._enough.wait()
        finally:
            self._holding = False
        return len(self._queue) - before, self._queued_entries - entries_before

    def _take(self) -> list[_Job]:
        jobs: list[_Job] = []
        n = 0
        while self._queue and (not jobs or n < MAX_GROUP):
            job = self._queue.pop(0)
            jobs.append(job)
            n += job.size
        self._queued_entries -= n
        return jobs

    async def _commit(self, jobs: list[_Job]) -> None:
        plan = self.log.begin()
        results: list[tuple[_Job, Sequence[Any]]] = []
        for job in jobs:
            try:
                if job.local is not None:
                    results.append(
                        (job, self.log.plan_local(plan, job.local, unless_blocked=job.unless_blocked))
                    )
                else:
                    remote = job.remote or ()
                    results.append((job, self.log.plan_remote(plan, remote, job.blobs, job.source)))
            except PotboilerError as exc:
                if not job.done.done():  # its caller may have given up (a replication stream ended)
                    job.done.set_exception(exc)
        self.log.finish(plan)
        # Written inline: rocksdict keeps the GIL during a write (fsync included), so a worker thread
        # would only add a hand-off. Calls arriving meanwhile queue up and form the next batch.
        if self._sync:
            began = time.monotonic()
            self._store.write(plan.writes, sync=True)
            self._synced_seconds += time.monotonic() - began
        else:
            self._store.write(plan.writes)
        self.log.apply(plan)
        self._remember(plan)
        self.batches += 1
        for job, entries in results:
            if job.local is not None:
                self.appended += len(entries)
            else:
                self.ingested += len(entries)
            if not job.done.done():
                job.done.set_result(entries)
        for listener in self._listeners:
            try:
                listener(plan)
            except Exception:  # the batch is written and acknowledged: not a failed write
                log.exception("a commit listener failed")
        async with self._delivered:
            self._delivered.notify_all()
