"""Pigtail over gRPC against in-process nodes (no Envoy): the typed PigtailService with its status codes,
the LeaseTasks and WorkTasks streams, the REST-shape service's metadata, restart, and two replicating nodes (a task
added on one is claimed on the other; claims made on both sides of a split resolve to one winner)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.api.httpbody_pb2 import HttpBody
from google.protobuf.struct_pb2 import Value

from potboiler.pigtail import worksession
from potboiler.pigtail.engine import Pigtail
from potboiler.pigtail.service import PigtailService, create
from potboiler.pigtail.validate import MAX_INFO_DEPTH
from potboiler.server.entries import MAX_DEPTH, NewEntry
from potboiler.server.jsonvalue import JSON, to_value
from potboiler.server.node import Node, NodeConfig
from potboiler.server.processes import find_base_port
from potboiler.v1 import pigtail_pb2 as pb
from potboiler.v1 import pigtail_pb2_grpc
from tests.conftest import wait_for

if TYPE_CHECKING:
    from potboiler.v1.pigtail_pb2_grpc import PigtailRestServiceAsyncStub, PigtailServiceAsyncStub


class PigtailNode:
    """An in-process node running Pigtail, with stubs on a channel to it."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.channel = grpc.aio.insecure_channel(f"{node.config.host}:{node.grpc_port}")
        self.api: PigtailServiceAsyncStub = pigtail_pb2_grpc.PigtailServiceStub(self.channel)
        self.rest: PigtailRestServiceAsyncStub = pigtail_pb2_grpc.PigtailRestServiceStub(self.channel)

    async def add(self, queue: str = "q", name: str = "job", **fields: Any) -> str:
        response = await self.api.AddTask(pb.AddTaskRequest(queue=queue, task_name=name, **fields))
        return response.task_id

    async def task(self, task_id: str, queue: str = "q") -> pb.Task:
        return (await self.api.GetTask(pb.GetTaskRequest(queue=queue, task_id=task_id))).task

    async def close(self) -> None:
        await self.channel.close()
        await self.node.stop()


Factory = Callable[..., Awaitable[PigtailNode]]


@pytest.fixture
async def pigtail_node(tmp_path: Path) -> AsyncIterator[Factory]:
    """Start in-process Pigtail nodes (`peers`: nodes to replicate with); all stopped at teardown."""
    started: list[PigtailNode] = []
    base = find_base_port(count=3)
    names: dict[str, int] = {}

    async def make(name: str = "n0", peers: tuple[PigtailNode, ...] = ()) -> PigtailNode:
        index = names.setdefault(name, len(names))
        config = NodeConfig(
            data_dir=tmp_path / name,
            base_port=base + 100 * index,
            peers=[p.node.config.url for p in peers],
            gateway=False,
            metrics=False,
            services=[("pigtail", create)],
        )
        node = Node(config)
        try:
            await node.start()
        except BaseException:
            await node.stop()
            raise
        handle = PigtailNode(node)
        started.append(handle)
        return handle

    try:
        yield make
    finally:
        for handle in reversed(started):
            if handle.node.server is not None:
                await handle.close()


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def body(value: Any) -> HttpBody:
    """A REST request body as Envoy passes it to the node: raw JSON text."""
    return HttpBody(content_type="application/json", data=json.dumps(value).encode())


def answer_json(answer: HttpBody) -> Any:
    """A REST answer's JSON (the node writes it as JSON text, which Envoy passes on as is)."""
    assert answer.content_type == "application/json"
    return json.loads(answer.data)


