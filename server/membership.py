"""Membership: the root URLs of the nodes this node replicates with, persisted (`n<url>` -> the
peer's node id, empty until it is first reached).

A peer removed by an operator is remembered (`r<url>` -> its node id, if known) so that gossip and
the removed node's own reconnection attempts do not bring it back, under that URL or another one;
only an explicit add does. A peer an operator added is `joining` (`j<url>` -> '') until replication
with it starts: its first stream asks the peer to take this node back if it had removed it. A URL
dropped because it named a node known otherwise (`a<url>` -> '') is not learnt again from gossip,
but a node that dials in from it is taken as a peer: it is no removal. Each member's version vector as
it last acknowledged (`v<url>` -> 16-byte owner id and 8-byte seq per owner) is kept for its status
while it is not connected, also across restarts.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from potboiler.server.errors import InvalidArgument, NotFound
from potboiler.server.ids import parse_uuid, uuid_str
from potboiler.server.storage import Store, Write, prefix_end
from potboiler.server.urls import node_url

_PREFIX = b"n"
_REMOVED = b"r"
_JOINING = b"j"
_ALIASES = b"a"
_ACKED = b"v"
_OWNER_SEQ = struct.Struct(">16sQ")

log = logging.getLogger(__name__)


def _load(store: Store, prefix: bytes) -> dict[str, str]:
    return {key[1:].decode(): value.decode() for key, value in store.scan(prefix, prefix_end(prefix))}


class Membership:
    """The known peers. Listeners hear of every addition and removal (replication follows them)."""

    def __init__(self, store: Store, self_url: str) -> None:
        self._store = store
        self.self_url = node_url(self_url)
        #: Member URL -> the node id it answered with ('' until it was reached).
        self._urls = _load(store, _PREFIX)
        #: Removed URL -> the node id it had ('' if unknown).
        self._removed = _load(store, _REMOVED)
        self._joining = set(_load(store, _JOINING))
        #: URLs dropped as aliases of nodes known otherwise.
        self._aliases = set(_load(store, _ALIASES))
        self._listeners: list[Callable[[str, bool], None]] = []

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
        """Whether `url` was removed here (and has not been added again)."""
        return node_url(url) in self._removed

    def is_removed_node(self, node_id: str) -> bool:
        """Whether the node `node_id` was removed here under some URL (and has not joined again)."""
        return bool(node_id) and node_id in self._removed.values()

    def is_joining(self, url: str) -> bool:
        """Whether an operator added `url` and replication with it has not started since."""
        return url in self._joining

    def node_id_of(self, url: str) -> str:
        """The node id member `url` last answered with ('' if it was never reached)."""
        return self._urls.get(url, "")

    def acked_of(self, url: str) -> dict[str, int]:
        """Member `url`'s version vector as it last acknowledged it (empty if never)."""
        blob = self._store.get(_ACKED + url.encode()) or b""
        return {uuid_str(o): seq for o, seq in _OWNER_SEQ.iter_unpack(blob)}

    def note_acked(self, url: str, vector: dict[str, int]) -> None:
        """Keep member `url`'s last acknowledged version vector (see `acked_of`)."""
        if url in self._urls:
            blob = b"".join(_OWNER_SEQ.pack(parse_uuid(o), seq) for o, seq in sorted(vector.items()))
            self._store.write([(_ACKED + url.encode(), blob)])

    def url_of(self, node_id: str) -> str | None:
        """The member URL that answered as `node_id`, if any."""
        return next((url for url, known in self._urls.items() if known == node_id), None) if node_id else None

    def add(self, url: str, *, join: bool = True) -> bool:
        """Add a peer by an operator's decision (clears an earlier removal); with `join` the peer is
        `joining` until replication with it starts. Returns False if it was known already."""
        url = node_url(url)
        if url == self.self_url:
            raise InvalidArgument(f"{url} is this node itself")
        writes: list[Write] = []
        if join and url not in self._joining:
            writes.append((_JOINING + url.encode(), b""))
        if self._insert(url, writes, joining=join):
            log.info("%s added as a peer%s", url, " by an operator" if join else " (it asked to join again)")
            return True
        for listener in self._listeners:  # known already: replication may try it again at once
            listener(url, True)
        return False

    def learn(self, url: str, *, dialed_in: bool = False) -> bool:
        """Add a peer heard of from another node (or named by --peer), unless it is this node or was
        removed here, or dropped as an alias (unless the node at `url` itself dialed in: `dialed_in`);
        it is not `joining`."""
        url = node_url(url)
        if url == self.self_url or url in self._removed or (url in self._aliases and not dialed_in):
            return False
        if not self._insert(url, [], joining=False):
            return False
        log.info("%s learnt as a peer%s", url, " (it dialed in)" if dialed_in else "")
        return True

    def _insert(self, url: str, writes: list[Write], *, joining: bool) -> bool:
        new = url not in self._urls
        if new:
            key = url.encode()
            writes += [(_PREFIX + key, b""), (_REMOVED + key, None), (_ALIASES + key, None)]
        if writes:
            self._store.write(writes, sync=True)
        if joining:
            self._joining.add(url)
        if not new:
            return False
        self._removed.pop(url, None)
        self._aliases.discard(url)
        self._urls[url] = ""
        for listener in self._listeners:
            listener(url, True)
        return True

    def identify(self, url: str, node_id: str) -> None:
        """Record that member `url` answered as node `node_id`; a removal of that node under another
        URL no longer stands (the node is a member again)."""
        if url not in self._urls or self._urls[url] == node_id:
            return
        cleared = [u for u, known in self._removed.items() if known == node_id]
        writes: list[Write] = [(_PREFIX + url.encode(), node_id.encode())]
        writes += [(_REMOVED + u.encode(), b"") for u in cleared]
        self._store.write(writes, sync=True)
        self._urls[url] = node_id
        self._removed.update(dict.fromkeys(cleared, ""))

    def joined(self, url: str) -> None:
        """Replication with `url` started: it is no longer `joining`."""
        if url in self._joining:
            self._store.write([(_JOINING + url.encode(), None)], sync=True)
            self._joining.discard(url)

    def remove(self, url: str) -> None:
        """Remove a peer; NotFound if it is not known. Its node, if known, is refused under any URL."""
        url = node_url(url)
        if url not in self._urls:
            raise NotFound(f"{url} is not a known node")
        self._discard(url, self._urls[url])
        log.info("%s removed from the peers (refused from now on, until added again)", url)

    def drop_alias(self, url: str) -> None:
        """Drop a member URL that names a node known otherwise (this node, or a peer under another
        URL). Gossip does not bring it back; a node that dials in from it is no removed node."""
        if url in self._urls:
            self._discard(url, None)

    def _discard(self, url: str, node_id: str | None) -> None:
        """Forget member `url`: removed (refused, with `node_id`: its node's id if known, else ''),
        or, with None, dropped as an alias."""
        key = url.encode()
        mark = (_ALIASES + key, b"") if node_id is None else (_REMOVED + key, node_id.encode())
        self._store.write(
            [(_PREFIX + key, None), mark, (_JOINING + key, None), (_ACKED + key, None)], sync=True
        )
        del self._urls[url]
        if node_id is None:
            self._aliases.add(url)
        else:
            self._removed[url] = node_id
        self._joining.discard(url)
        for listener in self._listeners:
            listener(url, False)
