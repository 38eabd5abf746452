"""Property tests of the gRPC surface (the node's direct port, B+10): well-formed messages with bad
contents (UUIDs, URLs, names, ops, numbers, nesting) must get INVALID_ARGUMENT-style statuses, and
malformed protobuf bytes (garbage, invalid UTF-8 in string fields) must neither crash the node nor
change anything; the node's stores are compared before and after (`BadInputNode.unchanged`)."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.struct_pb2 import Value
from hypothesis import given
from hypothesis import strategies as st

from potboiler.server.entries import MAX_DEPTH
from potboiler.v1 import (
    kv_pb2,
    kv_pb2_grpc,
    log_pb2,
    pigtail_pb2,
    pigtail_pb2_grpc,
    replication_pb2,
    replication_pb2_grpc,
    webhooks_pb2,
)
from tests.badinput.conftest import FUZZ, NAME, QUEUE, UUID, BadInputNode, needs_kv, needs_pigtail

CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.OUT_OF_RANGE,
}
#: Read-only methods, fed arbitrary bytes (whatever parses, they change nothing).
READ_ONLY = [
    "/potboiler.v1.LogService/GetEntry",
    "/potboiler.v1.LogService/ListHeads",
    "/potboiler.v1.NodesService/GetStatus",
    "/potboiler.v1.NodesService/ListNodes",
    "/potboiler.v1.WebhooksService/ListWebhooks",
    "/potboiler.v1.KvService/GetValue",
    "/potboiler.v1.KvService/ListKeys",
    "/potboiler.v1.KvService/ListTables",
    "/potboiler.v1.PigtailService/GetTask",
    "/potboiler.v1.PigtailService/ListTasks",
    "/potboiler.v1.PigtailService/GetQueue",
]
#: Methods that write, fed messages that cannot parse: field 1 (a string or a message) holding bytes
#: that are neither UTF-8 nor a message, then anything.
WRITING = [
    "/potboiler.v1.LogService/AppendEntry",
    "/potboiler.v1.LogService/AppendEntries",
    "/potboiler.v1.WebhooksService/RegisterWebhook",
    "/potboiler.v1.NodesService/AddNode",
    "/potboiler.v1.KvService/UpdateValue",
    "/potboiler.v1.KvService/CreateTable",
    "/potboiler.v1.PigtailService/CreateQueue",
    "/potboiler.v1.PigtailService/AddTask",
    "/potboiler.v1.PigtailService/ClaimTask",
]
UNPARSABLE = [
    b"\x0a\x02\xff\xfe",
    b"\x0a\x01\x80",
    b"\x0a\x05ab\xed\xa0\x80",
    b"\x0a\x7f",
    b"\xff\xff\xff\xff",
]


def raw_call(node: BadInputNode, method: str, payload: bytes) -> grpc.StatusCode:
    """Send `payload` as the serialized request of `method`; returns the status."""
    call = node.channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        call(payload, timeout=10)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        return code
    return grpc.StatusCode.OK


def expect_error(error: grpc.RpcError, *codes: grpc.StatusCode) -> None:
    code = error.code()
    assert code in (codes or CLIENT_ERRORS), f"{code}: {error.details()}"
    assert error.details(), "an error without a message"


def nested(depth: int) -> Value:
    value = Value(number_value=1)
    for _ in range(depth):
        outer = Value()
        outer.list_value.values.add().CopyFrom(value)
        value = outer
    return value


def test_malformed_messages_never_crash_or_change_anything(node: BadInputNode) -> None:
    with node.unchanged():
        for method in WRITING:
            for payload in UNPARSABLE:
                code = raw_call(node, method, payload)
                assert code not in (grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE), f"{method}: {code}"

        @FUZZ
        @given(method=st.sampled_from(READ_ONLY), payload=st.binary(max_size=64))
        def run(method: str, payload: bytes) -> None:
            assert raw_call(node, method, payload) != grpc.StatusCode.UNAVAILABLE, "the node went away"

        run()


def test_malformed_messages_get_invalid_argument(node: BadInputNode) -> None:
    wrong = {
        (method, payload): code
        for method in WRITING[:3]
        for payload in UNPARSABLE[:2]
        if (code := raw_call(node, method, payload)) != grpc.StatusCode.INVALID_ARGUMENT
    }
    assert not wrong, f"malformed messages answered with other codes: {wrong}"


def test_bad_log_requests(node: BadInputNode) -> None:
    log = node.log
    with node.unchanged():
        for request in (
            log_pb2.AppendEntryRequest(),  # no data
            log_pb2.AppendEntryRequest(data=nested(MAX_DEPTH + 1)),
            log_pb2.AppendEntryRequest(data=nested(45)),  # 90 message levels: near protobuf's 100
        ):
            with pytest.raises(grpc.RpcError) as raised:
                log.AppendEntry(request, timeout=10)
            expect_error(raised.value, grpc.StatusCode.INVALID_ARGUMENT)
        with pytest.raises(grpc.RpcError) as raised:
            log.AppendEntries(log_pb2.AppendEntriesRequest(), timeout=10)
        expect_error(raised.value, grpc.StatusCode.INVALID_ARGUMENT)

        @FUZZ
        @given(
            text=st.text(max_size=60).filter(lambda s: not UUID.fullmatch(s)),
            where=st.sampled_from(["dep", "get"]),
        )
        def run(text: str, where: str) -> None:
            with pytest.raises(grpc.RpcError) as raised:
                if where == "dep":
                    log.AppendEntry(
                        log_pb2.AppendEntryRequest(data=Value(string_value="ok"), dependencies=[text]),
                        timeout=10,
                    )
                else:
                    log.GetEntry(log_pb2.GetEntryRequest(id=text), timeout=10)
            expect_error(raised.value, grpc.StatusCode.INVALID_ARGUMENT)

        run()


@needs_kv
@needs_pigtail
def test_long_values_are_cut_short_in_error_messages(node: BadInputNode) -> None:
    """A message repeating a client's whole value would pass gRPC's 16 KiB limit on metadata: the
    client would see RESOURCE_EXHAUSTED about metadata, never the cause."""
    long = "a" * 20_000
    kv = kv_pb2_grpc.KvServiceStub(node.channel)
    pigtail = pigtail_pb2_grpc.PigtailServiceStub(node.channel)
    calls = [
        (node.log.GetEntry, log_pb2.GetEntryRequest(id=long)),
        (node.log.AppendEntry, log_pb2.AppendEntryRequest(data=Value(number_value=1), dependencies=[long])),
        (node.webhooks.DeregisterWebhook, webhooks_pb2.DeregisterWebhookRequest(url="http://h/" + long)),
        # gRPC percent-encodes every byte beyond ASCII: 12 bytes on the wire for this character.
        (
            node.webhooks.RegisterWebhook,
            webhooks_pb2.RegisterWebhookRequest(url="ftp://" + "\U0001f600" * 2000),
        ),
        (kv.UpdateValue, kv_pb2.UpdateValueRequest(table="t_lww", key="k1", op=long, change=Value())),
        (pigtail.GetTask, pigtail_pb2.GetTaskRequest(queue=QUEUE, task_id=long)),
    ]
    with node.unchanged():
        for method, request in calls:
            with pytest.raises(grpc.RpcError) as raised:
                method(request, timeout=10)  # type: ignore[operator]
            expect_error(raised.value, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
            details = raised.value.details() or ""
            assert "..." in details and len(details) < 300, (method, details)


@needs_kv
@needs_pigtail
def test_bad_webhook_kv_and_queue_requests(node: BadInputNode) -> None:
    kv = kv_pb2_grpc.KvServiceStub(node.channel)
    pigtail = pigtail_pb2_grpc.PigtailServiceStub(node.channel)
    bad_names = st.text(max_size=140).filter(lambda s: not NAME.fullmatch(s))
    requests = st.one_of(
        st.builds(
            lambda u: (node.webhooks.RegisterWebhook, webhooks_pb2.RegisterWebhookRequest(url=u)),
            st.text(max_size=60).filter(lambda s: not s.lower().startswith(("http://", "https://"))),
        ),
        st.builds(
            lambda t, k: (
                kv.UpdateValue,
                kv_pb2.UpdateValueRequest(table=t, key=k, op="set", change=Value(number_value=1)),
            ),
            bad_names,
            st.just("k1"),
        ),
        st.builds(
            lambda op: (
                kv.UpdateValue,
                kv_pb2.UpdateValueRequest(table="t_lww", key="k1", op=op, change=Value(number_value=1)),
            ),
            st.text(max_size=20).filter(
                lambda s: s not in {"set", "create", "add", "remove", "increment", "decrement"}
            ),
        ),
        st.builds(
            lambda c: (kv.CreateTable, kv_pb2.CreateTableRequest(name="t_new", crdt=c)),
            st.sampled_from([0, 6, 42, -1, 2**31 - 1]),
        ),
        st.builds(
            lambda t: (pigtail.CreateQueue, pigtail_pb2.CreateQueueRequest(name="fuzzq", timeout_ms=t)),
            st.integers(-(2**63), 0) | st.integers(86_400_001, 2**63 - 1),
        ),
        st.builds(
            lambda w: (
                pigtail.ClaimNextTask,
                pigtail_pb2.ClaimNextTaskRequest(queue=QUEUE, worker_id="w", wait_ms=w),
            ),
            st.integers(-(2**63), -1) | st.integers(60_001, 2**63 - 1),
        ),
        st.builds(
            lambda w: (
                pigtail.ClaimTask,
                pigtail_pb2.ClaimTaskRequest(queue=QUEUE, task_id=node.task_ids[0], worker_id=w),
            ),
            st.just("")
            | st.text(min_size=257, max_size=300)
            | st.text(max_size=10).map(lambda s: s + "\x07"),
        ),
    )
    with node.unchanged():

        @FUZZ
        @given(pair=requests)
        def run(pair: tuple[object, object]) -> None:
            method, request = pair
            with pytest.raises(grpc.RpcError) as raised:
                method(request, timeout=10)  # type: ignore[operator]
            expect_error(raised.value)

        run()
        for in_flight in (-1, 1001, 2**62):
            stream = pigtail.LeaseTasks(
                pigtail_pb2.LeaseTasksRequest(queue=QUEUE, worker_id="w", max_in_flight=in_flight), timeout=10
            )
            with pytest.raises(grpc.RpcError) as raised:
                next(iter(stream))
            expect_error(raised.value, grpc.StatusCode.INVALID_ARGUMENT)


def test_bad_replication_streams(node: BadInputNode) -> None:
    stub = replication_pb2_grpc.ReplicationServiceStub(node.channel)
    firsts = [
        replication_pb2.ReplicateRequest(ack=replication_pb2.Ack()),
        replication_pb2.ReplicateRequest(entries=replication_pb2.EntryBatch()),
        replication_pb2.ReplicateRequest(peers=replication_pb2.PeerList(urls=["http://example.com:1"])),
        replication_pb2.ReplicateRequest(
            hello=replication_pb2.Hello(node_id="not-a-uuid", url="http://127.0.0.1:1")
        ),
        replication_pb2.ReplicateRequest(hello=replication_pb2.Hello(node_id="", url="")),
    ]
    with node.unchanged():
        for first in firsts:
            responses = stub.Replicate(iter([first]), timeout=10)
            with pytest.raises(grpc.RpcError) as raised:
                for _ in responses:
                    pass
            expect_error(raised.value, grpc.StatusCode.INVALID_ARGUMENT)


def test_bad_message_in_an_append_stream(node: BadInputNode) -> None:
    """A stream of appends with a bad message in the middle: what came before is acknowledged and kept,
    the stream ends with INVALID_ARGUMENT, and nothing from the bad message on is appended."""
    good = log_pb2.AppendEntryStreamRequest(
        entries=[log_pb2.AppendEntryRequest(data=Value(string_value="ok"))]
    )
    bad = log_pb2.AppendEntryStreamRequest(
        entries=[log_pb2.AppendEntryRequest(data=Value(string_value="ok")), log_pb2.AppendEntryRequest()]
    )

    def total() -> int:
        return sum(h.seq for h in node.log.ListHeads(log_pb2.ListHeadsRequest(), timeout=10).heads)

    before = total()
    acknowledged = 0
    with pytest.raises(grpc.RpcError) as raised:
        for response in node.log.AppendEntryStream(iter([good, good, bad, good]), timeout=30):
            acknowledged += len(response.entries)
    expect_error(raised.value, grpc.StatusCode.INVALID_ARGUMENT)
    assert acknowledged == 2
    assert total() == before + 2


@needs_pigtail
def test_a_work_stream_that_starts_with_a_bad_message(node: BadInputNode) -> None:
    """WorkTasks: a first message that is not protobuf ends the stream with INVALID_ARGUMENT and
    changes nothing (a bad message later is in tests/integration/test_pigtail_grpc.py)."""
    call = node.channel.stream_stream(
        "/potboiler.v1.PigtailService/WorkTasks",
        request_serializer=lambda b: b,
        response_deserializer=pigtail_pb2.WorkTasksResponse.FromString,
    )
    with node.unchanged():
        for payload in UNPARSABLE:
            with pytest.raises(grpc.RpcError) as raised:
                for _ in call(iter([payload]), timeout=10):
                    pass
            expect_error(raised.value, grpc.StatusCode.INVALID_ARGUMENT)
