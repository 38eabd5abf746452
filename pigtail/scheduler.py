"""Which task of a queue to hand out next, without walking the whole queue on every claim.

Per queue, two heaps of task ids: *ready* (ordered like :func:`~potboiler.pigtail.machine.claimable_order`:
priority descending, then available time, then add stamp, then id) and *waiting* (by the time a task
may become claimable: when its lease ends or when it is due). Entries are checked lazily against the
machine's view when they reach the top, so the heaps only need a hint when a task changes
(:meth:`Scheduler.touch`): a task that is working or delayed moves to *waiting*, a done, dead or hidden
one is forgotten (a retry touches it again), a pending one is handed out.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

from potboiler.pigtail.machine import QueueState, Stamp, TaskState, task_view

Rank = tuple[int, int, Stamp, str]


def rank(task: TaskState) -> Rank:
    """The order tasks are handed out in (lowest first)."""
    added = Stamp.coerce(task["added"]) if task["added"] is not None else Stamp(0, 0, "")
    available = max(added.wall_ms, task["not_before_ms"] or added.wall_ms)
    return (-task["priority"], available, added, task["task_id"])


@dataclass
class _Queue:
    ready: list[tuple[Rank, str]] = field(default_factory=list)
    waiting: list[tuple[int, str]] = field(default_factory=list)
    #: Where each known task's live heap entry is: "ready" or "waiting".
    where: dict[str, str] = field(default_factory=dict)


class Scheduler:
    """The ready and waiting heaps of every queue (see the module docstring)."""

    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}

    def touch(self, task: TaskState) -> None:
        """Note that `task` changed (or is new): it may be claimable now."""
        q = self._queues.setdefault(task["queue"], _Queue())
        task_id = task["task_id"]
        if task["done"] is not None or task["added"] is None:
            q.where.pop(task_id, None)
            return
        if q.where.get(task_id) != "ready":
            q.where[task_id] = "ready"
            heapq.heappush(q.ready, (rank(task), task_id))

    def forget(self, queue: str, task_id: str) -> None:
        """Drop a task (done, or dropped with its queue)."""
        q = self._queues.get(queue)
        if q is not None:
            q.where.pop(task_id, None)

    def forget_queue(self, queue: str) -> None:
        """Drop every task of a queue."""
        self._queues.pop(queue, None)

    def pick(
        self,
        queue: str,
        lookup: Callable[[str], TaskState | None],
        queue_state: QueueState | None,
        now_ms: int,
        exclude: Collection[str] = (),
    ) -> str | None:
        """The id of the best task claimable at `now_ms` that is not in `exclude`, or None.

        The task stays known: once claimed it is working, and the next pick moves it to waiting.
        """
        q = self._queues.get(queue)
        if q is None:
            return None
        while q.waiting and q.waiting[0][0] <= now_ms:
            _, task_id = heapq.heappop(q.waiting)
            task = lookup(task_id)
            if q.where.get(task_id) == "waiting" and task is not None:
                q.where[task_id] = "ready"
                heapq.heappush(q.ready, (rank(task), task_id))
        skipped: list[tuple[Rank, str]] = []
        found: str | None = None
        while q.ready:
            item = heapq.heappop(q.ready)
            task_id = item[1]
            if q.where.get(task_id) != "ready":
                continue
            view = task_view(lookup(task_id), queue_state, now_ms)
            state = None if view is None else view["state"]
            if view is None or state in ("done", "dead"):
                del q.where[task_id]
            elif state == "working":
                q.where[task_id] = "waiting"
                heapq.heappush(q.waiting, (view["lease_expires_ms"] or now_ms, task_id))
            elif state == "delayed":
                q.where[task_id] = "waiting"
                heapq.heappush(q.waiting, (view["not_before_ms"] or now_ms, task_id))
            else:
                skipped.append(item)
                if task_id not in exclude:
                    found = task_id
                    break
        for item in skipped:
            heapq.heappush(q.ready, item)
        return found

    def next_wake_ms(self, queue: str) -> int | None:
        """The earliest time a waiting task of the queue may become claimable, if any."""
        q = self._queues.get(queue)
        if q is None or not q.waiting:
            return None
        return q.waiting[0][0]
