"""Pigtail's materialised state (``potboiler.pigtail.state``) on a MemoryStore, and its codec, scheduler
and input checks: applying delivered log entries, restart from the store, crash between plan and write,
foreign and broken entries, queue deletion, compaction, convergence of replicas."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable

import orjson
import pytest
from google.protobuf.struct_pb2 import Value

from potboiler.pigtail import validate
from potboiler.pigtail.codec import EVENT_MARK, decode, event_data
from potboiler.pigtail.events import (
    Event,
    JSONValue,
    QueueCreated,
    QueueDeleted,
    TaskAdded,
    TaskClaimed,
    TaskDone,
    TaskRetried,
)
from potboiler.pigtail.machine import (
    Incarnation,
    ListEntry,
    Stamp,
    TaskState,
    TaskView,
    apply_queue_event,
    apply_task_event,
    find_by_key,
    queue_config,
    task_view,
)
from potboiler.pigtail.scheduler import OTHERS_AFTER_MS, PICK_WINDOW, Scheduler
from potboiler.pigtail.state import COMPACT_AT, COMPACT_MARGIN_MS, PigtailState
from potboiler.server.errors import InvalidArgument, TooLarge
from potboiler.server.hlc import Stamp as HlcStamp
from potboiler.server.jsonvalue import from_value, to_value
from potboiler.server.log import Promise
from potboiler.server.log_delivered import DeliveredBatch
from potboiler.server.storage import MemoryStore
from potboiler.v1.entry_pb2 import Entry, HlcTimestamp
from tests.pigtail_oracle import apply_to_queue, list_tasks

A = "00000000-0000-4000-8000-00000000000a"
B = "00000000-0000-4000-8000-00000000000b"
C = "00000000-0000-4000-8000-00000000000c"
T0 = 1_000_000


class Log:
    """Makes log entries as nodes would: per owner seq and HLC stamps, delivery positions."""

    def __init__(self) -> None:
        self.seq: dict[str, int] = {}
        self.entries: list[Entry] = []

    def entry(self, owner: str, wall_ms: int, data: Value, logical: int = 0) -> Entry:
        self.seq[owner] = self.seq.get(owner, 0) + 1
        entry = Entry(
            id=str(uuid.uuid4()),
            owner=owner,
            seq=self.seq[owner],
            when=HlcTimestamp(wall_ms=wall_ms, logical=logical),
            data=data,
        )
        self.entries.append(entry)
        return entry

    def event(self, owner: str, wall_ms: int, event: Event) -> Entry:
        return self.entry(owner, wall_ms, event_data(event))


def positioned(entries: list[Entry], start: int = 0) -> list[tuple[int, Entry]]:
    return [(start + i + 1, e) for i, e in enumerate(entries)]


def test_codec_round_trip_and_foreign_entries() -> None:
    log = Log()
    event = TaskAdded("q", "t1", "hello", {"foo": [1, 2.5, None, True]}, 5, 3, "k")
    entry = log.event(A, T0, event)
    delivered = decode(entry)
    assert delivered is not None
    assert delivered.event == event
    assert delivered.stamp == Stamp(T0, 0, A)
    assert delivered.entry_id == entry.id
    # The mark by which an applier skips other entries unread is in every Pigtail entry's bytes.
    assert EVENT_MARK in entry.SerializeToString()
    foreign = [
        to_value(5),
        to_value({"table": "t", "key": "k", "crdt": None, "op": "set", "change": 1}),
        to_value({"pigtail": 5}),
        to_value({"pigtail": {"kind": "nonsense"}}),
        to_value({"pigtail": {"kind": "queue_created", "name": "q", "timeout_ms": -1}}),
        to_value({"pigtail": {"kind": "queue_created", "name": "bad name", "timeout_ms": 10}}),
        to_value({"pigtail": {"kind": "task_claimed", "queue": "q", "task_id": "a/b", "worker_id": "w"}}),
        to_value({"pigtail": event.to_json(), "other": 1}),
        to_value("pigtail"),
        to_value(["pigtail"]),
        Value(),
    ]
    for data in foreign:
        foreign_entry = log.entry(A, T0, data)
        kind = foreign_entry.data.WhichOneof("kind")
        assert decode(foreign_entry) is None
        assert foreign_entry.data.WhichOneof("kind") == kind  # looking did not change the entry


def test_json_values_keep_integers() -> None:
    value: JSONValue = {"a": 1, "b": 1.5, "c": [True, None, "x"], "d": {"e": 2**40}, "f": 2.0**60}
    assert from_value(to_value(value)) == value
    assert isinstance(from_value(to_value(3.0)), int)


def test_apply_create_add_claim_done_and_restart() -> None:
    store = MemoryStore()
    state = PigtailState(store)
    log = Log()
    create = log.event(A, T0, QueueCreated("q", 1000))
    add1 = log.event(A, T0 + 1, TaskAdded("q", "t1", "hello", {"foo": "bar"}))
    add2 = log.event(A, T0 + 2, TaskAdded("q", "t2", "hello"))
    claim = log.event(A, T0 + 3, TaskClaimed("q", "t1", "w1"))
    done = log.event(A, T0 + 4, TaskDone("q", "t1", "w1"))
    applied = state.apply(positioned([create, add1, add2]))
    assert applied.entry_ids == [create.id, add1.id, add2.id]
    assert state.cursor == 3
    assert state.create_entry_id("q") == create.id
    assert state.add_entry_id("q", "t1") == add1.id
    assert set(state.open_tasks("q")) == {"t1", "t2"}
    state.apply(positioned([claim, done], start=3))
    assert state.cursor == 5
    assert set(state.open_tasks("q")) == {"t2"}
    view = task_view(state.task("q", "t1"), state.queue("q"), T0 + 10)
    assert view is not None and view["state"] == "done" and view["done_by"] == "w1"

    again = PigtailState(store)
    assert again.cursor == 5
    assert again.queue("q") == state.queue("q")
    assert set(again.open_tasks("q")) == {"t2"}
    assert again.task("q", "t1") == state.task("q", "t1")
    assert again.create_entry_id("q") == create.id
    assert again.add_entry_id("q", "t1") == add1.id
    assert again.add_entry_id("q", "t2") == add2.id
    assert [s["task_id"] for s in again.done_tasks("q")] == ["t1"]


def stored_tasks(store: MemoryStore) -> dict[bytes, list[str]]:
    """The task records stored under "o" (not done) and "t" (done): their task ids."""
    return {
        prefix: [orjson.loads(value)["state"]["task_id"] for _, value in store.scan(prefix, prefix + b"\xff")]
        for prefix in (b"o", b"t")
    }


def test_a_task_is_stored_with_the_open_ones_until_it_is_done() -> None:
    """Loading the tasks that are not done reads their range alone, not the done tasks' too."""
    store = MemoryStore()
    state = PigtailState(store)
    log = Log()
    entries = [
        log.event(A, T0, QueueCreated("q", 1000)),
        log.event(A, T0 + 1, TaskAdded("q", "t1", "x")),
        log.event(A, T0 + 2, TaskAdded("q", "t2", "x")),
        log.event(A, T0 + 3, TaskClaimed("q", "t1", "w")),
    ]
    state.apply(positioned(entries))
    assert stored_tasks(store) == {b"o": ["t1", "t2"], b"t": []}
    state.apply([(5, log.event(A, T0 + 4, TaskDone("q", "t1", "w")))])
    assert stored_tasks(store) == {b"o": ["t2"], b"t": ["t1"]}
    again = PigtailState(store)
    assert dict(again.open_tasks("q")) == dict(state.open_tasks("q"))
    assert again.task("q", "t1") == state.task("q", "t1")