async def test_typed_api_flow_and_status_codes(pigtail_node: Factory) -> None:
    n = await pigtail_node()
    created = await n.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=60_000, max_attempts=3))
    assert created.created and created.queue.max_attempts == 3
    again = await n.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=60_000, max_attempts=3))
    assert not again.created
    error = await rpc_error(n.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=5)))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    error = await rpc_error(n.api.CreateQueue(pb.CreateQueueRequest(name="bad/name", timeout_ms=5)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "queue name" in (error.details() or "")
    error = await rpc_error(n.api.CreateQueue(pb.CreateQueueRequest(name="r", timeout_ms=-1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "timeout_ms" in (error.details() or "")

    info = Value()
    info.struct_value.update({"foo": "bar"})
    added = await n.api.AddTask(pb.AddTaskRequest(queue="q", task_name="hello_world", info=info, priority=2))
    assert added.created and added.task.state == pb.TASK_STATE_PENDING and not added.task.HasField("worker")
    task_id = added.task_id
    listed = await n.api.ListTasks(pb.ListTasksRequest(queue="q"))
    assert [(t.task_id, t.task_name, t.state) for t in listed.tasks] == [
        (task_id, "hello_world", pb.TASK_STATE_PENDING)
    ]
    claimed = await n.api.ClaimTask(pb.ClaimTaskRequest(queue="q", task_id=task_id, worker_id="w1"))
    assert claimed.task.state == pb.TASK_STATE_WORKING and claimed.task.worker == "w1"
    assert claimed.task.info.struct_value["foo"] == "bar" and claimed.task.attempts == 1
    error = await rpc_error(n.api.ClaimTask(pb.ClaimTaskRequest(queue="q", task_id=task_id, worker_id="w2")))
    assert error.code() == grpc.StatusCode.ABORTED and "w1" in (error.details() or "")
    beat = await n.api.HeartbeatTask(pb.HeartbeatTaskRequest(queue="q", task_id=task_id, worker_id="w1"))
    assert beat.task.lease_expires_ms >= claimed.task.lease_expires_ms
    error = await rpc_error(
        n.api.ReleaseTask(pb.ReleaseTaskRequest(queue="q", task_id=task_id, worker_id="w2"))
    )
    assert error.code() == grpc.StatusCode.ABORTED and "holds no unexpired lease" in (error.details() or "")
    released = await n.api.ReleaseTask(pb.ReleaseTaskRequest(queue="q", task_id=task_id, worker_id="w1"))
    assert released.task.state == pb.TASK_STATE_PENDING and released.task.worker == "w1"
    claimed = await n.api.ClaimTask(pb.ClaimTaskRequest(queue="q", task_id=task_id, worker_id="w1"))
    assert claimed.task.attempts == 2
    queue = await n.api.GetQueue(pb.GetQueueRequest(name="q"))
    assert (queue.pending, queue.working) == (0, 1)
    done = await n.api.CompleteTask(pb.CompleteTaskRequest(queue="q", task_id=task_id, worker_id="w1"))
    assert done.task.state == pb.TASK_STATE_DONE and done.task.done_by == "w1" and not done.already_done
    assert (await n.api.ListTasks(pb.ListTasksRequest(queue="q"))).tasks == []
    error = await rpc_error(n.api.GetTask(pb.GetTaskRequest(queue="q", task_id="nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await rpc_error(n.api.ListTasks(pb.ListTasksRequest(queue="nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await rpc_error(n.api.RetryTask(pb.RetryTaskRequest(queue="q", task_id=task_id)))
    assert error.code() == grpc.StatusCode.ABORTED
    await n.api.DeleteQueue(pb.DeleteQueueRequest(name="q"))
    assert (await n.api.ListQueues(pb.ListQueuesRequest())).queues == []
    error = await rpc_error(n.api.DeleteQueue(pb.DeleteQueueRequest(name="q")))
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_listings_come_in_pages_in_their_order(pigtail_node: Factory) -> None:
    n = await pigtail_node()
    await n.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=60_000, max_attempts=1))
    ids = [await n.add(priority=i % 3) for i in range(25)]
    whole = [t.task_id for t in (await n.api.ListTasks(pb.ListTasksRequest(queue="q"))).tasks]
    assert sorted(whole) == sorted(ids)

    async def pages(request: Any, call: Callable[[Any], Awaitable[Any]]) -> list[list[str]]:
        out = []
        while True:
            answer = await call(request)
            out.append([t.task_id for t in answer.tasks])
            if not answer.next_page_token:
                return out
            request.page_token = answer.next_page_token

    listed = await pages(pb.ListTasksRequest(queue="q", page_size=10), n.api.ListTasks)
    assert [len(p) for p in listed] == [10, 10, 5] and [t for p in listed for t in p] == whole
    # A page starts after the last task given, also when tasks went meanwhile.
    first = await n.api.ListTasks(pb.ListTasksRequest(queue="q", page_size=10))
    for task_id in whole[5:12]:
        await n.api.CompleteTask(pb.CompleteTaskRequest(queue="q", task_id=task_id, worker_id="w"))
    rest = await n.api.ListTasks(pb.ListTasksRequest(queue="q", page_token=first.next_page_token))
    assert [t.task_id for t in rest.tasks] == whole[12:]

    # Dead-lettered tasks, by id: one attempt each, whose lease of 1 ms ends at once.
    await n.api.CreateQueue(pb.CreateQueueRequest(name="d", timeout_ms=1, max_attempts=1))
    dead = [await n.add("d") for _ in range(5)]
    for task_id in dead:
        await n.api.ClaimTask(pb.ClaimTaskRequest(queue="d", task_id=task_id, worker_id="w"))

    async def all_dead() -> bool:
        return len((await n.api.ListDeadTasks(pb.ListDeadTasksRequest(queue="d"))).tasks) == 5

    await wait_for(all_dead)
    listed = await pages(pb.ListDeadTasksRequest(queue="d", page_size=2), n.api.ListDeadTasks)
    assert listed == [sorted(dead)[:2], sorted(dead)[2:4], sorted(dead)[4:]]

    error = await rpc_error(  # a token of the other listing
        n.api.ListDeadTasks(pb.ListDeadTasksRequest(queue="d", page_token=first.next_page_token))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in (error.details() or "")
    error = await rpc_error(n.api.ListTasks(pb.ListTasksRequest(queue="q", page_token="not a token")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_rest_service_sends_created_and_location(pigtail_node: Factory) -> None:
    n = await pigtail_node()
    call = n.rest.RestCreateQueue(
        pb.RestCreateQueueRequest(body=body({"name": "example", "timeout_ms": 1000}))
    )
    answer = await call
    metadata = dict(list(await call.trailing_metadata()))
    assert metadata["x-http-code"] == "201" and metadata["location"] == "/queue/example"
    assert answer_json(answer) == {"name": "example", "timeout_ms": 1000, "max_attempts": None}
    # Again with the same settings: the same answer (creating is idempotent), and no other queue.
    again = n.rest.RestCreateQueue(
        pb.RestCreateQueueRequest(body=body({"name": "example", "timeout_ms": 1000}))
    )
    assert answer_json(await again) == answer_json(answer)
    assert dict(list(await again.trailing_metadata())) == metadata
    added = {"task_name": "hello_world", "info": {"foo": "bar"}}
    call2 = n.rest.RestAddTask(pb.RestAddTaskRequest(queue="example", body=body(added)))
    task_id = answer_json(await call2)["id"]
    metadata = dict(list(await call2.trailing_metadata()))
    assert metadata["location"] == f"/queue/example/{task_id}"
    assert isinstance(task_id, str)
    view = await n.rest.RestGetTask(pb.RestGetTaskRequest(queue="example", task_id=task_id))
    assert answer_json(view) == {
        "task_name": "hello_world",
        "state": "pending",
        "info": {"foo": "bar"},
        "worker": None,
    }
    listing = await n.rest.RestListTasks(pb.RestListTasksRequest(queue="example"))
    assert listing.content_type == "application/json"
    assert json.loads(listing.data) == {task_id: {"task_name": "hello_world", "state": "pending"}}
    claim = pb.RestClaimNextTaskRequest(queue="example", body=body({"worker_id": "w"}))
    claimed = answer_json(await n.rest.RestClaimNextTask(claim))
    assert claimed["id"] == task_id and claimed["worker"] == "w"
    none = n.rest.RestClaimNextTask(claim)
    assert (await none).data == b""
    assert dict(list(await none.trailing_metadata()))["x-http-code"] == "204"


async def test_rest_bodies_are_read_strictly_and_bad_ones_append_nothing(pigtail_node: Factory) -> None:
    n = await pigtail_node()
    await n.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=60_000))
    task_id = await n.add()
    position = n.node.log.position
    bad: list[Awaitable[Any]] = [
        n.rest.RestCreateQueue(pb.RestCreateQueueRequest(body=body({"name": "r", "timeout": 5}))),
        n.rest.RestCreateQueue(pb.RestCreateQueueRequest(body=body({"name": "r", "timeout_ms": 1.5}))),
        n.rest.RestAddTask(pb.RestAddTaskRequest(queue="q", body=HttpBody(data=b"{'task_name': 'x'}"))),
        n.rest.RestAddTask(pb.RestAddTaskRequest(queue="q", body=HttpBody(data=b'{"task_name": NaN}'))),
        n.rest.RestAddTask(pb.RestAddTaskRequest(queue="q", body=body({"task_name": "x", "priority": True}))),
        n.rest.RestAddTask(pb.RestAddTaskRequest(queue="q", body=body(["task_name"]))),
        n.rest.RestAddTask(pb.RestAddTaskRequest(queue="q", body=HttpBody())),
        n.rest.RestClaimTask(
            pb.RestClaimTaskRequest(queue="q", task_id=task_id, body=body({"worker_id": 7}))
        ),
        n.rest.RestClaimTask(pb.RestClaimTaskRequest(queue="q", task_id=task_id, body=body({"worker": "w"}))),
        n.rest.RestClaimTask(pb.RestClaimTaskRequest(queue="q", task_id=task_id, body=HttpBody())),
        n.rest.RestCompleteTask(pb.RestCompleteTaskRequest(queue="q", task_id=task_id, body=body({"x": 1}))),
        n.rest.RestHeartbeatTask(pb.RestHeartbeatTaskRequest(queue="q", task_id=task_id, body=body(None))),
        n.rest.RestReleaseTask(
            pb.RestReleaseTaskRequest(queue="q", task_id=task_id, body=body({"worker": "w"}))
        ),
        n.rest.RestRetryTask(pb.RestRetryTaskRequest(queue="q", task_id=task_id, body=body({"x": 1}))),
        n.rest.RestClaimNextTask(pb.RestClaimNextTaskRequest(queue="q", body=body({"wait_ms": "soon"}))),
        # int() itself refuses a decimal string of more than 4,300 digits
        n.rest.RestCreateQueue(pb.RestCreateQueueRequest(body=body({"name": "r", "timeout_ms": "1" * 5000}))),
    ]
    for call in bad:
        assert (await rpc_error(call)).code() == grpc.StatusCode.INVALID_ARGUMENT
    deep: Any = "x"
    for _ in range(MAX_DEPTH):
        deep = [deep]
    error = await rpc_error(
        n.rest.RestAddTask(pb.RestAddTaskRequest(queue="q", body=body({"task_name": "x", "info": deep})))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == f"info nests arrays and objects deeper than {MAX_INFO_DEPTH} levels"
    assert n.node.log.position == position


async def test_events_appended_by_hand_past_the_limits_are_ignored(pigtail_node: Factory) -> None:
    """Anyone may append a Pigtail-shaped event with POST /log: one whose numbers are past the API's
    limits (here, past the typed answers' int32 fields) is ignored like any other broken event, and
    the queue's typed API goes on answering."""
    n = await pigtail_node()
    await n.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=60_000))
    forged: list[JSON] = [
        {
            "kind": "task_added",
            "queue": "q",
            "task_id": "poison",
            "task_name": "x",
            "priority": 3_000_000_000,
        },
        {"kind": "queue_created", "name": "other", "timeout_ms": 1000, "max_attempts": 3_000_000_000},
    ]
    await n.node.appender.append(
        [NewEntry(to_value({"pigtail": event}).SerializeToString()) for event in forged]
    )
    task_id = await n.add()  # appended after the forged events: once it is listed, they were read

    async def listed() -> bool:
        return task_id in [t.task_id for t in (await n.api.ListTasks(pb.ListTasksRequest(queue="q"))).tasks]

    await wait_for(listed, 10)
    assert (await rpc_error(n.api.GetTask(pb.GetTaskRequest(queue="q", task_id="poison")))).code() == (
        grpc.StatusCode.NOT_FOUND
    )
    assert [q.name for q in (await n.api.ListQueues(pb.ListQueuesRequest())).queues] == ["q"]
    claimed = await n.api.ClaimNextTask(pb.ClaimNextTaskRequest(queue="q", worker_id="w"))
    assert claimed.task.task_id == task_id


async def test_rest_bodies_read_like_the_protobuf_json_mapping(pigtail_node: Factory) -> None:
    n = await pigtail_node()
    created = await n.rest.RestCreateQueue(
        pb.RestCreateQueueRequest(body=body({"name": "q", "timeout_ms": "60000", "max_attempts": 3.0}))
    )
    assert answer_json(created) == {"name": "q", "timeout_ms": 60_000, "max_attempts": 3}
    # Null is absent, and the path's own members are ignored: the path names the queue and task.
    added = {"task_name": "x", "info": None, "priority": 1e2, "delay_ms": None, "queue": "elsewhere"}
    task_id = answer_json(await n.rest.RestAddTask(pb.RestAddTaskRequest(queue="q", body=body(added))))["id"]
    assert isinstance(task_id, str)
    task = (await n.api.GetTask(pb.GetTaskRequest(queue="q", task_id=task_id))).task
    assert task.priority == 100 and task.state == pb.TASK_STATE_PENDING
    claim = body({"worker_id": "w", "queue": "elsewhere", "task_id": "other"})
    claimed = await n.rest.RestClaimTask(pb.RestClaimTaskRequest(queue="q", task_id=task_id, body=claim))
    assert answer_json(claimed)["worker"] == "w"
    done = await n.rest.RestCompleteTask(pb.RestCompleteTaskRequest(queue="q", task_id=task_id))
    assert answer_json(done)["state"] == "done"  # DELETE may come without a body


async def test_lease_streams_hand_each_task_to_one_worker(pigtail_node: Factory) -> None:
    n = await pigtail_node()
    await n.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=60_000))
    got: dict[str, list[str]] = {"a": [], "b": []}

    async def worker(name: str) -> None:
        stream = n.api.LeaseTasks(pb.LeaseTasksRequest(queue="q", worker_id=name))
        async for message in stream:
            task = message.task
            assert task.worker == name and task.state == pb.TASK_STATE_WORKING
            got[name].append(task.task_id)
            await n.api.CompleteTask(pb.CompleteTaskRequest(queue="q", task_id=task.task_id, worker_id=name))

    workers = [asyncio.create_task(worker(name)) for name in got]
    try:
        ids = [await n.add() for _ in range(30)]
        await wait_for(lambda: len(got["a"]) + len(got["b"]) == 30, message=lambda: repr(got))
        assert sorted(got["a"] + got["b"]) == sorted(ids)
        # Streams wait without polling and hand out new tasks as soon as they are added.
        late = await n.add()
        await wait_for(lambda: late in got["a"] + got["b"])
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    for task_id in ids:
        assert (await n.task(task_id)).state == pb.TASK_STATE_DONE


async def test_lease_stream_errors(pigtail_node: Factory) -> None:
    n = await pigtail_node()
    stream = n.api.LeaseTasks(pb.LeaseTasksRequest(queue="nope", worker_id="w"))
    error = await rpc_error(stream.read())
    assert error.code() == grpc.StatusCode.NOT_FOUND
    await n.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=1000))
    stream = n.api.LeaseTasks(pb.LeaseTasksRequest(queue="q", worker_id=""))
    error = await rpc_error(stream.read())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Deleted while streaming: the stream is known to be up once it has handed out a task.
    await n.add()
    stream = n.api.LeaseTasks(pb.LeaseTasksRequest(queue="q", worker_id="w"))
    assert isinstance(await stream.read(), pb.LeaseTasksResponse)
    await n.api.DeleteQueue(pb.DeleteQueueRequest(name="q"))
    error = await rpc_error(stream.read())
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def read_to_end(stream: Any) -> list[pb.WorkTasksResponse]:
    """Every message a stream still sends, until it ends."""
    out = []
    while (message := await stream.read()) is not grpc.aio.EOF:
        out.append(message)
    return out


def start(queue: str = "q", worker_id: str = "w", max_in_flight: int = 1) -> pb.WorkTasksRequest:
    return pb.WorkTasksRequest(
        start=pb.LeaseTasksRequest(queue=queue, worker_id=worker_id, max_in_flight=max_in_flight)
    )


async def test_work_streams_hand_out_tasks_and_take_completes_on_the_same_stream(
    pigtail_node: Factory,
) -> None:
    n = await pigtail_node()
    await n.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=60_000))
    got: dict[str, list[str]] = {"a": [], "b": []}
    completed: list[str] = []

    async def worker(name: str) -> None:
        stream = n.api.WorkTasks()
        await stream.write(start(worker_id=name, max_in_flight=2))
        async for message in stream:
            kind = message.WhichOneof("response")
            if kind == "task":
                assert message.task.worker == name and message.task.state == pb.TASK_STATE_WORKING
                got[name].append(message.task.task_id)
                await stream.write(pb.WorkTasksRequest(complete_task_id=message.task.task_id))
            else:
                assert kind == "completed", message
                assert message.completed.task.state == pb.TASK_STATE_DONE
                assert not message.completed.already_done
                completed.append(message.completed.task.task_id)

    workers = [asyncio.create_task(worker(name)) for name in got]
    try:
        ids = [await n.add() for _ in range(30)]
        await wait_for(lambda: len(completed) == 30, message=lambda: repr(got))
        assert sorted(got["a"] + got["b"]) == sorted(completed) == sorted(ids)
        late = await n.add()
        await wait_for(lambda: late in completed)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    for task_id in [*ids, late]:
        assert (await n.task(task_id)).state == pb.TASK_STATE_DONE


