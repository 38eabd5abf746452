"""KV change events: what a KV write appends to the log, and how a node recognises one.

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

Entries of the log whose data is not exactly such an object are not KV events and are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import cast

from potboiler.kv.crdts import JSON, CrdtType, valid_ops
from potboiler.server.errors import InvalidArgument

#: The built-in LWW table holding each table's type: key = table name, value = {"crdt": "<type>"}.
CONFIG_TABLE = "_config"

_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
_FIELDS = frozenset(("table", "key", "crdt", "op", "change"))
_FIELDS_OBSERVED = _FIELDS | {"observed"}

#: Every op name of every table type, and the types accepting each.
TYPES_OF_OP: dict[str, tuple[CrdtType, ...]] = {}
for _crdt in CrdtType:
    for _op in valid_ops(_crdt):
        TYPES_OF_OP[_op] = (*TYPES_OF_OP.get(_op, ()), _crdt)


def is_name(name: str) -> bool:
    """Whether `name` is a valid table or key name."""
    return _NAME.fullmatch(name) is not None


def check_name(name: str, what: str) -> str:
    """`name` if it is a valid table or key name, else InvalidArgument saying why."""
    if not is_name(name):
        shown = name if len(name) <= 40 else name[:37] + "..."
        raise InvalidArgument(
            f"{what} name {shown!r} is invalid: use 1 to 128 letters, digits, '_' or '-'"
            + (f" (it has {len(name)} characters)" if len(name) > 128 else "")
        )
    return name


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


_CRDT_BY_NAME = {c.value: c for c in CrdtType}


def parse_event(data: JSON) -> KvEvent | None:
    """The KV event in an entry's data, or None if the data is not one."""
    if not isinstance(data, dict) or (data.keys() != _FIELDS and data.keys() != _FIELDS_OBSERVED):
        return None
    table, key, crdt, op = data["table"], data["key"], data["crdt"], data["op"]
    if not (isinstance(table, str) and isinstance(key, str) and isinstance(op, str)):
        return None
    if not (is_name(table) and is_name(key)) or op not in TYPES_OF_OP:
        return None
    if "observed" in data:
        observed = data["observed"]
        if (
            crdt is not None
            or not isinstance(observed, list)
            or not all(isinstance(t, str) for t in observed)
        ):
            return None
        return KvEvent(table, key, None, op, data["change"], tuple(cast(list[str], observed)))
    if crdt is None:
        return KvEvent(table, key, None, op, data["change"])
    if not isinstance(crdt, str) or crdt not in _CRDT_BY_NAME:
        return None
    return KvEvent(table, key, _CRDT_BY_NAME[crdt], op, data["change"])
