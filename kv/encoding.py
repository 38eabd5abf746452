"""How `potboiler.kv.state` keeps a key's CRDT state in its store: JSON, or a binary LWW record.

- Every state made by the generic CRDT code (`potboiler.kv.crdts`) is stored as JSON (orjson), always an
  object, so its blob starts with ``{``.
- An LWW register set on the apply fast path is stored as an `LwwRecord`: its stamp and tag, and its
  value as the serialized `google.protobuf.Value` it arrived in. Applying a set then never converts the
  value to JSON (the cost that dominated a rebuild from the log), and a GET answers the Value as is.
  Its blob is ``\\x01`` + header (wall_ms, logical, owner and tag lengths) + owner + tag + value.

Both forms read back as the same JSON state (`to_json`), so which one a node holds is invisible outside
this module and `potboiler.kv.state`.
"""

from __future__ import annotations

import json
import struct
from typing import NamedTuple, TypeAlias

import orjson
from google.protobuf.struct_pb2 import Value

from potboiler.kv.crdts import JSON
from potboiler.server.jsonvalue import from_value

_RECORD = 1
_MARK = bytes([_RECORD])
_HEAD = struct.Struct(">BQQHH")  # marker, wall_ms, logical, len(owner), len(tag)


class LwwRecord(NamedTuple):
    """An LWW register state whose value is still a serialized `google.protobuf.Value`.

    The first four fields are the write's rank: the register keeps the write with the highest
    (wall_ms, logical, owner, tag), as `crdts` does with (stamp, tag)."""

    wall_ms: int
    logical: int
    owner: str
    tag: str
    #: The value, as `Value.SerializeToString()`.
    value: bytes

    def message(self) -> Value:
        """The register's value as a Value."""
        return Value.FromString(self.value)

    def to_json(self) -> JSON:
        """The LWW state `crdts` would hold: {"value", "stamp": [wall_ms, logical, owner], "tag"}."""
        return {
            "value": from_value(self.message()),
            "stamp": [self.wall_ms, self.logical, self.owner],
            "tag": self.tag,
        }


#: A state as KvState holds it in memory: plain JSON, or an LWW record.
Stored: TypeAlias = JSON | LwwRecord


def encode(state: Stored) -> bytes:
    """The blob stored for a state."""
    if isinstance(state, LwwRecord):
        owner, tag = state.owner.encode(), state.tag.encode()
        return (
            _HEAD.pack(_RECORD, state.wall_ms, state.logical, len(owner), len(tag))
            + owner
            + tag
            + state.value
        )
    try:
        return orjson.dumps(state)
    except TypeError:  # an integer beyond 64 bits (a huge counter): the standard library has no limit
        return json.dumps(state, separators=(",", ":")).encode()


def decode(blob: bytes) -> Stored:
    """The state of a stored blob (an LWW record stays a record: its value is decoded on demand)."""
    if blob[:1] != _MARK:
        parsed: JSON = orjson.loads(blob)
        return parsed
    _, wall, logical, n_owner, n_tag = _HEAD.unpack_from(blob)
    start = _HEAD.size
    owner = blob[start : start + n_owner].decode()
    tag = blob[start + n_owner : start + n_owner + n_tag].decode()
    return LwwRecord(wall, logical, owner, tag, blob[start + n_owner + n_tag :])


def to_json(state: Stored | None) -> JSON | None:
    """The JSON form of a state (None stays None)."""
    return state.to_json() if isinstance(state, LwwRecord) else state
