"""`PeerWatch`: the changes of a peer's state it logs, and the vectors it keeps."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest

from potboiler.server.peer_watch import BEHIND_LOGGED, PeerWatch
from potboiler.server.replication_session import Counters
from potboiler.server.replicator import Peer, PeerState, PeerView

URL = "http://10.0.0.2:8000"


@dataclass
class FakeReplicator:
    """One peer whose view the test sets."""

    view: PeerView
    peer: Peer = field(default_factory=lambda: Peer(URL))
    counters: Counters = field(default_factory=Counters)
    kept: list[dict[str, int]] = field(default_factory=list)

    def views(self) -> list[tuple[Peer, PeerView]]:
        return [(self.peer, self.view)]

    def counters_for(self, url: str) -> Counters:
        return self.counters

    def keep_acked(self, url: str, vector: dict[str, int]) -> None:
        self.kept.append(vector)


def view(state: PeerState, lag: int = 0, behind: int = 0, acked: dict[str, int] | None = None) -> PeerView:
    return PeerView(
        state, acked or {}, lag, behind, silent=3.5 if state is PeerState.SILENT else 0.0, down=0.0
    )


def messages(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    out = [(r.levelno, r.getMessage()) for r in caplog.records]
    caplog.clear()
    return out


def test_a_catch_up_is_logged_once_it_lasts_and_when_it_ends(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="potboiler.server.replication")
    fake = FakeReplicator(view(PeerState.LIVE))
    watch = PeerWatch(fake)
    watch.look()
    fake.view = view(PeerState.CATCHING_UP, lag=40)
    watch.look()
    fake.view = view(PeerState.LIVE)
    watch.look()
    assert messages(caplog) == []  # a moment's backlog is not news
    # Counted from the first look, in what the peer acknowledged (20,000 were sent, not acknowledged).
    fake.view = view(PeerState.CATCHING_UP, lag=60_000, acked={"o": 10_000})
    watch.look()
    fake.view = view(PeerState.CATCHING_UP, lag=50_000, acked={"o": 20_000})
    watch.look()
    assert messages(caplog) == [(logging.INFO, f"{URL} lacks 50000 entries of this node's: sending them")]
    fake.view = view(PeerState.LIVE, acked={"o": 70_000})
    watch.look()
    [(level, text)] = messages(caplog)
    assert level == logging.INFO and text.startswith(f"{URL} has caught up: 60000 entries taken in ")


def test_silence_is_a_warning_and_being_heard_again_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="potboiler.server.replication")
    fake = FakeReplicator(view(PeerState.LIVE))
    watch = PeerWatch(fake)
    watch.look()
    fake.view = view(PeerState.SILENT)
    watch.look()
    watch.look()
    assert messages(caplog) == [(logging.WARNING, f"nothing from {URL} for 3.5s: its stream may be cut off")]
    fake.view = view(PeerState.LIVE)
    watch.look()
    assert messages(caplog) == [(logging.INFO, f"{URL} is heard from again")]


def test_this_node_far_behind_a_peer_is_logged_and_so_is_its_catching_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="potboiler.server.replication")
    fake = FakeReplicator(view(PeerState.LIVE, behind=BEHIND_LOGGED - 1))
    watch = PeerWatch(fake)
    watch.look()
    assert messages(caplog) == []
    fake.view = view(PeerState.LIVE, behind=200_000)
    watch.look()
    fake.counters.entries_in += 150_000
    fake.view = view(PeerState.LIVE, behind=50_000)
    watch.look()
    assert messages(caplog) == [(logging.INFO, f"this node is 200000 entries behind {URL}: taking them in")]
    fake.counters.entries_in += 50_000
    fake.view = view(PeerState.LIVE, behind=0)
    watch.look()
    [(_, text)] = messages(caplog)
    assert text.startswith(f"this node has caught up with {URL}: 200000 entries received from it in ")


def test_a_connected_peers_vector_is_kept_when_asked_and_only_if_it_changed() -> None:
    fake = FakeReplicator(view(PeerState.LIVE, acked={"a": 3}))
    watch = PeerWatch(fake)
    watch.look()
    assert fake.kept == []
    watch.look(keep=True)
    watch.look(keep=True)
    fake.view = view(PeerState.LIVE, acked={"a": 4})
    watch.look(keep=True)
    fake.view = view(PeerState.DISCONNECTED, acked={"a": 5})  # kept by the stream's end
    watch.look(keep=True)
    assert fake.kept == [{"a": 3}, {"a": 4}]
