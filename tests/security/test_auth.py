"""Client authentication with bearer tokens, on real node processes: over REST through Envoy and
over direct gRPC alike, no token or a bad token is 401 / UNAUTHENTICATED, a read token reads but
cannot write (403 / PERMISSION_DENIED), a write token does both but cannot change the cluster (an
admin token can), health checks stay open; a changed tokens file is taken without a restart, and
ends the streams of a revoked token. Peers authenticate with an admin token without mTLS, with
their certificate with mTLS; and a hardened node (mTLS, tokens, HTTPS for REST) serves REST over
HTTPS only."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.struct_pb2 import Value
from grpc_health.v1 import health_pb2

from potboiler.server import cli
from potboiler.server.processes import NodeProcess
from potboiler.server.tokens import Role, token_line
from potboiler.v1 import log_pb2, log_pb2_grpc, nodes_pb2, nodes_pb2_grpc
from tests.conftest import wait_for_sync
from tests.node_processes import NodeProcesses
from tests.security.conftest import ADMIN_TOKEN, READ_TOKEN, WRITE_TOKEN, Pki

pytestmark = pytest.mark.e2e


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def grpc_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


@pytest.fixture
def token_node(nodes: NodeProcesses, tokens: Path) -> NodeProcess:
    return nodes("guarded", extra_args=["--auth-tokens", str(tokens)])


def test_rest_needs_a_token_and_a_write_token_to_write(token_node: NodeProcess) -> None:
    with httpx.Client(base_url=token_node.rest_url, timeout=30) as http:
        for headers in ({}, bearer("not-a-token"), {"authorization": f"Basic {WRITE_TOKEN}"}):
            for response in (http.get("/log", headers=headers), http.post("/log", json=1, headers=headers)):
                assert response.status_code == 401, response.text
                assert response.json()["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]

        assert http.get("/log", headers=bearer(READ_TOKEN)).status_code == 200
        refused = http.post("/log", json={"x": 1}, headers=bearer(READ_TOKEN))
        assert refused.status_code == 403, refused.text
        assert "needs a write token" in refused.json()["message"]
        assert (
            http.post("/nodes", json={"url": "http://127.0.0.1:1"}, headers=bearer(READ_TOKEN)).status_code
            == 403
        )
        assert http.get("/log", headers=bearer(READ_TOKEN)).json() == {}

        created = http.post("/log", json={"x": 1}, headers=bearer(WRITE_TOKEN))
        assert created.status_code == 201, created.text
        entry_id = created.json()["id"]
        assert http.get(f"/log/{entry_id}", headers=bearer(READ_TOKEN)).json()["data"] == {"x": 1}
        assert http.get(f"/log/{entry_id}", headers=bearer(WRITE_TOKEN)).status_code == 200

        # Changing the cluster needs an admin token: a write token could otherwise make this node
        # send its peer token and every entry to a server of the writer's choosing.
        member = {"url": "http://127.0.0.1:1"}
        refused = http.post("/nodes", json=member, headers=bearer(WRITE_TOKEN))
        assert refused.status_code == 403, refused.text
        assert "AddNode needs an admin token; this one is a write token" in refused.json()["message"]
        assert http.request("DELETE", "/nodes", json=member, headers=bearer(WRITE_TOKEN)).status_code == 403
        assert http.post("/nodes", json=member, headers=bearer(ADMIN_TOKEN)).status_code == 204
        assert http.get("/nodes", headers=bearer(READ_TOKEN)).json() == [member["url"]]
        assert http.request("DELETE", "/nodes", json=member, headers=bearer(ADMIN_TOKEN)).status_code == 204
        assert http.post("/log", json={"by": "admin"}, headers=bearer(ADMIN_TOKEN)).status_code == 201

    # The other REST ports (KV here) are covered by the same check.
    with httpx.Client(base_url=token_node.port_url(token_node.ports.kv), timeout=30) as kv:
        assert kv.get("/kv").status_code == 401
        assert kv.get("/kv", headers=bearer(READ_TOKEN)).status_code == 200
        config = {"op": "set", "change": {"crdt": "LWW"}}
        assert kv.post("/kv/_config/t", json=config).status_code == 401
        assert kv.post("/kv/_config/t", json=config, headers=bearer(READ_TOKEN)).status_code == 403


def test_a_changed_tokens_file_is_taken_without_a_restart(nodes: NodeProcesses, tokens: Path) -> None:
    node = nodes("rotating", extra_args=["--auth-tokens", str(tokens)])

    def replace(text: str) -> None:  # as an operator should: a new file renamed over the old one
        fresh = tokens.with_name("tokens.new")
        fresh.write_text(text)
        fresh.replace(tokens)

    def node_log_says(text: str) -> bool:
        return text in node.log_file.read_text()

    new_token = "rotated-token-2468013579"
    with httpx.Client(base_url=node.rest_url, timeout=30) as http:

        def appends_with(token: str) -> int:
            return http.post("/log", json={"by": token}, headers=bearer(token)).status_code

        assert appends_with(new_token) == 401
        assert appends_with(WRITE_TOKEN) == 201
        with grpc.insecure_channel(node.grpc_target) as channel:
            # A stream opened with the token to be revoked, and one with a token that stays.
            subscribe = log_pb2_grpc.LogServiceStub(channel).SubscribeEntries
            request = log_pb2.SubscribeEntriesRequest(after_position=0)
            doomed = subscribe(request, metadata=grpc_metadata(WRITE_TOKEN), timeout=60)
            staying = subscribe(request, metadata=grpc_metadata(READ_TOKEN), timeout=60)
            assert next(doomed).entries and next(staying).entries
            replace(f"{token_line(READ_TOKEN, Role.READ)}\n{token_line(new_token, Role.WRITE)}\n")
            wait_for_sync(lambda: appends_with(new_token) == 201, message="the new token taken")
            assert appends_with(WRITE_TOKEN) == 401  # revoked
            with pytest.raises(grpc.RpcError) as ended:
                next(doomed)
            assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "revoked" in (ended.value.details() or "")
            assert next(staying).entries  # the new token's append
            staying.cancel()
        assert http.get("/log", headers=bearer(READ_TOKEN)).status_code == 200
        assert node_log_says("reloaded the tokens file")
        wait_for_sync(lambda: node_log_says("ended 1 streaming calls"), message="the stream ended")

        # A broken file (or none) changes nothing: the tokens in use stay, and the log says why.
        replace("not a tokens file\n")
        wait_for_sync(lambda: node_log_says("kept the tokens in use"), message="the broken file refused")
        tokens.unlink()
        wait_for_sync(
            lambda: node_log_says("cannot read the tokens file"), message="the missing file noticed"
        )
        assert appends_with(new_token) == 201
        assert appends_with(WRITE_TOKEN) == 401

        # A file left with no tokens revokes them all (an operator locking everything down).
        replace("# every token revoked\n")
        wait_for_sync(lambda: appends_with(new_token) == 401, message="every token revoked")
        assert http.get("/log", headers=bearer(READ_TOKEN)).status_code == 401
        assert node_log_says("holds no tokens now: every call is refused")


@pytest.mark.parametrize("port", ["direct", "envoy"])
def test_grpc_needs_a_token_and_a_write_token_to_write(token_node: NodeProcess, port: str) -> None:
    target = token_node.grpc_target if port == "direct" else f"{token_node.host}:{token_node.ports.core}"
    with grpc.insecure_channel(target) as channel:
        log = log_pb2_grpc.LogServiceStub(channel)
        append = log_pb2.AppendEntryRequest(data=Value(string_value="hi"))

        def code_of(call: Any, request: Any, token: str | None) -> grpc.StatusCode:
            try:
                call(request, metadata=grpc_metadata(token), timeout=10)
            except grpc.RpcError as exc:
                code: grpc.StatusCode = exc.code()
                return code
            return grpc.StatusCode.OK

        heads = log_pb2.ListHeadsRequest()
        assert code_of(log.ListHeads, heads, None) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(log.ListHeads, heads, "wrong") == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(log.AppendEntry, append, None) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(log.ListHeads, heads, READ_TOKEN) == grpc.StatusCode.OK
        assert code_of(log.AppendEntry, append, READ_TOKEN) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(log.AppendEntry, append, WRITE_TOKEN) == grpc.StatusCode.OK
        nodes = nodes_pb2_grpc.NodesServiceStub(channel)
        assert code_of(nodes.GetStatus, nodes_pb2.GetStatusRequest(), READ_TOKEN) == grpc.StatusCode.OK

        # Health checks stay open.
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        health = check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def entry_owner(http: httpx.Client, entry_id: str, token: str) -> str:
    owner = http.get(f"/log/{entry_id}", headers=bearer(token)).json()["owner"]
    assert isinstance(owner, str)
    return owner


def test_without_mtls_peers_need_an_admin_token(nodes: NodeProcesses, tokens: Path, tmp_path: Path) -> None:
    (tmp_path / "peer-token").write_text(ADMIN_TOKEN + "\n")
    common = ["--auth-tokens", str(tokens)]
    a = nodes("a", extra_args=[*common, "--peer-token-file", str(tmp_path / "peer-token")])
    b = nodes("b", peers=[a.url], extra_args=[*common, "--peer-token", ADMIN_TOKEN])
    writer = nodes("writer", peers=[a.url], extra_args=[*common, "--peer-token", WRITE_TOKEN])
    anonymous = nodes("anonymous", peers=[a.url], extra_args=common)
    with (
        httpx.Client(base_url=a.rest_url, timeout=30) as http_a,
        httpx.Client(base_url=b.rest_url, timeout=30) as http_b,
    ):
        entry_id = http_a.post("/log", json="shared", headers=bearer(WRITE_TOKEN)).json()["id"]
        owner = entry_owner(http_a, entry_id, WRITE_TOKEN)
        wait_for_sync(
            lambda: http_b.get("/log", headers=bearer(READ_TOKEN)).json().get(owner) == entry_id,
            message="a's entry on b",
        )
        for refused in (writer, anonymous):
            with httpx.Client(base_url=refused.rest_url, timeout=30) as http:

                def failed(http: httpx.Client = http) -> bool:
                    peers = http.get("/status", headers=bearer(READ_TOKEN)).json()["peers"]
                    return any("UNAUTHENTICATED" in p["last_error"] for p in peers)

                wait_for_sync(failed, message=f"{refused.data_dir.name} refused by a")
                assert http.get("/log", headers=bearer(READ_TOKEN)).json() == {}
                # Refused, not removed: it keeps trying (a token fixed later lets it in).
                assert http.get("/nodes", headers=bearer(READ_TOKEN)).json() == [a.url]
        assert http_a.get("/nodes", headers=bearer(READ_TOKEN)).json() == [b.url]


def test_peer_tokens_rotate_without_a_restart(nodes: NodeProcesses, tokens: Path, tmp_path: Path) -> None:
    """The whole rotation, nodes running throughout: the new admin token is added to the tokens
    file, each node's peer token file gets it, the old token is removed; the streams opened with
    the old token end, the nodes dial again with the new one, and replication goes on."""
    new_admin = "rotated-admin-token-97531"

    def replace(path: Path, text: str) -> None:
        fresh = path.with_name(path.name + ".new")
        fresh.write_text(text)
        fresh.replace(path)

    peer_tokens = [tmp_path / "peer-token-a", tmp_path / "peer-token-b"]
    for path in peer_tokens:
        path.write_text(ADMIN_TOKEN + "\n")
    a = nodes("a", extra_args=["--auth-tokens", str(tokens), "--peer-token-file", str(peer_tokens[0])])
    b = nodes(
        "b",
        peers=[a.url],
        extra_args=["--auth-tokens", str(tokens), "--peer-token-file", str(peer_tokens[1])],
    )
    lines = [token_line(READ_TOKEN, Role.READ), token_line(WRITE_TOKEN, Role.WRITE)]
    with (
        httpx.Client(base_url=a.rest_url, timeout=30) as http_a,
        httpx.Client(base_url=b.rest_url, timeout=30) as http_b,
    ):

        def replicated() -> None:
            entry_id = http_a.post("/log", json="rotating", headers=bearer(WRITE_TOKEN)).json()["id"]
            owner = entry_owner(http_a, entry_id, WRITE_TOKEN)
            wait_for_sync(
                lambda: http_b.get("/log", headers=bearer(READ_TOKEN)).json().get(owner) == entry_id,
                message="a's entry on b",
            )

        replicated()
        replace(
            tokens,
            "".join(
                f"{line}\n"
                for line in [*lines, token_line(ADMIN_TOKEN, Role.ADMIN), token_line(new_admin, Role.ADMIN)]
            ),
        )
        for path in peer_tokens:
            replace(path, new_admin + "\n")
        for node in (a, b):

            def took_it(node: NodeProcess = node) -> bool:
                return "reloaded the peer token file" in node.log_file.read_text()

            wait_for_sync(took_it, message=f"{node.data_dir.name} took its new peer token")
        replace(tokens, "".join(f"{line}\n" for line in [*lines, token_line(new_admin, Role.ADMIN)]))
        wait_for_sync(
            lambda: any("streaming calls whose token" in n.log_file.read_text() for n in (a, b)),
            message="the stream opened with the old token ended",
        )
        replicated()
        for http in (http_a, http_b):

            def live(http: httpx.Client = http) -> bool:
                peers = http.get("/status", headers=bearer(READ_TOKEN)).json()["peers"]
                return bool(peers) and all(p["state"] == "STATE_LIVE" and not p["last_error"] for p in peers)

            wait_for_sync(live, message="replicating with the new token")


def test_a_hardened_cluster(nodes: NodeProcesses, pki: Pki, tokens: Path) -> None:
    """mTLS, tokens and HTTPS together: peers replicate on their certificates alone (no peer
    token), REST is served over HTTPS only, and still needs tokens."""
    hardened = [*pki.cluster.node_args(), *pki.cluster.rest_args(), "--auth-tokens", str(tokens)]
    a = nodes("a", extra_args=hardened)
    b = nodes("b", peers=[a.url], extra_args=hardened)
    assert a.rest_url.startswith("https://")
    verify = ssl.create_default_context(cafile=str(pki.cluster.ca))
    with (
        httpx.Client(base_url=a.rest_url, timeout=30, verify=verify) as http_a,
        httpx.Client(base_url=b.rest_url, timeout=30, verify=verify) as http_b,
    ):
        assert http_a.get("/log").status_code == 401
        assert http_a.post("/log", json=1, headers=bearer(READ_TOKEN)).status_code == 403
        created = http_a.post("/log", json={"safe": True}, headers=bearer(WRITE_TOKEN))
        assert created.status_code == 201, created.text
        entry_id = created.json()["id"]
        owner = entry_owner(http_a, entry_id, READ_TOKEN)
        wait_for_sync(
            lambda: http_b.get("/log", headers=bearer(READ_TOKEN)).json().get(owner) == entry_id,
            message="a's entry on b",
        )
        kv = http_b.get(f"{b.port_url(b.ports.kv)}/kv", headers=bearer(READ_TOKEN))
        assert kv.status_code == 200
    # `potboiler status` with a token and the CA.
    assert cli.show_status(b.rest_url, READ_TOKEN, pki.cluster.ca) == 0
    assert cli.show_status(b.rest_url, None, pki.cluster.ca) == 1

    # Plain HTTP on the HTTPS port fails; a client that does not trust the CA is refused.
    with httpx.Client(timeout=10) as plain:
        with pytest.raises(httpx.HTTPError):
            plain.get(f"http://{a.host}:{a.ports.core}/log", headers=bearer(READ_TOKEN))
        with pytest.raises(httpx.ConnectError):
            plain.get(f"{a.rest_url}/log", headers=bearer(READ_TOKEN))


def test_rest_over_https_alone(nodes: NodeProcesses, pki: Pki) -> None:
    """--rest-tls-cert without anything else: every REST port is HTTPS (HTTP/2 offered too), and
    gRPC through the gateway works over TLS."""
    a = nodes("a", extra_args=pki.cluster.rest_args())
    verify = ssl.create_default_context(cafile=str(pki.cluster.ca))
    with httpx.Client(timeout=30, verify=verify) as http:
        for port in (a.ports.core, a.ports.kv, a.ports.browser, a.ports.pigtail):
            assert a.port_url(port).startswith("https://")
        assert http.post(f"{a.rest_url}/log", json=1).status_code == 201
        assert http.get(f"{a.port_url(a.ports.kv)}/kv").json() == []
        assert http.get(f"{a.port_url(a.ports.browser)}/").status_code == 200
    credentials = grpc.ssl_channel_credentials(pki.cluster.ca.read_bytes())
    with grpc.secure_channel(f"localhost:{a.ports.core}", credentials) as channel:
        heads = log_pb2_grpc.LogServiceStub(channel).ListHeads(log_pb2.ListHeadsRequest(), timeout=10)
        assert len(heads.heads) == 1
