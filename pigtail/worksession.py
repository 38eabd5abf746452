"""One worker's WorkTasks stream: tasks go out as :meth:`Pigtail.lease` hands them; completes,
heartbeats and releases come in on the same stream and are each answered once they have taken effect
(see WorkTasks in proto/potboiler/v1/pigtail.proto).

Three kinds of task feed one queue of outgoing messages, which the stream's own generator sends: the
lease, the reader of the worker's messages, and one task per request being worked on. A request holds
one of MAX_OUTSTANDING slots until its answer is sent: beyond that the reader waits, and gRPC's flow
control holds the worker back (a worker that reads no answers cannot make the node keep more than that
many). A task claimed for the worker that never went out is released when the stream ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Final

from potboiler.pigtail import views
from potboiler.pigtail.engine import Pigtail
from potboiler.server.errors import InvalidArgument, PotboilerError
from potboiler.server.grpc_errors import status_of
from potboiler.v1 import pigtail_pb2

#: Completes, heartbeats and releases of one stream worked on at once.
MAX_OUTSTANDING = 64

COMPLETE: Final = pigtail_pb2.WORK_TASKS_OPERATION_COMPLETE
HEARTBEAT: Final = pigtail_pb2.WORK_TASKS_OPERATION_HEARTBEAT
RELEASE: Final = pigtail_pb2.WORK_TASKS_OPERATION_RELEASE


class _RequestsEnded:
    """The worker closed its side of the stream."""


_ENDED: Final = _RequestsEnded()

_Outgoing = pigtail_pb2.WorkTasksResponse | BaseException | _RequestsEnded


async def work_session(
    pigtail: Pigtail, requests: AsyncIterator[pigtail_pb2.WorkTasksRequest]
) -> AsyncGenerator[pigtail_pb2.WorkTasksResponse, None]:
    """The messages to send on a WorkTasks stream whose requests are `requests`. Raises the
    domain error that ends the stream (a bad start, no such queue...)."""
    first = await anext(requests, None)
    if first is None:
        return  # closed before starting: nothing was asked
    if first.WhichOneof("request") != "start":
        raise InvalidArgument("the first WorkTasks message must be `start`")
    start = first.start
    session = _Session(pigtail, start.queue, start.worker_id)
    leasing = session.leasing = asyncio.create_task(
        session.lease(start.max_in_flight), name="work-tasks-lease"
    )
    reading = asyncio.create_task(session.read(requests), name="work-tasks-read")
    sending: _Outgoing | None = None
    try:
        while (item := await session.out.get()) is not _ENDED:
            sending = item
            yield session.sendable(item)
            sending = None
            session.sent(item)
        # The worker is done: no more tasks (the lease is stopping), but every request it sent is
        # answered; a task claimed meanwhile, which it could not complete here, is given back.
        await asyncio.wait([leasing])
        while session.answering:
            await asyncio.wait(set(session.answering))
        await pigtail.release_unsent(start.queue, start.worker_id, session.take_unsent())
        while not session.out.empty():
            yield session.sendable(session.out.get_nowait())
    finally:
        for task in (leasing, reading, *session.answering):
            task.cancel()
        unsent = session.take_unsent()  # an error or a cancel ended the stream
        if isinstance(sending, pigtail_pb2.WorkTasksResponse) and sending.WhichOneof("response") == "task":
            unsent.append(sending.task.task_id)  # it ended at this task's message: never sent
        if unsent:
            pigtail.release_later(start.queue, start.worker_id, unsent)


class _Session:
    def __init__(self, pigtail: Pigtail, queue: str, worker_id: str) -> None:
        self._pigtail = pigtail
        self._queue = queue
        self._worker_id = worker_id
        self.out: asyncio.Queue[_Outgoing] = asyncio.Queue()
        self.answering: set[asyncio.Task[None]] = set()
        #: Set by the worker's stop_leasing, or when it closes its side: the lease ends between claims
        #: (one under way is sent, or released if the worker's side is closed).
        self.stop_leasing = asyncio.Event()
        self.leasing: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(MAX_OUTSTANDING)

    def take_unsent(self) -> list[str]:
        """The ids of the tasks waiting to go out, taken out of `out` (the other messages stay)."""
        kept: list[_Outgoing] = []
        unsent: list[str] = []
        while not self.out.empty():
            item = self.out.get_nowait()
            if isinstance(item, pigtail_pb2.WorkTasksResponse) and item.WhichOneof("response") == "task":
                unsent.append(item.task.task_id)
            else:
                kept.append(item)
        for item in kept:
            self.out.put_nowait(item)
        return unsent

    def sent(self, item: _Outgoing) -> None:
        """`item` went out: an answer to a request frees its slot."""
        if isinstance(item, pigtail_pb2.WorkTasksResponse) and item.WhichOneof("response") != "task":
            self._slots.release()

    @staticmethod
    def sendable(item: _Outgoing) -> pigtail_pb2.WorkTasksResponse:
        """A message to send, or the error that ends the stream raised."""
        if isinstance(item, BaseException):
            raise item
        assert not isinstance(item, _RequestsEnded)
        return item

    async def lease(self, max_in_flight: int) -> None:
        leases = self._pigtail.lease(self._queue, self._worker_id, max_in_flight, self.stop_leasing)
        try:
            async for view in leases:
                self.out.put_nowait(pigtail_pb2.WorkTasksResponse(task=views.task_message(view)))
        except Exception as error:  # ends the stream: no such queue (any more), a bad start...
            self.out.put_nowait(error)
        finally:
            await leases.aclose()

    async def read(self, requests: AsyncIterator[pigtail_pb2.WorkTasksRequest]) -> None:
        try:
            async for request in requests:
                kind = request.WhichOneof("request")
                if kind == "complete_task_id":
                    operation, task_id = COMPLETE, request.complete_task_id
                elif kind == "heartbeat_task_id":
                    operation, task_id = HEARTBEAT, request.heartbeat_task_id
                elif kind == "release_task_id":
                    operation, task_id = RELEASE, request.release_task_id
                elif kind == "stop_leasing" and request.stop_leasing:
                    self.stop_leasing.set()
                    continue
                else:
                    raise InvalidArgument(
                        "after `start`, a WorkTasks message must be complete_task_id, heartbeat_task_id, "
                        "release_task_id or stop_leasing (true)"
                    )
                await self._slots.acquire()
                task = asyncio.create_task(self._answer(operation, task_id))
                self.answering.add(task)
                task.add_done_callback(self.answering.discard)
        except Exception as error:  # a bad message (or one that is not protobuf) ends the stream
            self.out.put_nowait(error)
        else:
            # At once, not when the stream's generator gets to it: the completes just read would
            # make room for tasks the worker could not complete.
            self.stop_leasing.set()
            self.out.put_nowait(_ENDED)

    async def _answer(self, operation: pigtail_pb2.WorkTasksOperation.ValueType, task_id: str) -> None:
        try:
            if operation == COMPLETE:
                view, already = await self._pigtail.complete(self._queue, task_id, self._worker_id)
                answer = pigtail_pb2.WorkTasksResponse(
                    completed=pigtail_pb2.CompleteTaskResponse(
                        task=views.task_message(view), already_done=already
                    )
                )
            elif operation == HEARTBEAT:
                view = await self._pigtail.heartbeat(self._queue, task_id, self._worker_id)
                answer = pigtail_pb2.WorkTasksResponse(
                    heartbeat=pigtail_pb2.HeartbeatTaskResponse(task=views.task_message(view))
                )
            else:
                view = await self._pigtail.release(self._queue, task_id, self._worker_id)
                answer = pigtail_pb2.WorkTasksResponse(
                    released=pigtail_pb2.ReleaseTaskResponse(task=views.task_message(view))
                )
        except PotboilerError as error:  # this request failed; the stream goes on
            code = status_of(error).value[0]
            answer = pigtail_pb2.WorkTasksResponse(
                failure=pigtail_pb2.WorkTasksFailure(
                    task_id=task_id, operation=operation, code=code, message=str(error)
                )
            )
        except Exception as error:  # not a request's failure (a bug): ends the stream
            self.out.put_nowait(error)
            return
        if self.stop_leasing.is_set() and self.leasing is not None:
            # A task whose claim was under way as the worker stopped leasing goes out before this
            # answer: a worker that closes its side at its last answer would be sent it after that,
            # and leave it claimed.
            await asyncio.wait([self.leasing])
        self.out.put_nowait(answer)  # its slot is freed once it is sent
