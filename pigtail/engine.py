"""Pigtail's operations on one node: check a request against the state, append the event, wait until
this node has applied it, answer from the state.

Writes go to the log through the narrow :class:`~potboiler.server.logclient.LogClient` (append and
subscribe). One background task (the *applier*) reads the log from the state's cursor and applies every
delivered batch to :class:`~potboiler.pigtail.state.PigtailState`, writing the new states and the cursor
in one store batch. An operation that appended an entry waits (bounded) until the applier has applied
that entry before answering, so a client reads its own writes on the node that took them.

Decisions follow the state machine (:mod:`potboiler.pigtail.machine`): a request is checked with its
``check_*`` function before anything is appended (a refused request appends nothing), and a claim is
checked again once applied, because a concurrent claim with a lower stamp may have won meanwhile (its
worker then gets a 409 at once). ``now_ms`` comes from the node's hybrid logical clock, so the decisions
use the same time base as the stamps of the events they append.

Events declare dependencies so that replicas apply them in an order that makes sense: a task's add (and
a queue's delete) depends on the entry that created the queue's incarnation; a claim, release, done or
retry depends on that create entry and on the task's add.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
import zlib
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from potboiler.pigtail import paging, validate
from potboiler.pigtail.codec import EVENT_MARK, event_data, stamp_of
from potboiler.pigtail.events import (
    Event,
    JSONValue,
    QueueCreated,
    QueueDeleted,
    TaskAdded,
    TaskClaimed,
    TaskDone,
    TaskReleased,
    TaskRetried,
)
from potboiler.pigtail.machine import (
    Decision,
    Incarnation,
    ListEntry,
    QueueConfig,
    QueueState,
    Reason,
    Stamp,
    TaskState,
    TaskView,
    Verdict,
    check_add,
    check_claim,
    check_create,
    check_delete,
    check_done,
    check_release,
    check_retry,
    find_by_key,
    latest_delete,
    task_view,
    task_view_after,
)
from potboiler.pigtail.scheduler import Rank, Scheduler
from potboiler.pigtail.state import STATE_FORMAT, Applied, PigtailState, StoreFailed
from potboiler.server.entries import Appended
from potboiler.server.errors import (
    AlreadyExists,
    Contended,
    NotFound,
    PotboilerError,
    TooLarge,
    Unavailable,
    quoted,
)
from potboiler.server.hlc import MAX_DRIFT_MS, HybridClock
from potboiler.server.hlc import Stamp as ClockStamp
from potboiler.server.log_delivered import DeliveredBatch
from potboiler.server.logclient import (
    APPLY_RETRY,
    Attempts,
    CatchUp,
    Linger,
    LogClient,
    apply_forever,
    discard_if_stale,
)
from potboiler.server.storage import Store

log = logging.getLogger(__name__)

#: Longest an operation waits for the applier to apply the entry it appended.
APPLY_TIMEOUT_S = 30.0
#: Longest an operation waits, after the node starts, for the state to show what the log held then.
CATCH_UP_WAIT_S = 5.0
#: Most log entries applied in one batch.
APPLY_BATCH = 1000
#: Longest the applier waits to gather entries into one batch while no operation waits for it
#: (entries from other nodes, other services' entries): at most this much later to lease streams.
#: Most entries are not Pigtail's, so each wake-up mostly just moves the cursor (see kv/service.py).
APPLY_LINGER_S = 0.02
#: How many applied entry ids are remembered for callers that start waiting after the fact.
RECENT_IDS = 100_000
#: Longest a lease stream waits before looking at its queue again, whatever it is told.
LEASE_RECHECK_S = 5.0
#: A node counts as up (for `Pigtail._share`) while its newest clock promise, which a live node
#: sends every second, is at most this old.
UP_PROMISE_MS = 10_000
#: How long `Pigtail._share` keeps its answer.
SHARE_TTL_MS = 1_000
#: Open tasks placed in the scheduler between two turns of the event loop at start.
PLACE_CHUNK = 500
#: Longest a stopping node waits for the releases under way (of tasks claimed for lease streams the
#: stop cut before they were sent), which would otherwise stay held until their lease ends.
STOP_RELEASES_S = 2.0


class _Lost:
    """A claim that lost a race (another claim won first): try the next task."""


LOST: Final = _Lost()


@dataclass(frozen=True)
class QueueInfo:
    """A queue's settings and how many of its tasks are in each state."""

    name: str
    config: QueueConfig
    pending: int = 0
    working: int = 0
    delayed: int = 0
    dead: int = 0