async def test_work_stream_answers_each_request_and_failures_do_not_end_it(pigtail_node: Factory) -> None:
    n = await pigtail_node()
    await n.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=60_000))
    task_id = await n.add()
    stream = n.api.WorkTasks()
    await stream.write(start())
    leased = await stream.read()
    assert isinstance(leased, pb.WorkTasksResponse) and leased.task.task_id == task_id
    expires = leased.task.lease_expires_ms
    await stream.write(pb.WorkTasksRequest(heartbeat_task_id=task_id))
    beat = await stream.read()
    assert isinstance(beat, pb.WorkTasksResponse) and beat.WhichOneof("response") == "heartbeat"
    assert beat.heartbeat.task.lease_expires_ms >= expires
    unknown = "0190c2d4-0000-7000-8000-000000000000"
    await stream.write(pb.WorkTasksRequest(complete_task_id=unknown))
    failed = await stream.read()
    assert isinstance(failed, pb.WorkTasksResponse) and failed.WhichOneof("response") == "failure"
    assert failed.failure.task_id == unknown
    assert failed.failure.operation == pb.WORK_TASKS_OPERATION_COMPLETE
    assert (
        failed.failure.code == grpc.StatusCode.NOT_FOUND.value[0] and "no such task" in failed.failure.message
    )
    await stream.write(pb.WorkTasksRequest(complete_task_id=task_id))
    done = await stream.read()
    assert isinstance(done, pb.WorkTasksResponse) and done.completed.task.state == pb.TASK_STATE_DONE
    assert not done.completed.already_done
    await stream.write(pb.WorkTasksRequest(complete_task_id=task_id))
    await stream.write(pb.WorkTasksRequest(heartbeat_task_id=task_id))
    await stream.done_writing()
    # Closing our side: every request is still answered, then the stream ends (OK), with no more tasks.
    answers = await read_to_end(stream)
    assert sorted(str(a.WhichOneof("response")) for a in answers) == ["completed", "failure"], answers
    assert [a.completed.already_done for a in answers if a.HasField("completed")] == [True]
    [refused] = [a.failure for a in answers if a.HasField("failure")]
    assert refused.operation == pb.WORK_TASKS_OPERATION_HEARTBEAT
    assert refused.code == grpc.StatusCode.ABORTED.value[0]
    assert await stream.code() == grpc.StatusCode.OK
    assert (await n.task(task_id)).state == pb.TASK_STATE_DONE