def test_records_of_tasks_not_done_kept_with_the_done_ones_are_moved_on_load() -> None:
    """A store written when every task's record was under "t" and "o" only marked those not done."""
    log = Log()
    entries = [
        log.event(A, T0, QueueCreated("q", 1000)),
        log.event(A, T0 + 1, TaskAdded("q", "t1", "x")),
        log.event(A, T0 + 2, TaskAdded("q", "t2", "x", {"n": 2})),
        log.event(A, T0 + 3, TaskClaimed("q", "t2", "w")),
        log.event(A, T0 + 4, TaskAdded("q", "t3", "x")),
        log.event(A, T0 + 5, TaskDone("q", "t1", "w")),
    ]
    reference = PigtailState(MemoryStore())
    reference.apply(positioned(entries))
    store = MemoryStore()
    legacy = [
        (b"c", b"\x00" * 7 + b"\x06"),
        (b"qq", orjson.dumps({"state": reference.queue("q"), "ids": {}})),
    ]
    for task_id in ("t1", "t2", "t3"):
        record = {"state": reference.task("q", task_id), "add_id": f"add-{task_id}"}
        legacy.append((b"tq\x00" + task_id.encode(), orjson.dumps(record)))
        if task_id != "t1":
            legacy.append((b"oq\x00" + task_id.encode(), b""))
    store.write(legacy)
    for _ in range(2):
        state = PigtailState(store)
        assert state.cursor == 6
        assert dict(state.open_tasks("q")) == dict(reference.open_tasks("q"))
        assert state.task("q", "t1") == reference.task("q", "t1")
        assert [state.add_entry_id("q", t) for t in ("t1", "t2", "t3")] == ["add-t1", "add-t2", "add-t3"]
        assert stored_tasks(store) == {b"o": ["t2", "t3"], b"t": ["t1"]}


