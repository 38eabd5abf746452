"""The narrow interface KV and Pigtail use to reach the log: append, read, subscribe from a position.

`LocalLogClient` is the in-process implementation (a method call into the node's Appender); the
same three operations exist as LogService RPCs, so a service could run as its own process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from google.protobuf.struct_pb2 import Value

from potboiler.server.appender import Appender
from potboiler.server.log import validate_new_entry
from potboiler.v1.entry_pb2 import Entry


class LogClient(Protocol):
    """What a service built on the log may do with it."""

    @property
    def node_id(self) -> str:
        """This node's id (the owner of the entries it appends)."""
        ...

    async def append(self, data: Value, dependencies: Sequence[str] = ()) -> Entry:
        """Append one entry to this node's log; returns it once durable."""
        ...

    def subscribe(self, after_position: int, limit: int = 1000) -> AsyncIterator[list[tuple[int, Entry]]]:
        """Batches of (position, entry) delivered after `after_position`, forever, in delivery order."""
        ...


class LocalLogClient:
    """A LogClient calling the node's own Appender."""

    def __init__(self, appender: Appender) -> None:
        self._appender = appender

    @property
    def node_id(self) -> str:
        return self._appender.log.node_id

    async def append(self, data: Value, dependencies: Sequence[str] = ()) -> Entry:
        [entry] = await self._appender.append([validate_new_entry(data, dependencies)])
        return entry

    async def subscribe(
        self, after_position: int, limit: int = 1000
    ) -> AsyncIterator[list[tuple[int, Entry]]]:
        position = after_position
        while True:
            batch = self._appender.delivered(position, limit)
            if not batch:
                await self._appender.wait_delivered(position)
                continue
            position = batch[-1][0]
            yield batch