def _settings(config: QueueConfig) -> str:
    limit = "no max_attempts" if config.max_attempts is None else f"max_attempts={config.max_attempts}"
    return f"timeout_ms={config.timeout_ms} and {limit}"


def _share_of(count: int, index: int) -> Callable[[str], bool]:
    """Whether a task id is in share `index` of `count`."""

    def share(task_id: str) -> bool:
        return zlib.crc32(task_id.encode()) % count == index

    return share


class Pigtail:
    """The task queues of one node."""

    def __init__(self, log_client: LogClient, store: Store, clock: HybridClock) -> None:
        self._log = log_client
        self._store = store
        self._clock = clock
        self.state = PigtailState(store)
        if discard_if_stale(log_client, self.state.cursor, store, "Pigtail", STATE_FORMAT):
            self.state = PigtailState(store)
        #: Filled with the open tasks by the applier task before anything is answered (`_place_open`).
        self._scheduler = Scheduler()
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()
        #: Waits of lease streams and claim-next calls: for a claimable task of a queue (each woken in
        #: turn, one per task that becomes claimable), for a change of a held task, for a queue change.
        self._ready_waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._task_watchers: dict[tuple[str, str], set[asyncio.Future[None]]] = {}
        self._queue_watchers: dict[str, set[asyncio.Future[None]]] = {}
        self._reserved: dict[str, set[str]] = {}
        #: The tasks this node is marking done (a second complete of one waits, then finds it done).
        self._completing: dict[tuple[str, str], asyncio.Future[None]] = {}
        #: Per queue with ready waiters: when, and the timer that wakes them, as the queue's next
        #: waiting task may become claimable then (a due time or a lease end: time alone does it).
        self._timers: dict[str, tuple[int, asyncio.TimerHandle]] = {}
        self._applier: asyncio.Task[None] | None = None
        self._linger = Linger(APPLY_LINGER_S)
        #: Failed tries at planning the entry at one position (see `_apply`).
        self._plan_failures = Attempts()
        #: Every operation waits for it: until then the state may lack queues and tasks the node had
        #: acknowledged (e.g. a state rebuilt from the log), and answer that they do not exist.
        self._caught_up = CatchUp("Pigtail", self._linger, CATCH_UP_WAIT_S)
        #: The nodes up and this node's share of tasks among them (see `_share`), and when it was taken.
        self._shared: tuple[int, Callable[[str], bool] | None] = (-SHARE_TTL_MS, None)
        #: Claims and releases for workers that are gone, going on in the background (see `_keep`).
        self._background: set[asyncio.Task[Any]] = set()

    # -- life --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start placing the open tasks in the scheduler, then applying the log."""
        self._applier = asyncio.create_task(self._apply_loop(self._log.position()), name="pigtail-applier")

    async def stop(self) -> None:
        """Let the releases under way finish (for up to STOP_RELEASES_S), then stop applying the log;
        operations waiting for it fail."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=STOP_RELEASES_S)
        applier, self._applier = self._applier, None
        if applier is not None:
            applier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await applier
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(Unavailable("the node is stopping"))
        self._waiters.clear()
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _place_open(self) -> None:
        """Place every open task in the scheduler, PLACE_CHUNK at a time: 20,000 open tasks took
        0.5 s, which held up the whole node's start (its log, KV, replication) when done at once.
        Each is placed by where it stands against its queue's incarnation, worked out once per queue:
        placed by their views instead (each working out the queue's settings again), 20,000 took 0.30 s
        of CPU rather than 0.15."""
        now = self.now_ms()
        placed = 0
        for name in self.state.queue_names():
            incarnation = Incarnation(self.state.queue(name))
            for task in list(self.state.open_tasks(name).values()):
                self._scheduler.update(task, incarnation.standing(task, now), now)
                placed += 1
                if placed % PLACE_CHUNK == 0:
                    await asyncio.sleep(0)

    async def _apply_loop(self, started_at: int) -> None:
        try:
            await self._place_open()
        except Exception:  # a bug: applying the log must go on (the tasks it touches are placed)
            log.exception("placing the open tasks in the scheduler failed; some may not be handed out")
        self._caught_up.start(started_at, self.state.cursor)
        await apply_forever(
            self._log,
            lambda: self.state.cursor,
            self._apply,
            self._linger,
            APPLY_BATCH,
            "Pigtail",
            APPLY_RETRY,
            EVENT_MARK,
        )

    async def _apply(self, delivered: DeliveredBatch) -> None:
        """Apply a delivered batch. An entry that cannot be planned is raised for the loop to retry;
        one that fails APPLY_ATTEMPTS times (a bug, failing alike on every node) is skipped on its
        own, and whoever waits for it hears so. A store that fails (a read while planning, or the
        write) is never a reason to skip: that is raised for the loop to retry, for as long as it
        takes."""
        try:
            applied = self.state.plan(delivered, self._log.promises())
        except Exception:
            log.exception("planning a batch of %d entries failed; planning them one by one", len(delivered))
        else:
            await self._write(applied)
            return
        for position, entry in delivered.entries:
            try:
                applied = self.state.plan(DeliveredBatch.parsed([(position, entry)]), self._log.promises())
            except StoreFailed as failed:
                raise failed.error from None  # the store's own error, for the loop to retry
            except Exception:
                if not self._plan_failures.failed(position):
                    raise
                log.exception("skipping log entry %s at position %d", entry.id, position)
                applied = self.state.plan_skip(position)
                waiter = self._waiters.pop(entry.id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_exception(RuntimeError(f"entry {entry.id} could not be applied"))
            await self._write(applied)

    async def _write(self, applied: Applied) -> None:
        """Store a planned batch, then make it the current state and wake who waits for it."""
        self._store.write(applied.writes)
        changed = applied.queues.keys() | {queue for queue, _ in applied.keys}
        before = {name: self.state.queue(name) for name in changed}
        self.state.adopt(applied)
        if not self._caught_up.done:
            self._caught_up.note(self.state.cursor)
        self._after(applied, before)

    def _after(self, applied: Applied, before: Mapping[str, QueueState | None]) -> None:
        """Tell the scheduler and whoever waits what an adopted batch changed. `before`: the states
        of the batch's changed queues (or key indexes) before it."""
        now = self.now_ms()
        for (queue, task_id), record in applied.tasks.items():
            if record is None:
                self._scheduler.forget(queue, task_id)
            else:
                task = record["state"]
                standing = Incarnation(self.state.queue(queue)).standing(task, now)
                if self._scheduler.update(task, standing, now):
                    self._signal_ready(queue)
            self._wake(self._task_watchers.pop((queue, task_id), ()))
        for queue, old in before.items():
            self._place_again(queue, old, applied, now)
            self._wake(self._queue_watchers.pop(queue, ()))
        for queue in {queue for queue, _ in applied.tasks} | before.keys():
            self._arm(queue)
        for entry_id in applied.entry_ids:
            future = self._waiters.pop(entry_id, None)
            if future is not None and not future.done():
                future.set_result(None)
            self._recent[entry_id] = None
        while len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)

    @staticmethod
    def _wake(futures: Iterable[asyncio.Future[None]]) -> None:
        for future in futures:
            if not future.done():
                future.set_result(None)

    def _signal_ready(self, queue: str) -> None:
        """A task of the queue became claimable: wake one waiter for it."""
        waiters = self._ready_waiters.get(queue)
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(None)
                return

    def _arm(self, queue: str) -> None:
        """If anyone waits for a claimable task of the queue, wake them all when its next waiting
        task may become claimable (they each waited only until the earliest such time they knew)."""
        if not any(not waiter.done() for waiter in self._ready_waiters.get(queue, ())):
            return
        wake = self._scheduler.next_wake_ms(queue)
        armed = self._timers.get(queue)
        if wake is None or (armed is not None and armed[0] <= wake):
            return
        if armed is not None:
            armed[1].cancel()
        delay = max(0.0, (wake - self.now_ms()) / 1000) + 0.001
        timer = asyncio.get_running_loop().call_later(delay, self._ring, queue)
        self._timers[queue] = (wake, timer)

    def _ring(self, queue: str) -> None:
        del self._timers[queue]
        self._wake(self._ready_waiters.pop(queue, ()))

    async def _wait_for_work(
        self, queue: str, held: Iterable[str], ready: bool, timeout: float | None
    ) -> None:
        """Wait until a task of the queue becomes claimable (if `ready`), one of the `held` tasks
        changes, the queue changes, or `timeout` seconds pass."""
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        keys = [(queue, task_id) for task_id in held]
        for key in keys:
            self._task_watchers.setdefault(key, set()).add(wake)
        self._queue_watchers.setdefault(queue, set()).add(wake)
        if ready:
            waiters = self._ready_waiters.setdefault(queue, deque())
            if len(waiters) > 64:
                waiters = self._ready_waiters[queue] = deque(f for f in waiters if not f.done())
            waiters.append(wake)
        try:
            async with asyncio.timeout(timeout):
                await wake
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            if ready and wake.done() and not wake.cancelled():
                self._signal_ready(queue)  # pass on the wake-up this waiter will not use
            raise
        finally:
            for key in keys:
                watchers = self._task_watchers.get(key)
                if watchers is not None:
                    watchers.discard(wake)
                    if not watchers:
                        del self._task_watchers[key]
            watchers = self._queue_watchers.get(queue)
            if watchers is not None:
                watchers.discard(wake)
                if not watchers:
                    del self._queue_watchers[queue]

    async def _append(self, event: Event, dependencies: Sequence[str | None] = ()) -> Appended:
        """Append `event` and wait until this node has applied it."""
        deps = [d for d in dict.fromkeys(dependencies) if d is not None]
        entry = await self._log.append(event_data(event), deps)  # info's depth is checked already
        if entry.id in self._recent:
            return entry
        if self._applier is None or self._applier.done():
            raise Unavailable("Pigtail is not applying the log (the node is stopping)")
        future = self._waiters.get(entry.id)
        if future is None:
            future = self._waiters[entry.id] = asyncio.get_running_loop().create_future()
        self._linger.hurry()
        try:
            async with asyncio.timeout(APPLY_TIMEOUT_S):
                await future
        except TimeoutError:
            self._waiters.pop(entry.id, None)
            raise Unavailable(
                f"entry {entry.id} was appended but this node has not delivered it within "
                f"{APPLY_TIMEOUT_S:g} s (an earlier entry of this node may wait for a missing "
                "dependency); it takes effect once delivered"
            ) from None
        return entry

    def _place_again(self, queue: str, old: QueueState | None, applied: Applied, now: int) -> None:
        """Place again the queue's open tasks whose view a change of the queue alone may have changed:
        every one when its history changed (a create or delete: the settings that win, the tasks
        that belong to the current incarnation), else those of the idempotency keys whose
        candidates changed (which add wins). Tasks the batch changed are placed already."""
        new = self.state.queue(queue)
        if new is None:
            return
        open_tasks = self.state.open_tasks(queue)
        incarnation = Incarnation(new)
        if old is None or old["history"] != new["history"]:
            ids: Iterable[str] = list(open_tasks)
        else:  # (a key index is changed in place: the batch says which keys changed)
            ids = sorted({c["task_id"] for (q, _), kept in applied.keys.items() if q == queue for c in kept})
        for task_id in ids:
            task = open_tasks.get(task_id)
            if task is None or (queue, task_id) in applied.tasks:
                continue
            if self._scheduler.update(task, incarnation.standing(task, now), now):
                self._signal_ready(queue)

    # -- helpers -----------------------------------------------------------------------------------

    def now_ms(self) -> int:
        """Now, by the node's hybrid logical clock (never behind a stamp the node has seen)."""
        return self._clock.now().wall_ms

    def _queue(self, name: str) -> tuple[QueueState, QueueConfig]:
        state = self.state.queue(name)
        config = self.state.config(name)
        if state is None or config is None:
            raise NotFound(f"no such queue {name!r}")
        return state, config

    @staticmethod
    def _refuse(decision: Decision, queue: str, task_id: str = "") -> None:
        """Raise the domain error of a check that did not answer OK."""
        if decision.verdict is Verdict.OK:
            return
        if decision.verdict is Verdict.NOT_FOUND:
            if decision.reason is Reason.NO_QUEUE:
                raise NotFound(f"no such queue {queue!r}")
            raise NotFound(f"no such task {quoted(task_id)} in queue {queue!r}")
        raise Contended(f"task {task_id!r}: {decision.message}")

    def _refuse_stamping_before(self, at: Stamp, done: str, what: str) -> None:
        """Unavailable if this node would stamp its next entry before `at` (when something was
        `done`): then `what` made here would count as made before it (tasks added before their
        queue never show, a create before a delete is void)."""
        if not self._clock.stamps_after(ClockStamp(at.wall_ms, at.logical)):
            raise Unavailable(
                f"{done} by a node whose clock runs more than {MAX_DRIFT_MS // 1000} s ahead of this "
                f"node's: {what} here now would be stamped before that and not count; check the "
                "nodes' clocks"
            )

    def _view(self, queue: str, task_id: str, after: Stamp | None = None) -> TaskView:
        """The task now, or just after the event stamped `after` (see `task_view_after`)."""
        task, state = self._task_or_none(queue, task_id), self.state.queue(queue)
        view = task_view(task, state, self.now_ms()) if after is None else task_view_after(task, state, after)
        if view is None:
            self._queue(queue)
            raise NotFound(f"no such task {quoted(task_id)} in queue {queue!r}")
        return view

    def _task_deps(self, queue: str, task_id: str) -> list[str | None]:
        return [self.state.create_entry_id(queue), self.state.add_entry_id(queue, task_id)]

    # -- queues ------------------------------------------------------------------------------------

    async def create_queue(
        self, name: str, timeout_ms: int, max_attempts: int | None = None
    ) -> tuple[QueueConfig, bool]:
        """Create a queue; (its settings, False) when it existed with the same settings."""
        await self._caught_up.wait()
        validate.queue_name(name)
        validate.timeout_ms(timeout_ms)
        validate.max_attempts(max_attempts)
        decision = check_create(self.state.queue(name), timeout_ms, max_attempts)
        if decision.reason is Reason.EXISTS:
            raise AlreadyExists(
                f"queue {name!r} exists with other settings: {_settings(self._queue(name)[1])}"
            )
        self._refuse(decision, name)
        if decision.noop:
            return self._queue(name)[1], False
        if (deleted := latest_delete(self.state.queue(name))) is not None:
            self._refuse_stamping_before(deleted, f"queue {name!r} was deleted", "a create")
        entry = await self._append(QueueCreated(name, timeout_ms, max_attempts))
        config = self.state.config(name)
        if config is None:
            raise Contended(f"queue {name!r} was deleted concurrently")
        if (config.timeout_ms, config.max_attempts) != (timeout_ms, max_attempts):
            raise AlreadyExists(f"queue {name!r} was created concurrently with {_settings(config)}")
        return config, config.created == stamp_of(entry.entry())

    async def delete_queue(self, name: str) -> None:
        """Delete a queue and its tasks."""
        await self._caught_up.wait()
        validate.queue_name(name)
        self._refuse(check_delete(self.state.queue(name)), name)
        await self._append(QueueDeleted(name), [self.state.create_entry_id(name)])

    async def get_queue(self, name: str) -> QueueInfo:
        """A queue's settings and task counts."""
        await self._caught_up.wait()
        validate.queue_name(name)
        state, config = self._queue(name)
        counts = self._scheduler.counts(name, self.state.open_tasks(name).get, state, self.now_ms())
        return QueueInfo(
            name, config, counts["pending"], counts["working"], counts["delayed"], counts["dead"]
        )

    async def list_queues(self) -> list[tuple[str, QueueConfig]]:
        """The queues that exist, by name."""
        await self._caught_up.wait()
        out = []
        for name in self.state.queue_names():
            config = self.state.config(name)
            if config is not None:
                out.append((name, config))
        return out

    # -- tasks -------------------------------------------------------------------------------------

    async def add_task(
        self,
        queue: str,
        task_name: str,
        info: JSONValue = None,
        *,
        not_before_ms: int | None = None,
        delay_ms: int | None = None,
        priority: int = 0,
        idempotency_key: str | None = None,
    ) -> tuple[TaskView, bool]:
        """Add a task; (the task, False) when the idempotency key was used already."""
        await self._caught_up.wait()
        validate.queue_name(queue)
        validate.text(task_name, "task_name")
        validate.priority(priority)
        validate.info(info)
        if idempotency_key is not None:
            validate.text(idempotency_key, "idempotency_key")
        now = self.now_ms()
        due = validate.not_before(not_before_ms, delay_ms, now)
        decision = check_add(self.state.queue(queue), idempotency_key)
        self._refuse(decision, queue)
        if (config := self.state.config(queue)) is not None:
            self._refuse_stamping_before(config.created, f"queue {queue!r} was created", "a task added")
        if decision.noop and decision.task_id is not None:
            return self._view(queue, decision.task_id), False
        task_id = str(uuid.uuid4())
        event = TaskAdded(queue, task_id, task_name, info, due, priority, idempotency_key)
        try:
            await self._append(event, [self.state.create_entry_id(queue)])
        except TooLarge as exc:
            # Under MAX_INFO_BYTES of JSON can still be too much for the log: protobuf spends about
            # 11 bytes on each number of an array, for example.
            raise TooLarge(f"info does not fit in a log entry: {exc}") from None
        view = task_view(self.state.task(queue, task_id), self.state.queue(queue), self.now_ms())
        if view is not None:
            return view, True
        winner = None if idempotency_key is None else find_by_key(self.state.queue(queue), idempotency_key)
        if winner is not None:  # a concurrent add with the same key came first
            return self._view(queue, winner), False
        self._queue(queue)
        raise NotFound(f"queue {queue!r} was deleted concurrently")

    async def get_task(self, queue: str, task_id: str) -> TaskView:
        """A task in any state."""
        await self._caught_up.wait()
        validate.queue_name(queue)
        return self._view(queue, task_id)

    async def list_tasks(self, queue: str) -> list[tuple[str, ListEntry]]:
        """The pending, working and delayed tasks of a queue, best first."""
        await self._caught_up.wait()
        return [task for _, task in self._open_listing(queue)]

    async def list_tasks_page(
        self, queue: str, page_size: int, page_token: str
    ) -> tuple[list[tuple[str, ListEntry]], str]:
        """A page of `list_tasks` and the next page's token (see `paging.page`)."""
        await self._caught_up.wait()
        return paging.page(self._open_listing(queue), page_size, page_token)

    async def list_dead(self, queue: str) -> list[tuple[str, ListEntry]]:
        """The dead-lettered tasks of a queue, by id."""
        await self._caught_up.wait()
        return [task for _, task in self._dead_listing(queue)]

    async def list_dead_page(
        self, queue: str, page_size: int, page_token: str
    ) -> tuple[list[tuple[str, ListEntry]], str]:
        """A page of `list_dead` and the next page's token (see `paging.page`)."""
        await self._caught_up.wait()
        return paging.page(self._dead_listing(queue), page_size, page_token)

    def _open_listing(self, queue: str) -> list[tuple[Rank, tuple[str, ListEntry]]]:
        validate.queue_name(queue)
        state, _ = self._queue(queue)
        return self._scheduler.listing(queue, self.state.open_tasks(queue).get, state, self.now_ms())

    def _dead_listing(self, queue: str) -> list[tuple[str, tuple[str, ListEntry]]]:
        validate.queue_name(queue)
        state, _ = self._queue(queue)
        return self._scheduler.dead(queue, self.state.open_tasks(queue).get, state, self.now_ms())

    async def claim(self, queue: str, task_id: str, worker_id: str) -> tuple[TaskView, bool]:
        """Claim a task for a worker (or renew its claim); (the task, whether it was a renewal)."""
        renewal = await self._check_claim(queue, task_id, worker_id)
        return await self._claim(queue, task_id, worker_id), renewal

    async def heartbeat(self, queue: str, task_id: str, worker_id: str) -> TaskView:
        """Extend the worker's unexpired lease on a task."""
        if not await self._check_claim(queue, task_id, worker_id):
            raise Contended(f"task {task_id!r}: worker {worker_id!r} holds no unexpired lease on it")
        return await self._claim(queue, task_id, worker_id, renew=True)

    async def _check_claim(self, queue: str, task_id: str, worker_id: str) -> bool:
        """Check a claim request (once caught up) and raise the error refusing it; whether the claim
        would renew the worker's own lease."""
        await self._caught_up.wait()
        validate.queue_name(queue)
        validate.text(worker_id, "worker_id")
        decision = check_claim(
            self._task_or_none(queue, task_id), self.state.queue(queue), worker_id, self.now_ms()
        )
        self._refuse(decision, queue, task_id)
        return decision.renewal

    async def release(self, queue: str, task_id: str, worker_id: str, *, unsent: bool = False) -> TaskView:
        """Give back the task the worker holds: its lease ends now, and the task is pending again (dead
        if that was its last attempt). `unsent`: the worker never got the task (the claim was made for
        a stream or call that ended first): the attempt does not count."""
        await self._caught_up.wait()
        validate.queue_name(queue)
        validate.text(worker_id, "worker_id")
        decision = check_release(
            self._task_or_none(queue, task_id), self.state.queue(queue), worker_id, self.now_ms()
        )
        self._refuse(decision, queue, task_id)
        event = TaskReleased(queue, task_id, worker_id, unsent=unsent)
        await self._append(event, self._task_deps(queue, task_id))
        return self._view(queue, task_id)

    async def release_unsent(self, queue: str, worker_id: str, task_ids: list[str]) -> None:
        """Release tasks claimed for a worker that never got them (a lease stream ended first); one that
        cannot be released (done meanwhile, its queue deleted...) is left as it is."""
        for task_id in task_ids:
            try:
                await self.release(queue, task_id, worker_id, unsent=True)
            except PotboilerError as error:
                log.info(
                    "task %s of queue %r, claimed for worker %r and not sent: %s",
                    task_id,
                    queue,
                    worker_id,
                    error,
                )

    def release_later(self, queue: str, worker_id: str, task_ids: list[str]) -> None:
        """`release_unsent` in the background (for a stream that is being cancelled)."""
        self._keep(
            asyncio.create_task(self.release_unsent(queue, worker_id, task_ids), name="pigtail-release")
        )

    def _keep(self, task: asyncio.Task[Any]) -> None:
        """Hold a background task until it ends (`stop` ends those still running)."""
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _task_or_none(self, queue: str, task_id: str) -> TaskState | None:
        return self.state.task(queue, task_id) if validate.is_task_id(task_id) else None

    async def _claim(self, queue: str, task_id: str, worker_id: str, *, renew: bool = False) -> TaskView:
        """Claim a task for the worker, or renew its claim (only that, with `renew`): the task as the
        claim left it (seen at the claim's own stamp: with a short timeout_ms, its lease may have ended
        by the time it is applied). Contended if the task is done, or if a concurrent claim won (or,
        with `renew`, the worker's lease ended first: a release of its own, say)."""
        event = TaskClaimed(queue, task_id, worker_id, renew=renew)
        entry = await self._append(event, self._task_deps(queue, task_id))
        _, config = self._queue(queue)
        task = self._task_or_none(queue, task_id)
        if task is not None and task["done"] is not None:
            raise Contended(f"task {task_id!r}: task is done")
        stamp = stamp_of(entry.entry())
        view = self._view(queue, task_id, after=stamp)
        if view["worker"] != worker_id or (view["lease_expires_ms"] or 0) < stamp.wall_ms + config.timeout_ms:
            if renew:
                raise Contended(
                    f"task {task_id!r}: worker {worker_id!r}'s lease ended before this heartbeat took "
                    f"effect (released, or claimed by another): it is {view['state']}"
                )
            raise Contended(
                f"task {task_id!r}: a concurrent claim won: it is {view['state']}, held by worker "
                f"{view['worker']!r} until {view['lease_expires_ms']}"
            )
        return view

    async def complete(self, queue: str, task_id: str, worker_id: str = "") -> tuple[TaskView, bool]:
        """Mark a task done; (the task, whether it was done already)."""
        await self._caught_up.wait()
        validate.queue_name(queue)
        validate.text(worker_id, "worker_id", required=False)
        key = (queue, task_id)
        while (under_way := self._completing.get(key)) is not None:
            await asyncio.shield(under_way)
        decision = check_done(self._task_or_none(queue, task_id), self.state.queue(queue))
        self._refuse(decision, queue, task_id)
        if decision.noop:
            return self._view(queue, task_id), True
        self._completing[key] = asyncio.get_running_loop().create_future()
        try:
            await self._append(TaskDone(queue, task_id, worker_id), self._task_deps(queue, task_id))
        finally:
            self._completing.pop(key).set_result(None)
        return self._view(queue, task_id), False

    async def retry(self, queue: str, task_id: str) -> TaskView:
        """Take a dead-lettered task back to pending."""
        await self._caught_up.wait()
        validate.queue_name(queue)
        decision = check_retry(self._task_or_none(queue, task_id), self.state.queue(queue), self.now_ms())
        self._refuse(decision, queue, task_id)
        await self._append(TaskRetried(queue, task_id), self._task_deps(queue, task_id))
        view = self._view(queue, task_id)
        if view["state"] not in ("pending", "delayed", "working"):
            raise Contended(f"task {task_id!r}: the retry lost to a concurrent change; it is {view['state']}")
        return view

    # -- handing out tasks -------------------------------------------------------------------------

    def _share(self, now_ms: int) -> Callable[[str], bool] | None:
        """Whether a task is in this node's share, when other nodes are up: tasks are spread over the
        nodes up by a hash of their id. Workers on every node look at the same best tasks; each node
        claiming from its own share first, two nodes seldom claim one task before their claims meet
        (when one loses, the task was done twice)."""
        taken, share = self._shared
        if now_ms - taken < SHARE_TTL_MS:
            return share
        own = self._log.node_id
        promises = self._log.promises()
        nodes = sorted({own, *(n for n, p in promises.items() if now_ms - p.stamp.wall_ms <= UP_PROMISE_MS)})
        share = _share_of(len(nodes), nodes.index(own)) if len(nodes) > 1 else None
        self._shared = (now_ms, share)
        return share

    async def _claim_next(self, queue: str, worker_id: str) -> TaskView | _Lost | None:
        """Claim the best claimable task for the worker: its view, LOST after a lost race, None if none."""
        reserved = self._reserved.setdefault(queue, set())
        refused: set[str] = set()
        while True:
            now = self.now_ms()
            state = self.state.queue(queue)
            tasks = self.state.open_tasks(queue)
            task_id = self._scheduler.pick(
                queue, tasks.get, state, now, exclude=reserved | refused, prefer=self._share(now)
            )
            if task_id is None:
                return None
            if check_claim(tasks.get(task_id), state, worker_id, now).ok:
                break
            refused.add(task_id)  # e.g. stamped ahead of our clock by a remote node: not claimable yet
        reserved.add(task_id)
        # The claim goes on if the caller is cancelled meanwhile (a stream ending, a call's deadline),
        # and is then released if it was made: its worker will never hear of it, and it would hold
        # the task until its lease ran out.
        claiming = asyncio.ensure_future(self._claim(queue, task_id, worker_id))
        claiming.add_done_callback(lambda _: reserved.discard(task_id))
        try:
            return await asyncio.shield(claiming)
        except Contended:
            return LOST
        except asyncio.CancelledError:
            self._keep(claiming)
            claiming.add_done_callback(functools.partial(self._release_orphan, queue, worker_id))
            raise

    def _release_orphan(self, queue: str, worker_id: str, claiming: asyncio.Future[TaskView]) -> None:
        if not claiming.cancelled() and claiming.exception() is None:
            self.release_later(queue, worker_id, [claiming.result()["task_id"]])

    async def claim_next(self, queue: str, worker_id: str, wait_ms: int = 0) -> TaskView | None:
        """Claim the next claimable task, waiting up to `wait_ms` for one; None if none."""
        await self._caught_up.wait()
        validate.queue_name(queue)
        validate.text(worker_id, "worker_id")
        validate.wait_ms(wait_ms)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_ms / 1000
        while True:
            self._queue(queue)
            result = await self._claim_next(queue, worker_id)
            if isinstance(result, _Lost):
                continue
            if result is not None:
                return result
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            wake = self._scheduler.next_wake_ms(queue)
            if wake is not None:
                remaining = min(remaining, max(0.0, (wake - self.now_ms()) / 1000) + 0.001)
            await self._wait_for_work(queue, (), True, remaining)

    async def lease(
        self, queue: str, worker_id: str, max_in_flight: int = 1, stop: asyncio.Event | None = None
    ) -> AsyncGenerator[TaskView, None]:
        """Claim tasks for the worker as they become claimable, keeping at most `max_in_flight` of them
        held (working, by this worker, not done) at once. Runs until the caller stops iterating, or
        `stop` is set: then it ends between claims (a claim under way is finished and handed out).
        A task whose lease ran out, or that the worker released, is claimable again: by this lease
        too (as a new attempt)."""
        await self._caught_up.wait()
        validate.queue_name(queue)
        validate.text(worker_id, "worker_id")
        max_in_flight = validate.in_flight(max_in_flight)
        _, incarnation = self._queue(queue)
        held: dict[str, int] = {}
        while stop is None or not stop.is_set():
            state, config = self._queue(queue)
            if config.created > incarnation.created:  # (an earlier concurrent create: the same one)
                raise NotFound(f"queue {queue!r} was deleted (and created again) while leasing from it")
            now = self.now_ms()
            for task_id in list(held):
                view = task_view(self.state.task(queue, task_id), state, now)
                if view is None or view["state"] != "working" or view["worker"] != worker_id:
                    del held[task_id]
                else:
                    held[task_id] = view["lease_expires_ms"] or now
            wakes = list(held.values())
            room = len(held) < max_in_flight
            if room:
                result = await self._claim_next(queue, worker_id)
                if isinstance(result, _Lost):
                    continue
                if result is not None:
                    held[result["task_id"]] = result["lease_expires_ms"] or now
                    yield result
                    continue
                wake = self._scheduler.next_wake_ms(queue)
                if wake is not None:
                    wakes.append(wake)
            # At most LEASE_RECHECK_S between checks, whatever happens (a safety net, not polling).
            timeout = (
                min(LEASE_RECHECK_S, max(0.0, (min(wakes) - self.now_ms()) / 1000) + 0.001)
                if wakes
                else LEASE_RECHECK_S
            )
            if stop is None:
                await self._wait_for_work(queue, held, room, timeout)
                continue
            waiting = asyncio.ensure_future(self._wait_for_work(queue, held, room, timeout))
            stopped = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait([waiting, stopped], return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when this lease is cancelled: neither is left behind
                for task in (waiting, stopped):
                    task.cancel()  # (a wait cancelled passes on a wake-up it took: see _wait_for_work)
                await asyncio.gather(waiting, stopped, return_exceptions=True)
            if room and stop.is_set() and not waiting.cancelled():
                self._signal_ready(queue)  # it may have been woken for a task it will not claim now
