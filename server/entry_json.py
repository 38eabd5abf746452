"""The REST/webhook JSON shape of an entry:
{"data", "dependencies", "id", "next", "owner", "prev", "seq", "when": {"wall_ms", "logical"}},
with null `next` / `prev` when there is none."""

from __future__ import annotations

import orjson
from google.protobuf.struct_pb2 import NULL_VALUE, Struct

from potboiler.server.jsonvalue import from_struct
from potboiler.v1.entry_pb2 import Entry


def entry_struct(entry: Entry) -> Struct:
    """The entry as a Struct (what GET /log/{id} answers)."""
    out = Struct()
    f = out.fields
    f["data"].CopyFrom(entry.data)
    deps = f["dependencies"].list_value
    deps.SetInParent()
    for d in entry.dependencies:
        deps.values.add().string_value = d
    f["id"].string_value = entry.id
    for name, text in (("next", entry.next), ("prev", entry.prev)):
        if text:
            f[name].string_value = text
        else:
            f[name].null_value = NULL_VALUE
    f["owner"].string_value = entry.owner
    f["seq"].number_value = entry.seq
    when = f["when"].struct_value.fields
    when["wall_ms"].number_value = entry.when.wall_ms
    when["logical"].number_value = entry.when.logical
    return out


def entry_json(entry: Entry) -> bytes:
    """The entry as compact JSON bytes (what webhooks receive), printed as GET /log/{id} prints it:
    keys sorted, integral numbers as integers (protobuf's own printer writes every Struct number as
    a float)."""
    return orjson.dumps(from_struct(entry_struct(entry)), option=orjson.OPT_SORT_KEYS)
