"""Pigtail's events: every change of a queue or a task, as appended to the log and read back.

Each event is a frozen dataclass that checks its fields when it is made (else :class:`InvalidEvent`),
with a JSON form (its ``to_json``) that :func:`event_from_json` reads back::

    {"kind": "queue_created"|"queue_deleted"|"task_added"|"task_claimed"|"task_done"
             |"task_released"|"task_retried", ...the fields of its dataclass}

What the events do to queue and task states is :mod:`potboiler.pigtail.machine`'s business; how they
travel in log entries, :mod:`potboiler.pigtail.codec`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

__all__ = [
    "MAX_ATTEMPTS",
    "MAX_PRIORITY",
    "MAX_TIMEOUT_MS",
    "Event",
    "InvalidEvent",
    "JSONValue",
    "QueueCreated",
    "QueueDeleted",
    "QueueEvent",
    "TaskAdded",
    "TaskClaimed",
    "TaskDone",
    "TaskEvent",
    "TaskReleased",
    "TaskRetried",
    "event_from_json",
    "event_queue",
]

JSONValue: TypeAlias = "bool | int | float | str | list[JSONValue] | dict[str, JSONValue] | None"
"""Any JSON value."""


class InvalidEvent(ValueError):
    """An event, stamp or state that breaks the rules (bad field type, bad value, wrong task)."""


def _need_str(value: object, field: str, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str) or (not empty_ok and not value):
        raise InvalidEvent(f"{field} must be a non-empty string, not {value!r}")
    return value


#: Bounds of the events' numbers. The API keeps to narrower ones (`potboiler.pigtail.validate`,
#: which takes the first three from here); an event past these was appended by hand (`POST /log`)
#: and is ignored, as every node ignores it: its numbers would not fit the typed answers' fields.
MAX_TIMEOUT_MS = 86_400_000
MAX_ATTEMPTS = 1_000
MAX_PRIORITY = 1_000_000
_INT64 = 2**63


def _need_int(value: object, field: str, low: int = -_INT64, high: int = _INT64 - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidEvent(f"{field} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise InvalidEvent(f"{field} must be {low} to {high}, not {value}")
    return value


def _opt_int(value: object, field: str, low: int = -_INT64, high: int = _INT64 - 1) -> int | None:
    return None if value is None else _need_int(value, field, low, high)


@dataclass(frozen=True)
class QueueCreated:
    """Create queue ``name``: leases last ``timeout_ms``; ``max_attempts`` leases per task (None: no cap)."""

    KIND: ClassVar[str] = "queue_created"
    name: str
    timeout_ms: int
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        _need_str(self.name, "name")
        _need_int(self.timeout_ms, "timeout_ms", 1, MAX_TIMEOUT_MS)
        _opt_int(self.max_attempts, "max_attempts", 1, MAX_ATTEMPTS)

    def to_json(self) -> dict[str, JSONValue]:
        """The event's JSON object, with its ``"kind"``."""
        return {
            "kind": self.KIND,
            "name": self.name,
            "timeout_ms": self.timeout_ms,
            "max_attempts": self.max_attempts,
        }


@dataclass(frozen=True)
class QueueDeleted:
    """Delete queue ``name`` and, with it, every task of its current incarnation."""

    KIND: ClassVar[str] = "queue_deleted"
    name: str

    def __post_init__(self) -> None:
        _need_str(self.name, "name")

    def to_json(self) -> dict[str, JSONValue]:
        """The event's JSON object, with its ``"kind"``."""
        return {"kind": self.KIND, "name": self.name}


@dataclass(frozen=True)
class TaskAdded:
    """Add task ``task_id`` to ``queue``; it is claimable from ``not_before_ms`` on, higher priority first."""

    KIND: ClassVar[str] = "task_added"
    queue: str
    task_id: str
    task_name: str
    info: JSONValue = None
    not_before_ms: int | None = None
    priority: int = 0
    idempotency_key: str | None = None

    def __post_init__(self) -> None:
        _need_str(self.queue, "queue")
        _need_str(self.task_id, "task_id")
        _need_str(self.task_name, "task_name", empty_ok=True)
        _opt_int(self.not_before_ms, "not_before_ms")
        _need_int(self.priority, "priority", -MAX_PRIORITY, MAX_PRIORITY)
        if self.idempotency_key is not None:
            _need_str(self.idempotency_key, "idempotency_key")

    def to_json(self) -> dict[str, JSONValue]:
        """The event's JSON object, with its ``"kind"``."""
        return {
            "kind": self.KIND,
            "queue": self.queue,
            "task_id": self.task_id,
            "task_name": self.task_name,
            "info": self.info,
            "not_before_ms": self.not_before_ms,
            "priority": self.priority,
            "idempotency_key": self.idempotency_key,
        }


@dataclass(frozen=True)
class _WorkerEvent:
    """An event about a task by a worker: its queue, the task and the worker's id."""

    KIND: ClassVar[str]
    #: Whether the worker may go unnamed ("").
    ANONYMOUS: ClassVar[bool] = False
    queue: str
    task_id: str
    worker_id: str

    def __post_init__(self) -> None:
        _need_str(self.queue, "queue")
        _need_str(self.task_id, "task_id")
        _need_str(self.worker_id, "worker_id", empty_ok=self.ANONYMOUS)

    def to_json(self) -> dict[str, JSONValue]:
        """The event's JSON object, with its ``"kind"``."""
        return {"kind": self.KIND, "queue": self.queue, "task_id": self.task_id, "worker_id": self.worker_id}


