"""The gRPC servicers of Pigtail, thin: read the request, call :class:`~potboiler.pigtail.engine.Pigtail`,
shape the answer; domain errors become gRPC statuses through the one table in
:mod:`potboiler.server.grpc_errors` (Contended: ABORTED, which Envoy answers as 409)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.api.httpbody_pb2 import HttpBody

from potboiler.pigtail import restbody, views
from potboiler.pigtail.engine import Pigtail
from potboiler.pigtail.machine import TaskView
from potboiler.pigtail.worksession import work_session
from potboiler.server import rest
from potboiler.server.grpc_context import Ctx
from potboiler.server.grpc_errors import streaming, unary
from potboiler.server.jsonvalue import from_value
from potboiler.v1 import pigtail_pb2, pigtail_pb2_grpc


async def _give_back_if_out_of_time(
    pigtail: Pigtail, context: Ctx, queue: str, worker_id: str, view: TaskView
) -> None:
    """End a claim-next call whose deadline passed while its claim was made (the caller has given up:
    grpc does not cancel the call at its deadline) with DEADLINE_EXCEEDED, giving the task back
    rather than leaving it claimed by a worker that never gets it."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        pigtail.release_later(queue, worker_id, [view["task_id"]])
        await context.abort(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            "the call's deadline passed as a task was claimed; it was given back",
        )


