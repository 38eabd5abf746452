"""LogService over gRPC against an in-process node: appends (unary, batch, stream), reads,
subscriptions, causal delivery of entries with dependencies, error codes, health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, json_format
from google.protobuf.struct_pb2 import Value
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from potboiler.server import log_servicer
from potboiler.server.entries import MAX_BATCH_ENTRIES, MAX_DEPENDENCIES, MAX_DEPTH, MAX_ENTRY_BYTES, NewEntry
from potboiler.server.hlc import MAX_DRIFT_MS, HybridClock, wall_clock_ms
from potboiler.server.log import Log
from potboiler.server.log_servicer import MAX_SUBSCRIBE_BYTES
from potboiler.server.processes import find_base_port
from potboiler.server.storage import MemoryStore
from potboiler.v1 import entry_pb2, log_pb2, nodes_pb2
from tests.conftest import GrpcNode, GrpcNodeFactory, wait_for

JSON = Any


def value(obj: JSON) -> Value:
    """A JSON value as a protobuf Value."""
    out = Value()
    json_format.ParseDict(obj, out)
    return out


def as_json(v: Value) -> JSON:
    return json_format.MessageToDict(v)


def request(obj: JSON, dependencies: Sequence[str] = ()) -> log_pb2.AppendEntryRequest:
    return log_pb2.AppendEntryRequest(data=value(obj), dependencies=list(dependencies))


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    """The error a call ends with (fails the test if it succeeds)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def get(node: GrpcNode, entry_id: str) -> entry_pb2.Entry:
    return (await node.log.GetEntry(log_pb2.GetEntryRequest(id=entry_id))).entry


class Subscriber:
    """Collects a SubscribeEntries stream in a background task; `close()` cancels it."""

    def __init__(self, node: GrpcNode, after: int = 0, max_batch: int = 0) -> None:
        self.call = node.log.SubscribeEntries(
            log_pb2.SubscribeEntriesRequest(after_position=after, max_batch=max_batch)
        )
        self.received: list[log_pb2.DeliveredEntry] = []
        self.batch_sizes: list[int] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for response in self.call:
            if response is None:  # what grpc.aio yields for a message it could not decode
                raise AssertionError("a SubscribeEntries message could not be decoded")
            self.batch_sizes.append(len(response.entries))
            self.received.extend(response.entries)

    @property
    def ids(self) -> list[str]:
        return [d.entry.id for d in self.received]

    @property
    def positions(self) -> list[int]:
        return [d.position for d in self.received]

    async def wait_count(self, n: int) -> None:
        await wait_for(
            lambda: len(self.received) >= n or self._task.done(),
            message=lambda: f"subscriber has {len(self.received)} of {n} entries",
        )
        if self._task.done():
            self._task.result()  # surfaces the stream's error
        assert len(self.received) >= n

    async def close(self) -> None:
        self.call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task


class RemoteLog(Log):
    """Another node's log (in memory), to make entries of another owner."""

    def __init__(self, clock_ms: int = 0) -> None:
        self.store = MemoryStore()
        super().__init__(self.store, HybridClock(lambda: clock_ms) if clock_ms else None)


def remote_log(clock_ms: int = 0) -> RemoteLog:
    return RemoteLog(clock_ms)


def remote_append(log: RemoteLog, *items: NewEntry) -> list[entry_pb2.Entry]:
    """Append to a remote log; returns copies of the entries (as a peer would send them)."""
    plan = log.begin()
    entries = log.plan_local(plan, items)
    log.store.write(plan.writes)
    log.apply(plan)
    return [e.entry() for e in entries]


# -- appends and reads ----------------------------------------------------------------------


async def test_append_get_and_heads(grpc_node: GrpcNode) -> None:
    assert (await grpc_node.log.ListHeads(log_pb2.ListHeadsRequest())).heads == []
    acks = [await grpc_node.log.AppendEntry(request({"n": i})) for i in range(3)]
    assert [a.seq for a in acks] == [1, 2, 3]
    assert len({a.id for a in acks}) == 3
    stamps = [(a.when.wall_ms, a.when.logical) for a in acks]
    assert stamps == sorted(stamps) and len(set(stamps)) == 3
    assert all(str(uuid.UUID(a.id)) == a.id for a in acks)  # canonical lower-case form

    first, second, third = [await get(grpc_node, a.id) for a in acks]
    for i, (entry, ack) in enumerate(zip((first, second, third), acks, strict=True)):
        assert entry.id == ack.id
        assert entry.owner == grpc_node.node_id
        assert entry.seq == i + 1
        assert entry.when == ack.when
        assert as_json(entry.data) == {"n": i}
        assert list(entry.dependencies) == []
    assert (first.prev, first.next) == ("", second.id)
    assert (second.prev, second.next) == (first.id, third.id)
    assert (third.prev, third.next) == (second.id, "")

    heads = await grpc_node.heads()
    assert list(heads) == [grpc_node.node_id]
    head = heads[grpc_node.node_id]
    assert (head.first, head.head, head.seq) == (first.id, third.id, 3)


