"""Webhooks end to end: a real receiver (an HTTP server in a thread, on a port the OS picks) registered
on real nodes gets every entry as a JSON POST, in causal order, at least once: retried with backoff
while it fails, withheld while a dependency is missing, continued across node restarts, and stopped
by deregistering."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.struct_pb2 import Value

from potboiler.server.backoff import Backoff
from potboiler.server.processes import NodeProcess
from potboiler.v1 import log_pb2, webhooks_pb2, webhooks_pb2_grpc
from tests.conftest import GrpcNode, GrpcNodeFactory, wait_for, wait_for_sync
from tests.node_processes import NodeProcesses
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e

JSON = Any
RestClient = Callable[[NodeProcess], httpx.Client]
ENTRY_KEYS = {"data", "dependencies", "id", "next", "owner", "prev", "seq", "when"}


async def test_entries_a_failing_receiver_missed_arrive_after_a_crash(
    node_process: NodeProcesses, rest_client: RestClient, receiver: Receiver
) -> None:
    """The node is killed while the receiver fails: nothing it was retrying is lost (the cursor
    moves only past what the receiver accepted), and delivery resumes in causal order."""
    node = node_process("n")
    http = rest_client(node)
    register(http, receiver.url())
    receiver.fail("/hook")
    ids = [append(http, {"i": i}) for i in range(5)]
    await wait_for(lambda: len(receiver.received()) >= 2)  # it is retrying
    node.kill()
    node_process.start(node)
    http = rest_client(node)
    ids.append(append(http, {"after": "restart"}))
    tried = len(receiver.received())
    await wait_for(lambda: len(receiver.received()) > tried)  # the restarted node retries
    assert receiver.accepted() == []
    receiver.fail("/hook", failing=False)
    await wait_for(
        lambda: set(receiver.accepted_ids()) >= set(ids), message=lambda: f"{receiver.accepted_ids()}"
    )
    assert receiver.accepted_ids() == ids  # each once: none had been accepted before
    assert_causal(receiver.accepted())


def register(http: httpx.Client, url: str) -> None:
    response = http.post("/log/register", json={"url": url})
    assert response.status_code == 204, response.text


def append(http: httpx.Client, data: JSON, dependencies: Sequence[str] = ()) -> str:
    response = http.post("/log", json=data, params=[("dependency", d) for d in dependencies])
    assert response.status_code == 201, response.text
    entry_id: str = response.json()["id"]
    return entry_id


def assert_causal(bodies: Sequence[JSON]) -> None:
    """Each entry comes after its owner's previous entry and after its dependencies."""
    seen: set[str] = set()
    for body in bodies:
        if body["prev"] is not None:
            assert body["prev"] in seen, f"{body['id']} before its prev {body['prev']}"
        for dep in body["dependencies"]:
            assert dep in seen, f"{body['id']} before its dependency {dep}"
        seen.add(body["id"])


def without_next(entry: JSON) -> JSON:
    """An entry's JSON without `next` (which a webhook body has as known when it was sent)."""
    return {k: v for k, v in entry.items() if k != "next"}


async def webhook_state(node: NodeProcess, url: str) -> webhooks_pb2.Webhook:
    async with grpc.aio.insecure_channel(node.grpc_target) as channel:
        response = await webhooks_pb2_grpc.WebhooksServiceStub(channel).ListWebhooks(
            webhooks_pb2.ListWebhooksRequest()
        )
    [state] = [w for w in response.webhooks if w.url == url]
    return state


# -- a real node process ------------------------------------------------------------------------


def test_every_entry_in_causal_order(
    node_process: NodeProcesses, rest_client: RestClient, receiver: Receiver
) -> None:
    node = node_process("n")
    http = rest_client(node)
    before = [append(http, {"before": i}) for i in range(3)]  # registered later: still delivered
    register(http, receiver.url())
    ids = list(before)
    for i in range(12):
        deps = [ids[-2], ids[-3]] if i % 3 == 0 else []
        ids.append(append(http, {"nested": {"list": [i, None]}, "i": i}, deps))

    wait_for_sync(lambda: len(receiver.accepted()) >= len(ids), message=lambda: f"{len(receiver.accepted())}")
    bodies = receiver.accepted()
    assert [b["id"] for b in bodies] == ids  # exactly once each, in the node's delivery order
    assert [b["seq"] for b in bodies] == list(range(1, len(ids) + 1))
    assert_causal(bodies)
    for body in bodies:
        assert set(body) == ENTRY_KEYS
        assert list(body) == sorted(body) and list(body["data"]) == sorted(body["data"])  # as GET prints
        assert without_next(body) == without_next(http.get(f"/log/{body['id']}").json())
    assert all(a.content_type == "application/json" for a in receiver.received())


