"""A hybrid logical clock (Kulkarni et al.): stamps that follow physical time but never go backwards
and always exceed every stamp the node has observed."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple


class Stamp(NamedTuple):
    """An HLC stamp, ordered by (wall_ms, logical)."""

    wall_ms: int
    logical: int


ZERO = Stamp(0, 0)


def wall_clock_ms() -> int:
    """Milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def skewed_clock(offset_ms: int) -> Callable[[], int]:
    """A physical clock `offset_ms` ahead of (or, if negative, behind) the real one."""
    return lambda: wall_clock_ms() + offset_ms


class HybridClock:
    """One node's clock. `physical` is injectable so tests can skew or freeze time."""

    def __init__(self, physical: Callable[[], int] = wall_clock_ms, last: Stamp = ZERO) -> None:
        self._physical = physical
        self._last = last

    @property
    def last(self) -> Stamp:
        """The greatest stamp issued or observed so far."""
        return self._last

    def now(self) -> Stamp:
        """A new stamp, greater than every stamp issued or observed before."""
        wall = self._physical()
        last = self._last
        self._last = Stamp(wall, 0) if wall > last.wall_ms else Stamp(last.wall_ms, last.logical + 1)
        return self._last

    def now_many(self, n: int) -> Stamp:
        """Reserve `n` consecutive new stamps sharing one wall_ms: the first is returned, the others
        follow it in `logical` (one clock read for a whole batch)."""
        first = self.now()
        if n > 1:
            self._last = Stamp(first.wall_ms, first.logical + n - 1)
        return first

    def observe(self, remote: Stamp) -> None:
        """Take in a stamp seen on a received entry, so later stamps exceed it."""
        if remote > self._last:
            self._last = remote
