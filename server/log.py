"""The log store: every owner's append-only chain of entries, the version vector, and this node's
causal delivery order, on a `Store` (laid out as `potboiler.server.log_layout` describes).

An entry is *delivered* (gets the next position) once its owner's previous entry and all its
dependencies are delivered; until then it waits in the `p`/`u` index. Each change of the log is
planned in memory (`plan_*`, into a `Plan`), written as ONE batch, then applied to the in-memory
state (`apply`), so a failed write changes nothing and a crash leaves the store consistent.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from potboiler.server import wire
from potboiler.server.entries import AppendedEntries, NewEntry
from potboiler.server.entry_batches import parsed_run_owner
from potboiler.server.errors import Conflict, InvalidArgument, NotFound, OutOfRange, Unavailable, quoted
from potboiler.server.hlc import HybridClock, Stamp
from potboiler.server.ids import canonical_uuid, new_uuid, new_uuids, parse_uuid, parse_uuids, uuid_str
from potboiler.server.log_delivered import DeliveredBatch, read_delivered, take_delivered
from potboiler.server.log_forks import Forks
from potboiler.server.log_layout import DELIVERY_END, DELIVERY_START, HEAD, U64, DeliveryRun
from potboiler.server.log_plan import Plan
from potboiler.server.storage import Store, prefix_end
from potboiler.v1.entry_pb2 import Entry

_NODE_ID_KEY = b"mnode_id"
#: The layout of the log's store (see `potboiler.server.log_layout`) as a number a checkout checks: one
#: that reads an older layout raises this when it writes the store; one that finds a newer refuses to
#: open it (it would misread it). Stores written before the mark are in format 1.
_FORMAT_KEY = b"mformat"
LOG_FORMAT = 1
#: Most waiting entries one plan delivers as they become deliverable; the next plans go on from
#: there (so that an entry that thousands wait for holds up the node's event loop for a moment only).
CASCADE_BUDGET = 4_000


@dataclass(frozen=True)
class Head:
    """One owner's log ends as held by this node."""

    owner: str
    seq: int
    head: str
    first: str


class Promise(NamedTuple):
    """An owner's word about its clock: it has stamped no entry after `stamp` beyond seq `seq` of its
    own log, and will stamp every later entry after `stamp`. Whoever holds that owner's log up to
    `seq` therefore holds every entry of it stamped at or before `stamp`, even while it writes
    nothing. (After a restart a node's clock resumes from its newest entry and the physical clock,
    so a promise made from a stamp it had only observed may be undercut by up to the clock skew
    it accepts from peers.)"""

    stamp: Stamp
    seq: int


class Blocked(NamedTuple):
    """This node's own log is held up: its entry `entry` (seq `seq`), the first of its own entries not
    delivered, waits for the entries `waits_for`, which are not delivered here (most likely not here
    at all). Every later entry of this node waits behind it."""

    entry: str
    seq: int
    waits_for: tuple[str, ...]

    def describe(self) -> str:
        """What holds the log up, in words."""
        if not self.waits_for:  # all it needs has arrived: it is among those being delivered
            return (
                f"this node's log is held up: its entry {self.entry} (seq {self.seq}) is among entries "
                f"being delivered now that what they waited for is here ({CASCADE_BUDGET:,} a write)"
            )
        return (
            f"this node's log is held up: its entry {self.entry} (seq {self.seq}) depends on "
            f"{', '.join(self.waits_for)}, not delivered here yet, and its later entries wait behind it"
        )


@dataclass
class _Chain:
    """Where one owner's chain stands while a plan takes entries of it: its seq, the id of its last
    entry (bytes and text) and the last entry taken, if any."""

    owner: bytes
    seq: int
    raw: bytes
    text: str
    last: Entry | None = None


