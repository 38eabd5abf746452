"""The KV service over gRPC against an in-process node (no Envoy): the typed KvService, the REST-shape
KvRestService and the browser's pages, read-your-writes, restarts and rebuilding from the log."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import grpc
import orjson
import pytest
from google.api.httpbody_pb2 import HttpBody

from potboiler.kv import state as kv_state
from potboiler.kv.crdts import apply as crdt_apply
from potboiler.kv.service import KvService, create
from potboiler.server import logclient
from potboiler.server.entries import MAX_DEPTH
from potboiler.server.errors import Unavailable
from potboiler.server.jsonvalue import from_value, to_value
from potboiler.v1 import (
    kv_browser_pb2,
    kv_browser_pb2_grpc,
    kv_pb2,
    kv_pb2_grpc,
    kv_rest_pb2,
    kv_rest_pb2_grpc,
    log_pb2,
)
from tests.conftest import GrpcNode, GrpcNodeFactory, wait_for

if TYPE_CHECKING:
    from potboiler.kv.crdts import JSON
    from potboiler.v1.kv_browser_pb2_grpc import KvBrowserServiceAsyncStub
    from potboiler.v1.kv_pb2_grpc import KvServiceAsyncStub
    from potboiler.v1.kv_rest_pb2_grpc import KvRestServiceAsyncStub


@dataclass
class KvNode:
    """An in-process node running KV, with its stubs."""

    grpc: GrpcNode
    kv: KvServiceAsyncStub
    rest: KvRestServiceAsyncStub
    browser: KvBrowserServiceAsyncStub

    @property
    def service(self) -> KvService:
        service = self.grpc.node.services["kv"]
        assert isinstance(service, KvService)
        return service

    async def update(self, table: str, key: str, op: str, change: JSON = None) -> kv_pb2.UpdateValueResponse:
        return await self.kv.UpdateValue(
            kv_pb2.UpdateValueRequest(table=table, key=key, op=op, change=to_value(change))
        )

    async def value(self, table: str, key: str) -> JSON:
        return json_of(await self.rest.GetKvValue(kv_rest_pb2.GetKvValueRequest(table=table, key=key)))

    async def create_table(self, name: str, crdt: str) -> str:
        return (await self.update("_config", name, "set", {"crdt": crdt})).id

    async def entries(self) -> int:
        return sum(h.seq for h in (await self.grpc.heads()).values())


def json_of(body: HttpBody) -> JSON:
    """The JSON of a REST answer."""
    value: JSON = orjson.loads(body.data)
    return value


async def start_kv(factory: GrpcNodeFactory, name: str = "kv") -> KvNode:
    node = await factory(name, services=[("kv", create)])
    channel = node.channel
    return KvNode(
        node,
        kv_pb2_grpc.KvServiceStub(channel),
        kv_rest_pb2_grpc.KvRestServiceStub(channel),
        kv_browser_pb2_grpc.KvBrowserServiceStub(channel),
    )


@pytest.fixture
async def kv(grpc_node_factory: GrpcNodeFactory) -> KvNode:
    return await start_kv(grpc_node_factory)


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def test_typed_api(kv: KvNode) -> None:
    created = await kv.kv.CreateTable(kv_pb2.CreateTableRequest(name="things", crdt=kv_pb2.CRDT_TYPE_ORSET))
    tables = (await kv.kv.ListTables(kv_pb2.ListTablesRequest())).tables
    assert [(t.name, t.crdt, t.config_id) for t in tables] == [("things", kv_pb2.CRDT_TYPE_ORSET, created.id)]
    answer = await kv.update("things", "k", "add", {"item": {"a": 1}, "key": "x", "metadata": [1, "m"]})
    assert answer.id and not answer.pending
    got = await kv.kv.GetValue(kv_pb2.GetValueRequest(table="things", key="k"))
    assert got.crdt == kv_pb2.CRDT_TYPE_ORSET
    assert from_value(got.value) == [{"item": {"a": 1}, "key": "x", "metadata": [1, "m"]}]
    entry = await kv.grpc.log.GetEntry(log_pb2.GetEntryRequest(id=answer.id))
    assert list(entry.entry.dependencies) == [created.id]
    assert from_value(entry.entry.data) == {
        "table": "things",
        "key": "k",
        "crdt": "ORSET",
        "op": "add",
        "change": {"op": "add", "item": {"a": 1}, "key": "x", "metadata": [1, "m"], "supersedes": []},
    }


async def test_list_keys_pages(kv: KvNode) -> None:
    await kv.create_table("t", "LWW")
    names = [f"k{i:02d}" for i in range(25)]
    await asyncio.gather(*(kv.update("t", name, "set", i) for i, name in enumerate(names)))
    seen: list[str] = []
    token = ""
    while True:
        page = await kv.kv.ListKeys(kv_pb2.ListKeysRequest(table="t", page_size=10, page_token=token))
        seen += page.keys
        token = page.next_page_token
        if not token:
            break
    assert seen == names
    everything = await kv.kv.ListKeys(kv_pb2.ListKeysRequest(table="t"))
    assert list(everything.keys) == names and everything.next_page_token == ""
    error = await rpc_error(kv.kv.ListKeys(kv_pb2.ListKeysRequest(table="t", page_token="a b")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_rest_shapes(kv: KvNode) -> None:
    assert json_of(await kv.rest.GetKvTables(kv_rest_pb2.GetKvTablesRequest())) == []
    await kv.create_table("b", "PNCOUNTER")
    await kv.create_table("a", "MVREGISTER")
    await kv.update("b", "n", "increment", 5)
    await kv.update("b", "n", "decrement", 2)
    posted = await kv.rest.PostKvValue(
        kv_rest_pb2.PostKvValueRequest(
            table="a", key="r", raw_body=HttpBody(data=b'{"op": "set", "change": {"x": null}}')
        )
    )
    assert posted.content_type == "application/json"
    answer = json_of(posted)
    assert isinstance(answer, dict) and answer.keys() == {"id", "pending"} and answer["pending"] is False
    for body, message in (
        (b"{}", "the request needs an 'op' (one of: set, create, add, remove, increment, decrement)"),
        (b"", "the request body must be JSON"),
        (b"[]", "the request body must be a JSON object"),
        (b'{"op": 1}', "the body's 'op' must be a string"),
        (b'{"op": "set", "change": 1, "extra": 2}', "the request body has unknown members: 'extra'"),
    ):
        request = kv_rest_pb2.PostKvValueRequest(table="a", key="r", raw_body=HttpBody(data=body))
        error = await rpc_error(kv.rest.PostKvValue(request))
        assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, message)
    tables = await kv.rest.GetKvTables(kv_rest_pb2.GetKvTablesRequest())
    assert json_of(tables) == ["a", "b"]
    keys = await kv.rest.GetKvKeys(kv_rest_pb2.GetKvKeysRequest(table="b"))
    assert json_of(keys) == ["n"]
    assert await kv.value("b", "n") == 3
    assert await kv.value("a", "r") == [{"x": None}]
    assert await kv.value("_config", "a") == {"crdt": "MVREGISTER"}


@pytest.mark.parametrize(
    ("table", "key", "message"),
    [("nope", "k", "No such table 'nope'"), ("t", "nope", "No such key 'nope'")],
)
async def test_not_found(kv: KvNode, table: str, key: str, message: str) -> None:
    await kv.create_table("t", "LWW")
    for call in (
        kv.rest.GetKvValue(kv_rest_pb2.GetKvValueRequest(table=table, key=key)),
        kv.kv.GetValue(kv_pb2.GetValueRequest(table=table, key=key)),
    ):
        error = await rpc_error(call)
        assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, message)
    if key == "k":
        error = await rpc_error(kv.rest.GetKvKeys(kv_rest_pb2.GetKvKeysRequest(table=table)))
        assert (error.code(), error.details()) == (grpc.StatusCode.NOT_FOUND, message)


def nested_lists(depth: int) -> JSON:
    """`depth` lists, one inside the other."""
    value: JSON = "x"
    for _ in range(depth):
        value = [value]
    return value


BAD_UPDATES: list[tuple[dict[str, Any], str]] = [
    ({"table": "t t", "key": "k", "op": "set", "change": to_value(1)}, "table name 't t' is invalid"),
    ({"table": "t", "key": "", "op": "set", "change": to_value(1)}, "key name '' is invalid"),
    ({"table": "t", "key": "k", "op": "", "change": to_value(1)}, "needs an 'op'"),
    ({"table": "t", "key": "k", "op": "set"}, "op 'set' needs a 'change'"),
    ({"table": "t", "key": "k", "op": "increment", "change": to_value(1)}, "does not apply to LWW tables"),
    (
        {"table": "_config", "key": "x", "op": "set", "change": to_value({"crdt": "BTREE"})},
        "unknown crdt type",
    ),
    ({"table": "_config", "key": "x", "op": "set", "change": to_value("LWW")}, "must be an object like"),
    ({"table": "unknown", "key": "k", "op": "jump", "change": to_value(1)}, "unknown op 'jump'"),
    (
        {"table": "t", "key": "k", "op": "set", "change": to_value(nested_lists(MAX_DEPTH))},
        f"the change is nested too deeply: the KV event that carries it (the change beside table, key and "
        f"op) would nest deeper than {MAX_DEPTH} levels",
    ),
]


@pytest.mark.parametrize(("request_fields", "message"), BAD_UPDATES)
async def test_bad_updates_append_nothing(kv: KvNode, request_fields: dict[str, Any], message: str) -> None:
    await kv.create_table("t", "LWW")
    before = await kv.entries()
    error = await rpc_error(kv.kv.UpdateValue(kv_pb2.UpdateValueRequest(**request_fields)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (error.details() or "")
    assert await kv.entries() == before


async def test_create_table_needs_a_type(kv: KvNode) -> None:
    error = await rpc_error(kv.kv.CreateTable(kv_pb2.CreateTableRequest(name="t")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = await rpc_error(
        kv.kv.CreateTable(kv_pb2.CreateTableRequest(name="_config", crdt=kv_pb2.CRDT_TYPE_LWW))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_write_before_its_table_is_kept(kv: KvNode) -> None:
    answer = await kv.update("later", "k", "add", {"item": 1, "key": "e"})
    assert answer.pending
    error = await rpc_error(kv.kv.GetValue(kv_pb2.GetValueRequest(table="later", key="k")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    await kv.create_table("later", "GSET")
    assert await kv.value("later", "k") == [{"item": 1, "key": "e", "metadata": None}]


async def test_read_your_writes_under_concurrency(kv: KvNode) -> None:
    await kv.create_table("c", "PNCOUNTER")
    await kv.create_table("s", "ORSET")

    async def client(i: int) -> None:
        for j in range(10):
            await kv.update("c", f"k{i}", "increment", 1)
            assert await kv.value("c", f"k{i}") == j + 1
            await kv.update("s", f"k{i}", "add", {"item": j, "key": "e"})
            assert {"item": j, "key": "e", "metadata": None} in await kv.value("s", f"k{i}")  # type: ignore[operator]

    await asyncio.gather(*(client(i) for i in range(16)))


async def test_every_read_shows_the_lww_writes_answered_before_it(kv: KvNode) -> None:
    """LWW writes answer once durable, without waiting to be applied; each kind of read waits."""
    await kv.create_table("t", "LWW")

    async def client(i: int) -> None:
        for j in range(5):
            key = f"k{i}-{j}"
            await kv.update("t", key, "set", j)
            assert await kv.value("t", key) == j
            got = await kv.kv.GetValue(kv_pb2.GetValueRequest(table="t", key=key))
            assert from_value(got.value) == j
        await kv.update("t", f"last{i}", "set", i)
        keys = await kv.rest.GetKvKeys(kv_rest_pb2.GetKvKeysRequest(table="t"))
        assert f"last{i}" in cast(list[str], json_of(keys))
        listed = await kv.kv.ListKeys(kv_pb2.ListKeysRequest(table="t"))
        assert f"last{i}" in listed.keys
        page = await kv.browser.GetTablePage(kv_browser_pb2.GetTablePageRequest(table="t"))
        assert f"last{i}".encode() in page.data

    await asyncio.gather(*(client(i) for i in range(8)))


async def test_a_new_table_is_known_to_the_next_write_and_read(kv: KvNode) -> None:
    for i in range(10):
        await kv.create_table(f"t{i}", "ORSET")
        answer = await kv.update(f"t{i}", "k", "add", {"item": i, "key": "e"})
        assert not answer.pending  # planned with the table this node just created
        tables = await kv.kv.ListTables(kv_pb2.ListTablesRequest())
        assert f"t{i}" in [t.name for t in tables.tables]
        listed = await kv.rest.GetKvTables(kv_rest_pb2.GetKvTablesRequest())
        assert f"t{i}" in cast(list[str], json_of(listed))
        index = await kv.browser.GetIndexPage(kv_browser_pb2.GetIndexPageRequest())
        assert f"t{i}".encode() in index.data
        await kv.update(f"t{i}", "k", "remove", {"item": i, "key": "e"})
        assert await kv.value(f"t{i}", "k") == []  # the remove saw the add it follows


async def test_writes_nobody_reads_yet_are_applied_in_batches(kv: KvNode) -> None:
    await kv.create_table("t", "LWW")
    batches = 0
    apply = kv.service.apply

    def counting(delivered: Any) -> None:
        nonlocal batches
        batches += 1
        apply(delivered)

    kv.service.apply = counting  # type: ignore[method-assign]
    await asyncio.gather(*(kv.update("t", f"k{i}", "set", i) for i in range(200)))
    assert [await kv.value("t", f"k{i}") for i in range(200)] == list(range(200))
    # Had each write waited for its own apply, there would be about one batch per write.
    assert batches < 100


async def test_restart_neither_loses_nor_double_applies(grpc_node_factory: GrpcNodeFactory) -> None:
    kv = await start_kv(grpc_node_factory, "n")
    await kv.create_table("c", "PNCOUNTER")
    await asyncio.gather(*(kv.update("c", "k", "increment", 1) for _ in range(50)))
    assert await kv.value("c", "k") == 50  # a read: every answered write is applied
    position = kv.service.state.position
    await grpc_node_factory.stop(kv.grpc)
    kv = await start_kv(grpc_node_factory, "n")
    assert kv.service.state.position == position
    assert await kv.value("c", "k") == 50
    await kv.update("c", "k", "decrement", 8)
    assert await kv.value("c", "k") == 42


async def test_state_is_rebuilt_from_the_log(grpc_node_factory: GrpcNodeFactory) -> None:
    kv = await start_kv(grpc_node_factory, "n")
    await kv.create_table("c", "PNCOUNTER")
    await kv.create_table("s", "ORSET")
    await kv.update("c", "k", "increment", 7)
    await kv.update("s", "k", "add", {"item": "x", "key": "e", "metadata": 1})
    await kv.update("s", "k", "add", {"item": "y", "key": "e"})
    await kv.update("s", "k", "remove", {"item": "x", "key": "e"})
    data_dir = kv.grpc.node.config.data_dir
    await grpc_node_factory.stop(kv.grpc)
    shutil.rmtree(data_dir / "kv")
    kv = await start_kv(grpc_node_factory, "n")
    await wait_for(lambda: kv.service.state.tables() != [], message="tables rebuilt")
    await wait_for(lambda: kv.service.state.position >= 6, message="everything re-applied")
    assert await kv.value("c", "k") == 7
    assert await kv.value("s", "k") == [{"item": "y", "key": "e", "metadata": None}]


async def test_kv_events_appended_through_the_log_api_apply_too(kv: KvNode) -> None:
    await kv.create_table("t", "LWW")
    data: JSON = {"table": "t", "key": "raw", "crdt": None, "op": "set", "change": "from the log"}
    await kv.grpc.log.AppendEntry(log_pb2.AppendEntryRequest(data=to_value(data)))
    await kv.grpc.log.AppendEntry(log_pb2.AppendEntryRequest(data=to_value({"not": "kv"})))
    await wait_for(lambda: kv.service.state.position >= 3)
    assert await kv.value("t", "raw") == "from the log"


async def test_an_event_that_fails_to_apply_every_time_is_skipped_not_stopping_kv(
    kv: KvNode, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug (here: the CRDT code raising for one item) fails alike at each try and on every node: after
    a few tries that event is skipped, and KV goes on applying (it stopped for good, every read then
    refused as not caught up)."""

    def buggy(crdt: Any, state: Any, payload: Any, ctx: Any) -> Any:
        if "boom" in repr(payload):
            raise RuntimeError("a bug")
        return crdt_apply(crdt, state, payload, ctx)

    monkeypatch.setattr(kv_state, "apply", buggy)
    monkeypatch.setattr(logclient, "APPLY_ATTEMPTS", 2)
    await kv.create_table("s", "ORSET")
    for item in ("ok1", "boom", "ok2"):
        await kv.update("s", "k", "add", {"item": item, "key": item})
    assert await kv.value("s", "k") == [{"item": i, "key": i, "metadata": None} for i in ("ok1", "ok2")]
    assert "KV skips the log entry" in caplog.text