async def test_failing_receiver_is_retried_with_backoff_in_order(
    node_process: NodeProcesses, rest_client: RestClient, receiver: Receiver
) -> None:
    node = node_process("n")
    http = rest_client(node)
    receiver.fail("/flaky")
    register(http, receiver.url("/flaky"))
    register(http, receiver.url("/ok"))
    ids = [append(http, i) for i in range(4)]

    # A failing receiver delays only itself: the healthy one gets everything meanwhile.
    await wait_for(lambda: receiver.accepted_ids("/ok") == ids)
    await wait_for(lambda: len(receiver.received("/flaky")) >= 4)
    state = await webhook_state(node, receiver.url("/flaky"))
    assert state.failures >= 1 and "500" in state.last_error
    assert state.delivered_position == 0

    receiver.fail("/flaky", False)
    await wait_for(lambda: len(receiver.accepted("/flaky")) >= len(ids))
    assert receiver.accepted_ids("/flaky") == ids
    attempts = receiver.received("/flaky")
    failed = [a for a in attempts if a.status == 500]
    # The first entry was retried until accepted; nothing after it was tried meanwhile.
    first_ok = next(i for i, a in enumerate(attempts) if a.status == 200)
    assert all(a.json()["id"] == ids[0] for a in attempts[: first_ok + 1])
    assert len(failed) == first_ok >= 4
    # Backoff: the waits between attempts grow (lower bounds only; the machine may be slow).
    gaps = [b.at - a.at for a, b in itertools.pairwise(attempts[: first_ok + 1])]
    backoff = Backoff()
    for n, gap in enumerate(gaps, start=1):
        assert gap >= 0.9 * backoff.delay(n), (n, gaps)

    async def caught_up(url: str) -> bool:
        state = await webhook_state(node, url)
        return (state.delivered_position, state.failures, state.last_error) == (len(ids), 0, "")

    await wait_for(lambda: caught_up(receiver.url("/flaky")))
    await wait_for(lambda: caught_up(receiver.url("/ok")))


@pytest.mark.parametrize("how", ["sigterm", "kill"])
async def test_delivery_continues_after_restart(
    node_process: NodeProcesses, rest_client: RestClient, receiver: Receiver, how: str
) -> None:
    node = node_process("n")
    http = rest_client(node)
    register(http, receiver.url())
    ids = [append(http, {"run": 1, "i": i}) for i in range(5)]
    await wait_for(lambda: len(receiver.accepted()) >= 5)

    if how == "sigterm":
        assert node.stop() == 0
    else:
        node.kill()
    node_process.start(node)
    http = rest_client(node)
    ids += [append(http, {"run": 2, "i": i}) for i in range(5)]
    await wait_for(
        lambda: set(receiver.accepted_ids()) >= set(ids), message=lambda: f"{receiver.accepted_ids()}"
    )

    received = receiver.accepted_ids()
    # At least once and no gap: the first run's 5, then a contiguous run from at most 5 back
    # (entries resent around the restart), to the end.
    assert received[:5] == ids[:5]
    rest = received[5:]
    resent = len(rest) - 5
    assert 0 <= resent <= 5
    assert rest == ids[5 - resent :], received
    assert_causal(receiver.accepted())


def test_deregister_stops_delivery(
    node_process: NodeProcesses, rest_client: RestClient, receiver: Receiver
) -> None:
    node = node_process("n")
    http = rest_client(node)
    register(http, receiver.url("/a"))
    register(http, receiver.url("/b"))
    ids = [append(http, i) for i in range(3)]
    wait_for_sync(lambda: receiver.accepted_ids("/a") == ids and receiver.accepted_ids("/b") == ids)

    assert http.post("/log/deregister", json={"url": receiver.url("/a")}).status_code == 204
    ids += [append(http, i) for i in range(3, 6)]
    wait_for_sync(lambda: receiver.accepted_ids("/b") == ids)
    assert receiver.accepted_ids("/a") == ids[:3]
    assert len(receiver.received("/a")) == 3

    # Registering again starts over from the beginning of the log.
    register(http, receiver.url("/a"))
    wait_for_sync(lambda: len(receiver.accepted_ids("/a")) == 3 + len(ids))
    assert receiver.accepted_ids("/a") == ids[:3] + ids


