"""The hand-written protobuf wire format agrees with protobuf's own."""

from __future__ import annotations

import pytest
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Value
from hypothesis import given
from hypothesis import strategies as st

from potboiler.server.entries import Appended, AppendedEntries
from potboiler.server.hlc import Stamp
from potboiler.server.wire import (
    append_acks,
    append_request,
    append_stream_request,
    new_entries,
    subscribe_entries_response,
    varint,
)
from potboiler.v1 import log_pb2
from potboiler.v1.entry_pb2 import Entry

entries = st.builds(
    Entry,
    id=st.uuids().map(str),
    owner=st.uuids().map(str),
    seq=st.integers(1, 2**64 - 1),
    dependencies=st.lists(st.uuids().map(str), max_size=3),
)


@given(n=st.integers(1, 2**64 - 1))
def test_varint_is_protobufs(n: int) -> None:
    assert varint(n) == log_pb2.DeliveredEntry(position=n).SerializeToString()[1:]


@given(delivered=st.lists(st.tuples(st.integers(1, 2**64 - 1), entries), max_size=20))
def test_subscribe_entries_response_is_the_message_protobuf_builds(
    delivered: list[tuple[int, Entry]],
) -> None:
    built = subscribe_entries_response([(p, e.SerializeToString()) for p, e in delivered])
    expected = log_pb2.SubscribeEntriesResponse(
        entries=[log_pb2.DeliveredEntry(position=p, entry=e) for p, e in delivered]
    )
    assert built == expected.SerializeToString()


def test_varint_of_zero() -> None:
    assert varint(0) == b"\x00"


#: JSON values whose objects have one member at most: a Struct's members have no fixed order in
#: its serialized forms (a copy of one may write them in another order than the original).
json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=1),
    max_leaves=8,
)


@given(
    owner=st.uuids().map(str) | st.just(""),
    first_seq=st.integers(1, 2**63),
    prev=st.uuids().map(str) | st.just(""),
    wall_ms=st.integers(0, 2**48),
    logical=st.integers(0, 2**31),
    new=st.lists(
        st.tuples(json_values, st.lists(st.uuids().map(str), max_size=3), st.uuids().map(str)),
        min_size=1,
        max_size=5,
    ),
)
def test_new_entries_are_what_protobuf_serializes(
    owner: str,
    first_seq: int,
    prev: str,
    wall_ms: int,
    logical: int,
    new: list[tuple[object, list[str], str]],
) -> None:
    data = [json_format.ParseDict(value, Value()) for value, _, _ in new]
    ids = [entry_id for _, _, entry_id in new]
    built = new_entries(
        owner,
        first_seq,
        prev,
        ids,
        (wall_ms, logical),
        [d.SerializeToString() for d in data],
        [deps for _, deps, _ in new],
    )
    expected = []
    for i, (value, (_, deps, entry_id)) in enumerate(zip(data, new, strict=True)):
        entry = Entry(id=entry_id, owner=owner, seq=first_seq + i, prev=prev, dependencies=deps)
        entry.when.wall_ms = wall_ms
        entry.when.logical = logical + i
        entry.data.CopyFrom(value)
        expected.append(entry.SerializeToString())
        prev = entry_id
    assert built == expected


@given(
    ids=st.lists(st.uuids().map(str), max_size=5),
    first_seq=st.integers(1, 2**63),
    wall_ms=st.integers(0, 2**48),
    logical=st.integers(0, 2**31),
)
def test_append_acks_are_what_protobuf_serializes(
    ids: list[str], first_seq: int, wall_ms: int, logical: int
) -> None:
    response = log_pb2.AppendEntriesResponse()
    for i, entry_id in enumerate(ids):
        ack = response.entries.add(id=entry_id, seq=first_seq + i)
        ack.when.wall_ms = wall_ms
        ack.when.logical = logical + i
    assert append_acks(ids, first_seq, (wall_ms, logical)) == response.SerializeToString()


@given(new=st.lists(st.tuples(json_values, st.lists(st.uuids().map(str), max_size=3)), max_size=5))
def test_append_stream_requests_are_what_protobuf_serializes(new: list[tuple[object, list[str]]]) -> None:
    data = [json_format.ParseDict(value, Value()) for value, _ in new]
    built = append_stream_request(
        [append_request(d.SerializeToString(), deps) for d, (_, deps) in zip(data, new, strict=True)]
    )
    expected = log_pb2.AppendEntryStreamRequest(
        entries=[
            log_pb2.AppendEntryRequest(data=d, dependencies=deps)
            for d, (_, deps) in zip(data, new, strict=True)
        ]
    )
    assert built == expected.SerializeToString()


def test_appended_entries_are_a_sequence_of_appended() -> None:
    entries = AppendedEntries(["a", "b", "c"], 7, Stamp(100, 5), [b"1", b"2", b"3"])
    assert len(entries) == 3
    assert entries[1] == Appended("b", 8, Stamp(100, 6), b"2")
    assert entries[-1] == Appended("c", 9, Stamp(100, 7), b"3")
    assert entries[:2] == [entries[0], entries[1]]
    assert [a.id for a in entries] == ["a", "b", "c"]
    with pytest.raises(IndexError):
        entries[3]
