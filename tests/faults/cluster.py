"""A cluster of real node processes for fault injection: one loopback address and one group id per
node, so `tests.faults.netfilter` can partition them, and optional proxies on chosen links.

Node *i* binds 127.A.B.(i+2), where A.B is derived from this test process (parallel workers get
different addresses), and runs as root with group id `gid_base + i` through a setgid wrapper (the
group id is how iptables tells which node made a connection). Every node is given every other node
as a peer (full mesh, static membership with --no-gossip), by its real URL; a proxied link is made
by redirecting both nodes' connections to each other through the proxy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf import json_format

from potboiler.server.ports import Ports, cluster_bases
from potboiler.server.processes import NodeProcess, find_base_port, release_base_port
from potboiler.v1 import log_pb2, log_pb2_grpc
from tests.conftest import wait_for_sync
from tests.faults.netfilter import Firewall
from tests.faults.proxy import LinkMode, Proxy
from tests.node_processes import processes_of

#: The wrapper a node is started through: drop supplementary groups, take group id argv[1], exec.
SETGID = "import os, sys; os.setgroups([]); os.setgid(int(sys.argv[1])); os.execv(sys.argv[2], sys.argv[2:])"
#: How long a node may take to serve after a (re)start on a loaded 2-core machine.
START_TIMEOUT = 60.0
#: How many times a cluster on 127.0.0.1 is started on fresh ports when one was taken meanwhile.
START_ATTEMPTS = 3
#: Timeout of the checker's own requests (not the workload's).
REQUEST_TIMEOUT = 10.0


def address_block() -> str:
    """127.A.B: this test process's block of loopback addresses."""
    pid = os.getpid()
    return f"127.{100 + pid % 150}.{(pid // 150) % 250 + 1}"


def gid_base() -> int:
    """First group id of this process's nodes (16 per process, far above any real group)."""
    return 3_000_000 + (os.getpid() % 1_000_000) * 16


