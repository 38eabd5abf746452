"""Webhook SSRF protection on real node processes: deny-private refuses private targets at
registration (REST 400 with the reason) and at delivery (a failed attempt in ListWebhooks); an
allowlist admits exactly its host:port entries."""

from __future__ import annotations

import grpc
import httpx
import pytest

from potboiler.server.processes import NodeProcess
from potboiler.v1 import webhooks_pb2, webhooks_pb2_grpc
from tests.conftest import wait_for_sync
from tests.node_processes import NodeProcesses
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e


def webhooks(node: NodeProcess) -> list[webhooks_pb2.Webhook]:
    """ListWebhooks over the node's direct gRPC port."""
    with grpc.insecure_channel(node.grpc_target) as channel:
        response = webhooks_pb2_grpc.WebhooksServiceStub(channel).ListWebhooks(
            webhooks_pb2.ListWebhooksRequest(), timeout=10
        )
    return list(response.webhooks)


#: Targets deny-private refuses at registration, with (part of) the reason given.
REFUSED = [
    ("http://127.0.0.1/", "127.0.0.1 is a loopback address"),
    ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
    ("http://localhost:8080/hook", "localhost resolves to an address that is not public"),
    ("http://[fe80::1%25lo]/", "fe80::1 is a link-local address"),
    ("http://[::1]:8080/hook", "::1 is a loopback address"),
    ("http://[::ffff:10.0.0.1]/", "10.0.0.1 is a private address"),
    ("http://0.0.0.0:9/", "unspecified"),
]


def test_deny_private_refuses_private_targets_at_registration(nodes: NodeProcesses) -> None:
    node = nodes("strict", extra_args=["--webhook-policy", "deny-private"])
    with httpx.Client(base_url=node.rest_url, timeout=30) as http:
        for url, reason in REFUSED:
            response = http.post("/log/register", json={"url": url})
            assert response.status_code == 400, (url, response.text)
            message = response.json()["message"]
            assert "refused" in message and reason in message, (url, message)
    assert webhooks(node) == []


def test_a_target_refused_at_delivery_is_reported_as_failing(
    nodes: NodeProcesses, receiver: Receiver
) -> None:
    """Registered under allow-all, the node restarts with deny-private: the stored URL (a name
    that resolves to loopback) is refused at every attempt, reported in last_error."""
    node = nodes("hooked")
    url = receiver.url("/hook", host="localhost")
    with httpx.Client(base_url=node.rest_url, timeout=30) as http:
        assert http.post("/log/register", json={"url": url}).status_code == 204
        assert http.post("/log", json="before").status_code == 201
        wait_for_sync(lambda: len(receiver.received()) == 1, message="first delivery")
    node.stop()
    node.extra_args = ["--webhook-policy", "deny-private"]
    nodes.start(node)
    with httpx.Client(base_url=node.rest_url, timeout=30) as http:
        assert http.post("/log", json="after").status_code == 201

    def failing() -> webhooks_pb2.Webhook | None:
        hooks = webhooks(node)
        return hooks[0] if hooks and hooks[0].failures >= 2 else None

    hook = wait_for_sync(failing, message=lambda: str(webhooks(node)))
    assert hook is not None
    assert hook.url == url
    assert "localhost resolves to an address that is not public" in hook.last_error
    assert hook.delivered_position == 1
    assert len(receiver.received()) == 1


def test_allowlist_admits_exactly_the_listed_host_and_port(nodes: NodeProcesses, receiver: Receiver) -> None:
    node = nodes(
        "listed",
        extra_args=["--webhook-policy", "allowlist", "--webhook-allow", f"127.0.0.1:{receiver.port}"],
    )
    with httpx.Client(base_url=node.rest_url, timeout=30) as http:
        for refused in (
            receiver.url("/hook", host="localhost"),
            f"http://127.0.0.1:{receiver.port + 1}/hook",
            "http://127.0.0.1/hook",
            "http://169.254.169.254/",
        ):
            response = http.post("/log/register", json={"url": refused})
            assert response.status_code == 400, (refused, response.text)
            assert "not in the webhook allowlist" in response.json()["message"]
        assert http.post("/log/register", json={"url": receiver.url("/hook")}).status_code == 204
        assert http.post("/log", json={"n": 1}).status_code == 201
        wait_for_sync(lambda: len(receiver.received("/hook")) == 1, message="delivery to the allowed target")
    assert [h.url for h in webhooks(node)] == [receiver.url("/hook")]
