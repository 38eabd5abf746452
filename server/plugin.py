"""How a service built on the log (KV, Pigtail) plugs into a node."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from potboiler.server.hlc import HybridClock
from potboiler.server.logclient import LogClient


@dataclass(frozen=True)
class NodeContext:
    """What a node gives each of its services. A service's state is made from the log, which holds
    every acknowledged write (synced with --fsync): its own store's writes need not be synced, as a
    state that lost its last writes catches up from the log again (and one ahead of the log, which
    lost writes without --fsync, is rebuilt from it: see `potboiler.server.logclient.discard_if_stale`)."""

    log: LogClient
    #: A directory of the service's own (its RocksDB store lives there).
    data_dir: Path
    clock: HybridClock


class NodeService(Protocol):
    """A service run by a node, started after the log and stopped before it."""

    def register(self, server: grpc.aio.Server) -> list[str]:
        """Add the servicers to `server`; returns their full service names (for reflection)."""
        ...

    async def start(self) -> None:
        """Start background work (e.g. applying the log to the service's state)."""
        ...

    async def stop(self) -> None:
        """Stop background work and close the service's store."""
        ...

    def store_bytes(self) -> int:
        """Approximate bytes the service's store occupies (for metrics)."""
        ...
