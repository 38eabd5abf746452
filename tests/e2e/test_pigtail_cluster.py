"""Pigtail on three real nodes (each with its Envoy), through REST: tasks added on one node are claimed
on another; claims of one task made on two sides of a split resolve to the same winner everywhere once
the split heals; workers (the example script) on all three nodes do every task at least once."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from potboiler.server.processes import NodeProcess
from tests.conftest import wait_for_sync
from tests.node_processes import NodeProcesses

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "examples" / "pigtail" / "worker.py"


class Node:
    """A node of the cluster: its process and REST clients on its core and Pigtail ports."""

    def __init__(self, process: NodeProcess) -> None:
        self.process = process
        self.url = process.url
        self.pigtail_url = process.port_url(process.ports.pigtail)
        self.core = httpx.Client(base_url=self.url, timeout=30.0)
        self.pig = httpx.Client(base_url=self.pigtail_url, timeout=30.0)

    def task(self, queue: str, task_id: str) -> dict[str, Any] | None:
        response = self.pig.get(f"/queue/{queue}/{task_id}", params={"verbose": "true"})
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    def listing(self, queue: str) -> dict[str, dict[str, str]]:
        response = self.pig.get(f"/queue/{queue}")
        if response.status_code == 404:
            return {}
        assert response.status_code == 200, response.text
        result: dict[str, dict[str, str]] = response.json()
        return result

    def close(self) -> None:
        self.core.close()
        self.pig.close()


def peers(node: Node) -> list[str]:
    result: list[str] = node.core.get("/nodes").json()
    return result


def knows_all(node: Node, urls: list[str]) -> bool:
    return set(urls) <= set(peers(node))


def knows_none(node: Node) -> bool:
    return not peers(node)


def peer_is(node: Node, url: str, want: bool) -> bool:
    return (url in peers(node)) == want


def queue_known(node: Node, queue: str) -> bool:
    return node.pig.get(f"/queue/{queue}").status_code == 200


def lists(node: Node, queue: str, ids: set[str]) -> bool:
    """Whether the node lists exactly `ids` (or, for one id, at least it)."""
    listed = set(node.listing(queue))
    return ids <= listed if len(ids) == 1 else listed == ids


def task_has(node: Node, queue: str, task_id: str, key: str, value: object) -> bool:
    return (node.task(queue, task_id) or {}).get(key) == value


def all_done(node: Node, queue: str, ids: list[str]) -> bool:
    return all(task_has(node, queue, task_id, "state", "done") for task_id in ids)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Node]]:
    """Three nodes, each peered with the ones started before it (a node learns the peers that dial
    it, so that is a full mesh). Gossip is off, so that a node of another test that happens to know one
    of these ports (ports are reused) cannot make the cluster learn its peers."""
    nodes: list[Node] = []
    with NodeProcesses(tmp_path_factory.mktemp("pigtail-cluster")) as factory:
        try:
            for i in range(3):
                process = factory(f"node{i}", peers=[n.url for n in nodes], extra_args=["--no-gossip"])
                nodes.append(Node(process))
            for node in nodes:
                others = [n.url for n in nodes if n is not node]
                wait_for_sync(partial(knows_all, node, others), timeout=60, message="the nodes peer")
            yield nodes
        finally:
            for node in nodes:
                node.close()


def create_queue(node: Node, cluster: list[Node], timeout_ms: int = 60_000) -> str:
    """A fresh queue, created on `node` and known on every node."""
    name = f"q-{uuid.uuid4().hex[:12]}"
    assert node.pig.post("/create", json={"name": name, "timeout_ms": timeout_ms}).status_code == 201
    for other in cluster:
        wait_for_sync(partial(queue_known, other, name))
    return name


def add(node: Node, queue: str, **info: Any) -> str:
    response = node.pig.post(
        f"/queue/{queue}", json={"task_name": "hello_world", "info": info or {"foo": "bar"}}
    )
    assert response.status_code == 201, response.text
    task_id: str = response.json()["id"]
    return task_id


def test_task_added_on_one_node_is_claimed_on_another(cluster: list[Node]) -> None:
    n0, n1, n2 = cluster
    queue = create_queue(n0, cluster)
    task_id = add(n0, queue, foo="bar")
    wait_for_sync(partial(lists, n1, queue, {task_id}), message="the task reaches node1")
    claimed = n1.pig.put(f"/queue/{queue}/{task_id}", json={"worker_id": "on-node1"})
    assert claimed.status_code == 200 and claimed.json()["info"] == {"foo": "bar"}
    wait_for_sync(partial(task_has, n2, queue, task_id, "worker", "on-node1"), message="claim reaches node2")
    assert n2.pig.put(f"/queue/{queue}/{task_id}", json={"worker_id": "on-node2"}).status_code == 409
    assert (
        n2.pig.request("DELETE", f"/queue/{queue}/{task_id}", json={"worker_id": "on-node1"}).status_code
        == 200
    )
    for node in cluster:
        wait_for_sync(partial(task_has, node, queue, task_id, "state", "done"))
        assert task_id not in node.listing(queue)


def set_split(cluster: list[Node], isolated: Node, split: bool) -> None:
    """Cut `isolated` off from every other node (replication stops both ways: a removal is mutual),
    or join it to the cluster's nodes again (an explicit add rejoins)."""
    others = [n for n in cluster if n is not isolated]
    if split:
        for node in others:
            assert node.core.request("DELETE", "/nodes", json={"url": isolated.url}).status_code == 204
        for url in peers(isolated):  # any other peer it has (none, normally) would be a path too
            isolated.core.request("DELETE", "/nodes", json={"url": url})
        wait_for_sync(partial(knows_none, isolated), message="the isolated node has no peer left")
        for node in others:
            wait_for_sync(partial(peer_is, node, isolated.url, False))
        return
    for node in others:
        assert node.core.post("/nodes", json={"url": isolated.url}).status_code == 204
    wait_for_sync(partial(knows_all, isolated, [n.url for n in others]), message="the node rejoined")