async def test_a_worker_that_reads_no_answers_makes_the_node_keep_only_so_many(
    pigtail_node: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each complete holds a slot until its answer is sent: once MAX_OUTSTANDING wait unsent, the
    node reads no more of the stream (gRPC's flow control then holds the worker back)."""
    monkeypatch.setattr(worksession, "MAX_OUTSTANDING", 4)
    n = await pigtail_node()
    await n.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=60_000))
    call = n.api.WorkTasks()
    await call.write(start())
    # Answered at once (not a task id), and big, so that the stream's flow-control window fills soon.
    bad = pb.WorkTasksRequest(complete_task_id="x" * 30_000)
    with contextlib.suppress(TimeoutError):
        for _ in range(5_000):  # until the node stops taking them in
            await asyncio.wait_for(asyncio.shield(call.write(bad)), 0.5)
    sessions = [o for o in gc.get_objects() if type(o) is worksession._Session]
    assert sessions and all(s.out.qsize() <= 4 for s in sessions)
    call.cancel()


async def test_work_stream_errors(pigtail_node: Factory) -> None:
    n = await pigtail_node()
    stream = n.api.WorkTasks()
    await stream.write(start(queue="nope"))
    assert (await rpc_error(stream.read())).code() == grpc.StatusCode.NOT_FOUND
    await n.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=1000))
    for first in (pb.WorkTasksRequest(complete_task_id="x"), pb.WorkTasksRequest(), start(worker_id="")):
        stream = n.api.WorkTasks()
        await stream.write(first)
        assert (await rpc_error(stream.read())).code() == grpc.StatusCode.INVALID_ARGUMENT, first
    stream = n.api.WorkTasks()
    await stream.write(start())
    await stream.write(start())  # only the first message may start
    assert (await rpc_error(stream.read())).code() == grpc.StatusCode.INVALID_ARGUMENT
    raw = n.channel.stream_stream(
        "/potboiler.v1.PigtailService/WorkTasks",
        request_serializer=lambda b: b,
        response_deserializer=pb.WorkTasksResponse.FromString,
    )
    raw_stream = raw(iter([start().SerializeToString(), b"\x12\x02\xff\xfe"]))  # not UTF-8
    assert (await rpc_error(raw_stream.read())).code() == grpc.StatusCode.INVALID_ARGUMENT
    # Deleted while streaming: the stream is known to be up once it has handed out a task.
    await n.add()
    stream = n.api.WorkTasks()
    await stream.write(start())
    leased = await stream.read()
    assert isinstance(leased, pb.WorkTasksResponse) and leased.WhichOneof("response") == "task"
    await n.api.DeleteQueue(pb.DeleteQueueRequest(name="q"))
    assert (await rpc_error(stream.read())).code() == grpc.StatusCode.NOT_FOUND
    # A stream closed before it starts ends at once.
    stream = n.api.WorkTasks()
    await stream.done_writing()
    assert await read_to_end(stream) == [] and await stream.code() == grpc.StatusCode.OK


