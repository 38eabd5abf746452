"""Property tests of the pure KV CRDTs (potboiler.kv.crdts).

The core harness simulates a few nodes that prepare ops against their own local state, append them as
events (owner, seq with gaps as if other keys were written too, HLC stamp, unique tag) and exchange them in
causal order.  The events are then replayed on fresh replicas in other random causal orders, with duplicate
deliveries and state merges mixed in, and every replica must end with the same state and the value an
independent specification (computed from the causal history, not from tags) predicts.
"""

from __future__ import annotations

import copy
import json
import random
import re
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from potboiler.kv.crdts import (
    JSON,
    MAX_COUNTER_INT,
    CrdtType,
    EventContext,
    InvalidOperation,
    Stamp,
    apply,
    apply_change,
    canonical_json,
    causal_dependencies,
    merge,
    prepare,
    valid_ops,
    value,
)

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

NS = uuid.UUID("6f0c2c1e-7d5a-4a7e-9d0e-3b1f00000000")
OWNERS = [str(uuid.uuid5(NS, f"node{i}")) for i in range(3)]


# ----------------------------------------------------------------------------------------------------------
# strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4)
)
json_values: st.SearchStrategy[JSON] = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=6,
)
# Small domains so that ops of different nodes collide on the same elements.  1, 1.0 and true are
# different items (compared by canonical JSON).
items = st.sampled_from(["a", "b", 1, 1.0, True, None, [1, "x"], {"x": 1, "y": [2]}])
keys = st.sampled_from(["k", "j", ""])
metadata = st.sampled_from([None, 1, "m", {"n": [2]}]) | json_values
mv_values = st.sampled_from(["v", "w", 0, None, {"a": 1}]) | json_values
amounts = st.integers(0, 1000) | st.sampled_from([0.5, 0.25, 1.75])


def add_change() -> st.SearchStrategy[tuple[str, JSON]]:
    with_meta = st.builds(lambda i, k, m: {"item": i, "key": k, "metadata": m}, items, keys, metadata)
    without_meta = st.builds(lambda i, k: {"item": i, "key": k}, items, keys)
    return st.tuples(st.just("add"), with_meta | without_meta)


def op_strategy(crdt: CrdtType) -> st.SearchStrategy[tuple[str, JSON]]:
    """Valid (op, change) pairs for a table of type ``crdt``."""
    if crdt is CrdtType.LWW:
        return st.tuples(st.just("set"), json_values)
    if crdt is CrdtType.ORSET:
        remove = st.tuples(st.just("remove"), st.builds(lambda i, k: {"item": i, "key": k}, items, keys))
        return st.one_of(st.just(("create", {})), add_change(), add_change(), remove, remove)
    if crdt is CrdtType.GSET:
        return st.one_of(st.just(("create", {})), add_change())
    if crdt is CrdtType.PNCOUNTER:
        return st.tuples(st.sampled_from(["increment", "decrement"]), amounts)
    return st.tuples(st.just("set"), mv_values)


@dataclass(frozen=True)
class Write:
    node: int
    wall: int  # the node's physical clock reading: small, so stamps tie and clocks go backwards
    gap: int  # events the node wrote to other keys since its previous event here
    op: str
    change: JSON


@dataclass(frozen=True)
class Receive:
    node: int
    choice: int  # which of the events deliverable to that node


Action = Write | Receive


def actions(crdt: CrdtType, max_size: int = 30) -> st.SearchStrategy[list[Action]]:
    write = st.builds(
        lambda n, w, g, oc: Write(n, w, g, oc[0], oc[1]),
        st.integers(0, len(OWNERS) - 1),
        st.integers(0, 6),
        st.integers(0, 3),
        op_strategy(crdt),
    )
    receive = st.builds(Receive, st.integers(0, len(OWNERS) - 1), st.integers(0, 50))
    return st.lists(write | receive, min_size=1, max_size=max_size)


# ----------------------------------------------------------------------------------------------------------
# the simulation


@dataclass(frozen=True)
class Event:
    index: int  # creation order: a valid causal order
    op: str
    change: JSON
    payload: JSON
    ctx: EventContext
    past: frozenset[int]  # the events its author had applied when it prepared it


def json_roundtrip(x: JSON | None) -> JSON | None:
    result: JSON | None = json.loads(json.dumps(x, allow_nan=False))
    return result


def checked_apply(crdt: CrdtType, state: JSON | None, ev: Event) -> JSON | None:
    """apply(), also checking it mutates nothing and that its result is plain JSON (no state only
    for an OR-Set remove on a key without one: it takes nothing away)."""
    state_before, payload_before = copy.deepcopy(state), copy.deepcopy(ev.payload)
    result = apply(crdt, state, ev.payload, ev.ctx)
    assert state == state_before and ev.payload == payload_before, "apply mutated its arguments"
    assert result is not None or (state is None and ev.op == "remove")
    assert json_roundtrip(result) == result
    return result


