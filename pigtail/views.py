"""How a task looks to clients: the typed `Task` message and the REST view (a plain JSON object)."""

from __future__ import annotations

import orjson
from google.api.httpbody_pb2 import HttpBody

from potboiler.pigtail.events import JSONValue
from potboiler.pigtail.machine import ListEntry, QueueConfig, TaskStatus, TaskView
from potboiler.server import rest
from potboiler.server.jsonvalue import set_value, sorted_keys
from potboiler.v1 import pigtail_pb2

STATES: dict[TaskStatus, pigtail_pb2.TaskState.ValueType] = {
    "pending": pigtail_pb2.TASK_STATE_PENDING,
    "working": pigtail_pb2.TASK_STATE_WORKING,
    "done": pigtail_pb2.TASK_STATE_DONE,
    "dead": pigtail_pb2.TASK_STATE_DEAD,
    "delayed": pigtail_pb2.TASK_STATE_DELAYED,
}


def queue_message(name: str, config: QueueConfig) -> pigtail_pb2.Queue:
    """A queue's settings as a message."""
    out = pigtail_pb2.Queue(name=name, timeout_ms=config.timeout_ms)
    if config.max_attempts is not None:
        out.max_attempts = config.max_attempts
    return out


def task_message(view: TaskView) -> pigtail_pb2.Task:
    """A task as a message."""
    out = pigtail_pb2.Task(
        task_id=view["task_id"],
        queue=view["queue"],
        task_name=view["task_name"],
        state=STATES[view["state"]],
        attempts=view["attempts"],
        priority=view["priority"],
        added_ms=view["added_ms"],
    )
    set_value(out.info, view["info"])
    if view["worker"] is not None:
        out.worker = view["worker"]
    if view["max_attempts"] is not None:
        out.max_attempts = view["max_attempts"]
    if view["not_before_ms"] is not None:
        out.not_before_ms = view["not_before_ms"]
    if view["lease_expires_ms"] is not None:
        out.lease_expires_ms = view["lease_expires_ms"]
    if view["done_by"] is not None:
        out.done_by = view["done_by"]
    if view["idempotency_key"] is not None:
        out.idempotency_key = view["idempotency_key"]
    return out


def summary_message(task_id: str, entry: ListEntry) -> pigtail_pb2.TaskSummary:
    """A task in a listing, as a message."""
    return pigtail_pb2.TaskSummary(
        task_id=task_id, task_name=entry["task_name"], state=STATES[entry["state"]]
    )


def rest_view(view: TaskView, *, verbose: bool = False, with_id: bool = False) -> dict[str, JSONValue]:
    """The REST view of a task: {"task_name", "state", "info", "worker"} (see pigtail.proto)."""
    out: dict[str, JSONValue] = {}
    if with_id or verbose:
        out["id"] = view["task_id"]
    out["task_name"] = view["task_name"]
    out["state"] = view["state"]
    out["info"] = sorted_keys(view["info"])  # the same on every node, as GET /log/{id} prints data
    out["worker"] = view["worker"]
    if verbose:
        for key in (
            "attempts",
            "max_attempts",
            "priority",
            "not_before_ms",
            "added_ms",
            "lease_expires_ms",
            "done_by",
            "idempotency_key",
        ):
            out[key] = view[key]
    return out


def rest_json(value: JSONValue) -> HttpBody:
    """A REST answer: `value` as JSON text."""
    return rest.text_answer(orjson.dumps(value))  # members in the documented order, not sorted


def rest_listing(entries: list[tuple[str, ListEntry]]) -> HttpBody:
    """`GET /queue/Q`: {"<id>": {"task_name", "state"}, ...} as JSON text, in the listing's order."""
    return rest.text_answer(orjson.dumps(dict(entries)))


def rest_queue(name: str, config: QueueConfig) -> dict[str, JSONValue]:
    """A queue's settings as REST JSON."""
    return {"name": name, "timeout_ms": config.timeout_ms, "max_attempts": config.max_attempts}
