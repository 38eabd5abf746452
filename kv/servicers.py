"""The KV gRPC servicers (thin: validate, call the KV domain, map errors to statuses, or for the
browser to error pages).

- `KvServicer`: the typed KvService.
- `KvRestServicer`: the REST paths: `POST /kv/{table}/{key}`, and `GET /kv`, `/kv/{table}`,
  `/kv/{table}/{key}`, answered as JSON text (google.api.HttpBody).
- `KvBrowserServicer`: the browser's HTML pages (google.api.HttpBody).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from google.api.httpbody_pb2 import HttpBody

from potboiler.kv import browser
from potboiler.kv.crdts import CrdtType
from potboiler.kv.events import CONFIG_TABLE
from potboiler.server import rest
from potboiler.server.errors import InvalidArgument, NotFound, PotboilerError, Unavailable
from potboiler.server.grpc_context import Ctx
from potboiler.server.grpc_errors import http_status_of, unary
from potboiler.server.jsonvalue import from_value
from potboiler.server.names import check_name
from potboiler.v1 import (
    kv_browser_pb2,
    kv_browser_pb2_grpc,
    kv_pb2,
    kv_pb2_grpc,
    kv_rest_pb2,
    kv_rest_pb2_grpc,
)

if TYPE_CHECKING:
    from potboiler.kv.service import KvService


#: Keys shown on one page of the browser, and the most bytes of their rows' HTML (a page of 1 MiB
#: values would otherwise take hundreds of MiB to build, and more than gRPC may send; a single row
#: is at most a few times its entry's 1 MiB).
BROWSER_PAGE_KEYS = 500
BROWSER_PAGE_BYTES = 4 << 20
HTML = "text/html; charset=utf-8"


def crdt_proto(crdt: CrdtType) -> kv_pb2.CrdtType.ValueType:
    """The proto enum value of a table type."""
    return kv_pb2.CrdtType.Value(f"CRDT_TYPE_{crdt.value}")


def crdt_from_proto(value: kv_pb2.CrdtType.ValueType) -> CrdtType:
    """The table type of a proto enum value; InvalidArgument for CRDT_TYPE_UNSPECIFIED or unknown."""
    if value == kv_pb2.CRDT_TYPE_UNSPECIFIED or value not in kv_pb2.CrdtType.values():
        raise InvalidArgument(f"a table needs a type (crdt), got {value}")
    return CrdtType(kv_pb2.CrdtType.Name(value).removeprefix("CRDT_TYPE_"))


class KvServicer(kv_pb2_grpc.KvServiceServicer):
    """The typed KV API."""

    def __init__(self, service: KvService) -> None:
        self._service = service

    @unary
    async def UpdateValue(
        self, request: kv_pb2.UpdateValueRequest, context: Ctx
    ) -> kv_pb2.UpdateValueResponse:
        has_change = request.HasField("change")
        change = from_value(request.change) if has_change else None
        entry_id, pending = await self._service.update(
            request.table, request.key, request.op, change, has_change=has_change
        )
        return kv_pb2.UpdateValueResponse(id=entry_id, pending=pending)

    @unary
    async def GetValue(self, request: kv_pb2.GetValueRequest, context: Ctx) -> kv_pb2.GetValueResponse:
        crdt, value = (await self._service.current()).get_message(request.table, request.key)
        return kv_pb2.GetValueResponse(crdt=crdt_proto(crdt), value=value)

    @unary
    async def CreateTable(
        self, request: kv_pb2.CreateTableRequest, context: Ctx
    ) -> kv_pb2.CreateTableResponse:
        crdt = crdt_from_proto(request.crdt)
        entry_id, _ = await self._service.update(CONFIG_TABLE, request.name, "set", {"crdt": crdt.value})
        return kv_pb2.CreateTableResponse(id=entry_id)

    @unary
    async def ListTables(self, request: kv_pb2.ListTablesRequest, context: Ctx) -> kv_pb2.ListTablesResponse:
        state = await self._service.current()
        return kv_pb2.ListTablesResponse(
            tables=[
                kv_pb2.Table(name=t.name, crdt=crdt_proto(t.crdt), config_id=t.config_id)
                for t in state.tables()
            ]
        )

    @unary
    async def ListKeys(self, request: kv_pb2.ListKeysRequest, context: Ctx) -> kv_pb2.ListKeysResponse:
        keys, token = await self._service.keys_page(request.table, request.page_size, request.page_token)
        return kv_pb2.ListKeysResponse(keys=keys, next_page_token=token)


class KvRestServicer(kv_rest_pb2_grpc.KvRestServiceServicer):
    """The seed's KV REST answers: bare JSON values and lists."""

    def __init__(self, service: KvService) -> None:
        self._service = service

    @unary
    async def PostKvValue(self, request: kv_rest_pb2.PostKvValueRequest, context: Ctx) -> HttpBody:
        # `table` and `key` in the body are tolerated and ignored: the path names them.
        body = rest.json_object_body(request.raw_body, {"op", "change", "table", "key"})
        op = body.get("op", "")
        if not isinstance(op, str):
            raise InvalidArgument("the body's 'op' must be a string")
        entry_id, pending = await self._service.update(
            request.table, request.key, op, body.get("change"), has_change="change" in body
        )
        return rest.json_answer({"id": entry_id, "pending": pending})

    @unary
    async def GetKvTables(self, request: kv_rest_pb2.GetKvTablesRequest, context: Ctx) -> HttpBody:
        return rest.json_answer([t.name for t in (await self._service.current()).tables()])

    @unary
    async def GetKvKeys(self, request: kv_rest_pb2.GetKvKeysRequest, context: Ctx) -> HttpBody:
        return rest.json_answer((await self._service.current()).keys(request.table))

    @unary
    async def GetKvValue(self, request: kv_rest_pb2.GetKvValueRequest, context: Ctx) -> HttpBody:
        return rest.text_answer((await self._service.current()).get_text(request.table, request.key))


class KvBrowserServicer(kv_browser_pb2_grpc.KvBrowserServiceServicer):
    """The browser's pages."""

    def __init__(self, service: KvService) -> None:
        self._service = service

    async def GetIndexPage(self, request: kv_browser_pb2.GetIndexPageRequest, context: Ctx) -> HttpBody:
        try:
            state = await self._service.current()
        except Unavailable as error:
            return _error_page(context, error)
        tables = [(t.name, t.crdt) for t in state.tables()]
        return HttpBody(content_type=HTML, data=browser.index_page(tables, self._service.node_id))

    async def GetTablePage(self, request: kv_browser_pb2.GetTablePageRequest, context: Ctx) -> HttpBody:
        table, after = request.table, request.after
        try:
            state = await self._service.current()
            info = state.table(table)
            if after:
                check_name(after, "key")
            rows, more = browser.page_of(
                info.crdt, state.items(table, after), BROWSER_PAGE_KEYS, BROWSER_PAGE_BYTES
            )
        except (NotFound, InvalidArgument, Unavailable) as error:
            return _error_page(context, error)
        page = browser.table_page(
            table, info.crdt, rows, after=after, next_after=rows[-1][0] if more else None
        )
        return HttpBody(content_type=HTML, data=page)


def _error_page(context: Ctx, error: PotboilerError) -> HttpBody:
    """A browser page saying what went wrong, answered with the error's HTTP status (as REST's)."""
    status = http_status_of(error)
    rest.http_status(context, status)
    return HttpBody(content_type=HTML, data=browser.error_page(status, str(error)))
