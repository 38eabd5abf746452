"""Capped exponential backoff: webhook delivery, peer reconnection, the services' appliers retrying the
log, Envoy restarts."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delays after consecutive failures: `first` seconds, doubling up to `cap`."""

    first: float = 0.1
    cap: float = 10.0

    def delay(self, failures: int) -> float:
        """The wait after `failures` consecutive failures (>= 1); never more than `cap`, however many."""
        return min(self.cap, self.first * 2.0 ** min(max(0, failures - 1), 60))