@pytest.mark.parametrize(
    "data",
    [{"a": 1}, [1, "two", None], "text", 42, -1.5, True, None, {"deep": {"list": [{"x": []}, {}]}}],
    ids=["object", "array", "string", "number", "float", "bool", "null", "nested"],
)
async def test_any_json_value_round_trips(grpc_node: GrpcNode, data: JSON) -> None:
    ack = await grpc_node.log.AppendEntry(request(data))
    assert as_json((await get(grpc_node, ack.id)).data) == data


async def test_concurrent_appends_get_distinct_contiguous_seqs(grpc_node: GrpcNode) -> None:
    n = 200
    acks = await asyncio.gather(*(grpc_node.log.AppendEntry(request(i)) for i in range(n)))
    assert sorted(a.seq for a in acks) == list(range(1, n + 1))
    assert len({a.id for a in acks}) == n
    head = (await grpc_node.heads())[grpc_node.node_id]
    assert head.seq == n


async def test_append_entries_batch(grpc_node: GrpcNode) -> None:
    await grpc_node.log.AppendEntry(request("before"))
    response = await grpc_node.log.AppendEntries(
        log_pb2.AppendEntriesRequest(entries=[request({"i": i}) for i in range(5)])
    )
    assert [e.seq for e in response.entries] == [2, 3, 4, 5, 6]
    for i, ack in enumerate(response.entries):
        entry = await get(grpc_node, ack.id)
        assert as_json(entry.data) == {"i": i}
        assert entry.seq == ack.seq


