"""CoreRestService: the seed's REST shapes (bare JSON objects and lists) over the same domain code
as LogService and NodesService."""

from __future__ import annotations

from collections.abc import Callable

from google.api.httpbody_pb2 import HttpBody

from potboiler.server import rest
from potboiler.server.appender import Appender
from potboiler.server.entries import validate_new_entry
from potboiler.server.entry_json import entry_json
from potboiler.server.errors import Conflict
from potboiler.server.grpc_context import Ctx
from potboiler.server.grpc_errors import unary
from potboiler.server.membership import Membership
from potboiler.server.webhooks import ORIGIN_HEADER
from potboiler.v1 import core_rest_pb2, core_rest_pb2_grpc


class CoreRestServicer(core_rest_pb2_grpc.CoreRestServiceServicer):
    """GET /log, /log/first, /log/{id}, POST /log, GET /nodes."""

    def __init__(self, appender: Appender, membership: Membership, in_cluster: Callable[[str], bool]) -> None:
        """`in_cluster(node_id)` says whether a node replicates with this one (directly or not)."""
        self._appender = appender
        self._log = appender.log
        self._membership = membership
        self._in_cluster = in_cluster

    @unary
    async def GetLogHeads(self, request: core_rest_pb2.GetLogHeadsRequest, context: Ctx) -> HttpBody:
        return rest.json_answer({head.owner: head.head for head in self._log.heads()})

    @unary
    async def GetLogFirsts(self, request: core_rest_pb2.GetLogFirstsRequest, context: Ctx) -> HttpBody:
        return rest.json_answer({head.owner: head.first for head in self._log.heads()})

    @unary
    async def GetLogEntry(self, request: core_rest_pb2.GetLogEntryRequest, context: Ctx) -> HttpBody:
        return rest.text_answer(entry_json(self._log.get(request.id)))

    @unary
    async def PostLogEntry(
        self, request: core_rest_pb2.PostLogEntryRequest, context: Ctx
    ) -> core_rest_pb2.PostLogEntryResponse:
        new = validate_new_entry(rest.json_body(request.body), request.dependency)
        self._check_metadata(context)
        [entry] = await self._appender.append([new])
        rest.created(context, f"/log/{entry.id}")
        return core_rest_pb2.PostLogEntryResponse(id=entry.id)

    def _check_metadata(self, context: Ctx) -> None:
        """Refuse a POST from a webhook of this cluster (it would append every entry again, and
        deliver each new entry to itself again, forever), and one whose query is not all
        `dependency=<id>` (the transcoder drops a bare `?dependency`, and takes `?body=` as a field
        the body then replaces: neither may pass unnoticed)."""
        for key, raw in context.invocation_metadata() or ():
            if key not in (ORIGIN_HEADER, rest.ORIGINAL_PATH):
                continue
            value = raw if isinstance(raw, str) else raw.decode("latin-1")
            if key == rest.ORIGINAL_PATH:
                rest.check_query(value, {"dependency"})
            elif self._in_cluster(value):
                raise Conflict(
                    f"this POST comes from a webhook of node {value}, which replicates with this "
                    "node: appending it would deliver it to that webhook again, without end"
                )

    @unary
    async def GetNodes(self, request: core_rest_pb2.GetNodesRequest, context: Ctx) -> HttpBody:
        return rest.json_answer(self._membership.urls())
