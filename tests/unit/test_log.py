"""The log store: chains and seq, heads and firsts, causal delivery, remote ingest, restart."""

from __future__ import annotations

import itertools
import math
import struct
import uuid
from collections.abc import Callable, Sequence

import pytest
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Value
from hypothesis import given
from hypothesis import strategies as st

from potboiler.server.entries import (
    MAX_DEPTH,
    MAX_ENTRY_BYTES,
    NewEntry,
    validate_new_entry,
    validate_serialized_batch,
    validate_serialized_entry,
)
from potboiler.server.errors import InvalidArgument, NotFound, TooLarge, Unavailable
from potboiler.server.hlc import MAX_DRIFT_MS, HybridClock, Stamp
from potboiler.server.ids import parse_uuid, uuid_str
from potboiler.server.log import LOG_FORMAT, Blocked, Log, Promise
from potboiler.server.log_delivered import DeliveredBatch
from potboiler.server.log_layout import U64
from potboiler.server.storage import MemoryStore, Store
from potboiler.v1.entry_pb2 import Entry


def value(n: int | str) -> Value:
    v = Value()
    if isinstance(n, str):
        v.string_value = n
    else:
        v.number_value = n
    return v


def commit_local(log: Log, store: Store, items: Sequence[NewEntry]) -> list[Entry]:
    plan = log.begin()
    appended = log.plan_local(plan, items)
    log.finish(plan)
    store.write(plan.writes)
    log.apply(plan)
    return [a.entry() for a in appended]


def commit_remote(log: Log, store: Store, entries: Sequence[Entry]) -> list[Entry]:
    plan = log.begin()
    taken = log.plan_remote(plan, [copy(e) for e in entries])
    log.finish(plan)
    store.write(plan.writes)
    log.apply(plan)
    return taken


def copy(entry: Entry) -> Entry:
    out = Entry()
    out.CopyFrom(entry)
    return out


def delivered_ids(log: Log) -> list[str]:
    return [e.id for _, e in log.delivered(0, 10_000)]


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


def test_chain_numbers_and_links_entries(store: MemoryStore) -> None:
    log = Log(store)
    a, b, c = commit_local(log, store, [NewEntry(value(i).SerializeToString()) for i in range(3)])
    assert [e.seq for e in (a, b, c)] == [1, 2, 3]
    assert (a.prev, b.prev, c.prev) == ("", a.id, b.id)
    assert log.get(a.id).next == b.id
    assert log.get(c.id).next == ""
    assert all(e.owner == log.node_id for e in (a, b, c))
    assert (a.when.wall_ms, a.when.logical) < (b.when.wall_ms, b.when.logical)
    [head] = log.heads()
    assert (head.owner, head.first, head.head, head.seq) == (log.node_id, a.id, c.id, 3)
    assert log.vector() == {log.node_id: 3}


def test_a_batch_of_one_owner_is_one_delivery_record(store: MemoryStore) -> None:
    log = Log(store)
    [first] = commit_local(log, store, [NewEntry(value(0).SerializeToString())])
    entries = [
        first,
        *commit_local(log, store, [NewEntry(value(i).SerializeToString()) for i in range(1, 1000)]),
    ]
    records = list(store.scan(b"x", b"y"))
    assert [key for key, _ in records] == [b"x" + struct.pack(">Q", 1), b"x" + struct.pack(">Q", 2)]
    assert [len(v) for _, v in records] == [24, 28]  # a bare location; a location and a count
    for after in (0, 1, 2, 500, 998, 999, 1000, 5000):
        got = log.delivered(after, 3)
        assert [p for p, _ in got] == list(range(after + 1, min(after + 3, 1000) + 1))
        assert [e.id for _, e in got] == [e.id for e in entries[after : after + 3]]
    assert Log(store).position == 1000  # read back from the last run after a restart


