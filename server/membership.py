"""Membership: the root URLs of the nodes this node replicates with, persisted (`n<url>` -> '').

A peer removed by an operator is remembered (`r<url>` -> '') so that gossip and the removed node's
own reconnection attempts do not bring it back; only an explicit add does.
"""

from __future__ import annotations

from collections.abc import Callable

from potboiler.server.errors import InvalidArgument, NotFound
from potboiler.server.storage import Store, prefix_end
from potboiler.server.urls import node_url

_PREFIX = b"n"
_REMOVED = b"r"


class Membership:
    """The known peers. Listeners hear of every addition and removal (replication follows them)."""

    def __init__(self, store: Store, self_url: str) -> None:
        self._store = store
        self.self_url = node_url(self_url)
        self._urls = {key[1:].decode() for key, _ in store.scan(_PREFIX, prefix_end(_PREFIX))}
        self._removed = {key[1:].decode() for key, _ in store.scan(_REMOVED, prefix_end(_REMOVED))}
        self._listeners: list[Callable[[str, bool], None]] = []
        #: Peers an operator added since start whose replication has not started yet.
        self.joining: set[str] = set()

    def on_change(self, listener: Callable[[str, bool], None]) -> None:
        """Call `listener(url, added)` on every change."""
        self._listeners.append(listener)

    def urls(self) -> list[str]:
        """The peers' root URLs, sorted."""
        return sorted(self._urls)

    @staticmethod
    def normalise(url: str) -> str:
        """The canonical form of a node root URL (InvalidArgument if it is not one)."""
        return node_url(url)

    def is_removed(self, url: str) -> bool:
        """Whether an operator removed `url` (and has not added it again)."""
        return node_url(url) in self._removed

    def add(self, url: str) -> bool:
        """Add a peer by an operator's decision (clears an earlier removal); the peer is then
        `joining` until replication with it starts. Returns False if it was known already."""
        url = node_url(url)
        if url == self.self_url:
            raise InvalidArgument(f"{url} is this node itself")
        self.joining.add(url)
        return self._insert(url)

    def learn(self, url: str) -> bool:
        """Add a peer heard of from another node, unless it is this node or was removed here."""
        url = node_url(url)
        if url == self.self_url or url in self._removed:
            return False
        return self._insert(url)

    def _insert(self, url: str) -> bool:
        if url in self._urls:
            return False
        self._store.write([(_PREFIX + url.encode(), b""), (_REMOVED + url.encode(), None)], sync=True)
        self._removed.discard(url)
        self._urls.add(url)
        for listener in self._listeners:
            listener(url, True)
        return True

    def remove(self, url: str) -> None:
        """Remove a peer; NotFound if it is not known."""
        url = node_url(url)
        if url not in self._urls:
            raise NotFound(f"{url} is not a known node")
        self._store.write([(_PREFIX + url.encode(), None), (_REMOVED + url.encode(), b"")], sync=True)
        self._urls.discard(url)
        self._removed.add(url)
        self.joining.discard(url)
        for listener in self._listeners:
            listener(url, False)