class GroupNodeProcess(NodeProcess):
    """A `potboiler node` running with its own group id (see the module docstring)."""

    def __init__(self, *args: Any, gid: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gid = gid

    def command(self) -> list[str]:
        return [sys.executable, "-c", SETGID, str(self.gid), *super().command()]


def rss_bytes(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class ClusterNode:
    """One node of a fault cluster."""

    index: int
    process: NodeProcess
    gid: int
    node_id: str = ""
    paused: bool = False

    @property
    def mark(self) -> int:
        """The conntrack mark of this node's connections (its group id)."""
        return self.gid

    @property
    def address(self) -> str:
        return self.process.host

    @property
    def ports(self) -> Ports:
        return self.process.ports

    @property
    def url(self) -> str:
        """Root URL (core REST), the node's name among peers."""
        return self.process.url

    @property
    def kv_url(self) -> str:
        return self.process.port_url(self.ports.kv)

    @property
    def pigtail_url(self) -> str:
        return self.process.port_url(self.ports.pigtail)

    @property
    def endpoint(self) -> tuple[int, str]:
        """(mark, address): how the firewall names this node."""
        return (self.mark, self.address)

    @property
    def name(self) -> str:
        return f"n{self.index}"


@dataclass
class FaultCluster:
    """Nodes on distinct loopback addresses, a firewall between them and proxies on chosen links."""

    root: Path
    firewall: Firewall | None
    proxy: Proxy | None = None
    nodes: list[ClusterNode] = field(default_factory=list)
    #: link name -> the two node indexes it joins.
    proxied: dict[str, tuple[int, int]] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    _client: httpx.Client | None = None

    # -- building ------------------------------------------------------------------------------

    def start(
        self,
        size: int,
        *,
        extra_args: Callable[[int], Sequence[str]] = lambda i: (),
        proxied: Sequence[tuple[int, int]] = (),
        group_ids: bool = True,
    ) -> FaultCluster:
        """Start `size` nodes (full mesh), with the links in `proxied` going through the proxy."""
        self._client = httpx.Client(timeout=REQUEST_TIMEOUT)
        for attempt in range(START_ATTEMPTS):
            self._create(size, extra_args, group_ids)
            if self.firewall is not None:
                for node in self.nodes:
                    self.firewall.mark_connections(node.gid, node.mark)
            for a, b in proxied:
                self._proxy_link(a, b)
            for node in self.nodes:
                node.process.start(wait=False)
            taken = [node for node in self.nodes if not self._serving(node)]
            if not taken:
                break
            # A port was taken after it was chosen (another test worker): start over elsewhere.
            assert self.firewall is None and attempt < START_ATTEMPTS - 1, f"{taken[0].name} failed to start"
            self._stop_nodes()
            self.nodes.clear()
        for node in self.nodes:
            node.process.wait_ready(START_TIMEOUT)
            node.node_id = self.status(node.index)["node_id"]
        return self

    def _create(self, size: int, extra_args: Callable[[int], Sequence[str]], group_ids: bool) -> None:
        if self.firewall is not None:
            # Each node has an address of its own (and this process a block of its own): any port will do.
            block = address_block()
            hosts = [f"{block}.{i + 2}" for i in range(size)]
            bases = [find_base_port(host) for host in hosts]
        else:
            hosts = ["127.0.0.1"] * size
            first = find_base_port(count=size)
            bases = cluster_bases(first, size)
        urls = [f"http://{h}:{b}" for h, b in zip(hosts, bases, strict=True)]
        gid0 = gid_base()
        for i in range(size):
            peers = [u for j, u in enumerate(urls) if j != i]
            args = ["--no-gossip", "--log-level", "INFO", *extra_args(i)]
            common: dict[str, Any] = {"host": hosts[i], "peers": peers, "extra_args": args}
            data_dir = self.root / f"n{i}"
            process: NodeProcess = (
                GroupNodeProcess(data_dir, bases[i], gid=gid0 + i, **common)
                if group_ids and self.firewall is not None
                else NodeProcess(data_dir, bases[i], **common)
            )
            self.nodes.append(ClusterNode(i, process, gid0 + i))

    @staticmethod
    def _serving(node: ClusterNode) -> bool:
        """Wait until the node logs that it serves its URL (True) or exits (False): a node whose port
        another process took exits, while that other process answers the node's URL."""
        process = node.process
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            text = process.log_file.read_text(errors="replace") if process.log_file.exists() else ""
            if f"serving {process.url}" in text:
                return True
            if not process.alive():
                return False
            assert time.monotonic() < deadline, f"{node.name} not serving after {START_TIMEOUT}s"
            time.sleep(0.05)

    def _proxy_link(self, a: int, b: int) -> None:
        assert self.firewall is not None and self.proxy is not None, "proxied links need iptables and a proxy"
        name = f"n{a}-n{b}"
        self.proxied[name] = (a, b)
        block = address_block()
        for src, dst in ((a, b), (b, a)):
            s, d = self.nodes[src], self.nodes[dst]
            proxy_host = f"{block}.{200 + src}"
            port = self.proxy.listen(name, proxy_host, (d.address, d.ports.grpc))
            self.firewall.redirect(s.gid, d.address, d.ports.grpc, proxy_host, port)

    def close(self) -> list[str]:
        """Stop every node (resuming paused ones first); returns problems met."""
        if self._client is not None:
            self._client.close()
            self._client = None
        return self._stop_nodes()

    def _stop_nodes(self) -> list[str]:
        """Stop every node and give its base port back; returns problems met."""
        problems = []
        for node in self.nodes:
            if node.paused:
                node.process.signal(signal.SIGCONT)
                node.paused = False
        for node in self.nodes:  # all at once: each takes a moment to stop
            if node.process.alive():
                node.process.signal(signal.SIGTERM)
        for node in reversed(self.nodes):
            try:
                node.process.stop()
            except Exception as exc:  # stop the others anyway
                problems.append(f"{node.name}: {exc!r}")
                node.process.kill()
            release_base_port(node.ports.base)
        return problems

    def count(self, fault: str, n: int = 1) -> None:
        """Count an injected fault for the figures."""
        self.faults[fault] = self.faults.get(fault, 0) + n

    # -- faults --------------------------------------------------------------------------------

    def partition(self, groups: Sequence[Sequence[int]]) -> None:
        """Cut every pair of nodes in different groups (indexes); other pairs stay connected."""
        assert self.firewall is not None
        self.firewall.partition([[self.nodes[i].endpoint for i in g] for g in groups])

    def cut_pairs(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Cut the given pairs of nodes."""
        assert self.firewall is not None
        for a, b in pairs:
            self.firewall.cut(self.nodes[a].endpoint, self.nodes[b].endpoint)

    def heal_network(self) -> None:
        """Remove every partition and make every proxied link normal again."""
        if self.firewall is not None:
            self.firewall.heal()
        if self.proxy is not None:
            for link in self.proxied:
                self.proxy.set_mode(link, LinkMode())

    def kill(self, i: int) -> None:
        """kill -9 a node (its Envoy follows it)."""
        self.nodes[i].process.kill()

    def restart(self, i: int) -> None:
        """Start a killed or stopped node again on the same ports and data, and wait until it serves."""
        node = self.nodes[i]
        wait_for_sync(
            lambda: not processes_of(node.process.data_dir), timeout=30, message=f"{node.name} gone"
        )
        node.process.start(wait=True, timeout=START_TIMEOUT)

    def pause(self, i: int) -> None:
        """SIGSTOP a node process (its Envoy keeps accepting requests that then hang)."""
        self.nodes[i].process.signal(signal.SIGSTOP)
        self.nodes[i].paused = True

    def resume(self, i: int) -> None:
        """SIGCONT a paused node."""
        self.nodes[i].process.signal(signal.SIGCONT)
        self.nodes[i].paused = False

    # -- reading state (the checker's requests, with generous timeouts) -------------------------

    def get(self, url: str) -> Any:
        """GET a URL and its JSON (through one keep-alive client, thread-safe)."""
        assert self._client is not None, "start the cluster first"
        response = self._client.get(url)
        response.raise_for_status()
        return response.json()

    def status(self, i: int) -> dict[str, Any]:
        result: dict[str, Any] = self.get(f"{self.nodes[i].url}/status")
        return result

    def vector(self, i: int) -> dict[str, int]:
        """A node's version vector {owner: seq}."""
        return {c["owner"]: int(c["seq"]) for c in self.status(i).get("vector", [])}

    def vectors(self) -> list[dict[str, int]]:
        return [self.vector(n.index) for n in self.nodes]

    def heads(self, i: int) -> dict[str, str]:
        result: dict[str, str] = self.get(f"{self.nodes[i].url}/log")
        return result

    def entries(self, i: int) -> list[dict[str, Any]]:
        """Every entry delivered on node i, in its delivery order, read through the subscription
        from position 0 (each as JSON: id, owner, seq, data, when, dependencies, position)."""
        node = self.nodes[i]
        end = int(self.status(i)["delivered_position"])
        out: list[dict[str, Any]] = []
        if end == 0:
            return out
        with grpc.insecure_channel(
            node.process.grpc_target, options=[("grpc.max_receive_message_length", 64 << 20)]
        ) as channel:
            stub = log_pb2_grpc.LogServiceStub(channel)
            call = stub.SubscribeEntries(log_pb2.SubscribeEntriesRequest(after_position=0), timeout=60)
            try:
                for response in call:
                    for delivered in response.entries:
                        item = json_format.MessageToDict(delivered.entry, preserving_proto_field_name=True)
                        item["position"] = int(delivered.position)
                        out.append(item)
                    if out and out[-1]["position"] >= end:
                        break
            finally:
                call.cancel()
        return out


def append(client: httpx.Client, url: str, data: object) -> str:
    """POST `data` as an entry to the node at `url` (core REST); the new entry's id."""
    response = client.post(f"{url}/log", json=data)
    assert response.status_code == 201, response.text
    entry_id: str = response.json()["id"]
    return entry_id


def has(client: httpx.Client, url: str, entry_id: str) -> bool:
    """Whether the node at `url` holds the entry."""
    return client.get(f"{url}/log/{entry_id}").status_code == 200


def converged(vectors: Sequence[dict[str, int]], target: dict[str, int] | None = None) -> bool:
    """Whether every vector holds `target` (default: whether all vectors are equal)."""
    if target is None:
        return all(v == vectors[0] for v in vectors)
    return all(all(v.get(o, 0) >= s for o, s in target.items()) for v in vectors)


def union(vectors: Sequence[dict[str, int]]) -> dict[str, int]:
    """The componentwise maximum of version vectors."""
    out: dict[str, int] = {}
    for v in vectors:
        for owner, seq in v.items():
            out[owner] = max(out.get(owner, 0), seq)
    return out


@contextlib.contextmanager
def fault_cluster(
    root: Path, firewall: Firewall | None, proxy: Proxy | None = None
) -> Iterator[FaultCluster]:
    """A FaultCluster whose nodes are stopped at the end, whatever happened."""
    cluster = FaultCluster(root, firewall, proxy)
    try:
        yield cluster
    finally:
        problems = cluster.close()
        assert not problems, problems


def hold_for(seconds: float, tick: Callable[[], None] | None = None, every: float = 0.1) -> None:
    """Let a fault last `seconds` (a nemesis schedule's hold, not a wait for a condition): return
    when that much monotonic time has passed, calling `tick` about every `every` seconds meanwhile."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if tick is not None:
            tick()
        time.sleep(min(every, max(left, 0.0)))
