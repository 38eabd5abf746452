"""Replication between in-process nodes (gRPC only, no Envoy): convergence, multi-hop, catch-up,
resume after restart, removal, one stream per pair, flow control and causal delivery."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.struct_pb2 import Value

from potboiler.server import replication_session
from potboiler.server.config_files import SecurityConfigError
from potboiler.server.entries import NewEntry, validate_new_entry
from potboiler.server.errors import NotFound, Unavailable
from potboiler.server.hlc import Stamp
from potboiler.server.log import Log
from potboiler.server.node import Node, NodeConfig
from potboiler.server.processes import find_base_port, ports_free, release_base_port, reserve_base_port
from potboiler.server.storage import MemoryStore
from potboiler.v1 import nodes_pb2, nodes_pb2_grpc, replication_pb2, replication_pb2_grpc
from tests.conftest import wait_for
from tests.unit.test_log import commit_local

pytestmark = pytest.mark.asyncio

NodeFactory = Callable[..., Awaitable[Node]]


def number(n: float) -> Value:
    v = Value()
    v.number_value = n
    return v


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[NodeFactory]:
    """Start in-process nodes on free ports; stop them all at the end."""
    nodes: list[Node] = []
    #: Each node's base port, by its index (a restart reuses its node's): picked as nodes are made.
    bases: dict[int, int] = {}
    counter = iter(range(6))

    async def make(
        name: str | None = None,
        peers: list[Node] | None = None,
        gossip: bool = True,
        index: int | None = None,
        host: str = "127.0.0.1",
    ) -> Node:
        i = next(counter) if index is None else index
        if i not in bases:
            bases[i] = find_base_port()
        base = bases[i]
        if index is not None:  # a restart on the ports of a node stopped here: grpc closes its
            # listener a moment after stop() returns
            await wait_for(lambda: ports_free(host, base), message=f"the ports of node {i}")
        reserve_base_port(base)  # a test running long keeps its ports from other pickers
        config = NodeConfig(
            data_dir=tmp_path / (name or f"n{i}"),
            host=host,
            base_port=base,
            peers=[p.config.url for p in peers or []],
            gateway=False,
            metrics=False,
            gossip=gossip,
            services=[],
        )
        node = Node(config)
        await node.start()
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        if node.server is not None:
            await node.stop()
    for base in bases.values():
        release_base_port(base)


async def append(node: Node, n: int, deps: tuple[bytes, ...] = ()) -> list[str]:
    entries = await node.appender.append([NewEntry(number(i).SerializeToString(), deps) for i in range(n)])
    return [e.id for e in entries]


def converged(*nodes: Node) -> bool:
    vectors = [n.log.vector() for n in nodes]
    return all(v == vectors[0] for v in vectors) and all(n.log.pending == 0 for n in nodes)


def delivered_ids(node: Node) -> list[str]:
    return [e.id for _, e in node.log.delivered(0, 1_000_000)]


async def test_two_nodes_exchange_everything(make_node: NodeFactory) -> None:
    a = await make_node()
    b = await make_node(peers=[a])
    await append(a, 50)
    await append(b, 30)
    await wait_for(lambda: converged(a, b) and a.log.total() == 80, message="convergence")
    assert sorted(delivered_ids(a)) == sorted(delivered_ids(b))
    assert len(set(delivered_ids(a))) == 80
    assert a.membership.urls() == [b.config.url]  # b joined a: both directions


async def test_an_idle_peer_keeps_promising_its_clock(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every Ack carries its sender's clock promise, also while the sender writes nothing."""
    monkeypatch.setattr(replication_session, "PROMISE_INTERVAL", 0.1)
    a = await make_node()
    b = await make_node(peers=[a])
    await append(b, 3)
    await wait_for(lambda: converged(a, b), message="convergence")
    await wait_for(lambda: b.log.node_id in a.log.promises(), message="b's first promise")
    first = a.log.promises()[b.log.node_id]
    await wait_for(
        lambda: a.log.promises()[b.log.node_id].stamp > first.stamp, message="a newer promise from idle b"
    )
    promise = a.log.promises()[b.log.node_id]
    assert promise.seq == 3  # b's own seq when it promised
    [head] = [h for h in b.log.heads() if h.owner == b.log.node_id]
    newest = b.log.get(head.head).when
    assert promise.stamp > Stamp(newest.wall_ms, newest.logical)  # later than all b stamped
    own = a.log.promises()[a.log.node_id]
    assert own.seq == 0 and own.stamp <= a.log.clock.last


