"""`Plan`: one change of the log being built, the batch to write and the state to adopt once it is
written (see `potboiler.server.log.Log`, which plans, and `potboiler.server.log_layout` for the
records)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from potboiler.server.log_layout import U64, DeliveryRun
from potboiler.server.storage import Write
from potboiler.v1.entry_pb2 import Entry


@dataclass
class Plan:
    """A change of the log: the batch to write, then the in-memory state to adopt once written."""

    position: int
    #: How many more waiting entries it may deliver, and the delivered entries whose waiters are
    #: left for the next plan once that is spent (see `potboiler.server.log.CASCADE_BUDGET`).
    budget: int
    writes: list[Write] = field(default_factory=list)
    #: How many entries it stores.
    stored: int = 0
    #: The entries this plan stores through `Log._plan_store` (all but the remote ones that are
    #: delivered at once), by id, with their locations and serialized forms.
    by_id: dict[bytes, Entry] = field(default_factory=dict)
    locations: dict[bytes, bytes] = field(default_factory=dict)
    blobs: dict[bytes, bytes] = field(default_factory=dict)
    heads: dict[bytes, tuple[int, bytes]] = field(default_factory=dict)
    #: What this plan delivers, in delivery order: ids, entries (None for those not parsed: this
    #: node's new entries are only ever serialized) and the entries serialized.
    delivered: list[bytes] = field(default_factory=list)
    delivered_entries: list[Entry | None] = field(default_factory=list)
    delivered_blobs: list[bytes] = field(default_factory=list)
    delivered_set: set[bytes] = field(default_factory=set)
    undelivered: set[bytes] = field(default_factory=set)
    #: The wait marks it adds (what is waited for -> the entries waiting) and those it takes away.
    waiting: dict[bytes, list[bytes]] = field(default_factory=dict)
    unwaited: list[tuple[bytes, bytes]] = field(default_factory=list)
    resume: list[bytes] = field(default_factory=list)
    #: The delivery run being built, written by `Log.finish` (or when the next one begins).
    run: DeliveryRun | None = None

    def store_delivered(self, entry: Entry, raw: bytes, owner: bytes, seq: int, blob: bytes | None) -> None:
        """Store and deliver at once an entry that needs only its predecessor, while nothing waits
        for anything (so its predecessor is delivered): the hot path of appends and catch-up.
        The caller sets its chain's head."""
        location = owner + U64.pack(seq)
        if blob is None:
            blob = entry.SerializeToString()
        writes = self.writes
        writes.append((b"o" + location, blob))
        writes.append((b"e" + raw, location))
        self.stored += 1
        self.deliver(raw, owner, seq, entry, blob)

    def store_run(
        self,
        owner: bytes,
        seq: int,
        raws: Sequence[bytes],
        entries: Sequence[Entry] | None,
        blobs: Sequence[bytes],
    ) -> None:
        """`store_delivered` for a stretch of `owner`'s chain from seq `seq` on (the entries, or None
        if they are not parsed, their 16-byte ids and their serialized forms, in chain order), a
        whole batch at a time. The caller sets the chain's head."""
        locations = [owner + U64.pack(s) for s in range(seq, seq + len(raws))]
        writes = self.writes
        writes.extend(zip([b"o" + location for location in locations], blobs, strict=True))
        writes.extend(zip([b"e" + raw for raw in raws], locations, strict=True))
        self.stored += len(raws)
        self.deliver_run(raws, owner, seq, entries, blobs)

    def deliver(self, raw: bytes, owner: bytes, seq: int, entry: Entry, blob: bytes) -> None:
        """Give the stored entry `raw`, seq `seq` of `owner`'s chain, the next delivery position."""
        self._advance(owner, seq, 1)
        self.delivered.append(raw)
        self.delivered_set.add(raw)
        self.delivered_entries.append(entry)
        self.delivered_blobs.append(blob)

    def deliver_run(
        self,
        raws: Sequence[bytes],
        owner: bytes,
        seq: int,
        entries: Sequence[Entry] | None,
        blobs: Sequence[bytes],
    ) -> None:
        """Give the stored entries `raws` (seq `seq`, `seq` + 1, ... of `owner`'s chain, with the
        entries, or None if they are not parsed, and their serialized forms in the same order) the
        next delivery positions."""
        self._advance(owner, seq, len(raws))
        self.delivered.extend(raws)
        self.delivered_set.update(raws)
        self.delivered_entries.extend([None] * len(raws) if entries is None else entries)
        self.delivered_blobs.extend(blobs)

    def _advance(self, owner: bytes, seq: int, count: int) -> None:
        """Take the next `count` delivery positions for `owner`'s chain from seq `seq` on: the
        current delivery run grows if they continue it, else a new one starts."""
        run = self.run
        if run is not None and run.owner == owner and run.seq + run.count == seq:
            run.count += count
        else:
            if run is not None:
                self.writes.append(run.record())
            self.run = DeliveryRun(self.position + 1, owner, seq, count)
        self.position += count