@dataclass
class Node:
    owner: str
    state: JSON | None = None
    seq: int = 0
    hlc: tuple[int, int] = (0, 0)
    applied: set[int] = field(default_factory=set)

    def deliver(self, crdt: CrdtType, ev: Event) -> None:
        self.state = checked_apply(crdt, self.state, ev)
        self.applied.add(ev.index)
        self.hlc = max(self.hlc, (ev.ctx.stamp.wall_ms, ev.ctx.stamp.logical))

    def deliverable(self, events: Sequence[Event]) -> list[Event]:
        return [e for e in events if e.index not in self.applied and e.past <= self.applied]

    def write(self, crdt: CrdtType, w: Write, events: list[Event]) -> None:
        payload = prepare(crdt, self.state, w.op, w.change)
        assert json_roundtrip(payload) == payload
        self.hlc = (w.wall, 0) if w.wall > self.hlc[0] else (self.hlc[0], self.hlc[1] + 1)
        self.seq += 1 + w.gap
        tag = str(uuid.uuid5(NS, f"{self.owner}/{self.seq}"))
        ctx = EventContext(tag, self.owner, self.seq, Stamp(self.hlc[0], self.hlc[1], self.owner))
        ev = Event(len(events), w.op, w.change, payload, ctx, frozenset(self.applied))
        events.append(ev)
        self.deliver(crdt, ev)  # read-your-writes: the author applies its own event at once


@dataclass(frozen=True)
class Snapshot:
    applied: frozenset[int]
    state: JSON | None


@dataclass
class History:
    events: list[Event]
    nodes: list[Node]
    snapshots: list[Snapshot]


def run_history(crdt: CrdtType, acts: Sequence[Action]) -> History:
    nodes = [Node(owner) for owner in OWNERS]
    events: list[Event] = []
    snapshots = [Snapshot(frozenset(), None)]
    for act in acts:
        node = nodes[act.node]
        if isinstance(act, Write):
            node.write(crdt, act, events)
        else:
            ready = node.deliverable(events)
            if not ready:
                continue
            node.deliver(crdt, ready[act.choice % len(ready)])
        snapshots.append(Snapshot(frozenset(node.applied), node.state))
    return History(events, nodes, snapshots)


def replay(
    crdt: CrdtType,
    events: Sequence[Event],
    rng: random.Random,
    start: Snapshot = Snapshot(frozenset(), None),
    duplicates: float = 0.3,
) -> JSON | None:
    """Deliver ``events`` (those not in ``start``) in a random causal order, redelivering some events."""
    state, done = start.state, set(start.applied)
    delivered = [e for e in events if e.index in done]
    pending = [e for e in events if e.index not in done]
    while pending:
        ready = [e for e in pending if e.past <= done]
        assert ready, "the history is not causally closed"
        ev = rng.choice(ready)
        pending.remove(ev)
        state = checked_apply(crdt, state, ev)
        done.add(ev.index)
        delivered.append(ev)
        while rng.random() < duplicates:
            dup = rng.choice(delivered)
            again = checked_apply(crdt, state, dup)
            assert again == state, f"redelivering event {dup.index} changed the state"
    return state


def causal_closure_replay(crdt: CrdtType, events: Sequence[Event], applied: frozenset[int]) -> JSON | None:
    state: JSON | None = None
    for ev in events:  # creation order is a causal order
        if ev.index in applied:
            state = apply(crdt, state, ev.payload, ev.ctx)
    return state


# ----------------------------------------------------------------------------------------------------------
# an independent specification of the final value, from the causal history


def rank(ev: Event) -> tuple[Stamp, str]:
    return (ev.ctx.stamp, ev.ctx.tag)


def element_of(change: JSON) -> str:
    assert isinstance(change, dict)
    key = change["key"]
    assert isinstance(key, str)
    return canonical_json([key, change["item"]])


def element_list(winners: dict[str, Event]) -> list[JSON]:
    out: list[tuple[tuple[str, str], JSON]] = []
    for ev in winners.values():
        assert isinstance(ev.change, dict)
        item, key = ev.change["item"], ev.change["key"]
        assert isinstance(key, str)
        out.append(
            ((key, canonical_json(item)), {"item": item, "key": key, "metadata": ev.change.get("metadata")})
        )
    return [entry for _, entry in sorted(out, key=lambda pair: pair[0])]


def expected_value(crdt: CrdtType, events: Sequence[Event]) -> JSON:
    if crdt is CrdtType.LWW:
        return max(events, key=rank).change
    if crdt is CrdtType.PNCOUNTER:
        total: int | float = 0
        for e in events:
            assert isinstance(e.change, int | float)
            total += e.change if e.op == "increment" else -e.change
        return total
    if crdt is CrdtType.MVREGISTER:
        # the writes no other write causally follows, newest first, equal values once
        live = [e for e in events if not any(e.index in other.past for other in events)]
        out: list[JSON] = []
        for e in sorted(live, key=rank, reverse=True):
            if canonical_json(e.change) not in {canonical_json(v) for v in out}:
                out.append(e.change)
        return out
    adds = [e for e in events if e.op == "add"]
    if crdt is CrdtType.ORSET:
        # add-wins: an add survives unless a remove of its element had seen it
        removes = [e for e in events if e.op == "remove"]
        adds = [
            a
            for a in adds
            if not any(
                r.index > a.index and a.index in r.past and element_of(r.change) == element_of(a.change)
                for r in removes
            )
        ]
    winners: dict[str, Event] = {}
    for a in adds:
        eid = element_of(a.change)
        if eid not in winners or rank(a) > rank(winners[eid]):
            winners[eid] = a
    return element_list(winners)


