"""The REST/webhook JSON shape of an entry:
{"data", "dependencies", "id", "next", "owner", "prev", "seq", "when": {"wall_ms", "logical"}},
with null `next` / `prev` when there is none."""

from __future__ import annotations

from potboiler.server.jsonvalue import JSON, from_value, json_text
from potboiler.v1.entry_pb2 import Entry


def entry_dict(entry: Entry) -> dict[str, JSON]:
    """The entry as plain JSON (integral numbers of its data as integers)."""
    return {
        "data": from_value(entry.data),
        "dependencies": list(entry.dependencies),
        "id": entry.id,
        "next": entry.next or None,
        "owner": entry.owner,
        "prev": entry.prev or None,
        "seq": entry.seq,
        "when": {"wall_ms": entry.when.wall_ms, "logical": entry.when.logical},
    }


def entry_json(entry: Entry) -> bytes:
    """The entry as compact JSON text, keys sorted: what GET /log/{id} answers and webhooks receive."""
    return json_text(entry_dict(entry))