def test_crash_between_plan_and_write_replays_from_old_cursor() -> None:
    store = MemoryStore()
    state = PigtailState(store)
    log = Log()
    batch = positioned(
        [
            log.event(A, T0, QueueCreated("q", 1000)),
            log.event(A, T0 + 1, TaskAdded("q", "t1", "x")),
            log.event(A, T0 + 2, TaskClaimed("q", "t1", "w")),
        ]
    )
    state.plan(DeliveredBatch.parsed(batch))  # planned, never written: the process died here
    restarted = PigtailState(store)
    assert restarted.cursor == 0
    assert restarted.queue("q") is None
    restarted.apply(batch)
    once = (restarted.queue("q"), restarted.task("q", "t1"))
    restarted.apply(batch)  # applying the same entries again changes nothing
    assert (restarted.queue("q"), restarted.task("q", "t1")) == once
    assert restarted.cursor == 3


def test_foreign_and_broken_entries_only_move_the_cursor() -> None:
    store = MemoryStore()
    state = PigtailState(store)
    log = Log()
    entries = [
        log.entry(A, T0, to_value({"anything": 1})),
        log.entry(A, T0 + 1, to_value({"pigtail": {"kind": "task_added"}})),
        log.entry(B, T0 + 2, to_value([1, 2])),
    ]
    applied = state.apply(positioned(entries))
    assert state.cursor == 3
    assert not applied.queues and not applied.tasks
    assert state.queue_names() == []


def test_delete_drops_tasks_and_recreate_is_empty() -> None:
    state = PigtailState(MemoryStore())
    log = Log()
    entries = [
        log.event(A, T0, QueueCreated("q", 1000)),
        log.event(A, T0 + 1, TaskAdded("q", "t1", "x")),
        log.event(A, T0 + 2, TaskAdded("q", "t2", "x")),
        log.event(A, T0 + 3, TaskDone("q", "t2", "")),
        log.event(A, T0 + 4, QueueDeleted("q")),
    ]
    state.apply(positioned(entries))
    assert queue_config(state.queue("q")) is None
    assert state.task("q", "t1") is None and state.task("q", "t2") is None
    assert dict(state.open_tasks("q")) == {}
    # A task added on another node before the delete arrives late: it is not stored.
    late = log.event(B, T0 + 2, TaskAdded("q", "t3", "x"))
    late_claim = log.event(B, T0 + 3, TaskClaimed("q", "t3", "w"))
    recreate = log.event(A, T0 + 5, QueueCreated("q", 50))
    add = log.event(A, T0 + 6, TaskAdded("q", "t4", "x"))
    state.apply(positioned([late, late_claim, recreate, add], start=5))
    assert state.task("q", "t3") is None
    config = queue_config(state.queue("q"))
    assert config is not None and config.timeout_ms == 50
    assert state.create_entry_id("q") == recreate.id
    assert list(list_tasks(state.open_tasks("q"), state.queue("q"), T0 + 10)) == ["t4"]