async def test_browser_pages(kv: KvNode) -> None:
    await kv.create_table("s", "ORSET")
    await kv.update("s", "k", "add", {"item": "<b>", "key": "e", "metadata": {"m": "&"}})
    index = await kv.browser.GetIndexPage(kv_browser_pb2.GetIndexPageRequest())
    assert index.content_type == "text/html; charset=utf-8"
    assert b'href="/tables/s"' in index.data and b"ORSET" in index.data
    page = await kv.browser.GetTablePage(kv_browser_pb2.GetTablePageRequest(table="s"))
    assert b"&lt;b&gt;" in page.data and b"<b>" not in page.data
    call = kv.browser.GetTablePage(kv_browser_pb2.GetTablePageRequest(table="nope"))
    missing = await call
    assert b"No such table" in missing.data
    assert ("x-http-code", "404") in list(await call.trailing_metadata() or [])
    call = kv.browser.GetTablePage(kv_browser_pb2.GetTablePageRequest(table="a b"))
    await call
    assert ("x-http-code", "400") in list(await call.trailing_metadata() or [])


async def test_browser_pages_say_when_the_state_is_not_ready(
    kv: KvNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state still catching up (or a write not applied in time) is a 503 page, not a gRPC UNKNOWN
    that Envoy answers as a bare 500."""

    async def not_ready() -> None:
        raise Unavailable("the KV state is still catching up with the log")

    monkeypatch.setattr(kv.service, "current", not_ready)
    for call in (
        kv.browser.GetIndexPage(kv_browser_pb2.GetIndexPageRequest()),
        kv.browser.GetTablePage(kv_browser_pb2.GetTablePageRequest(table="t")),
    ):
        page = await call
        assert page.content_type == "text/html; charset=utf-8" and b"catching up" in page.data
        assert ("x-http-code", "503") in list(await call.trailing_metadata() or [])
