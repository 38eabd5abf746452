"""A node whose own log is held up by an entry waiting for a dependency (a client appended one that
depends on an entry not here, or on none that exists): its later entries wait behind it, so KV and
Pigtail refuse writes there (UNAVAILABLE, naming what it waits for, appending nothing) rather than
acknowledge writes nobody could see; status names the entry; once the dependency arrives, writes go
ahead. In-process nodes, gRPC only."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf.struct_pb2 import Value

from potboiler.kv.service import create as create_kv
from potboiler.pigtail.service import create as create_pigtail
from potboiler.server import logclient
from potboiler.server.jsonvalue import to_value
from potboiler.v1 import kv_pb2, kv_pb2_grpc, log_pb2, nodes_pb2, pigtail_pb2_grpc
from potboiler.v1 import pigtail_pb2 as pb
from tests.conftest import GrpcNode, GrpcNodeFactory


async def append(node: GrpcNode, text: str, dependencies: tuple[str, ...] = ()) -> str:
    request = log_pb2.AppendEntryRequest(data=Value(string_value=text), dependencies=dependencies)
    return (await node.log.AppendEntry(request)).id


async def own_seq(node: GrpcNode) -> int:
    return (await node.heads())[node.node_id].seq


async def test_service_writes_are_refused_while_the_own_log_is_blocked_and_resume_after(
    grpc_node_factory: GrpcNodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logclient, "BLOCKED_WAIT", 0.2)
    other = await grpc_node_factory("other")
    node = await grpc_node_factory("node", services=[("kv", create_kv), ("pigtail", create_pigtail)])
    kv = kv_pb2_grpc.KvServiceStub(node.channel)
    pigtail = pigtail_pb2_grpc.PigtailServiceStub(node.channel)

    def set_value(n: int) -> kv_pb2.UpdateValueRequest:
        return kv_pb2.UpdateValueRequest(table="t", key="k", op="set", change=to_value(n))

    await kv.CreateTable(kv_pb2.CreateTableRequest(name="t", crdt=kv_pb2.CRDT_TYPE_LWW))
    await pigtail.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=1000))
    missing = await append(other, "on another node, not replicated here")
    waiting = await append(node, "depends on it", (missing,))
    await append(node, "behind it")
    status = await node.nodes.GetStatus(nodes_pb2.GetStatusRequest())
    assert (status.blocked.id, status.blocked.seq, list(status.blocked.waits_for)) == (
        waiting,
        await own_seq(node) - 1,
        [missing],
    )
    seq = await own_seq(node)

    for call in (
        kv.UpdateValue(set_value(1)),
        pigtail.AddTask(pb.AddTaskRequest(queue="q", task_name="job")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"its entry {waiting} (seq {seq - 1}) depends on {missing}" in (refused.value.details() or "")
    assert await own_seq(node) == seq  # nothing appended
    with pytest.raises(grpc.aio.AioRpcError) as absent:  # and nothing half-written to read back
        await kv.GetValue(kv_pb2.GetValueRequest(table="t", key="k"))
    assert absent.value.code() == grpc.StatusCode.NOT_FOUND

    # A write waiting for the log goes ahead once the dependency arrives (from a peer, say).
    monkeypatch.setattr(logclient, "BLOCKED_WAIT", 30.0)
    appender = node.node.appender
    write_waits = asyncio.Event()
    wait_unblocked = appender.wait_own_log_unblocked

    async def noted_wait(timeout: float) -> None:
        write_waits.set()
        await wait_unblocked(timeout)

    monkeypatch.setattr(appender, "wait_own_log_unblocked", noted_wait)
    write = asyncio.ensure_future(kv.UpdateValue(set_value(2)))
    arriving = (await other.log.GetEntry(log_pb2.GetEntryRequest(id=missing))).entry
    await asyncio.wait_for(write_waits.wait(), 10)  # the write has reached the node, and waits there
    assert not write.done()
    await node.node.appender.ingest([arriving])
    assert not (await write).pending
    got = await kv.GetValue(kv_pb2.GetValueRequest(table="t", key="k"))
    assert got.value.number_value == 2
    status = await node.nodes.GetStatus(nodes_pb2.GetStatusRequest())
    assert not status.HasField("blocked") and status.pending == 0