def test_an_idle_owner_holds_compaction_back_until_it_promises_its_clock() -> None:
    """B wrote once, long ago, and then nothing: its newest stamp holds the horizon back until B's
    clock promise covers everything of B applied here (seq 1), also after a restart."""
    store = MemoryStore()
    state = PigtailState(store)
    log = Log()
    later = T0 + COMPACT_MARGIN_MS + 10_000
    entries = [log.entry(B, T0, to_value("B's only entry"))]
    entries += [
        log.event(A, later, QueueCreated("q", 100_000)),
        log.event(A, later + 1, TaskAdded("q", "t", "x")),
    ]
    entries += [log.event(A, later + 2 + i, TaskClaimed("q", "t", "w")) for i in range(COMPACT_AT + 5)]
    a_newest = Promise(HlcStamp(later + COMPACT_AT + 6, 0), COMPACT_AT + 7)
    state.apply(positioned(entries), promises={A: a_newest})
    task = state.task("q", "t")
    assert task is not None and task["base"] is None  # B's stamp (T0) holds the horizon

    def heartbeat(promises: dict[str, Promise]) -> TaskState:
        at = later + COMPACT_MARGIN_MS + len(log.entries)
        batch = positioned([log.event(A, at, TaskClaimed("q", "t", "w"))], start=len(log.entries) - 1)
        state.apply(batch, promises=promises)
        task = state.task("q", "t")
        assert task is not None
        return task

    # A promise that covers more of B's log than was applied here (B's seq 2 is on its way) is no use.
    b_ahead = Promise(HlcStamp(later + COMPACT_MARGIN_MS, 0), 2)
    assert heartbeat({A: a_newest, B: b_ahead})["base"] is None
    state = PigtailState(store)  # a restart: B's applied seq comes back from the store
    b_settled = Promise(HlcStamp(later + 2 * COMPACT_MARGIN_MS, 0), 1)
    task = heartbeat({B: b_settled})
    assert task["base"] is not None and len(task["claims"]) < COMPACT_AT


def test_an_owner_known_only_by_its_promise_holds_compaction_back() -> None:
    """C promised its clock (so it is out there) but none of its entries is applied here: they may
    be claims of this task stamped behind the horizon, so nothing is compacted until they are."""
    state = PigtailState(MemoryStore())
    log = Log()
    entries = [log.event(A, T0, QueueCreated("q", 100_000)), log.event(A, T0 + 1, TaskAdded("q", "t", "x"))]
    entries += [log.event(A, T0 + 2 + i, TaskClaimed("q", "t", "w")) for i in range(COMPACT_AT + 5)]
    later = T0 + 2 * COMPACT_MARGIN_MS
    entries.append(log.event(A, later, TaskClaimed("q", "t", "w")))
    c_ahead = Promise(HlcStamp(later, 0), 3)
    state.apply(positioned(entries), promises={C: c_ahead})
    task = state.task("q", "t")
    assert task is not None and task["base"] is None
    c_idle = Promise(HlcStamp(later, 0), 0)  # C has written nothing: its promise settles it
    more = [log.event(A, later + 1, TaskClaimed("q", "t", "w"))]
    state.apply(positioned(more, start=len(entries)), promises={C: c_idle})
    task = state.task("q", "t")
    assert task is not None and task["base"] is not None


