"""LogService: the typed gRPC face of the log (thin: validate, call the Appender/Log, map errors)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from potboiler.server import wire
from potboiler.server.appender import Appender
from potboiler.server.entries import MAX_BATCH_ENTRIES, NewEntry, validate_new_entry
from potboiler.server.errors import (
    Conflict,
    InvalidArgument,
    OutOfRange,
    PotboilerError,
    TooLarge,
    quoted,
)
from potboiler.server.grpc_context import Ctx
from potboiler.server.grpc_errors import abort, streaming, unary
from potboiler.server.ids import parse_uuid, uuid_str
from potboiler.v1 import log_pb2, log_pb2_grpc
from potboiler.v1.entry_pb2 import Entry

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


def validate_batch(requests: Sequence[log_pb2.AppendEntryRequest]) -> list[NewEntry]:
    """Validate every entry of a batch (all or nothing)."""
    if not requests:
        raise InvalidArgument("a batch needs at least one entry")
    if len(requests) > MAX_BATCH_ENTRIES:
        raise TooLarge(f"a batch may hold at most {MAX_BATCH_ENTRIES} entries, not {len(requests)}")
    out = []
    for i, r in enumerate(requests):
        try:
            # An unset `data` reads as an empty Value, which is refused as no data is.
            out.append(validate_new_entry(r.data, r.dependencies))
        except PotboilerError as exc:
            raise exc.prefixed(f"entry {i}: ") from None
    return out


def appended(entry: Entry) -> log_pb2.AppendEntryResponse:
    """The acknowledgement of one appended entry."""
    return log_pb2.AppendEntryResponse(id=entry.id, seq=entry.seq, when=entry.when)


def add_acks(
    acks: RepeatedCompositeFieldContainer[log_pb2.AppendEntryResponse], entries: list[Entry]
) -> None:
    """Add the acknowledgement of each appended entry to a response's repeated field (filled in
    place: about twice as fast as building each message and handing over a list)."""
    add = acks.add
    for entry in entries:
        ack = add()
        ack.id = entry.id
        ack.seq = entry.seq
        ack.when.CopyFrom(entry.when)


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
        self, request: log_pb2.AppendEntriesRequest, context: Ctx
    ) -> log_pb2.AppendEntriesResponse:
        entries = await self._appender.append(validate_batch(request.entries))
        response = log_pb2.AppendEntriesResponse()
        add_acks(response.entries, entries)
        return response

    async def AppendEntryStream(
        self, request_iterator: AsyncIterator[log_pb2.AppendEntryStreamRequest], context: Ctx
    ) -> AsyncIterator[log_pb2.AppendEntryStreamResponse]:
        # Requests are validated and queued as they arrive, without waiting for the previous ack,
        # so a client that keeps many messages in flight gets them group-committed together.
        acks: asyncio.Queue[asyncio.Future[list[Entry]] | None] = asyncio.Queue(maxsize=STREAM_ACKS_QUEUED)

        async def read() -> None:
            try:
                async for message in request_iterator:
                    new = validate_batch(message.entries)
                    await acks.put(self._appender.queue_append(new))
            except asyncio.CancelledError:
                raise  # the call is over and nobody reads the queue: no end mark (it may be full)
            except BaseException:
                await acks.put(None)
                raise
            await acks.put(None)

        reader = asyncio.create_task(read())
        try:
            while (pending := await acks.get()) is not None:
                response = log_pb2.AppendEntryStreamResponse()
                add_acks(response.entries, await pending)
                yield response
            await reader
        except PotboilerError as error:
            await abort(context, error)
        finally:
            reader.cancel()
            reader.add_done_callback(_retrieved)  # its error, if it failed, is the call's already
            # Acks nobody will send (the call ended): a batch failing later is no one's to hear.
            while not acks.empty():
                left = acks.get_nowait()
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

    def _check_resume(self, position: int, entry_id: str) -> None:
        """Conflict unless this node delivered entry `entry_id` at `position`."""
        if position == 0:
            raise InvalidArgument("after_id names the entry at after_position, and position 0 has none")
        wanted = uuid_str(parse_uuid(entry_id, "after_id"))
        [(_, blob)] = self._appender.delivered_blobs(position - 1, 1)
        held = Entry.FromString(blob).id
        if held != wanted:
            raise Conflict(
                f"the entry at position {position} here is {held}, not {quoted(entry_id)}: this "
                "node's delivery order is not the one that position came from (it lost data since, "
                "or it is another node); subscribe again from a position it gave, or from 0"
            )

    @streaming
    async def SubscribeEntries(
        self, request: log_pb2.SubscribeEntriesRequest, context: Ctx
    ) -> AsyncIterator[bytes]:  # each a serialized SubscribeEntriesResponse
        limit = min(request.max_batch or MAX_SUBSCRIBE_BATCH, MAX_SUBSCRIBE_BATCH)
        appender = self._appender
        if request.after_position > appender.log.position:
            # Waiting for it would skip the entries delivered up to it, unseen.
            raise OutOfRange(
                f"position {request.after_position} is beyond this node's last delivered position "
                f"{appender.log.position} (positions are this node's own: resume with a position "
                "it gave)"
            )
        if request.after_id:
            self._check_resume(request.after_position, request.after_id)

        def read(after: int) -> list[tuple[int, bytes]]:
            return appender.delivered_blobs(after, limit, MAX_SUBSCRIBE_BYTES)

        # Made from the entries as stored, and sent as made (see potboiler.server.decoding): no
        # parsing them, no building messages field by field.
        async for delivered in appender.follow(request.after_position, read, _last_position):
            yield wire.subscribe_entries_response(delivered)
