"""potboiler.kv.encoding: both stored forms of a state read back as the JSON state crdts works on."""

from __future__ import annotations

import struct

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from potboiler.kv.crdts import JSON, CrdtType
from potboiler.kv.encoding import LwwRecord, decode, encode, to_json
from potboiler.kv.events import KvEvent
from potboiler.server.jsonvalue import from_value, to_value
from potboiler.v1.entry_pb2 import Entry, HlcTimestamp

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


def lww_entry(value: JSON, wall: int, logical: int, owner: str, tag: str, unknown: bool = False) -> Entry:
    """A log entry of an LWW set of `value`, as the KV service writes it (`unknown`: where the table
    was not known, so the event's crdt is null and its change the value)."""
    entry = Entry(id=tag, owner=owner, seq=1, when=HlcTimestamp(wall_ms=wall, logical=logical))
    if unknown:
        event = KvEvent("t", "k", None, "set", value, ("observed-tag",)).to_json()
    else:
        event = KvEvent("t", "k", CrdtType.LWW, "set", {"op": "set", "value": value}).to_json()
    entry.data.CopyFrom(to_value(event))
    return entry


records = st.tuples(
    json_values,
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.text(max_size=40),
    st.text(max_size=40),
)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(records, st.booleans())
def test_an_lww_record_round_trips_to_the_json_state(
    record_of: tuple[JSON, int, int, str, str], unknown: bool
) -> None:
    value, wall, logical, owner, tag = record_of
    entry = lww_entry(value, wall, logical, owner, tag, unknown)
    record = LwwRecord(wall, logical, entry.SerializeToString())
    assert decode(encode(record)) == record
    stamp: list[JSON] = [wall, logical, owner]
    assert to_json(record) == {"value": from_value(to_value(value)), "stamp": stamp, "tag": tag}
    assert record.message() == to_value(value)
    assert record.rank() == (wall, logical, owner, tag)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(records)
def test_records_of_the_earlier_form_read_back_the_same(record_of: tuple[JSON, int, int, str, str]) -> None:
    """Stores written before records kept their entry hold (marker 1, wall_ms, logical, owner and tag
    lengths) + owner + tag + the value serialized; they read as the same state, and are written
    afresh in the current form."""
    value, wall, logical, owner, tag = record_of
    o, t = owner.encode(), tag.encode()
    old = (
        struct.pack(">BQQHH", 1, wall, logical, len(o), len(t)) + o + t + to_value(value).SerializeToString()
    )
    record = decode(old)
    assert isinstance(record, LwwRecord)
    stamp: list[JSON] = [wall, logical, owner]
    assert to_json(record) == {"value": from_value(to_value(value)), "stamp": stamp, "tag": tag}
    assert record.message() == to_value(value)
    assert record.rank() == (wall, logical, owner, tag)
    assert encode(record)[:1] == b"\x02"
    assert decode(encode(record)) == record


def test_json_states_are_stored_as_json() -> None:
    state: JSON = {"counts": {"o": {"seq": 1, "p": 2**70, "n": 0.5}}}
    blob = encode(state)
    assert blob.startswith(b"{")
    assert decode(blob) == to_json(decode(blob)) == state
    assert encode({"value": 1, "stamp": [1, 0, "o"], "tag": "t"}) == orjson.dumps(
        {"value": 1, "stamp": [1, 0, "o"], "tag": "t"}
    )
    assert to_json(None) is None
