"""Replication between real node processes (each with its Envoy): convergence under concurrent writes,
late joiners, kill -9 and restart, line topology, removal, cross-node dependencies with webhooks,
the `potboiler cluster` command, and the Prometheus metrics that report all this."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from potboiler.server.ports import cluster_bases
from potboiler.server.processes import NodeProcess, find_base_port
from potboiler.server.urls import origin
from potboiler.v1 import log_pb2, log_pb2_grpc, webhooks_pb2, webhooks_pb2_grpc
from tests.conftest import refusing_port, wait_for_sync
from tests.node_processes import NodeProcesses, processes_matching
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e

Cluster = Callable[..., list[NodeProcess]]

#: Node processes on a loaded 2-core machine: more room than the in-process default.
wait_until = functools.partial(wait_for_sync, timeout=30.0)


@pytest.fixture
def cluster(node_process: NodeProcesses) -> Cluster:
    """Start nodes peered as asked, all at once (on ports chosen up front, the peers' URLs); the
    factory stops them all at the end."""
    base = find_base_port(count=4)

    def make(
        n: int, peers: Callable[[int, list[str]], list[str]] | None = None, extra: list[str] | None = None
    ) -> list[NodeProcess]:
        first = len(node_process.started)
        bases = cluster_bases(base, first + n)[first:]
        urls = [f"http://127.0.0.1:{b}" for b in bases]
        nodes = []
        for i in range(n):
            chosen = peers(i, urls) if peers else [u for j, u in enumerate(urls) if j != i]
            node = node_process(
                f"node{first + i}", peers=chosen, extra_args=extra or [], base_port=bases[i], start=False
            )
            nodes.append(node.start(wait=False))
        for node in nodes:
            node.wait_ready()
        return nodes

    return make


def heads(node: NodeProcess) -> dict[str, str]:
    result: dict[str, str] = httpx.get(f"{node.url}/log", timeout=5).json()
    return result


def delivered_position(node: NodeProcess) -> int:
    return int(httpx.get(f"{node.url}/status", timeout=5).json()["delivered_position"])


def all_ids(node: NodeProcess) -> list[str]:
    """Every delivered entry id on a node, in its delivery order (via the subscription)."""

    async def read() -> list[str]:
        async with grpc.aio.insecure_channel(node.grpc_target) as channel:
            stub = log_pb2_grpc.LogServiceStub(channel)
            total = delivered_position(node)
            ids: list[str] = []
            if total == 0:
                return ids
            async for message in stub.SubscribeEntries(log_pb2.SubscribeEntriesRequest(after_position=0)):
                ids += [d.entry.id for d in message.entries]
                if len(ids) >= total:
                    return ids
            return ids

    return asyncio.run(read())


def total(node: NodeProcess) -> int:
    status = httpx.get(f"{node.url}/status", timeout=5).json()
    return sum(int(c["seq"]) for c in status["vector"])


def post(node: NodeProcess, body: object, params: dict[str, str] | None = None) -> str:
    response = httpx.post(f"{node.url}/log", json=body, params=params, timeout=10)
    assert response.status_code == 201, response.text
    entry_id: str = response.json()["id"]
    return entry_id


def firsts(node: NodeProcess) -> dict[str, str]:
    result: dict[str, str] = httpx.get(f"{node.url}/log/first", timeout=5).json()
    return result


def converged(nodes: list[NodeProcess], expected: int) -> bool:
    """Every node holds `expected` entries, with the same heads and firsts (one per owner)."""
    try:
        h = [heads(n) for n in nodes]
        f = [firsts(n) for n in nodes]
        return (
            all(x == h[0] for x in h)
            and all(x == f[0] and x.keys() == h[0].keys() for x in f)
            and all(total(n) == expected for n in nodes)
        )
    except httpx.HTTPError:
        return False


def test_three_nodes_writing_concurrently_converge(cluster: Cluster) -> None:
    nodes = cluster(3)

    def writer(node: NodeProcess) -> list[str]:
        with httpx.Client(timeout=10) as client:
            data = {"zeta": {"y": 1, "b": [{"k": 2, "c": 3}]}, "alpha": True}
            return [client.post(f"{node.url}/log", json={"n": i, **data}).json()["id"] for i in range(150)]

    results: list[list[str]] = [[] for _ in nodes]
    threads = [threading.Thread(target=lambda i=i: results[i].extend(writer(nodes[i]))) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    acknowledged = {i for r in results for i in r}
    assert len(acknowledged) == 450
    wait_until(lambda: converged(nodes, 450), message="convergence")
    for node in nodes:
        ids = all_ids(node)
        assert len(ids) == len(set(ids)) == 450
        assert set(ids) == acknowledged
    sample = sorted(acknowledged)[:20]
    for entry_id in sample:
        bodies = [httpx.get(f"{n.url}/log/{entry_id}", timeout=5).content for n in nodes]
        assert bodies[0] == bodies[1] == bodies[2]  # byte for byte: objects print with sorted keys
        entry = json.loads(bodies[0])
        assert list(entry) == sorted(entry) and list(entry["data"]) == ["alpha", "n", "zeta"]
        assert list(entry["data"]["zeta"]["b"][0]) == ["c", "k"]


def test_node_added_later_catches_up(cluster: Cluster) -> None:
    a, b = cluster(2)
    for i in range(300):
        post(a if i % 2 else b, {"i": i})
    [late] = cluster(1, peers=lambda i, urls: [])
    assert httpx.post(f"{late.url}/nodes", json={"url": a.url}, timeout=5).status_code == 204
    wait_until(lambda: converged([a, b, late], 300), message="late node catch-up")
    # it joined both ways, and learned b by gossip
    wait_until(lambda: late.url in httpx.get(f"{a.url}/nodes").json(), message="join both ways")
    wait_until(lambda: b.url in httpx.get(f"{late.url}/nodes").json(), message="gossip")


def test_kill_9_mid_stream_then_restart_converges(cluster: Cluster, node_process: NodeProcesses) -> None:
    a, b, c = cluster(3)
    acknowledged: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        with httpx.Client(timeout=10) as client:
            i = 0
            while not stop.is_set():
                response = client.post(f"{a.url}/log", json={"i": i})
                if response.status_code == 201:
                    acknowledged.append(response.json()["id"])
                i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_until(lambda: len(acknowledged) > 100, message="writes before the crash")
        b.kill()
        n = len(acknowledged)
        wait_until(lambda: len(acknowledged) > n + 100, message="writes while b is down")
        node_process.start(b)  # (once the killed node's Envoy has let go of its ports)
        n = len(acknowledged)
        wait_until(lambda: len(acknowledged) > n + 100, message="writes after the restart")
    finally:
        stop.set()
        thread.join()
    wait_until(lambda: converged([a, b, c], len(acknowledged)), message="convergence after kill -9")
    for node in (a, b, c):
        ids = all_ids(node)
        assert len(ids) == len(set(ids)), "duplicates"
        assert set(ids) == set(acknowledged), "lost or invented entries"


def test_a_frozen_peer_is_shown_silent_then_live_again(cluster: Cluster) -> None:
    """A hung peer (here SIGSTOPped) keeps its stream open until keepalive gives up (~15 s): meanwhile
    /status must not call it LIVE, as nothing comes from it."""
    a, b = cluster(2)

    def state_of_b() -> tuple[str, int]:
        [peer] = httpx.get(f"{a.url}/status", timeout=5).json()["peers"]
        return peer["state"], int(peer.get("silent_ms", 0))

    wait_until(lambda: state_of_b()[0] == "STATE_LIVE", message="b live")
    b.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: state_of_b()[0] == "STATE_SILENT", message="b silent")
        assert state_of_b()[1] > 3000
    finally:
        b.signal(signal.SIGCONT)
    wait_until(lambda: state_of_b()[0] == "STATE_LIVE", message="b live again")


def test_line_topology_converges_through_the_middle(cluster: Cluster) -> None:
    def line(i: int, urls: list[str]) -> list[str]:
        return [urls[1]] if i != 1 else []

    a, b, c = cluster(3, peers=line, extra=["--no-gossip"])
    for i in range(50):
        post(a, {"from": "a", "i": i})
        post(c, {"from": "c", "i": i})
    wait_until(lambda: converged([a, b, c], 100), message="multi-hop convergence")
    assert httpx.get(f"{a.url}/nodes").json() == [b.url]
    assert httpx.get(f"{c.url}/nodes").json() == [b.url]
    assert sorted(httpx.get(f"{b.url}/nodes").json()) == sorted([a.url, c.url])


def test_removed_peer_stops_receiving(cluster: Cluster) -> None:
    a, b = cluster(2)
    post(a, 1)
    wait_until(lambda: converged([a, b], 1), message="convergence")
    assert httpx.request("DELETE", f"{a.url}/nodes", json={"url": b.url}).status_code == 204
    assert httpx.request("DELETE", f"{a.url}/nodes", json={"url": b.url}).status_code == 404
    # b is refused when it redials, and drops a from its own peers
    wait_until(lambda: httpx.get(f"{b.url}/nodes").json() == [], message="b forgets a")
    for i in range(5):
        post(a, {"after": i})
    wait_until(lambda: total(a) == 6, message="writes on a")
    deadline = time.monotonic() + 1.0  # b never gets them: watch it for a while
    while time.monotonic() < deadline:
        assert total(b) == 1
        time.sleep(0.05)
    assert httpx.get(f"{a.url}/nodes").json() == []
    # an operator's explicit add on either side joins them again, both ways
    assert httpx.post(f"{b.url}/nodes", json={"url": a.url}).status_code == 204
    wait_until(lambda: converged([a, b], 6), message="convergence after re-adding")
    assert httpx.get(f"{a.url}/nodes").json() == [b.url]


def test_webhook_holds_back_an_entry_until_its_dependency_from_another_node_arrives(
    cluster: Cluster, receiver: Receiver
) -> None:
    a, b = cluster(2, peers=lambda i, urls: [])
    assert httpx.post(f"{b.url}/log/register", json={"url": receiver.url()}).status_code == 204
    x = post(a, {"on": "a"})
    before = post(b, {"on": "b", "n": 1})
    y = post(b, {"needs": x}, params={"dependency": x})
    after = post(b, {"on": "b", "n": 2})
    wait_until(lambda: receiver.accepted_ids() == [before], message="the entry without dependencies")
    assert httpx.get(f"{b.url}/log/{y}").status_code == 200  # stored and acknowledged
    # y and `after` do not arrive while x is missing (a while is all a test can watch).
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        assert receiver.accepted_ids() == [before]
        time.sleep(0.05)
    assert httpx.post(f"{b.url}/nodes", json={"url": a.url}).status_code == 204
    wait_until(lambda: len(receiver.accepted_ids()) == 4, message="delivery once the dependency arrived")
    assert receiver.accepted_ids() == [before, x, y, after]


def start_cluster(data_dir: Path, nodes: int, base: int) -> subprocess.Popen[bytes]:
    """`potboiler cluster` of `nodes` nodes from `base` on, in its own session, its output piped."""
    cmd = [sys.executable, "-m", "potboiler.server.cli", "cluster", "--nodes", str(nodes)]
    cmd += ["--base-port", str(base), "--data-dir", str(data_dir)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def test_cluster_command_runs_and_stops_every_node(tmp_path: Path) -> None:
    base = find_base_port(count=3)
    proc = start_cluster(tmp_path, 3, base)
    try:
        lines: list[str] = []
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.decode())
            if "is up" in lines[-1]:
                break
        bases = cluster_bases(base, 3)
        assert any(f"REST http://127.0.0.1:{bases[2]}" in line for line in lines), lines
        nodes = [NodeProcess(tmp_path / f"node{i}", b) for i, b in enumerate(bases)]
        post(nodes[0], {"hello": "cluster"})
        wait_until(lambda: converged(nodes, 1), message="cluster convergence")
        status = subprocess.run(
            [sys.executable, "-m", "potboiler.server.cli", "status", "--url", nodes[1].url],
            capture_output=True,
            text=True,
            check=True,
        )
        peers = json.loads(status.stdout)["peers"]
        assert sorted(p["url"] for p in peers) == sorted([nodes[0].url, nodes[2].url])
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(30)
        finally:
            leftover = kill_leftovers(tmp_path)
    assert code == 0
    assert leftover == [], f"processes left behind: {leftover}"


def test_a_cluster_stopped_while_it_starts_stops_at_once(tmp_path: Path) -> None:
    """Ctrl-C while the nodes start: the cluster stops them rather than waiting for them to be up."""
    proc = start_cluster(tmp_path, 2, find_base_port(count=2))
    try:
        # Its nodes are spawned once its signal handlers are in place.
        wait_until(
            lambda: processes_matching(lambda argv: f"{tmp_path}/node1" in argv), message="the nodes spawned"
        )
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        leftover = kill_leftovers(tmp_path)
    assert proc.returncode == 0, output
    assert b"is up" not in output, output
    assert leftover == [], f"processes left behind: {leftover}"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP], ids=["killed", "hung up"])
def test_a_cluster_killed_or_hung_up_takes_its_nodes_and_envoys_with_it(
    tmp_path: Path, sig: signal.Signals
) -> None:
    proc = start_cluster(tmp_path, 1, find_base_port())
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            if b"is up" in raw:
                break
        proc.send_signal(sig)
        proc.wait(30)

        def left() -> list[str]:
            found = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
            return found.stdout.split()

        wait_until(lambda: not left(), timeout=30, message="the node and its Envoy to stop")
    finally:
        if proc.poll() is None:
            proc.kill()
        kill_leftovers(tmp_path)  # whatever a failure above left running (each node has its own session)


def kill_leftovers(root: Path) -> list[int]:
    """SIGKILL every process whose arguments name `root` (nodes and Envoys a test started there);
    returns their pids."""
    pids = processes_matching(lambda argv: any(str(root) in arg for arg in argv))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def metrics(node: NodeProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A node's Prometheus samples (port B+5), by name and labels."""
    text = httpx.get(f"http://127.0.0.1:{node.ports.metrics}/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def webhook_labels(node: NodeProcess, url: str) -> tuple[tuple[str, str], ...]:
    """The labels of a webhook's series on a node's metrics port (its digest as ListWebhooks gives it)."""
    with grpc.insecure_channel(node.grpc_target) as channel:
        listed = webhooks_pb2_grpc.WebhooksServiceStub(channel).ListWebhooks(
            webhooks_pb2.ListWebhooksRequest()
        )
    [hook] = [hook for hook in listed.webhooks if hook.url == url]
    return (("target", origin(url)), ("webhook", hook.digest))


PEER_STATES = ("disconnected", "catching_up", "live", "silent")


def test_metrics_count_appends_replication_and_webhook_deliveries_and_failures(
    cluster: Cluster, receiver: Receiver
) -> None:
    a, b = cluster(2)
    with refusing_port() as dead_port:  # every delivery to it fails
        count_what_happens(a, b, receiver, f"http://127.0.0.1:{dead_port}/hook")


def count_what_happens(a: NodeProcess, b: NodeProcess, receiver: Receiver, dead_url: str) -> None:
    """Appends on a, replicated to b, delivered by b to a receiver and to a dead URL: each counted."""
    for url in (receiver.url(), dead_url):
        assert httpx.post(f"{b.url}/log/register", json={"url": url}).status_code == 204
    for n in range(5):
        post(a, {"n": n})
    wait_until(lambda: len(receiver.accepted_ids()) == 5, message="the webhook deliveries on b")
    # The receiver records an entry before it answers; b counts it once the answer is back.
    delivered = ("potboiler_webhook_deliveries_total", webhook_labels(b, receiver.url()))
    wait_until(lambda: metrics(b)[delivered] == 5, message="the deliveries counted")
    on_a, on_b = metrics(a), metrics(b)
    assert on_a[("potboiler_appends_total", ())] == 5
    assert on_a[("potboiler_replicated_entries_out_total", (("peer", b.url),))] >= 5
    assert on_b[("potboiler_replicated_entries_in_total", (("peer", a.url),))] >= 5
    assert on_b[("potboiler_entries", ())] == 5
    assert on_b[("potboiler_peer_connected", (("peer", a.url),))] == 1
    assert on_b[("potboiler_peer_behind_entries", (("peer", a.url),))] == 0
    state = {s: on_b[("potboiler_peer_state", (("peer", a.url), ("state", s)))] for s in PEER_STATES}
    assert sum(state.values()) == 1 and state["disconnected"] == 0
    assert on_b[("potboiler_webhook_pending_entries", webhook_labels(b, receiver.url()))] == 0
    assert on_b[("potboiler_webhook_pending_entries", webhook_labels(b, dead_url))] == 5
    assert on_b[("potboiler_store_bytes", (("store", "log"),))] > 0
    assert {labels for name, labels in on_b if name == "potboiler_store_bytes"} == {
        (("store", s),) for s in ("log", "kv", "pigtail")
    }
    wait_until(
        lambda: metrics(b)[("potboiler_webhook_failures_total", webhook_labels(b, dead_url))] >= 1,
        message="a failed delivery counted",
    )
    assert metrics(b)[("potboiler_webhook_deliveries_total", webhook_labels(b, dead_url))] == 0
    wait_until(
        lambda: metrics(a)[("potboiler_peer_lag_entries", (("peer", b.url),))] == 0,
        message="b's acknowledgement of everything",
    )
