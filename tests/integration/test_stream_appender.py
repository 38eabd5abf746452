"""potboiler.client.StreamAppender against an in-process node: concurrent appends share stream
messages yet each gets its own acknowledgement; an entry the node would refuse fails at once and alone;
a failed stream or a node that goes away fails what is in flight; close() waits for every acknowledgement."""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
from typing import Any

import grpc
import pytest
from google.protobuf.struct_pb2 import Value

from potboiler.client import appender as appender_module
from potboiler.client.appender import StreamAppender
from potboiler.server.entries import MAX_DEPTH, NewEntry
from potboiler.server.errors import InvalidArgument, TooLarge
from potboiler.server.jsonvalue import JSON
from potboiler.v1 import log_pb2
from tests.conftest import GrpcNode, GrpcNodeFactory


def nested(depth: int) -> JSON:
    out: JSON = []
    for _ in range(depth):
        out = [out]
    return out


async def stored_count(node: GrpcNode) -> int:
    heads = (await node.log.ListHeads(log_pb2.ListHeadsRequest())).heads
    return sum(h.seq for h in heads)


async def test_concurrent_appends_are_each_acknowledged_in_shared_messages(grpc_node: GrpcNode) -> None:
    batches_before = grpc_node.node.appender.batches
    async with StreamAppender(grpc_node.channel) as appender:
        acks = await asyncio.gather(*(appender.append({"n": n}) for n in range(300)))
    # In call order: one owner, consecutive seqs, and each ack names the entry holding its data.
    assert [a.seq for a in acks] == list(range(1, 301))
    for n in (0, 150, 299):
        entry = (await grpc_node.log.GetEntry(log_pb2.GetEntryRequest(id=acks[n].id))).entry
        assert entry.data.struct_value.fields["n"].number_value == n
    assert grpc_node.node.appender.batches - batches_before < 300  # messages were shared
    assert await stored_count(grpc_node) == 300


async def test_dependencies_and_values_pass_through(grpc_node: GrpcNode) -> None:
    async with StreamAppender(grpc_node.channel) as appender:
        first = await appender.append(Value(string_value="first"))
        second = await appender.append({"after": first.id}, [first.id])
    entry = (await grpc_node.log.GetEntry(log_pb2.GetEntryRequest(id=second.id))).entry
    assert list(entry.dependencies) == [first.id]


CYCLIC: list[Any] = []
CYCLIC.append(CYCLIC)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (nested(MAX_DEPTH + 1), InvalidArgument),
        ({"x": math.nan}, InvalidArgument),
        ("x" * (2 << 20), TooLarge),
        ({"pair": (1, 2)}, InvalidArgument),  # not JSON: never stored as null
        ([b"bytes"], InvalidArgument),
        ({1: "key"}, InvalidArgument),
        (2**53 + 1, InvalidArgument),  # refused as REST refuses it, not rounded
        (CYCLIC, InvalidArgument),  # a list that holds itself: refused, not walked for ever
    ],
    ids=["too deep", "NaN", "too large", "tuple", "bytes", "int key", "big integer", "cyclic"],
)
async def test_an_entry_the_node_would_refuse_fails_at_once_and_alone(
    grpc_node: GrpcNode, bad: JSON, error: type[Exception]
) -> None:
    async with StreamAppender(grpc_node.channel) as appender:
        results = await asyncio.gather(
            *(appender.append({"n": n} if n != 7 else bad) for n in range(20)), return_exceptions=True
        )
        assert isinstance(results[7], error), results
        good = [r for n, r in enumerate(results) if n != 7]
        assert sorted(r.seq for r in good if isinstance(r, log_pb2.AppendEntryResponse)) == list(range(1, 20))
        with pytest.raises(InvalidArgument):
            await appender.append({"n": 1}, ["not-a-uuid"])
        assert (await appender.append({"n": "after"})).seq == 20
    assert await stored_count(grpc_node) == 20


