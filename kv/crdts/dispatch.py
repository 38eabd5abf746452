"""The public functions of the CRDT package, for a table of any type: each checks the op against the
table's type and hands the work to the type's module (:mod:`.lww`, :mod:`.orset`, :mod:`.gset`,
:mod:`.counter`, :mod:`.mvregister`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from potboiler.kv.crdts.checks import _check_json, _kind, _obj, _show
from potboiler.kv.crdts.counter import _amount, _pn_add, _pn_apply, _pn_merge, _pn_prepare, _pn_value
from potboiler.kv.crdts.elements import _create_change, _element
from potboiler.kv.crdts.errors import InvalidOperation
from potboiler.kv.crdts.gset import (
    _GElement,
    _gset_add,
    _gset_apply,
    _gset_create,
    _gset_elements,
    _gset_merge,
    _gset_prepare,
    _gset_shown,
)
from potboiler.kv.crdts.lww import _load_lww, _lww_apply, _lww_merge, _lww_set
from potboiler.kv.crdts.mvregister import (
    _load_mv_value,
    _mv_apply,
    _mv_merge,
    _mv_set,
    _mv_value,
    _MvValue,
    _raw_mv,
)
from potboiler.kv.crdts.orset import (
    _or_add,
    _OrAdd,
    _orset_add,
    _orset_apply,
    _orset_merge,
    _orset_prepare,
    _orset_remove,
    _orset_value,
    _raw_orset,
)
from potboiler.kv.crdts.types import _OPS, CrdtType, EventContext
from potboiler.server.jsonvalue import JSON


def _check_op(crdt: CrdtType, op: object) -> str:
    if not isinstance(op, str):
        raise InvalidOperation(f"op must be a string, got {_kind(op)}")
    if op not in _OPS[crdt]:
        raise InvalidOperation(
            f"op {_show(op)} does not apply to {crdt.value} tables (valid ops: {', '.join(_OPS[crdt])})"
        )
    return op


def prepare(crdt: CrdtType, state: JSON | None, op: str, change: JSON) -> JSON:
    """Validate a client's ``op``/``change`` for a ``crdt`` table and build the event payload to append.

    ``state`` is the local node's current state of the key (``None`` if it has none); it supplies the
    observed context: an OR-Set ``remove`` carries the tags of the adds of that element seen here (an
    ``add`` those it replaces), an MV-Register ``set`` the tags of the values it supersedes.  Payloads
    are dicts ``{"op": op, …}``.  Raises :class:`InvalidOperation` for an op not fitting the type or a
    malformed change.
    """
    op = _check_op(crdt, op)
    if crdt is CrdtType.LWW:
        return {"op": "set", "value": _check_json(change, "LWW 'set' value")}
    if crdt is CrdtType.ORSET:
        return _orset_prepare(state, op, change)
    if crdt is CrdtType.GSET:
        return _gset_prepare(op, change)
    if crdt is CrdtType.PNCOUNTER:
        return _pn_prepare(state, op, change)
    new_value = _check_json(change, "MV-Register 'set' value")
    supersedes: list[JSON] = [tag for tag in sorted(_raw_mv(state).values)]
    return {"op": "set", "value": new_value, "supersedes": supersedes}


def observed_tags(payload: JSON) -> list[str]:
    """The tags (entry ids) a payload made by :func:`prepare` takes away or supersedes."""
    if not isinstance(payload, dict):
        return []
    tags = payload.get("tags", payload.get("supersedes"))
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def causal_dependencies(crdt: CrdtType, state: JSON | None, payload: JSON) -> list[str]:
    """The entries an event made by :func:`prepare` on ``state`` must be delivered after, as few as
    do it: of the tags its payload takes away or supersedes, the newest of each owner (a node's
    entries are delivered in their order, so its newest brings the others first). Listing every tag
    would run past an entry's limit of dependencies with enough concurrent values on one key."""
    tags = observed_tags(payload)
    if not tags:
        return []
    held: Mapping[str, _OrAdd | _MvValue]
    if crdt is CrdtType.ORSET:
        raw = _raw_orset(state)
        held = {tag: _or_add(tag, raw.adds[tag]) for tag in tags if tag in raw.adds}
    elif crdt is CrdtType.MVREGISTER:
        values = _raw_mv(state).values
        held = {tag: _load_mv_value(tag, values[tag]) for tag in tags if tag in values}
    else:
        held = {}
    newest: dict[str, tuple[int, str]] = {}
    unknown: list[str] = []
    for tag in tags:
        entry = held.get(tag)
        if entry is None:
            unknown.append(tag)  # not in the state it was prepared on (not made here): keep it
        elif entry.owner not in newest or entry.seq > newest[entry.owner][0]:
            newest[entry.owner] = (entry.seq, tag)
    return unknown + sorted(tag for _, tag in newest.values())


