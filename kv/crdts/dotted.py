"""Dotted stores, the design the OR-Set (its adds) and the MV-Register (its values) share.

Every entry carries the dot ``(owner, seq)`` of the event that wrote it, and the state's version vector
``vv`` holds, per owner, the highest seq applied to the key.  A dot covered by ``vv`` but missing from the
entries was taken away, which is what lets a merge tell "removed" from "not yet seen" and what makes a
duplicate write a no-op."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, TypeVar

from potboiler.kv.crdts.checks import _is_int, _kind, _obj
from potboiler.kv.crdts.errors import InvalidOperation
from potboiler.kv.crdts.types import EventContext
from potboiler.server.jsonvalue import JSON


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