def test_a_local_batch_stored_as_a_run_is_what_entry_by_entry_stores(store: MemoryStore) -> None:
    # Without dependencies, while nothing waits, a batch is stored as one stretch of the chain; with
    # one, entry by entry (through the causal path). Either way the same keys and values.
    log = Log(store)
    entries = commit_local(log, store, [NewEntry(value(i).SerializeToString()) for i in range(5)])
    waiting = commit_local(
        log,
        store,
        [
            NewEntry(value(5).SerializeToString()),
            NewEntry(value(6).SerializeToString(), (parse_uuid(entries[0].id),)),
        ],
    )
    for entry in [*entries, *waiting]:
        location = parse_uuid(entry.owner) + struct.pack(">Q", entry.seq)
        assert store.get(b"e" + parse_uuid(entry.id)) == location
        assert store.get(b"o" + location) == entry.SerializeToString()
        assert log.get(entry.id).data == entry.data
    batch = log.delivered_batch(0, 100)
    assert [e.id for _, e in batch.entries] == [e.id for e in [*entries, *waiting]]
    assert batch.blobs == [e.SerializeToString() for e in [*entries, *waiting]]


def test_get_rejects_bad_and_unknown_ids(store: MemoryStore) -> None:
    log = Log(store)
    with pytest.raises(InvalidArgument, match="not a UUID"):
        log.get("nope")
    with pytest.raises(NotFound):
        log.get("00000000-0000-0000-0000-000000000000")


def test_validation() -> None:
    with pytest.raises(InvalidArgument, match="needs data"):
        validate_new_entry(Value(), [])
    with pytest.raises(InvalidArgument, match="dependency 'x' is not a UUID"):
        validate_new_entry(value(1), ["x"])
    with pytest.raises(TooLarge):
        validate_new_entry(value("x" * (MAX_ENTRY_BYTES + 1)), [])


def test_a_dependency_named_twice_is_one_dependency() -> None:
    a, b = "01a22b6f-e1fd-7aeb-9abc-96e25c6f79a2", "01a22b6f-e1fd-7aeb-9abc-96e25c6f79a3"
    deps = validate_new_entry(value(1), [a.upper(), b, a, a]).dependencies
    assert deps == (bytes.fromhex(a.replace("-", "")), bytes.fromhex(b.replace("-", "")))


def test_entry_waits_for_missing_dependency_then_delivers_in_causal_order(store: MemoryStore) -> None:
    other = Log(MemoryStore())
    [dep] = commit_local(other, other._store, [NewEntry(value("dep").SerializeToString())])
    log = Log(store)
    dep_raw = validate_new_entry(value(0), [dep.id]).dependencies
    waiting, after = commit_local(
        log, store, [NewEntry(value(1).SerializeToString(), dep_raw), NewEntry(value(2).SerializeToString())]
    )
    assert log.pending == 2
    assert delivered_ids(log) == []
    assert log.get(waiting.id).id == waiting.id  # stored (acknowledged) though not delivered
    commit_remote(log, store, [dep])
    assert delivered_ids(log) == [dep.id, waiting.id, after.id]
    assert log.pending == 0
    assert [p for p, _ in log.delivered(0, 10)] == [1, 2, 3]


def test_own_blocked_names_the_first_own_entry_waiting_and_what_it_waits_for(store: MemoryStore) -> None:
    other = Log(MemoryStore())
    [dep] = commit_local(other, other._store, [NewEntry(value("dep").SerializeToString())])
    log = Log(store)
    commit_local(log, store, [NewEntry(value(i).SerializeToString()) for i in range(5)])
    assert not log.own_log_blocked() and log.own_blocked() is None
    [held, *_] = commit_local(log, store, [NewEntry(value(5).SerializeToString())])
    # Depends on `dep` (not here) and on an own entry (delivered): only `dep` holds it up.
    needs = validate_new_entry(value(0), [dep.id, held.id]).dependencies
    waiting, *_ = commit_local(
        log,
        store,
        [NewEntry(value("w").SerializeToString(), needs)]
        + [NewEntry(value(i).SerializeToString()) for i in range(3)],
    )
    commit_local(log, store, [NewEntry(value("later").SerializeToString())])
    assert log.own_log_blocked()
    assert log.own_blocked() == Blocked(waiting.id, 7, (dep.id,))
    assert Log(store).own_blocked() == Blocked(waiting.id, 7, (dep.id,))  # after a restart too
    commit_remote(log, store, [dep])
    assert not log.own_log_blocked() and log.own_blocked() is None


