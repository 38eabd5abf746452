"""WebhooksService, NodesService and CoreRestService over gRPC against an in-process node."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import uuid
from typing import Any

import grpc
import httpx
import orjson
import pytest
from google.api.httpbody_pb2 import HttpBody
from google.protobuf.struct_pb2 import Value

from potboiler.server import metrics
from potboiler.server.metrics import MetricsServer, NodeCollector
from potboiler.server.urls import MAX_URL_LENGTH
from potboiler.server.webhooks import MAX_WEBHOOKS
from potboiler.v1 import core_rest_pb2, log_pb2, nodes_pb2, webhooks_pb2
from tests.conftest import GrpcNode, GrpcNodeFactory

JSON = Any


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def webhook_urls(node: GrpcNode) -> list[str]:
    response = await node.webhooks.ListWebhooks(webhooks_pb2.ListWebhooksRequest())
    return [w.url for w in response.webhooks]


async def node_urls(node: GrpcNode) -> list[str]:
    return list((await node.nodes.ListNodes(nodes_pb2.ListNodesRequest())).urls)


BAD_URLS = [
    "",
    "garbage",
    "ftp://example.com/hook",
    "file:///etc/passwd",
    "http://",
    "http:///path",
    "http://exa mple.com/",
    "http://example.com/\n",
    "http://example.com:0/",
    "http://example.com:99999/",
    "http://example.com:port/",
    "//example.com/hook",
    "http://example.com/" + "x" * MAX_URL_LENGTH,
]


# -- webhooks --------------------------------------------------------------------------------


async def test_register_list_deregister(grpc_node: GrpcNode) -> None:
    assert await webhook_urls(grpc_node) == []
    b, a = "http://127.0.0.1:9/b", "https://example.com/a?x=1"
    for url in (b, a, b):
        await grpc_node.webhooks.RegisterWebhook(webhooks_pb2.RegisterWebhookRequest(url=url))
    assert await webhook_urls(grpc_node) == sorted([a, b])
    listed = (await grpc_node.webhooks.ListWebhooks(webhooks_pb2.ListWebhooksRequest())).webhooks
    assert all((w.delivered_position, w.failures, w.last_error) == (0, 0, "") for w in listed)

    await grpc_node.webhooks.DeregisterWebhook(webhooks_pb2.DeregisterWebhookRequest(url=a))
    assert await webhook_urls(grpc_node) == [b]
    error = await rpc_error(
        grpc_node.webhooks.DeregisterWebhook(webhooks_pb2.DeregisterWebhookRequest(url=a))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert a in (error.details() or "")


async def test_a_listed_webhook_shows_no_password(grpc_node: GrpcNode) -> None:
    url = "https://user:s3cret@example.com/hook?x=1"
    await grpc_node.webhooks.RegisterWebhook(webhooks_pb2.RegisterWebhookRequest(url=url))
    assert await webhook_urls(grpc_node) == ["https://user:***@example.com/hook?x=1"]
    await grpc_node.webhooks.DeregisterWebhook(webhooks_pb2.DeregisterWebhookRequest(url=url))
    assert await webhook_urls(grpc_node) == []


async def test_webhook_metrics_show_where_a_webhook_goes_not_its_secrets(grpc_node: GrpcNode) -> None:
    urls = [
        "http://user:s3cret1@127.0.0.1:9/hook",
        "http://user:s3cret2@127.0.0.1:9/hook",
        "http://127.0.0.1:9/hook?token=s3cret",
        "http://127.0.0.1:9/services/T0/s3cret",
    ]
    for url in urls:
        await grpc_node.webhooks.RegisterWebhook(webhooks_pb2.RegisterWebhookRequest(url=url))
    listed = await grpc_node.webhooks.ListWebhooks(webhooks_pb2.ListWebhooksRequest())
    ids = {hook.digest for hook in listed.webhooks}
    assert len(ids) == len(urls)  # every webhook its own series, told apart as ListWebhooks does
    families = {f.name: f for f in NodeCollector(grpc_node.node).collect()}
    for name in (
        "potboiler_webhook_deliveries",
        "potboiler_webhook_failures",
        "potboiler_webhook_pending_entries",
    ):
        samples = families[name].samples
        assert {s.labels["webhook"] for s in samples} == ids
        assert {s.labels["target"] for s in samples} == {"http://127.0.0.1:9"}
        assert "s3cret" not in repr(samples)


async def test_metrics_show_the_garbage_collectors_passes_per_generation(grpc_node: GrpcNode) -> None:
    gc.collect()
    families = {f.name: f for f in NodeCollector(grpc_node.node).collect()}
    for name in ("potboiler_gc_passes", "potboiler_gc_pause_seconds", "potboiler_gc_longest_pause_seconds"):
        samples = families[name].samples
        assert [s.labels["generation"] for s in samples] == ["0", "1", "2"]
    full = [s for s in families["potboiler_gc_passes"].samples if s.labels["generation"] == "2"]
    assert full[0].value >= 1


async def test_the_metrics_port_takes_get_and_head_and_answers_json_errors(grpc_node: GrpcNode) -> None:
    server = MetricsServer(grpc_node.node, "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            get = await client.get("/metrics")
            assert get.status_code == 200
            assert get.headers["content-type"].startswith("text/plain")
            assert "potboiler_appends_total" in get.text
            assert get.http_version == "HTTP/1.0"  # one request per connection: none outlives stop()
            head = await client.head("/metrics")
            assert head.status_code == 200 and head.content == b""
            assert head.headers["content-type"] == get.headers["content-type"]
            for method in ("GET", "HEAD"):
                missing = await client.request(method, "/nope")
                assert missing.status_code == 404
            assert (await client.get("/nope")).json() == {
                "code": 5,
                "message": "No such path: /nope (metrics are at /metrics)",
                "details": [],
            }
            for method in ("POST", "DELETE", "TRACE", "FOO"):
                other = await client.request(method, "/metrics", content=b"x")
                assert other.status_code == 405 and other.headers["allow"] == "GET, HEAD"
                message = f"{method} is not allowed here: /metrics takes GET or HEAD"
                assert other.json() == {"code": 12, "message": message, "details": []}
    finally:
        server.stop()
    with pytest.raises(httpx.ConnectError):  # nothing answers once it has stopped
        async with httpx.AsyncClient() as client:
            await client.get(f"http://127.0.0.1:{server.port}/metrics")


async def test_a_metrics_request_line_too_long_is_a_414_that_says_so(grpc_node: GrpcNode) -> None:
    server = MetricsServer(grpc_node.node, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"GET /metrics?{'x' * 70_000} HTTP/1.0\r\n\r\n".encode())
        head, _, body = (await asyncio.wait_for(reader.read(), 5)).partition(b"\r\n\r\n")
        writer.close()
        assert head.startswith(b"HTTP/1.0 414")
        assert json.loads(body) == {"code": 3, "message": "Request-URI Too Long", "details": []}
    finally:
        server.stop()


@pytest.mark.parametrize("pace", [None, 0.1], ids=["sends nothing more", "a byte every 0.1 s"])
async def test_a_metrics_client_slow_to_send_its_request_is_let_go(
    grpc_node: GrpcNode, monkeypatch: pytest.MonkeyPatch, pace: float | None
) -> None:
    """The deadline is for the whole request, not for each read."""
    monkeypatch.setattr(metrics._Handler, "timeout", 0.5)
    server = MetricsServer(grpc_node.node, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)

        async def send() -> None:
            writer.write(b"GET /metrics HTTP/1.1\r\n")  # and never the rest of the request
            with contextlib.suppress(OSError):
                while pace is not None:
                    writer.write(b"x")
                    await writer.drain()
                    await asyncio.sleep(pace)

        sender = asyncio.create_task(send())
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, unanswered
        finally:
            sender.cancel()
            writer.close()
    finally:
        server.stop()


async def test_metrics_scrapes_at_once_read_the_node_once(
    grpc_node: GrpcNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = 0
    collect = NodeCollector.collect

    def counted(self: NodeCollector) -> Any:
        nonlocal reads
        reads += 1
        return collect(self)

    monkeypatch.setattr(NodeCollector, "collect", counted)
    monkeypatch.setattr(metrics, "SCRAPE_INTERVAL", 60.0)
    server = MetricsServer(grpc_node.node, "127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            answers = await asyncio.gather(*(client.get("/metrics") for _ in range(10)))
        assert {a.status_code for a in answers} == {200}
        assert len({a.text for a in answers}) == 1
        assert reads == 1
    finally:
        server.stop()


async def test_metrics_connections_beyond_the_cap_are_closed(
    grpc_node: GrpcNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "MAX_CONNECTIONS", 2)
    monkeypatch.setattr(metrics._Handler, "timeout", 30)  # the held requests are ended by the test
    server = MetricsServer(grpc_node.node, "127.0.0.1", 0)
    try:
        idle = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(2)]
        for _, writer in idle:
            writer.write(b"GET /metrics HTTP/1.0\r\n")  # and never the rest: each holds a thread
        await asyncio.sleep(0)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.0\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed unanswered
        writer.close()
        for _, writer in idle:
            writer.write(b"\r\n")  # the held requests end: their slots come free
        for reader, _ in idle:
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.0 200")
        # A slot comes free just after its connection closes: the next may be refused a moment more.
        async with httpx.AsyncClient() as client:
            for _ in range(100):
                try:
                    answer = await client.get(f"http://127.0.0.1:{server.port}/metrics")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        assert answer.status_code == 200
    finally:
        server.stop()


@pytest.mark.parametrize("url", BAD_URLS)
async def test_register_rejects_bad_urls(grpc_node: GrpcNode, url: str) -> None:
    error = await rpc_error(grpc_node.webhooks.RegisterWebhook(webhooks_pb2.RegisterWebhookRequest(url=url)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details()
    assert await webhook_urls(grpc_node) == []


async def test_webhook_limit(grpc_node: GrpcNode) -> None:
    for i in range(MAX_WEBHOOKS):
        await grpc_node.webhooks.RegisterWebhook(
            webhooks_pb2.RegisterWebhookRequest(url=f"http://h{i}.invalid/")
        )
    error = await rpc_error(
        grpc_node.webhooks.RegisterWebhook(
            webhooks_pb2.RegisterWebhookRequest(url="http://one-more.invalid/")
        )
    )
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Registering a known one again is still fine at the limit.
    await grpc_node.webhooks.RegisterWebhook(webhooks_pb2.RegisterWebhookRequest(url="http://h0.invalid/"))
    assert len(await webhook_urls(grpc_node)) == MAX_WEBHOOKS


async def test_deregister_unknown(grpc_node: GrpcNode) -> None:
    error = await rpc_error(
        grpc_node.webhooks.DeregisterWebhook(webhooks_pb2.DeregisterWebhookRequest(url="http://x.invalid/"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await rpc_error(grpc_node.webhooks.DeregisterWebhook(webhooks_pb2.DeregisterWebhookRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error.details() == "url is required"


async def test_webhooks_survive_restart(grpc_node_factory: GrpcNodeFactory) -> None:
    node = await grpc_node_factory("n")
    url = "http://127.0.0.1:9/hook"
    await node.webhooks.RegisterWebhook(webhooks_pb2.RegisterWebhookRequest(url=url))
    await node.webhooks.RegisterWebhook(webhooks_pb2.RegisterWebhookRequest(url="http://127.0.0.1:9/gone"))
    await node.webhooks.DeregisterWebhook(
        webhooks_pb2.DeregisterWebhookRequest(url="http://127.0.0.1:9/gone")
    )
    await grpc_node_factory.stop(node)
    again = await grpc_node_factory("n")
    assert await webhook_urls(again) == [url]


async def test_a_step_of_stop_that_fails_leaves_the_others_to_run(
    grpc_node_factory: GrpcNodeFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The store is closed (RocksDB's lock let go) whatever failed before."""
    node = await grpc_node_factory("n")
    appended = await node.log.AppendEntry(log_pb2.AppendEntryRequest(data=Value(string_value="kept")))

    async def broken() -> None:
        raise RuntimeError("the peer watch broke")

    monkeypatch.setattr(node.node.peer_watch, "stop", broken)
    await grpc_node_factory.stop(node)
    assert "stopping the peer watch failed" in caplog.text
    again = await grpc_node_factory("n")
    got = await again.log.GetEntry(log_pb2.GetEntryRequest(id=appended.id))
    assert got.entry.data.string_value == "kept"


