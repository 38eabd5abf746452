"""Potboiler nodes for the comparison: one node or a cluster of three peered nodes, each with its Envoy,
started in a `Bench` (which stops them), as users run it: `potboiler node` with its defaults (appends
are acknowledged once written to the store's write-ahead log, without fsync; `--fsync` is not used).
"""

from __future__ import annotations

import time

import httpx

from benchmarks.common import Bench, node_pid
from benchmarks.peers.process import settle, tree_rss_mb
from potboiler.server.processes import NodeProcess

#: What is said about Potboiler's configuration in the results.
CONFIG = {
    "version": "this checkout",
    "durability": "defaults: acknowledged once in RocksDB's write-ahead log, not fsynced (no --fsync)",
    "replication": "every node peered with every other (--peer), asynchronous (AP)",
}


def vector_total(status: dict[str, object]) -> int:
    """How many entries a node holds, from its GET /status answer (uint64 fields are JSON strings)."""
    vector = status.get("vector", [])
    assert isinstance(vector, list)
    return sum(int(c["seq"]) for c in vector)


class PotboilerCluster:
    """`size` Potboiler nodes in `bench`, peered with each other."""

    def __init__(self, bench: Bench, size: int, name: str) -> None:
        self.bench = bench
        self.size = size
        self.name = name
        self.nodes: list[NodeProcess] = []

    def __repr__(self) -> str:
        return f"PotboilerCluster({self.size})"

    @property
    def urls(self) -> list[str]:
        """Each node's core REST URL (through its Envoy)."""
        return [n.rest_url for n in self.nodes]

    @property
    def targets(self) -> list[str]:
        """Each node's own gRPC server (host:port), the direct port."""
        return [n.grpc_target for n in self.nodes]

    @property
    def pids(self) -> list[int]:
        return [node_pid(n) for n in self.nodes if n.alive()]

    def rss_mb(self) -> float:
        """Resident memory of every running node with its Envoy."""
        return tree_rss_mb(self.pids)

    def start(self) -> PotboilerCluster:
        """Start the nodes; with more than one, returns once each is connected to all the others."""
        if self.size == 1:
            self.nodes = [self.bench.start_node(name=self.name)]
        else:
            self.nodes = self.bench.start_cluster(self.size, name=self.name)
            self.wait_connected()
        return self

    def status(self, index: int, timeout: float = 5.0) -> dict[str, object]:
        """Node `index`'s GET /status."""
        response = httpx.get(f"{self.urls[index]}/status", timeout=timeout)
        response.raise_for_status()
        answer: dict[str, object] = response.json()
        return answer

    def held(self, index: int) -> int:
        """How many entries node `index` holds (its version vector's total)."""
        return vector_total(self.status(index))

    def wait_connected(self, timeout: float = 60.0) -> None:
        """Until every node reports every other as connected (LIVE or CATCHING_UP)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                statuses = [self.status(i) for i in range(self.size)]
                if all(_connected(s, self.size - 1) for s in statuses):
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {self.size} Potboiler nodes did not connect within {timeout:g}s")
            time.sleep(0.1)

    def settle(self) -> None:
        """Until every running node holds the same entries (equal version vectors): replication is
        asynchronous, so followers may still be taking the last measurement's writes."""
        running = [i for i, node in enumerate(self.nodes) if node.alive()]
        if len(running) > 1:
            settle(lambda: len({repr(self.status(i)["vector"]) for i in running}) == 1)

    def stop_member(self, index: int) -> None:
        self.nodes[index].stop()

    def start_member(self, index: int) -> None:
        """Start a stopped node again (same data, ports and peers); does not wait."""
        self.nodes[index].start(wait=False)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _connected(status: dict[str, object], peers: int) -> bool:
    states = status.get("peers", [])
    assert isinstance(states, list)
    return len(states) == peers and all(p.get("state") in ("STATE_LIVE", "STATE_CATCHING_UP") for p in states)