def test_own_entries_left_for_the_next_write_are_blocked_by_nothing_missing() -> None:
    """Once what they waited for is here, waiting entries are delivered a budget per write: own
    entries left for the next one still hold the log up, for a moment, waiting for nothing."""
    other = Log(MemoryStore())
    [dep] = commit_local(other, other._store, [NewEntry(value("dep").SerializeToString())])
    store = MemoryStore()
    log = Log(store, cascade_budget=1)
    [first, second, _] = commit_local(
        log,
        store,
        [
            NewEntry(value(0).SerializeToString(), (parse_uuid(dep.id),)),
            NewEntry(value(1).SerializeToString()),
            NewEntry(value(2).SerializeToString()),
        ],
    )
    commit_remote(log, store, [dep])
    assert delivered_ids(log) == [dep.id, first.id] and log.resuming
    blocked = log.own_blocked()
    assert blocked == Blocked(second.id, 2, ())
    assert "is among entries being delivered" in blocked.describe()
    while log.resuming:
        commit_local(log, store, [])
    assert log.own_blocked() is None and log.pending == 0


def test_an_append_unless_blocked_is_refused_behind_a_waiting_entry_and_plans_nothing(
    store: MemoryStore,
) -> None:
    log = Log(store)
    commit_local(log, store, [NewEntry(value(1).SerializeToString())])
    plan = log.begin()
    log.plan_local(
        plan, [NewEntry(value(2).SerializeToString())], unless_blocked=True
    )  # nothing waits: planned
    log.plan_local(plan, [NewEntry(value(3).SerializeToString(), (bytes(16),))])
    with pytest.raises(Unavailable, match="held up"):  # behind an entry of the same plan
        log.plan_local(plan, [NewEntry(value(4).SerializeToString())], unless_blocked=True)
    log.finish(plan)
    store.write(plan.writes)
    log.apply(plan)
    assert log.vector() == {log.node_id: 3}
    blocked = log.own_blocked()
    assert blocked is not None and blocked.seq == 3
    plan = log.begin()
    with pytest.raises(
        Unavailable, match=f"its entry {blocked.entry} \\(seq 3\\) depends on {uuid_str(bytes(16))}"
    ):
        log.plan_local(plan, [NewEntry(value(5).SerializeToString())], unless_blocked=True)
    assert plan.writes == [] and plan.stored == 0


def test_dependency_inside_the_same_batch(store: MemoryStore) -> None:
    log = Log(store)
    [a] = commit_local(log, store, [NewEntry(value(1).SerializeToString())])
    commit_local(
        log,
        store,
        [NewEntry(value(2).SerializeToString(), (bytes(16),)), NewEntry(value(3).SerializeToString())],
    )
    assert delivered_ids(log) == [a.id]
    assert log.pending == 2


def test_remote_entries_are_taken_once_and_in_chain_order(store: MemoryStore) -> None:
    ahead = 5 + MAX_DRIFT_MS // 2  # the origin's clock runs ahead, within the drift bound
    origin = Log(MemoryStore(), HybridClock(lambda: ahead))
    entries = commit_local(origin, origin._store, [NewEntry(value(i).SerializeToString()) for i in range(4)])
    log = Log(store, HybridClock(lambda: 5))
    assert commit_remote(log, store, [entries[1]]) == []  # gap: skipped
    assert [e.seq for e in commit_remote(log, store, entries[:2])] == [1, 2]
    assert [e.seq for e in commit_remote(log, store, entries)] == [3, 4]  # duplicates skipped
    assert commit_remote(log, store, entries) == []
    assert delivered_ids(log) == [e.id for e in entries]
    assert log.vector() == {origin.node_id: 4}
    assert log.clock.now().wall_ms == ahead  # observed the remote stamps


