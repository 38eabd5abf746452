"""Pigtail's pure state machine: queue and task state built from replicated events
(:mod:`potboiler.pigtail.events`).

Nothing here does I/O. The Pigtail service appends events to the replicated log
(:mod:`potboiler.pigtail.engine`) and applies every delivered one (:mod:`potboiler.pigtail.state`): a
queue's creates and deletes by :func:`apply_queue_event`, a task's events by :func:`apply_task_event`, and
a keyed add to its queue's key index by :func:`candidates_after_add` (a delete trims the index by
:func:`candidates_after_delete`); it stores the JSON-able states they return. It checks a request with
its ``check_*`` function below before appending the event, and shows a task with :func:`task_view` (those
that depend on time take the current wall time ``now_ms``), or as a claim left it with
:func:`task_view_after`. Listings and the next task to hand out come
from the scheduler (:class:`~potboiler.pigtail.scheduler.Scheduler`), which places each task by where it
stands (:meth:`Incarnation.standing`: its view's state and lease end, judged against its queue's
:class:`Incarnation`, which is worked out once for many tasks).

Why the states converge
-----------------------
Every event carries an HLC stamp; :class:`Stamp` ``(wall_ms, logical, owner)`` is a total order that every
node agrees on. A state is not "what happened in arrival order" but a set of facts (which claims, which
dones, which retries, which creates and deletes exist), and everything the service sees is computed by
walking those facts in stamp order. Applying an event twice changes nothing, and concurrent events give
the same state whatever order they arrive in, so two replicas that have seen the same events hold equal
states and give equal answers.

The rules, in plain words
-------------------------
* **Queues.** Creates and deletes of a queue are judged in stamp order. A queue exists when its latest
  create/delete (by stamp) is a create. A create of a queue that already exists changes nothing: the first
  create after a delete (or the very first create) starts an *incarnation* and fixes its ``timeout_ms``
  and ``max_attempts``. So a concurrent create and delete resolve to whichever has the later stamp, and
  deleting then re-creating a queue gives a fresh, empty queue.
* **Tasks belong to an incarnation.** A task is kept only if, in stamp order, its queue existed when it
  was added and has not been deleted since; tasks of a deleted incarnation never come back, not even when
  the queue is re-created.
* **Idempotency keys.** Adding a task with a key that a task of the current incarnation already has is a
  no-op (the service answers the original task id, see :func:`check_add`). If two nodes add the same key
  concurrently, the add with the lowest stamp wins and the other task is hidden on every node (it is not
  listed, not claimable and answers 404). Keys are remembered for the life of the incarnation, also once
  the task is done.
* **Claims (the conflict rule).** The claims of a task are judged one after another in stamp order. A
  claim *starts a lease* when, at the claim's wall time, the task is due (``not_before_ms`` passed), not
  done, not dead, and nobody holds an unexpired lease; a claim by the worker that holds the unexpired lease
  *renews* it (the lease then runs ``timeout_ms`` from this claim); any other claim is *void*. A
  heartbeat is a claim that only renews: void unless its worker holds the unexpired lease at its stamp
  (so a heartbeat sent as its worker releases the task never starts a new lease).
  A lease expires ``timeout_ms`` after its holder's latest valid claim. So when two workers claim the same
  pending task on two sides of a partition, the claim with the lower stamp wins on every node once the
  partition heals, and the other claim is void (its worker learns it from a 409 on its next renewal, or
  from the task's ``worker``).
* **Releases.** A release by the worker holding the unexpired lease (at the release's stamp) ends that
  lease there: the task is pending again at once (or dead, if it used its last attempt), and the attempt
  counts. Any other release is void. A worker gives back a task it will not do this way. A lease stream
  or call that ended before its worker got a task it claimed releases it as *unsent*: then the attempt
  is taken back too.
* **Attempts and the dead letter.** Every claim that starts a lease counts one attempt (a renewal does
  not, and a worker claiming again after its own lease expired starts a new lease). When the queue has
  ``max_attempts``, a task whose attempts reached it and whose last lease expired without a done is
  ``"dead"``: listed only by the dead-letter listing, not claimable, until a retry. A retry is valid only
  while the task is dead (judged at the retry's stamp); it resets the attempts to 0 and the task is pending
  again.
* **Done** is final and wins over everything: whoever sends it (delivery is at-least-once), at whatever
  stamp, the task is done; claims, releases and retries stamped after the earliest done are void. ``done_by`` is the
  worker of the earliest done, ``worker`` stays the holder of the last lease.
* **Delay and priority.** A task with ``not_before_ms`` in the future is ``"delayed"``: it is listed with
  that state by ``GET /queue/Q``, cannot be claimed (a claim stamped before ``not_before_ms`` is void), and
  becomes ``"pending"`` once due. Pending tasks are ranked by highest priority, then earliest available
  time (``max(added, not_before_ms)``), then earliest add stamp (:func:`potboiler.pigtail.scheduler.rank`).
  A node with no other node up hands out the top one; on a cluster, a node takes the best of its own share
  of the tasks (spread over the nodes up by a hash of their ids) among the best 32 of the top priority,
  else any one of those 32 that has been claimable for 300 ms
  (:meth:`~potboiler.pigtail.scheduler.Scheduler.pick`, its PICK_WINDOW and OTHERS_AFTER_MS).

Task states seen by clients: ``"pending"``, ``"working"`` (an unexpired lease), ``"done"``, ``"dead"``
(dead letter) and ``"delayed"`` (not due yet). A ``working`` task whose lease expired shows as ``pending``
(or ``dead``) without any event: views depend on ``now_ms``.

Bounded state
-------------
Duplicates are dropped, and claims and retries stamped after the (earliest) done are pruned at once. A
long-running task's heartbeats would still pile up, because a claim that arrives late (from the other side
of a partition) can slot in between any two of them. :func:`compact_task` folds every claim and retry
stamped at or before a *stable horizon* into a small summary: a stamp no later than the last stamp the node
has applied from each node it knows (events of one owner arrive in that owner's order, so nothing older can
still come). A queue's history trims itself: only its latest delete and what follows it are kept (whatever
is stamped before the latest delete belongs to an ended incarnation); :func:`candidates_after_delete`
trims its key index alike.

JSON shapes (all stamps are ``[wall_ms, logical, owner]``)::

    queue state: {"name": str,
                  "history": [{"at": stamp, "op": "created"|"deleted",  # by stamp, from the latest
                               "timeout_ms": int|null, "max_attempts": int|null}, ...],  # delete on
                  "keys": {idempotency_key: [{"at": stamp, "task_id": str}, ...]}}        # by stamp
    task state:  {"queue": str, "task_id": str, "added": stamp|null, "task_name": str, "info": JSON,
                  "priority": int, "not_before_ms": int|null, "idempotency_key": str|null,
                  "claims": [{"at": stamp, "worker": str,               # by stamp, all before "done"
                              "released": true?, "unsent": true?,      # (a release, not a claim)
                              "renew": true?}, ...],                    # (a heartbeat: renews only)
                  "retries": [stamp, ...],                              # by stamp, all before "done"
                  "done": {"at": stamp, "worker": str}|null,            # the earliest done
                  "base": {"horizon": stamp, "holder": str|null, "lease_from_ms": int|null,
                           "attempts": int}|null}                       # folded by compact_task
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, NotRequired, TypeAlias, TypedDict

from potboiler.pigtail.events import (
    InvalidEvent,
    JSONValue,
    QueueCreated,
    QueueEvent,
    TaskAdded,
    TaskClaimed,
    TaskDone,
    TaskEvent,
    TaskReleased,
)
from potboiler.server.errors import quoted

__all__ = [
    "ClaimRecord",
    "Decision",
    "DoneRecord",
    "Incarnation",
    "KeyCandidate",
    "LeaseBase",
    "ListEntry",
    "QueueConfig",
    "QueueMark",
    "QueueState",
    "Reason",
    "Stamp",
    "StampJSON",
    "Standing",
    "TaskState",
    "TaskStatus",
    "TaskView",
    "Verdict",
    "apply_queue_event",
    "apply_task_event",
    "candidates_after_add",
    "candidates_after_delete",
    "check_add",
    "check_claim",
    "check_create",
    "check_delete",
    "check_done",
    "check_release",
    "check_retry",
    "compact_task",
    "find_by_key",
    "latest_delete",
    "latest_stamp",
    "new_queue_state",
    "queue_config",
    "queue_exists",
    "task_view",
    "task_view_after",
]

StampJSON: TypeAlias = list[int | str]
"""A stamp as stored in JSON: ``[wall_ms, logical, owner]``."""

TaskStatus: TypeAlias = Literal["pending", "working", "done", "dead", "delayed"]
"""What a client sees of a task (see the module docstring)."""


class Stamp(NamedTuple):
    """An event's HLC stamp; tuple order ``(wall_ms, logical, owner)`` is the total order of events."""

    wall_ms: int
    logical: int
    owner: str

    def to_json(self) -> StampJSON:
        """The JSON form ``[wall_ms, logical, owner]``."""
        return [self.wall_ms, self.logical, self.owner]

    @classmethod
    def coerce(cls, raw: Stamp | Sequence[int | str]) -> Stamp:
        """A :class:`Stamp` from itself or its JSON form (a list or tuple of three); checks the types."""
        if type(raw) is list and len(raw) == 3:  # the stored JSON form: the common case, made fast
            wall, logical, owner = raw
            if type(wall) is int and type(logical) is int and type(owner) is str:
                return tuple.__new__(cls, raw)
        if isinstance(raw, Stamp):
            return raw
        if isinstance(raw, str) or len(raw) != 3:
            raise InvalidEvent(f"a stamp is [wall_ms, logical, owner], not {raw!r}")
        wall, logical, owner = raw
        if not isinstance(wall, int) or not isinstance(logical, int) or not isinstance(owner, str):
            raise InvalidEvent(f"a stamp is [wall_ms, logical, owner], not {raw!r}")
        if isinstance(wall, bool) or isinstance(logical, bool):
            raise InvalidEvent(f"a stamp is [wall_ms, logical, owner], not {raw!r}")
        return cls(wall, logical, owner)


