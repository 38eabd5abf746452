"""The nemesis: a seeded schedule of faults injected into a running cluster, each held for a while and
then healed, with the time the cluster takes to converge after each heal.

Faults (one at a time; the schedule cycles through all of them in a seeded order):

- ``partition-one``: one node cut off from all others;
- ``partition-majority``: a minority and a majority;
- ``partition-ring``: each node reaches only its two neighbours in a random ring (entries must travel
  several hops);
- ``partition-bridge``: two halves that only one node in the middle can reach both of;
- ``kill``: ``kill -9`` of a node, restarted after the hold;
- ``pause``: SIGSTOP of a node, SIGCONT after the hold;
- ``slow-links``: the proxied links get latency, jitter and a bandwidth limit;
- ``stall-links``: the proxied links forward nothing, but keep their connections open;
- ``reset-links``: the proxied links' connections are reset over and over.

Convergence after a heal: the componentwise maximum of all nodes' version vectors at the moment of the
heal is the target; the time until every node holds at least the target is one sample. Writes go on
all the while, so "equal vectors" would never hold; "everything that existed at the heal arrived
everywhere" does.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from tests.faults.cluster import FaultCluster, converged, hold_for, union
from tests.faults.proxy import LinkMode

FAULTS = (
    "partition-one",
    "partition-majority",
    "partition-ring",
    "partition-bridge",
    "kill",
    "pause",
    "slow-links",
    "stall-links",
    "reset-links",
)
SLOW = LinkMode(latency_s=0.15, jitter_s=0.1, bandwidth=32 * 1024)


@dataclass
class Nemesis:
    """Injects faults into `cluster` following a seeded schedule."""

    cluster: FaultCluster
    seed: int
    #: How long each fault lasts.
    hold_s: float = 2.5
    #: Quiet time between a convergence and the next fault.
    calm_s: float = 0.5
    #: Longest a convergence after a heal may take before the run counts it as a problem.
    converge_timeout_s: float = 45.0
    faults: tuple[str, ...] = FAULTS
    convergence: list[float] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def run(self, duration_s: float, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Inject faults until `duration_s` has passed (the fault under way finishes and heals)."""
        rng = random.Random(self.seed)
        order: list[str] = []
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline and not should_stop():
            if not order:
                order = list(self.faults)
                rng.shuffle(order)
            self.once(order.pop(0), rng)
            hold_for(self.calm_s)

    def once(self, fault: str, rng: random.Random) -> None:
        """Inject one fault, hold it, heal it and measure the convergence."""
        cluster = self.cluster
        size = len(cluster.nodes)
        victim = rng.randrange(size)
        order = list(range(size))
        rng.shuffle(order)
        heal: Callable[[], None] = cluster.heal_network
        tick: Callable[[], None] | None = None
        started = time.monotonic()
        if fault == "partition-one":
            cluster.partition([[victim], [i for i in range(size) if i != victim]])
            what = f"isolate n{victim}"
        elif fault == "partition-majority":
            minority = order[: (size - 1) // 2]
            cluster.partition([minority, order[len(minority) :]])
            what = f"split {sorted(minority)} | {sorted(order[len(minority) :])}"
        elif fault == "partition-ring":
            neighbours = {frozenset((order[k], order[(k + 1) % size])) for k in range(size)}
            pairs = [
                (a, b) for a in range(size) for b in range(a + 1, size) if frozenset((a, b)) not in neighbours
            ]
            cluster.cut_pairs(pairs)
            what = f"ring {order}"
        elif fault == "partition-bridge":
            bridge, rest = order[0], order[1:]
            half = len(rest) // 2
            cluster.partition([rest[:half], rest[half:]])
            what = f"bridge n{bridge} between {sorted(rest[:half])} and {sorted(rest[half:])}"
        elif fault == "kill":
            cluster.kill(victim)
            heal = lambda: cluster.restart(victim)  # noqa: E731
            what = f"kill -9 n{victim}"
        elif fault == "pause":
            cluster.pause(victim)
            heal = lambda: cluster.resume(victim)  # noqa: E731
            what = f"SIGSTOP n{victim}"
        elif fault in ("slow-links", "stall-links", "reset-links"):
            proxy = cluster.proxy
            assert proxy is not None
            links = list(cluster.proxied)
            if fault == "slow-links":
                for link in links:
                    proxy.set_mode(link, SLOW)
            elif fault == "stall-links":
                for link in links:
                    proxy.set_mode(link, LinkMode(stalled=True))
            else:

                def tick() -> None:
                    for link in links:
                        proxy.reset(link)

            what = f"{fault} {links}"
        else:
            raise ValueError(f"unknown fault {fault!r}")
        cluster.count(fault)
        hold_for(self.hold_s, tick, every=0.3)
        # The target: everything any node held when the fault ended (a killed node's share is in
        # its store, so it is read once the node is back).
        heal()
        healed = time.monotonic()
        seconds = self.wait_converged(union(self.cluster.vectors()), since=healed)
        self.log.append(f"{started:.1f} {what}: held {healed - started:.1f}s, converged in {seconds:.2f}s")

    def wait_converged(self, target: dict[str, int], since: float) -> float:
        """Wait until every node holds `target`; returns the seconds since `since` (the heal) it took,
        recorded as a sample."""
        deadline = time.monotonic() + self.converge_timeout_s
        while True:
            try:
                if converged(self.cluster.vectors(), target):
                    break
            except httpx.HTTPError:
                pass  # a node still starting
            if time.monotonic() > deadline:
                self.problems.append(f"no convergence within {self.converge_timeout_s}s after a heal")
                break
            time.sleep(0.05)
        seconds = time.monotonic() - since
        self.convergence.append(seconds)
        return seconds


def wait_quiet(cluster: FaultCluster, timeout_s: float = 60.0, steady_s: float = 1.0) -> float:
    """Wait until every node holds the same entries, all delivered, unchanged for `steady_s` (late
    requests a paused node took may still land meanwhile); returns the seconds until it settled."""
    start = time.monotonic()
    deadline = start + timeout_s
    last: list[dict[str, int]] | None = None
    since = start
    while True:
        try:
            statuses = [cluster.status(n.index) for n in cluster.nodes]
        except httpx.HTTPError:
            statuses = []
        vectors = [{c["owner"]: int(c["seq"]) for c in s.get("vector", [])} for s in statuses]
        settled = (
            bool(statuses)
            and converged(vectors)
            and all(
                int(s.get("pending", 0)) == 0 and int(s.get("delivered_position", 0)) == sum(v.values())
                for s, v in zip(statuses, vectors, strict=True)
            )
        )
        now = time.monotonic()
        if not settled or vectors != last:
            last, since = (vectors if settled else None), now
        elif now - since >= steady_s:
            return since - start
        if now > deadline:
            shown = [
                {"vector": v, "pending": s.get("pending"), "delivered_position": s.get("delivered_position")}
                for s, v in zip(statuses, vectors, strict=True)
            ]
            raise AssertionError(
                f"the cluster did not become quiet within {timeout_s}s: {shown}\n{diagnose_pending(cluster)}"
            )
        time.sleep(0.05)


def diagnose_pending(cluster: FaultCluster, limit: int = 5) -> str:
    """For nodes holding entries they have not delivered: which entries, and what each still waits
    for (its prev or dependencies not delivered on that node), to explain a cluster that stays busy."""
    try:
        delivered = {n.index: {e["id"] for e in cluster.entries(n.index)} for n in cluster.nodes}
        everywhere = set().union(*delivered.values())
        lines = []
        for node in cluster.nodes:
            stuck = sorted(everywhere - delivered[node.index])
            if not stuck:
                continue
            lines.append(f"{node.name}: {len(stuck)} entries delivered elsewhere but not here")
            for entry_id in stuck[:limit]:
                entry = cluster.get(f"{node.url}/log/{entry_id}")
                needs = [*entry.get("dependencies", []), *([entry["prev"]] if entry.get("prev") else [])]
                waiting = [d for d in needs if d not in delivered[node.index]]
                lines.append(f"  {entry_id} (owner {entry.get('owner')}) waits for {waiting} of {needs}")
        return "\n".join(lines) or "no node holds entries delivered elsewhere but not there"
    except (httpx.HTTPError, AssertionError, KeyError) as exc:
        return f"(diagnosis failed: {exc!r})"
