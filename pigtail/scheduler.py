"""Which task of a queue to hand out next, without walking the whole queue on every claim.

Per queue, two heaps of task ids: *ready* (by :func:`rank`: priority descending, then available time,
then add stamp, then id) and *waiting* (by the time a task may become claimable: when its lease ends or
when it is due). The service tells the scheduler where each
changed task stands now (:meth:`Scheduler.update`, with the machine's
:meth:`~potboiler.pigtail.machine.Incarnation.standing`); entries are judged again by the machine when
they reach the top (time passes, leases end), and stale entries are skipped, so each task has
one live entry: in *ready*, in *waiting* at one time, or none (done, dead, hidden: a retry brings a dead
task back through :meth:`Scheduler.update`).
"""

from __future__ import annotations

import heapq
import operator
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from potboiler.pigtail.machine import (
    Incarnation,
    ListEntry,
    QueueState,
    Stamp,
    Standing,
    TaskState,
    TaskStatus,
)

Rank = tuple[int, int, Stamp, str]

#: How many of the best claimable tasks (of one priority) `Scheduler.pick` looks at for one it prefers.
PICK_WINDOW = 32
#: How long a claimable task that `Scheduler.pick` does not prefer is left to the node whose share it
#: is before it is handed out anyway, in milliseconds: long enough for that node's claim to arrive.
OTHERS_AFTER_MS = 300

_random = random.Random()


def rank(task: TaskState) -> Rank:
    """The order tasks are handed out in (lowest first): priority descending, then available time
    ascending (``max(added wall time, not_before_ms)``), then add stamp, then task id."""
    added = Stamp.coerce(task["added"]) if task["added"] is not None else Stamp(0, 0, "")
    available = max(added.wall_ms, task["not_before_ms"] or added.wall_ms)
    return (-task["priority"], available, added, task["task_id"])


@dataclass
class _Queue:
    ready: list[tuple[Rank, str]] = field(default_factory=list)
    waiting: list[tuple[int, str]] = field(default_factory=list)
    #: Where each known task's live heap entry is: None in ready, else its time in waiting.
    where: dict[str, int | None] = field(default_factory=dict)
    #: What each known task was when last placed: its state (pending, working, delayed or dead), its
    #: name and its rank. A working or delayed task keeps that state until its time in `where`; a dead
    #: one until an event (a retry) changes it.
    known: dict[str, tuple[TaskStatus, str, Rank]] = field(default_factory=dict)
    #: When the last `pick` that found only tasks it does not prefer may take one of them.
    others_at: int | None = None

    def to_ready(self, task: TaskState) -> bool:
        task_id = task["task_id"]
        order = rank(task)
        self.known[task_id] = ("pending", task["task_name"], order)
        if task_id in self.where and self.where[task_id] is None:
            return False
        self.where[task_id] = None
        heapq.heappush(self.ready, (order, task_id))
        return True

    def to_waiting(self, task: TaskState, state: TaskStatus, until_ms: int) -> None:
        task_id = task["task_id"]
        self.known[task_id] = (state, task["task_name"], rank(task))
        if self.where.get(task_id, -1) == until_ms:
            return
        self.where[task_id] = until_ms
        heapq.heappush(self.waiting, (until_ms, task_id))

    def drop(self, task_id: str) -> None:
        self.where.pop(task_id, None)
        self.known.pop(task_id, None)
        if not self.where:  # every heap entry is stale (a deleted queue's, say): free them now
            self.ready.clear()
            self.waiting.clear()

    def place(self, task: TaskState, standing: Standing | None, now_ms: int) -> bool:
        """Put the task where it stands (None: hidden); True if it is claimable now and was not known so."""
        state = None if standing is None else standing.state
        if standing is None or state == "done":
            self.drop(task["task_id"])
        elif state == "dead":
            self.where.pop(task["task_id"], None)
            self.known[task["task_id"]] = ("dead", task["task_name"], rank(task))
        elif state == "working":
            self.to_waiting(task, "working", standing.lease_expires_ms or now_ms)
        elif state == "delayed":
            self.to_waiting(task, "delayed", task["not_before_ms"] or now_ms)
        else:
            return self.to_ready(task)
        return False


#: The sort key of `Scheduler._current`'s items: their rank.
_BY_RANK = operator.itemgetter(3)