async def test_a_promise_reaches_a_node_that_does_not_replicate_with_its_owner(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a line A-B-C, C hears A's clock promises through B, so a quiet A does not hold C's
    Pigtail compaction back."""
    monkeypatch.setattr(replication_session, "PROMISE_INTERVAL", 0.1)
    b = await make_node(gossip=False)
    a = await make_node(peers=[b], gossip=False)
    c = await make_node(peers=[b], gossip=False)
    await append(a, 1)
    await wait_for(lambda: converged(a, b, c), message="convergence")
    assert a.config.url not in c.membership.urls()
    await wait_for(lambda: a.log.node_id in c.log.promises(), message="a's promise at c")
    first = c.log.promises()[a.log.node_id]
    await wait_for(
        lambda: c.log.promises()[a.log.node_id].stamp > first.stamp, message="a newer promise from quiet a"
    )
    assert c.log.promises()[a.log.node_id].seq == 1


async def test_three_nodes_writing_concurrently_converge(make_node: NodeFactory) -> None:
    a = await make_node()
    b = await make_node(peers=[a])
    c = await make_node(peers=[a])
    await asyncio.gather(*(append(n, 200) for n in (a, b, c)))
    await wait_for(lambda: converged(a, b, c) and a.log.total() == 600, message="convergence")
    heads = [[(h.owner, h.head, h.seq) for h in n.log.heads()] for n in (a, b, c)]
    assert heads[0] == heads[1] == heads[2]
    # gossip: c learned b through a
    await wait_for(lambda: b.config.url in c.membership.urls(), message="gossip")


async def test_a_full_mesh_at_a_low_rate_sends_each_entry_over_each_link_once(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries written now and then (each peer's last progress on the writer long past) reach every
    node from their owner; the other nodes do not forward them as well."""
    # Longer than a stream can stall on a loaded machine, so only a forward that ignores how long
    # the entry has been on the forwarder shows up here.
    monkeypatch.setattr(replication_session, "FORWARD_DELAY", 0.4)
    a = await make_node()
    b = await make_node(peers=[a])
    c = await make_node(peers=[a, b])
    await wait_for(
        lambda: all(
            [p.state for p in n.replicator.status()] == [nodes_pb2.PeerStatus.STATE_LIVE] * 2
            for n in (a, b, c)
        ),
        message="a full mesh of live streams",
    )
    written = 3
    for _ in range(written):
        await asyncio.sleep(2 * replication_session.FORWARD_DELAY)  # the peers' progress on a is now old
        await append(a, 1)
        await wait_for(lambda: converged(a, b, c), message="the entry on every node")
    await asyncio.sleep(2 * replication_session.FORWARD_DELAY)  # room for a late forward to show
    for node, other in ((b, c), (c, b)):
        assert node.replicator.counters_for(other.config.url).entries_in == 0
        assert node.replicator.counters_for(a.config.url).entries_in == written


async def test_two_paths_to_a_node_across_a_ring_do_not_both_forward_entries_written_now_and_then(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ring a-b-c-d-a: c gets a's entries through b and through d. Once c has told one of them
    it gets a's log from the other, each entry reaches c once (the first may come twice)."""
    monkeypatch.setattr(replication_session, "FORWARD_DELAY", 0.3)  # as in the full-mesh test: stalls
    a = await make_node(gossip=False)
    b = await make_node(peers=[a], gossip=False)
    c = await make_node(peers=[b], gossip=False)
    d = await make_node(peers=[c, a], gossip=False)
    await wait_for(
        lambda: all(len(n.replicator.status()) == 2 for n in (a, b, c, d)), message="a ring of streams"
    )
    written = 4
    for _ in range(written):
        await asyncio.sleep(2 * replication_session.FORWARD_DELAY)  # c's progress on a is now old
        await append(a, 1)
        await wait_for(lambda: converged(a, b, c, d), message="the entry on every node")
    await asyncio.sleep(
        replication_session.ELSEWHERE_FACTOR * replication_session.FORWARD_DELAY
    )  # a late forward
    received = [c.replicator.counters_for(n.config.url).entries_in for n in (b, d)]
    assert sum(received) <= written + 1, received


async def test_a_nearer_path_takes_over_from_a_longer_one_that_fed_first(make_node: NodeFactory) -> None:
    """c gets a's steady writes over a long line a-x-y-z-d-c; b joins, one hop from both, and c
    calls it redundant at first (d feeds c). c makes progress all the time, so waiting for it to
    pause would leave b out for good: b forwards what c still lacks after 3 x FORWARD_DELAY, which
    the long line brings later, and c ends up fed by b."""
    line = [await make_node(gossip=False)]
    for _ in range(4):
        line.append(await make_node(peers=[line[-1]], gossip=False))
    a, d, c = line[0], line[-2], line[-1]
    writing = True

    async def writer() -> None:
        while writing:
            await append(a, 1)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(writer())
    try:
        await wait_for(lambda: c.log.vector().get(a.log.node_id, 0) > 10, message="a's entries on c")
        b = await make_node(peers=[a, c], gossip=False)
        await wait_for(lambda: bool(b.replicator.peers[c.config.url].sessions), message="b's stream to c")
        # As if c had answered b's first forward with Ack.redundant_owners (d feeding it then).
        session = b.replicator.peers[c.config.url].sessions[0]
        session.peer_has(a.log.node_id, 0, time.monotonic(), elsewhere=True)
        await asyncio.sleep(2.0)
        before = [c.replicator.counters_for(n.config.url).entries_in for n in (b, d)]
        await asyncio.sleep(2.0)
        after = [c.replicator.counters_for(n.config.url).entries_in for n in (b, d)]
    finally:
        writing = False
        await task
    from_b, from_d = (later - earlier for later, earlier in zip(after, before, strict=True))
    assert from_b > 2 * from_d, (from_b, from_d)


async def test_two_forwarders_of_a_down_owners_log_do_not_both_feed_a_new_node(
    make_node: NodeFactory,
) -> None:
    """The owner is down, and a new node catches up on its log from two peers that hold it: one
    feeds it, the other is told to stop after its probe (before, the whole log came twice)."""
    total = 2 * replication_session.WINDOW
    a = await make_node()
    b = await make_node(peers=[a])
    c = await make_node(peers=[a, b])
    for _ in range(total // 1000):
        await append(a, 1000)
    await wait_for(lambda: converged(a, b, c), message="convergence")
    await a.stop()
    d = await make_node(peers=[b, c])
    await wait_for(lambda: d.log.total() == total and converged(b, c, d), message="catch-up")
    received = [d.replicator.counters_for(n.config.url).entries_in for n in (b, c)]
    # One probe batch twice in a quiet run; a few more if the feed stalls on a loaded machine.
    assert sum(received) <= total + replication_session.WINDOW // 2, received


async def test_line_topology_converges_through_the_middle(make_node: NodeFactory) -> None:
    a = await make_node(gossip=False)
    b = await make_node(peers=[a], gossip=False)
    c = await make_node(peers=[b], gossip=False)
    await append(a, 20)
    await append(c, 20)
    await wait_for(lambda: converged(a, b, c) and a.log.total() == 40, message="multi-hop convergence")
    assert c.config.url not in a.membership.urls()
    assert a.config.url not in c.membership.urls()


async def test_late_node_catches_up_in_batches(make_node: NodeFactory) -> None:
    a = await make_node()
    for _ in range(5):
        await append(a, 1000)
    b = await make_node(peers=[a])
    await wait_for(lambda: converged(a, b) and b.log.total() == 5000, message="catch-up")
    counters = b.replicator.counters[a.config.url]
    assert counters.messages_in < 100  # batched, not one message per entry


async def test_flow_control_window_bounds_unacked_entries(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replication_session, "WINDOW", 50)
    monkeypatch.setattr(replication_session, "MAX_BATCH", 20)
    a = await make_node()
    await append(a, 1000)
    b = await make_node(peers=[a])
    await wait_for(lambda: converged(a, b) and b.log.total() == 1000, message="windowed catch-up")


async def test_own_entries_do_not_wait_behind_a_forwarded_backlog(make_node: NodeFactory) -> None:
    """a forwards x's log (x is gone) to a new node b, the window full of it; an entry a writes
    meanwhile reaches b before that backlog is all sent. (The logs went in the order of their
    owners' ids, x's first: every ack's room went to x's backlog until it was done.)"""
    backlog = 100_000
    x = await make_node(gossip=False)
    a = await make_node(peers=[x], gossip=False)
    assert x.log.node_id < a.log.node_id  # (ids grow with time)
    await append(x, backlog)
    await wait_for(lambda: converged(a, x) and a.log.total() == backlog, message="a holding x's log")
    await x.stop()
    b = await make_node(peers=[a], gossip=False)
    # Once that forwarding fills the window (it starts a batch at a time, then doubles):
    await wait_for(lambda: b.log.vector().get(x.log.node_id, 0) >= backlog // 2, message="b taking x's log")
    await append(a, 1)
    await wait_for(lambda: b.log.vector().get(a.log.node_id, 0) == 1, message="a's entry at b")
    assert b.log.vector().get(x.log.node_id, 0) < backlog, "a's entry waited for x's whole backlog"
    await wait_for(lambda: b.log.total() == backlog + 1, message="the rest of x's log at b")


async def test_restart_resumes_without_loss_or_duplicates(make_node: NodeFactory) -> None:
    a = await make_node()
    b = await make_node(name="b", peers=[a], index=1)
    await append(a, 100)
    await wait_for(lambda: converged(a, b), message="first convergence")
    await b.stop()
    await append(a, 100)
    b2 = await make_node(name="b", index=1)  # same data dir and port: same identity
    assert b2.log.node_id == b.log.node_id
    await append(b2, 10)
    await wait_for(lambda: converged(a, b2) and a.log.total() == 210, message="convergence after restart")
    ids = delivered_ids(b2)
    assert len(ids) == len(set(ids)) == 210


async def test_removed_peer_stops_receiving_and_is_removed_both_ways(make_node: NodeFactory) -> None:
    a = await make_node()
    b = await make_node(peers=[a])
    await append(a, 5)
    await wait_for(lambda: converged(a, b), message="convergence")
    a.membership.remove(b.config.url)
    await wait_for(lambda: b.membership.urls() == [], message="b refused and removing a")
    assert b.membership.is_removed(a.config.url)
    await append(a, 5)
    await append(b, 1)
    assert not a.replicator.peers and not b.replicator.peers
    assert b.log.total() == 6 and a.log.total() == 10
    a.membership.add(b.config.url)  # an explicit add joins again, clearing b's removal of a
    await wait_for(lambda: converged(a, b) and b.log.total() == 11, message="convergence after re-adding")
    assert b.membership.urls() == [a.config.url]


async def test_a_peer_removed_and_added_again_at_once_replicates_again(make_node: NodeFactory) -> None:
    """DELETE /nodes then POST /nodes of one peer before the removal's clean-up ran: the add must
    start a new dial loop, not wake the one being dropped (the peer stayed listed, unreplicated)."""
    a = await make_node()
    b = await make_node(peers=[a])
    await wait_for(lambda: stream_count(a) == 1, message="the stream")
    a.membership.remove(b.config.url)
    a.membership.add(b.config.url)  # in the same turn of the event loop
    await append(a, 3)
    await wait_for(lambda: converged(a, b) and b.log.total() == 3, message="b getting a's entries")
    assert list(a.replicator.peers) == [b.config.url] and a.membership.urls() == [b.config.url]


async def test_adding_a_connected_peer_again_leaves_its_later_removal_of_this_node_standing(
    make_node: NodeFactory,
) -> None:
    """POST /nodes of a peer already replicating changes nothing: it does not leave the node asking
    to join, which would make the peer take it back when its operator removes it later."""
    a = await make_node()
    b = await make_node(peers=[a])
    await wait_for(lambda: stream_count(a) == 1, message="the stream")
    assert a.membership.add(b.config.url) is False  # a provisioning script adding its peers again
    assert not a.membership.is_joining(b.config.url)
    b.membership.remove(a.config.url)
    await wait_for(lambda: a.membership.urls() == [], message="a refused by b and removing b")
    assert b.membership.is_removed(a.config.url) and b.membership.urls() == []


async def test_nodes_serving_on_a_wildcard_address_need_advertised_urls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two machines each serving on 0.0.0.0 at one base port, simulated here (the second node's gRPC
    server moved so that both bind): named http://0.0.0.0:B both, they refuse each other saying what to
    do; with --advertise-url each names its address and they replicate."""
    # Free on every address: a node of another test on 127.0.0.N holds a port 0.0.0.0 cannot take.
    base, other = find_base_port("0.0.0.0"), find_base_port("0.0.0.0")
    nodes: list[Node] = []

    async def start(name: str, **settings: Any) -> Node:
        config = NodeConfig(
            data_dir=tmp_path / name,
            host="0.0.0.0",
            base_port=base,
            gateway=False,
            metrics=False,
            services=[],
            **settings,
        )
        node = Node(config)
        await node.start()
        nodes.append(node)
        return node

    try:
        r = await start("r")
        a = await start("a", grpc_port=other + 10, peers=[f"http://127.0.0.1:{base}"])
        assert a.config.url == r.config.url == f"http://0.0.0.0:{base}"
        peer = a.replicator.peers[f"http://127.0.0.1:{base}"]
        await wait_for(lambda: "--advertise-url" in peer.last_error, message="a told why r refuses it")
        await a.stop()
        a = await start(
            "a2",
            grpc_port=other + 10,
            peers=[f"http://127.0.0.1:{base}"],
            advertise_url=f"http://127.0.0.1:{other}",
        )
        await append(a, 2)
        await wait_for(lambda: converged(a, r) and r.log.total() == 2, message="convergence")
        # (`in`: a node of another test may dial r's port, which on 0.0.0.0 takes every address's)
        assert f"http://127.0.0.1:{other}" in r.membership.urls()
    finally:
        for node in nodes:
            if node.server is not None:
                await node.stop()
        release_base_port(base)
        release_base_port(other)


async def test_a_node_stopped_just_after_removing_a_peer_has_stopped_replicating_with_it(
    make_node: NodeFactory,
) -> None:
    a = await make_node()
    b = await make_node(peers=[a])
    await wait_for(lambda: stream_count(a) == 1, message="the stream")
    a.membership.remove(b.config.url)
    await a.stop()
    pending = [t for t in asyncio.all_tasks() if "_drop_peer" in repr(t.get_coro())]
    assert pending == []


async def test_one_stream_per_pair_when_both_dial(make_node: NodeFactory) -> None:
    a = await make_node()
    b = await make_node()
    a.membership.add(b.config.url)
    b.membership.add(a.config.url)
    await append(a, 3)
    await wait_for(lambda: converged(a, b) and b.log.total() == 3, message="convergence")

    def sessions(n: Node) -> int:
        return sum(len(p.sessions) for p in n.replicator.peers.values())

    [pa] = a.replicator.peers.values()
    [pb] = b.replicator.peers.values()

    def one_stream() -> bool:
        # (a moment after both hellos, each side may still hold the stream it dialed)
        return sessions(a) == 1 and sessions(b) == 1 and pa.sessions[0].dialed != pb.sessions[0].dialed

    await wait_for(one_stream, message="one stream per pair")
    # The dropped stream is not reported as an error of a peer that is live.
    await wait_for(lambda: pa.last_error == pb.last_error == "", message="no error shown")
    lower = a if a.log.node_id < b.log.node_id else b
    [lower_peer] = lower.replicator.peers.values()
    assert lower_peer.sessions[0].dialed  # the lower id's stream is the one kept


async def test_entry_waits_for_a_dependency_from_another_node(make_node: NodeFactory) -> None:
    a = await make_node()
    b = await make_node()
    [dep] = await append(a, 1)
    [waiting] = await append(b, 1, validate_new_entry(number(0), [dep]).dependencies)
    assert b.log.pending == 1 and delivered_ids(b) == []
    b.membership.add(a.config.url)
    await wait_for(lambda: converged(a, b), message="dependency arrival")
    order = delivered_ids(b)
    assert order.index(dep) < order.index(waiting)
    order_a = delivered_ids(a)
    assert order_a.index(dep) < order_a.index(waiting)


async def test_status_reports_peers(make_node: NodeFactory) -> None:
    a = await make_node()
    b = await make_node(peers=[a])
    await append(a, 10)
    await wait_for(lambda: converged(a, b), message="convergence")
    await wait_for(
        lambda: [(p.state, p.lag) for p in a.replicator.status()] == [(nodes_pb2.PeerStatus.STATE_LIVE, 0)],
        message="live state, everything acknowledged",
    )
    [status] = a.replicator.status()
    assert status.url == b.config.url and status.node_id == b.log.node_id
    assert (status.behind, status.down_ms) == (0, 0)
    await b.stop()
    await wait_for(
        lambda: [p.state for p in a.replicator.status()] == [nodes_pb2.PeerStatus.STATE_DISCONNECTED],
        message="disconnected state",
    )
    await append(a, 4)

    def down_with_lag() -> bool:
        # (a stopping node used to dial again as its server stopped: see the test below)
        [status] = a.replicator.status()
        return (
            status.state == nodes_pb2.PeerStatus.STATE_DISCONNECTED
            and status.lag == 4
            and bool(status.last_error)
        )

    await wait_for(down_with_lag, message="b down, 4 entries behind, and why")
    await wait_for(lambda: a.replicator.status()[0].down_ms > 0, message="time since the stream ended")
    assert a.replicator.status()[0].silent_ms == 0


async def test_a_node_keeps_the_vector_a_connected_peer_acknowledged_now_and_then(
    make_node: NodeFactory,
) -> None:
    """Not only when the peer's stream ends: a crash of this node would bring back the vector kept
    at the last end (a false lag of everything since, for a peer then away)."""
    a = await make_node()
    b = await make_node(peers=[a])
    await append(a, 7)
    await wait_for(lambda: converged(a, b) and a.replicator.status()[0].lag == 0, message="acknowledged")
    a.peer_watch.look(keep=True)
    assert a.membership.acked_of(b.config.url) == a.log.vector()


async def test_status_is_live_under_steady_writes_and_catching_up_behind_a_backlog(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LIVE means the peer holds everything this node has held for FORWARD_DELAY: a peer taking a
    steady stream is LIVE although entries are always in flight, and a peer that stops taking
    entries shows CATCHING_UP once they are older than that."""
    monkeypatch.setattr(replication_session, "FORWARD_DELAY", 0.5)  # far above a loaded machine's ack delay
    a = await make_node()
    b = await make_node(peers=[a])
    live = [nodes_pb2.PeerStatus.STATE_LIVE]
    await wait_for(lambda: [p.state for p in a.replicator.status()] == live, message="live state")
    states = []
    for _ in range(50):
        await append(a, 1)
        await asyncio.sleep(0.01)
        states.append(a.replicator.status()[0].state)
    assert states.count(nodes_pb2.PeerStatus.STATE_LIVE) >= 45, states
    # b has taken in every steady entry: else the stall below would hold the last one, and the
    # batch after it would never be read.
    await wait_for(lambda: converged(a, b) and a.replicator.status()[0].lag == 0, message="b up to date")

    taking = asyncio.Event()
    ingest = b.appender.ingest

    async def stalled(*args: Any) -> Any:
        await taking.wait()
        return await ingest(*args)

    monkeypatch.setattr(b.appender, "ingest", stalled)
    await append(a, 5)
    await wait_for(
        lambda: [p.state for p in a.replicator.status()] == [nodes_pb2.PeerStatus.STATE_CATCHING_UP],
        message="catching up",
    )
    assert a.replicator.status()[0].lag >= 5
    # b has been sent what it has not taken in yet: it shows itself behind a by that much.
    assert b.replicator.status()[0].behind >= 5
    taking.set()
    await wait_for(lambda: [p.state for p in a.replicator.status()] == live, message="live again")
    await wait_for(lambda: b.replicator.status()[0].behind == 0, message="b caught up with a")


async def test_status_is_live_for_a_peer_fed_by_forwarding_under_steady_writes(
    make_node: NodeFactory,
) -> None:
    """In a line a - b - c, c gets a's entries only from b, FORWARD_DELAY twice after they reach b:
    b still calls c LIVE while a writes steadily (before: 9 to 88 samples of 200)."""
    a = await make_node(gossip=False)
    b = await make_node(peers=[a], gossip=False)
    c = await make_node(peers=[b], gossip=False)
    live = nodes_pb2.PeerStatus.STATE_LIVE
    await wait_for(lambda: [p.state for p in b.replicator.status()] == [live, live], message="live streams")
    samples = []
    for _ in range(40):
        await append(a, 1)
        await asyncio.sleep(0.05)
        samples.append({p.url: p.state for p in b.replicator.status()}[c.config.url])
    assert samples.count(live) >= 30, samples
    await wait_for(lambda: converged(a, b, c), message="convergence")


async def stream_error(
    node: Node, sender_id: str, *messages: replication_pb2.ReplicateRequest
) -> grpc.aio.AioRpcError:
    """Open a replication stream to `node` as `sender_id` (a hello naming a URL nobody listens on,
    which `node` then dials in vain), send `messages`, and return the error the stream ends with."""
    hello = replication_pb2.Hello(node_id=sender_id, url=f"http://127.0.0.1:{find_base_port()}")

    async def requests() -> AsyncIterator[replication_pb2.ReplicateRequest]:
        yield replication_pb2.ReplicateRequest(hello=hello)
        for message in messages:
            yield message

    async with grpc.aio.insecure_channel(f"127.0.0.1:{node.grpc_port}") as channel:
        call = replication_pb2_grpc.ReplicationServiceStub(channel).Replicate(requests())
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in call:
                pass
    return raised.value


async def test_a_batch_entry_that_is_not_an_entry_ends_the_stream_and_changes_nothing(
    make_node: NodeFactory,
) -> None:
    """Replicated entries travel as the sender's stored bytes; bytes that do not parse as an Entry
    end the stream with INVALID_ARGUMENT, and the entries of that batch before them are not stored.
    The sender is this test (see stream_error)."""
    a = await make_node()
    origin = Log(MemoryStore())
    [entry] = commit_local(origin, origin._store, [NewEntry(number(1).SerializeToString())])
    good, blob = entry.id, entry.SerializeToString()
    batch = replication_pb2.EntryBatch(entries=[blob, b"\xff\xff\xff"])
    error = await stream_error(a, origin.node_id, replication_pb2.ReplicateRequest(entries=batch))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a serialized Entry" in (error.details() or "")
    assert a.log.vector().get(origin.node_id, 0) == 0
    with pytest.raises(NotFound):
        a.log.get(good)


async def test_an_ack_naming_a_redundant_owner_that_is_not_a_uuid_ends_the_stream(
    make_node: NodeFactory,
) -> None:
    """Ack.redundant_owners are checked like the vector's owners (unchecked, a faulty peer could grow
    the session's per-owner state without bound)."""
    a = await make_node()
    ack = replication_pb2.Ack(redundant_owners=["not-a-uuid"])
    error = await stream_error(a, str(uuid.uuid4()), replication_pb2.ReplicateRequest(ack=ack))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "redundant owner" in (error.details() or "")


async def test_an_ack_relaying_a_promise_of_an_owner_that_is_not_a_uuid_ends_the_stream(
    make_node: NodeFactory,
) -> None:
    """Relayed promises are checked like the vector's owners: unchecked, a bogus owner would be kept
    and passed on to every node, and hold Pigtail's compaction back for good."""
    a = await make_node()
    ack = replication_pb2.Ack()
    ack.promises.add(owner="not-a-uuid", seq=1)
    error = await stream_error(a, str(uuid.uuid4()), replication_pb2.ReplicateRequest(ack=ack))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "promise owner" in (error.details() or "")
    assert "not-a-uuid" not in a.log.promises()


async def test_an_unexpected_failure_ends_the_stream_not_the_dialing(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await make_node()
    b = await make_node(peers=[a])
    a.membership.add(b.config.url)
    await append(a, 1)
    await wait_for(lambda: converged(a, b) and b.log.total() == 1, message="convergence")
    # The node whose dialed stream is kept fails once taking entries in (as if its store failed).
    dialer, other = (a, b) if a.log.node_id < b.log.node_id else (b, a)
    ingest = dialer.appender.ingest
    failures: list[RuntimeError] = []

    async def failing_ingest(*args: Any, **kwargs: Any) -> Any:
        if not failures:
            failures.append(RuntimeError("the store failed"))
            raise failures[0]
        return await ingest(*args, **kwargs)

    monkeypatch.setattr(dialer.appender, "ingest", failing_ingest)
    await append(other, 3)
    await wait_for(
        lambda: converged(a, b) and dialer.log.total() == 4, message="convergence after the failure"
    )
    assert failures
    [peer] = dialer.replicator.peers.values()
    assert peer.task is not None and not peer.task.done()  # still dialing whenever needed


def stream_count(node: Node) -> int:
    return sum(len(p.sessions) for p in node.replicator.peers.values())


async def test_an_operators_add_survives_a_restart_before_it_reaches_the_peer(make_node: NodeFactory) -> None:
    """a removes b (and b, refused, removes a); while b is down an operator adds b to a again, and a
    restarts before it reaches b: a must still ask b to take it back, not give b up when refused."""
    a = await make_node(name="a", index=0)
    b = await make_node(name="b", peers=[a], index=1)
    await append(a, 1)
    await wait_for(lambda: converged(a, b), message="convergence")
    a.membership.remove(b.config.url)
    await wait_for(lambda: b.membership.is_removed(a.config.url), message="b refused and removing a")
    await b.stop()
    a.membership.add(b.config.url)  # POST /nodes b on a, while b is down
    await a.stop()
    a2 = await make_node(name="a", index=0)
    b2 = await make_node(name="b", index=1)
    await append(b2, 1)
    await wait_for(lambda: converged(a2, b2) and a2.log.total() == 2, message="convergence after the re-add")
    assert a2.membership.urls() == [b.config.url] and b2.membership.urls() == [a.config.url]
    assert not a2.membership.is_joining(b.config.url)


async def test_a_seed_peer_removed_here_stays_removed_after_a_restart(make_node: NodeFactory) -> None:
    """DELETE /nodes is not undone by restarting the node with the same --peer (as `potboiler cluster`
    does): the seed is skipped, and it is not a join that would clear the peer's removal of this node."""
    a = await make_node(name="a", index=0)
    b = await make_node(name="b", peers=[a], index=1)
    await wait_for(lambda: converged(a, b) and a.membership.urls() == [b.config.url], message="peering")
    b.membership.remove(a.config.url)  # DELETE /nodes a on b
    await wait_for(lambda: a.membership.is_removed(b.config.url), message="a refused and removing b")
    await b.stop()
    b2 = await make_node(name="b", peers=[a], index=1)
    assert b2.membership.urls() == [] and not b2.replicator.peers
    assert b2.membership.is_removed(a.config.url)


async def test_a_seed_peer_is_not_joining(make_node: NodeFactory) -> None:
    """A seed that removed this node refuses it, and this node then removes the seed (it does not
    ask to be taken back: only an operator's POST /nodes does)."""
    a = await make_node(name="a", index=0)
    b = await make_node(name="b", peers=[a], index=1)
    await wait_for(lambda: converged(a, b) and a.membership.urls() == [b.config.url], message="peering")
    await b.stop()
    a.membership.remove(b.config.url)  # DELETE /nodes b on a while b is down
    b2 = await make_node(name="b", peers=[a], index=1)
    await wait_for(lambda: b2.membership.is_removed(a.config.url), message="b refused and removing a")
    assert a.membership.urls() == [] and a.membership.is_removed(b.config.url)


def localhost_url(node: Node) -> str:
    """Another name of the node's root URL (nodes serve on 127.0.0.1)."""
    return f"http://localhost:{node.config.base_port}"


async def test_a_url_that_names_this_node_is_dropped(make_node: NodeFactory) -> None:
    a = await make_node()
    alias = localhost_url(a)
    a.membership.add(alias)
    await wait_for(lambda: a.membership.urls() == [], message="the alias dropped")
    assert not a.membership.is_removed(alias)  # no removal: a node that dials in from it is taken
    assert not a.membership.learn(alias)  # gossip does not bring it back
    await wait_for(lambda: not a.replicator.peers, message="no dialing")
    assert (
        a.replicator.counters == {}
    )  # no metrics series for the alias, nor for a stream's URL before its hello


async def test_a_peer_added_under_a_second_url_stays_one_peer(make_node: NodeFactory) -> None:
    a = await make_node()
    b = await make_node(peers=[a])
    await wait_for(lambda: converged(a, b) and a.membership.urls() == [b.config.url], message="peering")
    alias = localhost_url(b)
    a.membership.add(alias)  # POST /nodes {"url": "http://localhost:<b>"} on a
    # a finds alias is b and drops it; b, taught alias by gossip, finds it is itself and drops it.
    await wait_for(
        lambda: a.membership.urls() == [b.config.url] and list(a.replicator.peers) == [b.config.url],
        message="a dropping the alias",
    )
    await append(a, 2)
    await wait_for(lambda: converged(a, b) and b.log.total() == 2, message="convergence")
    await wait_for(lambda: stream_count(a) == stream_count(b) == 1, message="one stream per pair")
    await wait_for(lambda: alias not in b.membership.urls(), message="b dropping the alias of itself")
    assert set(a.replicator.counters) == {b.config.url} and set(b.replicator.counters) == {a.config.url}
    a.membership.remove(b.config.url)  # DELETE /nodes b on a stops replication both ways
    await wait_for(lambda: b.membership.urls() == [] and not b.replicator.peers, message="b removing a")
    assert a.membership.urls() == [] and not a.replicator.peers
    assert a.replicator.counters == b.replicator.counters == {}  # the removed peer's series end


async def test_a_stream_from_a_peer_known_under_another_url_joins_its_peer(make_node: NodeFactory) -> None:
    """a knows b as http://localhost:<b>, b announces http://127.0.0.1:<b>: b's own streams to a belong
    to that one peer, before and after a restarts, and DELETE /nodes of it refuses b all the same."""
    a = await make_node(name="a", index=0)
    b = await make_node(name="b", index=1)
    alias = localhost_url(b)
    a.membership.add(alias)
    # As if a had reached b there before: whichever of the two streams comes first, it is b's.
    a.membership.identify(alias, b.log.node_id)
    await append(b, 1)
    await wait_for(lambda: converged(a, b) and a.log.total() == 1, message="convergence")
    await wait_for(lambda: stream_count(a) == stream_count(b) == 1, message="one stream per pair")
    assert a.membership.urls() == [alias]
    await a.stop()
    a2 = await make_node(name="a", index=0)
    await append(b, 1)
    await wait_for(lambda: converged(a2, b) and a2.log.total() == 2, message="convergence after a restart")
    await wait_for(lambda: stream_count(a2) == stream_count(b) == 1, message="one stream per pair")
    assert a2.membership.urls() == [alias]
    a2.membership.remove(alias)  # DELETE /nodes
    await wait_for(lambda: b.membership.urls() == [] and not b.replicator.peers, message="b removing a")
    assert a2.membership.urls() == [] and not a2.replicator.peers


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback here")
async def test_nodes_on_an_ipv6_address_replicate(make_node: NodeFactory) -> None:
    a = await make_node(host="::1")
    b = await make_node(host="::1", peers=[a])
    assert a.config.url == f"http://[::1]:{a.config.base_port}"
    await append(a, 2)
    await append(b, 1)
    await wait_for(lambda: converged(a, b) and a.log.total() == 3, message="convergence")
    assert a.membership.urls() == [b.config.url] and b.membership.urls() == [a.config.url]


async def test_a_node_restored_from_an_older_copy_waits_for_its_own_entries_before_appending(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    p = await make_node()
    x = await make_node(name="x", peers=[p], index=1)
    await append(x, 5)
    await wait_for(lambda: converged(p, x), message="first convergence")
    await x.stop()
    shutil.copytree(tmp_path / "x", tmp_path / "x-copy")
    x = await make_node(name="x", index=1)
    later = await append(x, 5)  # seqs 6-10, replicated to p
    await wait_for(lambda: converged(p, x), message="convergence before the restore")
    await x.stop()
    shutil.rmtree(tmp_path / "x")
    shutil.copytree(tmp_path / "x-copy", tmp_path / "x")  # x's store goes back to seq 5
    x = await make_node(name="x", index=1)
    # Once p has said it holds x's log up to 10, x takes no entry of its own until it holds them
    # again: a new seq 6 would fork its log.
    await wait_for(lambda: x.log._own_floor == 10, message="p's hello")
    while True:
        try:
            [after] = await append(x, 1)
            break
        except Unavailable:
            await asyncio.sleep(0.01)
    assert x.log.get(after).seq == 11
    assert [e.id for _, e in x.log.delivered(0, 100)][5:10] == later
    await wait_for(lambda: converged(p, x) and p.log.total() == 11, message="convergence after the restore")


async def test_a_restored_node_gets_its_own_entries_that_reach_its_peer_after_their_hello(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    """p is restored to an older copy of its store and peers with a only; a holds p's older entries
    when their stream begins and gets the newer ones from q later: a sends them to p too."""
    p = await make_node(gossip=False)
    await append(p, 3)
    await p.stop()
    shutil.copytree(tmp_path / "n0", tmp_path / "p-copy")
    p = await make_node(name="n0", index=0, gossip=False)
    later = await append(p, 2)  # seqs 4-5: q keeps them, p's restored store will not have them
    q = await make_node(peers=[p], gossip=False, index=1)
    await wait_for(lambda: converged(p, q), message="q holding all of p's log")
    q.membership.remove(p.config.url)  # q and p do not talk again
    await q.stop()
    await p.stop()
    shutil.rmtree(tmp_path / "n0")
    shutil.copytree(tmp_path / "p-copy", tmp_path / "n0")
    a = await make_node(gossip=False, index=2)
    p = await make_node(name="n0", peers=[a], gossip=False, index=0)
    await wait_for(lambda: a.log.vector().get(p.log.node_id) == 3, message="a holding p's restored log")
    q = await make_node(name="n1", peers=[a], gossip=False, index=1)
    await wait_for(lambda: p.log.vector().get(p.log.node_id) == 5, message="p's own entries coming back")
    assert [e.id for _, e in p.log.delivered(0, 100)][3:5] == later
    [after] = await append(p, 1)
    assert p.log.get(after).seq == 6
    await wait_for(lambda: converged(p, q, a), message="convergence")


async def test_appends_wait_while_a_peer_holds_more_of_this_nodes_log() -> None:
    node_log = Log(MemoryStore())
    commit_local(node_log, node_log._store, [NewEntry(number(1).SerializeToString())])
    node_log.note_own_seq(3)  # a peer holds seq 2 and 3, which this store has lost
    plan = node_log.begin()
    with pytest.raises(Unavailable, match="a peer holds it up to 3"):
        node_log.plan_local(plan, [NewEntry(number(2).SerializeToString())])


async def restored_alone(
    make_node: NodeFactory, tmp_path: Path, after_copy: int, again: int
) -> tuple[Node, Node]:
    """p, and x whose log forked: x wrote 2 entries, a copy of its store was taken, it wrote
    `after_copy` more (replicated to p), then came back from the copy without p (p had removed it:
    nothing told x what p holds) and wrote `again` other entries at those seqs; p adds it again."""
    p = await make_node(gossip=False)
    x = await make_node(name="x", peers=[p], gossip=False, index=1)
    await append(x, 2)
    await wait_for(lambda: converged(p, x), message="first convergence")
    await x.stop()
    shutil.copytree(tmp_path / "x", tmp_path / "x-copy")
    x = await make_node(name="x", peers=[p], gossip=False, index=1)
    await append(x, after_copy)
    await wait_for(lambda: converged(p, x), message="convergence before the restore")
    await x.stop()
    p.membership.remove(x.config.url)
    shutil.rmtree(tmp_path / "x")
    shutil.copytree(tmp_path / "x-copy", tmp_path / "x")
    x = await make_node(name="x", gossip=False, index=1)
    await append(x, again)
    p.membership.add(x.config.url)
    return p, x


async def test_a_forked_log_is_reported_and_holds_up_only_itself(
    make_node: NodeFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """x's store goes back to an older copy and x appends before reaching its peer: its log forks.
    p keeps the entries it had, takes none of x's past the fork, says so in its status and its log
    (naming the peer that sent them), and the stream between them goes on carrying everything else."""
    caplog.set_level(logging.WARNING, logger="potboiler.server.log")
    p, x = await restored_alone(make_node, tmp_path, after_copy=2, again=3)  # x's 3-5 are new
    await wait_for(lambda: p.log.forks() == {x.log.node_id: 5}, message="p seeing the fork")
    sent = f"the log of {x.log.node_id} has forked at seq 5: peer {x.log.node_id} ({x.config.url}) sent"
    assert any(r.getMessage().startswith(sent) for r in caplog.records), caplog.text
    [session] = p.replicator.peers[x.config.url].sessions
    mine = await append(p, 3)
    await wait_for(
        lambda: x.log.vector().get(p.log.node_id) == 3 and set(mine) <= set(delivered_ids(x)),
        message="p's new entries on x",
    )
    assert p.log.vector()[x.log.node_id] == 4
    assert p.replicator.peers[x.config.url].sessions == [session]  # the same stream all along
    async with grpc.aio.insecure_channel(f"127.0.0.1:{p.grpc_port}") as channel:
        status = await nodes_pb2_grpc.NodesServiceStub(channel).GetStatus(nodes_pb2.GetStatusRequest())
    assert [(f.owner, f.seq) for f in status.forked] == [(x.log.node_id, 5)]
    # p tells x, whose new entries it would never take: x stops acknowledging writes that stay on x.
    await wait_for(lambda: x.log.fork_of(x.log.node_id)[0] == 5, message="x told its log forked")
    told = f"peer {p.log.node_id} ({p.config.url}) holds other entries of this node's own log"
    assert any(r.getMessage().startswith(told) for r in caplog.records), caplog.text
    with pytest.raises(Unavailable, match="own log has forked at seq 5"):
        await append(x, 1)


async def test_a_forked_log_past_the_window_holds_up_nothing_else(
    make_node: NodeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """x appends more entries past the fork than the window holds: p never acknowledges them, and
    they used to fill x's window to p for good, so that nothing else went from x to p (here q's
    entries, which reach p only through x). p's Acks name the logs it found forked and where, and x
    sends none of them past that (reviewer's reproduction, with the window scaled down)."""
    monkeypatch.setattr(replication_session, "WINDOW", 6)
    monkeypatch.setattr(replication_session, "MAX_BATCH", 2)
    p, x = await restored_alone(make_node, tmp_path, after_copy=2, again=12)  # x's 3-14 are new
    await wait_for(lambda: p.log.forks() == {x.log.node_id: 5}, message="p seeing the fork")
    q = await make_node(name="q", peers=[x], gossip=False, index=2)
    mine = await append(q, 3)
    await wait_for(lambda: set(mine) <= set(delivered_ids(p)), message="q's entries on p, through x")

    def nothing_past_the_fork_counted() -> bool:
        sessions = x.replicator.peers[p.config.url].sessions
        return [(s.sent[x.log.node_id], x.log.node_id in s._unacked()) for s in sessions] == [(4, False)]

    # (A batch being written as the first Ack naming the fork came is taken back by the next Ack.)
    await wait_for(nothing_past_the_fork_counted, message="x's entries past the fork not counted")


async def test_a_forked_log_forwarded_past_the_fork_holds_up_nothing_else(
    make_node: NodeFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """r holds x's new entries past the fork and forwards them to p, which takes none: they stay
    unacknowledged, and (a window of one batch here, of twenty at full scale for as many forked
    logs) used to stop everything else r had for p, here s's entries, which reach p only through r."""
    monkeypatch.setattr(replication_session, "WINDOW", 2)
    monkeypatch.setattr(replication_session, "MAX_BATCH", 2)
    p, x = await restored_alone(make_node, tmp_path, after_copy=2, again=12)  # x's 3-14 are new
    await wait_for(lambda: p.log.forks() == {x.log.node_id: 5}, message="p seeing the fork")
    r = await make_node(name="r", peers=[x], gossip=False, index=2)
    await wait_for(lambda: r.log.vector().get(x.log.node_id) == 14, message="x's new entries on r")
    r.membership.add(p.config.url)
    s = await make_node(name="s", peers=[r], gossip=False, index=3)
    mine = await append(s, 3)
    await wait_for(lambda: set(mine) <= set(delivered_ids(p)), message="s's entries on p, through r")
    assert r.log.forks() == {}  # r holds one branch only: it takes p's word for the fork


async def test_a_node_that_sees_its_own_log_forked_refuses_appends_saying_so(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    """x restored from a copy at seq 2 appends seqs 3-4 alone, then p sends x's old 5-6: x sees its
    own log forked. Waiting for replication to bring the rest back would wait for ever."""
    _, x = await restored_alone(make_node, tmp_path, after_copy=4, again=2)  # p holds x's old 3-6
    await wait_for(lambda: x.log.forks() == {x.log.node_id: 5}, message="x seeing its own log forked")
    with pytest.raises(Unavailable, match=r"own log has forked at seq 5.*wiped"):
        await append(x, 1)


@pytest.mark.parametrize("kept", ["either", "dialed"])
async def test_two_nodes_with_one_id_are_told_so_instead_of_taking_turns(
    make_node: NodeFactory, tmp_path: Path, kept: str
) -> None:
    """A copy of a node's data directory started beside it (same id, another URL): the peer keeps
    the first stream and refuses the other, naming the cause. Also when the stream the peer keeps
    with the node is one the peer dialed ("dialed": a, made first, has the lower id, so its own
    stream to b is the one kept once it dials)."""
    a = await make_node(name="a")
    b = await make_node(name="b", peers=[a], index=1)
    await wait_for(lambda: converged(a, b) and a.membership.urls() == [b.config.url], message="peering")
    to_b = a.replicator.peers[b.config.url]
    before = list(to_b.sessions)
    await b.stop()
    shutil.copytree(tmp_path / "b", tmp_path / "b-copy")
    b = await make_node(name="b", peers=[a], index=1)
    await wait_for(
        lambda: bool(to_b.sessions) and all(s not in before for s in to_b.sessions),
        message="a stream with b restarted",
    )
    if kept == "dialed":
        assert a.log.node_id < b.log.node_id

        def dialed_by_a() -> bool:
            # Ending b's stream makes both redial: a keeps its own stream if it wins that race.
            for session in to_b.sessions:
                if not session.dialed:
                    session.closed.set()
            return [(s.dialed, s.closed.is_set()) for s in to_b.sessions] == [(True, False)]

        await wait_for(dialed_by_a, message="a's own stream to b")
    copy = await make_node(name="b-copy", peers=[a], index=2)
    assert copy.log.node_id == b.log.node_id

    def told() -> bool:
        errors = [
            n.replicator.peers[a.config.url].last_error
            for n in (b, copy)
            if a.config.url in n.replicator.peers
        ]
        return any("two nodes share one id" in e for e in errors)

    await wait_for(told, message="one of the two told it shares its id")
    assert a.membership.urls() == [b.config.url]


async def test_a_restarted_node_shows_a_peer_it_cannot_reach_as_it_last_knew_it(
    make_node: NodeFactory,
) -> None:
    """Its id, and the vector it acknowledged: not a lag of everything (an alert after each restart)."""
    a = await make_node(name="a")
    b = await make_node(name="b", peers=[a], index=1)
    await append(a, 5)
    await wait_for(lambda: converged(a, b) and a.membership.urls() == [b.config.url], message="peering")
    await wait_for(lambda: a.replicator.status()[0].lag == 0, message="b acknowledging everything")
    b_id = b.log.node_id
    await b.stop()
    await a.stop()
    a = await make_node(name="a", index=0)
    [peer] = a.replicator.status()
    assert (peer.url, peer.node_id, peer.state) == (
        b.config.url,
        b_id,
        nodes_pb2.PeerStatus.STATE_DISCONNECTED,
    )
    assert (peer.lag, {c.owner: c.seq for c in peer.vector}) == (0, a.log.vector())


async def test_a_node_known_under_another_name_dialing_again_is_no_twin(make_node: NodeFactory) -> None:
    """b knows a as http://localhost:…, a announces http://127.0.0.1:…; a then dials b under an
    alias URL too. That second stream comes from a itself (it announces what it did), not from a
    second process with a's id: taken, and a drops the alias once it sees b's hello."""
    a = await make_node(name="a")
    b = await make_node(name="b", index=1)
    b.membership.add(localhost_url(a))
    await wait_for(lambda: converged(a, b) and bool(a.membership.urls()), message="peering")
    a.membership.add(localhost_url(b))
    await wait_for(lambda: a.membership.urls() == [b.config.url], message="a dropping b's alias")
    errors = [p.last_error for n in (a, b) for p in n.replicator.peers.values()]
    assert not any("share one id" in e for e in errors), errors


async def test_a_peer_going_away_is_logged_and_shown_where_its_stream_was_accepted(
    make_node: NodeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """a keeps the stream b dialed (of a pair's two streams, the node with the higher id keeps the
    one it accepted; ids grow with time, so b is made first). Each time b goes away, a says so: it
    logged nothing where the stream it kept was one it had accepted."""
    caplog.set_level(logging.INFO, logger="potboiler.server")
    b = await make_node(name="b", index=1)
    a = await make_node(name="a", index=0)
    assert a.log.node_id > b.log.node_id
    ended = f"stream from {b.config.url} ended"

    async def outage(b: Node, count: int) -> None:
        b.membership.add(a.config.url)

        def kept() -> list[Any]:
            peer = a.replicator.peers.get(b.config.url)
            return peer.sessions if peer is not None else []

        # (a's own dial may be registered a moment before b's stream replaces it)
        await wait_for(lambda: [s.dialed for s in kept()] == [False], message="a keeping b's stream")
        await b.stop()
        await wait_for(lambda: caplog.text.count(ended) == count, message=f"a logging outage {count}")
        await wait_for(lambda: bool(a.replicator.status()[0].last_error), message="a showing why")
        assert a.replicator.status()[0].state == nodes_pb2.PeerStatus.STATE_DISCONNECTED

    await outage(b, 1)
    b = await make_node(name="b", index=1)
    await outage(b, 2)
    a.membership.remove(b.config.url)
    assert f"{b.config.url} removed from the peers" in caplog.text


async def test_a_store_failing_to_keep_a_peers_vector_stops_no_replication(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await make_node(name="a")
    b = await make_node(name="b", peers=[a], index=1)
    await wait_for(lambda: converged(a, b) and a.membership.urls() == [b.config.url], message="peering")

    def failing(url: str, vector: dict[str, int]) -> None:
        raise OSError("IO error: No space left on device")

    monkeypatch.setattr(a.membership, "note_acked", failing)
    await b.stop()
    b = await make_node(name="b", peers=[a], index=1)
    mine = await append(a, 3)
    await wait_for(lambda: set(mine) <= set(delivered_ids(b)), message="a replicating to b again")


async def test_a_node_whose_data_was_wiped_comes_back_as_another_node_and_takes_its_old_log_back(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    """b's data directory is wiped: it starts again at its URL with a new id, takes everything
    (its old entries too) back from a, and a knows its URL by the new id."""
    a = await make_node(name="a")
    b = await make_node(name="b", peers=[a], index=1)
    written = await append(b, 3)
    await wait_for(lambda: converged(a, b) and a.membership.urls() == [b.config.url], message="peering")
    old = b.log.node_id
    await b.stop()
    shutil.rmtree(tmp_path / "b")
    b = await make_node(name="b", peers=[a], index=1)
    assert b.log.node_id != old
    await wait_for(lambda: converged(a, b) and b.log.total() == 3, message="b taking its old entries back")
    assert delivered_ids(b) == written
    await wait_for(lambda: a.membership.node_id_of(b.config.url) == b.log.node_id, message="b's new id")
    [after] = await append(b, 1)
    await wait_for(lambda: a.log.vector().get(b.log.node_id) == 1, message="b's first entry as a new node")
    assert a.log.get(after).owner == b.log.node_id


async def test_a_stopping_node_opens_no_new_streams(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopping node dials no more. a keeps the stream it dialed (the lower id), which ends as b's
    server stops; b dialing a again then, before its replicator stops, gave a a live stream from a
    node that had gone (its stop held up between the two, here, to make that certain)."""
    a = await make_node()
    b = await make_node(peers=[a])
    assert a.log.node_id < b.log.node_id  # node ids begin with the time they were made
    live = [nodes_pb2.PeerStatus.STATE_LIVE]
    await wait_for(
        lambda: (
            [p.state for p in a.replicator.status()] == live
            and [p.state for p in b.replicator.status()] == live
        ),
        message="both live",
    )
    accepted: list[str] = []
    accept = a.replicator._accepted_peer

    def spy(session: replication_session.Session, *, join: bool) -> Any:
        accepted.append(session.peer_id)
        return accept(session, join=join)

    stop_watch = b.peer_watch.stop

    async def slow_stop() -> None:
        await asyncio.sleep(0.3)
        await stop_watch()

    monkeypatch.setattr(a.replicator, "_accepted_peer", spy)
    monkeypatch.setattr(b.peer_watch, "stop", slow_stop)
    await b.stop()
    assert accepted == []


async def test_a_channel_that_cannot_be_opened_is_tried_again(
    make_node: NodeFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening a channel to a peer reads the TLS files with mTLS: unreadable for a moment (replaced
    in two steps as the peer is added), the peer is tried again, as an unreachable one is; the dial
    loop used to end for good, and the node's stop to fail on it."""
    caplog.set_level(logging.INFO, logger="potboiler.server.replication")
    a = await make_node()
    b = await make_node()
    opened = a.replicator._channel
    refusals = [SecurityConfigError("the TLS key file /pki/key.pem does not exist")] * 2

    def channel(target: str) -> grpc.aio.Channel:
        if refusals:
            raise refusals.pop()
        return opened(target)

    monkeypatch.setattr(a.replicator, "_channel", channel)
    a.membership.add(b.config.url)
    await wait_for(
        lambda: [p.state for p in a.replicator.status()] == [nodes_pb2.PeerStatus.STATE_LIVE], message="live"
    )
    assert (
        "no channel could be opened: SecurityConfigError: the TLS key file /pki/key.pem does not exist"
        in caplog.text
    )
    await append(a, 3)
    await wait_for(lambda: converged(a, b), message="convergence")
