"""Causal delivery under any arrival: whatever order, grouping, duplication and restarts entries
arrive with, a node that holds every entry has delivered every entry, each after all it needs."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from potboiler.server.entries import NewEntry
from potboiler.server.entry_batches import newest_of_each_owner
from potboiler.server.errors import Unavailable
from potboiler.server.ids import parse_uuid
from potboiler.server.log import CASCADE_BUDGET, Log
from potboiler.server.log_delivered import DeliveredBatch
from potboiler.server.log_plan import Plan
from potboiler.server.storage import MemoryStore
from potboiler.v1.entry_pb2 import Entry
from tests.unit.test_log import commit_local, copy, value


def make_logs(rng: random.Random, owners: int, per_owner: int) -> list[list[Entry]]:
    """Each owner's chain; entries are appended in a random global order and depend on up to two
    random earlier entries of any owner."""
    origins = [Log(MemoryStore()) for _ in range(owners)]
    chains: list[list[Entry]] = [[] for _ in range(owners)]
    earlier: list[bytes] = []
    for step in range(owners * per_owner):
        o = rng.randrange(owners)
        deps = tuple(rng.sample(earlier, k=min(len(earlier), rng.randrange(3))))
        [entry] = commit_local(
            origins[o], origins[o]._store, [NewEntry(value(step).SerializeToString(), deps)]
        )
        chains[o].append(entry)
        earlier.append(parse_uuid(entry.id))
    return chains


def interleave(rng: random.Random, batches: list[list[Entry]]) -> list[Entry]:
    """The batches' entries in one list, mixed at random, each batch's own order kept."""
    slots = [i for i, batch in enumerate(batches) for _ in batch]
    rng.shuffle(slots)
    its = [iter(batch) for batch in batches]
    return [next(its[i]) for i in slots]


def write_plan(log: Log, plan: Plan) -> None:
    log.finish(plan)
    log._store.write(plan.writes)
    log.apply(plan)


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    owners=st.integers(2, 4),
    per_owner=st.integers(1, 20),
    budget=st.sampled_from([1, 2, 5, CASCADE_BUDGET]),
)
def test_every_held_entry_is_delivered_after_what_it_needs(
    seed: int, owners: int, per_owner: int, budget: int
) -> None:
    """`budget`: how many waiting entries one plan delivers (the rest are left to the next plans,
    and to a restarted node)."""
    rng = random.Random(seed)
    chains = make_logs(rng, owners, per_owner)
    store = MemoryStore()
    log = Log(store, cascade_budget=budget)
    sent = [0] * owners
    while any(n < len(chain) for n, chain in zip(sent, chains, strict=True)):
        plan = log.begin()
        before = log.position
        batches = []
        for _ in range(rng.randrange(1, 4)):  # several peers' batches in one write
            o = rng.randrange(owners)
            start = max(0, sent[o] - rng.choice((0, 0, 2)))  # sometimes with entries already held
            end = min(len(chains[o]), sent[o] + rng.randrange(1, 4))
            batches.append([copy(e) for e in chains[o][start:end]])
            sent[o] = end
        if len({batch[0].owner for batch in batches if batch}) == len(batches) and rng.random() < 0.5:
            batches = [interleave(rng, batches)]  # one batch of several owners' entries
        for batch in batches:
            # As a peer sends them (serialized as stored: a batch of one owner's chain may be
            # taken whole) or entry by entry.
            blobs = [e.SerializeToString() for e in batch] if rng.random() < 0.5 else None
            log.plan_remote(plan, batch, blobs)
        write_plan(log, plan)
        # What the plan hands to subscribers is what the log now reads back at those positions.
        entries = [e for e in plan.delivered_entries if e is not None]  # received: all parsed
        assert [parse_uuid(e.id) for e in entries] == plan.delivered
        assert [e.SerializeToString() for e in entries] == plan.delivered_blobs
        again = log.delivered_batch(before, 10_000)
        assert [e.id for _, e in again.entries] == [e.id for e in entries]
        assert again.blobs == plan.delivered_blobs
        if rng.random() < 0.2:
            log = Log(store, cascade_budget=budget)  # a restart
    for _ in range(owners * per_owner):  # the plans a node's writer runs on its own
        if not log.resuming:
            break
        write_plan(log, log.begin())
    assert not log.resuming
    assert log.pending == 0
    everything = log.delivered(0, 10_000)
    order = [entry.id for _, entry in everything]
    assert len(order) == owners * per_owner
    assert [p for p, _ in everything] == list(range(1, len(order) + 1)) and log.position == len(order)
    # Reading on from any position (within a delivery run too) gives the rest of the same order.
    after, limit = rng.randrange(len(order) + 1), rng.randrange(1, 8)
    assert log.delivered(after, limit) == everything[after : after + limit]
    # With a byte budget: the same, as far as the bytes allow (and one entry at least).
    stored = list(zip(range(1, len(order) + 1), log.delivered_batch(0, 10_000).blobs, strict=True))
    assert log.delivered_blobs(after, limit, max_bytes=1 << 20) == stored[after : after + limit]
    assert log.delivered_blobs(after, limit, max_bytes=1) == stored[after : after + 1]
    if sizes := [len(blob) for _, blob in stored[after : after + limit]]:
        k = rng.randrange(1, len(sizes) + 1)
        fit = sum(sizes[:k])
        assert log.delivered_blobs(after, limit, max_bytes=fit) == stored[after : after + k]
        assert log.delivered_blobs(after, limit, max_bytes=fit - 1) == stored[after : after + max(1, k - 1)]
    position = {entry_id: i for i, entry_id in enumerate(order)}
    for chain in chains:
        for entry in chain:
            for need in [*entry.dependencies, *([entry.prev] if entry.prev else [])]:
                assert position[need] < position[entry.id]


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 25))
def test_own_blocked_is_the_first_own_entry_waiting_and_service_appends_never_queue_behind_it(
    seed: int, steps: int
) -> None:
    """Own entries that wait are a tail of the node's own chain (each needs its predecessor), so the
    binary search of `own_blocked` finds the first of them; appends made `unless_blocked` are refused
    exactly while there is one, and are never stored behind it."""
    rng = random.Random(seed)
    origin = Log(MemoryStore())
    deps = commit_local(origin, origin._store, [NewEntry(value(i).SerializeToString()) for i in range(4)])
    store = MemoryStore()
    log = Log(store)
    services: set[str] = set()  # ids of the entries appended unless_blocked
    for _ in range(steps):
        plan = log.begin()
        for _ in range(rng.randrange(1, 4)):
            r = rng.random()
            if r < 0.25:
                log.plan_remote(plan, [copy(deps[rng.randrange(len(deps))])])  # out of order: skipped
            elif r < 0.45:
                missing = parse_uuid(deps[rng.randrange(len(deps))].id)
                log.plan_local(plan, [NewEntry(value("waits").SerializeToString(), (missing,))])
            else:
                with contextlib.suppress(Unavailable):
                    [entry] = log.plan_local(
                        plan, [NewEntry(value("service").SerializeToString())], unless_blocked=True
                    )
                    services.add(entry.id)
        log.finish(plan)
        store.write(plan.writes)
        log.apply(plan)
        if rng.random() < 0.3:
            log = Log(store)  # a restart
        chain = [e for _, e in log.delivered(0, 10_000) if e.owner == log.node_id]
        own_seq = log.vector().get(log.node_id, 0)
        waiting = [s for s in range(1, own_seq + 1) if s > len(chain)]
        blocked_now = log.own_blocked()
        assert (blocked_now.seq if blocked_now else None) == (waiting[0] if waiting else None)
        assert blocked_now is None or blocked_now.waits_for
        assert [e.seq for e in chain] == list(range(1, len(chain) + 1))  # delivered: a prefix
        assert services <= {e.id for e in chain}  # no service append ever waits
        if blocked_now is None:  # the next service append goes through
            log.plan_local(log.begin(), [NewEntry(value("probe").SerializeToString())], unless_blocked=True)
        else:
            with pytest.raises(Unavailable, match=blocked_now.entry):
                log.plan_local(
                    log.begin(), [NewEntry(value("probe").SerializeToString())], unless_blocked=True
                )


class CountingStore(MemoryStore):
    """A MemoryStore that counts the pairs its scans hand out."""

    def __init__(self) -> None:
        super().__init__()
        self.read = 0

    def scan(self, start: bytes, end: bytes, *, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        for pair in super().scan(start, end, limit=limit):
            self.read += 1
            yield pair


def test_a_byte_budget_stops_the_reading_not_only_what_is_kept() -> None:
    # Entries may be as big as 1 MiB: reading a whole stretch before counting its bytes could hold
    # hundreds of MiB for one subscription batch.
    store = CountingStore()
    log = Log(store)
    commit_local(log, store, [NewEntry(value("x" * 1000).SerializeToString())] * 200)
    sizes = [len(blob) for _, blob in log.delivered_blobs(0, 200)]
    store.read = 0
    got = log.delivered_blobs(0, 200, max_bytes=sum(sizes[:10]))
    assert len(got) == 10
    assert store.read <= 10 + 1 + 2  # the entries kept, the one beyond the budget, the delivery runs


def test_a_batch_parses_only_the_entries_asked_for() -> None:
    """A delivered batch parses entries on demand: those holding a mark (`marked`), or those not
    parsed already (`entries`). Bytes that are no entry show which were parsed."""
    log = Log(MemoryStore())
    one, two = commit_local(
        log, log._store, [NewEntry(value("mark").SerializeToString()), NewEntry(value(2).SerializeToString())]
    )
    broken = b"\xff\xff"  # parsing it fails
    batch = DeliveredBatch([1, 2, 3], [broken, one.SerializeToString(), broken])
    assert batch.marked(b"mark").entries == [(2, one)]
    assert batch.marked(b"absent").entries == []
    parsed = DeliveredBatch([1, 2], [broken, two.SerializeToString()], [one, None])
    assert parsed.entries == [(1, one), (2, two)]
    assert parsed.entries[0][1] is one  # given parsed: not parsed again
    assert parsed.last() == 2 and len(parsed) == 2


def test_the_newest_entry_of_each_owner_in_a_batch() -> None:
    a, b = Log(MemoryStore()), Log(MemoryStore())
    a1, a2 = commit_local(a, a._store, [NewEntry(value(i).SerializeToString()) for i in range(2)])
    [b1] = commit_local(b, b._store, [NewEntry(value("b").SerializeToString())])
    stretch = DeliveredBatch.parsed([(1, a1), (2, a2)])
    assert stretch.newest_of_each_owner() == {a.node_id: a2}
    mixed = DeliveredBatch.parsed([(1, a1), (2, b1), (3, a2)])
    assert mixed.newest_of_each_owner() == {a.node_id: a2, b.node_id: b1}
    for pairs in ([(1, a1), (2, a2)], [(1, a1), (2, b1), (3, a2)]):  # none parsed yet
        unparsed = DeliveredBatch([p for p, _ in pairs], [e.SerializeToString() for _, e in pairs])
        assert unparsed.newest_of_each_owner() == newest_of_each_owner([e for _, e in pairs])
