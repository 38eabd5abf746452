"""KV change events: what a KV write appends to the log.

An event is the JSON object (the entry's `data`)::

    {"table": "<table>", "key": "<key>", "crdt": "<type>" | null, "op": "<op>", "change": <JSON>}

- `crdt` names the table type the write was prepared for (on the node that took it), and `change` is
  then the CRDT payload made by :func:`potboiler.kv.crdts.prepare` (it carries the observed context: the
  OR-Set tags a remove takes away, the MV-Register values a set supersedes).
- `crdt` is null when the writing node did not know the table yet: `change` is then the client's change
  as it was sent, and every node prepares it against an empty state, for every table type whose ops
  include `op` (so the result does not depend on when a node learns the table's type). Such an event
  may carry a sixth member, `"observed": [<tag>…]`: the observed context the writing node had (the
  OR-Set adds a remove takes away, the MV-Register values a set supersedes, from the earlier writes
  it had applied to the candidate types), which every node then gives the prepared payload.

Entries of the log whose data is not exactly such an object (with valid names, see
:mod:`potboiler.server.names`, and a known op and type) are not KV events and are ignored: the applier
recognises events straight from an entry's protobuf Struct (`potboiler.kv.state`).
"""

from __future__ import annotations

from dataclasses import dataclass

from potboiler.kv.crdts import CrdtType, valid_ops
from potboiler.server.jsonvalue import JSON

#: The built-in LWW table holding each table's type: key = table name, value = {"crdt": "<type>"}.
CONFIG_TABLE = "_config"

#: Every op name of every table type, and the types accepting each.
TYPES_OF_OP: dict[str, tuple[CrdtType, ...]] = {}
for _crdt in CrdtType:
    for _op in valid_ops(_crdt):
        TYPES_OF_OP[_op] = (*TYPES_OF_OP.get(_op, ()), _crdt)


@dataclass(frozen=True)
class KvEvent:
    """A KV change event (see the module docstring)."""

    table: str
    key: str
    #: The type the change was prepared for, or None for a write to a table its node did not know.
    crdt: CrdtType | None
    op: str
    change: JSON
    #: For a write to a table its node did not know: the tags of its observed context.
    observed: tuple[str, ...] = ()

    def to_json(self) -> JSON:
        """The event as entry data."""
        data: dict[str, JSON] = {
            "table": self.table,
            "key": self.key,
            "crdt": None if self.crdt is None else self.crdt.value,
            "op": self.op,
            "change": self.change,
        }
        if self.observed:
            data["observed"] = list(self.observed)
        return data
