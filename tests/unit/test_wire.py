"""The hand-written protobuf wire format agrees with protobuf's own."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from potboiler.server.wire import subscribe_entries_response, varint
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
