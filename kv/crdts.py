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
Stamps are stored as ``[wall_ms, logical, owner]``.  The state shapes are:

``LWW``
    ``{"value": <JSON>, "stamp": [w, l, owner], "tag": "<event id>"}`` — the write with the highest
    ``(stamp, tag)`` wins.
``ORSET``
    ``{"vv": {owner: seq}, "adds": {tag: {"item": …, "key": "…", "metadata": …, "owner": "…", "seq": n,
    "stamp": [w, l, owner]}}}`` — an observed-remove set without tombstones (the "ORSWOT" design): ``adds``
    holds only the live adds, each identified by its event tag and its dot ``(owner, seq)``, and ``vv``
    holds, per owner, the highest seq of that owner's adds and creates applied to this key.  A dot covered
    by ``vv`` but missing from ``adds`` was removed, which is what lets :func:`merge` tell "removed" from
    "not yet seen" and what makes a duplicate add a no-op.  A ``remove`` carries the tags of the adds of
    that element its node had seen and takes them away, nothing more (it records no dot), so a remove
    that takes nothing away leaves a key without a state as it is: missing.  An ``add`` likewise carries
    (as ``supersedes``) the tags of the adds of the same element its node had seen and replaces them, so
    the live adds of an element are only the concurrent ones.  The state grows with the live elements and the number of writing nodes only.  The
    price of having no tombstones is that correctness relies on causal delivery: an add applied after a
    remove that had seen it (impossible with the log's guarantee) would come back.
``GSET``
    ``{"elements": [{"item": …, "key": "…", "metadata": …, "stamp": [w, l, owner], "tag": "…"}, …]}`` —
    one entry per element (the add with the highest ``(stamp, tag)``), sorted by ``(key, item)``.
``PNCOUNTER``
    ``{"counts": {owner: {"seq": n, "p": <number>, "n": <number>}}}`` — per owner the totals of its
    increments (``p``) and decrements (``n``) and the highest seq folded in.  :func:`prepare` refuses an
    amount that would take the local totals past :data:`MAX_COUNTER_INT` or the float range; a float total
    that concurrent writers still push past the float range is answered as the largest finite float.
``MVREGISTER``
    ``{"vv": {owner: seq}, "values": {tag: {"value": …, "owner": "…", "seq": n, "stamp": [w, l, owner]}}}``
    — the same dotted design as the OR-Set: a ``set`` carries the tags of the values it supersedes (those its
    node had seen), so the live values are exactly the concurrent writes.

Element identity in the OR-Set and the G-Set is ``(item, key)``, items compared by canonical JSON
(:func:`canonical_json`, so ``1``, ``1.0`` and ``true`` are different items).  When an element has several
live (concurrent) adds, its metadata is the one of the add with the highest ``(stamp, tag)``.

The functions never mutate their arguments; results may share sub-objects (items, values) with them.
"""

from __future__ import annotations

import bisect
import enum
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol, TypeVar, cast

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

MAX_COUNTER_INT = 2**63 - 1
"""Largest integer a PN-Counter amount (and a node's running total) may reach, so states fit int64 JSON."""


class InvalidOperation(ValueError):
    """An op, change, payload or state that does not fit a CRDT; the message says exactly what is wrong."""


class CrdtType(enum.Enum):
    """The table types of the KV store."""

    LWW = "LWW"
    ORSET = "ORSET"
    GSET = "GSET"
    PNCOUNTER = "PNCOUNTER"
    MVREGISTER = "MVREGISTER"

    @classmethod
    def parse(cls, name: object) -> CrdtType:
        """Return the type called ``name`` (exact spelling), or raise :class:`InvalidOperation`."""
        if isinstance(name, str) and (crdt := CRDT_BY_NAME.get(name)) is not None:
            return crdt
        valid = ", ".join(member.value for member in cls)
        raise InvalidOperation(f"unknown crdt type {_show(name)} (valid types: {valid})")

    @property
    def label(self) -> str:
        """Human-readable name used in messages, e.g. ``OR-Set``."""
        return _LABELS[self]


CRDT_BY_NAME: dict[str, CrdtType] = {c.value: c for c in CrdtType}
"""Each table type by its name (the exact spelling; :meth:`CrdtType.parse` says what is wrong)."""

_LABELS = {
    CrdtType.LWW: "LWW",
    CrdtType.ORSET: "OR-Set",
    CrdtType.GSET: "G-Set",
    CrdtType.PNCOUNTER: "PN-Counter",
    CrdtType.MVREGISTER: "MV-Register",
}

_OPS: dict[CrdtType, tuple[str, ...]] = {
    CrdtType.LWW: ("set",),
    CrdtType.ORSET: ("create", "add", "remove"),
    CrdtType.GSET: ("create", "add"),
    CrdtType.PNCOUNTER: ("increment", "decrement"),
    CrdtType.MVREGISTER: ("set",),
}


def valid_ops(crdt: CrdtType) -> tuple[str, ...]:
    """The op names a table of type ``crdt`` accepts."""
    return _OPS[crdt]


@dataclass(frozen=True, order=True)
class Stamp:
    """An HLC stamp of an event, totally ordered by ``(wall_ms, logical, owner)``."""

    wall_ms: int
    logical: int
    owner: str

    def to_json(self) -> JSON:
        """The ``[wall_ms, logical, owner]`` form stored in states."""
        return [self.wall_ms, self.logical, self.owner]

    @classmethod
    def from_json(cls, raw: JSON, what: str = "stamp") -> Stamp:
        """Parse the ``[wall_ms, logical, owner]`` form, raising :class:`InvalidOperation` if malformed."""
        if isinstance(raw, list) and len(raw) == 3:
            wall, logical, owner = raw
            if _is_int(wall) and _is_int(logical) and isinstance(owner, str):
                return cls(int(cast(int, wall)), int(cast(int, logical)), owner)
        raise InvalidOperation(f"{what} must be [wall_ms, logical, owner], got {_show(raw)}")


@dataclass(frozen=True)
class EventContext:
    """Identity of the log event carrying an op: unique tag, owner node, owner's seq and HLC stamp."""

    tag: str
    owner: str
    seq: int
    stamp: Stamp

    def __post_init__(self) -> None:
        if not _is_int(self.seq) or self.seq < 1:
            raise InvalidOperation(f"event seq must be a positive integer, got {_show(self.seq)}")


# --------------------------------------------------------------------------------------------------
# small JSON helpers


def canonical_json(data: JSON) -> str:
    """Canonical JSON text of ``data`` (sorted keys, no spaces): equal JSON values give equal strings."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _kind(x: object) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "a boolean"
    if isinstance(x, int | float):
        return "a number"
    if isinstance(x, str):
        return "a string"
    if isinstance(x, list):
        return "a list"
    if isinstance(x, dict):
        return "an object"
    return type(x).__name__


def _show(x: object) -> str:
    text = repr(x) if isinstance(x, str) else _kind(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_json(data: object, what: str) -> JSON:
    """Return ``data`` typed as JSON after checking it really is plain, finite JSON."""
    if type(data) in _PLAIN:  # most items and values: nothing to walk
        return cast(JSON, data)
    stack: list[object] = [data]
    while stack:
        x = stack.pop()
        if x is None or isinstance(x, bool | int | str):
            continue
        if isinstance(x, float):
            if not math.isfinite(x):
                raise InvalidOperation(f"{what} contains a non-finite number ({x})")
        elif isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, dict):
            for k, v in x.items():
                if not isinstance(k, str):
                    raise InvalidOperation(f"{what} contains an object key that is not a string ({k!r})")
                if type(v) not in _PLAIN:
                    stack.append(v)
        else:
            raise InvalidOperation(f"{what} contains a value that is not JSON ({type(x).__name__})")
    return cast(JSON, data)


#: The types of the JSON scalars `_check_json` takes as they are (a float may be NaN or infinite).
_PLAIN = frozenset({str, int, bool, type(None)})


def _obj(x: JSON, what: str) -> dict[str, JSON]:
    if not isinstance(x, dict):
        raise InvalidOperation(f"{what} must be an object, got {_kind(x)}")
    return x


def _no_unknown_fields(d: Mapping[str, JSON], allowed: tuple[str, ...], what: str) -> None:
    for k in d:
        if k not in allowed:
            unknown = sorted(k for k in d if k not in allowed)
            names = ", ".join(repr(k) for k in unknown)
            raise InvalidOperation(f"{what} has unknown field(s) {names} (allowed: {', '.join(allowed)})")


def _str_field(d: Mapping[str, JSON], name: str, what: str) -> str:
    x = d.get(name)
    if not isinstance(x, str):
        raise InvalidOperation(f"{what} needs a string {name!r}")
    return x


def _int_field(d: Mapping[str, JSON], name: str, what: str) -> int:
    x = d.get(name)
    if not isinstance(x, int) or isinstance(x, bool):
        raise InvalidOperation(f"{what} needs an integer {name!r}")
    return x


def _tags_field(d: Mapping[str, JSON], name: str, what: str) -> list[str]:
    x = d.get(name)
    if not isinstance(x, list) or not all(isinstance(t, str) for t in x):
        raise InvalidOperation(f"{what} needs a list of string tags {name!r}")
    return [t for t in x if isinstance(t, str)]


def _load_vv(raw: JSON, what: str) -> dict[str, int]:
    vv = _obj(raw, what)
    out: dict[str, int] = {}
    for owner, seq in vv.items():
        if not _is_int(seq):
            raise InvalidOperation(f"{what} maps {owner!r} to {_kind(seq)}, not a seq")
        assert isinstance(seq, int)
        out[owner] = seq
    return out


def _dump_vv(vv: Mapping[str, int]) -> JSON:
    return {owner: vv[owner] for owner in sorted(vv)}


def _element_id(item: JSON, key: str) -> str:
    return canonical_json([key, item])


def _check_op(crdt: CrdtType, op: object) -> str:
    if not isinstance(op, str):
        raise InvalidOperation(f"op must be a string, got {_kind(op)}")
    if op not in _OPS[crdt]:
        raise InvalidOperation(
            f"op {_show(op)} does not apply to {crdt.value} tables (valid ops: {', '.join(_OPS[crdt])})"
        )
    return op


# --------------------------------------------------------------------------------------------------
# dotted stores (OR-Set adds, MV-Register values): entries carry the dot (owner, seq) of their event


class _Dotted(Protocol):
    @property
    def owner(self) -> str: ...

    @property
    def seq(self) -> int: ...


_E = TypeVar("_E", bound=_Dotted)


def _merge_dotted(
    vv_a: Mapping[str, int], a: Mapping[str, _E], vv_b: Mapping[str, int], b: Mapping[str, _E]
) -> tuple[dict[str, int], dict[str, _E]]:
    """Join two dotted stores: keep an entry both hold, or one holds and the other has not yet seen."""
    entries: dict[str, _E] = {}
    for tag in sorted(a.keys() | b.keys()):
        ea, eb = a.get(tag), b.get(tag)
        if ea is not None and eb is not None:
            entries[tag] = ea
        elif ea is not None:
            if ea.seq > vv_b.get(ea.owner, 0):
                entries[tag] = ea
        elif eb is not None and eb.seq > vv_a.get(eb.owner, 0):
            entries[tag] = eb
    vv = {owner: max(vv_a.get(owner, 0), vv_b.get(owner, 0)) for owner in sorted(vv_a.keys() | vv_b.keys())}
    return vv, entries


def _already_applied(vv: Mapping[str, int], ctx: EventContext) -> bool:
    return ctx.seq <= vv.get(ctx.owner, 0)


# --------------------------------------------------------------------------------------------------
# element changes / payloads shared by the OR-Set and the G-Set


def _element(body: JSON, what: str, allowed: tuple[str, ...]) -> tuple[JSON, str, JSON]:
    """Parse ``{"item": …, "key": "…", "metadata": …}`` (metadata optional, defaults to null)."""
    d = _obj(body, what)
    _no_unknown_fields(d, allowed, what)
    if "item" not in d:
        raise InvalidOperation(f"{what} needs an 'item'")
    item = _check_json(d["item"], f"{what} 'item'")
    key = _str_field(d, "key", what)
    metadata = _check_json(d.get("metadata"), f"{what} 'metadata'")
    return item, key, metadata


def _create_change(crdt: CrdtType, change: JSON) -> None:
    if change is not None and change != {}:
        raise InvalidOperation(f"{crdt.label} 'create' change must be {{}}, got {_show(change)}")


# --------------------------------------------------------------------------------------------------
# LWW register


@dataclass(frozen=True)
class _Lww:
    value: JSON
    stamp: Stamp
    tag: str

    def rank(self) -> tuple[Stamp, str]:
        return (self.stamp, self.tag)

    def to_json(self) -> JSON:
        return {"value": self.value, "stamp": self.stamp.to_json(), "tag": self.tag}


def _load_lww(state: JSON) -> _Lww:
    what = "LWW state"
    d = _obj(state, what)
    if "value" not in d:
        raise InvalidOperation(f"{what} needs a 'value'")
    return _Lww(d["value"], Stamp.from_json(d.get("stamp"), f"{what} 'stamp'"), _str_field(d, "tag", what))


def _lww_apply(state: JSON | None, payload: dict[str, JSON], ctx: EventContext) -> JSON:
    what = "LWW 'set' payload"
    _no_unknown_fields(payload, ("op", "value"), what)
    if "value" not in payload:
        raise InvalidOperation(f"{what} needs a 'value'")
    return _lww_set(state, payload["value"], ctx)


def _lww_set(state: JSON | None, value: JSON, ctx: EventContext) -> JSON:
    new = _Lww(value, ctx.stamp, ctx.tag)
    if state is not None and _load_lww(state).rank() >= new.rank():
        return state
    return new.to_json()


def _lww_merge(a: JSON, b: JSON) -> JSON:
    la, lb = _load_lww(a), _load_lww(b)
    return la.to_json() if la.rank() >= lb.rank() else lb.to_json()


# --------------------------------------------------------------------------------------------------
# OR-Set


@dataclass(frozen=True)
class _OrAdd:
    item: JSON
    key: str
    metadata: JSON
    owner: str
    seq: int
    stamp: Stamp

    @property
    def element(self) -> str:
        return _element_id(self.item, self.key)

    def to_json(self) -> JSON:
        return {
            "item": self.item,
            "key": self.key,
            "metadata": self.metadata,
            "owner": self.owner,
            "seq": self.seq,
            "stamp": self.stamp.to_json(),
        }


@dataclass
class _OrSet:
    vv: dict[str, int]
    adds: dict[str, _OrAdd]

    def to_json(self) -> JSON:
        return {"vv": _dump_vv(self.vv), "adds": {tag: self.adds[tag].to_json() for tag in sorted(self.adds)}}


@dataclass
class _RawOrSet:
    """An OR-Set state as stored, read without building every add (a set of thousands of items is
    read at each op): its version vector, and its adds as stored JSON, each checked when used."""

    vv: dict[str, int]
    adds: Mapping[str, JSON]

    def add(self, tag: str) -> Mapping[str, JSON]:
        return _obj(self.adds[tag], f"OR-Set state add {tag!r}")

    def key_of(self, tag: str) -> str:
        return _str_field(self.add(tag), "key", f"OR-Set state add {tag!r}")

    def tags_of(self, item: JSON, key: str) -> list[JSON]:
        """The tags of the adds of the element (item, key), sorted. Items are compared as canonical
        JSON only where the key matches (the key alone tells most elements apart)."""
        element: str | None = None
        tags: list[JSON] = []
        for tag in self.adds:
            if self.key_of(tag) != key:
                continue
            if element is None:
                element = canonical_json(item)
            if canonical_json(self.add(tag).get("item")) == element:
                tags.append(tag)
        return sorted(tags, key=str)


def _raw_orset(state: JSON | None) -> _RawOrSet:
    if state is None:
        return _RawOrSet({}, {})
    what = "OR-Set state"
    d = _obj(state, what)
    return _RawOrSet(_load_vv(d.get("vv"), f"{what} 'vv'"), _obj(d.get("adds"), f"{what} 'adds'"))


def _load_orset(state: JSON | None) -> _OrSet:
    raw = _raw_orset(state)
    return _OrSet(raw.vv, {tag: _or_add(tag, raw.adds[tag]) for tag in raw.adds})


def _or_add(tag: str, raw: JSON) -> _OrAdd:
    what = f"OR-Set state add {tag!r}"
    e = _obj(raw, what)
    if "item" not in e:
        raise InvalidOperation(f"{what} needs an 'item'")
    return _OrAdd(
        item=e["item"],
        key=_str_field(e, "key", what),
        metadata=e.get("metadata"),
        owner=_str_field(e, "owner", what),
        seq=_int_field(e, "seq", what),
        stamp=Stamp.from_json(e.get("stamp"), f"{what} 'stamp'"),
    )


def _orset_prepare(state: JSON | None, op: str, change: JSON) -> JSON:
    if op == "create":
        _create_change(CrdtType.ORSET, change)
        return {"op": "create"}
    what = f"OR-Set {op!r} change"
    if op == "add":
        item, key, metadata = _element(change, what, ("item", "key", "metadata"))
        supersedes = _raw_orset(state).tags_of(item, key)
        return {"op": "add", "item": item, "key": key, "metadata": metadata, "supersedes": supersedes}
    item, key, _ = _element(change, what, ("item", "key"))
    return {"op": "remove", "item": item, "key": key, "tags": _raw_orset(state).tags_of(item, key)}


def _orset_apply(state: JSON | None, op: str, payload: dict[str, JSON], ctx: EventContext) -> JSON:
    what = f"OR-Set {op!r} payload"
    new_add: _OrAdd | None = None
    if op == "create":
        _no_unknown_fields(payload, ("op",), what)
        dropped: list[str] = []
    elif op == "add":
        item, key, metadata = _element(payload, what, ("op", "item", "key", "metadata", "supersedes"))
        dropped = _tags_field(payload, "supersedes", what)
        new_add = _OrAdd(item, key, metadata, ctx.owner, ctx.seq, ctx.stamp)
    else:
        _element(payload, what, ("op", "item", "key", "tags"))
        return _orset_remove(state, _tags_field(payload, "tags", what))
    return _orset_add(state, dropped, new_add, ctx)


def _orset_add(state: JSON | None, dropped: Iterable[str], new_add: _OrAdd | None, ctx: EventContext) -> JSON:
    """An OR-Set add (`new_add`, replacing the adds `dropped` names) or create (no add): the key's
    state, with the event's dot in its version vector."""
    s = _raw_orset(state)
    if state is not None and _already_applied(s.vv, ctx):
        return state
    adds = dict(s.adds)
    for tag in dropped:
        adds.pop(tag, None)
    if new_add is not None:
        adds[ctx.tag] = new_add.to_json()
    s.vv[ctx.owner] = ctx.seq
    return {"vv": _dump_vv(s.vv), "adds": {tag: adds[tag] for tag in sorted(adds)}}


def _orset_remove(state: JSON | None, tags: Iterable[str]) -> JSON | None:
    """An OR-Set remove: the state without the adds `tags` names, and nothing else. Its dot is not
    recorded: the version vector only has to cover the adds applied here, which theirs do (an
    owner's events arrive in seq order), and a remove delivered again finds its adds gone already.
    So a remove that takes nothing away changes nothing, and a key without a state keeps none."""
    s = _raw_orset(state)
    gone = {tag for tag in tags if tag in s.adds}
    if not gone:
        return state
    return {"vv": _dump_vv(s.vv), "adds": {tag: s.adds[tag] for tag in sorted(s.adds) if tag not in gone}}


def _orset_merge(a: JSON, b: JSON) -> JSON:
    sa, sb = _load_orset(a), _load_orset(b)
    return _OrSet(*_merge_dotted(sa.vv, sa.adds, sb.vv, sb.adds)).to_json()


def _orset_value(state: JSON) -> JSON:
    """Each element once, with the metadata of its newest add (by stamp, then tag), sorted by key and
    item. Items are compared as canonical JSON only among the adds of one key."""
    s = _raw_orset(state)
    by_key: dict[str, list[str]] = {}
    for tag in s.adds:
        by_key.setdefault(s.key_of(tag), []).append(tag)
    out: list[JSON] = []
    for key in sorted(by_key):
        tags = by_key[key]
        if len(tags) == 1:  # one add: nothing to compare it with
            add = s.add(tags[0])
            if "item" not in add:
                raise InvalidOperation(f"OR-Set state add {tags[0]!r} needs an 'item'")
            out.append({"item": add["item"], "key": key, "metadata": add.get("metadata")})
            continue
        winners: dict[str, tuple[tuple[Stamp, str], _OrAdd]] = {}
        for tag in tags:
            e = _or_add(tag, s.adds[tag])
            rank = (e.stamp, tag)
            element = canonical_json(e.item)
            current = winners.get(element)
            if current is None or rank > current[0]:
                winners[element] = (rank, e)
        for element in sorted(winners):
            e = winners[element][1]
            out.append({"item": e.item, "key": key, "metadata": e.metadata})
    return out


def _element_list(adds: Iterable[_OrAdd | _GElement]) -> list[JSON]:
    ordered = sorted(adds, key=lambda a: (a.key, canonical_json(a.item)))
    return [{"item": a.item, "key": a.key, "metadata": a.metadata} for a in ordered]


# --------------------------------------------------------------------------------------------------
# G-Set


@dataclass(frozen=True)
class _GElement:
    item: JSON
    key: str
    metadata: JSON
    stamp: Stamp
    tag: str

    def rank(self) -> tuple[Stamp, str]:
        return (self.stamp, self.tag)

    def to_json(self) -> JSON:
        return {
            "item": self.item,
            "key": self.key,
            "metadata": self.metadata,
            "stamp": self.stamp.to_json(),
            "tag": self.tag,
        }


def _load_gset(state: JSON | None) -> dict[str, _GElement]:
    if state is None:
        return {}
    out: dict[str, _GElement] = {}
    for i, raw in enumerate(_gset_elements(state)):
        _gset_put(out, _gset_element(raw, i))
    return out


def _gset_put(elements: dict[str, _GElement], element: _GElement) -> bool:
    """Fold ``element`` in (the highest ``(stamp, tag)`` per element wins); True if anything changed."""
    eid = _element_id(element.item, element.key)
    current = elements.get(eid)
    if current is not None and current.rank() >= element.rank():
        return False
    elements[eid] = element
    return True


def _dump_gset(elements: Mapping[str, _GElement]) -> JSON:
    ordered = sorted(elements.values(), key=lambda e: (e.key, canonical_json(e.item)))
    return {"elements": [e.to_json() for e in ordered]}


def _gset_prepare(op: str, change: JSON) -> JSON:
    if op == "create":
        _create_change(CrdtType.GSET, change)
        return {"op": "create"}
    item, key, metadata = _element(change, "G-Set 'add' change", ("item", "key", "metadata"))
    return {"op": "add", "item": item, "key": key, "metadata": metadata}


def _gset_apply(state: JSON | None, op: str, payload: dict[str, JSON], ctx: EventContext) -> JSON:
    what = f"G-Set {op!r} payload"
    if op == "create":
        _no_unknown_fields(payload, ("op",), what)
        return _gset_create(state)
    item, key, metadata = _element(payload, what, ("op", "item", "key", "metadata"))
    return _gset_add(state, _GElement(item, key, metadata, ctx.stamp, ctx.tag))


def _gset_create(state: JSON | None) -> JSON:
    return {"elements": []} if state is None else state


def _gset_add(state: JSON | None, new: _GElement) -> JSON:
    if state is None:
        return {"elements": [new.to_json()]}
    # The stored elements are sorted by (key, canonical item), one per element: find the new one's
    # place by its key (a binary search), then among the few of that key by the item.
    raw = _gset_elements(state)
    at = bisect.bisect_left(raw, new.key, key=_gset_key)
    end = bisect.bisect_right(raw, new.key, lo=at, key=_gset_key)
    text = canonical_json(new.item)
    for i in range(at, end):
        element = _gset_element(raw[i], i)
        held = canonical_json(element.item)
        if held == text:
            if element.rank() >= new.rank():
                return state
            return {"elements": [*raw[:i], new.to_json(), *raw[i + 1 :]]}
        if held > text:
            end = i
            break
    return {"elements": [*raw[:end], new.to_json(), *raw[end:]]}


def _gset_elements(state: JSON) -> list[JSON]:
    raw = _obj(state, "G-Set state").get("elements")
    if not isinstance(raw, list):
        raise InvalidOperation("G-Set state needs a list 'elements'")
    return raw


def _gset_shown(raw: JSON, i: int) -> JSON:
    e = _obj(raw, f"G-Set state element {i}")
    if "item" not in e:
        raise InvalidOperation(f"G-Set state element {i} needs an 'item'")
    return {
        "item": e["item"],
        "key": _str_field(e, "key", f"G-Set state element {i}"),
        "metadata": e.get("metadata"),
    }


def _gset_key(raw: JSON) -> str:
    if not isinstance(raw, dict) or not isinstance(key := raw.get("key"), str):
        raise InvalidOperation("G-Set state element needs a string 'key'")
    return key


def _gset_element(raw: JSON, i: int) -> _GElement:
    what = f"G-Set state element {i}"
    e = _obj(raw, what)
    if "item" not in e:
        raise InvalidOperation(f"{what} needs an 'item'")
    return _GElement(
        item=e["item"],
        key=_str_field(e, "key", what),
        metadata=e.get("metadata"),
        stamp=Stamp.from_json(e.get("stamp"), f"{what} 'stamp'"),
        tag=_str_field(e, "tag", what),
    )


def _gset_merge(a: JSON, b: JSON) -> JSON:
    elements = _load_gset(a)
    for element in _load_gset(b).values():
        _gset_put(elements, element)
    return _dump_gset(elements)


# --------------------------------------------------------------------------------------------------
# PN-Counter


@dataclass(frozen=True)
class _PnEntry:
    seq: int
    p: int | float
    n: int | float

    def rank(self) -> tuple[int, int | float, int | float]:
        return (self.seq, self.p, self.n)


def _load_pn(state: JSON | None) -> dict[str, _PnEntry]:
    if state is None:
        return {}
    what = "PN-Counter state"
    out: dict[str, _PnEntry] = {}
    for owner, raw in _obj(_obj(state, what).get("counts"), f"{what} 'counts'").items():
        entry_what = f"{what} count of {owner!r}"
        e = _obj(raw, entry_what)
        p, n = e.get("p"), e.get("n")
        if not isinstance(p, int | float) or isinstance(p, bool):
            raise InvalidOperation(f"{entry_what} needs a number 'p'")
        if not isinstance(n, int | float) or isinstance(n, bool):
            raise InvalidOperation(f"{entry_what} needs a number 'n'")
        out[owner] = _PnEntry(_int_field(e, "seq", entry_what), p, n)
    return out


def _dump_pn(counts: Mapping[str, _PnEntry]) -> JSON:
    return {"counts": {o: {"seq": counts[o].seq, "p": counts[o].p, "n": counts[o].n} for o in sorted(counts)}}


def _sum(numbers: list[int | float]) -> int | float:
    """Exact sum of ints; correctly rounded (hence order-independent) sum as soon as a float is involved."""
    if all(isinstance(x, int) for x in numbers):
        return sum(int(x) for x in numbers)
    try:
        return math.fsum(numbers)
    except OverflowError:  # an intermediate sum overflowed: add exactly, then round
        exact = sum((Fraction(x) for x in numbers), Fraction(0))
        try:
            return float(exact)
        except OverflowError:
            return math.inf if exact > 0 else -math.inf


def _amount(raw: JSON, what: str) -> int | float:
    if not isinstance(raw, int | float) or isinstance(raw, bool):
        raise InvalidOperation(f"{what} must be a number, got {_show(raw)}")
    if not math.isfinite(raw):
        raise InvalidOperation(f"{what} must be a finite number, got {raw}")
    if raw < 0:
        raise InvalidOperation(f"{what} must not be negative, got {raw}")
    if isinstance(raw, int) and raw > MAX_COUNTER_INT:
        raise InvalidOperation(f"{what} is too large (maximum {MAX_COUNTER_INT})")
    return raw


def counter_total(state: JSON | None, op: str, amount: int | float) -> int | Fraction:
    """The exact total of one side of a PN-Counter ``state`` (every owner's increments for ``op``
    ``increment``, else decrements) with ``amount`` added: an int when every number is one, else a
    Fraction (a float sum rounds).  Raises :class:`InvalidOperation` for a state that is not a
    PN-Counter's."""
    counts = _load_pn(state).values()
    numbers = [*(e.p if op == "increment" else e.n for e in counts), amount]
    if all(isinstance(x, int) for x in numbers):
        return sum(int(x) for x in numbers)
    return sum((Fraction(x) for x in numbers), Fraction(0))


def _beyond_floats(total: Fraction) -> bool:
    """Whether ``total`` rounds to a float beyond the finite ones."""
    try:
        float(total)
    except OverflowError:
        return True
    return False


def _pn_prepare(state: JSON | None, op: str, change: JSON) -> JSON:
    what = f"PN-Counter {op!r} amount"
    amount = _amount(change, what)
    total = counter_total(state, op, amount)
    if total > MAX_COUNTER_INT if isinstance(total, int) else _beyond_floats(total):
        raise InvalidOperation(f"{what} {amount} would overflow the counter's {op}s")
    return {"op": op, "amount": amount}


def _pn_apply(state: JSON | None, op: str, payload: dict[str, JSON], ctx: EventContext) -> JSON:
    what = f"PN-Counter {op!r} payload"
    _no_unknown_fields(payload, ("op", "amount"), what)
    return _pn_add(state, op, _amount(payload.get("amount"), f"{what} 'amount'"), ctx)


def _pn_add(state: JSON | None, op: str, amount: int | float, ctx: EventContext) -> JSON:
    counts = _load_pn(state)
    current = counts.get(ctx.owner, _PnEntry(0, 0, 0))
    if state is not None and ctx.seq <= current.seq:
        return state
    p, n = (current.p + amount, current.n) if op == "increment" else (current.p, current.n + amount)
    if not all(math.isfinite(x) for x in (p, n) if isinstance(x, float)):
        # Only an event appended past the API's checks (straight to the log) gets here. Its owner's
        # total is the same on every node, so every node skips it alike.
        raise InvalidOperation(
            f"PN-Counter {op!r} amount {amount} takes {ctx.owner}'s total beyond any number"
        )
    counts[ctx.owner] = _PnEntry(ctx.seq, p, n)
    return _dump_pn(counts)


def _pn_merge(a: JSON, b: JSON) -> JSON:
    counts = _load_pn(a)
    for owner, entry in _load_pn(b).items():
        current = counts.get(owner)
        if current is None or entry.rank() > current.rank():
            counts[owner] = entry
    return _dump_pn(counts)


def _pn_value(state: JSON | None) -> JSON:
    counts = _load_pn(state).values()
    total = _sum([e.p for e in counts] + [-e.n for e in counts])
    # Concurrent writers can push a float total past the float range; answer the nearest JSON number.
    return max(-sys.float_info.max, min(sys.float_info.max, total)) if isinstance(total, float) else total


# --------------------------------------------------------------------------------------------------
# MV-Register


@dataclass(frozen=True)
class _MvValue:
    value: JSON
    owner: str
    seq: int
    stamp: Stamp

    def to_json(self) -> JSON:
        return {"value": self.value, "owner": self.owner, "seq": self.seq, "stamp": self.stamp.to_json()}


@dataclass
class _MvRegister:
    vv: dict[str, int]
    values: dict[str, _MvValue]

    def to_json(self) -> JSON:
        return {"vv": _dump_vv(self.vv), "values": {t: self.values[t].to_json() for t in sorted(self.values)}}


@dataclass
class _RawMv:
    """An MV-Register state as stored, read without building every value (only the new one is
    built at a set): its version vector, and its values as stored JSON."""

    vv: dict[str, int]
    values: Mapping[str, JSON]


def _raw_mv(state: JSON | None) -> _RawMv:
    if state is None:
        return _RawMv({}, {})
    what = "MV-Register state"
    d = _obj(state, what)
    return _RawMv(_load_vv(d.get("vv"), f"{what} 'vv'"), _obj(d.get("values"), f"{what} 'values'"))


def _load_mv(state: JSON | None) -> _MvRegister:
    raw = _raw_mv(state)
    return _MvRegister(raw.vv, {tag: _load_mv_value(tag, raw.values[tag]) for tag in raw.values})


def _load_mv_value(tag: str, raw: JSON) -> _MvValue:
    what = f"MV-Register state value {tag!r}"
    e = _obj(raw, what)
    if "value" not in e:
        raise InvalidOperation(f"{what} needs a 'value'")
    return _MvValue(
        value=e["value"],
        owner=_str_field(e, "owner", what),
        seq=_int_field(e, "seq", what),
        stamp=Stamp.from_json(e.get("stamp"), f"{what} 'stamp'"),
    )


def _mv_apply(state: JSON | None, payload: dict[str, JSON], ctx: EventContext) -> JSON:
    what = "MV-Register 'set' payload"
    _no_unknown_fields(payload, ("op", "value", "supersedes"), what)
    if "value" not in payload:
        raise InvalidOperation(f"{what} needs a 'value'")
    return _mv_set(state, payload["value"], _tags_field(payload, "supersedes", what), ctx)


def _mv_set(state: JSON | None, value: JSON, supersedes: Iterable[str], ctx: EventContext) -> JSON:
    reg = _raw_mv(state)
    if state is not None and _already_applied(reg.vv, ctx):
        return state
    values = dict(reg.values)
    for tag in supersedes:
        values.pop(tag, None)
    values[ctx.tag] = _MvValue(value, ctx.owner, ctx.seq, ctx.stamp).to_json()
    reg.vv[ctx.owner] = ctx.seq
    return {"vv": _dump_vv(reg.vv), "values": {tag: values[tag] for tag in sorted(values)}}


def _mv_merge(a: JSON, b: JSON) -> JSON:
    ra, rb = _load_mv(a), _load_mv(b)
    return _MvRegister(*_merge_dotted(ra.vv, ra.values, rb.vv, rb.values)).to_json()


def _mv_value(state: JSON | None) -> JSON:
    reg = _load_mv(state)
    newest_first = sorted(reg.values.items(), key=lambda tv: (tv[1].stamp, tv[0]), reverse=True)
    seen: set[str] = set()
    out: list[JSON] = []
    for _, v in newest_first:
        text = canonical_json(v.value)
        if text not in seen:
            seen.add(text)
            out.append(v.value)
    return out


# --------------------------------------------------------------------------------------------------
# public API


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
    are written by this module; a set of thousands of elements is not checked whole at every op).
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
