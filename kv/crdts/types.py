"""The vocabulary of the CRDT package: the table types (:class:`CrdtType`) and the ops each accepts,
and the identity of the log event that carries an op (:class:`EventContext`, with its HLC :class:`Stamp`).

Stamps are stored in states as ``[wall_ms, logical, owner]``."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import cast

from potboiler.kv.crdts.checks import _is_int, _show
from potboiler.kv.crdts.errors import InvalidOperation
from potboiler.server.jsonvalue import JSON


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
