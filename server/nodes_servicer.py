"""NodesService: membership and replication status."""

from __future__ import annotations

from collections.abc import Callable

from potboiler.server import rest, vectors
from potboiler.server.grpc_context import Ctx
from potboiler.server.grpc_errors import unary
from potboiler.server.log import Log
from potboiler.server.membership import Membership
from potboiler.v1 import nodes_pb2, nodes_pb2_grpc


class NodesServicer(nodes_pb2_grpc.NodesServiceServicer):
    """Thin over `Membership`; peer states come from the replicator."""

    def __init__(
        self,
        log: Log,
        membership: Membership,
        peer_status: Callable[[], list[nodes_pb2.PeerStatus]],
    ) -> None:
        self._log = log
        self._membership = membership
        self._peer_status = peer_status

    @unary
    async def ListNodes(
        self, request: nodes_pb2.ListNodesRequest, context: Ctx
    ) -> nodes_pb2.ListNodesResponse:
        return nodes_pb2.ListNodesResponse(urls=self._membership.urls())

    @unary
    async def AddNode(self, request: nodes_pb2.AddNodeRequest, context: Ctx) -> nodes_pb2.AddNodeResponse:
        self._membership.add(request.url)
        rest.no_content(context)
        return nodes_pb2.AddNodeResponse()

    @unary
    async def RemoveNode(
        self, request: nodes_pb2.RemoveNodeRequest, context: Ctx
    ) -> nodes_pb2.RemoveNodeResponse:
        self._membership.remove(request.url)
        rest.no_content(context)
        return nodes_pb2.RemoveNodeResponse()

    @unary
    async def GetStatus(
        self, request: nodes_pb2.GetStatusRequest, context: Ctx
    ) -> nodes_pb2.GetStatusResponse:
        status = nodes_pb2.GetStatusResponse(
            node_id=self._log.node_id,
            url=self._membership.self_url,
            vector=vectors.to_proto(self._log.vector()),
            pending=self._log.pending,
            delivered_position=self._log.position,
            peers=self._peer_status(),
        )
        blocked = self._log.own_blocked()
        if blocked is not None:
            status.blocked.id, status.blocked.seq = blocked.entry, blocked.seq
            status.blocked.waits_for.extend(blocked.waits_for)
        for owner, seq in sorted(self._log.forks().items()):
            status.forked.add(owner=owner, seq=seq)
        return status