def same_number(a: JSON, b: JSON) -> bool:
    return a == b and type(a) is type(b)


# ----------------------------------------------------------------------------------------------------------
# convergence


@pytest.mark.parametrize("crdt", list(CrdtType), ids=lambda c: c.value)
@PROPERTY
@given(data=st.data())
def test_replicas_converge_on_the_specified_value(crdt: CrdtType, data: st.DataObject) -> None:
    history = run_history(crdt, data.draw(actions(crdt), label="actions"))
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    events = history.events
    finals: list[JSON | None] = [replay(crdt, events, rng) for _ in range(3)]
    for node in history.nodes:  # the simulated nodes catch up with whatever they missed
        finals.append(replay(crdt, events, rng, Snapshot(frozenset(node.applied), node.state)))
    finals.append(causal_closure_replay(crdt, events, frozenset(e.index for e in events)))
    assert all(f == finals[0] for f in finals), "replicas diverged"
    assert all(canonical_json(f) == canonical_json(finals[0]) for f in finals), "state not canonical"
    # A key exists (GET answers it, else 404) once an event made it: any but an OR-Set remove, which
    # only takes away adds (of a key without a state, none).
    assert (finals[0] is None) == all(e.op == "remove" for e in events)
    if not events:
        return
    values = [value(crdt, f) for f in finals]
    assert all(canonical_json(v) == canonical_json(values[0]) for v in values)
    expected = expected_value(crdt, events)
    assert values[0] == expected
    if crdt is CrdtType.PNCOUNTER:
        assert same_number(values[0], expected), "int contributions must sum to an exact int"


# ----------------------------------------------------------------------------------------------------------
# merge


@pytest.mark.parametrize("crdt", list(CrdtType), ids=lambda c: c.value)
@PROPERTY
@given(data=st.data())
def test_merge_is_a_join_that_agrees_with_applying_events(crdt: CrdtType, data: st.DataObject) -> None:
    history = run_history(crdt, data.draw(actions(crdt), label="actions"))
    events, snaps = history.events, st.sampled_from(history.snapshots)
    a, b, c = data.draw(snaps, label="a"), data.draw(snaps, label="b"), data.draw(snaps, label="c")
    copies = copy.deepcopy((a.state, b.state, c.state))

    ab = merge(crdt, a.state, b.state)
    # commutative, associative, idempotent
    assert ab == merge(crdt, b.state, a.state)
    assert merge(crdt, ab, c.state) == merge(crdt, a.state, merge(crdt, b.state, c.state))
    assert merge(crdt, a.state, a.state) == a.state
    assert merge(crdt, ab, b.state) == ab
    assert merge(crdt, a.state, None) == a.state == merge(crdt, None, a.state)
    assert (a.state, b.state, c.state) == copies, "merge mutated its arguments"
    assert json_roundtrip(ab) == ab

    # merging states == applying the union of their (causally closed) event sets
    union = a.applied | b.applied
    assert ab == causal_closure_replay(crdt, events, union)
    # ...so redelivering any of those events changes nothing, and the rest completes it
    for ev in events:
        if ev.index in union:
            assert apply(crdt, ab, ev.payload, ev.ctx) == ab
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    full = causal_closure_replay(crdt, events, frozenset(e.index for e in events))
    assert replay(crdt, events, rng, Snapshot(union, ab)) == full


@pytest.mark.parametrize("crdt", list(CrdtType), ids=lambda c: c.value)
@PROPERTY
@given(data=st.data())
def test_anti_entropy_by_merge_mixed_with_delivery_converges(crdt: CrdtType, data: st.DataObject) -> None:
    """A replica that sometimes merges a peer's state instead of receiving events still converges."""
    history = run_history(crdt, data.draw(actions(crdt), label="actions"))
    events = history.events
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    state: JSON | None = None
    done: set[int] = set()
    while len(done) < len(events):
        if rng.random() < 0.3:
            peer = rng.choice(history.snapshots)
            state, done = merge(crdt, state, peer.state), done | peer.applied
            continue
        ready = [e for e in events if e.index not in done and e.past <= done]
        ev = rng.choice(ready)
        state = checked_apply(crdt, state, ev)
        done.add(ev.index)
    assert state == causal_closure_replay(crdt, events, frozenset(done))


# ----------------------------------------------------------------------------------------------------------
# writes made where the table's type was not known


