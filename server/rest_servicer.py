"""CoreRestService: the seed's REST shapes (bare JSON objects and lists) over the same domain code
as LogService and NodesService."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.struct_pb2 import ListValue, Struct

from potboiler.server import rest
from potboiler.server.appender import Appender
from potboiler.server.entry_json import entry_struct
from potboiler.server.grpc_errors import unary
from potboiler.server.log import validate_new_entry
from potboiler.server.membership import Membership
from potboiler.v1 import core_rest_pb2, core_rest_pb2_grpc

Ctx = grpc.aio.ServicerContext[Any, Any]


class CoreRestServicer(core_rest_pb2_grpc.CoreRestServiceServicer):
    """GET /log, /log/first, /log/{id}, POST /log, GET /nodes."""

    def __init__(self, appender: Appender, membership: Membership) -> None:
        self._appender = appender
        self._log = appender.log
        self._membership = membership

    @unary
    async def GetLogHeads(self, request: core_rest_pb2.GetLogHeadsRequest, context: Ctx) -> Struct:
        out = Struct()
        for head in self._log.heads():
            out.fields[head.owner].string_value = head.head
        return out

    @unary
    async def GetLogFirsts(self, request: core_rest_pb2.GetLogFirstsRequest, context: Ctx) -> Struct:
        out = Struct()
        for head in self._log.heads():
            out.fields[head.owner].string_value = head.first
        return out

    @unary
    async def GetLogEntry(self, request: core_rest_pb2.GetLogEntryRequest, context: Ctx) -> Struct:
        return entry_struct(self._log.get(request.id))

    @unary
    async def PostLogEntry(
        self, request: core_rest_pb2.PostLogEntryRequest, context: Ctx
    ) -> core_rest_pb2.PostLogEntryResponse:
        new = validate_new_entry(rest.json_body(request.body), request.dependency)
        [entry] = await self._appender.append([new])
        await rest.created(context, f"/log/{entry.id}")
        return core_rest_pb2.PostLogEntryResponse(id=entry.id)

    @unary
    async def GetNodes(self, request: core_rest_pb2.GetNodesRequest, context: Ctx) -> ListValue:
        out = ListValue()
        for url in self._membership.urls():
            out.values.add().string_value = url
        return out
