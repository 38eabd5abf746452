"""mTLS between nodes, with real node processes: two nodes with certificates from the cluster CA
replicate; a node with a certificate from another CA is refused and receives nothing; REST (and
plain gRPC) through Envoy keep working; the direct gRPC port refuses clients without a cluster
certificate; replication cannot be reached through the gateway."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.struct_pb2 import Value

from potboiler.server.processes import NodeProcess
from potboiler.v1 import (
    log_pb2,
    log_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
    replication_pb2,
    replication_pb2_grpc,
)
from tests.conftest import wait_for_sync
from tests.node_processes import NodeProcesses
from tests.security.conftest import Identity, Pki, make_identity

pytestmark = pytest.mark.e2e


@contextmanager
def direct_channel(
    node: NodeProcess, identity: Identity | None, client_cert: bool = True
) -> Iterator[grpc.Channel]:
    """A channel to the node's direct gRPC port: TLS trusting `identity`'s CA (with its client
    certificate unless client_cert=False), or plaintext when identity is None."""
    if identity is None:
        channel = grpc.insecure_channel(node.grpc_target)
    else:
        channel = grpc.secure_channel(node.grpc_target, identity.channel_credentials(client_cert))
    with channel:
        yield channel


def status(node: NodeProcess, identity: Identity) -> nodes_pb2.GetStatusResponse:
    with direct_channel(node, identity) as channel:
        response = nodes_pb2_grpc.NodesServiceStub(channel).GetStatus(
            nodes_pb2.GetStatusRequest(), timeout=10
        )
    assert isinstance(response, nodes_pb2.GetStatusResponse)
    return response


def heads(http: httpx.Client) -> dict[str, Any]:
    response = http.get("/log")
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, dict)
    return body


def test_nodes_with_cluster_certificates_replicate_and_others_are_refused(
    nodes: NodeProcesses, pki: Pki
) -> None:
    a = nodes("a", extra_args=pki.cluster.node_args())
    b = nodes("b", peers=[a.url], extra_args=pki.cluster.node_args())
    rogue = nodes("rogue", peers=[a.url, b.url], extra_args=pki.rogue.node_args())
    with (
        httpx.Client(base_url=a.rest_url, timeout=30) as http_a,
        httpx.Client(base_url=b.rest_url, timeout=30) as http_b,
        httpx.Client(base_url=rogue.rest_url, timeout=30) as http_rogue,
    ):
        # REST through Envoy (which speaks TLS with the node's certificate to its gRPC server).
        created = http_a.post("/log", json={"hello": "mtls"})
        assert created.status_code == 201, created.text
        entry_id = created.json()["id"]
        owner = http_a.get(f"/log/{entry_id}").json()["owner"]
        wait_for_sync(lambda: heads(http_b).get(owner) == entry_id, message="a's entry on b")
        assert http_b.get(f"/log/{entry_id}").json()["data"] == {"hello": "mtls"}
        from_b = http_b.post("/log", json=2).json()["id"]
        owner_b = http_b.get(f"/log/{from_b}").json()["owner"]
        wait_for_sync(lambda: heads(http_a).get(owner_b) == from_b, message="b's entry on a")

        # The rogue node (certificate from another CA) has tried both peers and failed the TLS
        # handshake every time; a and b never learnt of it.
        def rogue_refused() -> bool:
            peers = status(rogue, pki.rogue).peers
            return len(peers) == 2 and all(p.last_error and p.state == p.STATE_DISCONNECTED for p in peers)

        wait_for_sync(rogue_refused, message=lambda: str(status(rogue, pki.rogue)))
        # Meanwhile a new entry reached b from a: replication between members went on.
        late = http_a.post("/log", json="late").json()["id"]
        wait_for_sync(lambda: heads(http_b).get(owner) == late, message="late entry on b")
        assert heads(http_rogue) == {}
        assert http_a.get("/nodes").json() == [b.url]
        assert http_b.get("/nodes").json() == [a.url]
        assert all(p.node_id == "" for p in status(rogue, pki.rogue).peers)


def test_the_direct_grpc_port_requires_a_cluster_certificate(nodes: NodeProcesses, pki: Pki) -> None:
    a = nodes("a", extra_args=pki.cluster.node_args())
    request = log_pb2.ListHeadsRequest()
    with direct_channel(a, pki.cluster) as channel:
        log_pb2_grpc.LogServiceStub(channel).ListHeads(request, timeout=10)
    refused: list[tuple[Identity | None, bool]] = [(None, True), (pki.cluster, False), (pki.rogue, True)]
    for identity, client_cert in refused:
        with direct_channel(a, identity, client_cert) as channel, pytest.raises(grpc.RpcError) as info:
            log_pb2_grpc.LogServiceStub(channel).ListHeads(request, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (identity, client_cert)


def test_grpc_through_envoy_works_and_replication_through_it_is_refused(
    nodes: NodeProcesses, pki: Pki
) -> None:
    """The gateway forwards clients' plain gRPC to the node over TLS, but it does not make its
    clients peers: ReplicationService is not served through it."""
    a = nodes("a", extra_args=pki.cluster.node_args())
    with grpc.insecure_channel(f"{a.host}:{a.ports.core}") as channel:
        appended = log_pb2_grpc.LogServiceStub(channel).AppendEntry(
            log_pb2.AppendEntryRequest(data=Value(string_value="via envoy")), timeout=10
        )
        assert appended.id
        hello = replication_pb2.Hello(node_id=str(uuid.uuid4()), url="http://127.0.0.1:1")
        replicate = replication_pb2_grpc.ReplicationServiceStub(channel).Replicate(
            iter([replication_pb2.ReplicateRequest(hello=hello)]), timeout=10
        )
        with pytest.raises(grpc.RpcError) as info:
            list(replicate)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_envoy_refuses_a_node_certificate_that_does_not_name_the_node(
    nodes: NodeProcesses, tmp_path: Path
) -> None:
    """Envoy checks the name in the certificate of the gRPC server it forwards gRPC calls to, as
    peers do: a certificate from the trusted CA for another host (here `localhost`, the node being
    127.0.0.1) gets no gRPC client's call. (REST calls reach the node by its REST bridge, a unix
    socket in a directory only the node's user may enter: no certificate to check there.)"""
    identity = make_identity(tmp_path / "pki-localhost", "localhost")
    node = nodes("misnamed", extra_args=identity.node_args(), start=False)
    node.start(wait=False)

    def rest_status() -> int | None:
        try:
            return httpx.post(f"{node.rest_url}/log", json="by REST", timeout=5).status_code
        except httpx.TransportError:  # Envoy not listening yet
            return None

    answered = wait_for_sync(rest_status, message=node.log_tail)
    assert answered == 201, node.log_tail()
    with (
        grpc.insecure_channel(f"127.0.0.1:{node.ports.core}") as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        log_pb2_grpc.LogServiceStub(channel).AppendEntry(
            log_pb2.AppendEntryRequest(data=Value(string_value="not forwarded")), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
    # The node itself serves its direct port to a client that accepts its certificate's name: it
    # is Envoy's check that refused, and nothing was appended by gRPC.
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(node.grpc_target, identity.channel_credentials(), options) as channel:
        stub = log_pb2_grpc.LogServiceStub(channel)
        heads_now = stub.ListHeads(log_pb2.ListHeadsRequest(), timeout=10)
        [head] = heads_now.heads
        entry = stub.GetEntry(log_pb2.GetEntryRequest(id=head.head), timeout=10)
    assert head.seq == 1 and entry.entry.data.string_value == "by REST"