def test_heartbeats_are_compacted_behind_every_owner() -> None:
    state = PigtailState(MemoryStore())
    log = Log()
    entries = [log.event(A, T0, QueueCreated("q", 100_000)), log.event(A, T0 + 1, TaskAdded("q", "t", "x"))]
    entries += [log.event(A, T0 + 2 + i, TaskClaimed("q", "t", "w")) for i in range(COMPACT_AT + 5)]
    state.apply(positioned(entries))
    task = state.task("q", "t")
    # Nothing is compacted while the claims are within the margin behind the newest stamps.
    assert task is not None and task["base"] is None and len(task["claims"]) == COMPACT_AT + 5
    later = T0 + COMPACT_MARGIN_MS + 10_000
    more = [
        log.entry(B, later, to_value("another node's entry")),
        log.event(A, later, TaskClaimed("q", "t", "w")),
        log.event(A, later + 1, TaskClaimed("q", "t", "w")),
    ]
    state.apply(positioned(more, start=len(entries)))
    task = state.task("q", "t")
    assert task is not None and task["base"] is not None
    assert len(task["claims"]) == 2
    # The same views as the uncompacted state, at any time.
    ref_queue, ref_task = None, None
    for entry in entries + more:
        delivered = decode(entry)
        if delivered is None:
            continue
        event = delivered.event
        if isinstance(event, QueueCreated):
            ref_queue = apply_queue_event(ref_queue, event, delivered.stamp)
        elif isinstance(event, TaskAdded | TaskClaimed):
            ref_task = apply_task_event(ref_task, event, delivered.stamp)
    for now in (T0 + 50, T0 + 100_100, later + 5, later + 100_000, later + 100_002):
        assert task_view(task, state.queue("q"), now) == task_view(ref_task, ref_queue, now)
    view = task_view(task, state.queue("q"), later + 2)
    assert view is not None and view["worker"] == "w" and view["attempts"] == 2


Views = dict[str, TaskView | None]


def replica_views(order: list[Entry], now_ms: int) -> tuple[Views, dict[str, ListEntry]]:
    """What a replica that received `order` shows."""
    state = PigtailState(MemoryStore())
    for i, entry in enumerate(order):
        state.apply([(i + 1, entry)])
    views: Views = {}
    for task_id in ("t1", "t2", "t3"):
        views[task_id] = task_view(state.task("q", task_id), state.queue("q"), now_ms)
    return views, list_tasks(state.open_tasks("q"), state.queue("q"), now_ms)


def test_replicas_converge_whatever_the_interleaving() -> None:
    log = Log()
    a = [
        log.event(A, T0, QueueCreated("q", 1000, 2)),
        log.event(A, T0 + 1, TaskAdded("q", "t1", "x", priority=1)),
        log.event(A, T0 + 2, TaskAdded("q", "t2", "x", idempotency_key="k")),
        log.event(A, T0 + 10, TaskClaimed("q", "t1", "wa")),
        log.event(A, T0 + 3000, TaskClaimed("q", "t2", "wa")),
    ]
    b = [
        log.event(B, T0 + 5, TaskAdded("q", "t3", "x", idempotency_key="k")),
        log.event(B, T0 + 11, TaskClaimed("q", "t1", "wb")),
        log.event(B, T0 + 500, TaskClaimed("q", "t1", "wb")),
        log.event(B, T0 + 600, TaskDone("q", "t1", "wb")),
        log.event(B, T0 + 9000, TaskRetried("q", "t2")),
    ]
    rng = random.Random(5)
    results = []
    for _ in range(20):
        # Any interleaving that keeps each owner's order (what causal delivery can give).
        picks = [0] * len(a) + [1] * len(b)
        rng.shuffle(picks)
        ia, ib = iter(a), iter(b)
        order = [next(ia) if p == 0 else next(ib) for p in picks]
        results.append(replica_views(order, T0 + 20_000))
    assert all(r == results[0] for r in results)
    views, _ = results[0]
    t1 = views["t1"]
    assert t1 is not None and t1["worker"] == "wa" and t1["state"] == "done"  # wb's claims were void
    assert t1["done_by"] == "wb"
    assert views["t3"] is None  # lost the idempotency key to t2


def keyed_history(log: Log) -> tuple[list[Entry], list[Entry]]:
    """Two nodes' events of one queue: keyed adds (some sharing keys) around a delete and re-create."""
    a = [
        log.event(A, T0, QueueCreated("q", 1000)),
        log.event(A, T0 + 2, TaskAdded("q", "a1", "x", idempotency_key="k1")),
        log.event(A, T0 + 4, TaskAdded("q", "a2", "x", idempotency_key="k2")),
        log.event(A, T0 + 10, QueueDeleted("q")),
        log.event(A, T0 + 11, QueueCreated("q", 1000)),
        log.event(A, T0 + 14, TaskAdded("q", "a3", "x", idempotency_key="k1")),
    ]
    b = [
        log.event(B, T0 + 3, TaskAdded("q", "b1", "x", idempotency_key="k1")),
        log.event(B, T0 + 12, TaskAdded("q", "b2", "x", idempotency_key="k2")),
        log.event(B, T0 + 13, TaskAdded("q", "b3", "x", idempotency_key="k1")),
        log.event(B, T0 + 15, TaskAdded("q", "b4", "x")),
    ]
    return a, b


