"""Which incoming replication stream feeds this node each owner's log, so that the other streams
bringing that log can be told to stop forwarding it (see replication_session.Session)."""

from __future__ import annotations

from collections.abc import Iterable


class Feeders:
    """Per owner, the stream that last brought new entries of its log, and when.

    The owner's own stream always becomes the feeder of its log. Another stream becomes it by
    bringing new entries while no other stream has for `quiet` seconds. A stream that brings an
    owner's entries while another feeds that log is *redundant* for it."""

    def __init__(self, quiet: float) -> None:
        self._quiet = quiet
        self._by_owner: dict[str, tuple[object, float]] = {}

    def brought(
        self, stream: object, peer_id: str, owners: Iterable[str], fresh: set[str], now: float
    ) -> set[str]:
        """Note that `stream` (from node `peer_id`) brought entries of `owners`' logs, new here for
        the owners in `fresh`; returns the owners for which `stream` is redundant."""
        redundant = set()
        for owner in owners:
            current = self._by_owner.get(owner)
            active = current is not None and current[1] > now - self._quiet
            feeding = active and current is not None and current[0] is stream
            if owner == peer_id or (owner in fresh and (feeding or not active)):
                self._by_owner[owner] = (stream, now)
            elif not feeding:
                redundant.add(owner)
        return redundant

    def forget(self, stream: object) -> None:
        """`stream` has ended: it feeds nothing any more."""
        for owner in [o for o, (s, _) in self._by_owner.items() if s is stream]:
            del self._by_owner[owner]