# --------------------------------------------------------------------------------------------------------
# States
# --------------------------------------------------------------------------------------------------------


class QueueMark(TypedDict):
    """One create or delete of a queue (``timeout_ms``/``max_attempts`` are null for a delete)."""

    at: StampJSON
    op: Literal["created", "deleted"]
    timeout_ms: int | None
    max_attempts: int | None


class KeyCandidate(TypedDict):
    """A task added with an idempotency key."""

    at: StampJSON
    task_id: str


class QueueState(TypedDict):
    """The stored state of one queue (see the module docstring for its JSON shape)."""

    name: str
    history: list[QueueMark]
    keys: dict[str, list[KeyCandidate]]


class ClaimRecord(TypedDict):
    """One claim of a task, or with ``released`` true one release (both judged in one stamp order)."""

    at: StampJSON
    worker: str
    released: NotRequired[bool]
    #: A release of a task its worker never got (see TaskReleased).
    unsent: NotRequired[bool]
    #: A heartbeat: a claim that only renews the worker's lease (see TaskClaimed).
    renew: NotRequired[bool]


class DoneRecord(TypedDict):
    """The earliest done of a task."""

    at: StampJSON
    worker: str


class LeaseBase(TypedDict):
    """The outcome of every claim and retry stamped at or before ``horizon`` (see :func:`compact_task`)."""

    horizon: StampJSON
    holder: str | None
    lease_from_ms: int | None
    attempts: int


