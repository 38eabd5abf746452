"""Slow, stalled, half-open and reset links between two nodes, through the test proxy: replication is
delayed but never wrong, recovers by itself, and a slow peer does not grow the sender's memory."""

from __future__ import annotations

import time

import grpc
import httpx
from google.protobuf.struct_pb2 import Value

from potboiler.v1 import log_pb2, log_pb2_grpc
from tests.conftest import wait_for_sync
from tests.faults.cluster import FaultCluster, append, converged, has, hold_for, rss_bytes
from tests.faults.proxy import LinkMode

LINK = "n0-n1"
#: Longest a dialer may take to notice a half-open connection and dial again: its keepalive (a ping
#: after 10 s without news, 5 s to answer: server/replicator.py channel_options) plus a reconnect,
#: with room for a loaded machine.
HALF_OPEN_RECOVERY_S = 30.0


def no_duplicates(cluster: FaultCluster) -> None:
    for node in cluster.nodes:
        ids = [e["id"] for e in cluster.entries(node.index)]
        assert len(ids) == len(set(ids)), f"{node.name} delivered an entry twice"
    vectors = cluster.vectors()
    assert converged(vectors)


def test_latency_and_jitter_delay_but_deliver(cluster: FaultCluster) -> None:
    cluster.start(2, proxied=[(0, 1)])
    assert cluster.proxy is not None
    a, b = (n.url for n in cluster.nodes)
    with httpx.Client(timeout=10.0) as client:
        warm = append(client, a, {"warm": 1})
        wait_for_sync(lambda: has(client, b, warm), message="replicated through the proxy")
        assert cluster.proxy.stats[LINK].bytes > 0, "replication did not go through the proxy"

        cluster.proxy.set_mode(LINK, LinkMode(latency_s=0.4, jitter_s=0.2))
        sent = time.monotonic()
        slow = append(client, a, {"slow": 1})
        wait_for_sync(lambda: has(client, b, slow), message="replicated over the slow link")
        assert time.monotonic() - sent >= 0.4, "the entry arrived faster than the link's latency"
        cluster.proxy.set_mode(LINK, LinkMode())
    no_duplicates(cluster)


def test_stalled_link_resumes(cluster: FaultCluster) -> None:
    cluster.start(2, proxied=[(0, 1)])
    assert cluster.proxy is not None
    a, b = (n.url for n in cluster.nodes)
    with httpx.Client(timeout=10.0) as client:
        wait_for_sync(
            lambda: cluster.proxy is not None and cluster.proxy.connections(LINK) > 0, message="link up"
        )
        cluster.proxy.set_mode(LINK, LinkMode(stalled=True))
        ids = [append(client, url, {"stalled": i}) for i, url in enumerate((a, b))]

        def nothing_crosses() -> None:
            assert not has(client, b, ids[0]) and not has(client, a, ids[1]), "data crossed a stalled link"

        hold_for(1.5, nothing_crosses)
        cluster.proxy.set_mode(LINK, LinkMode())
        wait_for_sync(
            lambda: has(client, b, ids[0]) and has(client, a, ids[1]), timeout=30, message="resumed"
        )
    no_duplicates(cluster)


def test_half_open_connection_is_detected(cluster: FaultCluster) -> None:
    """The proxy forgets the peer's side of the connection and swallows what the dialer sends:
    only the dialer's keepalive can tell. Replication must come back by itself."""
    cluster.start(2, proxied=[(0, 1)])
    proxy = cluster.proxy
    assert proxy is not None
    a, b = (n.url for n in cluster.nodes)
    with httpx.Client(timeout=10.0) as client:
        warm = append(client, a, {"warm": 1})
        wait_for_sync(lambda: has(client, b, warm), message="link up")
        severed = proxy.sever(LINK)
        assert severed >= 1
        start = time.monotonic()
        ids = [append(client, url, {"half-open": i}) for i, url in enumerate((a, b))]
        wait_for_sync(
            lambda: has(client, b, ids[0]) and has(client, a, ids[1]),
            timeout=HALF_OPEN_RECOVERY_S,
            message="replication after a half-open connection",
        )
        print(f"recovered from a half-open connection in {time.monotonic() - start:.1f}s")
    no_duplicates(cluster)