@dataclass(frozen=True)
class TaskClaimed(_WorkerEvent):
    """Worker ``worker_id`` claims (or, holding the lease, renews) the task at the event's stamp.
    ``renew``: a heartbeat, which only renews: void unless the worker holds the lease then (a
    heartbeat racing the worker's own release must not take the task again)."""

    KIND: ClassVar[str] = "task_claimed"
    renew: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.renew, bool):
            raise InvalidEvent("renew must be true or false")

    def to_json(self) -> dict[str, JSONValue]:
        """The event's JSON object, with its ``"kind"`` (and ``"renew"`` only when true)."""
        return {**super().to_json(), "renew": True} if self.renew else super().to_json()


@dataclass(frozen=True)
class TaskDone(_WorkerEvent):
    """The task is done (sent by ``worker_id``, whoever that is): final."""

    KIND: ClassVar[str] = "task_done"
    ANONYMOUS: ClassVar[bool] = True


@dataclass(frozen=True)
class TaskReleased(_WorkerEvent):
    """Worker ``worker_id`` gives back the task it holds, at the event's stamp (void unless it holds it).
    ``unsent``: the worker never got the task (its claim was made for a stream that ended first), so
    the attempt that claim counted is taken back."""

    KIND: ClassVar[str] = "task_released"
    unsent: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.unsent, bool):
            raise InvalidEvent("unsent must be true or false")

    def to_json(self) -> dict[str, JSONValue]:
        """The event's JSON object, with its ``"kind"`` (and ``"unsent"`` only when true)."""
        return {**super().to_json(), "unsent": True} if self.unsent else super().to_json()


@dataclass(frozen=True)
class TaskRetried:
    """Take a dead-lettered task back to pending with its attempts reset (void unless it is dead)."""

    KIND: ClassVar[str] = "task_retried"
    queue: str
    task_id: str

    def __post_init__(self) -> None:
        _need_str(self.queue, "queue")
        _need_str(self.task_id, "task_id")

    def to_json(self) -> dict[str, JSONValue]:
        """The event's JSON object, with its ``"kind"``."""
        return {"kind": self.KIND, "queue": self.queue, "task_id": self.task_id}


QueueEvent: TypeAlias = QueueCreated | QueueDeleted
"""Events that change a queue's own life (apply to the queue state only)."""
TaskEvent: TypeAlias = TaskAdded | TaskClaimed | TaskReleased | TaskDone | TaskRetried
"""Events about one task (apply to that task's state; TaskAdded also to its queue's state)."""
Event: TypeAlias = QueueEvent | TaskEvent
"""Any Pigtail event."""


def event_from_json(raw: Mapping[str, object]) -> Event:
    """Parse an event from its JSON object (as made by ``to_json``); raises :class:`InvalidEvent`."""
    kind = raw.get("kind")
    get: Callable[..., Any] = raw.get  # the values unchecked: each event's class checks its fields
    try:
        if kind == QueueCreated.KIND:
            return QueueCreated(
                name=get("name"),
                timeout_ms=get("timeout_ms"),
                max_attempts=get("max_attempts"),
            )
        if kind == QueueDeleted.KIND:
            return QueueDeleted(name=get("name"))
        if kind == TaskAdded.KIND:
            return TaskAdded(
                queue=get("queue"),
                task_id=get("task_id"),
                task_name=get("task_name"),
                info=_json_value(get("info")),
                not_before_ms=get("not_before_ms"),
                priority=get("priority", 0),
                idempotency_key=get("idempotency_key"),
            )
        if kind == TaskClaimed.KIND:
            return TaskClaimed(
                queue=get("queue"),
                task_id=get("task_id"),
                worker_id=get("worker_id", ""),
                renew=get("renew", False),
            )
        if kind == TaskDone.KIND:
            return TaskDone(queue=get("queue"), task_id=get("task_id"), worker_id=get("worker_id", ""))
        if kind == TaskReleased.KIND:
            return TaskReleased(
                queue=get("queue"),
                task_id=get("task_id"),
                worker_id=get("worker_id"),
                unsent=get("unsent", False),
            )
        if kind == TaskRetried.KIND:
            return TaskRetried(queue=get("queue"), task_id=get("task_id"))
    except TypeError as exc:  # pragma: no cover - defensive: dataclass construction with odd input
        raise InvalidEvent(str(exc)) from exc
    raise InvalidEvent(f"unknown Pigtail event kind {kind!r}")


def _json_value(value: object) -> JSONValue:
    """``value`` if it is plain JSON (as parsed from JSON text), else :class:`InvalidEvent`."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    if isinstance(value, dict):
        out: dict[str, JSONValue] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidEvent(f"JSON object keys are strings, not {key!r}")
            out[key] = _json_value(item)
        return out
    raise InvalidEvent(f"not a JSON value: {value!r}")


def event_queue(event: Event) -> str:
    """The name of the queue the event is about."""
    return event.name if isinstance(event, QueueCreated | QueueDeleted) else event.queue