class TaskState(TypedDict):
    """The stored state of one task (see the module docstring for its JSON shape)."""

    queue: str
    task_id: str
    added: StampJSON | None
    task_name: str
    info: JSONValue
    priority: int
    not_before_ms: int | None
    idempotency_key: str | None
    claims: list[ClaimRecord]
    retries: list[StampJSON]
    done: DoneRecord | None
    base: LeaseBase | None


class TaskView(TypedDict):
    """What ``GET /queue/Q/{id}`` shows of a task at ``now_ms``.

    ``worker`` is the holder of the task's last lease (null until claimed, and after a retry);
    ``lease_expires_ms`` when that lease ends (or ended); ``done_by`` the worker that marked it done
    (None if it named none).
    """

    task_id: str
    queue: str
    task_name: str
    state: TaskStatus
    info: JSONValue
    worker: str | None
    attempts: int
    max_attempts: int | None
    priority: int
    not_before_ms: int | None
    added_ms: int
    lease_expires_ms: int | None
    done_by: str | None
    idempotency_key: str | None


class ListEntry(TypedDict):
    """One task in ``GET /queue/Q`` (and in the dead-letter listing)."""

    task_name: str
    state: TaskStatus


class QueueConfig(NamedTuple):
    """The settings of a queue's current incarnation, fixed by the create that started it at ``created``
    (a named tuple: made on every view of a task, where a dataclass costs several times more)."""

    timeout_ms: int
    max_attempts: int | None
    created: Stamp


def new_queue_state(name: str) -> QueueState:
    """The state of a queue nothing has been seen of yet."""
    return QueueState(name=name, history=[], keys={})


def _new_task_state(queue: str, task_id: str) -> TaskState:
    return TaskState(
        queue=queue,
        task_id=task_id,
        added=None,
        task_name="",
        info=None,
        priority=0,
        not_before_ms=None,
        idempotency_key=None,
        claims=[],
        retries=[],
        done=None,
        base=None,
    )


def _at(record: QueueMark | KeyCandidate | ClaimRecord | DoneRecord) -> Stamp:
    return Stamp.coerce(record["at"])


# --------------------------------------------------------------------------------------------------------
# Applying events
# --------------------------------------------------------------------------------------------------------