def prepared_then_applied(
    crdt: CrdtType, state: JSON | None, op: str, change: JSON, observed: Sequence[str], ctx: EventContext
) -> JSON:
    """What apply_change stands for: the change prepared against no state, given the observed
    context as the tags it takes away or supersedes, then applied."""
    payload = prepare(crdt, None, op, change)
    assert isinstance(payload, dict)
    tags: list[JSON] = [*sorted(observed)]
    for name in ("tags", "supersedes"):
        if name in payload:
            payload[name] = tags
    return apply(crdt, state, payload, ctx)


def outcome(f: Any) -> Any:
    try:
        return f()
    except InvalidOperation as exc:
        return InvalidOperation, str(exc)


any_op = st.sampled_from(sorted({op for c in CrdtType for op in valid_ops(c)})) | st.text(max_size=6)


@pytest.mark.parametrize("crdt", list(CrdtType), ids=lambda c: c.value)
@PROPERTY
@given(data=st.data())
def test_apply_change_is_apply_of_the_change_prepared_against_no_state(
    crdt: CrdtType, data: st.DataObject
) -> None:
    """Every node applies a write made where its table was not known with apply_change, on states
    of every kind, with ops and changes of any type (most refused) and any observed context."""
    history = run_history(crdt, data.draw(actions(crdt, max_size=15), label="actions"))
    state = data.draw(st.sampled_from(history.snapshots), label="snapshot").state
    tags = [*sorted({e.ctx.tag for e in history.events}), "elsewhere"]
    observed = data.draw(st.lists(st.sampled_from(tags), max_size=3, unique=True), label="observed")
    op, change = data.draw(
        st.one_of(*(op_strategy(c) for c in CrdtType), st.tuples(any_op, json_values)), label="write"
    )
    owner = data.draw(st.sampled_from(OWNERS), label="owner")
    seq, wall = data.draw(st.integers(1, 40), label="seq"), data.draw(st.integers(0, 8), label="wall")
    c = ctx(owner, seq, wall)
    before = copy.deepcopy((state, change, observed))
    got = outcome(lambda: apply_change(crdt, state, op, change, observed, c))
    assert (state, change, observed) == before, "apply_change mutated its arguments"
    assert got == outcome(lambda: prepared_then_applied(crdt, state, op, change, observed, c))


# ----------------------------------------------------------------------------------------------------------
# scenarios

A, B, C = OWNERS


def ctx(owner: str, seq: int, wall: int, logical: int = 0) -> EventContext:
    return EventContext(str(uuid.uuid5(NS, f"{owner}/{seq}")), owner, seq, Stamp(wall, logical, owner))


def both_orders(crdt: CrdtType, base: JSON | None, *steps: tuple[JSON, EventContext]) -> list[JSON | None]:
    """States after applying concurrent ``steps`` to ``base`` in every order (here: forward and reverse)."""
    results: list[JSON | None] = []
    for order in (steps, tuple(reversed(steps))):
        state = base
        for payload, c in order:
            state = apply(crdt, state, payload, c)
        results.append(state)
    return results


@pytest.mark.parametrize(
    ("stamp_a", "stamp_b", "winner"),
    [
        ((10, 0), (11, 0), "b"),
        ((12, 0), (11, 5), "a"),
        ((11, 3), (11, 2), "a"),
        ((11, 2), (11, 2), "a" if A > B else "b"),  # equal clocks: the owner id breaks the tie
    ],
)
def test_lww_concurrent_sets_highest_stamp_wins(
    stamp_a: tuple[int, int], stamp_b: tuple[int, int], winner: str
) -> None:
    crdt = CrdtType.LWW
    pa, pb = prepare(crdt, None, "set", {"v": "a"}), prepare(crdt, None, "set", {"v": "b"})
    states = both_orders(crdt, None, (pa, ctx(A, 1, *stamp_a)), (pb, ctx(B, 1, *stamp_b)))
    assert states[0] == states[1]
    assert value(crdt, states[0]) == {"v": winner}


def test_lww_later_write_overwrites_and_duplicates_do_not_resurrect() -> None:
    crdt = CrdtType.LWW
    s1 = apply(crdt, None, prepare(crdt, None, "set", 1), c1 := ctx(A, 1, 5))
    s2 = apply(crdt, s1, prepare(crdt, s1, "set", [2]), ctx(A, 2, 5, 1))
    assert value(crdt, s2) == [2]
    assert apply(crdt, s2, {"op": "set", "value": 1}, c1) == s2


def test_orset_concurrent_add_and_remove_add_wins() -> None:
    crdt = CrdtType.ORSET
    add = prepare(crdt, None, "add", {"item": "x", "key": "k", "metadata": "m1"})
    s = apply(crdt, None, add, ctx(A, 1, 1))  # both A and B have seen this add
    remove = prepare(crdt, s, "remove", {"item": "x", "key": "k"})  # on B
    readd = prepare(crdt, s, "add", {"item": "x", "key": "k", "metadata": "m2"})  # on A, concurrently
    assert isinstance(remove, dict) and isinstance(remove["tags"], list) and len(remove["tags"]) == 1
    states = both_orders(crdt, s, (remove, ctx(B, 1, 2)), (readd, ctx(A, 2, 2)))
    assert states[0] == states[1]
    assert value(crdt, states[0]) == [{"item": "x", "key": "k", "metadata": "m2"}]


