"""What a node notices about its peers over time, for its operators: it looks at each peer's state
once a second (`Replicator.views`) and logs what changed, and it keeps each connected peer's
acknowledged vector now and then, so that after a crash of this node a peer that is away shows the
lag it has, not the one it had when its last stream ended before.

Logged: a peer catching up (after two looks in a row, so that a moment's backlog under load is not
news) and having caught up, with how many entries it took; a peer gone silent and heard again; this
node being at least `BEHIND_LOGGED` entries behind a peer and having caught up with it. Streams
opening and ending, and failed attempts, are logged where they happen (`potboiler.server.replication`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from potboiler.server.replication_session import Counters
from potboiler.server.replicator import Peer, PeerState, PeerView

log = logging.getLogger("potboiler.server.replication")

#: Seconds between two looks at the peers.
LOOK_INTERVAL = 1.0
#: Every how many looks a connected peer's acknowledged vector is kept.
KEEP_EVERY = 5
#: How far behind a peer this node must be for that to be logged (and then its catching up).
BEHIND_LOGGED = 1_000


class Watched(Protocol):
    """What the watch needs of a `Replicator`."""

    def views(self) -> list[tuple[Peer, PeerView]]: ...

    def counters_for(self, url: str) -> Counters: ...

    def keep_acked(self, url: str, vector: dict[str, int]) -> None: ...


@dataclass
class _Seen:
    """What was last seen of one peer."""

    state: PeerState | None = None
    #: A catch-up of the peer: when it was first seen, and the entries the peer had acknowledged
    #: then; and whether it has been logged (at the second look: one that ends at once is not news).
    catching_up: tuple[float, int] | None = None
    announced: bool = False
    #: This node catching up with the peer, logged: when it began, and the entries received then.
    behind: tuple[float, int] | None = None
    kept: dict[str, int] | None = None


class PeerWatch:
    """Looks at a replicator's peers every LOOK_INTERVAL (see the module's text)."""

    def __init__(self, replicator: Watched) -> None:
        self._replicator = replicator
        self._seen: dict[str, _Seen] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start looking."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="peer watch")

    async def stop(self) -> None:
        """Stop looking."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        looks = 0
        while True:
            await asyncio.sleep(LOOK_INTERVAL)
            looks += 1
            try:
                self.look(keep=looks % KEEP_EVERY == 0)
            except Exception:  # only logs and a peer's status while away are at stake: look again
                log.exception("could not look at the peers' states")

    def look(self, *, keep: bool = False) -> None:
        """Log what changed since the last look; with `keep`, keep the vector each connected peer
        acknowledged (if it changed)."""
        now = time.monotonic()
        views = self._replicator.views()
        for url in set(self._seen) - {peer.url for peer, _ in views}:
            del self._seen[url]  # no longer a peer
        for peer, view in views:
            seen = self._seen.setdefault(peer.url, _Seen())
            self._note_state(peer, view, seen, now)
            self._note_behind(peer, view, seen, now)
            if keep and view.state is not PeerState.DISCONNECTED and view.acked != seen.kept:
                self._replicator.keep_acked(peer.url, view.acked)
                seen.kept = view.acked

    def _note_state(self, peer: Peer, view: PeerView, seen: _Seen, now: float) -> None:
        before, state = seen.state, view.state
        seen.state = state
        if state is PeerState.SILENT and before is not PeerState.SILENT:
            log.warning("nothing from %s for %.1fs: its stream may be cut off", peer.url, view.silent)
        elif before is PeerState.SILENT and state in (PeerState.LIVE, PeerState.CATCHING_UP):
            log.info("%s is heard from again", peer.url)
        # Counted in what the peer acknowledged, as its lag is (entries sent but not acknowledged
        # yet are lacking still): the count taken in is then at least the count found lacking.
        if state is PeerState.CATCHING_UP:
            if seen.catching_up is None:
                seen.catching_up = (now, sum(view.acked.values()))
            elif not seen.announced:
                seen.announced = True
                log.info("%s lacks %d entries of this node's: sending them", peer.url, view.lag)
        elif state is PeerState.LIVE and seen.catching_up is not None:
            began, acknowledged = seen.catching_up
            if seen.announced:
                log.info(
                    "%s has caught up: %d entries taken in %.1fs",
                    peer.url,
                    sum(view.acked.values()) - acknowledged,
                    now - began,
                )
            seen.catching_up, seen.announced = None, False
        elif state is PeerState.DISCONNECTED:
            seen.catching_up, seen.announced = None, False  # the stream's end is logged where it ends

    def _note_behind(self, peer: Peer, view: PeerView, seen: _Seen, now: float) -> None:
        received = self._replicator.counters_for(peer.url).entries_in
        if seen.behind is None:
            if view.behind >= BEHIND_LOGGED and view.state is not PeerState.DISCONNECTED:
                seen.behind = (now, received)
                log.info("this node is %d entries behind %s: taking them in", view.behind, peer.url)
        elif view.behind == 0:
            began, before = seen.behind
            log.info(
                "this node has caught up with %s: %d entries received from it in %.1fs",
                peer.url,
                received - before,
                now - began,
            )
            seen.behind = None