def apply_queue_event(state: QueueState | None, event: QueueEvent, stamp: Stamp | StampJSON) -> QueueState:
    """The queue state after a create or delete of the queue (stamped ``stamp``): it joins the history.

    ``state`` None means "nothing seen yet for this queue". The key index is left as it is (the very
    same object): it changes only by :func:`candidates_after_add` and :func:`candidates_after_delete`,
    applied per key. The input is never mutated: the result is a new object, or ``state`` itself when
    the event changes nothing (a duplicate), so ``new is old`` tells the service it may skip the write.
    Stamps are unique per event, so deduplication uses them.
    """
    at = Stamp.coerce(stamp)
    if state is None:
        state = new_queue_state(event.name)
    elif state["name"] != event.name:
        raise InvalidEvent(f"event for queue {event.name!r} applied to queue {state['name']!r}")
    history = state["history"]
    # Only the latest delete and what follows it can still matter (tasks, keys and creates stamped before
    # it belong to ended incarnations), so the history is kept trimmed to that: bounded, and the same for
    # every arrival order.
    cut = latest_delete(state)
    if (cut is not None and at < cut) or any(_at(mark) == at for mark in history):
        return state
    mark = QueueMark(
        at=at.to_json(),
        op="created" if isinstance(event, QueueCreated) else "deleted",
        timeout_ms=event.timeout_ms if isinstance(event, QueueCreated) else None,
        max_attempts=event.max_attempts if isinstance(event, QueueCreated) else None,
    )
    marks = sorted([*history, mark], key=_at)
    last_delete = max((i for i, m in enumerate(marks) if m["op"] == "deleted"), default=None)
    new = state.copy()
    new["history"] = marks if last_delete is None else marks[last_delete:]
    return new


def latest_delete(queue: QueueState | None) -> Stamp | None:
    """The stamp of the queue's latest delete (its history is kept trimmed to start there), if any."""
    if queue is None or not queue["history"] or queue["history"][0]["op"] != "deleted":
        return None
    return _at(queue["history"][0])


def candidates_after_add(candidates: list[KeyCandidate], task_id: str, at: Stamp) -> list[KeyCandidate]:
    """An idempotency key's candidates once the add of ``task_id`` stamped ``at`` joins them, by stamp;
    ``candidates`` itself for a duplicate. (The key index of a queue state changes only by this and
    :func:`candidates_after_delete`: a service may keep the index apart and apply these per key.)"""
    if any(_at(c) == at for c in candidates):
        return candidates
    return sorted([*candidates, KeyCandidate(at=at.to_json(), task_id=task_id)], key=_at)


def candidates_after_delete(candidates: list[KeyCandidate], cut: Stamp) -> list[KeyCandidate]:
    """An idempotency key's candidates once the queue's latest delete is stamped ``cut``: those after it."""
    return [c for c in candidates if _at(c) > cut]


def apply_task_event(state: TaskState | None, event: TaskEvent, stamp: Stamp | StampJSON) -> TaskState:
    """The task state after ``event`` (stamped ``stamp``); ``state`` None means "nothing seen yet".

    Idempotent (a duplicate changes nothing) and commutative (concurrent events give the same state in
    any order). Events may arrive before the task's TaskAdded (a ghost state with ``added`` null, hidden
    until the add arrives). Never mutates its input; returns ``state`` itself when nothing changed.
    Stamps are unique per event, so deduplication uses them.
    """
    at = Stamp.coerce(stamp)
    if state is None:
        state = _new_task_state(event.queue, event.task_id)
    elif (state["queue"], state["task_id"]) != (event.queue, event.task_id):
        raise InvalidEvent(
            f"event for task {event.queue}/{event.task_id} "
            f"applied to task {state['queue']}/{state['task_id']}"
        )
    new = state.copy()
    if isinstance(event, TaskAdded):
        # One add per task id; should the same id ever be added twice, the lowest stamp wins.
        if state["added"] is not None and Stamp.coerce(state["added"]) <= at:
            return state
        new["added"] = at.to_json()
        new["task_name"] = event.task_name
        new["info"] = event.info
        new["priority"] = event.priority
        new["not_before_ms"] = event.not_before_ms
        new["idempotency_key"] = event.idempotency_key
        return new
    base = state["base"]
    done_at = None if state["done"] is None else _at(state["done"])
    if isinstance(event, TaskDone):
        if done_at is not None and done_at <= at:
            return state
        new["done"] = DoneRecord(at=at.to_json(), worker=event.worker_id)
        # Done is final: claims and retries stamped after it can never count.
        new["claims"] = [c for c in state["claims"] if _at(c) < at]
        new["retries"] = [r for r in state["retries"] if Stamp.coerce(r) < at]
        return new
    if (base is not None and at <= Stamp.coerce(base["horizon"])) or (done_at is not None and at > done_at):
        return state  # already folded into the base, or void because the task was done before
    if isinstance(event, TaskClaimed | TaskReleased):
        if any(_at(c) == at and c["worker"] == event.worker_id for c in state["claims"]):
            return state
        claim = ClaimRecord(at=at.to_json(), worker=event.worker_id)
        if isinstance(event, TaskReleased):
            claim["released"] = True
            if event.unsent:
                claim["unsent"] = True
        elif event.renew:
            claim["renew"] = True
        new["claims"] = sorted([*state["claims"], claim], key=lambda c: (_at(c), c["worker"]))
        return new
    if any(Stamp.coerce(r) == at for r in state["retries"]):
        return state
    new["retries"] = sorted([*state["retries"], at.to_json()], key=Stamp.coerce)
    return new


