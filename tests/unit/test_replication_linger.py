"""How long a replication session waits after a message before sending the next (Session._linger):
until LINGER_ENTRIES of this node's own entries are ready and LINGER_GAP has passed, or the
replicator's linger is over."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace
from typing import Any

import pytest

from potboiler.server import replication_session
from potboiler.server.replication_session import LINGER_ENTRIES, LINGER_GAP, Session
from potboiler.v1 import replication_pb2

ME = "me"


class OwnLog:
    """The part of a node's Log that lingering reads: its id and the head of its own log."""

    def __init__(self, seq: int) -> None:
        self.node_id = ME
        self.seq = seq

    def own_seq(self) -> int:
        return self.seq


def session(sent: int) -> tuple[Session, OwnLog]:
    """A session that has sent the peer this node's log up to seq `sent`, all of it here."""
    own = OwnLog(sent)
    host: Any = SimpleNamespace(log=own)
    s = Session(host, transport=None, dialed=True, make_message=replication_pb2.ReplicateRequest)  # type: ignore[arg-type]
    s.sent[ME] = sent
    return s, own


async def test_the_wait_ends_once_enough_entries_are_ready() -> None:
    s, own = session(sent=10)
    waiting = asyncio.create_task(s._linger(60.0))
    for _ in range(LINGER_ENTRIES - 1):
        own.seq += 1
        s.wake()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not waiting.done()  # one entry short: the message would carry too few
    own.seq += 1
    s.wake()
    await asyncio.wait_for(waiting, 5.0)


async def test_with_enough_ready_already_the_wait_ends_after_the_gap() -> None:
    """Under a load that readies LINGER_ENTRIES at once, messages still leave LINGER_GAP apart
    (carrying more entries each)."""
    s, own = session(sent=10)
    own.seq += LINGER_ENTRIES
    loop = asyncio.get_running_loop()
    began = loop.time()
    await asyncio.wait_for(s._linger(60.0), 5.0)
    assert loop.time() - began >= LINGER_GAP


async def test_a_linger_shorter_than_the_gap_ends_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replication_session, "LINGER_GAP", 60.0)
    s, own = session(sent=10)
    own.seq += LINGER_ENTRIES
    await asyncio.wait_for(s._linger(0.01), 5.0)


async def test_what_the_peer_acknowledged_is_not_counted_as_ready() -> None:
    """Entries the peer holds already (its Ack went past what was sent) will not be sent."""
    s, own = session(sent=10)
    own.seq += LINGER_ENTRIES
    s.acked[ME] = own.seq - 1
    waiting = asyncio.create_task(s._linger(60.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting


async def test_with_too_few_entries_the_wait_ends_after_the_linger() -> None:
    s, own = session(sent=10)
    own.seq += LINGER_ENTRIES - 1
    await asyncio.wait_for(s._linger(0.01), 5.0)
