"""How `potboiler.kv.state` keeps a key's CRDT state in its store: JSON, or a binary LWW record.

- Every state made by the generic CRDT code (`potboiler.kv.crdts`) is stored as JSON (orjson), always an
  object, so its blob starts with ``{``.
- An LWW register set on the apply fast path is stored as an `LwwRecord`: the log entry whose event set
  the value (an LWW `set`, or a `set` made where its table was not known yet, whose change is the
  value), serialized as it was delivered, behind the two numbers of its stamp. Applying a set then
  neither converts the value to JSON nor serializes anything (it keeps bytes it already has), and most
  comparisons of two writes read no entry; a GET answers the value as the `google.protobuf.Value` it
  arrived in. Its blob is ``\\x02`` + wall_ms + logical (u64 BE each) + the entry.
- Stores written by earlier versions hold records of the form ``\\x01`` + header (wall_ms, logical,
  owner and tag lengths) + owner + tag + value; they read back as records too.

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
from potboiler.v1.entry_pb2 import Entry

_MARK = b"\x02"
_HEAD = struct.Struct(">cQQ")  # marker, wall_ms, logical
_OLD_MARK = b"\x01"
_OLD_HEAD = struct.Struct(">cQQHH")  # marker, wall_ms, logical, len(owner), len(tag)


class LwwRecord(NamedTuple):
    """An LWW register state: the serialized log entry whose LWW `set` event wrote its value.

    Of two writes the register keeps the one with the highest (wall_ms, logical, owner, tag): its
    entry's stamp, owner and id, as `crdts` does with (stamp, tag). The stamp is kept beside the entry
    so that comparing two writes reads neither entry unless their stamps are equal."""

    wall_ms: int
    logical: int
    #: The entry, serialized; its data is the KV event {"crdt": "LWW", "change": {"op": "set", "value":
    #: ...}, ...}, or {"crdt": null, "change": <the value>, ...}.
    entry: bytes

    def rank(self) -> tuple[int, int, str, str]:
        """(wall_ms, logical, owner, tag): what decides between two writes."""
        entry = Entry.FromString(self.entry)
        return self.wall_ms, self.logical, entry.owner, entry.id

    def message(self) -> Value:
        """The register's value as a Value."""
        return _value_of(Entry.FromString(self.entry))

    def to_json(self) -> JSON:
        """The LWW state `crdts` would hold: {"value", "stamp": [wall_ms, logical, owner], "tag"}."""
        entry = Entry.FromString(self.entry)
        return {
            "value": from_value(_value_of(entry)),
            "stamp": [self.wall_ms, self.logical, entry.owner],
            "tag": entry.id,
        }


def _value_of(entry: Entry) -> Value:
    fields = entry.data.struct_value.fields
    crdt = fields.get("crdt")
    if crdt is not None and crdt.WhichOneof("kind") == "null_value":
        return fields["change"]  # a set made where the table was not known: its change is the value
    return fields["change"].struct_value.fields["value"]


#: A state as KvState holds it in memory: plain JSON, or an LWW record.
Stored: TypeAlias = JSON | LwwRecord


def encode(state: Stored) -> bytes:
    """The blob stored for a state."""
    if isinstance(state, LwwRecord):
        return _HEAD.pack(_MARK, state.wall_ms, state.logical) + state.entry
    try:
        return orjson.dumps(state)
    except TypeError:  # an integer beyond 64 bits (a huge counter): the standard library has no limit
        return json.dumps(state, separators=(",", ":")).encode()


def decode(blob: bytes) -> Stored:
    """The state of a stored blob (an LWW record stays a record: its value is decoded on demand)."""
    mark = blob[:1]
    if mark == _MARK:
        _, wall, logical = _HEAD.unpack_from(blob)
        return LwwRecord(wall, logical, blob[_HEAD.size :])
    if mark == _OLD_MARK:
        return _old_record(blob)
    parsed: JSON = orjson.loads(blob)
    return parsed


def _old_record(blob: bytes) -> LwwRecord:
    """The record of a blob of the earlier form: its entry holds the owner, the id (the tag) and the
    value, which is all a record reads of it."""
    _, wall, logical, n_owner, n_tag = _OLD_HEAD.unpack_from(blob)
    owner_at = _OLD_HEAD.size
    tag_at = owner_at + n_owner
    value_at = tag_at + n_tag
    entry = Entry(owner=blob[owner_at:tag_at].decode(), id=blob[tag_at:value_at].decode())
    _value_of(entry).MergeFromString(blob[value_at:])
    return LwwRecord(wall, logical, entry.SerializeToString())


def to_json(state: Stored | None) -> JSON | None:
    """The JSON form of a state (None stays None)."""
    return state.to_json() if isinstance(state, LwwRecord) else state