def test_orset_remove_of_an_unseen_add_does_not_take_it_away() -> None:
    crdt = CrdtType.ORSET
    add = prepare(crdt, None, "add", {"item": [1, 2], "key": "k"})
    remove = prepare(crdt, None, "remove", {"item": [1, 2], "key": "k"})  # B has not seen the add
    assert remove == {"op": "remove", "item": [1, 2], "key": "k", "tags": []}
    states = both_orders(crdt, None, (add, ctx(A, 1, 1)), (remove, ctx(B, 1, 1)))
    assert states[0] == states[1]
    assert value(crdt, states[0]) == [{"item": [1, 2], "key": "k", "metadata": None}]


def test_orset_remove_from_a_missing_key_leaves_it_missing() -> None:
    """A remove that takes nothing away records nothing: a key without a state keeps none (a GET is
    a 404), whatever the order with a concurrent add and however often it is delivered; `create`
    makes the empty set."""
    crdt = CrdtType.ORSET
    remove = prepare(crdt, None, "remove", {"item": "x", "key": "k"})
    assert apply(crdt, None, remove, ctx(A, 1, 1)) is None
    add = prepare(crdt, None, "add", {"item": "x", "key": "k"})
    states = both_orders(crdt, None, (remove, ctx(A, 1, 1)), (add, ctx(B, 1, 1)), (remove, ctx(A, 1, 1)))
    assert states[0] == states[1] == apply(crdt, None, add, ctx(B, 1, 1))
    created = apply(crdt, None, prepare(crdt, None, "create", {}), ctx(C, 1, 1))
    assert value(crdt, created) == [] and apply(crdt, created, remove, ctx(A, 1, 1)) is created


def test_orset_readd_after_remove_and_create() -> None:
    crdt = CrdtType.ORSET
    s = apply(crdt, None, prepare(crdt, None, "create", {}), ctx(A, 1, 1))
    assert value(crdt, s) == []
    elem: dict[str, JSON] = {"item": {"id": 7}, "key": "users"}
    s = apply(crdt, s, prepare(crdt, s, "add", {**elem, "metadata": 1}), ctx(A, 2, 2))
    s = apply(crdt, s, prepare(crdt, s, "remove", elem), ctx(A, 3, 3))
    assert value(crdt, s) == []
    s = apply(crdt, s, prepare(crdt, s, "add", {**elem, "metadata": 2}), ctx(A, 4, 4))
    assert value(crdt, s) == [{**elem, "metadata": 2}]
    assert isinstance(s, dict) and isinstance(s["adds"], dict) and len(s["adds"]) == 1, "no dead adds kept"
    # a later "create" does not empty the set
    s = apply(crdt, s, prepare(crdt, s, "create", {}), ctx(A, 5, 5))
    assert value(crdt, s) == [{**elem, "metadata": 2}]


def test_orset_distinguishes_items_by_canonical_json_and_key() -> None:
    crdt = CrdtType.ORSET
    s: JSON | None = None
    elements: list[tuple[JSON, str]] = [(1, "k"), (1.0, "k"), (True, "k"), (1, "j"), ({"b": 1, "a": 2}, "k")]
    for seq, (item, key) in enumerate(elements, 1):
        s = apply(crdt, s, prepare(crdt, s, "add", {"item": item, "key": key}), ctx(A, seq, seq))
    # the same object with its keys in another order is the same element
    s = apply(crdt, s, prepare(crdt, s, "remove", {"item": {"a": 2, "b": 1}, "key": "k"}), ctx(A, 9, 9))
    got = value(crdt, s)
    assert isinstance(got, list)
    assert [(e["item"], e["key"]) for e in got if isinstance(e, dict)] == [
        (1, "j"),
        (1, "k"),
        (1.0, "k"),
        (True, "k"),
    ]
    assert [type(e["item"]) for e in got if isinstance(e, dict)] == [int, int, float, bool]


def test_orset_concurrent_adds_keep_highest_stamp_metadata() -> None:
    crdt = CrdtType.ORSET
    a = prepare(crdt, None, "add", {"item": "x", "key": "k", "metadata": "from A"})
    b = prepare(crdt, None, "add", {"item": "x", "key": "k", "metadata": "from B"})
    states = both_orders(crdt, None, (a, ctx(A, 1, 7)), (b, ctx(B, 1, 6)))
    assert states[0] == states[1]
    assert value(crdt, states[0]) == [{"item": "x", "key": "k", "metadata": "from A"}]
    # a remove that saw both adds takes the element away
    s = states[0]
    s = apply(crdt, s, prepare(crdt, s, "remove", {"item": "x", "key": "k"}), ctx(C, 1, 8))
    assert value(crdt, s) == []


