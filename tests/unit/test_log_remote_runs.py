"""Remote batches taken a stretch at a time (`Log._plan_run`) do exactly what entry by entry does.

A peer sends stretches of one owner's chain as stored; `plan_remote` takes such a batch with a few
list operations when it has that shape and nothing waits, and entry by entry otherwise. Each test
plans the same batch both ways, on two logs in the same state, and compares everything the plan
would write and adopt.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from google.protobuf.struct_pb2 import Value
from hypothesis import given
from hypothesis import strategies as st

from potboiler.server.entries import NewEntry
from potboiler.server.entry_batches import parsed_run_owner, run_owner
from potboiler.server.errors import InvalidArgument
from potboiler.server.ids import parse_uuid, parse_uuids
from potboiler.server.log import Log
from potboiler.server.log_plan import Plan
from potboiler.server.storage import MemoryStore
from potboiler.v1.entry_pb2 import Entry


def make_chain(count: int) -> list[Entry]:
    """`count` entries of one owner's chain, as its node stores them."""
    origin = Log(MemoryStore())
    plan = origin.begin()
    data = Value(string_value="x")
    appended = origin.plan_local(plan, [NewEntry(data.SerializeToString()) for _ in range(count)])
    return [a.entry() for a in appended]


def commit(log: Log, entries: Sequence[Entry]) -> None:
    plan = log.begin()
    log.plan_remote(plan, [copy(e) for e in entries])
    log.finish(plan)
    log._store.write(plan.writes)
    log.apply(plan)


def copy(entry: Entry) -> Entry:
    out = Entry()
    out.CopyFrom(entry)
    return out


def plan_both_ways(
    held: Sequence[Entry], batch: Sequence[Entry], *, earlier: Sequence[Entry] = ()
) -> tuple[Any, Any]:
    """Plan `batch` with its serialized forms (the path a peer's batch takes) and without them
    (entry by entry), each on a log that already holds `held`, after `earlier` in the same plan;
    what each did, comparably."""
    outcomes = []
    for with_blobs in (True, False):
        log = Log(MemoryStore())
        commit(log, held)
        entries = [copy(e) for e in batch]
        blobs = [e.SerializeToString() for e in entries] if with_blobs else None
        plan = log.begin()
        if earlier:
            log.plan_remote(plan, [copy(e) for e in earlier], [e.SerializeToString() for e in earlier])
        try:
            taken: object = [e.SerializeToString() for e in log.plan_remote(plan, entries, blobs)]
        except InvalidArgument as exc:
            taken = str(exc)
        log.finish(plan)
        outcomes.append((taken, describe(plan), log.clock.last))
    return outcomes[0], outcomes[1]


def describe(plan: Plan) -> object:
    return (
        sorted(plan.writes, key=lambda w: w[0]),
        plan.heads,
        plan.position,
        plan.delivered,
        plan.stored,
        plan.delivered_blobs,
    )


CHAIN = make_chain(12)


def test_a_stretch_continuing_the_chain_is_taken_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[object] = []
    plan_run = Log._plan_run

    def spy(self: Log, *args: Any) -> list[Entry] | None:
        runs.append(result := plan_run(self, *args))
        return result

    monkeypatch.setattr(Log, "_plan_run", spy)
    fast, slow = plan_both_ways(CHAIN[:3], CHAIN[3:9])
    assert fast == slow
    assert fast[0] == [e.SerializeToString() for e in CHAIN[3:9]]
    assert runs and runs[-1] is not None  # taken as a stretch


def test_held_entries_at_the_start_are_skipped_and_a_gap_takes_nothing() -> None:
    fast, slow = plan_both_ways(CHAIN[:5], CHAIN[2:8])
    assert fast[0] == [e.SerializeToString() for e in CHAIN[5:8]]
    fast, slow = plan_both_ways(CHAIN[:2], CHAIN[4:8])
    assert fast == slow and fast[0] == []
    fast, slow = plan_both_ways(CHAIN[:8], CHAIN[2:8])
    assert fast == slow and fast[0] == []


def test_a_stretch_continues_what_the_same_plan_took_before_it() -> None:
    fast, slow = plan_both_ways(CHAIN[:2], CHAIN[5:9], earlier=CHAIN[2:5])
    assert fast == slow
    assert len(fast[0]) == 4 and len(fast[1][3]) == 7  # 3 + 4 delivered
    fast, slow = plan_both_ways([], CHAIN[2:6], earlier=CHAIN[:4])
    assert fast == slow and len(fast[0]) == 2


def test_a_wrong_prev_part_way_takes_the_entries_before_it_and_notes_a_fork() -> None:
    batch = [copy(e) for e in CHAIN[:6]]
    batch[3].prev = CHAIN[0].id
    fast, slow = plan_both_ways([], batch)
    assert fast == slow
    assert fast[0] == [e.SerializeToString() for e in CHAIN[:3]]  # a, b, c taken; the rest not
    store = MemoryStore()
    log = Log(store)
    plan = log.begin()
    log.plan_remote(plan, batch, [e.SerializeToString() for e in batch])
    assert log.forks() == {CHAIN[0].owner: 4}
    # Kept across a restart: the forked node may never send that log again.
    assert Log(store).forks() == {CHAIN[0].owner: 4}


