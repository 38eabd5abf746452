"""LogService: the typed gRPC face of the log (thin: validate, call the Appender/Log, map errors)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

from potboiler.server import wire
from potboiler.server.appender import Appender
from potboiler.server.entries import (
    Appended,
    AppendedEntries,
    NewEntry,
    validate_new_entry,
    validate_serialized_batch,
)
from potboiler.server.errors import PotboilerError
from potboiler.server.grpc_context import Ctx
from potboiler.server.grpc_errors import abort, streaming, unary
from potboiler.v1 import log_pb2, log_pb2_grpc

#: Most entries per SubscribeEntries message.
MAX_SUBSCRIBE_BATCH = 1000
#: Most bytes of entries per SubscribeEntries message (but at least one entry): below the 4 MiB that
#: gRPC clients take by default.
MAX_SUBSCRIBE_BYTES = 3 << 20
#: Messages of an append stream taken in whose acks wait to be sent: a client that reads no acks
#: is read no further (gRPC's flow control then holds it up).
STREAM_ACKS_QUEUED = 256


def _last_position(delivered: list[tuple[int, bytes]]) -> int | None:
    return delivered[-1][0] if delivered else None


def _new_entries(requests: Iterable[log_pb2.SerializedAppendRequest.SerializedEntry]) -> list[NewEntry]:
    """The validated entries of a batch of append requests, read with their data serialized (see
    `validate_serialized_batch`)."""
    # An unset `data` reads as no bytes, which is refused as no data is.
    return validate_serialized_batch([(r.data, r.dependencies) for r in requests])


def appended(entry: Appended) -> log_pb2.AppendEntryResponse:
    """The acknowledgement of one appended entry."""
    ack = log_pb2.AppendEntryResponse(id=entry.id, seq=entry.seq)
    ack.when.wall_ms, ack.when.logical = entry.when
    return ack


def acks(entries: AppendedEntries) -> bytes:
    """The acknowledgements of the entries of one append, a serialized `AppendEntriesResponse` (or
    `AppendEntryStreamResponse`), written from the entries' ids, seqs and stamps."""
    return wire.append_acks(entries.ids, entries.first_seq, entries.stamp)


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a future's outcome as seen (asyncio logs an exception nobody retrieved)."""
    if not future.cancelled():
        future.exception()


class LogServicer(log_pb2_grpc.LogServiceServicer):
    """Appends, reads and subscriptions."""

    def __init__(self, appender: Appender) -> None:
        self._appender = appender
        self._log = appender.log

    @unary
    async def AppendEntry(
        self, request: log_pb2.AppendEntryRequest, context: Ctx
    ) -> log_pb2.AppendEntryResponse:
        new = validate_new_entry(request.data, request.dependencies)  # unset data: an empty Value
        [entry] = await self._appender.append([new])
        return appended(entry)

    @unary
    async def AppendEntries(
        self,
        request: log_pb2.SerializedAppendRequest,  # read so (see potboiler.server.decoding)
        context: Ctx,
    ) -> bytes:  # a serialized AppendEntriesResponse
        return acks(await self._appender.append(_new_entries(request.entries)))

    async def AppendEntryStream(  # type: ignore[override]  # answers serialized (see potboiler.server.decoding)
        self,
        request_iterator: AsyncIterator[
            log_pb2.SerializedAppendRequest
        ],  # read so (see potboiler.server.decoding)
        context: Ctx,
    ) -> AsyncIterator[bytes]:  # each a serialized AppendEntryStreamResponse
        # Requests are validated and queued as they arrive, without waiting for the previous ack,
        # so a client that keeps many messages in flight gets them group-committed together.
        queued: asyncio.Queue[asyncio.Future[AppendedEntries] | None] = asyncio.Queue(
            maxsize=STREAM_ACKS_QUEUED
        )

        async def read() -> None:
            try:
                async for message in request_iterator:
                    new = _new_entries(message.entries)
                    await queued.put(self._appender.queue_append(new))
            except asyncio.CancelledError:
                raise  # the call is over and nobody reads the queue: no end mark (it may be full)
            except BaseException:
                await queued.put(None)
                raise
            await queued.put(None)

        reader = asyncio.create_task(read())
        try:
            while (pending := await queued.get()) is not None:
                yield acks(await pending)
            await reader
        except PotboilerError as error:
            await abort(context, error)
        finally:
            reader.cancel()
            reader.add_done_callback(_retrieved)  # its error, if it failed, is the call's already
            # Acks nobody will send (the call ended): a batch failing later is no one's to hear.
            while not queued.empty():
                left = queued.get_nowait()
                if left is not None:
                    left.add_done_callback(_retrieved)

    @unary
    async def GetEntry(self, request: log_pb2.GetEntryRequest, context: Ctx) -> log_pb2.GetEntryResponse:
        return log_pb2.GetEntryResponse(entry=self._log.get(request.id))

    @unary
    async def ListHeads(self, request: log_pb2.ListHeadsRequest, context: Ctx) -> log_pb2.ListHeadsResponse:
        return log_pb2.ListHeadsResponse(
            heads=[
                log_pb2.LogHead(owner=h.owner, first=h.first, head=h.head, seq=h.seq)
                for h in self._log.heads()
            ]
        )

    @streaming
    async def SubscribeEntries(
        self, request: log_pb2.SubscribeEntriesRequest, context: Ctx
    ) -> AsyncIterator[bytes]:  # each a serialized SubscribeEntriesResponse
        limit = min(request.max_batch or MAX_SUBSCRIBE_BATCH, MAX_SUBSCRIBE_BATCH)
        self._log.check_resume(request.after_position, request.after_id)
        appender = self._appender

        def read(after: int) -> list[tuple[int, bytes]]:
            return appender.delivered_blobs(after, limit, MAX_SUBSCRIBE_BYTES)

        # Made from the entries as stored, and sent as made (see potboiler.server.decoding): no
        # parsing them, no building messages field by field.
        async for delivered in appender.follow(request.after_position, read, _last_position):
            yield wire.subscribe_entries_response(delivered)