class Log:
    """The log of one node. Single writer: only one plan may be in flight at a time (the
    `Appender` serialises them); reads may happen at any time and see the last applied plan."""

    def __init__(
        self, store: Store, clock: HybridClock | None = None, *, cascade_budget: int = CASCADE_BUDGET
    ) -> None:
        self._store = store
        self._cascade_budget = cascade_budget
        raw_id = store.get(_NODE_ID_KEY)
        written_in = store.get(_FORMAT_KEY)
        if raw_id is None:
            raw_id, _ = new_uuid()
            store.write([(_NODE_ID_KEY, raw_id), (_FORMAT_KEY, U64.pack(LOG_FORMAT))], sync=True)
        elif written_in is None:  # written before the mark, in a layout this format reads
            store.write([(_FORMAT_KEY, U64.pack(LOG_FORMAT))], sync=True)
        elif U64.unpack(written_in)[0] > LOG_FORMAT:
            raise OSError(
                f"the log store was written in format {U64.unpack(written_in)[0]}, by a newer "
                f"Potboiler, and this one reads formats up to {LOG_FORMAT}: run the newer one"
            )
        self.node_id_bytes = raw_id
        self.node_id = uuid_str(raw_id)
        self._heads: dict[bytes, tuple[int, bytes]] = {}
        for key, value in store.scan(b"h", prefix_end(b"h")):
            self._heads[key[1:]] = HEAD.unpack(value)
        self._undelivered = {key[1:] for key, _ in store.scan(b"u", prefix_end(b"u"))}
        #: The `p` marks in memory: per entry waited for, the stored entries waiting for it.
        self._waiting: dict[bytes, set[bytes]] = {}
        for key, _ in store.scan(b"p", prefix_end(b"p")):
            self._waiting.setdefault(key[1:17], set()).add(key[17:])
        #: Delivered entries whose waiters the next plan looks at (a plan's budget ran out): at
        #: start, every delivered entry that something still waits for.
        self._resume = sorted(
            awaited
            for awaited in self._waiting
            if awaited not in self._undelivered and store.get(b"e" + awaited) is not None
        )
        last = store.last(DELIVERY_START, DELIVERY_END)
        self._position = DeliveryRun.read(*last).last if last else 0
        self.clock = clock or HybridClock()
        self._promises: dict[str, Promise] = {}
        #: The highest seq of this node's own log that a peer has said it holds (see `note_own_seq`).
        self._own_floor = 0
        #: What `own_blocked` found, until the next change of the log.
        self._blocked: Blocked | None = None
        self._forks = Forks(store)
        # Later stamps exceed every stamp held, as they did before the restart: each owner's newest
        # entry holds its highest (an owner's stamps grow along its chain).
        for owner, (seq, _) in self._heads.items():
            when = self._load_at(owner + U64.pack(seq)).when
            stamp = Stamp(when.wall_ms, when.logical)
            if owner == raw_id:
                self.clock.observe(stamp)
            else:
                self.clock.observe_remote(stamp)

    # -- reads -------------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """Position of the newest delivered entry (0 when none)."""
        return self._position

    @property
    def pending(self) -> int:
        """How many stored entries wait for a dependency."""
        return len(self._undelivered)

    def vector(self) -> dict[str, int]:
        """This node's version vector: per owner, the highest seq held (contiguously from 1)."""
        return {uuid_str(owner): seq for owner, (seq, _) in self._heads.items()}

    def own_seq(self) -> int:
        """The highest seq of this node's own log held here (0 before any)."""
        head = self._heads.get(self.node_id_bytes)
        return 0 if head is None else head[0]

    def own_log_blocked(self) -> bool:
        """Whether an entry of this node's own log waits for a dependency (so new ones would too)."""
        head = self._heads.get(self.node_id_bytes)
        return head is not None and head[1] in self._undelivered

    def own_blocked(self) -> Blocked | None:
        """What holds this node's own log up, if anything: the first of its own entries that waits
        for a dependency, and what it waits for."""
        if not self.own_log_blocked():
            return None
        if self._blocked is None:  # found once per change of the log: refused writes ask again and again
            self._blocked = self._find_own_blocked()
        return self._blocked

    def _find_own_blocked(self) -> Blocked:
        me = self.node_id_bytes
        head = self._heads[me]
        # Own entries are delivered in seq order: the undelivered ones are a tail of the chain.
        low, high = 1, head[0]
        while low < high:
            middle = (low + high) // 2
            if parse_uuid(self._load_at(me + U64.pack(middle)).id) in self._undelivered:
                high = middle
            else:
                low = middle + 1
        entry = self._load_at(me + U64.pack(low))
        plan = self.begin()
        waits_for = tuple(d for d in entry.dependencies if not self._is_delivered(plan, parse_uuid(d)))
        return Blocked(entry.id, low, waits_for)

    def promise(self) -> Promise:
        """This node's own clock promise, as of now (it takes a stamp from the clock, so that an idle
        node's promises keep up with time)."""
        return Promise(self.clock.now(), self._heads.get(self.node_id_bytes, (0, b""))[0])

    def note_promise(self, owner: str, promise: Promise) -> None:
        """Remember another owner's clock promise (an older one than already known changes nothing),
        and let this node's clock follow it as it follows peers' entries: an idle node whose clock
        is behind would otherwise stamp its next entries (a Pigtail claim, whose lease runs from its
        stamp) at a time the other nodes have left behind."""
        self.clock.observe_remote(promise.stamp)
        known = self._promises.get(owner)
        if known is None or promise.stamp > known.stamp:
            self._promises[owner] = promise

    def note_own_seq(self, seq: int) -> None:
        """A peer holds this node's own log up to `seq`. Beyond this node's own head that means the
        store is older than what the node once wrote (restored from a copy, or it lost writes not
        yet synced): new local entries would reuse seqs its earlier entries hold elsewhere, and
        fork its log, so appends wait (Unavailable) until replication has brought those back."""
        self._own_floor = max(self._own_floor, seq)

    def promises(self) -> dict[str, Promise]:
        """The newest clock promise of every owner that made one, this node's own included."""
        return {**self._promises, self.node_id: self.promise()}

    def total(self) -> int:
        """How many entries this node holds."""
        return sum(seq for seq, _ in self._heads.values())

    def heads(self) -> list[Head]:
        """Every owner's first and newest entry, sorted by owner."""
        out = []
        for owner, (seq, head) in sorted(self._heads.items()):
            first = self._load_at(owner + U64.pack(1)).id
            out.append(Head(uuid_str(owner), seq, uuid_str(head), first))
        return out

    def get(self, entry_id: str) -> Entry:
        """The entry with `next` filled in; InvalidArgument for a bad id, NotFound if unknown."""
        raw = parse_uuid(entry_id)
        if self._store.get(b"e" + raw) is None:
            raise NotFound(f"no entry with id {entry_id}")
        return self.with_next(self._load(raw))

    def with_next(self, entry: Entry) -> Entry:
        """Fill in `next` from the chain (`entry` is changed and returned)."""
        nxt = self._store.get(b"o" + parse_uuid(entry.owner) + U64.pack(entry.seq + 1))
        if nxt is not None:
            entry.next = Entry.FromString(nxt).id
        return entry

    def delivered(self, after: int, limit: int) -> list[tuple[int, Entry]]:
        """Up to `limit` delivered entries with position > `after`, in delivery order."""
        return self.delivered_batch(after, limit).entries

    def delivered_batch(self, after: int, limit: int) -> DeliveredBatch:
        """Up to `limit` delivered entries with position > `after`, in delivery order, with their
        serialized forms."""
        delivered = self.delivered_blobs(after, limit)
        return DeliveredBatch([position for position, _ in delivered], [blob for _, blob in delivered])

    def delivered_blobs(
        self, after: int, limit: int, max_bytes: int | None = None
    ) -> list[tuple[int, bytes]]:
        """Up to `limit` delivered entries with position > `after`, in delivery order, serialized, as
        (position, bytes); with `max_bytes`, only as many as fit in it (but at least one)."""
        if after >= self._position:
            return []
        return take_delivered(read_delivered(self._store, after, limit, max_bytes), limit, max_bytes)

    def check_resume(self, after: int, after_id: str) -> None:
        """Check where a subscriber resumes: after position `after`, and, if `after_id` is given, the
        id of the entry it saw there. OutOfRange beyond the newest position (waiting for it would
        skip the entries delivered up to it, unseen); Conflict unless this node delivered entry
        `after_id` at `after` (the position came from another delivery order); InvalidArgument for
        a bad id, or an id with position 0."""
        if after > self._position:
            raise OutOfRange(
                f"position {after} is beyond this node's last delivered position {self._position} "
                "(positions are this node's own: resume with a position it gave)"
            )
        if not after_id:
            return
        if after == 0:
            raise InvalidArgument("after_id names the entry at after_position, and position 0 has none")
        wanted = uuid_str(parse_uuid(after_id, "after_id"))
        [(_, blob)] = self.delivered_blobs(after - 1, 1)
        held = Entry.FromString(blob).id
        if held != wanted:
            raise Conflict(
                f"the entry at position {after} here is {held}, not {quoted(after_id)}: this "
                "node's delivery order is not the one that position came from (it lost data since, "
                "or it is another node); subscribe again from a position it gave, or from 0"
            )

    def chain_bytes(self, owner: bytes, after_seq: int, limit: int) -> list[bytes]:
        """Up to `limit` serialized entries of `owner`'s log with seq > `after_seq`, in seq order."""
        start = b"o" + owner + U64.pack(after_seq + 1)
        return [blob for _, blob in self._store.scan(start, prefix_end(b"o" + owner), limit=limit)]

    def _load(self, raw_id: bytes) -> Entry:
        location = self._store.get(b"e" + raw_id)
        assert location is not None, f"indexed entry {uuid_str(raw_id)} is missing"
        return self._load_at(location)

    def _load_at(self, location: bytes) -> Entry:
        blob = self._store.get(b"o" + location)
        assert blob is not None, f"entry {uuid_str(location[:16])}/{U64.unpack(location[16:])[0]} is missing"
        return Entry.FromString(blob)

    # -- planning changes -------------------------------------------------------------------

    @property
    def resuming(self) -> bool:
        """Whether entries that can be delivered wait for the next plan (see `CASCADE_BUDGET`)."""
        return bool(self._resume)

    def begin(self) -> Plan:
        """A plan on top of the current state, which first delivers the waiting entries left
        deliverable by the last one (as many as its budget allows)."""
        plan = Plan(position=self._position, budget=self._cascade_budget)
        for raw in self._resume:
            self._cascade(plan, raw)
        return plan

    def plan_local(
        self, plan: Plan, new: Sequence[NewEntry], *, unless_blocked: bool = False
    ) -> AppendedEntries:
        """Add appending `new` to this node's own log, in order, to `plan`; returns the entries.
        `unless_blocked`: refuse (Unavailable) while an own entry waits for a dependency, as the new
        entries would wait behind it (see `own_blocked`)."""
        me = self.node_id_bytes
        seq, prev = plan.heads.get(me) or self._heads.get(me, (0, b""))
        if unless_blocked and self._held_back(plan, prev):
            blocked = self.own_blocked()
            raise Unavailable(
                blocked.describe()
                if blocked is not None
                else "this node's log is held up: an entry appended with it depends on an entry not here"
            )
        forked_at = self._forks.seq(self.node_id)
        if forked_at:
            raise Unavailable(
                f"this node's own log has forked at seq {forked_at}: a peer holds "
                "other entries of it than this node (its store was restored from an older copy "
                "after it wrote more, or another process runs with its id), and would never take "
                "new ones; appends resume only once its data directory is wiped and it rejoins its "
                "cluster as a new node"
            )
        if seq < self._own_floor:
            raise Unavailable(
                f"this node's own log ends at seq {seq} here, but a peer holds it up to "
                f"{self._own_floor} (its store is older than what it wrote): appends resume once "
                "replication has brought the rest back"
            )
        if not new:
            return AppendedEntries([], seq + 1, self.clock.last, [])
        # New entries without dependencies after a delivered one are delivered at once, in order: as
        # one stretch of this node's chain, stored and delivered a whole batch at a time, and not
        # parsed here (readers parse those they want from their bytes).
        run = not self._held_back(plan, prev) and not any(item.dependencies for item in new)
        first_seq = seq + 1
        stamp = self.clock.now_many(len(new))
        raws = new_uuids(len(new), stamp.wall_ms)
        ids = [uuid_str(raw) for raw in raws]
        blobs = wire.new_entries(
            self.node_id,
            first_seq,
            uuid_str(prev) if prev else "",
            ids,
            stamp,
            [item.data for item in new],
            [[uuid_str(d) for d in item.dependencies] if item.dependencies else () for item in new],
        )
        if run:
            plan.store_run(me, first_seq, raws, None, blobs)
        else:
            for seq, item, raw, blob in zip(itertools.count(first_seq), new, raws, blobs):
                self._take(plan, Entry.FromString(blob), raw, me, seq, prev, item.dependencies, blob)
                prev = raw
        plan.heads[me] = (first_seq + len(new) - 1, raws[-1])
        return AppendedEntries(ids, first_seq, stamp, blobs)

    def forks(self) -> dict[str, int]:
        """Each owner whose log has forked, as seen here (a peer holds other entries than this node
        from that seq on), with the seq; their entries past it are not taken."""
        return self._forks.seqs()

    def fork_of(self, owner: str) -> tuple[int, str]:
        """Where `owner`'s log forked, as seen here: the seq (0: it did not) and the id of the entry
        held here at the seq before it."""
        return self._forks.of(owner)

    def note_own_fork(self, seq: int, held_before: str, source: str = "") -> None:
        """A peer, `source`, found this node's own log forked at `seq`: it holds `held_before` at the seq before,
        where this node holds another entry. The entries this node appends from now on would never
        reach it, so appends are refused. A claim that does not hold (this node holds that very
        entry there, or has no entry there to compare) is logged and ignored."""
        if self._forks.seq(self.node_id):
            return
        head = self._heads.get(self.node_id_bytes, (0, b""))[0]
        mine = self._load_at(self.node_id_bytes + U64.pack(seq - 1)).id if 1 < seq <= head + 1 else ""
        self._forks.note_own(self.node_id, seq, held_before, mine, source)

    def plan_remote(
        self, plan: Plan, entries: Sequence[Entry], blobs: Sequence[bytes] | None = None, source: str = ""
    ) -> list[Entry]:
        """Add storing entries received from another node, `source` (named in log lines), to `plan`;
        returns those that are new. Each owner's entries are taken only in chain order: an entry
        already held, or one that would leave a gap, is skipped. `blobs`, if given, are the entries
        serialized (as received), which are then stored as they are."""
        if blobs is not None:
            taken = self._plan_run(plan, entries, blobs)
            if taken is not None:
                return taken
        out = []
        chains: dict[str, _Chain] = {}
        pairs = zip(entries, blobs, strict=True) if blobs is not None else ((e, None) for e in entries)
        try:
            for entry, blob in pairs:
                chain = chains.get(entry.owner) or chains.setdefault(
                    entry.owner, self._chain(plan, entry.owner)
                )
                seq = chain.seq + 1
                if entry.seq != seq:
                    continue
                text = entry.id
                raw = canonical_uuid(text)
                if raw in plan.blobs or raw in plan.delivered_set:
                    raise InvalidArgument(f"entry {text} comes twice in one write")
                if entry.prev != chain.text:
                    # The owner's log forked (a store rolled back, a copied data directory): keep
                    # the entries held, skip its others, and go on with the other owners' entries.
                    self._forks.note_sent(entry.owner, seq, entry, chain.text, source)
                    continue
                deps = (
                    tuple(canonical_uuid(d, "dependency") for d in entry.dependencies)
                    if entry.dependencies
                    else ()
                )
                if entry.next:
                    entry.next = ""
                    blob = None
                # The chain moves only past an entry taken: what `finally` sets as the head is stored.
                self._take(plan, entry, raw, chain.owner, seq, chain.raw, deps, blob)
                chain.seq, chain.raw, chain.text, chain.last = seq, raw, text, entry
                out.append(entry)
        finally:
            # A chain's stamps grow along it (an owner's clock never goes back, across restarts
            # too), so its newest entry carries the latest stamp of those taken.
            latest = self.clock.last
            for chain in chains.values():
                if chain.last is not None:
                    plan.heads[chain.owner] = (chain.seq, chain.raw)
                    when = chain.last.when
                    if (when.wall_ms, when.logical) > latest:
                        latest = Stamp(when.wall_ms, when.logical)
            self.clock.observe_remote(latest)
        return out

    def _plan_run(self, plan: Plan, entries: Sequence[Entry], blobs: Sequence[bytes]) -> list[Entry] | None:
        """`plan_remote` for the shape a peer sends (a stretch of one owner's chain, as stored, with
        no dependencies) after a delivered entry, a whole batch at a time: about twice as fast as
        entry by entry, which is what a catch-up spends most of its time on. Entries that wait for
        it are delivered after it. None, having planned nothing, if the batch has another shape,
        its chain is held back here, or anything in it is wrong (the entry-by-entry path then says
        what)."""
        count = len(entries)
        if not count or len(blobs) != count:
            return None
        owner_text = parsed_run_owner(entries)
        first_seq = entries[0].seq
        if owner_text is None or [e.seq for e in entries] != list(range(first_seq, first_seq + count)):
            return None
        chain = self._chain(plan, owner_text)
        if self._held_back(plan, chain.raw):
            return None
        skip = chain.seq + 1 - first_seq
        if skip < 0 or skip >= count:  # a gap before it, or all of it held already
            return []
        taken, blobs = list(entries[skip:]), blobs[skip:]
        ids = [e.id for e in taken]
        raws = parse_uuids(ids)
        joined = "".join(ids)
        if (
            raws is None
            or [e.prev for e in taken] != [chain.text, *ids[:-1]]
            or joined.lower() != joined
            or len(set(raws)) != len(raws)
        ):
            return None
        seq = chain.seq + 1
        plan.store_run(chain.owner, seq, raws, taken, blobs)
        plan.heads[chain.owner] = (seq + len(taken) - 1, raws[-1])
        if self._waiting or plan.waiting:
            for raw in raws:
                self._cascade(plan, raw)
        when = taken[-1].when  # the latest stamp of the chain's stretch (see plan_remote)
        self.clock.observe_remote(Stamp(when.wall_ms, when.logical))
        return taken

    def _take(
        self,
        plan: Plan,
        entry: Entry,
        raw: bytes,
        owner: bytes,
        seq: int,
        prev: bytes,
        deps: Sequence[bytes],
        blob: bytes | None = None,
    ) -> None:
        """Add storing one entry (seq `seq` of `owner`'s chain, after `prev`) to `plan`: delivered at
        once when it needs only its predecessor while nothing waits, else through the causal path."""
        if deps or self._undelivered or plan.undelivered:
            self._plan_store(plan, entry, raw, owner, seq, prev, deps, blob)
        else:
            plan.store_delivered(entry, raw, owner, seq, blob)

    def _chain(self, plan: Plan, owner_text: str) -> _Chain:
        owner = canonical_uuid(owner_text, "owner")
        seq, prev = plan.heads.get(owner) or self._heads.get(owner, (0, b""))
        return _Chain(owner, seq, prev, uuid_str(prev) if prev else "")

    def _plan_store(
        self,
        plan: Plan,
        entry: Entry,
        raw: bytes,
        owner: bytes,
        seq: int,
        prev: bytes,
        deps: Sequence[bytes],
        blob: bytes | None = None,
    ) -> None:
        writes = plan.writes
        location = owner + U64.pack(seq)
        if blob is None:
            blob = entry.SerializeToString()
        plan.blobs[raw] = blob
        writes.append((b"o" + location, blob))
        writes.append((b"e" + raw, location))
        plan.locations[raw] = location
        plan.heads[owner] = (seq, raw)
        plan.stored += 1
        plan.by_id[raw] = entry
        # The previous entry of a chain is always stored: it is delivered unless it is waiting. One
        # that waited before this plan may have been delivered earlier in it: `_undelivered` only
        # catches up when the plan is applied, so the plan's own deliveries are looked at first.
        missing = (
            [prev]
            if prev
            and prev not in plan.delivered_set
            and (prev in plan.undelivered or prev in self._undelivered)
            else []
        )
        if deps:
            missing += [d for d in deps if not self._is_delivered(plan, d)]
        if not missing:
            if self._undelivered or plan.undelivered:
                self._plan_deliver(plan, raw)
            else:
                self._deliver(plan, raw)  # nothing waits on anything: no waiters to look for
            return
        plan.undelivered.add(raw)
        writes.append((b"u" + raw, b""))
        for m in missing:
            writes.append((b"p" + m + raw, b""))
            plan.waiting.setdefault(m, []).append(raw)

    def _is_delivered(self, plan: Plan, raw: bytes) -> bool:
        if raw in plan.delivered_set:
            return True
        if raw in plan.undelivered or raw in self._undelivered:
            return False
        return self._store.get(b"e" + raw) is not None

    def _held_back(self, plan: Plan, raw: bytes) -> bool:
        """Whether `raw` (an id, or b"") is stored but not delivered, with `plan`'s changes."""
        return bool(raw) and (
            raw in plan.undelivered or (raw in self._undelivered and raw not in plan.delivered_set)
        )

    def _deliver(self, plan: Plan, raw: bytes, stored: tuple[bytes, bytes, Entry] | None = None) -> None:
        """Deliver the stored entry `raw` (`stored`: its location, serialized form and entry, when
        the caller has read them)."""
        entry = plan.by_id.get(raw)
        if entry is not None:
            location, blob = plan.locations[raw], plan.blobs[raw]
        else:  # stored by an earlier plan
            location, blob, entry = stored or self._read_stored(raw)
        plan.deliver(raw, location[:16], U64.unpack(location[16:])[0], entry, blob)
        if raw in plan.undelivered or raw in self._undelivered:
            # Also when the mark was written earlier in this same batch: the delete comes after it.
            plan.undelivered.discard(raw)
            plan.writes.append((b"u" + raw, None))

    def _read_stored(self, raw: bytes) -> tuple[bytes, bytes, Entry]:
        location = self._store.get(b"e" + raw)
        assert location is not None, "only stored entries are delivered"
        blob = self._store.get(b"o" + location)
        assert blob is not None, f"entry {uuid_str(raw)} is missing"
        return location, blob, Entry.FromString(blob)

    def _plan_deliver(self, plan: Plan, raw: bytes) -> None:
        """Deliver `raw`, then every waiter this makes deliverable (see `_cascade`)."""
        self._deliver(plan, raw)
        self._cascade(plan, raw)

    def _cascade(self, plan: Plan, raw: bytes) -> None:
        """Deliver every entry that the delivered `raw` makes deliverable, each in causal order: an
        entry gets its position only after everything it needs has one."""
        queue = [raw]
        while queue and (self._undelivered or plan.undelivered):
            current = queue.pop()
            for waiter in self._waiters(plan, current):
                if plan.budget <= 0:  # `current` again too: its waiters looked at are skipped then
                    plan.resume += queue
                    plan.resume.append(current)
                    return
                stored = self._deliverable(plan, waiter)
                if stored is not None:
                    self._deliver(plan, waiter, stored)
                    plan.budget -= 1
                    queue.append(waiter)

    def _waiters(self, plan: Plan, raw: bytes) -> list[bytes]:
        found = self._waiting.get(raw)
        added = plan.waiting.get(raw)
        if added:
            return sorted(found.union(added) if found else set(added))
        return sorted(found) if found else []

    def _deliverable(self, plan: Plan, waiter: bytes) -> tuple[bytes, bytes, Entry] | None:
        """What `_deliver` takes for the waiting entry `waiter` if all it needs is delivered, and its
        wait marks are then taken away; else None."""
        if waiter in plan.delivered_set or not (waiter in self._undelivered or waiter in plan.undelivered):
            return None
        entry = plan.by_id.get(waiter)
        if entry is not None:
            stored = (plan.locations[waiter], plan.blobs[waiter], entry)
        else:
            stored = self._read_stored(waiter)
            entry = stored[2]
        needs = [parse_uuid(d) for d in entry.dependencies]
        if entry.prev:
            needs.append(parse_uuid(entry.prev))
        if not all(self._is_delivered(plan, d) for d in needs):
            return None
        plan.writes.extend((b"p" + d + waiter, None) for d in needs)
        plan.unwaited.extend((d, waiter) for d in needs)
        return stored

    # -- applying ---------------------------------------------------------------------------

    @staticmethod
    def finish(plan: Plan) -> None:
        """Add the plan's last delivery run and its new heads (one write per owner) to its batch;
        call once, before writing."""
        if plan.run is not None:
            plan.writes.append(plan.run.record())
            plan.run = None
        plan.writes.extend((b"h" + owner, HEAD.pack(seq, raw)) for owner, (seq, raw) in plan.heads.items())

    def apply(self, plan: Plan) -> None:
        """Adopt a plan's state once its batch is written."""
        self._blocked = None
        self._heads.update(plan.heads)
        self._undelivered |= plan.undelivered
        self._undelivered.difference_update(plan.delivered)
        self._resume = plan.resume
        waiting = self._waiting
        for awaited, waiters in plan.waiting.items():
            waiting.setdefault(awaited, set()).update(waiters)
        for awaited, waiter in plan.unwaited:
            left = waiting.get(awaited)
            if left is not None:
                left.discard(waiter)
                if not left:
                    del waiting[awaited]
        self._position = plan.position
