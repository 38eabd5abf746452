"""Pigtail's listings computed the slow, obvious way, from every task's view: what the tests hold the
scheduler's listings (:class:`~potboiler.pigtail.scheduler.Scheduler`) and replicas' answers to."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from potboiler.pigtail.machine import ListEntry, QueueState, TaskState, task_view
from potboiler.pigtail.scheduler import rank

Tasks = Iterable[TaskState] | Mapping[str, TaskState]
"""Task states, or task states by id."""


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
