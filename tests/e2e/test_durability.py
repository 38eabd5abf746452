"""Crash and restart of real node processes: `kill -9` during concurrent appends loses no acknowledged
entry and leaves a gap-free chain and the same identity (with and without --fsync); Envoy never
outlives its node; SIGTERM / SIGINT stop a node cleanly; a restart keeps everything."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import httpx
import pytest
from google.protobuf.struct_pb2 import Struct, Value

from potboiler.server import gateway
from potboiler.server.processes import NodeProcess
from potboiler.v1 import (
    entry_pb2,
    log_pb2,
    log_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
)
from tests.conftest import wait_for, wait_for_sync
from tests.node_processes import NodeProcesses, processes_of

pytestmark = pytest.mark.e2e

RestClient = Callable[[NodeProcess], httpx.Client]
#: Acknowledged appends to wait for before the kill.
ACKED_BEFORE_KILL = 400


def data(client: int, n: int) -> Value:
    s = Struct()
    s.update({"client": client, "n": n})
    return Value(struct_value=s)


@dataclass
class Appenders:
    """Concurrent clients appending over gRPC (unary and batches) until their node goes away."""

    target: str
    acked: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (client, n)
    errors: list[grpc.StatusCode] = field(default_factory=list)

    async def run(self, client: int, batch: int) -> None:
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = log_pb2_grpc.LogServiceStub(channel)
            n = 0
            while True:
                try:
                    if batch == 1:
                        acks = [
                            await stub.AppendEntry(
                                log_pb2.AppendEntryRequest(data=data(client, n)), timeout=30
                            )
                        ]
                    else:
                        request = log_pb2.AppendEntriesRequest(
                            entries=[
                                log_pb2.AppendEntryRequest(data=data(client, n + k)) for k in range(batch)
                            ]
                        )
                        acks = list((await stub.AppendEntries(request, timeout=30)).entries)
                except grpc.aio.AioRpcError as error:
                    self.errors.append(error.code())
                    return
                for k, ack in enumerate(acks):
                    self.acked[ack.id] = (client, n + k)
                n += len(acks)


async def read_all(target: str, count: int) -> list[log_pb2.DeliveredEntry]:
    """The first `count` delivered entries, by subscription from position 0."""
    received: list[log_pb2.DeliveredEntry] = []
    async with grpc.aio.insecure_channel(target) as channel:
        call = log_pb2_grpc.LogServiceStub(channel).SubscribeEntries(log_pb2.SubscribeEntriesRequest())
        try:
            async for response in call:
                received.extend(response.entries)
                if len(received) >= count:
                    break
        finally:
            call.cancel()
    return received


async def status(target: str) -> nodes_pb2.GetStatusResponse:
    async with grpc.aio.insecure_channel(target) as channel:
        return await nodes_pb2_grpc.NodesServiceStub(channel).GetStatus(nodes_pb2.GetStatusRequest())


def assert_gap_free_chain(entries: list[entry_pb2.Entry], owner: str) -> None:
    """seq 1..n, each entry's prev the one before, all owned by `owner`."""
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert all(e.owner == owner for e in entries)
    assert entries[0].prev == ""
    for before, after in itertools.pairwise(entries):
        assert after.prev == before.id


@pytest.mark.parametrize("fsync", [False, True], ids=["wal", "fsync"])
async def test_kill_9_during_concurrent_appends_loses_nothing_acknowledged(
    node_process: NodeProcesses, fsync: bool
) -> None:
    node = node_process("n", extra_args=["--fsync"] if fsync else [])
    node_id = (await status(node.grpc_target)).node_id
    pids = processes_of(node.data_dir)
    assert node.process is not None and node.process.pid in pids
    assert len(pids) == 2, pids  # the node and its Envoy
    appenders = Appenders(node.grpc_target)
    tasks = [
        asyncio.create_task(appenders.run(i, batch)) for i, batch in enumerate([1, 1, 1, 1, 1, 1, 10, 50])
    ]
    try:
        await wait_for(
            lambda: len(appenders.acked) >= ACKED_BEFORE_KILL or any(t.done() for t in tasks),
            message=lambda: f"{len(appenders.acked)} acked",
        )
        node.kill()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        for task in tasks:
            task.cancel()
    assert len(appenders.acked) >= ACKED_BEFORE_KILL
    assert set(appenders.errors) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, appenders.errors

    # Envoy follows its node: nothing of this node is left running.
    await wait_for(lambda: not processes_of(node.data_dir), message=lambda: f"{processes_of(node.data_dir)}")

    await asyncio.to_thread(node_process.start, node)
    after = await status(node.grpc_target)
    assert after.node_id == node_id
    [component] = after.vector
    total = component.seq
    assert component.owner == node_id
    assert total >= len(appenders.acked)
    assert (after.pending, after.delivered_position) == (0, total)

    delivered = await read_all(node.grpc_target, total)
    assert [d.position for d in delivered] == list(range(1, total + 1))
    entries = [d.entry for d in delivered]
    assert_gap_free_chain(entries, node_id)
    by_id = {e.id: e for e in entries}
    missing = [i for i in appenders.acked if i not in by_id]
    assert not missing, f"{len(missing)} acknowledged entries lost"
    for entry_id, (client, n) in appenders.acked.items():
        fields = by_id[entry_id].data.struct_value.fields
        assert (fields["client"].number_value, fields["n"].number_value) == (client, n)
    # Each client's acknowledged entries are in its order in the chain.
    for client in range(8):
        mine = [appenders.acked[e.id][1] for e in entries if appenders.acked.get(e.id, (-1, 0))[0] == client]
        assert mine == sorted(mine)

    # The node goes on where its chain ends.
    async with grpc.aio.insecure_channel(node.grpc_target) as channel:
        ack = await log_pb2_grpc.LogServiceStub(channel).AppendEntry(
            log_pb2.AppendEntryRequest(data=Value(string_value="after the crash"))
        )
    assert ack.seq == total + 1