async def test_an_unfinished_lease_is_handed_out_again_after_its_timeout(pigtail_node: Factory) -> None:
    n = await pigtail_node()
    await n.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=200))
    task_id = await n.add()
    stream = n.api.LeaseTasks(pb.LeaseTasksRequest(queue="q", worker_id="slow"))
    first = await stream.read()
    assert isinstance(first, pb.LeaseTasksResponse) and first.task.attempts == 1
    second = await asyncio.wait_for(stream.read(), 10)  # the lease ran out: the task comes again
    assert isinstance(second, pb.LeaseTasksResponse)
    assert second.task.task_id == task_id and second.task.attempts == 2
    stream.cancel()


async def test_a_claim_answers_working_though_its_lease_ends_before_the_answer(pigtail_node: Factory) -> None:
    """On a queue with a 1 ms timeout, a claim's lease has ended by the time it is applied: the claim
    still answers the task as it left it (working, with its worker); a read after that, pending."""
    n = await pigtail_node()
    await n.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=1))
    rest_id, grpc_id = await n.add(), await n.add()
    claim = pb.RestClaimTaskRequest(queue="q", task_id=rest_id, body=body({"worker_id": "w"}))
    answer = answer_json(await n.rest.RestClaimTask(claim))
    assert answer == {"task_name": "job", "state": "working", "info": None, "worker": "w"}
    claimed = await n.api.ClaimTask(pb.ClaimTaskRequest(queue="q", task_id=grpc_id, worker_id="w"))
    assert (claimed.task.state, claimed.task.worker) == (pb.TASK_STATE_WORKING, "w")
    await asyncio.sleep(0.01)
    view = answer_json(await n.rest.RestGetTask(pb.RestGetTaskRequest(queue="q", task_id=rest_id)))
    assert (view["state"], view["worker"]) == ("pending", "w")
    later = await n.task(grpc_id)
    assert (later.state, later.lease_expires_ms) == (pb.TASK_STATE_PENDING, claimed.task.lease_expires_ms)


