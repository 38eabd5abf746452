"""potboiler.kv.encoding: both stored forms of a state read back as the JSON state crdts works on."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from potboiler.kv.crdts import JSON
from potboiler.kv.encoding import LwwRecord, decode, encode, to_json
from potboiler.server.jsonvalue import from_value, to_value

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None, derandomize=True, database=None)
@given(
    json_values,
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.text(max_size=40),
    st.text(max_size=40),
)
def test_an_lww_record_round_trips_to_the_json_state(
    value: JSON, wall: int, logical: int, owner: str, tag: str
) -> None:
    record = LwwRecord(wall, logical, owner, tag, to_value(value).SerializeToString())
    assert decode(encode(record)) == record
    stamp: list[JSON] = [wall, logical, owner]
    assert to_json(record) == {"value": from_value(to_value(value)), "stamp": stamp, "tag": tag}
    assert record.message() == to_value(value)


def test_json_states_are_stored_as_json() -> None:
    state: JSON = {"counts": {"o": {"seq": 1, "p": 2**70, "n": 0.5}}}
    blob = encode(state)
    assert blob.startswith(b"{")
    assert decode(blob) == to_json(decode(blob)) == state
    assert encode({"value": 1, "stamp": [1, 0, "o"], "tag": "t"}) == orjson.dumps(
        {"value": 1, "stamp": [1, 0, "o"], "tag": "t"}
    )
    assert to_json(None) is None