def test_gset_keeps_everything_and_highest_stamp_metadata() -> None:
    crdt = CrdtType.GSET
    a = prepare(crdt, None, "add", {"item": "x", "key": "k", "metadata": 1})
    b = prepare(crdt, None, "add", {"item": "x", "key": "k", "metadata": 2})
    c = prepare(crdt, None, "add", {"item": "y", "key": "k"})
    states = both_orders(crdt, None, (a, ctx(A, 1, 3)), (b, ctx(B, 1, 4)), (c, ctx(C, 1, 1)))
    assert states[0] == states[1]
    assert value(crdt, states[0]) == [
        {"item": "x", "key": "k", "metadata": 2},
        {"item": "y", "key": "k", "metadata": None},
    ]
    assert value(crdt, apply(crdt, None, prepare(crdt, None, "create", {}), ctx(A, 1, 1))) == []


def test_pncounter_sums_exactly() -> None:
    crdt = CrdtType.PNCOUNTER
    big = 2**62 + 1  # not representable as a float: the sum must stay in ints
    steps = [
        (prepare(crdt, None, "increment", big), ctx(A, 1, 1)),
        (prepare(crdt, None, "increment", 3), ctx(B, 4, 1)),
        (prepare(crdt, None, "decrement", 10), ctx(C, 2, 1)),
    ]
    states = [
        apply(crdt, s, prepare(crdt, s, "increment", 0), ctx(A, 9, 2))
        for s in both_orders(crdt, None, *steps)
    ]
    assert states[0] == states[1]
    total = value(crdt, states[0])
    assert total == big + 3 - 10 and type(total) is int
    assert value(crdt, apply(crdt, states[0], steps[1][0], steps[1][1])) == total, "duplicate counted"
    s = apply(crdt, states[0], prepare(crdt, states[0], "decrement", 0.5), ctx(B, 5, 2))
    assert value(crdt, s) == big + 3 - 10 - 0.5 and isinstance(value(crdt, s), float)
    assert value(crdt, None) == 0


def test_pncounter_rejects_overflow() -> None:
    crdt = CrdtType.PNCOUNTER
    s = apply(crdt, None, prepare(crdt, None, "increment", MAX_COUNTER_INT), ctx(A, 1, 1))
    with pytest.raises(InvalidOperation, match="would overflow"):
        prepare(crdt, s, "increment", 1)
    assert prepare(crdt, s, "decrement", 1) == {"op": "decrement", "amount": 1}
    s = apply(crdt, None, prepare(crdt, None, "increment", 1e308), ctx(A, 1, 1))
    with pytest.raises(InvalidOperation, match="would overflow"):
        prepare(crdt, s, "increment", 1e308)
    # concurrent writers can still overflow the float range: the answer stays a finite JSON number
    s = apply(crdt, s, prepare(crdt, None, "increment", 1e308), ctx(B, 1, 1))
    assert value(crdt, s) == sys.float_info.max
    s = apply(crdt, s, prepare(crdt, s, "decrement", 1e308), ctx(C, 1, 2))
    assert value(crdt, s) == 1e308


def test_mvregister_keeps_concurrent_values_until_a_write_that_saw_them() -> None:
    crdt = CrdtType.MVREGISTER
    pa, pb = prepare(crdt, None, "set", "a"), prepare(crdt, None, "set", {"b": 1})
    states = both_orders(crdt, None, (pa, ctx(A, 1, 5)), (pb, ctx(B, 1, 6)))
    assert states[0] == states[1]
    assert value(crdt, states[0]) == [{"b": 1}, "a"]  # newest first
    s = states[0]
    s = apply(crdt, s, prepare(crdt, s, "set", "c"), ctx(C, 1, 7))
    assert value(crdt, s) == ["c"]
    assert isinstance(s, dict) and isinstance(s["values"], dict) and len(s["values"]) == 1
    # equal concurrent values are listed once
    same = both_orders(crdt, None, (pa, ctx(A, 1, 5)), (pa, ctx(B, 1, 6)))
    assert value(crdt, same[0]) == ["a"]


def test_empty_values() -> None:
    assert value(CrdtType.LWW, None) is None
    assert value(CrdtType.ORSET, None) == []
    assert value(CrdtType.GSET, None) == []
    assert value(CrdtType.PNCOUNTER, None) == 0
    assert value(CrdtType.MVREGISTER, None) == []
    for crdt in CrdtType:
        assert merge(crdt, None, None) is None


# ----------------------------------------------------------------------------------------------------------
# validation


def test_crdt_type_parse() -> None:
    for crdt in CrdtType:
        assert CrdtType.parse(crdt.value) is crdt
    assert valid_ops(CrdtType.ORSET) == ("create", "add", "remove")


@pytest.mark.parametrize("name", ["lww", "SET", "", None, 3, ["LWW"], {"crdt": "LWW"}])
def test_crdt_type_parse_rejects_unknown_names(name: Any) -> None:
    with pytest.raises(
        InvalidOperation, match=re.escape("(valid types: LWW, ORSET, GSET, PNCOUNTER, MVREGISTER)")
    ):
        CrdtType.parse(name)


