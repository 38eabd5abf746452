"""Partitions made with iptables between nodes on distinct loopback addresses are real: entries do not
cross them, both sides keep taking writes (AP), and everything arrives everywhere once they heal; in a
ring partition entries travel several hops while the partition lasts. And the firewall leaves no rule
behind."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.conftest import wait_for_sync
from tests.faults.cluster import FaultCluster, append, has, hold_for
from tests.faults.netfilter import CHAIN_PREFIX, Firewall

#: How long a partition is watched for leaks (entries crossing it).
WATCH_S = 1.5


def test_partition_blocks_replication_until_healed(cluster: FaultCluster) -> None:
    cluster.start(3)
    urls = [n.url for n in cluster.nodes]
    with httpx.Client(timeout=10.0) as client:
        first = append(client, urls[0], {"before": 1})
        wait_for_sync(
            lambda: all(has(client, u, first) for u in urls), message="replicated before the partition"
        )

        cluster.partition([[0], [1, 2]])
        alone = append(client, urls[0], {"side": "minority"})
        together = append(client, urls[1], {"side": "majority"})
        # The majority side still replicates within itself ...
        wait_for_sync(lambda: has(client, urls[2], together), message="replication inside the majority")

        # ... and nothing crosses the partition, either way, for as long as it is watched.
        def no_leak() -> None:
            assert not has(client, urls[1], alone) and not has(client, urls[2], alone), (
                "minority entry leaked"
            )
            assert not has(client, urls[0], together), "majority entry leaked"

        hold_for(WATCH_S, no_leak)
        assert cluster.firewall is not None and cluster.firewall.blocked == 4

        cluster.heal_network()
        assert cluster.firewall.blocked == 0
        wait_for_sync(
            lambda: all(has(client, u, e) for u in urls for e in (alone, together)),
            timeout=60,
            message="convergence after the heal",
        )
        heads = [client.get(f"{u}/log").json() for u in urls]
        assert heads[0] == heads[1] == heads[2]


def test_ring_partition_converges_through_neighbours(cluster: FaultCluster) -> None:
    """Ring 0-1-2-3-0: the diagonals 0-2 and 1-3 are cut, so 0's entries reach 2 only through 1 or 3."""
    cluster.start(4)
    urls = [n.url for n in cluster.nodes]
    cluster.cut_pairs([(0, 2), (1, 3)])
    with httpx.Client(timeout=10.0) as client:
        ids = [append(client, url, {"ring": i}) for i, url in enumerate(urls)]
        wait_for_sync(
            lambda: all(has(client, u, e) for u in urls for e in ids),
            timeout=60,
            message="every entry on every node through the ring",
        )
        vectors = cluster.vectors()
        assert all(v == vectors[0] for v in vectors)


def test_firewall_leaves_nothing_behind(firewall: Firewall) -> None:
    """Every rule lives in this process's chains, which close() removes; chains of test processes that
    died before their teardown are removed by the next firewall."""
    firewall.mark_connections(gid=4_000_000_000, mark=7)
    firewall.cut((7, "127.255.0.2"), (8, "127.255.0.3"))
    firewall.redirect(4_000_000_000, "127.255.0.3", 1234, "127.255.0.9", 4321)
    assert len(firewall.rules("filter")) == 3 and len(firewall.rules("nat")) == 1
    firewall.close()
    for table in ("filter", "nat"):
        listing = subprocess.run(["iptables", "-w", "-t", table, "-S"], capture_output=True, text=True).stdout
        assert firewall.chain not in listing, f"{table}: {listing}"

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs (and is not reused this soon)
    stale = Firewall(chain=f"{CHAIN_PREFIX}{dead.pid}")
    stale.install()
    stale.block(9, "127.255.0.4")
    Firewall.remove_stale()
    for table in ("filter", "nat"):
        listing = subprocess.run(["iptables", "-w", "-t", table, "-S"], capture_output=True, text=True).stdout
        assert stale.chain not in listing, f"stale chain left in {table}: {listing}"
