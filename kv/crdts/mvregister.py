"""The MV-Register (multi-value register).

State: ``{"vv": {owner: seq}, "values": {tag: {"value": …, "owner": "…", "seq": n, "stamp": [w, l, owner]}}}``
— the same dotted design as the OR-Set: a ``set`` carries the tags of the values it supersedes (those its
node had seen), so the live values are exactly the concurrent writes."""

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
from potboiler.kv.crdts.errors import InvalidOperation
from potboiler.kv.crdts.types import EventContext, Stamp
from potboiler.server.jsonvalue import JSON


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