# -- a missing dependency, with in-process nodes -------------------------------------------------


async def test_entry_waits_for_its_missing_dependency(
    grpc_node_factory: GrpcNodeFactory, receiver: Receiver
) -> None:
    a = await grpc_node_factory("a")
    b = await grpc_node_factory("b")
    c = await grpc_node_factory("c")
    await a.webhooks.RegisterWebhook(webhooks_pb2.RegisterWebhookRequest(url=receiver.url()))

    async def append_to(node: GrpcNode, text: str, deps: Sequence[str] = ()) -> str:
        request = log_pb2.AppendEntryRequest(data=Value(string_value=text), dependencies=list(deps))
        return (await node.log.AppendEntry(request)).id

    async def entry(node: GrpcNode, entry_id: str) -> Any:
        return (await node.log.GetEntry(log_pb2.GetEntryRequest(id=entry_id))).entry

    x = await append_to(b, "x: the dependency, on b")
    q = await append_to(c, "q: independent, on c")
    a1 = await append_to(a, "a1")
    y = await append_to(a, "y: needs x", [x])
    z = await append_to(a, "z: after y in a's log")
    await wait_for(lambda: receiver.accepted_ids() == [a1])

    # q arrives and is deliverable: it overtakes y and z, which wait for x.
    await a.node.appender.ingest([await entry(c, q)])
    await wait_for(lambda: len(receiver.accepted_ids()) >= 2)
    assert receiver.accepted_ids() == [a1, q]

    await a.node.appender.ingest([await entry(b, x)])
    await wait_for(lambda: len(receiver.accepted_ids()) >= 5)
    assert receiver.accepted_ids() == [a1, q, x, y, z]
    bodies = receiver.accepted()
    assert_causal(bodies)
    assert bodies[3]["dependencies"] == [x]
    assert {body["owner"] for body in bodies} == {a.node_id, b.node_id, c.node_id}


# -- webhooks into a log -------------------------------------------------------------------------


def total_entries(http: httpx.Client) -> int:
    response = http.get("/status")
    assert response.status_code == 200, response.text
    return sum(int(component["seq"]) for component in response.json()["vector"])


async def has_failed(node: NodeProcess, url: str) -> bool:
    return (await webhook_state(node, url)).failures >= 1


async def test_webhook_into_its_own_cluster_is_refused(
    node_process: NodeProcesses, rest_client: RestClient
) -> None:
    """Posting a cluster's entries back into that cluster would loop forever: its nodes refuse such
    POSTs (the webhook retries with backoff, visibly stuck) and the logs stay as they were."""
    a = node_process("a")
    b = node_process("b", peers=[a.url])
    http_a, http_b = rest_client(a), rest_client(b)
    append(http_a, {"first": 1})
    await wait_for(lambda: total_entries(http_b) == 1)  # b holds a's entries: it knows a
    own, peers = f"{a.rest_url}/log", f"{b.rest_url}/log"
    register(http_a, own)
    register(http_a, peers)

    for url in (own, peers):
        await wait_for(functools.partial(has_failed, a, url))
        state = await webhook_state(a, url)
        assert state.delivered_position == 0 and "400" in state.last_error
    assert total_entries(http_a) == total_entries(http_b) == 1

    a_id = http_a.get("/status").json()["node_id"]
    refused = http_b.post("/log", json={"x": 1}, headers={"x-potboiler-webhook-from": a_id})
    assert refused.status_code == 400
    assert "webhook" in refused.json()["message"]
    assert total_entries(http_b) == 1


async def test_webhook_into_another_cluster_mirrors_its_entries(
    node_process: NodeProcesses, rest_client: RestClient
) -> None:
    """A webhook whose target does not replicate with its node is an ordinary receiver: the target
    appends every entry it is sent, in order."""
    source, mirror = node_process("source"), node_process("mirror")
    http_source, http_mirror = rest_client(source), rest_client(mirror)
    register(http_source, f"{mirror.rest_url}/log")
    ids = [append(http_source, {"i": i}) for i in range(3)]

    await wait_for(lambda: total_entries(http_mirror) == 3)
    [head] = http_mirror.get("/log").json().values()
    copies = []
    while head:
        entry = http_mirror.get(f"/log/{head}").json()
        copies.append(entry["data"])
        head = entry["prev"]
    assert [copy["id"] for copy in reversed(copies)] == ids