class PigtailServicer(pigtail_pb2_grpc.PigtailServiceServicer):
    """The typed PigtailService."""

    def __init__(self, pigtail: Pigtail) -> None:
        self._p = pigtail

    @unary
    async def CreateQueue(
        self, request: pigtail_pb2.CreateQueueRequest, context: Ctx
    ) -> pigtail_pb2.CreateQueueResponse:
        max_attempts = request.max_attempts if request.HasField("max_attempts") else None
        config, created = await self._p.create_queue(request.name, request.timeout_ms, max_attempts)
        return pigtail_pb2.CreateQueueResponse(
            queue=views.queue_message(request.name, config), created=created
        )

    @unary
    async def DeleteQueue(
        self, request: pigtail_pb2.DeleteQueueRequest, context: Ctx
    ) -> pigtail_pb2.DeleteQueueResponse:
        await self._p.delete_queue(request.name)
        return pigtail_pb2.DeleteQueueResponse()

    @unary
    async def GetQueue(
        self, request: pigtail_pb2.GetQueueRequest, context: Ctx
    ) -> pigtail_pb2.GetQueueResponse:
        info = await self._p.get_queue(request.name)
        return pigtail_pb2.GetQueueResponse(
            queue=views.queue_message(info.name, info.config),
            pending=info.pending,
            working=info.working,
            delayed=info.delayed,
            dead=info.dead,
        )

    @unary
    async def ListQueues(
        self, request: pigtail_pb2.ListQueuesRequest, context: Ctx
    ) -> pigtail_pb2.ListQueuesResponse:
        queues = [views.queue_message(name, config) for name, config in await self._p.list_queues()]
        return pigtail_pb2.ListQueuesResponse(queues=queues)

    @unary
    async def AddTask(self, request: pigtail_pb2.AddTaskRequest, context: Ctx) -> pigtail_pb2.AddTaskResponse:
        view, created = await self._p.add_task(**_add_arguments(request))
        return pigtail_pb2.AddTaskResponse(
            task_id=view["task_id"], created=created, task=views.task_message(view)
        )

    @unary
    async def GetTask(self, request: pigtail_pb2.GetTaskRequest, context: Ctx) -> pigtail_pb2.GetTaskResponse:
        return pigtail_pb2.GetTaskResponse(
            task=views.task_message(await self._p.get_task(request.queue, request.task_id))
        )

    @unary
    async def ListTasks(
        self, request: pigtail_pb2.ListTasksRequest, context: Ctx
    ) -> pigtail_pb2.ListTasksResponse:
        entries, token = await self._p.list_tasks_page(request.queue, request.page_size, request.page_token)
        return pigtail_pb2.ListTasksResponse(
            tasks=[views.summary_message(i, e) for i, e in entries], next_page_token=token
        )

    @unary
    async def ClaimTask(
        self, request: pigtail_pb2.ClaimTaskRequest, context: Ctx
    ) -> pigtail_pb2.ClaimTaskResponse:
        view, renewal = await self._p.claim(request.queue, request.task_id, request.worker_id)
        return pigtail_pb2.ClaimTaskResponse(task=views.task_message(view), renewal=renewal)

    @unary
    async def ClaimNextTask(
        self, request: pigtail_pb2.ClaimNextTaskRequest, context: Ctx
    ) -> pigtail_pb2.ClaimNextTaskResponse:
        view = await self._p.claim_next(request.queue, request.worker_id, request.wait_ms)
        if view is None:
            return pigtail_pb2.ClaimNextTaskResponse()
        await _give_back_if_out_of_time(self._p, context, request.queue, request.worker_id, view)
        return pigtail_pb2.ClaimNextTaskResponse(task=views.task_message(view))

    @unary
    async def HeartbeatTask(
        self, request: pigtail_pb2.HeartbeatTaskRequest, context: Ctx
    ) -> pigtail_pb2.HeartbeatTaskResponse:
        view = await self._p.heartbeat(request.queue, request.task_id, request.worker_id)
        return pigtail_pb2.HeartbeatTaskResponse(task=views.task_message(view))

    @unary
    async def ReleaseTask(
        self, request: pigtail_pb2.ReleaseTaskRequest, context: Ctx
    ) -> pigtail_pb2.ReleaseTaskResponse:
        view = await self._p.release(request.queue, request.task_id, request.worker_id)
        return pigtail_pb2.ReleaseTaskResponse(task=views.task_message(view))

    @unary
    async def CompleteTask(
        self, request: pigtail_pb2.CompleteTaskRequest, context: Ctx
    ) -> pigtail_pb2.CompleteTaskResponse:
        view, already = await self._p.complete(request.queue, request.task_id, request.worker_id)
        return pigtail_pb2.CompleteTaskResponse(task=views.task_message(view), already_done=already)

    @unary
    async def ListDeadTasks(
        self, request: pigtail_pb2.ListDeadTasksRequest, context: Ctx
    ) -> pigtail_pb2.ListDeadTasksResponse:
        entries, token = await self._p.list_dead_page(request.queue, request.page_size, request.page_token)
        return pigtail_pb2.ListDeadTasksResponse(
            tasks=[views.summary_message(i, e) for i, e in entries], next_page_token=token
        )

    @unary
    async def RetryTask(
        self, request: pigtail_pb2.RetryTaskRequest, context: Ctx
    ) -> pigtail_pb2.RetryTaskResponse:
        view = await self._p.retry(request.queue, request.task_id)
        return pigtail_pb2.RetryTaskResponse(task=views.task_message(view))

    @streaming
    async def LeaseTasks(
        self, request: pigtail_pb2.LeaseTasksRequest, context: Ctx
    ) -> AsyncIterator[pigtail_pb2.LeaseTasksResponse]:
        leases = self._p.lease(request.queue, request.worker_id, request.max_in_flight)
        sending = ""
        try:
            async for view in leases:
                sending = view["task_id"]
                yield pigtail_pb2.LeaseTasksResponse(task=views.task_message(view))
                sending = ""
        finally:
            if sending:  # the stream ended at this task's message (grpc took no more): never sent
                self._p.release_later(request.queue, request.worker_id, [sending])
            await leases.aclose()

    @streaming
    def WorkTasks(
        self, request_iterator: AsyncIterator[pigtail_pb2.WorkTasksRequest], context: Ctx
    ) -> AsyncIterator[pigtail_pb2.WorkTasksResponse]:
        return work_session(self._p, request_iterator)


def _add_arguments(request: pigtail_pb2.AddTaskRequest) -> dict[str, Any]:
    """The keyword arguments of Pigtail.add_task from an add request."""
    return {
        "queue": request.queue,
        "task_name": request.task_name,
        "info": from_value(request.info) if request.HasField("info") else None,
        "not_before_ms": request.not_before_ms if request.HasField("not_before_ms") else None,
        "delay_ms": request.delay_ms if request.HasField("delay_ms") else None,
        "priority": request.priority,
        "idempotency_key": request.idempotency_key if request.HasField("idempotency_key") else None,
    }


