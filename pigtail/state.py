"""Pigtail's materialised state: every queue's and task's state, built from the log in the service's own
store, with the log position it reflects.

Keys (queue names and task ids are restricted to letters, digits, ``_`` and ``-``, so ``\\x00`` separates
them unambiguously)::

    c                       -> u64: position of the last applied log entry (the cursor)
    q<queue>                -> QueueRecord (JSON): the machine's queue state but its key index, and its
                               marks' entry ids
    k<queue>\\x00<key>       -> the candidates of one idempotency key of the queue (JSON)
    o<queue>\\x00<task id>   -> TaskRecord (JSON) of a task that is not done: the machine's task state
                               and its add's entry id
    t<queue>\\x00<task id>   -> TaskRecord (JSON) of a done task
    s<owner>                -> [wall_ms, logical]: the stamp of the last entry applied from that owner

A batch of delivered entries is applied in two steps: :meth:`PigtailState.plan` computes the new states
and the ONE store batch that holds them and the new cursor (nothing is changed yet), then the caller
writes that batch and :meth:`PigtailState.adopt` makes it the current state. So a crash between the two
replays the batch from the old cursor (applying is idempotent anyway), and a restart neither skips nor
double-applies an entry. Queues, their idempotency keys and the tasks that are not done are kept in
memory; done tasks are read from the store when asked for.

The tasks that are not done are stored apart from the done ones (done is final: a task moves once), so
that loading them at start is one read of their range in key order, however many tasks are done. With
``o`` keys only marking the tasks of ``t`` that were not done, a read of each by its key, 20,000 open
tasks took 0.25 s of CPU to load instead of 0.17 (0.14 with the collector paused, see below); records
written that way are moved when the state is loaded.

A queue's key index (the machine's ``QueueState["keys"]``) is kept apart, one record per key, and
changed in place per key (:func:`~potboiler.pigtail.machine.candidates_after_add`): as one JSON value in
the queue's record, every add with a key copied, wrote and compared the whole index, which grows with
every key the queue has ever seen. Records written before that kept it in the queue record: they are
moved out when the state is loaded.

Deleting a queue drops the stored tasks added before the delete (they can never be seen again); task
events stamped before the latest delete of their queue, for tasks that are not known, are not stored.

Compaction: a task whose claims and retries pile up (heartbeats) is folded by
:func:`~potboiler.pigtail.machine.compact_task` up to a horizon well behind the oldest "settled stamp"
of every owner seen, so a late event from another node is never older than the horizon unless clocks
are skewed by more than :data:`COMPACT_MARGIN_MS`. An owner's settled stamp is the stamp of its newest
entry applied here, or its clock promise (:class:`~potboiler.server.log.Promise`) once its log has been
applied up to the promise's seq: so a node that has stopped writing does not hold the horizon back.
"""

from __future__ import annotations

import contextlib
import gc
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypedDict, cast

import orjson

from potboiler.pigtail.codec import EVENT_MARK, decode, stamp_of
from potboiler.pigtail.events import QueueCreated, QueueDeleted, TaskAdded
from potboiler.pigtail.machine import (
    KeyCandidate,
    QueueConfig,
    QueueState,
    Stamp,
    StampJSON,
    TaskState,
    apply_queue_event,
    apply_task_event,
    candidates_after_add,
    candidates_after_delete,
    compact_task,
    latest_delete,
    latest_stamp,
    new_queue_state,
    queue_config,
)
from potboiler.server.log import Promise
from potboiler.server.log_delivered import DeliveredBatch
from potboiler.server.storage import Store, Write, prefix_end
from potboiler.v1.entry_pb2 import Entry

#: The format of the states this code writes: a store in another is rebuilt from the log at start
#: (`discard_if_stale`); bump it when some events' states would differ from what older code stored.
#: 1: unmarked until 30 November 2026 (a store written before the open tasks' records moved to the
#: `o` keys is moved over as it loads, see `_load_open`).
STATE_FORMAT = 1
_U64 = struct.Struct(">Q")
_CURSOR = b"c"
_SEP = b"\x00"
#: A task is compacted once it holds this many claims and retries.
COMPACT_AT = 64
#: How far behind the oldest per-owner stamp the compaction horizon stays (clock skew allowance).
COMPACT_MARGIN_MS = 10 * 60_000


