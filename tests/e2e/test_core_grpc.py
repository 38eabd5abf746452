"""Plain gRPC to a real node: through Envoy on the REST port B (grpcurl and a Python aio client, with
reflection), and direct to the node's own gRPC port B+10."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import pytest
from google.api.httpbody_pb2 import HttpBody
from google.protobuf.struct_pb2 import Value
from grpc_health.v1 import health_pb2

from potboiler.server.processes import NodeProcess
from potboiler.v1 import core_rest_pb2, core_rest_pb2_grpc, log_pb2, log_pb2_grpc, nodes_pb2, nodes_pb2_grpc
from tests.conftest import wait_for
from tests.node_processes import NodeProcesses

pytestmark = pytest.mark.e2e

GRPCURL = Path(sys.executable).parent / "grpcurl"
SERVICES = {
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "potboiler.v1.CoreRestService",
    "potboiler.v1.LogService",
    "potboiler.v1.NodesService",
    "potboiler.v1.WebhooksService",
}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with NodeProcesses(tmp_path_factory.mktemp("grpc")) as factory:
        yield factory("node")


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GRPCURL), "-max-time", "30", *args], capture_output=True, text=True, timeout=60, check=False
    )


def core_target(node: NodeProcess) -> str:
    return f"{node.host}:{node.ports.core}"


# -- grpcurl through Envoy -----------------------------------------------------------------------


def test_grpcurl_list(node: NodeProcess) -> None:
    result = grpcurl("-plaintext", core_target(node), "list")
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.split()) >= SERVICES


def test_grpcurl_describe(node: NodeProcess) -> None:
    result = grpcurl("-plaintext", core_target(node), "describe", "potboiler.v1.LogService")
    assert result.returncode == 0, result.stderr
    for method in (
        "AppendEntry",
        "AppendEntries",
        "AppendEntryStream",
        "GetEntry",
        "ListHeads",
        "SubscribeEntries",
    ):
        assert f"rpc {method} " in result.stdout
    result = grpcurl("-plaintext", core_target(node), "describe", "potboiler.v1.Entry")
    assert result.returncode == 0, result.stderr
    for field in ("id", "owner", "seq", "prev", "next", "when", "data", "dependencies"):
        assert f" {field} = " in result.stdout


def test_grpcurl_append_and_get(node: NodeProcess) -> None:
    data = {"via": "grpcurl", "n": [1, 2, 3]}
    result = grpcurl(
        "-plaintext",
        "-d",
        json.dumps({"data": data}),
        core_target(node),
        "potboiler.v1.LogService/AppendEntry",
    )
    assert result.returncode == 0, result.stderr
    ack = json.loads(result.stdout)
    assert str(uuid.UUID(ack["id"])) == ack["id"]
    assert int(ack["seq"]) >= 1
    result = grpcurl(
        "-plaintext",
        "-d",
        json.dumps({"id": ack["id"]}),
        core_target(node),
        "potboiler.v1.LogService/GetEntry",
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["entry"]["data"] == data


def test_grpcurl_errors(node: NodeProcess) -> None:
    result = grpcurl("-plaintext", "-d", "{}", core_target(node), "potboiler.v1.LogService/AppendEntry")
    assert result.returncode != 0
    assert "InvalidArgument" in result.stdout + result.stderr
    result = grpcurl(
        "-plaintext",
        "-d",
        json.dumps({"id": str(uuid.uuid4())}),
        core_target(node),
        "potboiler.v1.LogService/GetEntry",
    )
    assert result.returncode != 0
    assert "NotFound" in result.stdout + result.stderr


def test_grpcurl_health(node: NodeProcess) -> None:
    result = grpcurl("-plaintext", core_target(node), "grpc.health.v1.Health/Check")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["status"] == "SERVING"


# -- a Python aio client, through Envoy (B) and direct (B+10) --------------------------------------


@pytest.fixture(params=["envoy", "direct"])
async def channel(node: NodeProcess, request: pytest.FixtureRequest) -> AsyncIterator[grpc.aio.Channel]:
    target = core_target(node) if request.param == "envoy" else node.grpc_target
    async with grpc.aio.insecure_channel(target) as channel:
        yield channel


def value(text: str) -> Value:
    return Value(string_value=text)


async def test_unary_calls(channel: grpc.aio.Channel) -> None:
    log = log_pb2_grpc.LogServiceStub(channel)
    ack = await log.AppendEntry(log_pb2.AppendEntryRequest(data=value("unary")))
    entry = (await log.GetEntry(log_pb2.GetEntryRequest(id=ack.id))).entry
    assert (entry.id, entry.seq, entry.data.string_value) == (ack.id, ack.seq, "unary")
    heads = (await log.ListHeads(log_pb2.ListHeadsRequest())).heads
    assert [h.owner for h in heads] == [entry.owner]
    batch = await log.AppendEntries(
        log_pb2.AppendEntriesRequest(
            entries=[log_pb2.AppendEntryRequest(data=value(str(i))) for i in range(3)]
        )
    )
    assert [e.seq for e in batch.entries] == [ack.seq + 1, ack.seq + 2, ack.seq + 3]
    status = await nodes_pb2_grpc.NodesServiceStub(channel).GetStatus(nodes_pb2.GetStatusRequest())
    assert status.node_id == entry.owner


async def test_error_codes(channel: grpc.aio.Channel) -> None:
    log = log_pb2_grpc.LogServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await log.GetEntry(log_pb2.GetEntryRequest(id=str(uuid.uuid4())))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await log.AppendEntry(log_pb2.AppendEntryRequest(data=value("x"), dependencies=["nope"]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in (info.value.details() or "")


async def test_rest_shaped_rpc_over_grpc(channel: grpc.aio.Channel) -> None:
    # The metadata that becomes 201 + Location over REST is harmless to a gRPC client.
    rest = core_rest_pb2_grpc.CoreRestServiceStub(channel)
    call = rest.PostLogEntry(core_rest_pb2.PostLogEntryRequest(body=HttpBody(data=b'"rest-shaped"')))
    response = await call
    assert await call.code() == grpc.StatusCode.OK
    assert dict(list(await call.trailing_metadata() or ())).get("location") == f"/log/{response.id}"
    entry = await rest.GetLogEntry(core_rest_pb2.GetLogEntryRequest(id=response.id))
    assert orjson.loads(entry.data)["data"] == "rest-shaped"


async def test_streams(channel: grpc.aio.Channel) -> None:
    log = log_pb2_grpc.LogServiceStub(channel)
    status = await nodes_pb2_grpc.NodesServiceStub(channel).GetStatus(nodes_pb2.GetStatusRequest())
    start = status.delivered_position
    subscription = log.SubscribeEntries(log_pb2.SubscribeEntriesRequest(after_position=start))
    received: list[log_pb2.DeliveredEntry] = []

    async def read() -> None:
        async for response in subscription:
            received.extend(response.entries)

    reader = asyncio.create_task(read())
    try:

        async def requests() -> AsyncIterator[log_pb2.AppendEntryStreamRequest]:
            for m in range(50):
                yield log_pb2.AppendEntryStreamRequest(
                    entries=[log_pb2.AppendEntryRequest(data=value(f"{m}.{k}")) for k in range(2)]
                )

        acks = [a async for a in log.AppendEntryStream(requests())]
        ids = [e.id for a in acks for e in a.entries]
        assert len(ids) == 100
        seqs = [e.seq for a in acks for e in a.entries]
        assert seqs == list(range(seqs[0], seqs[0] + 100))
        # The node is this module's alone and its tests run one at a time: the subscription sees
        # exactly the streamed entries, in order, each once, at the next positions.
        await wait_for(lambda: len(received) >= len(ids) or reader.done())
        assert [d.entry.id for d in received] == ids
        assert [d.position for d in received] == list(range(start + 1, start + 101))
    finally:
        subscription.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader


async def test_health(channel: grpc.aio.Channel) -> None:
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    response = await check(health_pb2.HealthCheckRequest(service="potboiler.v1.LogService"))
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_envoy_and_direct_see_the_same_log(node: NodeProcess) -> None:
    async with (
        grpc.aio.insecure_channel(core_target(node)) as via_envoy,
        grpc.aio.insecure_channel(node.grpc_target) as direct,
    ):
        ack = await log_pb2_grpc.LogServiceStub(via_envoy).AppendEntry(
            log_pb2.AppendEntryRequest(data=value("through envoy")),
            metadata=(("x-trace-bin", b"\x00\xff"),),  # binary metadata goes through to gRPC calls
        )
        entry = (await log_pb2_grpc.LogServiceStub(direct).GetEntry(log_pb2.GetEntryRequest(id=ack.id))).entry
        assert entry.data.string_value == "through envoy"


async def test_more_than_a_thousand_open_subscriptions_through_envoy(node: NodeProcess) -> None:
    """Envoy's defaults let an HTTP/2 client open 1,024 streams at a time (a gRPC client queues the
    rest, unseen) and let 1,024 requests at a time reach the node (past them every REST call gets
    503): neither holds a node's subscriptions, lease streams or REST calls."""
    streams = 1030
    async with grpc.aio.insecure_channel(core_target(node)) as channel:
        log = log_pb2_grpc.LogServiceStub(channel)
        await log.AppendEntry(log_pb2.AppendEntryRequest(data=value("for every stream to read")))
        calls = [
            log.SubscribeEntries(log_pb2.SubscribeEntriesRequest(after_position=0)) for _ in range(streams)
        ]
        opened = 0

        async def first(call: Any) -> None:
            nonlocal opened
            await call.read()
            opened += 1

        readers = [asyncio.create_task(first(call)) for call in calls]
        try:
            await wait_for(lambda: opened == streams, timeout=60, message=lambda: f"{opened} streams open")
            ack = await asyncio.wait_for(
                log.AppendEntry(log_pb2.AppendEntryRequest(data=value("one more"))), 30
            )
            async with httpx.AsyncClient(base_url=f"http://{core_target(node)}") as rest:
                response = await rest.get(f"/log/{ack.id}")
            assert response.status_code == 200, response.text
        finally:
            for call in calls:
                call.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