def test_the_key_index_is_the_oracles_whatever_the_order_batching_and_restarts() -> None:
    """Kept apart from the queue record and changed per key, the index is still exactly what a queue
    state kept in one piece holds (the oracle's), in every causal order, batching, and after
    reloading the store."""
    log = Log()
    a, b = keyed_history(log)
    reference = None
    for entry in a + b:
        delivered = decode(entry)
        assert delivered is not None
        reference = apply_to_queue(reference, delivered.event, delivered.stamp)
    assert reference is not None and reference["keys"] == {
        "k1": [{"at": [T0 + 13, 0, B], "task_id": "b3"}, {"at": [T0 + 14, 0, A], "task_id": "a3"}],
        "k2": [{"at": [T0 + 12, 0, B], "task_id": "b2"}],
    }
    rng = random.Random(7)
    for _ in range(30):
        picks = [0] * len(a) + [1] * len(b)
        rng.shuffle(picks)
        ia, ib = iter(a), iter(b)
        order = [next(ia) if p == 0 else next(ib) for p in picks]
        store = MemoryStore()
        state = PigtailState(store)
        position = 0
        while position < len(order):
            size = rng.randint(1, 4)
            state.apply(positioned(order[position : position + size], start=position))
            position += size
            if rng.random() < 0.3:
                state = PigtailState(store)
        for seen in (state, PigtailState(store)):
            queue = seen.queue("q")
            assert queue is not None and queue["keys"] == reference["keys"]
            assert queue["history"] == reference["history"]
        assert sorted(key for key, _ in store.scan(b"k", b"l")) == [b"kq\x00k1", b"kq\x00k2"]


def test_an_add_with_a_key_writes_its_key_alone() -> None:
    """However many keys the queue has seen, an add writes one key record, not the queue's index."""
    state = PigtailState(MemoryStore())
    log = Log()
    adds = [
        log.event(A, T0 + i, TaskAdded("q", f"t{i}", "x", idempotency_key=f"k{i}")) for i in range(1, 500)
    ]
    state.apply(positioned([log.event(A, T0, QueueCreated("q", 1000)), *adds]))
    last = log.event(A, T0 + 1000, TaskAdded("q", "last", "x", idempotency_key="last"))
    applied = state.apply([(501, last)])
    assert sorted(key[:1] for key, _ in applied.writes) == [b"c", b"k", b"o", b"s"]
    assert sum(len(value or b"") for _, value in applied.writes) < 1000


def test_queue_records_written_with_their_keys_inside_are_moved_apart_on_load() -> None:
    store = MemoryStore()
    legacy = {
        "state": {
            "name": "q",
            "history": [{"at": [T0, 0, A], "op": "created", "timeout_ms": 1000, "max_attempts": None}],
            "keys": {"k": [{"at": [T0 + 1, 0, A], "task_id": "t1"}]},
        },
        "ids": {},
    }
    store.write([(b"qq", orjson.dumps(legacy))])
    state = PigtailState(store)
    assert find_by_key(state.queue("q"), "k") == "t1"
    assert orjson.loads(store.get(b"kq\x00k") or b"null") == legacy["state"]["keys"]["k"]  # type: ignore[index]
    assert "keys" not in orjson.loads(store.get(b"qq") or b"{}")["state"]
    assert find_by_key(PigtailState(store).queue("q"), "k") == "t1"