# --------------------------------------------------------------------------------------------------------
# Queue queries
# --------------------------------------------------------------------------------------------------------


def _incarnation(queue: QueueState, before: Stamp | None) -> QueueMark | None:
    """The create that started the incarnation alive just before ``before`` (None: the end), if any."""
    start: QueueMark | None = None
    for mark in queue["history"]:
        if before is not None and _at(mark) >= before:
            break
        if mark["op"] == "deleted":
            start = None
        elif start is None:
            start = mark
    return start


def queue_config(queue: QueueState | None) -> QueueConfig | None:
    """The current incarnation's settings, or None when the queue does not exist (never made, or deleted)."""
    return None if queue is None else _config_of(_incarnation(queue, None))


def _config_of(start: QueueMark | None) -> QueueConfig | None:
    """The settings of the incarnation that `start` (a create, or None) started."""
    if start is None or start["timeout_ms"] is None:
        return None
    return QueueConfig(timeout_ms=start["timeout_ms"], max_attempts=start["max_attempts"], created=_at(start))


def queue_exists(queue: QueueState | None) -> bool:
    """Whether the queue exists now (its latest create/delete by stamp is a create)."""
    return queue_config(queue) is not None


def find_by_key(queue: QueueState | None, idempotency_key: str) -> str | None:
    """The id of the current incarnation's task with this idempotency key (lowest stamp wins), if any."""
    current = None if queue is None else _incarnation(queue, None)
    if queue is None or current is None:
        return None
    winner = _key_winner(queue, _at(current), idempotency_key)
    return None if winner is None else winner["task_id"]


def _key_winner(queue: QueueState, created: Stamp, key: str) -> KeyCandidate | None:
    """The add that holds an idempotency key in the queue's current incarnation, created at ``created``:
    its candidate with the lowest stamp after that (see :meth:`Incarnation.config_for`), if any."""
    return next((c for c in queue["keys"].get(key, ()) if created < _at(c)), None)


# --------------------------------------------------------------------------------------------------------
# Task replay
# --------------------------------------------------------------------------------------------------------


@dataclass
class _Lease:
    holder: str | None = None
    lease_from_ms: int | None = None
    attempts: int = 0

    def until_ms(self, config: QueueConfig) -> int | None:
        return None if self.lease_from_ms is None else self.lease_from_ms + config.timeout_ms

    def expires_ms(self, config: QueueConfig) -> int | None:
        """A view's ``lease_expires_ms``: when the last lease ends (or ended), None if nobody held it."""
        return self.until_ms(config) if self.holder is not None else None

    def active_at(self, wall_ms: int, config: QueueConfig) -> bool:
        until = self.until_ms(config)
        return self.holder is not None and until is not None and wall_ms < until

    def dead_at(self, wall_ms: int, config: QueueConfig) -> bool:
        return (
            config.max_attempts is not None
            and self.attempts >= config.max_attempts
            and not self.active_at(wall_ms, config)
        )


def _claim_step(
    lease: _Lease, worker: str, wall_ms: int, not_before_ms: int | None, config: QueueConfig
) -> tuple[Reason | None, bool]:
    """Judge one claim against ``lease`` (updated in place when valid): (why void or None, renewal?)."""
    if not_before_ms is not None and wall_ms < not_before_ms:
        return Reason.NOT_DUE, False
    if lease.active_at(wall_ms, config):
        if lease.holder != worker:
            return Reason.HELD, False
        lease.lease_from_ms = max(lease.lease_from_ms or wall_ms, wall_ms)
        return None, True
    if lease.dead_at(wall_ms, config):
        return Reason.DEAD, False
    lease.holder, lease.lease_from_ms, lease.attempts = worker, wall_ms, lease.attempts + 1
    return None, False


def _renew_step(lease: _Lease, worker: str, wall_ms: int, config: QueueConfig) -> None:
    """Judge one heartbeat against ``lease``: renewed in place if ``worker`` holds it, else void."""
    if lease.holder == worker and lease.active_at(wall_ms, config):
        lease.lease_from_ms = max(lease.lease_from_ms or wall_ms, wall_ms)


def _release_step(lease: _Lease, worker: str, wall_ms: int, config: QueueConfig, unsent: bool) -> bool:
    """Judge one release against ``lease`` (ended there when valid, and its attempt taken back if the
    worker never got the task): whether it is valid."""
    if lease.holder != worker or not lease.active_at(wall_ms, config):
        return False
    lease.lease_from_ms = wall_ms - config.timeout_ms
    if unsent:
        lease.attempts = max(0, lease.attempts - 1)
    return True


def _retry_step(lease: _Lease, wall_ms: int, config: QueueConfig) -> bool:
    if not lease.dead_at(wall_ms, config):
        return False
    lease.holder, lease.lease_from_ms, lease.attempts = None, None, 0
    return True


_CLAIM, _RENEW, _RELEASE, _UNSENT, _RETRY = 0, 1, 2, 3, 4


