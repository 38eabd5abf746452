"""The sections of benchmarks/compare.py, one module each, and what they share: the run's settings,
measuring each contender in turn (peer and Potboiler alternating, repetition after repetition), the
servers' CPU time, and turning repetitions into table rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from benchmarks.common import Json, cpu_seconds, process_tree, progress
from benchmarks.report import Row, samples


@dataclass(frozen=True)
class Settings:
    """How long and how often each section measures."""

    quick: bool
    #: Repetitions of every measurement (each contender once per repetition, alternating).
    reps: int
    #: Seconds each throughput measurement counts, after `warmup` seconds of load.
    duration: float
    warmup: float
    #: Writes in flight (REST connections, client calls).
    concurrency: int = 32
    #: Entries per batch in the batch section, and batches in flight.
    batch: int = 100
    batches_in_flight: int = 4
    #: Replication lag: steady writes per second and for how long.
    lag_rate: int = 1000
    lag_seconds: float = 10.0
    lag_grace: float = 10.0
    #: Catch-up: entries written while a member is down, repetitions, and how long to wait for it.
    catch_up_entries: int = 100_000
    catch_up_reps: int = 2
    catch_up_timeout: float = 120.0
    #: Queue: tasks per measured run, and per warm-up run.
    queue_tasks: int = 1000
    queue_warmup: int = 100


class System(Protocol):
    """Servers of one system (a peer or Potboiler), one or several."""

    @property
    def pids(self) -> list[int]: ...

    def rss_mb(self) -> float: ...

    def settle(self) -> None:
        """Wait until every member holds what the others hold (a no-op for one server)."""
        ...

    def stop(self) -> None: ...


class ServerCpu:
    """CPU seconds the servers (their process trees) used between `begin()` and `end()`."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._start: dict[int, float] = {}
        self.seconds = 0.0

    def _now(self) -> dict[int, float]:
        return {p: cpu_seconds(p) for pid in self.pids for p in process_tree(pid)}

    def begin(self) -> None:
        self._start = self._now()

    def end(self) -> None:
        self.seconds = sum(used - self._start.get(p, 0.0) for p, used in self._now().items())

    def per_item_us(self, items: int) -> float | None:
        """Server CPU microseconds per item (write, entry, task): steadier than throughput on a
        machine shared with other work."""
        return round(1e6 * self.seconds / items, 1) if items else None


@dataclass(frozen=True)
class Contender:
    """One system in a comparison and how to measure it once (returns that repetition's figures)."""

    name: str
    system: System
    measure: Callable[[], Json]


def alternate(label: str, reps: int, contenders: Sequence[Contender]) -> dict[str, list[Json]]:
    """Measure every contender `reps` times, taking turns (the order reverses every other repetition,
    so neither side always goes first). A failed measurement is kept as {"error": ...} and the run
    goes on. Each repetition's figures get the servers' resident memory at its end (`rss_mb`), and
    how long the system then took to settle (`settle_s`, not part of the measurement), so that a
    cluster still replicating does not slow down the next contender."""
    results: dict[str, list[Json]] = {c.name: [] for c in contenders}
    for rep in range(reps):
        order = list(contenders) if rep % 2 == 0 else list(reversed(contenders))
        for contender in order:
            progress(f"{label}: {contender.name} ({rep + 1}/{reps})")
            began = time.monotonic()
            try:
                figures = contender.measure()
            except Exception as error:  # recorded in the results; the other measurements go on
                progress(f"  failed: {error!r}")
                figures = {"error": repr(error)[:500]}
            figures["wall_s"] = round(time.monotonic() - began, 2)
            figures["rss_mb"] = contender.system.rss_mb()
            settling = time.monotonic()
            try:
                contender.system.settle()
                figures["settle_s"] = round(time.monotonic() - settling, 2)
            except Exception as error:  # recorded; the next contender is measured all the same
                progress(f"  did not settle: {error!r}")
                figures["settle_error"] = repr(error)[:300]
            results[contender.name].append(figures)
    return results


@dataclass
class SectionResult:
    """A section's table rows and its full figures."""

    rows: list[Row] = field(default_factory=list)
    figures: Json = field(default_factory=dict)


def compare_rows(
    section: str,
    figure: str,
    unit: str,
    better: str,
    results: dict[str, list[Json]],
    key: str,
    peers: Sequence[str],
    potboiler: str = "potboiler",
    judged_by: str = "median",
) -> list[Row]:
    """One row per peer in `results`, comparing the samples of `key` with Potboiler's."""
    runs = results.get(potboiler, [])
    return [
        Row(
            section,
            figure,
            unit,
            peer,
            better,
            samples(results[peer], key),
            samples(runs, key),
            peer_runs=len(results[peer]),
            potboiler_runs=len(runs),
            judged_by=judged_by,
        )
        for peer in peers
        if peer in results
    ]
