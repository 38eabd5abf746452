"""The OR-Set (observed-remove set).

State: ``{"vv": {owner: seq}, "adds": {tag: {"item": …, "key": "…", "metadata": …, "owner": "…", "seq": n,
"stamp": [w, l, owner]}}}`` — an observed-remove set without tombstones (the "ORSWOT" design): ``adds``
holds only the live adds, each identified by its event tag and its dot ``(owner, seq)``, and ``vv``
holds, per owner, the highest seq of that owner's adds and creates applied to this key.  A dot covered
by ``vv`` but missing from ``adds`` was removed, which is what lets
:func:`~potboiler.kv.crdts.dispatch.merge` tell "removed" from "not yet seen" and what makes a duplicate
add a no-op.  A ``remove`` carries the tags of the adds of that element its node had seen and takes them
away, nothing more (it records no dot), so a remove that takes nothing away leaves a key without a state
as it is: missing.  An ``add`` likewise carries (as ``supersedes``) the tags of the adds of the same
element its node had seen and replaces them, so the live adds of an element are only the concurrent
ones.  The state grows with the live elements and the number of writing nodes only.  The price of having
no tombstones is that correctness relies on causal delivery: an add applied after a remove that had seen
it (impossible with the log's guarantee) would come back."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from potboiler.kv.crdts.checks import (
    _int_field,
    _no_unknown_fields,
    _obj,
    _str_field,
    _tags_field,
    canonical_json,
)
from potboiler.kv.crdts.dotted import _already_applied, _dump_vv, _load_vv, _merge_dotted
from potboiler.kv.crdts.elements import _create_change, _element
from potboiler.kv.crdts.errors import InvalidOperation
from potboiler.kv.crdts.types import CrdtType, EventContext, Stamp
from potboiler.server.jsonvalue import JSON


@dataclass(frozen=True)
class _OrAdd:
    item: JSON
    key: str
    metadata: JSON
    owner: str
    seq: int
    stamp: Stamp

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
