"""ReplicationService: the dialed end of replication streams (thin over `Replicator.serve`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from potboiler.server.errors import PotboilerError
from potboiler.server.grpc_errors import status_of
from potboiler.server.replicator import Replicator
from potboiler.v1 import replication_pb2, replication_pb2_grpc


class ReplicationServicer(replication_pb2_grpc.ReplicationServiceServicer):
    """The dialed end of replication streams (thin over Replicator.serve)."""

    def __init__(self, replicator: Replicator) -> None:
        self._replicator = replicator

    # The dialed end writes with context.write (both ends share one Session), so it returns None.
    async def Replicate(  # type: ignore[override]
        self, request_iterator: AsyncIterator[replication_pb2.ReplicateRequest], context: Any
    ) -> None:
        try:
            await self._replicator.serve(request_iterator, context)
        except PotboilerError as error:
            await context.abort(status_of(error), str(error))