@pytest.mark.parametrize(
    "bad",
    [
        log_pb2.AppendEntryRequest(),  # no data
        log_pb2.AppendEntryRequest(data=Value()),  # a Value with no kind set
        request(1, ["not-a-uuid"]),
    ],
    ids=["missing-data", "empty-value", "bad-dependency"],
)
async def test_append_entries_is_all_or_nothing(grpc_node: GrpcNode, bad: log_pb2.AppendEntryRequest) -> None:
    await grpc_node.log.AppendEntry(request("before"))
    entries = [request(1), request(2), bad, request(3)]
    error = await rpc_error(grpc_node.log.AppendEntries(log_pb2.AppendEntriesRequest(entries=entries)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "entry 2" in (error.details() or "")
    head = (await grpc_node.heads())[grpc_node.node_id]
    assert head.seq == 1  # nothing of the batch was appended
    assert grpc_node.node.log.position == 1


async def test_append_entries_needs_an_entry(grpc_node: GrpcNode) -> None:
    error = await rpc_error(grpc_node.log.AppendEntries(log_pb2.AppendEntriesRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details()


async def test_append_entries_batch_limit(grpc_node: GrpcNode) -> None:
    too_many = log_pb2.AppendEntriesRequest(entries=[request(i) for i in range(MAX_BATCH_ENTRIES + 1)])
    error = await rpc_error(grpc_node.log.AppendEntries(too_many))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_BATCH_ENTRIES) in (error.details() or "")
    assert await grpc_node.heads() == {}
    full = log_pb2.AppendEntriesRequest(entries=[request(i) for i in range(MAX_BATCH_ENTRIES)])
    response = await grpc_node.log.AppendEntries(full)
    assert [e.seq for e in response.entries] == list(range(1, MAX_BATCH_ENTRIES + 1))


async def test_concurrent_batches_stay_contiguous(grpc_node: GrpcNode) -> None:
    batches = [
        grpc_node.log.AppendEntries(
            log_pb2.AppendEntriesRequest(entries=[request([b, k]) for k in range(10)])
        )
        for b in range(20)
    ]
    singles = [grpc_node.log.AppendEntry(request(i)) for i in range(50)]
    results = await asyncio.gather(*batches, *singles)
    batch_results = results[:20]
    all_seqs: list[int] = []
    for response in batch_results:
        assert isinstance(response, log_pb2.AppendEntriesResponse)
        seqs = [e.seq for e in response.entries]
        assert seqs == list(range(seqs[0], seqs[0] + 10))  # a batch is never interleaved
        all_seqs += seqs
    for response in results[20:]:
        assert isinstance(response, log_pb2.AppendEntryResponse)
        all_seqs.append(response.seq)
    assert sorted(all_seqs) == list(range(1, 251))


# -- append stream ---------------------------------------------------------------------------


def stream_message(m: int, per_message: int) -> log_pb2.AppendEntryStreamRequest:
    return log_pb2.AppendEntryStreamRequest(entries=[request({"m": m, "k": k}) for k in range(per_message)])


async def test_append_stream_many_in_flight_acked_in_order(grpc_node: GrpcNode) -> None:
    messages, per_message = 300, 3

    async def requests() -> AsyncIterator[log_pb2.AppendEntryStreamRequest]:
        for m in range(messages):
            yield stream_message(m, per_message)

    acks = [response async for response in grpc_node.log.AppendEntryStream(requests())]
    assert len(acks) == messages
    seqs = [e.seq for ack in acks for e in ack.entries]
    assert seqs == list(range(1, messages * per_message + 1))  # in request order, none lost
    assert all(len(ack.entries) == per_message for ack in acks)
    for m in (0, 1, messages // 2, messages - 1):
        for k, ack in enumerate(acks[m].entries):
            entry = await get(grpc_node, ack.id)
            assert as_json(entry.data) == {"m": m, "k": k}
            assert entry.seq == ack.seq


async def test_append_stream_with_concurrent_writer_and_reader(grpc_node: GrpcNode) -> None:
    call = grpc_node.log.AppendEntryStream()
    messages = 100

    async def write() -> None:
        for m in range(messages):
            await call.write(stream_message(m, 1))
        await call.done_writing()

    writer = asyncio.create_task(write())
    acks = [response async for response in call]
    await writer
    assert [a.entries[0].seq for a in acks] == list(range(1, messages + 1))
    assert await call.code() == grpc.StatusCode.OK


async def test_an_append_stream_ended_before_its_batch_fails_leaves_no_unseen_error(
    grpc_node: GrpcNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client goes away while its entries wait to be written, then the write fails: the acks
    nobody will send must not end up as 'Future exception was never retrieved' in the node's log."""
    appender = grpc_node.node.appender
    queued, fail = asyncio.Event(), asyncio.Event()
    commit = appender._commit

    async def failing_commit(jobs: Any) -> None:
        queued.set()
        await fail.wait()
        raise OSError("the disk went away")

    monkeypatch.setattr(appender, "_commit", failing_commit)
    unseen: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: unseen.append(context["message"]))
    try:
        call = grpc_node.log.AppendEntryStream()
        await call.write(stream_message(0, 1))
        await asyncio.wait_for(queued.wait(), 10)
        call.cancel()
        await asyncio.sleep(0.1)  # the server sees the cancel and leaves the handler
        fail.set()
        await asyncio.sleep(0.1)
        monkeypatch.setattr(appender, "_commit", commit)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert not [m for m in unseen if "never retrieved" in m], unseen


async def test_append_stream_bad_message_ends_stream_keeping_earlier_acks(grpc_node: GrpcNode) -> None:
    good_before, per_message = 5, 2
    # Written with call.write rather than a request iterator, and nothing written after the bad
    # message: when grpc.aio fails to send on a call the server has ended, it can replace the
    # server's status with its own INTERNAL error (a client-side race).
    call = grpc_node.log.AppendEntryStream()
    for m in range(good_before):
        await call.write(stream_message(m, per_message))
    await call.write(log_pb2.AppendEntryStreamRequest(entries=[request("ok"), log_pb2.AppendEntryRequest()]))
    acks: list[log_pb2.AppendEntryStreamResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while (response := await call.read()) is not grpc.aio.EOF:
            assert isinstance(response, log_pb2.AppendEntryStreamResponse)
            acks.append(response)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "data" in (info.value.details() or "")
    assert len(acks) == good_before
    acked = [e for ack in acks for e in ack.entries]
    assert [e.seq for e in acked] == list(range(1, good_before * per_message + 1))
    for e in acked:
        assert (await get(grpc_node, e.id)).seq == e.seq
    # Nothing of the bad message (not even its valid first entry) was appended.
    assert (await grpc_node.heads())[grpc_node.node_id].seq == good_before * per_message


async def test_append_stream_appends_nothing_after_a_bad_message(grpc_node: GrpcNode) -> None:
    """Messages that reach the node after a bad one are not appended. (The status is not checked
    here: writing on a call the server has ended can make grpc.aio report INTERNAL instead.)"""
    call = grpc_node.log.AppendEntryStream()
    await call.write(log_pb2.AppendEntryStreamRequest(entries=[log_pb2.AppendEntryRequest()]))
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
        for m in range(5):
            await call.write(stream_message(m, 2))  # the server may have ended the call
    with pytest.raises(grpc.aio.AioRpcError):
        while await call.read() is not grpc.aio.EOF:
            raise AssertionError("a message after the bad one was acknowledged")
    assert grpc_node.node_id not in await grpc_node.heads()


async def test_append_stream_empty_message_is_invalid(grpc_node: GrpcNode) -> None:
    async def requests() -> AsyncIterator[log_pb2.AppendEntryStreamRequest]:
        yield stream_message(0, 1)
        yield log_pb2.AppendEntryStreamRequest()

    acks: list[log_pb2.AppendEntryStreamResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for response in grpc_node.log.AppendEntryStream(requests()):
            acks.append(response)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(acks) == 1


async def test_append_stream_oversized_message(grpc_node: GrpcNode) -> None:
    async def requests() -> AsyncIterator[log_pb2.AppendEntryStreamRequest]:
        yield stream_message(0, 1)
        yield log_pb2.AppendEntryStreamRequest(entries=[request(i) for i in range(MAX_BATCH_ENTRIES + 1)])

    call = grpc_node.log.AppendEntryStream(requests())
    acks: list[log_pb2.AppendEntryStreamResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for response in call:
            acks.append(response)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert len(acks) == 1
    assert (await grpc_node.heads())[grpc_node.node_id].seq == 1


async def test_append_stream_with_no_messages(grpc_node: GrpcNode) -> None:
    async def requests() -> AsyncIterator[log_pb2.AppendEntryStreamRequest]:
        return
        yield

    call = grpc_node.log.AppendEntryStream(requests())
    assert [r async for r in call] == []
    assert await call.code() == grpc.StatusCode.OK


def stream_readers() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if "AppendEntryStream.<locals>.read" in repr(t.get_coro())]


async def test_append_stream_of_a_client_that_reads_no_acks_leaves_nothing_behind_once_it_ends(
    grpc_node: GrpcNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node stops reading a stream whose acks wait unread (its queue of acks is full); once the
    call ends, the node's reader of that stream ends too, and with it what the acks hold."""
    monkeypatch.setattr(log_servicer, "STREAM_ACKS_QUEUED", 2)
    call = grpc_node.log.AppendEntryStream()
    message = log_pb2.AppendEntryStreamRequest(entries=[request("x" * 200) for _ in range(200)])
    with contextlib.suppress(TimeoutError):
        for _ in range(2000):  # until the node stops taking them in
            await asyncio.wait_for(asyncio.shield(call.write(message)), 0.5)
    assert stream_readers()
    call.cancel()
    await wait_for(lambda: not stream_readers(), 5, "the stream's reader to end")


# -- subscriptions ---------------------------------------------------------------------------


async def test_subscribe_from_zero_then_live(grpc_node: GrpcNode) -> None:
    ids = [(await grpc_node.log.AppendEntry(request(i))).id for i in range(10)]
    sub = Subscriber(grpc_node)
    try:
        await sub.wait_count(10)
        assert sub.ids == ids
        assert sub.positions == list(range(1, 11))
        live = [(await grpc_node.log.AppendEntry(request(i))).id for i in range(10, 15)]
        await sub.wait_count(15)
        assert sub.ids == ids + live
        assert sub.positions == list(range(1, 16))
        entry = sub.received[3].entry
        assert as_json(entry.data) == 3 and entry.owner == grpc_node.node_id and entry.seq == 4
    finally:
        await sub.close()


async def test_subscribe_resumes_without_loss_or_duplicates(grpc_node: GrpcNode) -> None:
    acks = (
        await grpc_node.log.AppendEntries(
            log_pb2.AppendEntriesRequest(entries=[request(i) for i in range(20)])
        )
    ).entries
    ids = [a.id for a in acks]
    first = Subscriber(grpc_node, max_batch=3)
    try:
        await first.wait_count(7)
        last = first.received[6].position
    finally:
        await first.close()
    assert all(size <= 3 for size in first.batch_sizes)

    resumed = Subscriber(grpc_node, after=last)
    try:
        await resumed.wait_count(20 - last)
        assert resumed.positions == list(range(last + 1, 21))
        assert first.ids[:last] + resumed.ids == ids
        more = [(await grpc_node.log.AppendEntry(request("live"))).id for _ in range(3)]
        await resumed.wait_count(23 - last)
        assert resumed.ids[-3:] == more
        assert len(set(resumed.ids)) == len(resumed.ids)
    finally:
        await resumed.close()


@pytest.mark.parametrize("max_batch", [0, 5000])
async def test_subscribe_batches_are_at_most_1000(grpc_node: GrpcNode, max_batch: int) -> None:
    for _ in range(3):
        await grpc_node.log.AppendEntries(
            log_pb2.AppendEntriesRequest(entries=[request(i) for i in range(1000)])
        )
    sub = Subscriber(grpc_node, max_batch=max_batch)
    try:
        await sub.wait_count(3000)
        assert sub.positions == list(range(1, 3001))
        assert max(sub.batch_sizes) <= 1000
    finally:
        await sub.close()


async def test_subscribe_messages_fit_a_default_client_however_big_the_entries(
    grpc_node_factory: GrpcNodeFactory,
) -> None:
    """A client with gRPC's default limits takes messages of at most 4 MiB: a message holds at most
    MAX_SUBSCRIBE_BYTES of entries (and one at least), from the in-memory tail and from the store."""
    node = await grpc_node_factory("big")
    big = Value(string_value="x" * 100_000)
    for _ in range(2):
        await node.log.AppendEntries(
            log_pb2.AppendEntriesRequest(entries=[log_pb2.AppendEntryRequest(data=big)] * 50)
        )
    for restarted in (False, True):
        if restarted:  # the store, not the tail
            await grpc_node_factory.stop(node)
            node = await grpc_node_factory("big")
        sub = Subscriber(node)
        try:
            await sub.wait_count(100)
            assert sub.positions == list(range(1, 101))
            assert all(d.entry.data == big for d in sub.received)
            assert max(sub.batch_sizes) * 100_000 <= MAX_SUBSCRIBE_BYTES and len(sub.batch_sizes) > 1
        finally:
            await sub.close()


async def test_subscribe_beyond_the_end_waits_for_new_entries(grpc_node: GrpcNode) -> None:
    await grpc_node.log.AppendEntry(request(0))
    sub = Subscriber(grpc_node, after=1)
    try:
        ack = await grpc_node.log.AppendEntry(request(1))
        await sub.wait_count(1)
        assert sub.ids == [ack.id] and sub.positions == [2]
    finally:
        await sub.close()


@pytest.mark.parametrize("after", [2, 2**64 - 1])
async def test_subscribe_after_a_position_not_reached_is_out_of_range(
    grpc_node: GrpcNode, after: int
) -> None:
    """Waiting for it would skip the entries up to it unseen (a client resuming with a position of
    another node, or of this one before it lost its data)."""
    await grpc_node.log.AppendEntry(request(0))
    call = grpc_node.log.SubscribeEntries(log_pb2.SubscribeEntriesRequest(after_position=after))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert f"position {after} is beyond this node's last delivered position 1" in (info.value.details() or "")


async def test_concurrent_appends_reach_subscriber_exactly_once(grpc_node: GrpcNode) -> None:
    sub = Subscriber(grpc_node)
    try:
        acks = await asyncio.gather(*(grpc_node.log.AppendEntry(request(i)) for i in range(150)))
        await sub.wait_count(150)
        assert sorted(sub.ids) == sorted(a.id for a in acks)
        assert sub.positions == list(range(1, 151))
        assert [d.entry.seq for d in sub.received] == list(range(1, 151))  # own chain in order
    finally:
        await sub.close()


# -- dependencies and causal delivery ----------------------------------------------------------


async def test_entry_with_unknown_dependency_waits_for_it(grpc_node: GrpcNode) -> None:
    other, third = remote_log(), remote_log()
    [dependency] = remote_append(other, NewEntry(value("the dependency").SerializeToString()))
    [independent] = remote_append(third, NewEntry(value("independent").SerializeToString()))
    sub = Subscriber(grpc_node)
    try:
        a1 = await grpc_node.log.AppendEntry(request("a1"))
        waiting = await grpc_node.log.AppendEntry(request("needs dep", [dependency.id]))
        after = await grpc_node.log.AppendEntry(request("after, in the same chain"))
        assert (waiting.seq, after.seq) == (2, 3)
        # Acknowledged and stored (readable), but not delivered: it and its successor wait.
        assert list((await get(grpc_node, waiting.id)).dependencies) == [dependency.id]
        status = await grpc_node.nodes.GetStatus(nodes_pb2.GetStatusRequest())
        assert (status.pending, status.delivered_position) == (2, 1)

        # Something deliverable arriving later overtakes the waiting entries.
        assert [e.id for e in await grpc_node.node.appender.ingest([independent])] == [independent.id]
        await sub.wait_count(2)
        assert sub.ids == [a1.id, independent.id]

        # The dependency arrives: it, then the waiting entry, then its successor are delivered.
        await grpc_node.node.appender.ingest([dependency])
        await sub.wait_count(5)
        assert sub.ids == [a1.id, independent.id, dependency.id, waiting.id, after.id]
        assert sub.positions == [1, 2, 3, 4, 5]
        status = await grpc_node.nodes.GetStatus(nodes_pb2.GetStatusRequest())
        assert (status.pending, status.delivered_position) == (0, 5)
    finally:
        await sub.close()


async def test_dependency_between_two_nodes(grpc_node_factory: GrpcNodeFactory) -> None:
    a = await grpc_node_factory("a")
    b = await grpc_node_factory("b")
    x = await b.log.AppendEntry(request("x on b"))
    y = await a.log.AppendEntry(request("y on a, after x", [x.id]))
    status = await a.nodes.GetStatus(nodes_pb2.GetStatusRequest())
    assert (status.pending, status.delivered_position) == (1, 0)

    sub = Subscriber(a)
    try:
        new = await a.node.appender.ingest([await get(b, x.id)])
        assert [e.id for e in new] == [x.id]
        await sub.wait_count(2)
        assert sub.ids == [x.id, y.id]
        heads = await a.heads()
        assert heads[b.node_id].head == x.id and heads[a.node_id].head == y.id
        assert list(heads) == sorted(heads)  # ListHeads is sorted by owner
        # Ingesting the same entry again changes nothing (no duplicate delivery).
        assert await a.node.appender.ingest([await get(b, x.id)]) == []
        await a.log.AppendEntry(request("marker"))
        await sub.wait_count(3)
        assert len(sub.ids) == 3
    finally:
        await sub.close()


async def test_dependency_already_delivered_is_no_wait(grpc_node: GrpcNode) -> None:
    base = await grpc_node.log.AppendEntry(request("base"))
    dependent = await grpc_node.log.AppendEntry(request("dependent", [base.id, base.id]))
    status = await grpc_node.nodes.GetStatus(nodes_pb2.GetStatusRequest())
    assert (status.pending, status.delivered_position) == (0, 2)
    assert (await get(grpc_node, dependent.id)).dependencies == [base.id]  # named twice: one dependency


async def test_remote_entries_of_one_owner_are_taken_in_chain_order(grpc_node: GrpcNode) -> None:
    other = remote_log()
    e1, e2, e3 = remote_append(other, *(NewEntry(value(i).SerializeToString()) for i in range(3)))
    # A gap (e2 without e1) is skipped, not stored out of order.
    assert await grpc_node.node.appender.ingest([e2]) == []
    assert await grpc_node.heads() == {}
    taken = await grpc_node.node.appender.ingest([e1, e2, e3])
    assert [e.id for e in taken] == [e1.id, e2.id, e3.id]
    assert (await get(grpc_node, e1.id)).next == e2.id
    assert (await grpc_node.heads())[other.node_id].seq == 3


async def test_remote_stamps_advance_the_clock(grpc_node: GrpcNode) -> None:
    ahead_ms = wall_clock_ms() + MAX_DRIFT_MS // 2  # a peer whose clock runs ahead, within the bound
    [remote] = remote_append(
        remote_log(clock_ms=ahead_ms), NewEntry(value("from a fast clock").SerializeToString())
    )
    await grpc_node.node.appender.ingest([remote])
    ack = await grpc_node.log.AppendEntry(request("later"))
    assert (ack.when.wall_ms, ack.when.logical) > (remote.when.wall_ms, remote.when.logical)


async def test_a_far_future_stamp_pulls_the_clock_only_to_the_drift_bound(grpc_node: GrpcNode) -> None:
    future_ms = 4_000_000_000_000  # year 2096
    [remote] = remote_append(
        remote_log(clock_ms=future_ms), NewEntry(value("from the future").SerializeToString())
    )
    assert await grpc_node.node.appender.ingest([remote]) == [remote]  # stored all the same
    before = wall_clock_ms()
    ack = await grpc_node.log.AppendEntry(request("later"))
    assert before <= ack.when.wall_ms <= wall_clock_ms() + MAX_DRIFT_MS


# -- errors ----------------------------------------------------------------------------------


async def test_get_entry_errors(grpc_node: GrpcNode) -> None:
    error = await rpc_error(grpc_node.log.GetEntry(log_pb2.GetEntryRequest(id="not-a-uuid")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not-a-uuid" in (error.details() or "") and "UUID" in (error.details() or "")
    error = await rpc_error(grpc_node.log.GetEntry(log_pb2.GetEntryRequest(id="")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    unknown = str(uuid.uuid4())
    error = await rpc_error(grpc_node.log.GetEntry(log_pb2.GetEntryRequest(id=unknown)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert unknown in (error.details() or "")


def nested_number(number: float) -> Value:
    """{"a": [1, {"b": number}]}, built field by field (JSON cannot say NaN or Infinity)."""
    value = Value()
    items = value.struct_value.fields["a"].list_value.values
    items.add().number_value = 1
    items.add().struct_value.fields["b"].number_value = number
    return value


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (log_pb2.AppendEntryRequest(), "data"),
        (log_pb2.AppendEntryRequest(data=Value()), "data"),
        (request(1, ["nope"]), "dependency"),
        (request(1, [str(uuid.uuid4()), "123"]), "dependency"),
        (request(1, [str(uuid.uuid4()).replace("-", "")]), "dependency"),
        (log_pb2.AppendEntryRequest(data=Value(number_value=math.nan)), "NaN"),
        (log_pb2.AppendEntryRequest(data=nested_number(math.inf)), "infinite"),
        (log_pb2.AppendEntryRequest(data=nested_number(-math.inf)), "infinite"),
    ],
    ids=[
        "no-data",
        "empty-value",
        "bad-dependency",
        "second-dependency-bad",
        "unhyphenated-dependency",
        "nan",
        "infinity-nested",
        "minus-infinity-nested",
    ],
)
async def test_append_invalid_argument(
    grpc_node: GrpcNode, bad: log_pb2.AppendEntryRequest, words: str
) -> None:
    error = await rpc_error(grpc_node.log.AppendEntry(bad))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in (error.details() or "")
    assert await grpc_node.heads() == {}


def string_of_size(total: int) -> Value:
    """A string Value whose serialized size is exactly `total` bytes (total in 2^14..2^21)."""
    v = Value(string_value="x" * (total - 4))  # 1 tag byte + 3 length bytes
    assert v.ByteSize() == total
    return v


async def test_entry_size_limit(grpc_node: GrpcNode) -> None:
    error = await rpc_error(
        grpc_node.log.AppendEntry(log_pb2.AppendEntryRequest(data=string_of_size(MAX_ENTRY_BYTES + 1)))
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_ENTRY_BYTES) in (error.details() or "")
    ack = await grpc_node.log.AppendEntry(log_pb2.AppendEntryRequest(data=string_of_size(MAX_ENTRY_BYTES)))
    assert ack.seq == 1
    assert len((await get(grpc_node, ack.id)).data.string_value) == MAX_ENTRY_BYTES - 4


async def test_too_many_dependencies(grpc_node: GrpcNode) -> None:
    deps = [str(uuid.uuid4()) for _ in range(MAX_DEPENDENCIES + 1)]
    error = await rpc_error(grpc_node.log.AppendEntry(request(1, deps)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ack = await grpc_node.log.AppendEntry(request(1, deps[:MAX_DEPENDENCIES]))
    assert len((await get(grpc_node, ack.id)).dependencies) == MAX_DEPENDENCIES


def nested(depth: int, shape: str) -> log_pb2.AppendEntryRequest:
    """An append of JSON nested `depth` levels deep: [[...["x"]...]] or {"a": {"a": ... "x"}}. Built
    in place, outside in: copying a Value this deep would itself hit protobuf's decode limit."""
    out = log_pb2.AppendEntryRequest()
    inner = out.data
    for _ in range(depth):
        inner = inner.list_value.values.add() if shape == "lists" else inner.struct_value.fields["a"]
    inner.string_value = "x"
    return out


@pytest.mark.parametrize("shape", ["lists", "objects"])
async def test_too_deeply_nested_data_is_invalid_argument(grpc_node: GrpcNode, shape: str) -> None:
    error = await rpc_error(grpc_node.log.AppendEntry(nested(80, shape)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_too_deep_data_in_a_batch_or_stream_is_invalid_argument_naming_the_entry(
    grpc_node: GrpcNode,
) -> None:
    entries = [request(1), nested(MAX_DEPTH + 1, "lists")]
    error = await rpc_error(grpc_node.log.AppendEntries(log_pb2.AppendEntriesRequest(entries=entries)))
    assert (error.code(), error.details()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        f"entry 1: entry data is nested deeper than {MAX_DEPTH} levels of arrays and objects",
    )
    stream = grpc_node.log.AppendEntryStream()
    await stream.write(log_pb2.AppendEntryStreamRequest(entries=entries))
    await stream.done_writing()
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        async for _ in stream:
            pass
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "entry 1: entry data is nested deeper" in (failed.value.details() or "")
    assert (await grpc_node.log.ListHeads(log_pb2.ListHeadsRequest())).heads == []


@pytest.mark.parametrize("shape", ["lists", "objects"])
async def test_deepest_accepted_entry_can_be_read_and_replicated(
    grpc_node_factory: GrpcNodeFactory, shape: str
) -> None:
    base = find_base_port(count=2)
    a = await grpc_node_factory("a", base_port=base, grpc_port=None)
    b = await grpc_node_factory("b", base_port=base + 100, grpc_port=None, peers=[a.node.config.url])
    try:
        deepest = ""
        for depth in range(1, 120):
            try:
                deepest = (await a.log.AppendEntry(nested(depth, shape))).id
            except grpc.aio.AioRpcError:
                break
        assert deepest
        total = a.node.log.position

        assert (await get(a, deepest)).id == deepest
        sub = Subscriber(a)
        try:
            await sub.wait_count(total)
            assert sub.ids[-1] == deepest
        finally:
            await sub.close()

        def replication_error() -> str:
            return " ".join(p.last_error for p in b.node.replicator.status() if "Exceeded" in p.last_error)

        await wait_for(lambda: b.node.log.vector().get(a.node_id) == total or replication_error())
        assert not replication_error()
        assert (await get(b, deepest)).id == deepest
    finally:
        # Stopped here, so that a failure to stop (as with this bug) is the test's, not the fixture's.
        try:
            await grpc_node_factory.stop(b)
        finally:
            await grpc_node_factory.stop(a)


async def test_node_keeps_serving_after_bad_requests(grpc_node: GrpcNode) -> None:
    for bad in (log_pb2.AppendEntryRequest(), request(1, ["x"])):
        await rpc_error(grpc_node.log.AppendEntry(bad))
    await rpc_error(grpc_node.log.GetEntry(log_pb2.GetEntryRequest(id="x")))
    ack = await grpc_node.log.AppendEntry(request("still fine"))
    assert ack.seq == 1


# -- restart, health, reflection --------------------------------------------------------------


async def test_restart_keeps_identity_entries_and_positions(grpc_node_factory: GrpcNodeFactory) -> None:
    node = await grpc_node_factory("restart")
    node_id = node.node_id
    acks = [await node.log.AppendEntry(request(i)) for i in range(5)]
    await grpc_node_factory.stop(node)

    again = await grpc_node_factory("restart")
    assert again.node_id == node_id
    for ack in acks:
        assert (await get(again, ack.id)).seq == ack.seq
    ack = await again.log.AppendEntry(request("after restart"))
    assert ack.seq == 6
    assert (await get(again, ack.id)).prev == acks[-1].id
    assert (ack.when.wall_ms, ack.when.logical) > (acks[-1].when.wall_ms, acks[-1].when.logical)
    sub = Subscriber(again)
    try:
        await sub.wait_count(6)
        assert sub.positions == list(range(1, 7))
    finally:
        await sub.close()


async def test_waiting_entries_survive_a_restart(grpc_node_factory: GrpcNodeFactory) -> None:
    node = await grpc_node_factory("pending")
    [dependency] = remote_append(remote_log(), NewEntry(value("dependency").SerializeToString()))
    waiting = await node.log.AppendEntry(request("waits", [dependency.id]))
    after = await node.log.AppendEntry(request("after"))
    await grpc_node_factory.stop(node)

    again = await grpc_node_factory("pending")
    status = await again.nodes.GetStatus(nodes_pb2.GetStatusRequest())
    assert (status.pending, status.delivered_position) == (2, 0)
    sub = Subscriber(again)
    try:
        await again.node.appender.ingest([dependency])
        await sub.wait_count(3)
        assert sub.ids == [dependency.id, waiting.id, after.id]
    finally:
        await sub.close()
    status = await again.nodes.GetStatus(nodes_pb2.GetStatusRequest())
    assert (status.pending, status.delivered_position) == (0, 3)


@pytest.mark.parametrize(
    "service",
    [
        "",
        "potboiler.v1.LogService",
        "potboiler.v1.CoreRestService",
        "potboiler.v1.NodesService",
        "potboiler.v1.WebhooksService",
    ],
)
async def test_health_serving(grpc_node: GrpcNode, service: str) -> None:
    response = await grpc_node.check_health(service)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_health_unknown_service(grpc_node: GrpcNode) -> None:
    error = await rpc_error(grpc_node.check_health("no.Such"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def reflect(
    node: GrpcNode, req: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    info = node.channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    responses = [r async for r in info(iter([req]))]
    assert len(responses) == 1
    assert isinstance(responses[0], reflection_pb2.ServerReflectionResponse)
    return responses[0]


async def test_reflection_lists_and_describes_services(grpc_node: GrpcNode) -> None:
    response = await reflect(grpc_node, reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in response.list_services_response.service}
    assert {
        "potboiler.v1.LogService",
        "potboiler.v1.CoreRestService",
        "potboiler.v1.NodesService",
        "potboiler.v1.WebhooksService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    response = await reflect(
        grpc_node, reflection_pb2.ServerReflectionRequest(file_containing_symbol="potboiler.v1.LogService")
    )
    files = response.file_descriptor_response.file_descriptor_proto
    assert files, response
    protos = [descriptor_pb2.FileDescriptorProto.FromString(f) for f in files]
    log_file = next(p for p in protos if any(s.name == "LogService" for s in p.service))
    methods = {m.name for s in log_file.service for m in s.method}
    assert {
        "AppendEntry",
        "AppendEntries",
        "AppendEntryStream",
        "GetEntry",
        "ListHeads",
        "SubscribeEntries",
    } <= methods


async def test_a_stream_message_that_is_not_protobuf_ends_the_stream_as_invalid_argument(
    grpc_node: GrpcNode,
) -> None:
    good = stream_message(0, 2).SerializeToString()
    call = grpc_node.channel.stream_stream(
        "/potboiler.v1.LogService/AppendEntryStream",
        request_serializer=lambda b: b,
        response_deserializer=log_pb2.AppendEntryStreamResponse.FromString,
    )

    async def requests() -> AsyncIterator[bytes]:
        yield good
        yield b"\x0a\x05ab\xed\xa0\x80"  # a string field that is not UTF-8

    stream = call(requests())
    acks = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for response in stream:
            acks.append(response)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in (raised.value.details() or "")
    assert [len(a.entries) for a in acks] == [2]  # what came before it stays appended
    assert (await grpc_node.heads())[grpc_node.node_id].seq == 2


async def test_a_resume_naming_the_entry_at_its_position_is_checked(grpc_node: GrpcNode) -> None:
    """A client resuming with the id of the last entry it got learns when this node's delivery
    order is not the one its position came from, instead of skipping or repeating entries."""
    first = await grpc_node.log.AppendEntry(request(0))
    second = await grpc_node.log.AppendEntry(request(1))
    resumed = grpc_node.log.SubscribeEntries(
        log_pb2.SubscribeEntriesRequest(after_position=1, after_id=first.id.upper())  # as GetEntry takes it
    )
    response = await resumed.read()
    assert isinstance(response, log_pb2.SubscribeEntriesResponse)
    assert [d.entry.id for d in response.entries] == [second.id]
    resumed.cancel()
    for after, entry_id, code, words in (
        (1, second.id, grpc.StatusCode.FAILED_PRECONDITION, f"the entry at position 1 here is {first.id}"),
        (0, first.id, grpc.StatusCode.INVALID_ARGUMENT, "position 0 has none"),
        (1, "not-an-id", grpc.StatusCode.INVALID_ARGUMENT, "after_id 'not-an-id' is not a UUID"),
    ):
        call = grpc_node.log.SubscribeEntries(
            log_pb2.SubscribeEntriesRequest(after_position=after, after_id=entry_id)
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == code and words in (info.value.details() or ""), info.value.details()