def test_conflicting_claims_on_two_nodes_resolve_to_one_winner(cluster: list[Node]) -> None:
    n0, n1, n2 = cluster
    queue = create_queue(n0, cluster)
    task_id = add(n0, queue)
    for node in cluster:
        wait_for_sync(partial(lists, node, queue, {task_id}))
    set_split(cluster, n1, split=True)
    try:
        # Both sides of the split grant the claim: delivery is at-least-once. The first claim is made
        # on n1 by a worker whose name sorts last: neither the lowest worker id nor the first node
        # (the lowest id, ids being time-ordered) is the winner by the rule, the lower stamp.
        first = n1.pig.put(f"/queue/{queue}/{task_id}", json={"worker_id": "zz-first"})
        assert first.status_code == 200 and first.json()["worker"] == "zz-first"
        early = n1.task(queue, task_id)
        assert early is not None
        late = early
        while late["lease_expires_ms"] <= early["lease_expires_ms"]:  # a later millisecond
            second = n0.pig.put(f"/queue/{queue}/{task_id}", json={"worker_id": "aa-second"})
            assert second.status_code == 200 and second.json()["worker"] == "aa-second"
            late = n0.task(queue, task_id) or early
    finally:
        set_split(cluster, n1, split=False)

    def agreed() -> bool:
        seen = [node.task(queue, task_id) for node in cluster]
        workers = {None if s is None else s["worker"] for s in seen}
        return len(workers) == 1 and all(s is not None and s["attempts"] == 1 for s in seen)

    wait_for_sync(agreed, message=lambda: repr([node.task(queue, task_id) for node in cluster]))
    assert (n2.task(queue, task_id) or {})["worker"] == "zz-first"  # the earlier claim's stamp is lower
    for node in cluster:
        assert node.pig.put(f"/queue/{queue}/{task_id}", json={"worker_id": "aa-second"}).status_code == 409
        heartbeat = node.pig.post(f"/queue/{queue}/{task_id}/heartbeat", json={"worker_id": "zz-first"})
        assert heartbeat.status_code == 200


def test_workers_on_all_nodes_do_every_task(cluster: list[Node]) -> None:
    queue = create_queue(cluster[0], cluster, timeout_ms=5_000)
    ids = [add(cluster[i % 3], queue, n=i) for i in range(30)]
    for node in cluster:
        wait_for_sync(partial(lists, node, queue, set(ids)), message="every node sees every task")
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "--url",
                node.pigtail_url,
                "--queue",
                queue,
                "--worker-id",
                f"worker-{i}",
                "--exit-when-empty",
                "--poll-interval",
                "0.05",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for i, node in enumerate(cluster)
    ]
    outputs = []
    try:
        for worker in workers:
            out, _ = worker.communicate(timeout=120)
            assert worker.returncode == 0
            outputs.append(out)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    done = [line.split()[1] for out in outputs for line in out.splitlines() if line.startswith("done ")]
    assert set(done) == set(ids)  # every task at least once (a few twice is allowed)
    for node in cluster:
        wait_for_sync(partial(all_done, node, queue, ids), message="every node sees every task done")
        assert node.listing(queue) == {}