async def test_subscribers_that_stop_reading_hold_up_no_other_call_through_envoy(tmp_path: Path) -> None:
    """Every call through Envoy shares its one HTTP/2 connection to the node, and a subscription whose
    client stops reading keeps its unread data's share of that connection's window: with a window of
    4 MiB, four of them (1 MiB each) held up every REST and gRPC call through Envoy for as long as
    they stayed open."""
    with NodeProcesses(tmp_path) as factory:
        node = factory("stalled")
        async with grpc.aio.insecure_channel(node.grpc_target) as direct:
            big = [log_pb2.AppendEntryRequest(data=value("x" * 100_000)) for _ in range(20)]
            # 50 MB for each subscriber, in messages of up to 3 MiB: more than its client, the
            # sockets and Envoy take in unread.
            for _ in range(25):
                await log_pb2_grpc.LogServiceStub(direct).AppendEntries(
                    log_pb2.AppendEntriesRequest(entries=big)
                )
        channels = [
            # Each its own connection, whose client takes in no more than its first window unread.
            grpc.aio.insecure_channel(
                core_target(node),
                options=[("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)],
            )
            for _ in range(8)
        ]
        try:
            calls = [
                log_pb2_grpc.LogServiceStub(channel).SubscribeEntries(
                    log_pb2.SubscribeEntriesRequest(after_position=0)
                )
                for channel in channels
            ]
            for call in calls:
                await call.read()  # flowing: then never read again
            async with httpx.AsyncClient(base_url=f"http://{core_target(node)}", timeout=10) as rest:
                for _ in range(20):
                    assert (await rest.get("/status")).status_code == 200
        finally:
            for channel in channels:
                await channel.close()


@pytest.mark.parametrize("spoofed", [False, True], ids=["plain", "posing as transcoded REST"])
@pytest.mark.parametrize("port", ["kv", "browser", "pigtail"])
async def test_grpc_is_not_served_on_the_other_rest_ports(
    node: NodeProcess, port: str, spoofed: bool
) -> None:
    """Also for a call that sends the header by which Envoy's routes know a transcoded REST request."""
    metadata = [("x-envoy-original-path", "/log")] if spoofed else []
    async with grpc.aio.insecure_channel(f"{node.host}:{getattr(node.ports, port)}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await log_pb2_grpc.LogServiceStub(channel).AppendEntry(
                log_pb2.AppendEntryRequest(data=value("not here")), metadata=metadata
            )
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "B+10" in (info.value.details() or "")


async def test_a_grpc_clients_deadline_holds_through_envoy(node: NodeProcess) -> None:
    async with grpc.aio.insecure_channel(core_target(node)) as channel:
        status = await nodes_pb2_grpc.NodesServiceStub(channel).GetStatus(nodes_pb2.GetStatusRequest())
        subscription = log_pb2_grpc.LogServiceStub(channel).SubscribeEntries(
            log_pb2.SubscribeEntriesRequest(after_position=status.delivered_position), timeout=0.5
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await subscription.read()  # nothing new comes: the deadline ends the call
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