def apply(crdt: CrdtType, state: JSON | None, payload: JSON, ctx: EventContext) -> JSON:
    """Apply the event payload ``payload`` (made by :func:`prepare`, possibly on another node) to ``state``.

    ``state`` is ``None`` when the key has no state yet; the result is ``None`` only for an OR-Set
    ``remove`` on such a key (it takes nothing away, and the key stays missing).  Applying an event
    that is already reflected in ``state`` (a duplicate delivery) returns ``state`` unchanged.  Raises
    :class:`InvalidOperation` if the payload or the state does not fit ``crdt``: of the elements of an
    OR-Set or G-Set state (the values of an MV-Register's), only those the op reads are checked (states
    are written by this package; a set of thousands of elements is not checked whole at every op).
    """
    body = _obj(payload, f"{crdt.label} payload")
    op = _check_op(crdt, body.get("op"))
    if crdt is CrdtType.LWW:
        return _lww_apply(state, body, ctx)
    if crdt is CrdtType.ORSET:
        return _orset_apply(state, op, body, ctx)
    if crdt is CrdtType.GSET:
        return _gset_apply(state, op, body, ctx)
    if crdt is CrdtType.PNCOUNTER:
        return _pn_apply(state, op, body, ctx)
    return _mv_apply(state, body, ctx)


def apply_change(
    crdt: CrdtType, state: JSON | None, op: str, change: JSON, observed: Iterable[str], ctx: EventContext
) -> JSON:
    """:func:`apply` of the payload :func:`prepare` makes of ``op``/``change`` against no state, with
    ``observed`` as its observed context (the tags it takes away or supersedes, for the types that
    have one), without making that payload and checking it again: how every node applies a write
    made where the table's type was not known yet. A tag the state does not hold takes nothing away,
    so one list serves every candidate type. Raises :class:`InvalidOperation` as :func:`prepare` and
    :func:`apply` do."""
    op = _check_op(crdt, op)
    if crdt is CrdtType.LWW:
        return _lww_set(state, _check_json(change, "LWW 'set' value"), ctx)
    if crdt is CrdtType.MVREGISTER:
        return _mv_set(state, _check_json(change, "MV-Register 'set' value"), observed, ctx)
    if crdt is CrdtType.PNCOUNTER:
        # Against no state, an amount prepare() takes cannot overflow: _amount checks all it would.
        return _pn_add(state, op, _amount(change, f"PN-Counter {op!r} amount"), ctx)
    if op == "create":
        _create_change(crdt, change)
        return _gset_create(state) if crdt is CrdtType.GSET else _orset_add(state, (), None, ctx)
    if crdt is CrdtType.GSET:
        item, key, metadata = _element(change, "G-Set 'add' change", ("item", "key", "metadata"))
        return _gset_add(state, _GElement(item, key, metadata, ctx.stamp, ctx.tag))
    if op == "add":
        item, key, metadata = _element(change, "OR-Set 'add' change", ("item", "key", "metadata"))
        return _orset_add(state, observed, _OrAdd(item, key, metadata, ctx.owner, ctx.seq, ctx.stamp), ctx)
    _element(change, "OR-Set 'remove' change", ("item", "key"))
    return _orset_remove(state, observed)


_MERGES: dict[CrdtType, Callable[[JSON, JSON], JSON]] = {
    CrdtType.LWW: _lww_merge,
    CrdtType.ORSET: _orset_merge,
    CrdtType.GSET: _gset_merge,
    CrdtType.PNCOUNTER: _pn_merge,
    CrdtType.MVREGISTER: _mv_merge,
}


def merge(crdt: CrdtType, a: JSON | None, b: JSON | None) -> JSON | None:
    """The join of two states of one key: commutative, associative and idempotent.

    ``None`` (no state) is the identity.  For states reached by applying causally closed sets of events
    ``E1`` and ``E2``, the result equals the state reached by applying the union of ``E1`` and ``E2``:
    the tests check both, each type's merge laws on this function and the result against applying the
    events.  Not on the serving path: nodes exchange events (:func:`apply`), never states.
    """
    if a is None:
        return b if b is None else _MERGES[crdt](b, b)
    if b is None:
        return _MERGES[crdt](a, a)
    return _MERGES[crdt](a, b)


def value(crdt: CrdtType, state: JSON | None) -> JSON:
    """The ``GET`` answer for ``state``.

    LWW: the value written; OR-Set / G-Set: ``[{"item", "key", "metadata"}, …]`` sorted by ``(key, item)``;
    PN-Counter: the number (an int when every contribution is an int); MV-Register: the list of concurrent
    values, newest ``(stamp, tag)`` first, equal values listed once.  For ``state=None`` (a key that does
    not exist — the service should answer 404 instead) it gives the empty value: ``None``, ``[]`` or ``0``.
    """
    if crdt is CrdtType.LWW:
        return None if state is None else _load_lww(state).value
    if crdt is CrdtType.ORSET:
        return [] if state is None else _orset_value(state)
    if crdt is CrdtType.GSET:
        # Stored sorted by (key, item), one per element (see _gset_apply).
        return [] if state is None else [_gset_shown(raw, i) for i, raw in enumerate(_gset_elements(state))]
    if crdt is CrdtType.PNCOUNTER:
        return _pn_value(state)
    return _mv_value(state)
