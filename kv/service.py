"""The KV service of a node: its store, the task applying the log to it, and its gRPC servicers.

Writes (`KvService.update`, which the servicers call): the request is validated into a `PlannedWrite`
(`KvState.plan_write`), and `KvService.write` appends its event to the local log through the narrow
`LogClient` interface (with the entries it depends on: the table's `_config` entry, and the entries an
OR-Set remove or an MV-Register set supersedes, so every replica applies them in an order that makes
sense) and answers once the entry is durable.

Reads come from the materialised state (`KvState`), kept in the service's own RocksDB store in
`<data-dir>/kv`, updated by one task that consumes the log's subscription from its stored cursor.

Read-your-writes on this node: every read takes the state through `KvService.current`, which first waits
(at most `APPLY_WAIT` seconds, then Unavailable) until the applier has applied every write this service
has answered. So
the wait falls on a read that follows writes, not on each write: writes that nobody reads at once are
applied in batches (one store write for many). Planning a write reads the state too when the write
depends on it (see `KvState.plan_reads_state`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from potboiler.kv.events import CONFIG_TABLE
from potboiler.kv.servicers import KvBrowserServicer, KvRestServicer, KvServicer
from potboiler.kv.state import EVENT_MARK, STATE_FORMAT, EventFailed, KvState, PlannedWrite
from potboiler.server.entries import MAX_DEPTH, Appended
from potboiler.server.errors import InvalidArgument, TooDeep, Unavailable
from potboiler.server.jsonvalue import JSON, to_value
from potboiler.server.log_delivered import DeliveredBatch
from potboiler.server.logclient import Attempts, CatchUp, Linger, apply_forever, discard_if_stale
from potboiler.server.names import is_name
from potboiler.server.plugin import NodeContext, NodeService
from potboiler.server.storage import RocksStore, Store
from potboiler.v1 import kv_browser_pb2_grpc, kv_pb2_grpc, kv_rest_pb2_grpc

log = logging.getLogger(__name__)

#: Longest a read waits for this node's answered writes to be applied before it is refused (Unavailable).
APPLY_WAIT = 5.0
#: Most log entries applied in one batch (one store write).
APPLY_BATCH = 1000
#: Longest the applier waits to gather entries into one batch while no writer waits for it (so a
#: change from another node is applied here at most this much after it arrived). Every node applies
#: every entry, most of them not KV's: at 1,000 entries/s, 20 ms instead of 5 took a follower from
#: 20-21 % to 17-19 % of a core.
APPLY_LINGER_S = 0.02
#: Most keys of one page of `KvService.keys_page` (and its default).
MAX_PAGE_KEYS = 10_000

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
        self.state = KvState(self._store)
        if discard_if_stale(context.log, self.state.position, self._store, "KV", STATE_FORMAT):
            self.state = KvState(self._store)
        self._task: asyncio.Task[None] | None = None
        #: Readers waiting for this node's own entries to be applied, by the entry's seq.
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._linger = Linger(APPLY_LINGER_S)
        #: The highest seq of this node's own entries applied since the service started.
        self._own_seq = 0
        #: The highest seq of a write this service has answered.
        self._answered_seq = 0
        #: Table -> the highest seq of a `_config` write of it this service answered and has not
        #: applied yet (a write to the table is planned once it is: it may create or retype it).
        self._answered_configs: dict[str, int] = {}
        #: Whether the state shows everything delivered before the service started: the writes this
        #: node answered before a restart (and not applied by then) included.
        self._caught_up = CatchUp("KV", self._linger, APPLY_WAIT)
        #: Failed tries at applying the entry at one position, and the positions given up on.
        self._failures = Attempts()
        self._skip: set[int] = set()

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
        self._caught_up.start(self._context.log.position(), self.state.position)
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

    def store_bytes(self) -> int:
        return self._store.size_bytes()

    # -- writes ---------------------------------------------------------------------------------

    async def update(
        self, table: str, key: str, op: str, change: JSON, *, has_change: bool = True
    ) -> tuple[str, bool]:
        """Validate and make a client's write (`has_change`: whether the request had a change); its
        entry id, once durable, and whether its table is not known here yet (pending)."""
        planned = (await self.state_to_plan(table)).plan_write(table, key, op, change, has_change=has_change)
        entry = await self.write(planned)
        return entry.id, planned.pending

    async def write(self, planned: PlannedWrite) -> Appended:
        """Append a planned write; returns its entry once durable (reads wait until it is applied)."""
        try:
            entry = await self._context.log.append(to_value(planned.event.to_json()), planned.dependencies)
        except TooDeep:
            raise InvalidArgument(
                "the change is nested too deeply: the KV event that carries it (the change beside "
                f"table, key and op) would nest deeper than {MAX_DEPTH} levels of arrays and objects"
            ) from None
        self._answered_seq = max(self._answered_seq, entry.seq)
        if planned.event.table == CONFIG_TABLE:
            configured = planned.event.key
            self._answered_configs[configured] = max(self._answered_configs.get(configured, 0), entry.seq)
        return entry

    async def current(self) -> KvState:
        """The state, once it shows every write this service has answered (read-your-writes), also
        before the node last started; Unavailable if it does not within APPLY_WAIT (a stale state
        would hide those writes, and a write planned on it, an OR-Set remove say, would miss them)."""
        await self._caught_up.wait()
        seq = self._answered_seq
        if seq > self._own_seq:
            await self._wait_applied(seq)
        return self.state

    async def keys_page(self, table: str, size: int, token: str) -> tuple[list[str], str]:
        """One page of the table's keys in name order: at most `size` of them (0, or more than
        MAX_PAGE_KEYS: MAX_PAGE_KEYS), those after `token` (the previous page's next token, '' for
        the first page), and the next page's token ('' after the last page)."""
        size = min(size or MAX_PAGE_KEYS, MAX_PAGE_KEYS)
        if token and not is_name(token):  # tokens are key names
            raise InvalidArgument(f"invalid page token {token[:40]!r}")
        keys = (await self.current()).keys(table, token, size + 1)
        more = len(keys) > size
        keys = keys[:size]
        return keys, keys[-1] if more else ""

    async def state_to_plan(self, table: str) -> KvState:
        """The state to plan a write to `table` on: current (Unavailable if it is not within
        APPLY_WAIT) for a write that reads it, and while a `_config` write of `table` this node
        answered is not applied yet (it may create or retype the table: a write checked against the
        type before it would be taken for that type, and never show), or may not be (before the
        service has caught up with what was delivered before it started). A write that reads no state
        (an LWW set) is otherwise planned on the state as it is: its table's type is all it needs."""
        if (
            self.state.plan_reads_state(table)
            or not self._caught_up.done
            or self._answered_configs.get(table, 0) > self._own_seq
        ):
            return await self.current()
        return self.state

    async def _wait_applied(self, seq: int) -> None:
        """Wait until this node's own entry `seq` is applied; Unavailable after APPLY_WAIT.

        A node's own entries are delivered in their seq order (each depends on its predecessor), so
        "applied" is "seq at most the highest own seq applied so far"."""
        waiter = self._waiters.get(seq)
        if waiter is None:
            waiter = self._waiters[seq] = asyncio.get_running_loop().create_future()
        self._linger.hurry()
        try:
            async with asyncio.timeout(APPLY_WAIT):
                await asyncio.shield(waiter)
        except TimeoutError:
            behind = self._context.log.position() - self.state.position
            raise Unavailable(
                f"writes this node answered are not applied to its KV state yet after {APPLY_WAIT:g} s"
                + (f" (it is {behind} log entries behind)" if behind > 0 else "")
                + "; try again"
            ) from None

    def _release(self, upto: int) -> None:
        """Wake the readers waiting for seqs up to `upto`."""
        for s in [s for s in self._waiters if s <= upto]:
            waiter = self._waiters.pop(s)
            if not waiter.done():
                waiter.set_result(None)

    # -- applying -------------------------------------------------------------------------------

    async def _apply_forever(self) -> None:
        async def apply(batch: DeliveredBatch) -> None:
            self.apply(batch)

        await apply_forever(
            self._context.log,
            lambda: self.state.position,
            apply,
            self._linger,
            APPLY_BATCH,
            "KV",
            mark=EVENT_MARK,
        )

    def apply(self, delivered: DeliveredBatch) -> None:
        """Apply a batch of delivered entries and wake the readers waiting for them. An entry that
        fails is raised for the loop to try again; one that fails APPLY_ATTEMPTS times is skipped."""
        events = delivered.marked(EVENT_MARK)  # the other entries are never parsed
        batch = events.entries
        while True:
            try:
                self.state.apply_batch(batch, events.blobs, self._skip, delivered.last())
                break
            except EventFailed as failed:
                if not self._failures.failed(failed.position):
                    raise
                log.exception("KV skips the log entry %s at position %d", failed.entry_id, failed.position)
                self._skip.add(failed.position)
        self._skip = {p for p in self._skip if p > self.state.position}
        me = self._context.log.node_id
        mark = me.encode()
        # The newest own entry of the batch, from its end: only entries that mention this node's id
        # in their bytes can be its own (one search in C first: a batch of other nodes' entries).
        if b"".join(events.blobs).find(mark) >= 0:
            for (_, entry), blob in zip(reversed(batch), reversed(events.blobs), strict=True):
                if blob.find(mark) >= 0 and entry.owner == me:
                    self._own_seq = max(self._own_seq, entry.seq)
                    break
        if self._waiters:
            self._release(self._own_seq)
        if self._answered_configs:
            own = self._own_seq
            self._answered_configs = {t: seq for t, seq in self._answered_configs.items() if seq > own}
        if not self._caught_up.done:
            self._caught_up.note(self.state.position)


def create(context: NodeContext) -> NodeService:
    """The KV service of a node (see potboiler.server.services)."""
    return KvService(context)
