"""etcd 3.4 on loopback: one member or a cluster of three, with data in a temporary directory, and an
asyncio gRPC client for the calls the benchmarks make.

etcd runs as shipped (the Debian package's defaults: every write is fsynced by its raft log before it
is acknowledged, snapshot every 100,000 entries). Its grpc-gateway serves REST on the client port, as
Envoy does for Potboiler: `POST /v3/kv/put` with base64 key and value.

The Python client is grpc.aio with the API subset of `etcd_proto` — the same client library as the
Potboiler gRPC figures, so the client's own cost is alike on both sides (the gateway through httpx
would make the client, not the server, the bottleneck: httpx costs ~2.5 ms of CPU a request here).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import uvloop

from benchmarks.peers import etcd_proto
from benchmarks.peers.process import ServerProcess, free_ports, settle, tree_rss_mb

#: What is said about etcd's configuration in the results.
CONFIG = {
    "version": "3.4 (Debian etcd-server)",
    "durability": "as shipped: raft log fsynced before each acknowledgement (batched by etcd)",
    "flags": "defaults; --logger zap --log-level warn",
}


class EtcdClient:
    """A grpc.aio client of one etcd member."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.pb: Any = etcd_proto.messages()
        self.channel = grpc.aio.insecure_channel(target)
        self._put = self.channel.unary_unary(
            etcd_proto.PUT,
            request_serializer=self.pb.PutRequest.SerializeToString,
            response_deserializer=self.pb.PutResponse.FromString,
        )
        self._txn = self.channel.unary_unary(
            etcd_proto.TXN,
            request_serializer=self.pb.TxnRequest.SerializeToString,
            response_deserializer=self.pb.TxnResponse.FromString,
        )
        self._status = self.channel.unary_unary(
            etcd_proto.STATUS,
            request_serializer=self.pb.StatusRequest.SerializeToString,
            response_deserializer=self.pb.StatusResponse.FromString,
        )
        self._watch = self.channel.stream_stream(
            etcd_proto.WATCH,
            request_serializer=self.pb.WatchRequest.SerializeToString,
            response_deserializer=self.pb.WatchResponse.FromString,
        )

    async def close(self) -> None:
        await self.channel.close()

    async def put(self, key: bytes, value: bytes, timeout: float = 10.0) -> int:
        """Put one key; returns the revision it made."""
        response = await self._put(self.pb.PutRequest(key=key, value=value), timeout=timeout)
        return int(response.header.revision)

    async def put_many(self, items: Sequence[tuple[bytes, bytes]], timeout: float = 30.0) -> int:
        """Put several keys in one transaction (one raft entry, one revision); returns the revision."""
        ops = [self.pb.RequestOp(request_put=self.pb.PutRequest(key=k, value=v)) for k, v in items]
        response = await self._txn(self.pb.TxnRequest(success=ops), timeout=timeout)
        return int(response.header.revision)

    async def revision(self, timeout: float = 5.0) -> int:
        """This member's current revision (what it has applied), from Maintenance.Status."""
        response = await self._status(self.pb.StatusRequest(), timeout=timeout)
        return int(response.header.revision)

    async def watch_prefix(self, prefix: bytes) -> AsyncIterator[tuple[bytes, bytes]]:
        """(key, value) of every put under `prefix` from now on, as this member applies them."""
        range_end = prefix[:-1] + bytes([prefix[-1] + 1])
        request = self.pb.WatchRequest(
            create_request=self.pb.WatchCreateRequest(key=prefix, range_end=range_end)
        )

        async def requests() -> AsyncIterator[Any]:
            yield request
            await asyncio.Event().wait()  # keep the request side open

        call = self._watch(requests())
        try:
            async for response in call:
                for event in response.events:
                    yield event.kv.key, event.kv.value
        finally:
            call.cancel()


class EtcdCluster:
    """`size` etcd members on free loopback ports, data under `root`; `stop()` stops them all."""

    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        self.size = size
        ports = free_ports(2 * size)
        self.client_ports = ports[:size]
        peer_ports = ports[size:]
        initial = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, p in enumerate(peer_ports))
        self.members = [
            ServerProcess(
                f"etcd m{i}",
                [
                    "etcd",
                    "--name", f"m{i}",
                    "--data-dir", str(root / f"m{i}"),
                    "--listen-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
                    "--advertise-client-urls", f"http://127.0.0.1:{self.client_ports[i]}",
                    "--listen-peer-urls", f"http://127.0.0.1:{peer_ports[i]}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_ports[i]}",
                    "--initial-cluster", initial,
                    "--initial-cluster-token", root.name,
                    "--initial-cluster-state", "new",
                    "--logger", "zap",
                    "--log-level", "warn",
                ],
                root / f"m{i}.log",
            )
            for i, _ in enumerate(peer_ports)
        ]  # fmt: skip

    def __repr__(self) -> str:
        return f"EtcdCluster({self.size})"

    @property
    def urls(self) -> list[str]:
        """Each member's client URL (gRPC and the REST gateway share it)."""
        return [f"http://127.0.0.1:{p}" for p in self.client_ports]

    @property
    def targets(self) -> list[str]:
        """Each member's gRPC target (host:port)."""
        return [f"127.0.0.1:{p}" for p in self.client_ports]

    @property
    def pids(self) -> list[int]:
        return [m.pid for m in self.members if m.alive()]

    def rss_mb(self) -> float:
        """Resident memory of every running member."""
        return tree_rss_mb(self.pids)

    def start(self) -> EtcdCluster:
        """Start every member; returns once each answers with a revision (the cluster has a leader)."""
        for member in self.members:
            member.start()
        for i in range(self.size):
            self.wait_member(i)
        return self

    def wait_member(self, index: int, timeout: float = 60.0) -> None:
        """Until member `index` answers Maintenance.Status."""
        self.members[index].wait_for(lambda: uvloop.run(_revision(self.targets[index])) > 0, timeout)

    def settle(self) -> None:
        """Until every running member reports the same revision (has applied every write)."""
        running = [t for t, m in zip(self.targets, self.members, strict=True) if m.alive()]
        if len(running) > 1:
            settle(lambda: len({uvloop.run(_revision(t)) for t in running}) == 1)

    def stop_member(self, index: int) -> None:
        self.members[index].stop()

    def start_member(self, index: int) -> None:
        """Start a stopped member again (it rejoins with its data directory)."""
        self.members[index].start()

    def stop(self) -> None:
        for member in self.members:
            member.stop()


async def _revision(target: str) -> int:
    client = EtcdClient(target)
    try:
        return await client.revision(timeout=1.0)
    finally:
        await client.close()
