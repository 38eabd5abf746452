"""Fixtures of the bad-input suite: one real node (with its Envoy) per test module, clients for each of
its surfaces, and a digest of everything it stores, to show that bad requests change nothing.

Import the helpers as `from tests.badinput.conftest import ...` (registered below, as tests/conftest.py
does).

- `node`: a `potboiler node` on a free base port (a `tests.node_processes.NodeProcesses` starts it),
  with a table of each KV type, a queue, a task and a few entries made up front (so the digest covers
  non-empty state); stopped at the end of the module.
- `BadInputNode.unchanged()`: a context manager that takes the digest before and after (GET /log and
  /log/first, /status, /nodes, every KV table, key and value, every queue's listing and task views,
  the webhooks) and asserts they are equal and the node process is still alive.
- `client_error(response)`: asserts a 4xx with a message (never a 5xx).
- `FUZZ`: the hypothesis settings of this suite (few examples, derandomized: the same inputs every run).
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, settings

from potboiler.server.processes import NodeProcess
from potboiler.server.services import SERVICES
from potboiler.v1 import log_pb2_grpc, webhooks_pb2, webhooks_pb2_grpc
from tests.node_processes import NodeProcesses

sys.modules.setdefault("tests.badinput.conftest", sys.modules[__name__])

HERE = Path(__file__).parent
#: Hypothesis settings: modest example counts (each example is a request to a real node), the same
#: examples every run, no example database.
FUZZ = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
#: Tables made up front, one of each type, and the queue.
TABLES = {
    "t_lww": "LWW",
    "t_orset": "ORSET",
    "t_gset": "GSET",
    "t_counter": "PNCOUNTER",
    "t_mv": "MVREGISTER",
}
QUEUE = "badq"
#: Optional services the node runs (see potboiler.server.services); tests of the others skip.
HAS_KV, HAS_PIGTAIL = "kv" in SERVICES, "pigtail" in SERVICES
needs_kv = pytest.mark.skipif(
    not HAS_KV, reason="the KV service is not registered in potboiler.server.services"
)
needs_pigtail = pytest.mark.skipif(
    not HAS_PIGTAIL, reason="the Pigtail service is not registered in potboiler.server.services"
)
#: A string that is a UUID, and one that is a valid queue or table name: what fuzzed strings avoid.
UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
GRPC_OPTIONS = [("grpc.max_send_message_length", 128 << 20), ("grpc.max_receive_message_length", 128 << 20)]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every bad-input test talks to a real node process: mark them e2e (`-m "not e2e"` skips them)."""
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)


def client_error(response: httpx.Response, *allowed: int) -> None:
    """A 4xx answer (one of `allowed` if given) that says what was wrong; never a 5xx."""
    assert 400 <= response.status_code < 500, (
        f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text[:300]}"
    )
    if allowed:
        assert response.status_code in allowed, (
            f"{response.status_code} not in {allowed}: {response.text[:300]}"
        )
    assert response.text.strip(), f"{response.status_code} without a message"


class BadInputNode:
    """A running node and clients for its REST ports and its direct gRPC port."""

    def __init__(self, process: NodeProcess) -> None:
        self.process = process
        ports = process.ports
        self.core = httpx.Client(base_url=process.url, timeout=30.0)
        self.kv = httpx.Client(base_url=process.port_url(ports.kv), timeout=30.0)
        self.pigtail = httpx.Client(base_url=process.port_url(ports.pigtail), timeout=30.0)
        self.channel = grpc.insecure_channel(process.grpc_target, options=GRPC_OPTIONS)
        self.log = log_pb2_grpc.LogServiceStub(self.channel)
        self.webhooks = webhooks_pb2_grpc.WebhooksServiceStub(self.channel)
        self.task_ids: list[str] = []

    def close(self) -> None:
        for client in (self.core, self.kv, self.pigtail):
            client.close()
        self.channel.close()

    def get(self, client: httpx.Client, path: str) -> Any:
        response = client.get(path)
        assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text[:200]}"
        return response.json()

    def digest(self) -> dict[str, Any]:
        """Everything the node stores, as its clients see it."""
        status = self.get(self.core, "/status")
        out: dict[str, Any] = {
            "heads": self.get(self.core, "/log"),
            "firsts": self.get(self.core, "/log/first"),
            "vector": status.get("vector"),
            "delivered": status.get("delivered_position"),
            "pending": status.get("pending"),
            "peers": [p["url"] for p in status.get("peers", [])],
            "nodes": self.get(self.core, "/nodes"),
            "webhooks": sorted(
                w.url for w in self.webhooks.ListWebhooks(webhooks_pb2.ListWebhooksRequest()).webhooks
            ),
        }
        kv: dict[str, Any] = {}
        for table in self.get(self.kv, "/kv"):
            kv[table] = {
                key: self.get(self.kv, f"/kv/{table}/{key}") for key in self.get(self.kv, f"/kv/{table}")
            }
        out["kv"] = kv
        queues: dict[str, Any] = {}
        for queue in self.get(self.pigtail, "/queue"):
            queues[queue] = self.get(self.pigtail, f"/queue/{queue}")
        out["queues"] = queues
        out["tasks"] = {t: self.get(self.pigtail, f"/queue/{QUEUE}/{t}") for t in self.task_ids}
        return out

    def alive(self) -> bool:
        return self.process.alive()

    @contextlib.contextmanager
    def unchanged(self) -> Iterator[None]:
        """Assert that what runs inside changes nothing the node stores, and does not kill it."""
        before = self.digest()
        yield
        assert self.alive(), f"the node died; see {self.process.log_file}"
        after = self.digest()
        changed = sorted(k for k in before if before[k] != after[k])
        assert not changed, f"bad input changed the node's state: {changed}: {before} -> {after}"


def seed_state(node: BadInputNode) -> None:
    """A little of everything, so the digest is not of an empty node."""
    for i in range(3):
        assert node.core.post("/log", json={"seed": i}).status_code == 201
    if HAS_KV:
        seed_kv(node)
    if HAS_PIGTAIL:
        response = node.pigtail.post("/create", json={"name": QUEUE, "timeout_ms": 60_000})
        assert response.status_code == 201, response.text
        response = node.pigtail.post(f"/queue/{QUEUE}", json={"task_name": "seeded", "info": {"n": 1}})
        assert response.status_code == 201, response.text
        node.task_ids.append(response.json()["id"])


def seed_kv(node: BadInputNode) -> None:
    """A table of each type, with a key written."""
    for table, crdt in TABLES.items():
        response = node.kv.post(f"/kv/_config/{table}", json={"op": "set", "change": {"crdt": crdt}})
        assert response.status_code == 200, response.text
    writes = {
        "t_lww": {"op": "set", "change": {"a": 1}},
        "t_orset": {"op": "add", "change": {"item": "x", "key": "x", "metadata": None}},
        "t_gset": {"op": "add", "change": {"item": "y", "key": "y", "metadata": None}},
        "t_counter": {"op": "increment", "change": 5},
        "t_mv": {"op": "set", "change": "v"},
    }
    for table, body in writes.items():
        response = node.kv.post(f"/kv/{table}/k1", json=body)
        assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BadInputNode]:
    """One node for the whole module, with seeded state."""
    with NodeProcesses(tmp_path_factory.mktemp("badinput")) as nodes:
        handle = BadInputNode(nodes("node"))
        try:
            seed_state(handle)
            yield handle
        finally:
            handle.close()