def test_a_peers_clock_promise_moves_the_clock_on_within_the_drift_bound(store: MemoryStore) -> None:
    """An idle node behind its peers (no entry of theirs to observe) stamps after their promises."""
    log = Log(store, HybridClock(lambda: 5))
    log.note_promise(str(uuid.uuid4()), Promise(Stamp(5 + MAX_DRIFT_MS // 2, 7), 0))
    assert log.clock.now() == Stamp(5 + MAX_DRIFT_MS // 2, 8)
    log.note_promise(str(uuid.uuid4()), Promise(Stamp(5 + 2 * MAX_DRIFT_MS, 0), 0))
    assert log.clock.now().wall_ms == 5 + MAX_DRIFT_MS  # a clock far ahead pulls it only so far


def test_dependency_chains_resolve_transitively(store: MemoryStore) -> None:
    a_log, b_log = Log(MemoryStore()), Log(MemoryStore())
    [a1] = commit_local(a_log, a_log._store, [NewEntry(value("a1").SerializeToString())])
    commit_remote(b_log, b_log._store, [a1])
    [b1] = commit_local(
        b_log,
        b_log._store,
        [NewEntry(value("b1").SerializeToString(), (validate_new_entry(value(0), [a1.id]).dependencies))],
    )
    log = Log(store)
    commit_remote(log, store, [b1])
    assert log.pending == 1
    commit_remote(log, store, [a1])
    assert delivered_ids(log) == [a1.id, b1.id]


def test_restart_keeps_identity_heads_pending_and_clock(store: MemoryStore) -> None:
    log = Log(store, HybridClock(lambda: 1000))
    [a] = commit_local(log, store, [NewEntry(value(1).SerializeToString(), (bytes(16),))])
    again = Log(store, HybridClock(lambda: 1))
    assert again.node_id == log.node_id
    assert again.vector() == log.vector()
    assert again.pending == 1
    assert again.position == 0
    [b] = commit_local(again, store, [NewEntry(value(2).SerializeToString())])
    assert b.prev == a.id
    assert (b.when.wall_ms, b.when.logical) > (a.when.wall_ms, a.when.logical)


def test_the_store_marks_its_format_and_a_newer_one_is_refused(store: MemoryStore) -> None:
    """A newer layout would be misread: refused, saying so. A store from before the mark is in
    format 1, and gets the mark."""
    log = Log(store)
    assert store.get(b"mformat") == U64.pack(LOG_FORMAT)
    store.write([(b"mformat", None)])
    assert Log(store).node_id == log.node_id and store.get(b"mformat") == U64.pack(LOG_FORMAT)
    store.write([(b"mformat", U64.pack(LOG_FORMAT + 1))])
    with pytest.raises(OSError, match=f"written in format {LOG_FORMAT + 1}, by a newer Potboiler"):
        Log(store)


def test_after_a_restart_new_stamps_exceed_those_received_from_peers(store: MemoryStore) -> None:
    """The clock takes in again every owner's newest stamp held, as it did when they arrived: a
    write after the restart still wins over a peer's write this node has seen (LWW decides by
    stamp), also when the peer's clock runs ahead; beyond the drift bound, only up to it."""
    ahead = 5 + MAX_DRIFT_MS // 2
    origin = Log(MemoryStore(), HybridClock(lambda: ahead))
    [remote] = commit_local(origin, origin._store, [NewEntry(value("theirs").SerializeToString())])
    log = Log(store, HybridClock(lambda: 5))
    commit_local(log, store, [NewEntry(value("mine, before").SerializeToString())])
    commit_remote(log, store, [remote])
    again = Log(store, HybridClock(lambda: 5))
    [mine] = commit_local(again, store, [NewEntry(value("mine, after").SerializeToString())])
    assert (mine.when.wall_ms, mine.when.logical) > (remote.when.wall_ms, remote.when.logical)
    far = Log(MemoryStore(), HybridClock(lambda: 10 * MAX_DRIFT_MS))
    [beyond] = commit_local(far, far._store, [NewEntry(value("far ahead").SerializeToString())])
    commit_remote(again, store, [beyond])
    restarted = Log(store, HybridClock(lambda: 5))
    assert restarted.clock.now().wall_ms == 5 + MAX_DRIFT_MS


def test_remote_entry_with_wrong_prev_is_not_taken(store: MemoryStore) -> None:
    origin = Log(MemoryStore())
    [a, b] = commit_local(
        origin,
        origin._store,
        [NewEntry(value(1).SerializeToString()), NewEntry(value(2).SerializeToString())],
    )
    log = Log(store)
    commit_remote(log, store, [a])
    forged = copy(b)
    forged.prev = "00000000-0000-0000-0000-000000000000"
    assert commit_remote(log, store, [forged]) == []
    assert log.vector() == {a.owner: 1} and log.forks() == {a.owner: 2}
    assert [e.id for e in commit_remote(log, store, [b])] == [b.id]  # the entry that follows a


def test_a_peers_word_that_this_nodes_log_forked_is_checked_then_kept(store: MemoryStore) -> None:
    log = Log(store)
    [_, b, _] = commit_local(log, store, [NewEntry(value(i).SerializeToString()) for i in range(3)])
    log.note_own_fork(3, b.id)  # the peer holds this node's very entry before seq 3: no fork there
    log.note_own_fork(9, "01a22b6f-e1fd-7aeb-9abc-96e25c6f79a2")  # nothing here to compare with
    assert log.forks() == {} and commit_local(log, store, [NewEntry(value(3).SerializeToString())])
    log.note_own_fork(2, "01a22b6f-e1fd-7aeb-9abc-96e25c6f79a2")  # another entry than a at seq 1
    assert log.forks() == {log.node_id: 2}
    with pytest.raises(Unavailable, match="own log has forked at seq 2"):
        log.plan_local(log.begin(), [NewEntry(value(4).SerializeToString())])
    assert Log(store).fork_of(log.node_id) == (2, "01a22b6f-e1fd-7aeb-9abc-96e25c6f79a2")


@pytest.mark.parametrize("with_blobs", [False, True], ids=["entries", "with their bytes"])
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("upper-case id", "canonical lower-case"),
        ("upper-case owner", "canonical lower-case"),
        ("upper-case dependency", "canonical lower-case"),
        ("one id twice", "comes twice"),
    ],
)
def test_a_peers_entry_in_a_form_no_node_writes_is_refused(
    store: MemoryStore, with_blobs: bool, damage: str, message: str
) -> None:
    """Entries are stored as they came: an id in another letter case would be a second text for one
    id (two chains for one owner), and one id on two entries would index one of them only."""
    origin = Log(MemoryStore())
    a, b = (
        copy(e)
        for e in commit_local(
            origin,
            origin._store,
            [NewEntry(value(1).SerializeToString()), NewEntry(value(2).SerializeToString())],
        )
    )
    if damage == "upper-case id":
        b.id = b.id.upper()
    elif damage == "upper-case owner":
        a.owner = b.owner = a.owner.upper()
    elif damage == "upper-case dependency":
        b.dependencies.append(a.id.upper())
    else:
        b.id = a.id
    log = Log(store)
    plan = log.begin()
    with pytest.raises(InvalidArgument, match=message):
        log.plan_remote(plan, [a, b], [e.SerializeToString() for e in (a, b)] if with_blobs else None)


def test_an_entry_refused_mid_batch_leaves_the_head_at_the_last_entry_taken(store: MemoryStore) -> None:
    origin = Log(MemoryStore())
    [a, b, c] = commit_local(
        origin, origin._store, [NewEntry(value(i).SerializeToString()) for i in range(3)]
    )
    log = Log(store)
    bad = copy(b)
    bad.dependencies.append("not-a-uuid")
    plan = log.begin()
    with pytest.raises(InvalidArgument, match="dependency"):
        log.plan_remote(plan, [copy(a), bad])
    # As the appender does: the refused job fails, the rest of the plan (here: a) is committed.
    log.finish(plan)
    store.write(plan.writes)
    log.apply(plan)
    assert log.vector() == {a.owner: 1}
    assert [e.id for e in commit_remote(log, store, [b, c])] == [b.id, c.id]
    assert delivered_ids(log) == [a.id, b.id, c.id]


def test_nesting_counts_arrays_and_objects_even_when_the_innermost_is_empty() -> None:
    def nested(depth: int, innermost: str) -> Value:
        v = Value()
        json_format.Parse("[" * depth + innermost + "]" * depth, v)
        return v

    for innermost in ("", "1", "{}"):
        depth = MAX_DEPTH - (1 if innermost == "{}" else 0)
        validate_new_entry(nested(depth, innermost), [])
        with pytest.raises(InvalidArgument, match="nested deeper"):
            validate_new_entry(nested(depth + 1, innermost), [])


def _json_nesting(x: object) -> int:
    if isinstance(x, dict):
        return 1 + max(map(_json_nesting, x.values()), default=0)
    if isinstance(x, list):
        return 1 + max(map(_json_nesting, x), default=0)
    return 0


#: JSON around the depth limit: chains of arrays and objects, with scalars (some of whose bytes are
#: the struct and list tags, `*` and `2`) beside them.
_deep_json = st.recursive(
    st.none() | st.booleans() | st.sampled_from(["*2*2", "", "x", 42.0, 2.5]),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.sampled_from(["*", "2", "k"]), inner, max_size=2)
    ),
    max_leaves=40,
)


