"""The comparison's figures: spreads over repetitions, Potboiler ÷ peer ratios, and the table.

Pure functions and data only (no processes, no I/O), so that they are unit-tested
(tests/unit/test_compare.py).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Better is "higher" (throughput) or "lower" (latency, memory, losses).
HIGHER = "higher"
LOWER = "lower"


@dataclass(frozen=True)
class Spread:
    """min / median / max of one figure over the repetitions of a run."""

    min: float
    median: float
    max: float
    count: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread | None:
        """The spread of `samples`; None when there are none (every repetition failed)."""
        if not samples:
            return None
        return cls(min(samples), statistics.median(samples), max(samples), len(samples))


def ratio(potboiler: float | None, peer: float | None) -> float | None:
    """potboiler ÷ peer, or None when either is missing or the peer's figure is 0."""
    if potboiler is None or peer is None or peer == 0:
        return None
    return potboiler / peer


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure measured for a peer and for Potboiler in the same run."""

    section: str
    figure: str
    unit: str
    peer: str
    better: str
    peer_samples: Sequence[float] = field(default_factory=list)
    potboiler_samples: Sequence[float] = field(default_factory=list)
    #: How many repetitions each side ran (None: as many as it has samples). A repetition that failed
    #: or did not finish has no sample: the row then gives no verdict.
    peer_runs: int | None = None
    potboiler_runs: int | None = None
    #: What the verdict compares: each side's "median", or its "max" (worst case: lost writes).
    judged_by: str = "median"

    @property
    def peer_spread(self) -> Spread | None:
        return Spread.of(self.peer_samples)

    @property
    def potboiler_spread(self) -> Spread | None:
        return Spread.of(self.potboiler_samples)

    @property
    def ratio(self) -> float | None:
        """Potboiler's median ÷ the peer's median."""
        pb, peer = self.potboiler_spread, self.peer_spread
        return ratio(pb.median if pb else None, peer.median if peer else None)

    @property
    def complete(self) -> bool:
        """Whether every repetition of both sides gave its figure."""
        return (self.peer_runs is None or len(self.peer_samples) == self.peer_runs) and (
            self.potboiler_runs is None or len(self.potboiler_samples) == self.potboiler_runs
        )

    @property
    def potboiler_ahead(self) -> bool | None:
        """Whether Potboiler's median (or max, see `judged_by`) is at least as good as the peer's;
        None if either is missing or a repetition failed."""
        pb, peer = self.potboiler_spread, self.peer_spread
        if pb is None or peer is None or not self.complete:
            return None
        mine: float = getattr(pb, self.judged_by)
        theirs: float = getattr(peer, self.judged_by)
        return mine >= theirs if self.better == HIGHER else mine <= theirs

    def to_json(self) -> dict[str, Any]:
        def spread(s: Spread | None) -> dict[str, float] | None:
            return None if s is None else {"min": s.min, "median": s.median, "max": s.max, "count": s.count}

        r = self.ratio
        return {
            "section": self.section,
            "figure": self.figure,
            "unit": self.unit,
            "peer": self.peer,
            "better": self.better,
            "peer_spread": spread(self.peer_spread),
            "potboiler_spread": spread(self.potboiler_spread),
            "peer_samples": list(self.peer_samples),
            "potboiler_samples": list(self.potboiler_samples),
            "ratio_potboiler_to_peer": None if r is None else round(r, 3),
            "potboiler_at_least_as_good": self.potboiler_ahead,
            "complete": self.complete,
            "judged_by": self.judged_by,
        }


def number(value: float) -> str:
    """A figure for the table: thousands separated, about three significant digits."""
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1 or value == 0:
        return f"{value:.2f}"
    return f"{value:.3g}"


def spread_text(spread: Spread | None) -> str:
    """`min / median / max`, the median in bold; `—` when nothing was measured."""
    if spread is None:
        return "—"
    if spread.count == 1:
        return f"**{number(spread.median)}**"
    return f"{number(spread.min)} / **{number(spread.median)}** / {number(spread.max)}"


def ratio_text(row: Row) -> str:
    """The ratio with which way is better for Potboiler, e.g. `1.25x ↑` (higher is better)."""
    r = row.ratio
    arrow = "↑" if row.better == HIGHER else "↓"
    if r is None:
        return "—"
    return f"{r:.2f}x {arrow}"


def verdict(row: Row) -> str:
    if not row.complete:
        return "— (a run failed)"
    ahead = row.potboiler_ahead
    return "—" if ahead is None else ("yes" if ahead else "no")


HEADER = (
    "| § | figure | peer | peer min / **median** / max | Potboiler min / **median** / max "
    "| Potboiler ÷ peer | Potboiler ≥ peer |"
)


def render_table(rows: Iterable[Row]) -> str:
    """The rows as one Markdown table. In the ratio column ↑ means higher is better (a ratio above 1
    favours Potboiler) and ↓ lower is better (below 1 favours Potboiler); the last column says whether
    Potboiler's median (for lost writes: its worst run) is at least as good as the peer's, and gives
    no verdict when a repetition of either side failed."""
    lines = [HEADER, "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row.section} | {row.figure} ({row.unit}) | {row.peer} | {spread_text(row.peer_spread)} "
            f"| {spread_text(row.potboiler_spread)} | {ratio_text(row)} | {verdict(row)} |"
        )
    return "\n".join(lines)


def samples(results: Sequence[Mapping[str, object]], key: str) -> list[float]:
    """The numeric value of `key` in each repetition's figures that has one (failed ones do not)."""
    out = []
    for figures in results:
        value = figures.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out.append(float(value))
    return out
