"""When each owner's log grew on this node: which of its entries have been here long enough that a
peer which still lacks them is not getting them from anywhere else (see replication.Session)."""

from __future__ import annotations

from collections import deque


class Arrivals:
    """Per owner, the times its chain head moved on this node during the last `delay` seconds, and
    the head as it stood `delay` ago: the entries up to that head are *settled*.

    Entries held when the node starts count as settled (they arrived long ago, as far as anyone can
    tell)."""

    def __init__(self, delay: float, vector: dict[str, int]) -> None:
        self._delay = delay
        self._settled = dict(vector)
        self._recent: dict[str, deque[tuple[float, int]]] = {}

    def grew(self, owner: str, seq: int, now: float) -> None:
        """`owner`'s chain on this node reached `seq` at `now` (monotonic seconds)."""
        recent = self._recent.get(owner)
        if recent is None:
            recent = self._recent[owner] = deque()
        else:
            self._settle(owner, recent, now)
        recent.append((now, seq))

    def settled(self, owner: str, now: float) -> int:
        """The highest seq of `owner` that this node has held for at least `delay` at `now`."""
        recent = self._recent.get(owner)
        if recent:
            self._settle(owner, recent, now)
        return self._settled.get(owner, 0)

    def _settle(self, owner: str, recent: deque[tuple[float, int]], now: float) -> None:
        cutoff = now - self._delay
        while recent and recent[0][0] <= cutoff:
            self._settled[owner] = recent.popleft()[1]