class StoreFailed(Exception):
    """A store read failed (`error`): no fault of the entry being applied, which is never skipped
    for it (unlike an entry that fails to apply by itself)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class QueueRecord(TypedDict):
    """What is stored per queue."""

    state: QueueState
    #: Entry id of each create/delete in the state's history, by :func:`stamp_key`.
    ids: dict[str, str]


class TaskRecord(TypedDict):
    """What is stored per task."""

    state: TaskState
    #: Id of the entry that added the task (once known).
    add_id: str | None


def stamp_key(stamp: Stamp | StampJSON) -> str:
    """A stamp as a JSON object key."""
    s = Stamp.coerce(stamp)
    return f"{s.wall_ms}:{s.logical}:{s.owner}"


def _queue_key(name: str) -> bytes:
    return b"q" + name.encode()


def _task_key(queue: str, task_id: str) -> bytes:
    return b"t" + queue.encode() + _SEP + task_id.encode()


def _open_key(queue: str, task_id: str) -> bytes:
    return b"o" + queue.encode() + _SEP + task_id.encode()


def _key_key(queue: str, key: str) -> bytes:
    return b"k" + queue.encode() + _SEP + key.encode()


def _dump_queue(record: QueueRecord) -> bytes:
    """A queue's record as stored: without its key index (stored per key)."""
    state = {k: v for k, v in record["state"].items() if k != "keys"}
    return orjson.dumps({"state": state, "ids": record["ids"]})


def _settled(owner: str, newest: Stamp, seq: int, promises: Mapping[str, Promise]) -> Stamp:
    """How far every entry of `owner` is known to be applied: its newest entry's stamp, or its clock
    promise when the entries it covers are all applied (seq `seq` reaches the promise's)."""
    promise = promises.get(owner)
    if promise is None or seq < promise.seq:
        return newest
    return max(newest, Stamp(promise.stamp.wall_ms, promise.stamp.logical, owner))


TaskKey = tuple[str, str]
#: A queue and one of its idempotency keys.
KeyKey = tuple[str, str]


