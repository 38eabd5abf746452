"""The G-Set (grow-only set).

State: ``{"elements": [{"item": …, "key": "…", "metadata": …, "stamp": [w, l, owner], "tag": "…"}, …]}`` —
one entry per element (the add with the highest ``(stamp, tag)``), sorted by ``(key, item)``."""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass

from potboiler.kv.crdts.checks import _no_unknown_fields, _obj, _str_field, canonical_json
from potboiler.kv.crdts.elements import _create_change, _element, _element_id
from potboiler.kv.crdts.errors import InvalidOperation
from potboiler.kv.crdts.types import CrdtType, EventContext, Stamp
from potboiler.server.jsonvalue import JSON


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