def stop_with(node: NodeProcess, sig: signal.Signals, *, group: bool = False) -> None:
    """Send `sig` (with `group`, to the node's whole process group, as a terminal's Ctrl-C does); the
    node exits 0, leaves no process behind (its Envoy is stopped with it) and logs no traceback."""
    assert node.process is not None
    if group:
        os.killpg(os.getpgid(node.process.pid), sig)
    else:
        node.signal(sig)
    assert node.process.wait(timeout=30) == 0
    assert processes_of(node.data_dir) == []
    assert "Traceback" not in node.log_file.read_text(errors="replace")


def test_an_envoy_that_dies_is_started_again_and_its_admin_is_private(
    node_process: NodeProcesses, rest_client: RestClient
) -> None:
    node = node_process("n")
    http = rest_client(node)
    assert http.post("/log", json="before").status_code == 201
    assert node.process is not None
    node_pid = node.process.pid
    [envoy_pid] = [p for p in processes_of(node.data_dir) if p != node_pid]
    admin = gateway.admin_dir(node.data_dir / "gateway")
    assert admin.stat().st_mode & 0o777 == 0o700
    assert (admin / "admin.sock").stat().st_mode & 0o777 == 0o600
    os.kill(envoy_pid, signal.SIGKILL)
    wait_for_sync(
        lambda: [p for p in processes_of(node.data_dir) if p not in (node_pid, envoy_pid)],
        message="a new envoy",
    )
    wait_for_sync(lambda: _serves(http), message="REST served again")
    assert "envoy exited with -9" in node.log_file.read_text(errors="replace")
    stop_with(node, signal.SIGTERM)
    assert not admin.exists()


def _serves(http: httpx.Client) -> bool:
    try:
        return http.post("/log", json="after").status_code == 201
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_a_rest_call_in_flight_as_the_node_stops_is_answered(node_process: NodeProcesses, how: str) -> None:
    """A stopping node lets the calls in flight finish for a moment, those through Envoy too: Envoy
    stops after the node's server (it used to stop first, cutting them unanswered), also when a
    terminal's Ctrl-C signals the node's whole process group (Envoy used to be in it, and quit at
    once)."""
    node = node_process("n")
    socket = gateway.admin_dir(node.data_dir / "gateway") / "admin.sock"
    admin = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), base_url="http://envoy")
    pigtail = httpx.Client(base_url=f"http://127.0.0.1:{node.ports.pigtail}", timeout=30)
    with admin, pigtail, ThreadPoolExecutor(1) as pool:
        assert pigtail.post("/create", json={"name": "q", "timeout_ms": 60_000}).status_code == 201

        def calls_at_the_node() -> int:
            stats = admin.get("/stats", params={"filter": r"^cluster\.node_rest\.upstream_rq_active$"}).text
            return int(stats.split(":")[1])

        claim = pool.submit(pigtail.post, "/queue/q/claim", json={"worker_id": "w", "wait_ms": 700})
        wait_for_sync(lambda: calls_at_the_node() == 1, message="the claim waiting at the node")
        if how == "SIGTERM":
            stop_with(node, signal.SIGTERM)
        else:
            stop_with(node, signal.SIGINT, group=True)
        assert claim.result().status_code == 204  # no task came


def test_sigint_stops_cleanly(node_process: NodeProcesses, rest_client: RestClient) -> None:
    node = node_process("n")
    assert rest_client(node).post("/log", json="x").status_code == 201
    stop_with(node, signal.SIGINT)


def test_sigterm_stops_cleanly_and_restart_keeps_everything(
    node_process: NodeProcesses, rest_client: RestClient
) -> None:
    node = node_process("n")
    # Envoy starts without warnings (it used to say it had no limit on client connections).
    assert not [line for line in node.log_file.read_text().splitlines() if "][warning][" in line]
    http = rest_client(node)
    ids = [http.post("/log", json={"i": i}).json()["id"] for i in range(20)]
    node_id = http.get("/status").json()["node_id"]
    assert http.post("/nodes", json={"url": "http://127.0.0.1:9"}).status_code == 204
    assert http.post("/log/register", json={"url": "http://127.0.0.1:9/hook"}).status_code == 204
    heads = http.get("/log").json()
    entries = {i: http.get(f"/log/{i}").json() for i in ids}

    stop_with(node, signal.SIGTERM)

    node_process.start(node)
    http = rest_client(node)
    assert http.get("/status").json()["node_id"] == node_id
    assert http.get("/log").json() == heads
    assert {i: http.get(f"/log/{i}").json() for i in ids} == entries
    assert http.get("/nodes").json() == ["http://127.0.0.1:9"]
    new = http.get(f"/log/{http.post('/log', json='after').json()['id']}").json()
    assert (new["seq"], new["prev"]) == (21, ids[-1])

    async def webhook_urls() -> list[str]:
        async with grpc.aio.insecure_channel(node.grpc_target) as channel:
            response = await webhooks_pb2_grpc.WebhooksServiceStub(channel).ListWebhooks(
                webhooks_pb2.ListWebhooksRequest()
            )
        return [w.url for w in response.webhooks]

    assert asyncio.run(webhook_urls()) == ["http://127.0.0.1:9/hook"]
