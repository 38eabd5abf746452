"""Resource limits, documented and enforced, at their boundaries: entry size (1 MiB of data; over REST
the 2 MiB body limit), entries per batch (10,000), dependencies per entry (1,000), nesting depth,
webhooks per node (100), gRPC message size (64 MiB, also on replication streams), KV values and
Pigtail task info; and a slow webhook receiver never grows the node's memory without bound."""

from __future__ import annotations

import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.struct_pb2 import Value

from potboiler.server.entries import MAX_BATCH_ENTRIES, MAX_DEPENDENCIES, MAX_ENTRY_BYTES
from potboiler.server.gateway import MAX_BODY_BYTES
from potboiler.server.node import MAX_MESSAGE_BYTES
from potboiler.server.processes import NodeProcess
from potboiler.server.webhooks import MAX_WEBHOOKS
from potboiler.v1 import (
    log_pb2,
    log_pb2_grpc,
    replication_pb2,
    replication_pb2_grpc,
    webhooks_pb2,
    webhooks_pb2_grpc,
)
from potboiler.v1.entry_pb2 import Entry
from tests.badinput.conftest import (
    GRPC_OPTIONS,
    HAS_KV,
    HAS_PIGTAIL,
    QUEUE,
    BadInputNode,
    client_error,
)
from tests.conftest import refusing_port, wait_for_sync
from tests.node_processes import NodeProcesses
from tests.webhook_receiver import Answer, Receiver

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
#: How long the slow webhook receiver takes to answer each delivery (its behaviour, not a wait).
SLOW_ANSWER_S = 1.0


def data_of_size(size: int) -> Value:
    """A JSON string value whose serialized size is exactly `size` bytes."""
    value = Value(string_value="x" * size)
    while value.ByteSize() > size:
        value.string_value = value.string_value[: size - (value.ByteSize() - size)]
    assert value.ByteSize() == size
    return value


def exhausted(call: Callable[[], Any]) -> str:
    """Run a call that must fail with RESOURCE_EXHAUSTED; returns its message."""
    with pytest.raises(grpc.RpcError) as raised:
        call()
    error: Any = raised.value
    assert error.code() == EXHAUSTED, f"{error.code()}: {error.details()}"
    details: str = error.details()
    assert details
    return details