def test_a_claim_of_a_task_a_delete_dropped_leaves_no_record_once_a_later_delete_comes() -> None:
    """B claims a task it saw added, not yet knowing A deleted the queue (a partition): here the
    claim arrives after the delete dropped the task, and its record has no add. A later delete drops
    it too: the store ends as it does where the claim came before any delete."""
    log = Log()
    first = [
        log.event(A, T0 + 100, QueueCreated("q", 1000)),
        log.event(A, T0 + 200, TaskAdded("q", "t", "x")),
        log.event(A, T0 + 300, QueueDeleted("q")),
    ]
    claim = log.event(B, T0 + 400, TaskClaimed("q", "t", "w"))
    later = [
        log.event(A, T0 + 500, QueueCreated("q", 1000)),
        log.event(A, T0 + 600, QueueDeleted("q")),
        log.event(A, T0 + 700, QueueCreated("q", 1000)),
    ]
    stores = []
    for order in (
        [*first, claim, *later],
        [*first, *later, claim],
        [first[0], first[1], claim, *first[2:], *later],
    ):
        store = MemoryStore()
        state = PigtailState(store)
        state.apply(positioned(order))
        assert dict(state.open_tasks("q")) == {}
        stores.append(sorted(key for key, _ in store.scan(b"o", b"u") if key[:1] in (b"o", b"t")))
    assert stores[0] == stores[1] == stores[2] == []


def test_scheduler_hands_out_by_priority_then_age_and_skips_held() -> None:
    state = PigtailState(MemoryStore())
    log = Log()
    entries = [
        log.event(A, T0, QueueCreated("q", 1000)),
        log.event(A, T0 + 1, TaskAdded("q", "old", "x")),
        log.event(A, T0 + 2, TaskAdded("q", "young", "x")),
        log.event(A, T0 + 3, TaskAdded("q", "urgent", "x", priority=5)),
        log.event(A, T0 + 4, TaskAdded("q", "later", "x", not_before_ms=T0 + 5000, priority=9)),
    ]
    state.apply(positioned(entries))
    scheduler = Scheduler()
    now = T0 + 10
    became_claimable = [
        scheduler.update(task, Incarnation(state.queue("q")).standing(task, now), now)
        for task in state.open_tasks("q").values()
    ]
    assert became_claimable == [True, True, True, False]  # "later" is not due yet
    tasks = state.open_tasks("q")
    queue = state.queue("q")
    assert scheduler.pick("q", tasks.get, queue, now) == "urgent"
    assert scheduler.pick("q", tasks.get, queue, now, exclude={"urgent"}) == "old"
    assert scheduler.next_wake_ms("q") == T0 + 5000  # "later" waits until it is due
    claim = log.event(A, now, TaskClaimed("q", "urgent", "w"))
    applied = state.apply(positioned([claim], start=len(entries)))
    for record in applied.tasks.values():
        assert record is not None
        assert not scheduler.update(record["state"], Incarnation(queue).standing(record["state"], now), now)
    assert scheduler.pick("q", tasks.get, queue, now) == "old"
    assert scheduler.next_wake_ms("q") == now + 1000  # the lease of "urgent" ends then
    assert scheduler.pick("q", state.open_tasks("q").get, queue, T0 + 6000) == "later"
    assert scheduler.pick("q", state.open_tasks("q").get, queue, now + 1000, exclude={"old"}) == "urgent"