def _replay(task: TaskState, config: QueueConfig, upto: Stamp | None = None) -> _Lease:
    base = task["base"]
    lease = (
        _Lease()
        if base is None
        else _Lease(holder=base["holder"], lease_from_ms=base["lease_from_ms"], attempts=base["attempts"])
    )
    if not task["claims"] and not task["retries"]:
        return lease  # most open tasks: nothing to replay
    steps: list[tuple[Stamp, int, str]] = [(_at(c), _step_kind(c), c["worker"]) for c in task["claims"]]
    steps += [(Stamp.coerce(r), _RETRY, "") for r in task["retries"]]
    steps.sort()
    for at, kind, worker in steps:
        if upto is not None and at > upto:
            break
        if kind == _CLAIM:
            _claim_step(lease, worker, at.wall_ms, task["not_before_ms"], config)
        elif kind == _RENEW:
            _renew_step(lease, worker, at.wall_ms, config)
        elif kind in (_RELEASE, _UNSENT):
            _release_step(lease, worker, at.wall_ms, config, unsent=kind == _UNSENT)
        else:
            _retry_step(lease, at.wall_ms, config)
    return lease


def _step_kind(claim: ClaimRecord) -> int:
    if claim.get("released"):
        return _UNSENT if claim.get("unsent") else _RELEASE
    return _RENEW if claim.get("renew") else _CLAIM


def latest_stamp(task: TaskState) -> Stamp | None:
    """The latest stamp on anything in the task (a new event's HLC stamp is at least that), if any."""
    stamps = [_at(c) for c in task["claims"]] + [Stamp.coerce(r) for r in task["retries"]]
    for raw in (task["added"], None if task["done"] is None else task["done"]["at"]):
        if raw is not None:
            stamps.append(Stamp.coerce(raw))
    if task["base"] is not None:
        stamps.append(Stamp.coerce(task["base"]["horizon"]))
    return max(stamps, default=None)


def _latest_wall(task: TaskState) -> int:
    """The highest wall time stamped on anything in the task."""
    latest = latest_stamp(task)
    return 0 if latest is None else latest.wall_ms


def _status(task: TaskState, done: bool, lease: _Lease, config: QueueConfig, now_ms: int) -> TaskStatus:
    if done:
        return "done"
    if lease.active_at(now_ms, config):
        return "working"
    if lease.dead_at(now_ms, config):
        return "dead"
    if task["not_before_ms"] is not None and now_ms < task["not_before_ms"]:
        return "delayed"
    return "pending"


def compact_task(task: TaskState, queue: QueueState, horizon: Stamp | StampJSON) -> TaskState:
    """Fold the claims and retries stamped at or before ``horizon`` into ``task["base"]``.

    ``horizon`` must be *stable*: every event stamped at or before it has been applied to this node's
    states. A node may take the smallest, over every node it knows, of the last stamp it applied from that
    node (each owner's events arrive in that owner's order, and HLC stamps only grow); a node it does not
    know yet could still send older stamps, so hold the horizon well behind the clock while membership
    changes, or do not compact then. Views and checks are the same before and after. A task that is not visible, or added after the horizon, is returned
    unchanged.
    """
    limit = Stamp.coerce(horizon)
    config = Incarnation(queue).config_for(task)
    if config is None or task["added"] is None or Stamp.coerce(task["added"]) > limit:
        return task
    base = task["base"]
    if base is not None and Stamp.coerce(base["horizon"]) >= limit:
        return task
    lease = _replay(task, config, upto=limit)
    new = task.copy()
    new["base"] = LeaseBase(
        horizon=limit.to_json(),
        holder=lease.holder,
        lease_from_ms=lease.lease_from_ms,
        attempts=lease.attempts,
    )
    new["claims"] = [c for c in task["claims"] if _at(c) > limit]
    new["retries"] = [r for r in task["retries"] if Stamp.coerce(r) > limit]
    return new


# --------------------------------------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------------------------------------


class Standing(NamedTuple):
    """Where a task stands at a time: its view's ``state`` and ``lease_expires_ms`` (see :class:`TaskView`),
    all the scheduler places it by."""

    state: TaskStatus
    lease_expires_ms: int | None


