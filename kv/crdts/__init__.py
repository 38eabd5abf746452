"""Pure CRDT logic of Potboiler's replicated key/value store (no I/O, no gRPC, no storage).

Every KV write becomes one event of the replicated log.  The KV service calls :func:`prepare` to validate a
client's ``{"op": …, "change": …}`` against the table's type and to turn it into the event payload (reading
the local state where the CRDT needs observed context), appends the payload, and every node (the author
included) then calls :func:`apply` with the event's identity (:class:`EventContext`), and :func:`value` gives the
``GET`` answer.  :func:`merge`, the equivalent state-based join, is not on the serving path (nodes
exchange events, never states): the tests state each type's merge laws on it and check it against
applying events.

Delivery assumptions (guaranteed by the log): each event reaches every node in causal order — an owner's
events in ``seq`` order, and an event only after every event its author had applied.  Events may be
delivered more than once: :func:`apply` and :func:`merge` are idempotent.  ``seq`` is the owner's log
sequence number across *all* tables and keys, so the seqs seen by one key may have gaps.

States are plain JSON values (dicts with str keys, lists, str, int, float, bool, None) and are produced in a
canonical form (dict keys and lists sorted), so two nodes that applied the same events hold equal states.
Stamps are stored as ``[wall_ms, logical, owner]``.  Each type's module describes the shape of its state.

The functions never mutate their arguments; results may share sub-objects (items, values) with them.

The modules, each holding one thing:

- ``dispatch``: the functions above (and :func:`apply_change`, :func:`causal_dependencies`,
  :func:`observed_tags`), for a table of any type;
- ``lww``, ``orset``, ``gset``, ``counter``, ``mvregister``: one CRDT type each (its state's shape, how an op
  is prepared, applied and merged, its value);
- ``dotted``: the dotted stores the OR-Set and the MV-Register share (version vector, entries with dots);
- ``elements``: the identity and parsing of the elements of the OR-Set and the G-Set;
- ``types``: :class:`CrdtType` and its ops, :class:`Stamp`, :class:`EventContext`;
- ``checks``: the JSON and field checks every type shares, and :func:`canonical_json`;
- ``errors``: :class:`InvalidOperation`.
"""

from potboiler.kv.crdts.checks import canonical_json
from potboiler.kv.crdts.counter import MAX_COUNTER_INT, counter_total
from potboiler.kv.crdts.dispatch import (
    apply,
    apply_change,
    causal_dependencies,
    merge,
    observed_tags,
    prepare,
    value,
)
from potboiler.kv.crdts.errors import InvalidOperation
from potboiler.kv.crdts.types import CRDT_BY_NAME, CrdtType, EventContext, Stamp, valid_ops
from potboiler.server.jsonvalue import JSON

__all__ = [
    "CRDT_BY_NAME",
    "JSON",
    "MAX_COUNTER_INT",
    "CrdtType",
    "EventContext",
    "InvalidOperation",
    "Stamp",
    "apply",
    "apply_change",
    "canonical_json",
    "causal_dependencies",
    "counter_total",
    "merge",
    "observed_tags",
    "prepare",
    "valid_ops",
    "value",
]