async def test_state_survives_a_restart(pigtail_node: Factory, tmp_path: Path) -> None:
    n = await pigtail_node("a")
    await n.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=60_000))
    kept, done = await n.add(), await n.add()
    await n.api.ClaimTask(pb.ClaimTaskRequest(queue="q", task_id=kept, worker_id="w"))
    await n.api.CompleteTask(pb.CompleteTaskRequest(queue="q", task_id=done))
    await n.close()
    n = await pigtail_node("a")
    assert (await n.task(kept)).worker == "w"
    assert (await n.task(done)).state == pb.TASK_STATE_DONE
    listed = await n.api.ListTasks(pb.ListTasksRequest(queue="q"))
    assert [t.task_id for t in listed.tasks] == [kept]


async def test_a_failure_placing_the_open_tasks_at_start_leaves_pigtail_applying(
    pigtail_node: Factory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """(A bug there used to end the applier for good: every write then waited and failed.)"""

    async def broken(self: Pigtail) -> None:
        raise RuntimeError("placing broke")

    monkeypatch.setattr(Pigtail, "_place_open", broken)
    n = await pigtail_node("a")
    await n.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=60_000))
    task_id = await n.add()
    claimed = await n.api.ClaimTask(pb.ClaimTaskRequest(queue="q", task_id=task_id, worker_id="w"))
    assert claimed.task.worker == "w"
    assert "placing the open tasks in the scheduler failed" in caplog.text