class Incarnation:
    """A queue's current incarnation (if it exists), worked out once from the queue's state to judge
    many of its tasks by: its settings, and which tasks belong to it. (Placing a node's 20,000 open
    tasks at start by their views, each working out the settings again, took twice the CPU.) A change
    of the queue's history makes a new queue state, which needs a new one; its key index may change
    (in place) meanwhile."""

    __slots__ = ("_queue", "config")

    def __init__(self, queue: QueueState | None) -> None:
        self._queue = queue
        #: The current incarnation's settings; None when the queue does not exist (every task is hidden).
        self.config = queue_config(queue)

    def config_for(self, task: TaskState | None) -> QueueConfig | None:
        """The settings if ``task`` is visible: added, in the current incarnation, not a key loser."""
        queue, config = self._queue, self.config
        if task is None or queue is None or config is None or task["added"] is None:
            return None
        # The current incarnation has no delete after it, so it is the one alive just before a stamp
        # (the add's, a key candidate's) exactly when it was created before that stamp.
        if task["queue"] != queue["name"] or not config.created < Stamp.coerce(task["added"]):
            return None
        key = task["idempotency_key"]
        if key is not None:
            winner = _key_winner(queue, config.created, key)
            # No candidate yet means the queue state has not seen this add: the task is visible meanwhile.
            if winner is not None and winner["task_id"] != task["task_id"]:
                return None
        return config

    def standing(self, task: TaskState | None, now_ms: int) -> Standing | None:
        """Where ``task`` stands at ``now_ms``, as its :func:`task_view` would say without building the
        rest of the view; None if it is unknown or hidden."""
        config = self.config_for(task)
        if task is None or config is None:
            return None
        lease = _replay(task, config)
        state = _status(task, task["done"] is not None, lease, config, now_ms)
        return Standing(state, lease.expires_ms(config))


def task_view(task: TaskState | None, queue: QueueState | None, now_ms: int) -> TaskView | None:
    """What a client sees of ``task`` at ``now_ms``; None (404) if it is unknown or hidden."""
    return _task_view(task, queue, now_ms, None)


def task_view_after(task: TaskState | None, queue: QueueState | None, stamp: Stamp) -> TaskView | None:
    """What a client saw of ``task`` just after the event stamped ``stamp`` (a claim: the task as it
    left it), at its wall time: the task's events stamped later do not count. None if it is hidden."""
    return _task_view(task, queue, stamp.wall_ms, stamp)


def _task_view(
    task: TaskState | None, queue: QueueState | None, now_ms: int, upto: Stamp | None
) -> TaskView | None:
    config = Incarnation(queue).config_for(task)
    if task is None or config is None or task["added"] is None:
        return None
    lease = _replay(task, config, upto)
    done = task["done"]
    if done is not None and upto is not None and _at(done) > upto:
        done = None
    return TaskView(
        task_id=task["task_id"],
        queue=task["queue"],
        task_name=task["task_name"],
        state=_status(task, done is not None, lease, config, now_ms),
        info=task["info"],
        worker=lease.holder,
        attempts=lease.attempts,
        max_attempts=config.max_attempts,
        priority=task["priority"],
        not_before_ms=task["not_before_ms"],
        added_ms=Stamp.coerce(task["added"]).wall_ms,
        lease_expires_ms=lease.expires_ms(config),
        done_by=None if done is None else done["worker"] or None,  # "": no worker named
        idempotency_key=task["idempotency_key"],
    )


# --------------------------------------------------------------------------------------------------------
# Checks made before appending an event
# --------------------------------------------------------------------------------------------------------


class Verdict(enum.StrEnum):
    """The outcome of a check: go ahead (HTTP 200/201), no such thing (404) or conflict (409)."""

    OK = "ok"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"


class Reason(enum.StrEnum):
    """Why a check did not answer OK."""

    NO_QUEUE = "no_queue"
    UNKNOWN_TASK = "unknown_task"
    DONE = "done"
    DEAD = "dead"
    HELD = "held"
    NOT_HELD = "not_held"
    NOT_DUE = "not_due"
    NOT_DEAD = "not_dead"
    EXISTS = "exists"


@dataclass(frozen=True)
class Decision:
    """The answer of a ``check_*`` function, made before the service appends an event.

    ``message`` says why (for a refusal); ``noop`` means the request is fine but changes nothing (the
    service need not append an event); ``renewal`` that an OK claim renews the worker's own lease;
    ``task_id`` the existing task for an idempotent add.
    """

    verdict: Verdict
    reason: Reason | None = None
    message: str = ""
    renewal: bool = False
    noop: bool = False
    task_id: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the request may go ahead."""
        return self.verdict is Verdict.OK


def _visible(task: TaskState | None, queue: QueueState | None) -> Decision | tuple[TaskState, QueueConfig]:
    """The task, if visible, with its queue's config; else the 404 refusing it."""
    if queue is None or not queue_exists(queue):
        name = queue["name"] if queue is not None else (task["queue"] if task is not None else "?")
        return Decision(Verdict.NOT_FOUND, Reason.NO_QUEUE, f"no such queue {name!r}")
    config = Incarnation(queue).config_for(task)
    if task is None or config is None:
        task_id = task["task_id"] if task is not None else "?"
        return Decision(Verdict.NOT_FOUND, Reason.UNKNOWN_TASK, f"no such task {quoted(task_id)}")
    return task, config