@dataclass
class Applied:
    """A planned batch: the store writes, and the new records to adopt once they are written."""

    position: int
    writes: list[Write] = field(default_factory=list)
    queues: dict[str, QueueRecord] = field(default_factory=dict)
    #: Changed tasks; None for a task dropped with its deleted queue.
    tasks: dict[TaskKey, TaskRecord | None] = field(default_factory=dict)
    #: Changed idempotency keys: their candidates, empty for a key dropped with its deleted queue.
    keys: dict[KeyKey, list[KeyCandidate]] = field(default_factory=dict)
    #: Each owner's newest entry in the batch: its stamp and seq.
    owners: dict[str, tuple[Stamp, int]] = field(default_factory=dict)
    #: Ids of the batch's Pigtail events (what appends wait for), in order.
    entry_ids: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector (if it runs) while the block runs."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class PigtailState:
    """The state of every queue and task on one node (single writer: the service's applier)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        raw = store.get(_CURSOR)
        self.cursor = _U64.unpack(raw)[0] if raw else 0
        self._configs: dict[str, tuple[QueueState, QueueConfig | None]] = {}
        #: Records written in an older layout, written again in this one.
        moved: list[Write] = []
        # What is loaded stays: the collector's passes over it while it was made (about 100,000
        # containers for 20,000 open tasks) took 0.03 s of the 0.17 s loading them took.
        with _collector_paused():
            self._queues = self._load_queues(moved)
            self._open, self._add_ids = self._load_open(moved)
            #: Each owner's newest entry applied: its stamp and seq (0 in records older than the seq).
            self._owners = self._load_owners()
        if moved:
            store.write(moved, sync=True)

    def _load_queues(self, moved: list[Write]) -> dict[str, QueueRecord]:
        """The stored queues with their key indexes; records to move appended to `moved`."""
        indexes: dict[str, dict[str, list[KeyCandidate]]] = {}
        for key, value in self._store.scan(b"k", prefix_end(b"k")):
            queue, idempotency_key = key[1:].decode().split("\x00", 1)
            indexes.setdefault(queue, {})[idempotency_key] = orjson.loads(value)
        queues: dict[str, QueueRecord] = {}
        for key, value in self._store.scan(b"q", prefix_end(b"q")):
            name = key[1:].decode()
            stored = cast(QueueRecord, orjson.loads(value))
            index = indexes.setdefault(name, {})
            if legacy := stored["state"].get("keys"):  # written before keys were stored apart
                index.update(legacy)
                moved.extend((_key_key(name, k), orjson.dumps(c)) for k, c in legacy.items())
            stored["state"]["keys"] = index
            if legacy:
                moved.append((key, _dump_queue(stored)))
            queues[name] = stored
        return queues

    def _load_open(
        self, moved: list[Write]
    ) -> tuple[dict[str, dict[str, TaskState]], dict[TaskKey, str | None]]:
        """The stored tasks that are not done, by queue, and their adds' entry ids; records to move
        appended to `moved`."""
        open_tasks: dict[str, dict[str, TaskState]] = {}
        add_ids: dict[TaskKey, str | None] = {}
        for key, value in self._store.scan(b"o", prefix_end(b"o")):
            raw: bytes | None = value
            if not raw:  # written when the record was in "t" (every task's): moved here
                raw = self._store.get(b"t" + key[1:])
                moved += [(key, raw), (b"t" + key[1:], None)]
                if raw is None:
                    continue
            record = cast(TaskRecord, orjson.loads(raw))
            state = record["state"]
            open_tasks.setdefault(state["queue"], {})[state["task_id"]] = state
            add_ids[state["queue"], state["task_id"]] = record["add_id"]
        return open_tasks, add_ids

    def _load_owners(self) -> dict[str, tuple[Stamp, int]]:
        """Each owner's newest entry applied, as stored."""
        owners: dict[str, tuple[Stamp, int]] = {}
        for key, value in self._store.scan(b"s", prefix_end(b"s")):
            wall, logical, *seq = orjson.loads(value)
            owner = key[1:].decode()
            owners[owner] = (Stamp(wall, logical, owner), seq[0] if seq else 0)
        return owners

    # -- reads -----------------------------------------------------------------------------------

    def queue(self, name: str) -> QueueState | None:
        """The queue's state (whatever it is: it may be deleted), or None if never seen."""
        record = self._queues.get(name)
        return None if record is None else record["state"]

    def queue_names(self) -> list[str]:
        """Names of every queue ever seen, sorted (existing or not)."""
        return sorted(self._queues)

    def config(self, name: str) -> QueueConfig | None:
        """The settings of the queue's current incarnation, or None if it does not exist (cached per
        queue state: a change of its history makes a new one; only its key index changes in place)."""
        record = self._queues.get(name)
        if record is None:
            return None
        state = record["state"]
        cached = self._configs.get(name)
        if cached is not None and cached[0] is state:
            return cached[1]
        config = queue_config(state)
        self._configs[name] = (state, config)
        return config

    def create_entry_id(self, name: str) -> str | None:
        """Id of the entry that created the queue's current incarnation, if it exists."""
        record = self._queues.get(name)
        config = self.config(name)
        if record is None or config is None:
            return None
        return record["ids"].get(stamp_key(config.created))

    def task(self, queue: str, task_id: str) -> TaskState | None:
        """The task's state (done ones from the store), or None."""
        state = self._open.get(queue, {}).get(task_id)
        if state is not None:
            return state
        record = self._load_task(queue, task_id)
        return None if record is None else record["state"]

    def add_entry_id(self, queue: str, task_id: str) -> str | None:
        """Id of the entry that added the task, if known."""
        if (queue, task_id) in self._add_ids:
            return self._add_ids[queue, task_id]
        record = self._load_task(queue, task_id)
        return None if record is None else record["add_id"]

    def open_tasks(self, queue: str) -> Mapping[str, TaskState]:
        """The queue's tasks that are not done, by id (possibly hidden ones: use the machine's views)."""
        return self._open.get(queue, {})

    def done_tasks(self, queue: str) -> list[TaskState]:
        """The queue's stored done tasks (read from the store; StoreFailed if that fails)."""
        prefix = b"t" + queue.encode() + _SEP
        try:
            values = [value for _, value in self._store.scan(prefix, prefix_end(prefix))]
        except Exception as exc:
            raise StoreFailed(exc) from exc
        return [cast(TaskRecord, orjson.loads(value))["state"] for value in values]

    def _load_task(self, queue: str, task_id: str) -> TaskRecord | None:
        """A done task's record (the others are in memory), or None; StoreFailed if the read fails."""
        try:
            raw = self._store.get(_task_key(queue, task_id))
        except Exception as exc:
            raise StoreFailed(exc) from exc
        return None if raw is None else cast(TaskRecord, orjson.loads(raw))

    # -- applying --------------------------------------------------------------------------------

    def plan(self, batch: DeliveredBatch, promises: Mapping[str, Promise] | None = None) -> Applied:
        """The writes and new records for a batch of delivered entries; changes nothing yet.
        `promises` are the owners' clock promises known to the node (for the compaction horizon).
        Entries that cannot be Pigtail events (by their bytes) are never parsed."""
        last = batch.last()
        applied = Applied(position=self.cursor if last is None else last)
        queues = applied.queues
        tasks = applied.tasks

        def queue_record(name: str) -> QueueRecord | None:
            return queues.get(name) or self._queues.get(name)

        def candidates(queue: str, key: str) -> list[KeyCandidate]:
            if (queue, key) in applied.keys:
                return applied.keys[queue, key]
            record = self._queues.get(queue)
            return [] if record is None else record["state"]["keys"].get(key, [])

        def task_record(key: TaskKey) -> TaskRecord | None:
            if key in tasks:
                return tasks[key]
            queue, task_id = key
            state = self._open.get(queue, {}).get(task_id)
            if state is not None:
                return TaskRecord(state=state, add_id=self._add_ids.get(key))
            return self._load_task(queue, task_id)

        # Each owner's newest entry in the batch (stamps grow along a chain).
        newest = batch.newest_of_each_owner()
        for _, entry in batch.marked(EVENT_MARK).entries:
            delivered = decode(entry)
            if delivered is None:
                continue
            applied.entry_ids.append(delivered.entry_id)  # only Pigtail's own appends are waited for
            stamp = delivered.stamp
            event = delivered.event
            if isinstance(event, QueueCreated | QueueDeleted):
                record = queue_record(event.name)
                old = None if record is None else record["state"]
                new = apply_queue_event(old, event, stamp)  # old's key index, changed per key at adopt
                if new is old:
                    continue
                ids = dict(record["ids"]) if record is not None else {}
                ids[stamp_key(stamp)] = delivered.entry_id
                keep = {stamp_key(mark["at"]) for mark in new["history"]}
                queues[event.name] = QueueRecord(state=new, ids={k: v for k, v in ids.items() if k in keep})
                cut = latest_delete(new)
                if cut is not None and cut != latest_delete(old):
                    self._purge(event.name, cut, tasks)
                    self._purge_keys(event.name, cut, new["keys"], applied.keys)
                continue
            record = queue_record(event.queue)
            cut = latest_delete(None if record is None else record["state"])
            key = (event.queue, event.task_id)
            current = task_record(key)
            if cut is not None and stamp < cut and (isinstance(event, TaskAdded) or current is None):
                continue  # belongs to an incarnation deleted since
            if isinstance(event, TaskAdded):
                if record is None:  # a task of a queue not seen yet: the queue is seen now
                    queues[event.queue] = QueueRecord(state=new_queue_state(event.queue), ids={})
                if (key_name := event.idempotency_key) is not None:
                    known = candidates(event.queue, key_name)
                    joined = candidates_after_add(known, event.task_id, stamp)
                    if joined is not known:
                        applied.keys[event.queue, key_name] = joined
            old_task = None if current is None else current["state"]
            new_task = apply_task_event(old_task, event, stamp)
            if new_task is old_task:
                continue
            add_id = None if current is None else current["add_id"]
            if isinstance(event, TaskAdded) and new_task["added"] == stamp.to_json():
                add_id = delivered.entry_id
            tasks[key] = TaskRecord(state=new_task, add_id=add_id)

        for owner, entry in newest.items():
            applied.owners[owner] = (stamp_of(entry), entry.seq)
        self._compact(applied, promises or {})
        writes = applied.writes
        for name, queue in queues.items():
            writes.append((_queue_key(name), _dump_queue(queue)))
        for (name, key_name), kept in applied.keys.items():
            writes.append((_key_key(name, key_name), orjson.dumps(kept) if kept else None))
        for (queue_name, task_id), task in tasks.items():
            if task is None:
                writes.append((_task_key(queue_name, task_id), None))
                writes.append((_open_key(queue_name, task_id), None))
                continue
            if task["state"]["done"] is None:
                writes.append((_open_key(queue_name, task_id), orjson.dumps(task)))
            else:
                writes.append((_task_key(queue_name, task_id), orjson.dumps(task)))
                writes.append((_open_key(queue_name, task_id), None))
        for owner, (stamp, seq) in applied.owners.items():
            writes.append((b"s" + owner.encode(), orjson.dumps([stamp.wall_ms, stamp.logical, seq])))
        writes.append((_CURSOR, _U64.pack(applied.position)))
        return applied

    def plan_skip(self, position: int) -> Applied:
        """A batch that only moves the cursor to `position` (past entries that cannot be applied)."""
        return Applied(position=position, writes=[(_CURSOR, _U64.pack(position))])

    def _purge(
        self,
        queue: str,
        cut: Stamp,
        tasks: dict[TaskKey, TaskRecord | None],
    ) -> None:
        """Drop the queue's tasks added before `cut` (its latest delete), and the records of tasks
        whose add is not here (a claim or done from a node that had not seen an earlier delete yet)
        with every event before it: arriving after the delete, they would not have been stored."""
        candidates: dict[str, TaskState] = dict(self._open.get(queue, {}))
        for state in self.done_tasks(queue):
            candidates[state["task_id"]] = state
        for (q, task_id), record in tasks.items():
            if q == queue and record is not None:
                candidates[task_id] = record["state"]
        for task_id, state in candidates.items():
            stamp = state["added"] if state["added"] is not None else latest_stamp(state)
            if stamp is not None and Stamp.coerce(stamp) < cut:
                tasks[queue, task_id] = None

    def _purge_keys(
        self,
        queue: str,
        cut: Stamp,
        index: Mapping[str, list[KeyCandidate]],
        changed: dict[KeyKey, list[KeyCandidate]],
    ) -> None:
        """Drop the candidates of the queue's keys stamped before `cut` (its latest delete), from its
        `index` and from the keys `changed` in this batch so far."""
        keys = set(index) | {key for q, key in changed if q == queue}
        for key in keys:
            known = changed.get((queue, key), index.get(key, []))
            kept = candidates_after_delete(known, cut)
            if kept != known:
                changed[queue, key] = kept

    def _compact(self, applied: Applied, promises: Mapping[str, Promise]) -> None:
        owners = {**self._owners, **applied.owners}
        settled = [_settled(owner, stamp, seq, promises) for owner, (stamp, seq) in owners.items()]
        for owner, promise in promises.items():
            if owner in owners:
                continue
            if promise.seq:
                return  # an owner with entries none of which is applied here yet: they may be claims
            settled.append(Stamp(promise.stamp.wall_ms, promise.stamp.logical, owner))
        if not settled:
            return
        oldest = min(settled)
        horizon = Stamp(oldest.wall_ms - COMPACT_MARGIN_MS, 0, "")
        for (queue, _), record in applied.tasks.items():
            if record is None:
                continue
            state = record["state"]
            if len(state["claims"]) + len(state["retries"]) < COMPACT_AT:
                continue
            queue_record = applied.queues.get(queue) or self._queues.get(queue)
            if queue_record is not None:
                record["state"] = compact_task(state, queue_record["state"], horizon)

    def adopt(self, applied: Applied) -> None:
        """Make a planned batch (already written to the store) the current state."""
        self._queues.update(applied.queues)
        for (queue, key), kept in applied.keys.items():
            index = self._queues[queue]["state"]["keys"]
            if kept:
                index[key] = kept
            else:
                index.pop(key, None)
        for (queue, task_id), record in applied.tasks.items():
            open_tasks = self._open.setdefault(queue, {})
            if record is None or record["state"]["done"] is not None:
                open_tasks.pop(task_id, None)
                self._add_ids.pop((queue, task_id), None)
                if not open_tasks:
                    del self._open[queue]
            else:
                open_tasks[task_id] = record["state"]
                self._add_ids[queue, task_id] = record["add_id"]
        self._owners.update(applied.owners)
        self.cursor = applied.position

    def apply(
        self,
        batch: Sequence[tuple[int, Entry]],
        *,
        promises: Mapping[str, Promise] | None = None,
    ) -> Applied:
        """Plan, write and adopt a batch in one go."""
        applied = self.plan(DeliveredBatch.parsed(batch), promises)
        self._store.write(applied.writes)
        self.adopt(applied)
        return applied