def test_entry_size(node: BadInputNode) -> None:
    appended = node.log.AppendEntry(
        log_pb2.AppendEntryRequest(data=data_of_size(MAX_ENTRY_BYTES)), timeout=30
    )
    assert appended.id
    with node.unchanged():
        message = exhausted(
            lambda: node.log.AppendEntry(
                log_pb2.AppendEntryRequest(data=data_of_size(MAX_ENTRY_BYTES + 1)), timeout=30
            )
        )
        assert str(MAX_ENTRY_BYTES) in message
        # REST: a body over the gateway's limit, and a body under it whose data is over the entry limit.
        client_error(node.core.post("/log", content=b'"' + b"x" * MAX_BODY_BYTES + b'"'), 413)
        client_error(
            node.core.post("/log", content=b'"' + b"x" * (MAX_ENTRY_BYTES + MAX_ENTRY_BYTES // 2) + b'"'), 413
        )
        # The same limit for what services append on a client's behalf.
        if HAS_KV:
            client_error(
                node.kv.post("/kv/t_lww/k1", json={"op": "set", "change": "x" * (MAX_ENTRY_BYTES + 1)})
            )
        if HAS_PIGTAIL:
            info = "x" * (512 * 1024 + 1)
            client_error(node.pigtail.post(f"/queue/{QUEUE}", json={"task_name": "t", "info": info}))
            # Under 512 KiB of JSON (200 KB), over the log's limit as protobuf: the answer names info.
            many = node.pigtail.post(f"/queue/{QUEUE}", json={"task_name": "t", "info": [0] * 100_000})
            client_error(many, 413)
            assert many.json()["message"].startswith("info does not fit in a log entry: entry data is")


def test_batch_size(node: BadInputNode) -> None:
    one = log_pb2.AppendEntryRequest(data=Value(number_value=1))
    full = log_pb2.AppendEntriesRequest(entries=[one] * MAX_BATCH_ENTRIES)
    assert len(node.log.AppendEntries(full, timeout=60).entries) == MAX_BATCH_ENTRIES
    over = log_pb2.AppendEntriesRequest(entries=[one] * (MAX_BATCH_ENTRIES + 1))
    with node.unchanged():
        assert str(MAX_BATCH_ENTRIES) in exhausted(lambda: node.log.AppendEntries(over, timeout=60))
        stream = node.log.AppendEntryStream(
            iter([log_pb2.AppendEntryStreamRequest(entries=[one] * (MAX_BATCH_ENTRIES + 1))]), timeout=60
        )
        exhausted(lambda: list(stream))


def test_dependencies_per_entry(node: BadInputNode) -> None:
    batch = log_pb2.AppendEntriesRequest(
        entries=[log_pb2.AppendEntryRequest(data=Value(number_value=i)) for i in range(MAX_DEPENDENCIES + 1)]
    )
    ids = [e.id for e in node.log.AppendEntries(batch, timeout=60).entries]
    data = Value(string_value="many dependencies")
    ok = node.log.AppendEntry(
        log_pb2.AppendEntryRequest(data=data, dependencies=ids[:MAX_DEPENDENCIES]), timeout=30
    )
    assert ok.id
    with node.unchanged():
        message = exhausted(
            lambda: node.log.AppendEntry(log_pb2.AppendEntryRequest(data=data, dependencies=ids), timeout=30)
        )
        assert str(MAX_DEPENDENCIES) in message
        # Over REST the same request is refused too (by the URL's length or by the limit).
        client_error(node.core.post("/log", params=[("dependency", i) for i in ids], json="many"))


def test_webhooks_per_node(node: BadInputNode) -> None:
    with refusing_port() as closed:  # deliveries fail fast and back off
        webhooks_up_to_the_limit(node, closed)


def webhooks_up_to_the_limit(node: BadInputNode, closed: int) -> None:
    existing = len(node.webhooks.ListWebhooks(webhooks_pb2.ListWebhooksRequest()).webhooks)
    urls = [f"http://127.0.0.1:{closed}/hook{i}" for i in range(MAX_WEBHOOKS - existing)]
    try:
        for url in urls:
            node.webhooks.RegisterWebhook(webhooks_pb2.RegisterWebhookRequest(url=url), timeout=10)
        with node.unchanged():
            extra = webhooks_pb2.RegisterWebhookRequest(url=f"http://127.0.0.1:{closed}/one-too-many")
            assert str(MAX_WEBHOOKS) in exhausted(lambda: node.webhooks.RegisterWebhook(extra, timeout=10))
            client_error(node.core.post("/log/register", json={"url": extra.url}))
            # Registering one that is there already is still fine.
            assert node.core.post("/log/register", json={"url": urls[0]}).status_code == 204
    finally:
        for url in urls:
            node.webhooks.DeregisterWebhook(webhooks_pb2.DeregisterWebhookRequest(url=url), timeout=10)


def test_grpc_message_size(node: BadInputNode) -> None:
    mib = data_of_size(MAX_ENTRY_BYTES - 64)
    entries = [log_pb2.AppendEntryRequest(data=mib)]
    # Well past gRPC's default 4 MiB: the node raised its limit.
    assert (
        len(node.log.AppendEntries(log_pb2.AppendEntriesRequest(entries=entries * 8), timeout=60).entries)
        == 8
    )
    over = log_pb2.AppendEntriesRequest(entries=entries * (MAX_MESSAGE_BYTES // MAX_ENTRY_BYTES + 2))
    assert over.ByteSize() > MAX_MESSAGE_BYTES
    with node.unchanged():
        exhausted(lambda: node.log.AppendEntries(over, timeout=60))
        # A replication stream's first message over the limit.
        big = Entry(id="00000000-0000-4000-8000-000000000000", data=mib)
        batch = replication_pb2.EntryBatch(
            entries=[big.SerializeToString()] * (MAX_MESSAGE_BYTES // MAX_ENTRY_BYTES + 2)
        )
        stub = replication_pb2_grpc.ReplicationServiceStub(node.channel)
        responses = stub.Replicate(iter([replication_pb2.ReplicateRequest(entries=batch)]), timeout=60)
        exhausted(lambda: list(responses))


# -- a slow webhook receiver ---------------------------------------------------------------------


class SilentReceiver(socketserver.ThreadingTCPServer):
    """Accepts connections, reads what comes, never answers."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Swallow)


class _Swallow(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while self.request.recv(65536):
            pass


@pytest.fixture
def receivers(receiver: Receiver) -> Iterator[list[str]]:
    """Two webhook receivers: one that never answers, one that answers each POST after a second (the
    receiver is slow: that is the fault under test)."""
    receiver.answer = lambda path: Answer(delay=SLOW_ANSWER_S)
    silent = SilentReceiver()
    thread = threading.Thread(target=silent.serve_forever, daemon=True)
    thread.start()
    try:
        yield [f"http://127.0.0.1:{silent.server_address[1]}/", receiver.url("/")]
    finally:
        silent.shutdown()
        silent.server_close()


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[list[NodeProcess]]:
    """Two unconnected nodes (one under test, one as a control), stopped at teardown."""
    with NodeProcesses(tmp_path) as nodes:
        yield [nodes("n0"), nodes("n1")]


def rss(process: NodeProcess) -> int:
    assert process.process is not None
    for line in Path(f"/proc/{process.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_slow_webhook_receivers_do_not_grow_memory(
    two_nodes: list[NodeProcess], receivers: list[str]
) -> None:
    """The node under test delivers to a receiver that never answers and one that takes a second per
    entry; the control node has no webhooks. Both take the same ~60 MB of appends: the node under test
    must use about as much memory as the control, keep appending fast, and hold the backlog only as a
    cursor (its webhooks are far behind)."""
    tested, control = two_nodes
    channels = [grpc.insecure_channel(n.grpc_target, options=GRPC_OPTIONS) for n in two_nodes]
    try:
        hooks = webhooks_pb2_grpc.WebhooksServiceStub(channels[0])
        for url in receivers:
            hooks.RegisterWebhook(webhooks_pb2.RegisterWebhookRequest(url=url), timeout=10)
        stubs = [log_pb2_grpc.LogServiceStub(c) for c in channels]
        payload = log_pb2.AppendEntryRequest(data=Value(string_value="w" * 2000))
        batch = log_pb2.AppendEntriesRequest(entries=[payload] * 500)
        extra: list[int] = []
        slowest = 0.0
        for _ in range(3):
            for _ in range(20):  # 10,000 entries of ~2 KB a round
                for stub in stubs:
                    started = time.monotonic()
                    stub.AppendEntries(batch, timeout=30)
                    slowest = max(slowest, time.monotonic() - started)
            extra.append(rss(tested) - rss(control))
        states = hooks.ListWebhooks(webhooks_pb2.ListWebhooksRequest(), timeout=10).webhooks
        assert all(s.delivered_position < 1000 for s in states), "the receivers were not slow"
        mib = [round(e / 2**20) for e in extra]
        print(f"RSS of the node with slow webhooks minus the control's, per round: {mib} MiB")
        assert max(extra) < 48 * 2**20, f"with slow webhooks the node used this much more memory: {mib} MiB"
        assert slowest < 5.0, f"an append batch took {slowest:.1f}s with slow webhooks"
        started = time.monotonic()
        stubs[0].AppendEntry(log_pb2.AppendEntryRequest(data=Value(string_value="still fast")), timeout=10)
        assert time.monotonic() - started < 2.0
        wait_for_sync(lambda: tested.alive(), message="node alive")
    finally:
        for c in channels:
            c.close()