def check_create(queue: QueueState | None, timeout_ms: int, max_attempts: int | None = None) -> Decision:
    """Before QueueCreated: OK; OK with ``noop`` if it exists with these settings; 409 EXISTS if not."""
    config = queue_config(queue)
    if config is None:
        return Decision(Verdict.OK)
    if (config.timeout_ms, config.max_attempts) == (timeout_ms, max_attempts):
        return Decision(Verdict.OK, noop=True, message="queue exists with these settings")
    return Decision(
        Verdict.CONFLICT,
        Reason.EXISTS,
        f"queue exists with timeout_ms={config.timeout_ms}, max_attempts={config.max_attempts}",
    )


def check_delete(queue: QueueState | None) -> Decision:
    """Before QueueDeleted: OK if the queue exists, else 404."""
    if not queue_exists(queue):
        return Decision(Verdict.NOT_FOUND, Reason.NO_QUEUE, "no such queue")
    return Decision(Verdict.OK)


def check_add(queue: QueueState | None, idempotency_key: str | None = None) -> Decision:
    """Before TaskAdded: 404 without the queue; OK with ``noop`` and ``task_id`` if the key is known."""
    if not queue_exists(queue):
        return Decision(Verdict.NOT_FOUND, Reason.NO_QUEUE, "no such queue")
    if idempotency_key is not None:
        existing = find_by_key(queue, idempotency_key)
        if existing is not None:
            return Decision(Verdict.OK, noop=True, task_id=existing, message="idempotency key already used")
    return Decision(Verdict.OK)


def _open_lease(
    task: TaskState | None, queue: QueueState | None
) -> Decision | tuple[TaskState, QueueConfig, _Lease]:
    """A visible task that is not done, its queue's config and its lease as replayed; else the answer
    refusing it: 404 (unknown) or 409 DONE."""
    found = _visible(task, queue)
    if isinstance(found, Decision):
        return found
    task, config = found
    if task["done"] is not None:
        return Decision(Verdict.CONFLICT, Reason.DONE, "task is done")
    return task, config, _replay(task, config)


def check_claim(task: TaskState | None, queue: QueueState | None, worker_id: str, now_ms: int) -> Decision:
    """Before TaskClaimed: OK (new lease, or ``renewal``), 404, or 409 DONE / DEAD / HELD / NOT_DUE.

    Judged exactly as the replay will judge the claim, at wall time ``max(now_ms, latest stamp seen on the
    task)`` (the new event's HLC stamp is at least that). A concurrent claim elsewhere may still win once
    both are replicated; the task's ``worker`` then tells.
    """
    found = _open_lease(task, queue)
    if isinstance(found, Decision):
        return found
    task, config, lease = found
    wall = max(now_ms, _latest_wall(task))
    reason, renewal = _claim_step(lease, worker_id, wall, task["not_before_ms"], config)  # void: unchanged
    if reason is Reason.NOT_DUE:
        return Decision(Verdict.CONFLICT, reason, f"task is delayed until {task['not_before_ms']}")
    if reason is Reason.HELD:
        return Decision(
            Verdict.CONFLICT,
            reason,
            f"task is held by worker {lease.holder!r} until {lease.until_ms(config)}",
        )
    if reason is Reason.DEAD:
        return Decision(
            Verdict.CONFLICT,
            reason,
            f"task is dead-lettered after {lease.attempts} attempts; retry it first",
        )
    return Decision(Verdict.OK, renewal=renewal)


def check_done(task: TaskState | None, queue: QueueState | None) -> Decision:
    """Before TaskDone: OK for any visible task, whoever asks (``noop`` if already done); else 404."""
    found = _visible(task, queue)
    if isinstance(found, Decision):
        return found
    if found[0]["done"] is not None:
        return Decision(Verdict.OK, noop=True, message="task is already done")
    return Decision(Verdict.OK)


def check_release(task: TaskState | None, queue: QueueState | None, worker_id: str, now_ms: int) -> Decision:
    """Before TaskReleased: OK if ``worker_id`` holds an unexpired lease on the task; 409 DONE / NOT_HELD
    otherwise; 404. Judged as the replay will judge it (see :func:`check_claim`)."""
    found = _open_lease(task, queue)
    if isinstance(found, Decision):
        return found
    task, config, lease = found
    if lease.holder != worker_id or not lease.active_at(max(now_ms, _latest_wall(task)), config):
        return Decision(
            Verdict.CONFLICT,
            Reason.NOT_HELD,
            f"worker {quoted(worker_id)} holds no unexpired lease on the task",
        )
    return Decision(Verdict.OK)


def check_retry(task: TaskState | None, queue: QueueState | None, now_ms: int) -> Decision:
    """Before TaskRetried: OK if the task is dead-lettered; 409 DONE / NOT_DEAD otherwise; 404."""
    found = _open_lease(task, queue)
    if isinstance(found, Decision):
        return found
    task, config, lease = found
    if not lease.dead_at(max(now_ms, _latest_wall(task)), config):
        return Decision(Verdict.CONFLICT, Reason.NOT_DEAD, "only a dead-lettered task can be retried")
    return Decision(Verdict.OK)
