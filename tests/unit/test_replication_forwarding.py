"""Which entries of a third owner's log a replication session forwards to its peer, and when
(Session.send_limit / Session.peer_has): held back while the peer gets them from elsewhere or they
have only just arrived here, one batch at a time until the peer is seen taking them from this node,
then with twice as much in flight each Ack while it lags more than a batch behind, unless told
another stream feeds it (then only after a longer silence); and Arrivals, which tells how long entries have been here."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from potboiler.server.arrivals import Arrivals
from potboiler.server.replication_session import (
    ELSEWHERE_FACTOR,
    FORWARD_DELAY,
    MAX_BATCH,
    WINDOW,
    Counters,
    Session,
)
from potboiler.server.replicator import Replicator
from potboiler.v1 import replication_pb2

ME, PEER, OWNER = "me", "peer", "owner"  # the forwarding node, its peer, a third node


def session(now: float, arrivals: Arrivals | None = None) -> Session:
    """A session begun at `now`; by default every entry of OWNER's log arrived here long before."""
    arrivals = arrivals or Arrivals(FORWARD_DELAY, {OWNER: 1 << 40})
    host: Any = SimpleNamespace(log=SimpleNamespace(node_id=ME), arrivals=arrivals)
    s = Session(host, transport=None, dialed=True, make_message=replication_pb2.ReplicateRequest)  # type: ignore[arg-type]
    s.peer_id = PEER
    s._progress_at = {OWNER: now}  # as accept_hello leaves it: the session began at `now`
    return s


def test_the_owners_log_is_held_back_at_first_then_probed_with_one_batch() -> None:
    s = session(now=0.0)
    assert s.send_limit(OWNER, 5 * MAX_BATCH, FORWARD_DELAY / 2) == (0, True)
    assert s.send_limit(OWNER, 5 * MAX_BATCH, FORWARD_DELAY) == (MAX_BATCH, True)
    s.sent[OWNER] = MAX_BATCH  # the probe went out; nothing more until the peer answers
    assert s.send_limit(OWNER, 5 * MAX_BATCH, 2 * FORWARD_DELAY) == (MAX_BATCH, True)


