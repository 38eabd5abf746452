"""Pigtail as a node service: `create(context)` is what the node's service registry calls.

The service keeps its state in its own RocksDB store in `context.data_dir`, reaches the log only
through `context.log` (append and subscribe) and takes "now" from the node's clock.
"""

from __future__ import annotations

import grpc

from potboiler.pigtail.engine import Pigtail
from potboiler.pigtail.servicer import PigtailRestServicer, PigtailServicer
from potboiler.server.plugin import NodeContext, NodeService
from potboiler.server.storage import RocksStore
from potboiler.v1 import pigtail_pb2, pigtail_pb2_grpc


class PigtailService:
    """The task queue service of one node."""

    def __init__(self, context: NodeContext) -> None:
        self._store = RocksStore(context.data_dir)
        self.pigtail = Pigtail(context.log, self._store, context.clock)

    def register(self, server: grpc.aio.Server) -> list[str]:
        pigtail_pb2_grpc.add_PigtailServiceServicer_to_server(PigtailServicer(self.pigtail), server)
        pigtail_pb2_grpc.add_PigtailRestServiceServicer_to_server(PigtailRestServicer(self.pigtail), server)
        services = pigtail_pb2.DESCRIPTOR.services_by_name
        return [services["PigtailService"].full_name, services["PigtailRestService"].full_name]

    async def start(self) -> None:
        await self.pigtail.start()

    async def stop(self) -> None:
        await self.pigtail.stop()
        self._store.close()

    def store_bytes(self) -> int:
        return self._store.size_bytes()


def create(context: NodeContext) -> NodeService:
    """The Pigtail service of a node."""
    return PigtailService(context)