LW, OR, GS, PN, MV = CrdtType.LWW, CrdtType.ORSET, CrdtType.GSET, CrdtType.PNCOUNTER, CrdtType.MVREGISTER
BAD_OPS: list[tuple[CrdtType, Any, Any, str]] = [
    # wrong op for the type (the exact message)
    (LW, "add", {"item": 1, "key": "k"}, "op 'add' does not apply to LWW tables (valid ops: set)"),
    (OR, "set", 1, "op 'set' does not apply to ORSET tables (valid ops: create, add, remove)"),
    (
        GS,
        "remove",
        {"item": 1, "key": "k"},
        "op 'remove' does not apply to GSET tables (valid ops: create, add)",
    ),
    (PN, "set", 1, "op 'set' does not apply to PNCOUNTER tables (valid ops: increment, decrement)"),
    (MV, "add", 1, "op 'add' does not apply to MVREGISTER tables (valid ops: set)"),
    (PN, "Increment", 1, "op 'Increment' does not apply"),
    (LW, None, 1, "op must be a string, got null"),
    (LW, 3, 1, "op must be a string, got a number"),
    # OR-Set / G-Set bodies
    (OR, "add", {"item": 1}, "OR-Set 'add' change needs a string 'key'"),
    (OR, "add", {"item": 1, "key": 5}, "OR-Set 'add' change needs a string 'key'"),
    (OR, "add", {"item": 1, "key": None}, "OR-Set 'add' change needs a string 'key'"),
    (OR, "add", {"key": "k"}, "OR-Set 'add' change needs an 'item'"),
    (OR, "add", [1, "k"], "OR-Set 'add' change must be an object, got a list"),
    (OR, "add", "x", "OR-Set 'add' change must be an object, got a string"),
    (OR, "add", {"item": 1, "key": "k", "meta": 1}, "OR-Set 'add' change has unknown field(s) 'meta'"),
    (OR, "remove", {"key": "k"}, "OR-Set 'remove' change needs an 'item'"),
    (OR, "remove", {"item": 1, "key": []}, "OR-Set 'remove' change needs a string 'key'"),
    (
        OR,
        "remove",
        {"item": 1, "key": "k", "metadata": 1},
        "has unknown field(s) 'metadata' (allowed: item, key)",
    ),
    (OR, "create", {"item": 1}, "OR-Set 'create' change must be {}"),
    (
        OR,
        "add",
        {"item": float("nan"), "key": "k"},
        "OR-Set 'add' change 'item' contains a non-finite number",
    ),
    (
        OR,
        "add",
        {"item": 1, "key": "k", "metadata": {1: 2}},
        "'metadata' contains an object key that is not a string",
    ),
    (GS, "add", {"item": 1}, "G-Set 'add' change needs a string 'key'"),
    (GS, "add", None, "G-Set 'add' change must be an object, got null"),
    (GS, "create", [], "G-Set 'create' change must be {}"),
    # PN-Counter amounts
    (PN, "increment", True, "PN-Counter 'increment' amount must be a number, got a boolean"),
    (PN, "increment", "3", "PN-Counter 'increment' amount must be a number, got '3'"),
    (PN, "decrement", None, "PN-Counter 'decrement' amount must be a number, got null"),
    (PN, "increment", {"amount": 1}, "must be a number, got an object"),
    (PN, "increment", -1, "PN-Counter 'increment' amount must not be negative, got -1"),
    (PN, "decrement", -0.5, "PN-Counter 'decrement' amount must not be negative"),
    (PN, "increment", float("nan"), "PN-Counter 'increment' amount must be a finite number"),
    (PN, "decrement", float("inf"), "PN-Counter 'decrement' amount must be a finite number"),
    (PN, "increment", MAX_COUNTER_INT + 1, "PN-Counter 'increment' amount is too large"),
    # values that are not JSON
    (LW, "set", float("inf"), "LWW 'set' value contains a non-finite number"),
    (LW, "set", {"a": [1, (2, 3)]}, "LWW 'set' value contains a value that is not JSON (tuple)"),
    (MV, "set", {3: "x"}, "MV-Register 'set' value contains an object key that is not a string"),
]


@pytest.mark.parametrize(("crdt", "op", "change", "message"), BAD_OPS)
def test_prepare_rejects_bad_ops(crdt: CrdtType, op: Any, change: Any, message: str) -> None:
    with pytest.raises(InvalidOperation, match=re.escape(message)):
        prepare(crdt, None, op, change)


@pytest.mark.parametrize("crdt", list(CrdtType), ids=lambda c: c.value)
@PROPERTY
@given(
    op=st.sampled_from(sorted({op for c in CrdtType for op in valid_ops(c)})) | st.text(max_size=10),
    change=json_values,
)
def test_prepare_accepts_or_rejects_with_invalid_operation_only(
    crdt: CrdtType, op: str, change: JSON
) -> None:
    try:
        payload = prepare(crdt, None, op, change)
    except InvalidOperation as exc:
        assert str(exc)
        return
    assert op in valid_ops(crdt)
    assert isinstance(payload, dict) and payload["op"] == op
    assert json_roundtrip(payload) == payload


