"""Pigtail's listings and queue states computed the slow, obvious way: what the tests hold the
scheduler's listings (:class:`~potboiler.pigtail.scheduler.Scheduler`), the service's state
(:class:`~potboiler.pigtail.state.PigtailState`) and replicas' answers to."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from potboiler.pigtail.events import Event, QueueCreated, QueueDeleted, TaskAdded
from potboiler.pigtail.machine import (
    ListEntry,
    QueueState,
    Stamp,
    TaskState,
    apply_queue_event,
    candidates_after_add,
    candidates_after_delete,
    latest_delete,
    new_queue_state,
    task_view,
)
from potboiler.pigtail.scheduler import rank

Tasks = Iterable[TaskState] | Mapping[str, TaskState]
"""Task states, or task states by id."""


def apply_to_queue(queue: QueueState | None, event: Event, stamp: Stamp) -> QueueState:
    """The queue state after any event of the queue, its key index included, kept in one piece: a
    create or delete joins the history and drops the candidates stamped before the latest delete; a
    keyed add joins its key's candidates unless stamped before the latest delete. (The service keeps
    the index apart and changes it per key.) ``queue`` itself when the event changes nothing."""
    if isinstance(event, QueueCreated | QueueDeleted):
        new = apply_queue_event(queue, event, stamp)
        cut = latest_delete(new)
        if new is queue or cut is None:
            return new
        kept = {key: candidates_after_delete(candidates, cut) for key, candidates in new["keys"].items()}
        return {**new, "keys": {key: candidates for key, candidates in kept.items() if candidates}}
    if queue is None:
        queue = new_queue_state(event.queue)
    if not isinstance(event, TaskAdded) or event.idempotency_key is None:
        return queue
    cut = latest_delete(queue)
    if cut is not None and stamp < cut:
        return queue
    key = event.idempotency_key
    candidates = queue["keys"].get(key, [])
    joined = candidates_after_add(candidates, event.task_id, stamp)
    return queue if joined is candidates else {**queue, "keys": {**queue["keys"], key: joined}}


def _task_states(tasks: Tasks) -> Iterable[TaskState]:
    return tasks.values() if isinstance(tasks, Mapping) else tasks


def list_tasks(tasks: Tasks, queue: QueueState | None, now_ms: int) -> dict[str, ListEntry]:
    """``GET /queue/Q``: ``{task_id: {"task_name", "state"}}`` of the visible tasks that are pending,
    working or delayed (not done, not dead)."""
    out: dict[str, ListEntry] = {}
    for task in _task_states(tasks):
        view = task_view(task, queue, now_ms)
        if view is not None and view["state"] in ("pending", "working", "delayed"):
            out[view["task_id"]] = ListEntry(task_name=view["task_name"], state=view["state"])
    return out


def list_dead(tasks: Tasks, queue: QueueState | None, now_ms: int) -> dict[str, ListEntry]:
    """The dead-letter listing: ``{task_id: {"task_name", "state": "dead"}}``."""
    out: dict[str, ListEntry] = {}
    for task in _task_states(tasks):
        view = task_view(task, queue, now_ms)
        if view is not None and view["state"] == "dead":
            out[view["task_id"]] = ListEntry(task_name=view["task_name"], state="dead")
    return out


def claimable_order(tasks: Tasks, queue: QueueState | None, now_ms: int) -> list[str]:
    """Ids of the tasks claimable now (visible and pending), best first: in the scheduler's
    :func:`~potboiler.pigtail.scheduler.rank` order."""
    pending = [task for task in _task_states(tasks) if _is_pending(task, queue, now_ms)]
    return [task["task_id"] for task in sorted(pending, key=rank)]


def _is_pending(task: TaskState, queue: QueueState | None, now_ms: int) -> bool:
    view = task_view(task, queue, now_ms)
    return view is not None and view["state"] == "pending"