# -- nodes -----------------------------------------------------------------------------------


async def test_add_list_remove_nodes(grpc_node: GrpcNode) -> None:
    assert await node_urls(grpc_node) == []
    for url in ("http://127.0.0.1:9100", "http://127.0.0.1:9000", "http://127.0.0.1:9100"):
        await grpc_node.nodes.AddNode(nodes_pb2.AddNodeRequest(url=url))
    assert await node_urls(grpc_node) == ["http://127.0.0.1:9000", "http://127.0.0.1:9100"]
    await grpc_node.nodes.RemoveNode(nodes_pb2.RemoveNodeRequest(url="http://127.0.0.1:9000"))
    assert await node_urls(grpc_node) == ["http://127.0.0.1:9100"]
    error = await rpc_error(
        grpc_node.nodes.RemoveNode(nodes_pb2.RemoveNodeRequest(url="http://127.0.0.1:9000"))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "127.0.0.1:9000" in (error.details() or "")


async def test_node_urls_are_normalised(grpc_node: GrpcNode) -> None:
    await grpc_node.nodes.AddNode(nodes_pb2.AddNodeRequest(url="http://Example.COM/"))
    await grpc_node.nodes.AddNode(nodes_pb2.AddNodeRequest(url="https://example.com"))
    await grpc_node.nodes.AddNode(nodes_pb2.AddNodeRequest(url="http://[::1]:9000"))
    assert await node_urls(grpc_node) == [
        "http://[::1]:9000",
        "http://example.com:80",
        "https://example.com:443",
    ]
    # The same node under another spelling is the same node.
    await grpc_node.nodes.AddNode(nodes_pb2.AddNodeRequest(url="http://example.com:80"))
    await grpc_node.nodes.RemoveNode(nodes_pb2.RemoveNodeRequest(url="HTTP://EXAMPLE.COM:80/"))
    assert await node_urls(grpc_node) == ["http://[::1]:9000", "https://example.com:443"]


@pytest.mark.parametrize(
    "url",
    [
        *BAD_URLS,
        "http://example.com:8000/path",
        "http://example.com:8000/?q=1",
        "http://u:p@example.com:8000",
    ],
)
async def test_add_node_rejects_bad_urls(grpc_node: GrpcNode, url: str) -> None:
    error = await rpc_error(grpc_node.nodes.AddNode(nodes_pb2.AddNodeRequest(url=url)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details()
    assert await node_urls(grpc_node) == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://127.0.0.1:8000/"])
async def test_add_node_refuses_itself(grpc_node: GrpcNode, url: str) -> None:
    # The in-process node's root URL is http://127.0.0.1:8000 (its config's default base port).
    assert grpc_node.node.config.url == "http://127.0.0.1:8000"
    error = await rpc_error(grpc_node.nodes.AddNode(nodes_pb2.AddNodeRequest(url=url)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "itself" in (error.details() or "")
    assert await node_urls(grpc_node) == []


async def test_status(grpc_node: GrpcNode) -> None:
    status = await grpc_node.nodes.GetStatus(nodes_pb2.GetStatusRequest())
    assert status.node_id == grpc_node.node_id
    assert str(uuid.UUID(status.node_id)) == status.node_id
    assert status.url == "http://127.0.0.1:8000"
    assert (list(status.vector), status.pending, status.delivered_position, list(status.peers)) == (
        [],
        0,
        0,
        [],
    )

    for i in range(3):
        await grpc_node.log.AppendEntry(log_pb2.AppendEntryRequest(data=Value(number_value=i)))
    await grpc_node.nodes.AddNode(nodes_pb2.AddNodeRequest(url="http://127.0.0.1:9200"))
    await grpc_node.nodes.AddNode(nodes_pb2.AddNodeRequest(url="http://127.0.0.1:9100"))
    status = await grpc_node.nodes.GetStatus(nodes_pb2.GetStatusRequest())
    assert [(c.owner, c.seq) for c in status.vector] == [(grpc_node.node_id, 3)]
    assert (status.pending, status.delivered_position) == (0, 3)
    assert [p.url for p in status.peers] == ["http://127.0.0.1:9100", "http://127.0.0.1:9200"]
    assert all(p.state != nodes_pb2.PeerStatus.STATE_UNSPECIFIED for p in status.peers)


async def test_membership_survives_restart(grpc_node_factory: GrpcNodeFactory) -> None:
    node = await grpc_node_factory("n")
    await node.nodes.AddNode(nodes_pb2.AddNodeRequest(url="http://127.0.0.1:9100"))
    await node.nodes.AddNode(nodes_pb2.AddNodeRequest(url="http://127.0.0.1:9200"))
    await node.nodes.RemoveNode(nodes_pb2.RemoveNodeRequest(url="http://127.0.0.1:9200"))
    await grpc_node_factory.stop(node)
    again = await grpc_node_factory("n")
    assert await node_urls(again) == ["http://127.0.0.1:9100"]


# -- CoreRestService (the REST shapes) over gRPC --------------------------------------------------


async def test_core_rest_shapes(grpc_node: GrpcNode) -> None:
    assert orjson.loads((await grpc_node.rest.GetLogHeads(core_rest_pb2.GetLogHeadsRequest())).data) == {}
    call = grpc_node.rest.PostLogEntry(core_rest_pb2.PostLogEntryRequest(body=HttpBody(data=b'"hello"')))
    response = await call
    metadata = dict((k, v) for k, v in (await call.trailing_metadata() or ()))
    assert metadata.get("x-http-code") == "201"
    assert metadata.get("location") == f"/log/{response.id}"
    second = await grpc_node.rest.PostLogEntry(
        core_rest_pb2.PostLogEntryRequest(body=HttpBody(data=b"2"), dependency=[response.id])
    )

    heads = orjson.loads((await grpc_node.rest.GetLogHeads(core_rest_pb2.GetLogHeadsRequest())).data)
    firsts = orjson.loads((await grpc_node.rest.GetLogFirsts(core_rest_pb2.GetLogFirstsRequest())).data)
    assert heads == {grpc_node.node_id: second.id}
    assert firsts == {grpc_node.node_id: response.id}

    entry = orjson.loads(
        (await grpc_node.rest.GetLogEntry(core_rest_pb2.GetLogEntryRequest(id=second.id))).data
    )
    when = entry.pop("when")
    assert entry == {
        "data": 2,
        "dependencies": [response.id],
        "id": second.id,
        "next": None,
        "owner": grpc_node.node_id,
        "prev": response.id,
        "seq": 2,
    }
    assert set(when) == {"wall_ms", "logical"}
    first = orjson.loads(
        (await grpc_node.rest.GetLogEntry(core_rest_pb2.GetLogEntryRequest(id=response.id))).data
    )
    assert (first["prev"], first["next"], first["dependencies"]) == (None, second.id, [])

    await grpc_node.nodes.AddNode(nodes_pb2.AddNodeRequest(url="http://127.0.0.1:9100"))
    nodes: JSON = orjson.loads((await grpc_node.rest.GetNodes(core_rest_pb2.GetNodesRequest())).data)
    assert nodes == ["http://127.0.0.1:9100"]


async def test_core_rest_errors(grpc_node: GrpcNode) -> None:
    error = await rpc_error(grpc_node.rest.GetLogEntry(core_rest_pb2.GetLogEntryRequest(id="nope")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = await rpc_error(
        grpc_node.rest.GetLogEntry(core_rest_pb2.GetLogEntryRequest(id=str(uuid.uuid4())))
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = await rpc_error(
        grpc_node.rest.PostLogEntry(
            core_rest_pb2.PostLogEntryRequest(body=HttpBody(data=b"1"), dependency=["x"])
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = await rpc_error(grpc_node.rest.PostLogEntry(core_rest_pb2.PostLogEntryRequest()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    for body in (b"{'single': 'quotes'}", b"[1,]", b"NaN", rb'"\ud800"', b"\xff", b"[" * 100 + b"]" * 100):
        error = await rpc_error(
            grpc_node.rest.PostLogEntry(core_rest_pb2.PostLogEntryRequest(body=HttpBody(data=body)))
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, body
    assert orjson.loads((await grpc_node.rest.GetLogHeads(core_rest_pb2.GetLogHeadsRequest())).data) == {}
