"""Forked logs as seen here: owners of whose log a peer sent or holds another entry at a seq than
the one this node holds (a store restored from an older copy after it wrote more, a copied data
directory). Kept in the store (`f<owner id text>` -> seq, id text), as the forked node may well never
send them again."""

from __future__ import annotations

import logging

from potboiler.server.log_layout import U64
from potboiler.server.storage import Store, prefix_end
from potboiler.v1.entry_pb2 import Entry

_logger = logging.getLogger("potboiler.server.log")  # the log store's lines, under one name
_KEY = b"f"


class Forks:
    """Per owner whose log forked, the seq where it did and the id of the entry held here at the
    seq before ('' if none). The log takes no entry of a forked owner past the fork."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._seqs: dict[str, int] = {}
        self._held_before: dict[str, str] = {}
        for key, value in store.scan(_KEY, prefix_end(_KEY)):
            owner = key[1:].decode()
            self._seqs[owner] = U64.unpack(value[:8])[0]
            self._held_before[owner] = value[8:].decode()

    def seqs(self) -> dict[str, int]:
        """Each forked owner, with the seq where its log forked."""
        return dict(self._seqs)

    def seq(self, owner: str) -> int:
        """The seq where `owner`'s log forked (0: it did not)."""
        return self._seqs.get(owner, 0)

    def of(self, owner: str) -> tuple[int, str]:
        """The seq where `owner`'s log forked (0: it did not) and the id of the entry held here at
        the seq before it."""
        return self._seqs.get(owner, 0), self._held_before.get(owner, "")

    def note_sent(self, owner: str, seq: int, entry: Entry, held_prev: str, source: str = "") -> None:
        """A peer, `source`, sent `entry` at seq `seq` of `owner`'s log, after another entry than
        `held_prev`, which this node holds at the seq before."""
        if self._seqs.get(owner) == seq:
            return
        self._note(owner, seq, held_prev)
        _logger.warning(
            "the log of %s has forked at seq %d: %s sent entry %s after %s, this node holds %s "
            "there; that log's entries past it are not taken (wipe the forked node's data directory "
            "and let it rejoin)",
            owner,
            seq,
            source or "a peer",
            entry.id,
            entry.prev or "(none)",
            held_prev or "(none)",
        )

    def note_own(self, me: str, seq: int, held_before: str, mine: str, source: str = "") -> None:
        """A peer, `source`, found this node's own log (`me`, not forked yet) forked at `seq`: it holds
        `held_before` at the seq before, where this node holds `mine` ('' if no entry). A claim that
        does not hold (the same entry there, or none here to compare) is logged and ignored."""
        if not mine or mine == held_before:
            _logger.warning(
                "%s says this node's own log forked at seq %d, holding %s before it; this node holds "
                "%s there: ignored",
                source or "a peer",
                seq,
                held_before or "(none)",
                mine or "no entry",
            )
            return
        self._note(me, seq, held_before)
        _logger.error(
            "%s holds other entries of this node's own log than this node from seq %d on (its "
            "store was restored from an older copy after it wrote more, or another process runs "
            "with its id): appends are refused from now on; wipe this node's data directory and let "
            "it rejoin its cluster as a new node",
            source or "a peer",
            seq,
        )

    def _note(self, owner: str, seq: int, held_before: str) -> None:
        self._seqs[owner] = seq
        self._held_before[owner] = held_before
        self._store.write([(_KEY + owner.encode(), U64.pack(seq) + held_before.encode())], sync=True)
