"""Appends from many coroutines over one AppendEntryStream, each acknowledged on its own.

`StreamAppender.append` is what a unary AppendEntry call is to a caller: it returns the entry's
acknowledgement once the node has made the entry durable, or raises the call's error. Underneath, the
appends that are waiting when the stream is ready to send travel together in one stream message (the
node acknowledges every entry of a message at once, in order), the way nats-py's flusher or a Kafka
producer batches what its callers hand it. A client with 32 appends in flight so pays a fraction of a
call per append, and so does the node. A message holds at most half of the appends in flight, so
that there are two: while the node works on one, the client handles the other's acknowledgements and
the appends its callers make next (with one message of everything, node and client would take turns).

Errors, per append:

- an entry the node would refuse raises at once, before anything is sent: the node's own checks
  (:func:`~potboiler.server.entries.validate_new_entry`) run in the client, raising
  :class:`~potboiler.server.errors.InvalidArgument` or :class:`~potboiler.server.errors.TooLarge` with
  the message the node would give. (The node refuses a stream message whole and ends the stream, which
  would take the other appends of that message down with it);
- a stream that fails (the node went away, the stream was cancelled, the node refused a message after
  all) fails every append not yet acknowledged with the call's error, as it would fail unary calls in
  flight: such an entry may or may not have been appended. The next append opens a new stream.

Leaving the `async with` block waits for every acknowledgement (`close`), unless the block was
cancelled (a timeout, Ctrl-C): then the stream ends at once (`abort`), failing what is not acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType

import grpc
from google.protobuf.struct_pb2 import Value

from potboiler.server.entries import MAX_DEPTH, validate_new_entry
from potboiler.server.jsonvalue import JSON, checked_value
from potboiler.server.wire import append_request, append_stream_request
from potboiler.v1 import log_pb2

#: Most entries sent in one message, and about the most bytes of entries (the node takes 10,000
#: entries and 64 MiB per message).
MAX_ENTRIES = 1000
MAX_BYTES = 4 << 20

#: The stream's messages are written as bytes (see `potboiler.server.wire`), so the call is made
#: without the generated stub's serializer.
_METHOD = "/{}/AppendEntryStream".format(log_pb2.DESCRIPTOR.services_by_name["LogService"].full_name)
_Call = grpc.aio.StreamStreamCall[bytes, log_pb2.AppendEntryStreamResponse]
#: What grpc.aio raises on a call that has ended (its status, a usage error, or InvalidStateError
#: "RPC already finished") when it is written to afterwards.
_CALL_ENDED = (asyncio.InvalidStateError, grpc.aio.AioRpcError, grpc.aio.UsageError)


@dataclass(eq=False)
class _Append:
    #: The serialized AppendEntryRequest.
    request: bytes
    done: asyncio.Future[log_pb2.AppendEntryResponse]


class StreamAppender:
    """Appends to the log of the node behind `channel` (see the module docstring). Use it as an
    async context manager, or call :meth:`close` when done."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._open: Callable[[], _Call] = channel.stream_stream(
            _METHOD,
            request_serializer=None,
            response_deserializer=log_pb2.AppendEntryStreamResponse.FromString,
        )
        self._waiting: deque[_Append] = deque()
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._closing = False
        self._aborted = False

    async def __aenter__(self) -> StreamAppender:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(error, asyncio.CancelledError | KeyboardInterrupt | TimeoutError):
            # The block was cancelled or timed out (a stalled node, Ctrl-C): waiting for
            # acknowledgements now would outlive it, with nothing left to cancel the wait.
            await self.abort()
        else:
            await self.close()

    async def append(
        self, data: Value | JSON, dependencies: Iterable[str] = ()
    ) -> log_pb2.AppendEntryResponse:
        """Append one entry (`data`: a Value or plain JSON, `dependencies`: ids of entries it depends
        on); its acknowledgement once durable."""
        if self._closing:
            raise RuntimeError("the appender is closed")
        if isinstance(dependencies, str | bytes):
            raise TypeError("dependencies are a list of entry ids, not one string")
        dependencies = list(dependencies)
        value = data if isinstance(data, Value) else checked_value(data, MAX_DEPTH)
        entry = validate_new_entry(value, dependencies)
        item = _Append(append_request(entry.data, dependencies), asyncio.get_running_loop().create_future())
        self._waiting.append(item)
        self._wake.set()
        runner = self._runner
        # A cancelled stream is winding down (it has failed what it held and ends without looking
        # at the queue again): this append needs a stream of its own.
        if runner is None or runner.done() or runner.cancelling():
            self._runner = asyncio.create_task(self._run(), name="stream-appender")
        return await item.done

    async def abort(self) -> None:
        """End the stream now: every append not acknowledged fails (it may or may not have been
        appended), as unary calls in flight would."""
        self._closing = self._aborted = True
        runner = self._runner
        if runner is not None:
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
        self._fail(RuntimeError("the appender was aborted"), deque())

    async def close(self) -> None:
        """Send what is waiting, wait for every acknowledgement, then end the stream."""
        self._closing = True
        self._wake.set()
        runner = self._runner
        if runner is None:
            return
        try:
            # Shielded: a closer that is cancelled (or times out) leaves the stream to finish.
            await asyncio.shield(runner)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not (runner.cancelled() and self._aborted) or (task is not None and task.cancelling()):
                raise  # this closer's own cancellation, not an abort's

    async def _run(self) -> None:
        """One stream after another, for as long as there are appends to make."""
        while self._waiting and not self._aborted:
            await self._stream()

    async def _stream(self) -> None:
        sent: deque[list[_Append]] = deque()
        try:
            call = self._open()
        except Exception as error:  # no stream (the channel is closed, for one): no append made
            self._fail(error, sent)
            return
        writer = asyncio.create_task(self._write(call, sent))
        # A writer that fails for any other reason than the call's end must not leave us reading.
        writer.add_done_callback(lambda task: task.cancelled() or task.exception() is None or call.cancel())
        try:
            while (response := await call.read()) is not grpc.aio.EOF:
                assert isinstance(response, log_pb2.AppendEntryStreamResponse)
                acks = response.entries
                if not sent or len(sent[0]) != len(acks):
                    raise RuntimeError(
                        f"the node acknowledged {len(acks)} entries of a message of "
                        f"{len(sent[0]) if sent else 0}: the stream is out of step"
                    )
                for item, ack in zip(sent.popleft(), acks, strict=True):
                    if not item.done.done():
                        item.done.set_result(ack)
            if sent:
                self._fail(RuntimeError("the node ended the append stream without acknowledging"), sent)
        except Exception as error:  # the call's error, or an answer that does not fit what was sent
            self._fail(error, sent)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # this task was cancelled (abort)
                self._fail(RuntimeError("the append stream was cancelled"), sent)
                raise
            # Nobody cancelled this task: the call was, by a writer that failed, or by grpc.aio as
            # its channel was closed (a writer may have found the call ended first).
            failed = writer.exception() if writer.done() and not writer.cancelled() else None
            closed = RuntimeError("the append stream ended: its channel was closed")
            if isinstance(failed, Exception) and not isinstance(failed, _CALL_ENDED):
                self._fail(failed, sent)
            else:
                self._fail(closed, sent)
        finally:
            writer.cancel()
            # A writer that wrote on the call after it ended raises what grpc.aio says then: the
            # reader has already failed the appends with the call's own error.
            with contextlib.suppress(asyncio.CancelledError, *_CALL_ENDED):
                await writer
            call.cancel()

    async def _write(self, call: _Call, sent: deque[list[_Append]]) -> None:
        while True:
            while not self._waiting:
                if self._closing:
                    await call.done_writing()
                    return
                self._wake.clear()
                await self._wake.wait()
            batch = self._take(sum(len(b) for b in sent))
            if not batch:
                continue
            sent.append(batch)
            await call.write(append_stream_request([item.request for item in batch]))

    def _take(self, unacknowledged: int) -> list[_Append]:
        """The next message's appends (those whose caller gave up before they were sent are dropped):
        at most half of those in flight, MAX_ENTRIES and about MAX_BYTES."""
        waiting = self._waiting
        limit = min(MAX_ENTRIES, max(1, (len(waiting) + unacknowledged) // 2))
        batch: list[_Append] = []
        size = 0
        while waiting and len(batch) < limit:
            item = waiting[0]
            if item.done.done():
                waiting.popleft()
                continue
            if batch and size + len(item.request) > MAX_BYTES:
                break
            batch.append(waiting.popleft())
            size += len(item.request)
        return batch

    def _fail(self, error: Exception, sent: deque[list[_Append]]) -> None:
        """The stream ended with `error`: every append not acknowledged fails with it."""
        for item in [*(item for batch in sent for item in batch), *self._waiting]:
            if not item.done.done():
                item.done.set_exception(error)
        self._waiting.clear()
