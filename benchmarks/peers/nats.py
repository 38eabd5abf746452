"""NATS JetStream (nats-server 2.9) on loopback: one server or a cluster of three, data in a temporary
directory; a file-storage stream replicated to every server (R1 or R3) and the monitoring endpoint
that tells what one server holds.

JetStream runs as shipped: file storage, the server's default sync (it fsyncs its files on a timer,
every 2 minutes by default, not before each acknowledgement); an acknowledged publish in a cluster is
stored by a quorum of the stream's replicas.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path
from typing import Any

import uvloop

from benchmarks.peers.process import ServerProcess, free_ports, port_open, settle, tree_rss_mb

#: The benchmark stream and its subjects.
STREAM = "BENCH"
SUBJECTS = ["bench.>"]

#: What is said about the JetStream configuration in the results.
CONFIG = {
    "version": "2.9 (Debian nats-server)",
    "storage": "file",
    "durability": "as shipped: acknowledged once stored (by a quorum in a cluster); files fsynced every 2 min",
    "replicas": "1 on one server, 3 on three",
}


class NatsCluster:
    """`size` nats-servers with JetStream (clustered when size > 1) on free loopback ports."""

    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        self.size = size
        ports = free_ports(3 * size)
        self.client_ports = ports[:size]
        self.monitor_ports = ports[size : 2 * size]
        route_ports = ports[2 * size :]
        self.servers = []
        for i in range(size):
            config = [
                f"server_name: s{i}",
                f"listen: 127.0.0.1:{self.client_ports[i]}",
                f"http: 127.0.0.1:{self.monitor_ports[i]}",
                f'jetstream {{ store_dir: "{root / f"s{i}"}" }}',
            ]
            if size > 1:
                routes = ", ".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(route_ports) if j != i)
                config.append(
                    f"cluster {{ name: bench, listen: 127.0.0.1:{route_ports[i]}, routes: [{routes}] }}"
                )
            path = root / f"s{i}.conf"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(config) + "\n")
            self.servers.append(
                ServerProcess(f"nats-server s{i}", ["nats-server", "-c", str(path)], root / f"s{i}.log")
            )

    def __repr__(self) -> str:
        return f"NatsCluster({self.size})"

    @property
    def urls(self) -> list[str]:
        """Each server's client URL."""
        return [f"nats://127.0.0.1:{p}" for p in self.client_ports]

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.servers if s.alive()]

    def rss_mb(self) -> float:
        return tree_rss_mb(self.pids)

    def start(self) -> NatsCluster:
        """Start every server; returns once each one's JetStream answers on its monitoring port and
        the benchmark stream (R1 on one server, R3 on three) takes publishes."""
        for server in self.servers:
            server.start()
        for i in range(self.size):
            self.wait_server(i)
        uvloop.run(create_stream(self.urls[0], self.size))
        return self

    def wait_server(self, index: int, timeout: float = 60.0) -> None:
        """Until server `index` accepts clients and reports JetStream on its monitoring port."""
        server = self.servers[index]
        server.wait_for(lambda: port_open(self.client_ports[index]), timeout, "accepting clients")
        server.wait_for(lambda: self.jsz(index).get("config") is not None, timeout, "serving JetStream")

    def jsz(self, index: int) -> Any:
        """Server `index`'s own view of JetStream (`/jsz` with streams), from its monitoring port."""
        url = f"http://127.0.0.1:{self.monitor_ports[index]}/jsz?streams=true"
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return json.load(response)

    def stream_messages(self, index: int, stream: str = STREAM) -> int:
        """How many messages of `stream` server `index` holds itself (its local replica)."""
        for account in self.jsz(index).get("account_details", []):
            for detail in account.get("stream_detail", []):
                if detail.get("name") == stream:
                    return int(detail.get("state", {}).get("messages", 0))
        return 0

    def settle(self) -> None:
        """Until every running server holds as many messages of the stream as the others."""
        running = [i for i, server in enumerate(self.servers) if server.alive()]
        if len(running) > 1:
            settle(lambda: len({self.stream_messages(i) for i in running}) == 1)

    def stop_server(self, index: int) -> None:
        self.servers[index].stop()

    def start_server(self, index: int) -> None:
        """Start a stopped server again (with its data)."""
        self.servers[index].start()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


async def create_stream(url: str, replicas: int) -> None:
    """Create the benchmark stream (file storage, `replicas` replicas) through the server at `url`;
    waits until it takes a publish (a new R3 stream first elects its leader)."""
    import nats
    from nats.js.api import StorageType, StreamConfig

    nc = await nats.connect(url, connect_timeout=5)
    try:
        js = nc.jetstream(timeout=5)
        config = StreamConfig(name=STREAM, subjects=SUBJECTS, storage=StorageType.FILE, num_replicas=replicas)
        deadline = asyncio.get_running_loop().time() + 90
        while True:  # a new cluster first elects its meta leader, then a new stream its leader
            try:
                await js.add_stream(config)
                await js.publish("bench.ready", b"{}", timeout=5)
                return
            except (nats.errors.Error, nats.js.errors.Error):
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.5)
    finally:
        await nc.close()