def test_resets_lose_and_duplicate_nothing(cluster: FaultCluster) -> None:
    cluster.start(2, proxied=[(0, 1)])
    proxy = cluster.proxy
    assert proxy is not None
    urls = [n.url for n in cluster.nodes]
    ids: list[str] = []
    with httpx.Client(timeout=10.0) as client:
        deadline = time.monotonic() + 4.0
        n = 0
        while time.monotonic() < deadline:
            n += 1
            ids.append(append(client, urls[n % 2], {"reset": n}))
            if n % 10 == 0:
                proxy.reset(LINK)
        assert proxy.stats[LINK].resets > 0
        wait_for_sync(
            lambda: all(has(client, u, i) for u in urls for i in ids[-20:]), timeout=30, message="convergence"
        )
        wait_for_sync(lambda: converged(cluster.vectors()), timeout=30, message="equal vectors")
    no_duplicates(cluster)
    assert len(cluster.entries(0)) == len(ids)


def test_slow_peer_does_not_grow_memory(cluster: FaultCluster) -> None:
    """Node 0 appends far more than its peer (node 1, behind a 64 KiB/s link) can take: node 0's memory
    stays close to that of a control node taking the same appends with no reachable peer (node 2, cut
    off by iptables), because a sender reads what a peer lacks from the store, within a bounded window;
    appends stay fast, and the peer catches up once the link is fast again."""
    cluster.start(3, proxied=[(0, 1)])
    proxy = cluster.proxy
    assert proxy is not None
    cluster.cut_pairs([(0, 2), (1, 2)])
    sender, control = cluster.nodes[0], cluster.nodes[2]
    assert sender.process.process is not None and control.process.process is not None
    pids = (sender.process.process.pid, control.process.process.pid)
    proxy.set_mode(LINK, LinkMode(bandwidth=64 * 1024))
    payload = Value(string_value="x" * 2000)
    batch = log_pb2.AppendEntriesRequest(entries=[log_pb2.AppendEntryRequest(data=payload)] * 500)
    rounds, per_round = 3, 10_000  # ~2 KB entries: ~60 MB the peer cannot take in time
    extra: list[int] = []
    slowest = 0.0
    with (
        grpc.insecure_channel(sender.process.grpc_target) as to_sender,
        grpc.insecure_channel(control.process.grpc_target) as to_control,
    ):
        stubs = [log_pb2_grpc.LogServiceStub(to_sender), log_pb2_grpc.LogServiceStub(to_control)]
        for round_ in range(rounds):
            for _ in range(per_round // len(batch.entries)):
                for stub in stubs:
                    started = time.monotonic()
                    stub.AppendEntries(batch, timeout=30)
                    slowest = max(slowest, time.monotonic() - started)
            sender_rss, control_rss = (rss_bytes(pid) for pid in pids)
            extra.append(sender_rss - control_rss)
            print(
                f"round {round_}: RSS sender {sender_rss / 2**20:.0f} MiB, control {control_rss / 2**20:.0f} MiB"
            )
    vectors = cluster.vectors()
    lag = sum(vectors[0].values()) - sum(vectors[1].values())
    assert lag > rounds * per_round // 2, f"the peer was not slow: only {lag} entries behind"
    # The backlog for the slow peer reached ~60 MB; the sender's memory must not follow it.
    mib = [round(e / 2**20) for e in extra]
    assert max(extra) < 48 * 2**20, f"the sender used this much more memory than the control: {mib} MiB"
    assert slowest < 5.0, f"an append batch took {slowest:.1f}s with a slow peer"
    proxy.set_mode(LINK, LinkMode())
    wait_for_sync(
        lambda: cluster.vector(1) == cluster.vector(0), timeout=120, message="the slow peer catches up"
    )