async def test_releases_under_way_as_the_node_stops_are_finished(pigtail_node: Factory) -> None:
    """A lease stream cut by the node's stop releases the tasks it had claimed and not sent, one after
    the other: the stop waits for that (it used to cancel it, leaving the later ones held until
    their lease ended)."""
    n = await pigtail_node("a")
    await n.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=60_000))
    task_ids = [await n.add() for _ in range(3)]
    for task_id in task_ids:
        await n.api.ClaimTask(pb.ClaimTaskRequest(queue="q", task_id=task_id, worker_id="w"))
    service = n.node.services["pigtail"]
    assert isinstance(service, PigtailService)
    pigtail = service.pigtail
    pigtail.release_later("q", "w", task_ids)
    await pigtail.stop()  # as the node's stop does, right after its server cut the stream
    await n.close()
    n = await pigtail_node("a")
    assert [(await n.task(task_id)).state for task_id in task_ids] == [pb.TASK_STATE_PENDING] * 3


async def test_two_nodes_share_tasks_and_agree_on_one_winner(pigtail_node: Factory) -> None:
    a = await pigtail_node("a")
    b = await pigtail_node("b", peers=(a,))
    await a.api.CreateQueue(pb.CreateQueueRequest(name="q", timeout_ms=60_000))
    task_id = await a.add()

    await wait_for(lambda: _pending(b, task_id))
    claimed = await b.api.ClaimTask(pb.ClaimTaskRequest(queue="q", task_id=task_id, worker_id="wb"))
    assert claimed.task.worker == "wb"

    async def worker_on_a(task: str, worker: str) -> bool:
        return (await a.task(task)).worker == worker

    await wait_for(lambda: worker_on_a(task_id, "wb"))

    # Split the nodes, claim the same task on both sides, heal: both agree on the lower stamp.
    second = await a.add()
    await wait_for(lambda: _pending(b, second))
    a.node.membership.remove(b.node.config.url)
    await wait_for(lambda: not b.node.membership.urls() and not a.node.membership.urls())
    on_a = await a.api.ClaimTask(pb.ClaimTaskRequest(queue="q", task_id=second, worker_id="wa"))
    on_b = await b.api.ClaimTask(pb.ClaimTaskRequest(queue="q", task_id=second, worker_id="wb"))
    assert on_a.task.worker == "wa" and on_b.task.worker == "wb"  # each side granted its own claim
    a.node.membership.add(b.node.config.url)

    async def agreed() -> bool:
        on_a, on_b = await a.task(second), await b.task(second)
        return on_a.worker == on_b.worker and on_a.attempts == on_b.attempts == 1

    await wait_for(agreed)
    winner = (await a.task(second)).worker
    # The claim with the lower stamp wins (a lease runs timeout_ms from its claim's stamp).
    if on_a.task.lease_expires_ms != on_b.task.lease_expires_ms:
        first = on_a if on_a.task.lease_expires_ms < on_b.task.lease_expires_ms else on_b
        assert winner == first.task.worker
    loser = "wb" if winner == "wa" else "wa"
    error = await rpc_error(
        b.api.HeartbeatTask(pb.HeartbeatTaskRequest(queue="q", task_id=second, worker_id=loser))
    )
    assert error.code() == grpc.StatusCode.ABORTED


async def _pending(node: PigtailNode, task_id: str) -> bool:
    try:
        return (await node.task(task_id)).state == pb.TASK_STATE_PENDING
    except grpc.aio.AioRpcError:
        return False
