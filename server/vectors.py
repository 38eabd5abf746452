"""Version vectors (owner node id -> the highest seq of its log held) and their message form."""

from __future__ import annotations

from collections.abc import Iterable

from potboiler.server.ids import parse_uuid
from potboiler.v1 import nodes_pb2


def to_proto(vector: dict[str, int]) -> list[nodes_pb2.VectorComponent]:
    """A version vector as sorted message components."""
    return [nodes_pb2.VectorComponent(owner=o, seq=s) for o, s in sorted(vector.items())]


def from_proto(components: Iterable[nodes_pb2.VectorComponent]) -> dict[str, int]:
    """A version vector from message components (owners validated; an owner named twice counts
    with its highest seq)."""
    out: dict[str, int] = {}
    for c in components:
        parse_uuid(c.owner, "owner")
        out[c.owner] = max(out.get(c.owner, 0), c.seq)
    return out


def lag(mine: dict[str, int], theirs: dict[str, int]) -> int:
    """How many of my entries the other vector lacks."""
    return sum(max(0, seq - theirs.get(owner, 0)) for owner, seq in mine.items())