class Scheduler:
    """The ready and waiting heaps of every queue (see the module docstring)."""

    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}

    def update(self, task: TaskState, standing: Standing | None, now_ms: int) -> bool:
        """Note where a changed (or new) task stands now (None: hidden); True if it just became
        claimable."""
        q = self._queues.get(task["queue"])
        if q is None:  # (not setdefault: that would make a _Queue on every call)
            q = self._queues[task["queue"]] = _Queue()
        return q.place(task, standing, now_ms)

    def forget(self, queue: str, task_id: str) -> None:
        """Drop a task (e.g. dropped with its queue)."""
        q = self._queues.get(queue)
        if q is not None:
            q.drop(task_id)

    def pick(
        self,
        queue: str,
        lookup: Callable[[str], TaskState | None],
        queue_state: QueueState | None,
        now_ms: int,
        exclude: Collection[str] = (),
        prefer: Callable[[str], bool] | None = None,
    ) -> str | None:
        """The id of the best task claimable at `now_ms` that is not in `exclude`, or None. With
        `prefer`: the best task it prefers among the first PICK_WINDOW of the highest priority, else
        any one of those that has been claimable for OTHERS_AFTER_MS (until then, None, and
        `next_wake_ms` says when).

        The task stays in ready: once claimed, the service's update moves it to waiting.
        """
        q = self._queues.get(queue)
        if q is None:
            return None
        q.others_at = None
        incarnation = Incarnation(queue_state)
        while q.waiting and q.waiting[0][0] <= now_ms:
            until, task_id = heapq.heappop(q.waiting)
            if q.where.get(task_id) != until:
                continue  # stale
            del q.where[task_id]
            task = lookup(task_id)
            if task is None:
                q.drop(task_id)
            else:
                q.place(task, incarnation.standing(task, now_ms), now_ms)
        skipped: list[tuple[Rank, str]] = []
        window: list[tuple[Rank, str]] = []  # claimable, not excluded, of the best's priority
        since: list[int] = []  # when each of the window became claimable
        found: str | None = None
        while q.ready:
            item = heapq.heappop(q.ready)
            task_id = item[1]
            if task_id not in q.where or q.where[task_id] is not None:
                continue  # stale: the task moved on
            task = lookup(task_id)
            standing = incarnation.standing(task, now_ms)
            if task is None or standing is None or standing.state != "pending":
                del q.where[task_id]
                if task is None:
                    q.drop(task_id)
                else:
                    q.place(task, standing, now_ms)
                continue
            skipped.append(item)
            if task_id in exclude:
                continue
            if window and item[0][0] != window[0][0][0]:
                break  # a lower priority: never taken before the best
            window.append(item)
            if prefer is None or prefer(task_id):
                found = task_id
                break
            since.append(max(item[0][1], standing.lease_expires_ms or 0))
            if len(window) == PICK_WINDOW:
                break
        if found is None and window:
            # None preferred: each is most likely being claimed by the node whose share it is, as soon
            # as it knows of it. Any one of those left to it for a moment (not the best, which that
            # node takes first) once that moment has passed.
            others = [item for item, at in zip(window, since, strict=True) if now_ms - at >= OTHERS_AFTER_MS]
            if others:
                found = _random.choice(others)[1]
            else:
                q.others_at = min(since) + OTHERS_AFTER_MS
        for item in skipped:
            heapq.heappush(q.ready, item)
        return found

    def _current(
        self,
        queue: str,
        lookup: Callable[[str], TaskState | None],
        queue_state: QueueState | None,
        now_ms: int,
    ) -> list[tuple[TaskStatus, str, str, Rank]]:
        """(state, id, name, rank) of every known task of the queue as of `now_ms` (in no particular
        order): what each task was when last placed, looked at again when its lease or delay has ended
        since."""
        q = self._queues.get(queue)
        if q is None:
            return []
        out: list[tuple[TaskStatus, str, str, Rank]] = []
        ended: list[str] = []
        where = q.where
        for task_id, (state, name, order) in q.known.items():
            if state == "working" or state == "delayed":
                until = where.get(task_id)
                if until is not None and now_ms >= until:
                    ended.append(task_id)  # placed again below: not while iterating `known`
                    continue
            out.append((state, task_id, name, order))
        incarnation = Incarnation(queue_state)
        for task_id in ended:
            task = lookup(task_id)
            if task is None:
                q.drop(task_id)
                continue
            standing = incarnation.standing(task, now_ms)
            q.place(task, standing, now_ms)
            if standing is not None and standing.state != "done":
                out.append((standing.state, task_id, task["task_name"], q.known[task_id][2]))
        return out

    def listing(
        self,
        queue: str,
        lookup: Callable[[str], TaskState | None],
        queue_state: QueueState | None,
        now_ms: int,
    ) -> list[tuple[Rank, tuple[str, ListEntry]]]:
        """The queue's pending, working and delayed tasks at `now_ms`, best first, each with its rank
        (without replaying every task: see `_current`)."""
        listed = [item for item in self._current(queue, lookup, queue_state, now_ms) if item[0] != "dead"]
        listed.sort(key=_BY_RANK)  # ranks are unique: they end with the task id
        return [
            (rank, (task_id, {"task_name": name, "state": state})) for state, task_id, name, rank in listed
        ]

    def dead(
        self,
        queue: str,
        lookup: Callable[[str], TaskState | None],
        queue_state: QueueState | None,
        now_ms: int,
    ) -> list[tuple[str, tuple[str, ListEntry]]]:
        """The queue's dead-lettered tasks at `now_ms`, by id (and with it, as their sort key)."""
        current = self._current(queue, lookup, queue_state, now_ms)
        dead = sorted((task_id, name) for state, task_id, name, _ in current if state == "dead")
        return [(task_id, (task_id, ListEntry(task_name=name, state="dead"))) for task_id, name in dead]

    def counts(
        self,
        queue: str,
        lookup: Callable[[str], TaskState | None],
        queue_state: QueueState | None,
        now_ms: int,
    ) -> dict[TaskStatus, int]:
        """How many of the queue's tasks are pending, working, delayed and dead at `now_ms`."""
        out: dict[TaskStatus, int] = {"pending": 0, "working": 0, "delayed": 0, "dead": 0}
        for state, *_ in self._current(queue, lookup, queue_state, now_ms):
            out[state] += 1
        return out

    def next_wake_ms(self, queue: str) -> int | None:
        """The earliest time a waiting task of the queue may become claimable, or the last `pick`
        may take a task it does not prefer, if any."""
        q = self._queues.get(queue)
        if q is None:
            return None
        while q.waiting:
            until, task_id = q.waiting[0]
            if q.where.get(task_id) == until:
                return until if q.others_at is None else min(until, q.others_at)
            heapq.heappop(q.waiting)  # stale
        return q.others_at
