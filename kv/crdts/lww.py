"""The LWW (last writer wins) register.

State: ``{"value": <JSON>, "stamp": [w, l, owner], "tag": "<event id>"}`` — the write with the highest
``(stamp, tag)`` wins."""

from __future__ import annotations

from dataclasses import dataclass

from potboiler.kv.crdts.checks import _no_unknown_fields, _obj, _str_field
from potboiler.kv.crdts.errors import InvalidOperation
from potboiler.kv.crdts.types import EventContext, Stamp
from potboiler.server.jsonvalue import JSON


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