#: Both ways an entry's data is checked: as a Value, and serialized as a client sends it.
VALIDATORS: list[Callable[[Value, Sequence[str]], NewEntry]] = [
    validate_new_entry,
    lambda value, dependencies: validate_serialized_entry(value.SerializeToString(), dependencies),
]


@given(
    st.integers(min_value=MAX_DEPTH - 3, max_value=MAX_DEPTH + 2),
    st.lists(st.booleans(), min_size=MAX_DEPTH + 2, max_size=MAX_DEPTH + 2),
    _deep_json,
)
def test_data_is_refused_exactly_when_it_nests_deeper_than_the_limit(
    depth: int, objects: list[bool], filler: object
) -> None:
    data: object = filler
    for is_object in objects[:depth]:
        data = {"*": data, "2": "2*"} if is_object else [data, "**22"]
    value = Value()
    json_format.ParseDict(data, value)
    for validate in VALIDATORS:
        if _json_nesting(data) > MAX_DEPTH:
            with pytest.raises(InvalidArgument, match="nested deeper"):
                validate(value, [])
        else:
            validate(value, [])


def test_uuid_helpers_agree_with_the_uuid_module() -> None:
    import uuid

    from potboiler.server.ids import new_uuid, parse_uuid, uuid_str

    for _ in range(100):
        raw, text = new_uuid()
        u = uuid.UUID(text)
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert u.bytes == raw == parse_uuid(text) == parse_uuid(text.upper())
        assert uuid_str(raw) == str(u)
    with pytest.raises(InvalidArgument):
        parse_uuid("0" * 32)
    with pytest.raises(InvalidArgument):
        parse_uuid("00000000-0000-0000-0000-00000000000\n")


