"""A LogClient fake for the services' unit tests: a list of entries, delivered as they come."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence

from google.protobuf.struct_pb2 import Value

from potboiler.pigtail.codec import event_data
from potboiler.pigtail.events import Event
from potboiler.server.entries import Appended
from potboiler.server.hlc import HybridClock
from potboiler.server.log import Promise
from potboiler.server.log_delivered import DeliveredBatch
from potboiler.v1.entry_pb2 import Entry, HlcTimestamp

A = "00000000-0000-4000-8000-00000000000a"


class FakeLog:
    """A LogClient over a list: appends are delivered at once (unless held); other nodes' entries
    via `deliver`."""

    def __init__(self, clock: HybridClock, node_id: str = A) -> None:
        self.clock = clock
        self._node_id = node_id
        self.entries: list[Entry] = []
        self._seq: dict[str, int] = {}
        self._changed = asyncio.Event()
        #: While set, subscriptions deliver nothing (as a log whose delivery is blocked).
        self.held = False

    @property
    def node_id(self) -> str:
        return self._node_id

    def make(self, owner: str, wall_ms: int, logical: int, data: Value, deps: Sequence[str] = ()) -> Entry:
        self._seq[owner] = self._seq.get(owner, 0) + 1
        return Entry(
            id=str(uuid.uuid4()),
            owner=owner,
            seq=self._seq[owner],
            when=HlcTimestamp(wall_ms=wall_ms, logical=logical),
            data=data,
            dependencies=list(deps),
        )

    async def append(self, data: Value, dependencies: Sequence[str] = ()) -> Appended:
        stamp = self.clock.now()
        entry = self.make(self._node_id, stamp.wall_ms, stamp.logical, data, dependencies)
        self.deliver(entry)
        return Appended(entry.id, entry.seq, stamp, entry.SerializeToString())

    def deliver(self, entry: Entry) -> None:
        self.entries.append(entry)
        self._changed.set()

    def release(self) -> None:
        """Deliver again (see `held`)."""
        self.held = False
        self._changed.set()

    def remote(self, owner: str, wall_ms: int, event: Event) -> Entry:
        """Deliver another node's event stamped `wall_ms`."""
        entry = self.make(owner, wall_ms, 0, event_data(event))
        self.deliver(entry)
        return entry

    def promises(self) -> dict[str, Promise]:
        return {}

    def position(self) -> int:
        return 0 if self.held else len(self.entries)

    async def subscribe(
        self, after_position: int, limit: int = 1000, mark: bytes | None = None
    ) -> AsyncIterator[DeliveredBatch]:
        """Batches of `limit` entries (a batch with `mark` may hold more; none here does)."""
        position = after_position
        while True:
            if position < len(self.entries) and not self.held:
                end = min(len(self.entries), position + limit)
                batch = [(i + 1, self.entries[i]) for i in range(position, end)]
                position = end
                yield DeliveredBatch.parsed(batch)
            else:
                self._changed.clear()
                await self._changed.wait()