def test_a_peer_taking_the_log_from_this_node_gets_twice_as_much_in_flight_each_ack() -> None:
    s = session(now=0.0)
    s.sent[OWNER] = MAX_BATCH
    backlog = 100 * MAX_BATCH
    in_flight = []
    for _ in range(6):
        s.peer_has(OWNER, s.sent[OWNER], FORWARD_DELAY)  # its Ack reaches what was sent
        # No hold-back after that progress (it came from here), but no more than the ramp allows.
        limit, held = s.send_limit(OWNER, backlog, FORWARD_DELAY)
        assert held
        in_flight.append((limit - s.sent[OWNER]) // MAX_BATCH)
        s.sent[OWNER] = limit
    assert in_flight == [2, 4, 8, 16, WINDOW // MAX_BATCH, WINDOW // MAX_BATCH]


def test_a_fed_peer_that_has_nearly_caught_up_is_held_back_again() -> None:
    """In a full mesh the peer seems a few entries behind whenever new ones arrive (its Acks come
    later): forwarding those at full speed would send every live entry twice."""
    s = session(now=0.0)
    s.sent[OWNER] = MAX_BATCH
    s.peer_has(OWNER, MAX_BATCH, 1.0)  # taking the probe from this node
    assert s.send_limit(OWNER, MAX_BATCH + 5, 1.0) == (MAX_BATCH, True)
    assert s.send_limit(OWNER, 3 * MAX_BATCH, 1.0 + FORWARD_DELAY) == (2 * MAX_BATCH, True)  # a probe again


def test_a_peer_getting_the_log_elsewhere_is_left_to_that_source() -> None:
    s = session(now=0.0)
    s.sent[OWNER] = MAX_BATCH
    s.peer_has(OWNER, MAX_BATCH, FORWARD_DELAY)
    s.peer_has(OWNER, 3 * MAX_BATCH, 1.0)  # past what this node sent: another source feeds it
    assert s.send_limit(OWNER, 5 * MAX_BATCH, 1.0 + FORWARD_DELAY / 2) == (3 * MAX_BATCH, True)
    # Silence from the other source for FORWARD_DELAY: a probe batch again, not the whole window.
    assert s.send_limit(OWNER, 5 * MAX_BATCH, 1.0 + FORWARD_DELAY) == (4 * MAX_BATCH, True)


@pytest.mark.parametrize("owner", [ME, PEER])
def test_own_and_the_peers_entries_are_never_held_back(owner: str) -> None:
    s = session(now=0.0)
    s._peer_own_cap = 7  # what the peer's Hello showed it lacked of its own log
    s.peer_has(PEER, 10, 0.0)  # and it holds its own log up to 10 by now
    expected = (10, False) if owner == ME else (7, False)
    assert s.send_limit(owner, 10, 0.0) == expected


def test_a_peer_lacking_its_own_entries_gets_those_that_have_been_here_a_while() -> None:
    """A peer restored from an older copy of its store: entries of its own log that reached this
    node after its Hello (by another path) go to it once they have been here FORWARD_DELAY."""
    arrivals = Arrivals(FORWARD_DELAY, {PEER: 7})
    s = session(now=0.0, arrivals=arrivals)
    s._peer_own_cap = 7
    s.peer_has(PEER, 7, 0.0)
    arrivals.grew(PEER, 10, 5.0)
    assert s.send_limit(PEER, 10, 5.0 + FORWARD_DELAY / 2) == (7, True)
    assert s.send_limit(PEER, 10, 5.0 + FORWARD_DELAY) == (10, False)


def test_entries_that_just_arrived_are_held_back_from_an_idle_peer() -> None:
    """The peer last progressed on the owner long ago (the owner writes now and then): an entry
    that reached this node a moment ago is on its way to the peer from the owner too."""
    arrivals = Arrivals(FORWARD_DELAY, {OWNER: 10})
    s = session(now=0.0, arrivals=arrivals)
    s.peer_has(OWNER, 10, 0.0)
    arrivals.grew(OWNER, 11, 5.0)
    assert s.send_limit(OWNER, 11, 5.0 + FORWARD_DELAY / 2) == (10, True)
    # Still missing on the peer FORWARD_DELAY after it arrived here: forwarded.
    assert s.send_limit(OWNER, 11, 5.0 + FORWARD_DELAY) == (11, False)


def test_only_the_settled_part_of_a_log_is_probed() -> None:
    arrivals = Arrivals(FORWARD_DELAY, {})
    arrivals.grew(OWNER, 3, 1.0)
    arrivals.grew(OWNER, 8, 1.05)
    s = session(now=0.0, arrivals=arrivals)
    assert s.send_limit(OWNER, 8, 1.0 + FORWARD_DELAY) == (3, True)
    assert s.send_limit(OWNER, 8, 1.05 + FORWARD_DELAY) == (8, False)


def test_arrivals_tell_what_has_been_held_that_long_and_start_from_what_is_held() -> None:
    arrivals = Arrivals(2.0, {"old": 5})
    assert arrivals.held("old", 0.0, 1.0) == 5  # held at start: since long ago
    assert arrivals.held("new", 0.0, 1.0) == 0
    arrivals.grew("old", 7, 10.0)
    arrivals.grew("old", 9, 10.5)
    assert arrivals.held("old", 10.9, 1.0) == 5
    assert arrivals.held("old", 11.0, 1.0) == 7
    assert arrivals.held("old", 12.0, 1.0) == 9
    assert arrivals.held("old", 12.0, 2.0) == 7  # a longer age, on the same history
    arrivals.grew("new", 2, 20.0)
    assert arrivals.held("new", 20.5, 1.0) == 0
    assert arrivals.held("new", 21.0, 1.0) == 2


def test_arrivals_forget_what_is_older_than_they_keep() -> None:
    arrivals = Arrivals(1.0, {})
    for i in range(1000):
        arrivals.grew("o", i + 1, i * 0.01)
    assert len(arrivals._times["o"]) <= 201
    assert arrivals.held("o", 9.99, 1.0) == 900  # still right after forgetting


def test_a_peer_told_to_be_fed_elsewhere_is_no_longer_fed_from_here() -> None:
    s = session(now=0.0)
    s.sent[OWNER] = MAX_BATCH
    s.peer_has(OWNER, MAX_BATCH, FORWARD_DELAY)  # taking the probe from this node: fed
    s.peer_has(OWNER, MAX_BATCH, 1.0, elsewhere=True)  # its Ack: what this node sent it held already
    assert s.send_limit(OWNER, 5 * MAX_BATCH, 1.0 + FORWARD_DELAY) == (MAX_BATCH, True)
    late = 1.0 + ELSEWHERE_FACTOR * FORWARD_DELAY
    assert s.send_limit(OWNER, 5 * MAX_BATCH, late) == (2 * MAX_BATCH, True)  # a probe, later


def test_a_session_told_the_peer_is_fed_elsewhere_forwards_new_entries_only_after_the_feeder() -> None:
    """Two paths lead to the peer (a ring): the one told it is redundant leaves an entry written
    now and then to the other, which forwards it after FORWARD_DELAY; it forwards it itself only
    if the peer still lacks it ELSEWHERE_FACTOR times as long."""
    arrivals = Arrivals(ELSEWHERE_FACTOR * FORWARD_DELAY, {OWNER: 10})
    s = session(now=0.0, arrivals=arrivals)
    s.sent[OWNER] = 10
    s.peer_has(OWNER, 10, 0.0, elsewhere=True)
    arrivals.grew(OWNER, 11, 5.0)
    assert s.send_limit(OWNER, 11, 5.0 + FORWARD_DELAY) == (10, True)
    s.peer_has(OWNER, 11, 5.0 + FORWARD_DELAY + 0.01)  # the feeder's forward, in the peer's Ack
    assert s.send_limit(OWNER, 11, 10.0) == (11, False)  # nothing left to send
    arrivals.grew(OWNER, 12, 20.0)
    assert s.send_limit(OWNER, 12, 20.0 + 2 * FORWARD_DELAY) == (11, True)  # still deferred
    assert s.send_limit(OWNER, 12, 20.0 + ELSEWHERE_FACTOR * FORWARD_DELAY) == (12, False)


def test_a_peer_taking_a_deferred_log_from_this_node_is_fed_from_here_again() -> None:
    s = session(now=0.0)
    s.sent[OWNER] = MAX_BATCH
    s.peer_has(OWNER, MAX_BATCH, FORWARD_DELAY, elsewhere=True)
    late = FORWARD_DELAY + ELSEWHERE_FACTOR * FORWARD_DELAY
    assert s.send_limit(OWNER, 5 * MAX_BATCH, late) == (2 * MAX_BATCH, True)  # the other feed stopped
    s.sent[OWNER] = 2 * MAX_BATCH
    s.peer_has(OWNER, 2 * MAX_BATCH, late + 0.01)  # taken from here, not called redundant
    assert s.send_limit(OWNER, 5 * MAX_BATCH, late + 0.01) == (4 * MAX_BATCH, True)  # fed: 2 in flight


def test_a_deferred_session_forwards_what_a_slower_path_has_not_brought_yet() -> None:
    """The peer makes progress all the time, by a longer path: entries it still lacks after
    ELSEWHERE_FACTOR x FORWARD_DELAY here are forwarded all the same."""
    arrivals = Arrivals(ELSEWHERE_FACTOR * FORWARD_DELAY, {OWNER: 10})
    s = session(now=0.0, arrivals=arrivals)
    s.peer_has(OWNER, 10, 0.0, elsewhere=True)
    arrivals.grew(OWNER, 12, 5.0)
    s.peer_has(OWNER, 11, 5.0 + 2 * FORWARD_DELAY)  # progress, but not up to what is here
    assert s.send_limit(OWNER, 12, 5.0 + 2 * FORWARD_DELAY) == (11, True)
    assert s.send_limit(OWNER, 12, 5.0 + ELSEWHERE_FACTOR * FORWARD_DELAY) == (12, False)


def test_a_deferred_session_leaves_a_backlog_to_the_stream_feeding_it() -> None:
    s = session(now=0.0)
    s.peer_has(OWNER, MAX_BATCH, 0.0, elsewhere=True)
    s.peer_has(OWNER, 2 * MAX_BATCH, 1.0)  # the other stream feeds it
    assert s.send_limit(OWNER, 10 * MAX_BATCH, 1.0 + ELSEWHERE_FACTOR * FORWARD_DELAY / 2) == (
        2 * MAX_BATCH,
        True,
    )
    # That stream stopped: a probe batch, not the rest of the backlog.
    late = 1.0 + ELSEWHERE_FACTOR * FORWARD_DELAY
    assert s.send_limit(OWNER, 10 * MAX_BATCH, late) == (3 * MAX_BATCH, True)


async def test_a_peer_list_a_stream_cannot_take_is_dropped_without_an_unretrieved_error() -> None:
    """grpc raises its own errors (ExecuteBatchError, not an RpcError) on a write to a stream that
    is ending; the stream's own loops report that, and the peer list is simply not sent."""

    class GrpcInternalError(Exception):
        pass

    class Ending:
        peer_url = "http://peer"

        async def send(self, **kwargs: Any) -> None:
            raise GrpcInternalError('Failed "execute_batch"')

    await Replicator._send_quietly(Ending(), ["http://a"])  # type: ignore[arg-type]


async def test_an_ack_past_what_is_being_sent_moves_the_session_on_not_back() -> None:
    """While a batch of this node's own log is written, the peer acknowledges more of it (it got it
    by another path, as the log grew): `sent` must not fall back to the batch's end, nor the next
    batch be asked for a negative count (islice's ValueError ended healthy streams)."""
    me = "00000000-0000-4000-8000-0000000000aa"
    seq = 2 * MAX_BATCH
    asked: list[tuple[int, int]] = []

    def chain_bytes(owner: bytes, after: int, count: int) -> list[bytes]:
        asked.append((after, count))
        if count < 0:
            raise ValueError("Indices for islice() must be None or an integer")
        return [b"x"] * min(count, seq - after)

    log = SimpleNamespace(node_id=me, vector=lambda: {me: seq}, chain_bytes=chain_bytes)
    host: Any = SimpleNamespace(log=log, counters_for=lambda url: Counters())
    s = Session(host, transport=None, dialed=True, make_message=replication_pb2.ReplicateRequest)  # type: ignore[arg-type]
    s.peer_id = PEER

    class Transport:
        async def send(self, message: Any) -> None:
            s.peer_has(me, seq + 5, 0.0)  # an Ack read meanwhile

    s.transport = Transport()  # type: ignore[assignment]
    assert await s._send_available() == (True, False)
    assert s.sent[me] == seq + 5 and asked == [(0, MAX_BATCH)]