def test_entry_delivered_in_the_batch_that_stored_it_is_not_left_waiting(store: MemoryStore) -> None:
    other = Log(MemoryStore())
    [dep] = commit_local(other, other._store, [NewEntry(value("dep").SerializeToString())])
    log = Log(store)
    [waiting] = commit_local(log, store, [NewEntry(value(1).SerializeToString(), (parse(dep.id),))])
    assert log.pending == 1
    # the dependency arrives together with an entry that needs the waiting one: one batch
    commit_remote(log, store, [dep])
    assert log.pending == 0
    again = Log(store)  # a restart reads the marks from the store
    assert again.pending == 0
    assert [e.id for _, e in again.delivered(0, 10)] == [dep.id, waiting.id]


def test_waiting_and_delivered_within_one_batch_leaves_no_mark(store: MemoryStore) -> None:
    origin = Log(MemoryStore())
    [dep] = commit_local(origin, origin._store, [NewEntry(value("dep").SerializeToString())])
    other = Log(MemoryStore())
    commit_remote(other, other._store, [dep])
    [needs] = commit_local(
        other, other._store, [NewEntry(value("needs").SerializeToString(), (parse(dep.id),))]
    )
    log = Log(store)
    commit_remote(log, store, [needs, dep])  # `needs` waits, then `dep` delivers it: same batch
    assert log.pending == 0
    assert Log(store).pending == 0


def parse(text: str) -> bytes:
    from potboiler.server.ids import parse_uuid

    return parse_uuid(text)


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_every_finite_number_is_accepted(number: float) -> None:
    value = Value()
    value.list_value.values.add().number_value = number
    assert Value.FromString(validate_new_entry(value, ()).data) == value


