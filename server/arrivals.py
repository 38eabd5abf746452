"""When each owner's log grew on this node: which of its entries have been here long enough that a
peer which still lacks them is not getting them from anywhere else, or is behind (see
replication_session.Session and Replicator.status)."""

from __future__ import annotations

from bisect import bisect_right


class Arrivals:
    """Per owner, the times its chain head moved on this node during the last `keep` seconds, and
    the head as it stood before them: enough to tell which entries have been here at least `age`
    seconds, for any `age` up to `keep`.

    Entries held when the node starts count as held since long ago (as far as anyone can tell)."""

    def __init__(self, keep: float, vector: dict[str, int]) -> None:
        self._keep = keep
        self._before = dict(vector)
        self._times: dict[str, list[float]] = {}
        self._seqs: dict[str, list[int]] = {}

    def grew(self, owner: str, seq: int, now: float) -> None:
        """`owner`'s chain on this node reached `seq` at `now` (monotonic seconds)."""
        times = self._times.get(owner)
        if times is None:
            times, seqs = self._times[owner], self._seqs[owner] = [], []
        else:
            seqs = self._seqs[owner]
            if times[0] <= now - 2 * self._keep:  # forget what is older than `keep`, now and then
                cut = bisect_right(times, now - self._keep)
                if cut:
                    self._before[owner] = seqs[cut - 1]
                    del times[:cut], seqs[:cut]
        times.append(now)
        seqs.append(seq)

    def held(self, owner: str, now: float, age: float) -> int:
        """The highest seq of `owner` that this node has held for at least `age` (≤ `keep`) at `now`."""
        times = self._times.get(owner)
        if times:
            i = bisect_right(times, now - age)
            if i:
                return self._seqs[owner][i - 1]
        return self._before.get(owner, 0)
