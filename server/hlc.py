"""A hybrid logical clock (Kulkarni et al.): stamps that follow physical time but never go backwards
and always exceed every stamp the node has observed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

log = logging.getLogger(__name__)

#: How far ahead of this node's physical clock a received stamp may pull the clock. A peer whose
#: clock is further ahead (misconfigured, or a bad actor) would otherwise drag every later stamp of
#: this node, and with them claim timeouts and LWW order, into its future.
MAX_DRIFT_MS = 60_000
#: The largest `logical` a stamp carries (HlcTimestamp.logical is a uint32): past it, the clock moves
#: on to the next millisecond, so a peer's stamp near it cannot make this node's next stamps unsendable.
MAX_LOGICAL = 2**32 - 1


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
        self._warned_at = -float("inf")

    @property
    def last(self) -> Stamp:
        """The greatest stamp issued or observed so far."""
        return self._last

    def now(self) -> Stamp:
        """A new stamp, greater than every stamp issued or observed before."""
        return self.now_many(1)

    def now_many(self, n: int) -> Stamp:
        """Reserve `n` consecutive new stamps sharing one wall_ms: the first is returned, the others
        follow it in `logical` (one clock read for a whole batch)."""
        wall = self._physical()
        last = self._last
        if wall > last.wall_ms:
            first = Stamp(wall, 0)
        elif last.logical + n <= MAX_LOGICAL:
            first = Stamp(last.wall_ms, last.logical + 1)
        else:
            first = Stamp(last.wall_ms + 1, 0)
        self._last = Stamp(first.wall_ms, first.logical + n - 1)
        return first

    def stamps_after(self, stamp: Stamp) -> bool:
        """Whether the next stamp will come after `stamp` (not so for a stamp of a node whose clock
        runs further ahead than MAX_DRIFT_MS, which this clock follows only that far)."""
        return self._last >= stamp or self._physical() > stamp.wall_ms

    def observe(self, seen: Stamp) -> None:
        """Take in a stamp of this node's own history (e.g. its newest entry after a restart), so
        later stamps exceed it, however far ahead of the physical clock it is."""
        if seen > self._last:
            self._last = seen

    def observe_remote(self, remote: Stamp) -> None:
        """Take in a stamp from another node (an entry's, or a clock promise), so later stamps exceed
        it, but move the clock at most MAX_DRIFT_MS ahead of physical time (then later stamps only
        exceed that bound, and a far-future entry keeps its stamp)."""
        if remote <= self._last:
            return
        bound = self._physical() + MAX_DRIFT_MS
        if remote.wall_ms > bound:
            now = time.monotonic()
            if now - self._warned_at > 60:
                self._warned_at = now
                log.warning(
                    "a stamp from another node (an entry's, or its clock's) is %.1f s ahead of this node's clock; "
                    "the clock follows it only %d s ahead (check the nodes' clocks)",
                    (remote.wall_ms - bound + MAX_DRIFT_MS) / 1000,
                    MAX_DRIFT_MS // 1000,
                )
            remote = Stamp(bound, 0)
            if remote <= self._last:
                return
        self._last = remote