async def test_a_stream_that_fails_fails_every_append_in_flight(
    grpc_node: GrpcNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Here the node refuses a message the client let through (a client older than the node's rules
    would): the appends of that message and of every message after it fail with the stream's error,
    and the next append opens a new stream."""
    async with StreamAppender(grpc_node.channel) as appender:
        # No checks: the data as it is.
        monkeypatch.setattr(
            appender_module,
            "validate_new_entry",
            lambda data, dependencies: NewEntry(data.SerializeToString()),
        )
        results = await asyncio.gather(
            *(appender.append({"n": n} if n != 3 else Value()) for n in range(10)), return_exceptions=True
        )
        monkeypatch.undo()
        assert isinstance(results[3], grpc.aio.AioRpcError), results
        acked = [r for r in results if isinstance(r, log_pb2.AppendEntryResponse)]
        failed = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(acked) + len(failed) == 10
        assert (await appender.append({"n": "after"})).seq == len(acked) + 1
    assert await stored_count(grpc_node) == len(acked) + 1


async def test_a_node_that_goes_away_fails_what_is_in_flight(grpc_node_factory: GrpcNodeFactory) -> None:
    node = await grpc_node_factory("gone")
    async with grpc.aio.insecure_channel(node.target) as channel:
        appender = StreamAppender(channel)
        assert (await appender.append({"n": 0})).seq == 1
        await grpc_node_factory.stop(node)
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(appender.append({"n": 1}), 30)
        await appender.close()


async def test_close_waits_for_acknowledgements_then_refuses_appends(grpc_node: GrpcNode) -> None:
    appender = StreamAppender(grpc_node.channel)
    pending = [asyncio.ensure_future(appender.append({"n": n})) for n in range(50)]
    await pending[0]  # all 50 were queued before the first could be acknowledged
    await appender.close()
    assert all(p.done() and not p.exception() for p in pending)
    with pytest.raises(RuntimeError, match="closed"):
        await appender.append({"n": "late"})
    assert await stored_count(grpc_node) == 50


def hold_node_writes(
    grpc_node: GrpcNode, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the node hold its writes until `release` is set: `writing` is set once one waits. Appends
    are then surely in flight when a test cancels or closes a stream, however fast the node is."""
    appender = grpc_node.node.appender
    writing, release = asyncio.Event(), asyncio.Event()
    commit = appender._commit

    async def held_commit(jobs: Any) -> None:
        writing.set()
        await release.wait()
        await commit(jobs)

    monkeypatch.setattr(appender, "_commit", held_commit)
    return writing, release


async def test_a_closer_that_gives_up_leaves_the_stream_to_acknowledge_everything(
    grpc_node: GrpcNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() under a timeout (or any cancellation of its caller) does not cancel the stream: every
    append is still answered, as what the node made durable."""
    writing, release = hold_node_writes(grpc_node, monkeypatch)
    appender = StreamAppender(grpc_node.channel)
    pending = [asyncio.ensure_future(appender.append({"n": n})) for n in range(3000)]
    await asyncio.wait_for(writing.wait(), 20)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(appender.close(), 0.001)
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 30)
    assert all(isinstance(r, log_pb2.AppendEntryResponse) for r in results)
    assert await stored_count(grpc_node) == 3000


async def test_a_cancelled_stream_fails_every_append_in_flight(
    grpc_node: GrpcNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    writing, release = hold_node_writes(grpc_node, monkeypatch)
    appender = StreamAppender(grpc_node.channel)
    pending = [asyncio.ensure_future(appender.append({"n": n})) for n in range(3000)]
    await asyncio.wait_for(writing.wait(), 20)
    runner = appender._runner
    assert runner is not None
    runner.cancel()
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 30)
    failed = [r for r in results if isinstance(r, BaseException)]
    assert failed and all(isinstance(r, RuntimeError) and "cancelled" in str(r) for r in failed)


async def test_appends_on_a_closed_channel_fail_at_once(grpc_node_factory: GrpcNodeFactory) -> None:
    node = await grpc_node_factory("closed")
    channel = grpc.aio.insecure_channel(node.target)
    await channel.close()
    appender = StreamAppender(channel)
    for _ in range(2):  # and again: each append tries a new stream
        with pytest.raises(grpc.aio.UsageError):
            await asyncio.wait_for(appender.append({"n": 0}), 5)
    await appender.close()


async def test_appends_retried_as_a_cancelled_stream_fails_them_get_a_stream_of_their_own(
    grpc_node: GrpcNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller that appends again as soon as its append fails does so while the cancelled stream
    is still winding down: the new append opens a new stream instead of waiting for ever."""
    writing, release = hold_node_writes(grpc_node, monkeypatch)
    appender = StreamAppender(grpc_node.channel)
    failed_once: list[RuntimeError] = []

    async def append_with_one_retry(n: int) -> log_pb2.AppendEntryResponse:
        try:
            return await appender.append({"n": n})
        except RuntimeError as error:
            failed_once.append(error)
            return await appender.append({"n": n, "retry": True})

    pending = [asyncio.ensure_future(append_with_one_retry(n)) for n in range(3000)]
    await asyncio.wait_for(writing.wait(), 20)
    runner = appender._runner
    assert runner is not None
    runner.cancel()
    release.set()
    done, waiting = await asyncio.wait(pending, timeout=20)
    assert failed_once and not waiting
    assert all(isinstance(task.result(), log_pb2.AppendEntryResponse) for task in done)
    await appender.close()


async def test_a_cancelled_block_ends_without_waiting_for_acknowledgements(
    grpc_node: GrpcNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timeout around `async with StreamAppender` ends the block on time, on a node that holds its
    writes: the appends not acknowledged fail, as unary calls would (the timeout, once spent, could
    not cancel a wait for them in __aexit__)."""
    writing, release = hold_node_writes(grpc_node, monkeypatch)
    loop = asyncio.get_running_loop()
    started = loop.time()
    pending: list[asyncio.Future[log_pb2.AppendEntryResponse]] = []

    async def block() -> None:
        nonlocal pending
        async with asyncio.timeout(0.5), StreamAppender(grpc_node.channel) as appender:
            pending = [asyncio.ensure_future(appender.append({"n": n})) for n in range(10)]
            await writing.wait()
            await asyncio.gather(*pending)

    async def block_timing_out_inside() -> None:  # the block ends with the TimeoutError it caught
        async with StreamAppender(grpc_node.channel) as appender:
            await asyncio.wait_for(appender.append("late"), 0.5)

    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(block(), 10)  # (a second timeout, to end a block that hangs)
        assert loop.time() - started < 5
        started = loop.time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(block_timing_out_inside(), 10)
        assert loop.time() - started < 5
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert all(isinstance(r, BaseException) for r in results), results
    finally:
        release.set()


async def test_dependencies_may_be_any_iterable_of_ids_but_not_one_string(grpc_node: GrpcNode) -> None:
    async with StreamAppender(grpc_node.channel) as appender:
        first = await appender.append("first")
        second = await appender.append("second", dependencies=(i for i in [first.id]))
        with pytest.raises(TypeError, match="not one string"):
            await appender.append("third", dependencies=first.id)
    entry = (await grpc_node.log.GetEntry(log_pb2.GetEntryRequest(id=second.id))).entry
    assert list(entry.dependencies) == [first.id]


def test_the_client_needs_nothing_of_the_nodes_store() -> None:
    """It runs the node's checks of an entry, which live apart from the log's store (and RocksDB)."""
    code = (
        "import sys, potboiler.client.appender; "
        "print(sorted(m for m in sys.modules if m == 'rocksdict' or m.startswith('potboiler.server.log')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


async def test_close_after_an_abort_returns(grpc_node: GrpcNode) -> None:
    appender = StreamAppender(grpc_node.channel)
    pending = asyncio.ensure_future(appender.append("x"))
    await asyncio.sleep(0)
    await appender.abort()
    await appender.close()  # neither hangs nor raises the abort's cancellation
    await asyncio.gather(pending, return_exceptions=True)


async def test_a_channel_closed_under_the_appends_fails_them_and_close_returns(
    grpc_node: GrpcNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """grpc.aio ends the calls of a channel that is closed as if they were cancelled: the appends in
    flight fail saying so, and close() returns (it raised CancelledError in a task nobody had
    cancelled)."""
    writing, release = hold_node_writes(grpc_node, monkeypatch)
    channel = grpc.aio.insecure_channel(grpc_node.target)
    appender = StreamAppender(channel)
    pending = [asyncio.ensure_future(appender.append({"n": n})) for n in range(100)]
    await asyncio.wait_for(writing.wait(), 20)
    await channel.close()
    release.set()
    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 30)
    assert all(isinstance(r, RuntimeError) and "channel was closed" in str(r) for r in results), results
    await appender.close()


async def _out_of_step(request_iterator: Any, context: Any) -> Any:
    """An AppendEntryStream that acknowledges one entry too few of each message."""
    async for message in request_iterator:
        response = log_pb2.AppendEntryStreamResponse()
        for _ in message.entries[1:]:
            response.entries.add(id="0", seq=1)
        yield response


async def test_an_answer_out_of_step_with_what_was_sent_fails_every_append() -> None:
    """(The appends of the message answered short were waited on for ever.)"""
    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(
        _out_of_step,
        request_deserializer=log_pb2.AppendEntryStreamRequest.FromString,
        response_serializer=log_pb2.AppendEntryStreamResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("potboiler.v1.LogService", {"AppendEntryStream": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            appender = StreamAppender(channel)
            results = await asyncio.wait_for(
                asyncio.gather(*(appender.append(n) for n in range(4)), return_exceptions=True), 10
            )
            assert all(isinstance(r, RuntimeError) and "out of step" in str(r) for r in results), results
            await appender.close()
    finally:
        await server.stop(None)


class _ClosedUnderTheWriter:
    """A call whose channel closes as its first message is written: grpc.aio fails the write with
    InvalidStateError ("RPC already finished") and ends the pending read with CancelledError, in a
    task nobody cancelled. Which of the two the appender sees first is a race; here the writer's."""

    def __init__(self) -> None:
        self._read: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    async def read(self) -> Any:
        return await self._read

    async def write(self, request: Any) -> None:
        self._read.set_exception(asyncio.CancelledError())
        raise asyncio.InvalidStateError("RPC already finished.")

    async def done_writing(self) -> None:
        raise asyncio.InvalidStateError("RPC already finished.")

    def cancel(self) -> bool:
        return False


async def test_a_writer_that_finds_the_channel_closed_fails_the_appends_saying_so(
    grpc_node: GrpcNode,
) -> None:
    appender = StreamAppender(grpc_node.channel)
    appender._open = _ClosedUnderTheWriter  # type: ignore[assignment]
    results = await asyncio.gather(*(appender.append({"n": n}) for n in range(3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "channel was closed" in str(r) for r in results), results
    await appender.close()