BAD_PAYLOADS: list[tuple[CrdtType, Any, str]] = [
    (LW, [1], "LWW payload must be an object, got a list"),
    (LW, {"op": "add", "value": 1}, "op 'add' does not apply to LWW tables"),
    (LW, {"value": 1}, "op must be a string, got null"),
    (LW, {"op": "set"}, "LWW 'set' payload needs a 'value'"),
    (
        OR,
        {"op": "add", "item": 1, "key": "k"},
        "OR-Set 'add' payload needs a list of string tags 'supersedes'",
    ),
    (OR, {"op": "remove", "item": 1, "key": "k", "tags": [1]}, "needs a list of string tags 'tags'"),
    (OR, {"op": "remove", "item": 1, "tags": []}, "OR-Set 'remove' payload needs a string 'key'"),
    (PN, {"op": "increment", "amount": -1}, "PN-Counter 'increment' payload 'amount' must not be negative"),
    (PN, {"op": "increment"}, "must be a number, got null"),
    (MV, {"op": "set", "value": 1}, "MV-Register 'set' payload needs a list of string tags 'supersedes'"),
    (GS, {"op": "add", "key": "k"}, "G-Set 'add' payload needs an 'item'"),
]


@pytest.mark.parametrize(("crdt", "payload", "message"), BAD_PAYLOADS)
def test_apply_rejects_malformed_payloads(crdt: CrdtType, payload: Any, message: str) -> None:
    with pytest.raises(InvalidOperation, match=re.escape(message)):
        apply(crdt, None, payload, ctx(A, 1, 1))


@pytest.mark.parametrize("crdt", list(CrdtType), ids=lambda c: c.value)
def test_states_of_another_type_are_rejected(crdt: CrdtType) -> None:
    other = {LW: OR, OR: PN, PN: MV, MV: LW, GS: LW}[crdt]
    first_op: dict[CrdtType, tuple[str, JSON]] = {
        LW: ("set", 1),
        OR: ("create", {}),
        PN: ("increment", 1),
        MV: ("set", 1),
        GS: ("create", {}),
    }
    op, change = first_op[other]
    foreign = apply(other, None, prepare(other, None, op, change), ctx(A, 1, 1))
    with pytest.raises(InvalidOperation, match="state"):
        value(crdt, foreign)
    with pytest.raises(InvalidOperation, match="state"):
        merge(crdt, foreign, foreign)


def test_event_context_needs_a_positive_seq() -> None:
    with pytest.raises(InvalidOperation, match="seq must be a positive integer"):
        EventContext("t", A, 0, Stamp(1, 0, A))


@PROPERTY
@given(
    a=st.tuples(st.integers(0, 3), st.integers(0, 3), st.sampled_from(OWNERS)),
    b=st.tuples(st.integers(0, 3), st.integers(0, 3), st.sampled_from(OWNERS)),
)
def test_stamp_order_is_wall_then_logical_then_owner(
    a: tuple[int, int, str], b: tuple[int, int, str]
) -> None:
    sa, sb = Stamp(*a), Stamp(*b)
    assert (sa < sb) == (a < b) and (sa == sb) == (a == b)
    assert Stamp.from_json(sa.to_json()) == sa


def test_causal_dependencies_name_each_owners_newest_observed_tag() -> None:
    x: JSON = {"item": "x", "key": "k"}
    y: JSON = {"item": "y", "key": "k"}
    contexts = [ctx("a", 1, 10), ctx("b", 1, 11), ctx("a", 2, 12), ctx("b", 2, 13), ctx("c", 1, 14)]
    orset: JSON = None
    for c in contexts[:4]:  # a and b add x concurrently (each add on a state without the others)
        orset = apply(CrdtType.ORSET, orset, prepare(CrdtType.ORSET, None, "add", x), c)
    orset = apply(CrdtType.ORSET, orset, prepare(CrdtType.ORSET, orset, "add", y), contexts[4])
    remove = prepare(CrdtType.ORSET, orset, "remove", x)
    assert causal_dependencies(CrdtType.ORSET, orset, remove) == sorted([contexts[2].tag, contexts[3].tag])
    mv: JSON = None
    for c in contexts[:3]:
        mv = apply(CrdtType.MVREGISTER, mv, prepare(CrdtType.MVREGISTER, None, "set", c.seq), c)
    write = prepare(CrdtType.MVREGISTER, mv, "set", 0)
    assert causal_dependencies(CrdtType.MVREGISTER, mv, write) == sorted([contexts[1].tag, contexts[2].tag])
    assert causal_dependencies(CrdtType.GSET, None, prepare(CrdtType.GSET, None, "add", x)) == []
    foreign: JSON = {"op": "set", "value": 1, "supersedes": ["elsewhere"]}
    assert causal_dependencies(CrdtType.MVREGISTER, None, foreign) == ["elsewhere"]