class PigtailRestServicer(pigtail_pb2_grpc.PigtailRestServiceServicer):
    """The contract's REST paths (port B+3) over the same domain code."""

    def __init__(self, pigtail: Pigtail) -> None:
        self._p = pigtail

    @unary
    async def RestCreateQueue(self, request: pigtail_pb2.RestCreateQueueRequest, context: Ctx) -> HttpBody:
        body = restbody.members(request.body, restbody.CREATE)
        name = restbody.text(body, "name")
        config, _ = await self._p.create_queue(
            name, restbody.integer(body, "timeout_ms"), restbody.optional_integer(body, "max_attempts")
        )
        # 201 also when the queue existed with these settings, as the contract has it (the seed's
        # provider creates its queue each time it starts): creating is idempotent.
        rest.created(context, f"/queue/{name}")
        return views.rest_json(views.rest_queue(name, config))

    @unary
    async def RestListQueues(self, request: pigtail_pb2.RestListQueuesRequest, context: Ctx) -> HttpBody:
        return views.rest_json([name for name, _ in await self._p.list_queues()])

    @unary
    async def RestDeleteQueue(self, request: pigtail_pb2.RestDeleteQueueRequest, context: Ctx) -> HttpBody:
        await self._p.delete_queue(request.queue)
        return views.rest_json({})

    @unary
    async def RestAddTask(self, request: pigtail_pb2.RestAddTaskRequest, context: Ctx) -> HttpBody:
        body = restbody.members(request.body, restbody.ADD)
        view, created = await self._p.add_task(
            request.queue,
            restbody.text(body, "task_name"),
            body.get("info"),
            not_before_ms=restbody.optional_integer(body, "not_before_ms"),
            delay_ms=restbody.optional_integer(body, "delay_ms"),
            priority=restbody.integer(body, "priority"),
            idempotency_key=restbody.optional_text(body, "idempotency_key"),
        )
        location = f"/queue/{request.queue}/{view['task_id']}"
        if created:
            rest.created(context, location)
        else:
            rest.located(context, location)
        return views.rest_json({"id": view["task_id"]})

    @unary
    async def RestListTasks(self, request: pigtail_pb2.RestListTasksRequest, context: Ctx) -> HttpBody:
        return views.rest_listing(await self._p.list_tasks(request.queue))

    @unary
    async def RestListDeadTasks(
        self, request: pigtail_pb2.RestListDeadTasksRequest, context: Ctx
    ) -> HttpBody:
        return views.rest_listing(await self._p.list_dead(request.queue))

    @unary
    async def RestClaimNextTask(
        self, request: pigtail_pb2.RestClaimNextTaskRequest, context: Ctx
    ) -> HttpBody:
        body = restbody.members(request.body, restbody.CLAIM_NEXT)
        worker_id = restbody.text(body, "worker_id")
        view = await self._p.claim_next(request.queue, worker_id, restbody.integer(body, "wait_ms"))
        if view is None:
            rest.no_content(context)
            return HttpBody()
        await _give_back_if_out_of_time(self._p, context, request.queue, worker_id, view)
        return views.rest_json(views.rest_view(view, with_id=True))

    @unary
    async def RestGetTask(self, request: pigtail_pb2.RestGetTaskRequest, context: Ctx) -> HttpBody:
        view = await self._p.get_task(request.queue, request.task_id)
        return views.rest_json(views.rest_view(view, verbose=request.verbose))

    @unary
    async def RestClaimTask(self, request: pigtail_pb2.RestClaimTaskRequest, context: Ctx) -> HttpBody:
        worker_id = restbody.text(restbody.members(request.body, restbody.WORKER), "worker_id")
        view, _ = await self._p.claim(request.queue, request.task_id, worker_id)
        return views.rest_json(views.rest_view(view))

    @unary
    async def RestCompleteTask(self, request: pigtail_pb2.RestCompleteTaskRequest, context: Ctx) -> HttpBody:
        body = restbody.members(request.body, restbody.WORKER, empty_ok=True)
        view, _ = await self._p.complete(request.queue, request.task_id, restbody.text(body, "worker_id"))
        return views.rest_json(views.rest_view(view))

    @unary
    async def RestHeartbeatTask(
        self, request: pigtail_pb2.RestHeartbeatTaskRequest, context: Ctx
    ) -> HttpBody:
        worker_id = restbody.text(restbody.members(request.body, restbody.WORKER), "worker_id")
        view = await self._p.heartbeat(request.queue, request.task_id, worker_id)
        return views.rest_json(views.rest_view(view))

    @unary
    async def RestReleaseTask(self, request: pigtail_pb2.RestReleaseTaskRequest, context: Ctx) -> HttpBody:
        worker_id = restbody.text(restbody.members(request.body, restbody.WORKER), "worker_id")
        view = await self._p.release(request.queue, request.task_id, worker_id)
        return views.rest_json(views.rest_view(view))

    @unary
    async def RestRetryTask(self, request: pigtail_pb2.RestRetryTaskRequest, context: Ctx) -> HttpBody:
        restbody.members(request.body, restbody.RETRY)
        view = await self._p.retry(request.queue, request.task_id)
        return views.rest_json(views.rest_view(view))