def test_a_forked_log_holds_up_only_its_own_entries() -> None:
    """Another owner's entries in the same batch are taken, as are the forked log's up to the fork."""
    other = make_chain(3)
    forked = [copy(e) for e in CHAIN[:4]]
    forked[2].prev = str(uuid.UUID(int=7))
    log = Log(MemoryStore())
    plan = log.begin()
    taken = log.plan_remote(plan, [forked[0], other[0], forked[1], other[1], forked[2], other[2], forked[3]])
    assert [e.id for e in taken] == [forked[0].id, other[0].id, forked[1].id, other[1].id, other[2].id]
    assert log.forks() == {CHAIN[0].owner: 3}


def test_mutations_of_a_batch_plan_as_entry_by_entry() -> None:
    other = make_chain(2)

    def with_(i: int, **fields: object) -> list[Entry]:
        batch = [copy(e) for e in CHAIN[:6]]
        for name, value in fields.items():
            if name == "dependencies":
                batch[i].dependencies.append(str(value))
            else:
                setattr(batch[i], name, value)
        return batch

    cases = [
        with_(2, id="not-a-uuid"),
        with_(2, id=CHAIN[2].id.upper()),
        with_(0, owner="not-a-uuid"),
        with_(4, next=CHAIN[5].id),
        with_(3, dependencies=CHAIN[0].id),
        with_(3, dependencies=other[0].id),  # waits: every later entry goes the causal path
        with_(3, dependencies="nope"),
        with_(1, seq=7),
        CHAIN[:3] + other + CHAIN[3:6],
        CHAIN[:3] + CHAIN[2:6],
        [],
    ]
    for batch in cases:
        fast, slow = plan_both_ways([], batch)
        assert fast == slow, batch


@given(
    st.integers(0, 12),
    st.integers(0, 12),
    st.integers(0, 12),
    st.sampled_from(["", "id", "prev", "next", "seq", "owner", "dependency"]),
    st.integers(0, 11),
)
def test_any_stretch_with_any_one_flaw_plans_as_entry_by_entry(
    held: int, start: int, length: int, flaw: str, where: int
) -> None:
    batch = [copy(e) for e in CHAIN[start : start + length]]
    if flaw and batch:
        entry = batch[where % len(batch)]
        if flaw == "seq":
            entry.seq += 1
        elif flaw == "dependency":
            entry.dependencies.append(CHAIN[0].id)
        elif flaw == "owner":
            entry.owner = CHAIN[0].id
        else:
            setattr(entry, flaw, str(uuid.uuid4()))
    fast, slow = plan_both_ways(CHAIN[:held], batch)
    assert fast == slow


UUID_LIKE = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: str(u)[:35] + " "),
    st.uuids().map(lambda u: str(u)[:35]),
    st.uuids().map(lambda u: str(u) + "0"),
    st.uuids().map(lambda u: str(u)[:9] + "-" + str(u)[10:]),
    st.uuids().map(lambda u: str(u)[:8] + "g" + str(u)[9:]),
    st.text(max_size=40),
)


@given(st.lists(UUID_LIKE, max_size=6))
def test_parse_uuids_agrees_with_parse_uuid(texts: list[str]) -> None:
    try:
        expected: list[bytes] | None = [parse_uuid(t) for t in texts]
    except InvalidArgument:
        expected = None
    assert parse_uuids(texts) == expected


def test_parse_uuids_is_not_fooled_by_lengths_that_add_up() -> None:
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    # 35 + 37 characters: joined, they look like two UUIDs
    assert parse_uuids([a[:35], a[35] + b]) is None
    with pytest.raises(InvalidArgument):
        parse_uuid(a[:35])


def naive_run_owner(entries: Sequence[Entry]) -> str | None:
    if not entries or any(e.owner != entries[0].owner or e.next or e.dependencies for e in entries):
        return None
    return entries[0].owner


@given(
    st.lists(
        st.tuples(
            st.integers(0, 11),
            st.sampled_from(["", "owner", "other owner", "no owner", "next", "dependency", "dependencies"]),
        ),
        max_size=8,
    )
)
def test_run_owner_is_the_one_owner_of_plain_entries_read_either_way(picks: list[tuple[int, str]]) -> None:
    entries = []
    for i, change in picks:
        entry = copy(CHAIN[i])
        if change == "owner":
            entry.owner = entry.owner  # written again: the same bytes
        elif change == "other owner":
            entry.owner = str(uuid.uuid4())
        elif change == "no owner":
            entry.owner = ""
        elif change == "next":
            entry.next = CHAIN[(i + 1) % 12].id
        elif change == "dependency":
            entry.dependencies.append(CHAIN[0].id)
        elif change == "dependencies":
            entry.dependencies.extend([CHAIN[0].id, CHAIN[1].id])
        entries.append(entry)
    assert run_owner([e.SerializeToString() for e in entries]) == naive_run_owner(entries)
    assert parsed_run_owner(entries) == naive_run_owner(entries)


def test_run_owner_of_no_entries_or_of_bytes_that_are_not_entries_is_none() -> None:
    assert run_owner([]) is None
    assert run_owner([b"\xff\xff"]) is None
    assert run_owner([CHAIN[0].SerializeToString(), b"\x12\x05ab"]) is None  # a truncated owner
    assert run_owner([e.SerializeToString() for e in CHAIN]) == CHAIN[0].owner