def test_the_scheduler_takes_a_preferred_task_among_the_best_of_one_priority() -> None:
    state = PigtailState(MemoryStore())
    log = Log()
    adds = [log.event(A, T0 + 1 + i, TaskAdded("q", f"t{i}", "x")) for i in range(PICK_WINDOW + 5)]
    adds.append(log.event(A, T0 + 99, TaskAdded("q", "low", "x", priority=-1)))
    state.apply(positioned([log.event(A, T0, QueueCreated("q", 1000)), *adds]))
    scheduler = Scheduler()
    now = T0 + 100
    tasks, queue = state.open_tasks("q"), state.queue("q")
    for task in tasks.values():
        scheduler.update(task, Incarnation(queue).standing(task, now), now)

    def pick(
        prefer: Callable[[str], bool], exclude: set[str] | None = None, at: int | None = None
    ) -> str | None:
        return scheduler.pick("q", tasks.get, queue, now if at is None else at, exclude or set(), prefer)

    assert pick(lambda t: t in ("t3", "t4")) == "t3"
    assert pick(lambda t: t in ("t3", "t4"), {"t3"}) == "t4"
    window = {f"t{i}" for i in range(PICK_WINDOW)}
    # None preferred: none until the oldest has been claimable for OTHERS_AFTER_MS (left to the node
    # whose share it is), then any of the window that has.
    assert pick(lambda t: False) is None
    assert scheduler.next_wake_ms("q") == T0 + 1 + OTHERS_AFTER_MS
    assert {pick(lambda t: False, at=T0 + 2 + OTHERS_AFTER_MS) for _ in range(50)} == {"t0", "t1"}
    assert scheduler.next_wake_ms("q") is None
    now = T0 + 99 + OTHERS_AFTER_MS  # every task has been claimable that long
    picks = {pick(lambda t: False) for _ in range(200)}
    assert picks <= window and len(picks) > 1
    assert pick(lambda t: t == f"t{PICK_WINDOW + 2}") in window  # beyond the window
    assert pick(lambda t: t == "low") in window  # never a lower priority before the best
    assert pick(lambda t: False, {f"t{i}" for i in range(PICK_WINDOW + 5)}) == "low"
    assert pick(lambda t: t == "t7") == "t7"  # and every task is still there
    assert scheduler.pick("q", tasks.get, queue, now) == "t0"


def test_the_scheduler_frees_a_queue_whose_tasks_are_all_forgotten() -> None:
    state = PigtailState(MemoryStore())
    log = Log()
    adds = [log.event(A, T0 + i, TaskAdded("q", f"t{i}", "x", not_before_ms=T0 + i % 2)) for i in range(100)]
    state.apply(positioned([log.event(A, T0, QueueCreated("q", 1000)), *adds]))
    scheduler = Scheduler()
    for task in state.open_tasks("q").values():
        scheduler.update(task, Incarnation(state.queue("q")).standing(task, T0), T0)
    for task_id in list(state.open_tasks("q")):
        scheduler.forget("q", task_id)  # as for a deleted queue
    queue = scheduler._queues["q"]
    assert (queue.ready, queue.waiting, queue.where, queue.known) == ([], [], {}, {})


@pytest.mark.parametrize(
    ("check", "message"),
    [
        (lambda: validate.queue_name(""), "queue name"),
        (lambda: validate.queue_name("a" * 129), "129 characters"),
        (lambda: validate.queue_name("a/b"), "letters, digits"),
        (lambda: validate.timeout_ms(0), "timeout_ms is required"),
        (lambda: validate.timeout_ms(-5), "not -5"),
        (lambda: validate.timeout_ms(10**12), "1 to 86400000"),
        (lambda: validate.max_attempts(0), "max_attempts"),
        (lambda: validate.text("", "task_name"), "task_name is required"),
        (lambda: validate.text("x" * 300, "worker_id"), "at most 256"),
        (lambda: validate.text("a\nb", "worker_id"), "control characters"),
        (lambda: validate.not_before(1, 1, T0), "not both"),
        (lambda: validate.not_before(None, -1, T0), "delay_ms"),
        (lambda: validate.not_before(-1, None, T0), "not_before_ms"),
        (lambda: validate.priority(10**7), "priority"),
        (lambda: validate.info({"a": [1, float("nan")]}), "info must be JSON, which has no NaN"),
        (lambda: validate.info(float("-inf")), "info must be JSON, which has no NaN"),
        (lambda: validate.wait_ms(10**6), "wait_ms"),
        (lambda: validate.in_flight(-1), "max_in_flight"),
    ],
)
def test_bad_input_is_refused_with_a_message(check: object, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        check()  # type: ignore[operator]


def test_limits_that_pass() -> None:
    assert validate.not_before(None, 500, T0) == T0 + 500
    assert validate.not_before(T0 + 5, None, T0) == T0 + 5
    assert validate.not_before(None, 0, T0) is None
    assert validate.in_flight(0) == 1
    assert validate.text("", "worker_id", required=False) == ""
    with pytest.raises(TooLarge):
        validate.info("x" * (validate.MAX_INFO_BYTES + 1))
    assert validate.queue_name("a-b_C9") == "a-b_C9"
