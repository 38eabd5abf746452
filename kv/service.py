"""The KV service of a node: its store, the task applying the log to it, and its gRPC servicers.

Writes: a servicer validates the request into a `PlannedWrite` (`KvState.plan_write`), `KvService.write`
appends its event to the local log through the narrow `LogClient` interface (with the entries it depends
on: the table's `_config` entry, and the entries an OR-Set remove or an MV-Register set supersedes, so
every replica applies them in an order that makes sense), then waits until the applier has applied that
entry here (read-your-writes), at most `APPLY_WAIT` seconds.

Reads come from the materialised state (`KvState`), kept in the service's own RocksDB store in
`<data-dir>/kv`, updated by one task that consumes the log's subscription from its stored cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from potboiler.kv.servicers import KvBrowserServicer, KvRestServicer, KvServicer
from potboiler.kv.state import KvState, PlannedWrite
from potboiler.server.jsonvalue import to_value
from potboiler.server.log import DeliveredBatch
from potboiler.server.logclient import Linger
from potboiler.server.plugin import NodeContext, NodeService
from potboiler.server.storage import RocksStore, Store
from potboiler.v1 import kv_browser_pb2_grpc, kv_pb2_grpc, kv_rest_pb2_grpc
from potboiler.v1.entry_pb2 import Entry

log = logging.getLogger(__name__)

#: Longest a write waits for its own entry to be applied before answering anyway.
APPLY_WAIT = 5.0
#: Most log entries applied in one batch (one store write).
APPLY_BATCH = 1000
#: Longest the applier waits to gather entries into one batch while no writer waits for it (so a
#: change from another node is applied here at most this much after it arrived). Every node applies
#: every entry, most of them not KV's: at 1,000 entries/s, 20 ms instead of 5 took a follower from
#: 20-21 % to 17-19 % of a core.
APPLY_LINGER_S = 0.02

SERVICE_NAMES = [
    "potboiler.v1.KvService",
    "potboiler.v1.KvRestService",
    "potboiler.v1.KvBrowserService",
]


class KvService:
    """The KV store of one node (a `NodeService`)."""

    def __init__(self, context: NodeContext, store: Store | None = None) -> None:
        self._context = context
        self._store = store if store is not None else RocksStore(context.data_dir)
        self.state = KvState(self._store, sync=context.fsync)
        self._task: asyncio.Task[None] | None = None
        #: Writers waiting for their entry to be applied, by the entry's seq.
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._linger = Linger(APPLY_LINGER_S)
        #: The highest seq of this node's own entries applied since the service started.
        self._own_seq = 0

    @property
    def node_id(self) -> str:
        """The id of the node this service runs on."""
        return self._context.log.node_id

    def register(self, server: grpc.aio.Server) -> list[str]:
        kv_pb2_grpc.add_KvServiceServicer_to_server(KvServicer(self), server)
        kv_rest_pb2_grpc.add_KvRestServiceServicer_to_server(KvRestServicer(self), server)
        kv_browser_pb2_grpc.add_KvBrowserServiceServicer_to_server(KvBrowserServicer(self), server)
        return list(SERVICE_NAMES)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._apply_forever(), name="kv-applier")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.cancel()
        self._waiters.clear()
        self._store.close()

    # -- writes ---------------------------------------------------------------------------------

    async def write(self, planned: PlannedWrite) -> Entry:
        """Append a planned write and wait (bounded) until it is applied here."""
        entry = await self._context.log.append(to_value(planned.event.to_json()), planned.dependencies)
        await self.wait_applied(entry)
        return entry

    async def wait_applied(self, entry: Entry, timeout: float = APPLY_WAIT) -> bool:
        """Wait until `entry`, one of this node's own, is applied; False if it is not within `timeout`.

        A node's own entries are delivered in their seq order (each depends on its predecessor), so
        "applied" is "seq at most the highest own seq applied so far"."""
        if entry.seq <= self._own_seq:
            return True
        waiter = self._waiters.get(entry.seq)
        if waiter is None:
            waiter = self._waiters[entry.seq] = asyncio.get_running_loop().create_future()
        self._linger.hurry()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            self._waiters.pop(entry.seq, None)
            log.warning("KV write %s not applied after %.1fs; answering anyway", entry.id, timeout)
            return False
        return True

    # -- applying -------------------------------------------------------------------------------

    async def _apply_forever(self) -> None:
        delay = 0.1
        while True:
            try:
                async for batch in self._context.log.subscribe(self.state.position, APPLY_BATCH):
                    self.apply(batch)
                    delay = 0.1
                    await self._linger.pause(len(batch.entries), APPLY_BATCH)
            except Exception:  # a bug or a store failure: say so loudly, retry from the stored cursor
                log.exception(
                    "KV applier failed at position %d; retrying in %.1fs", self.state.position, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def apply(self, delivered: DeliveredBatch) -> None:
        """Apply a batch of delivered entries and wake the writers waiting for them."""
        batch = delivered.entries
        self.state.apply_batch(batch, delivered.blobs)
        me = self._context.log.node_id
        for _, entry in reversed(batch):
            if entry.owner == me:  # the newest own entry of the batch
                self._own_seq = max(self._own_seq, entry.seq)
                break
        if self._waiters:
            done = [seq for seq in self._waiters if seq <= self._own_seq]
            for seq in done:
                waiter = self._waiters.pop(seq)
                if not waiter.done():
                    waiter.set_result(None)


def create(context: NodeContext) -> NodeService:
    """The KV service of a node (see potboiler.server.services)."""
    return KvService(context)