@given(
    st.integers(0, (1 << 52) - 1).map(lambda fraction: (0x7FF << 52) | fraction),
    st.booleans(),
    st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=3),
)
def test_every_non_finite_number_is_refused_wherever_it_is(
    bits: int, negative: bool, others: list[float]
) -> None:
    # Any NaN payload and either infinity, among finite numbers, inside a list inside an object.
    [number] = struct.unpack("<d", struct.pack("<Q", bits | (negative << 63)))
    value = Value()
    items = value.struct_value.fields["items"].list_value
    for other in others:
        items.values.add().number_value = other
    items.values.add().number_value = number
    for validate in VALIDATORS:
        with pytest.raises(InvalidArgument, match="NaN or infinite"):
            validate(value, ())


def test_a_nested_value_with_no_kind_is_refused() -> None:
    """REST would show the member dropped, a webhook null, a proto JSON reader an error."""
    member, item = Value(), Value()
    member.struct_value.fields["a"].CopyFrom(Value())
    item.struct_value.fields["a"].list_value.values.add()
    for value, validate in itertools.product((member, item), VALIDATORS):
        with pytest.raises(InvalidArgument, match="no kind set"):
            validate(value, ())
    empty = Value()  # empty strings, lists and objects look alike in bytes, and are fine
    empty.struct_value.fields["a"].list_value.values.add().string_value = ""
    empty.struct_value.fields["b"].list_value.SetInParent()
    empty.struct_value.fields["c"].struct_value.SetInParent()
    for validate in VALIDATORS:
        assert Value.FromString(validate(empty, ()).data) == empty


def test_data_with_no_kind_is_refused_whether_parsed_or_serialized() -> None:
    unknown = b"\xf8\x07\x01"  # field 127 (unknown to Value), first: a kind must still be found
    for data in (b"", unknown):
        with pytest.raises(InvalidArgument, match="needs data"):
            validate_serialized_entry(data, ())
        with pytest.raises(InvalidArgument, match="needs data"):
            validate_new_entry(Value.FromString(data), ())
    number = unknown + Value(number_value=1).SerializeToString()
    assert validate_serialized_entry(number, ()).data == number
    with pytest.raises(InvalidArgument, match="needs data"):
        validate_new_entry(None, ())


def test_a_batch_is_refused_whole_naming_its_first_bad_entry() -> None:
    good = Value(string_value="x").SerializeToString()
    assert [e.data for e in validate_serialized_batch([(good, ()), (good, ())])] == [good, good]
    with pytest.raises(InvalidArgument, match="entry 1: an entry needs data"):
        validate_serialized_batch([(good, ()), (b"", ()), (b"", ())])
    with pytest.raises(InvalidArgument, match="at least one entry"):
        validate_serialized_batch([])
    with pytest.raises(TooLarge, match="at most 10000 entries"):
        validate_serialized_batch([(good, ())] * 10_001)


def test_a_finite_number_that_looks_non_finite_in_its_bytes_is_accepted() -> None:
    [number] = struct.unpack("<d", b"\x00\x00\x00\xf5\xff\x00\x00\x40")  # about 2.0, bytes F5 FF inside
    assert math.isfinite(number)
    assert Value.FromString(validate_new_entry(Value(number_value=number), ()).data).number_value == number


@given(st.lists(st.sampled_from([b"", b"ab", b"a", b"b", b"xabx", b"xx"]), max_size=8))
def test_marked_keeps_exactly_the_entries_whose_bytes_hold_the_mark(blobs: list[bytes]) -> None:
    # Marks split across neighbouring blobs ("a" then "b") must not count.
    entries = [Entry(id=str(i)) for i in range(len(blobs))]
    batch = DeliveredBatch(range(1, len(blobs) + 1), blobs, entries)
    kept = batch.marked(b"ab")
    expected = [(i + 1, e) for i, (e, blob) in enumerate(zip(entries, blobs, strict=True)) if b"ab" in blob]
    assert kept.entries == expected
    assert kept.blobs == [blob for blob in blobs if b"ab" in blob]
