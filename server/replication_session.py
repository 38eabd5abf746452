"""Replication streams: one bidirectional gRPC stream per peer pair, over which both nodes send each
other what the other lacks and then keep streaming new entries.

Both ends of a stream run the same `Session`: it sends a Hello (node id, URL, version vector, peers),
then a sender task streams, owner by owner and in chain order, the entries the peer's vector lacks,
reading them from the store (never from memory, so a slow peer costs nothing but its cursor), with
at most `window` entries unacknowledged; a receiver task stores incoming batches through the
Appender (each entry once, whichever path it came by) and acknowledges them with this node's whole
vector, which also tells the sender what the peer got from others.

A `Session` runs on a `SessionHost` (the `Replicator`, see `replicator.py`, which dials and accepts
the streams and keeps one per peer).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError

from potboiler.server import vectors
from potboiler.server.appender import Appender
from potboiler.server.arrivals import Arrivals
from potboiler.server.entry_batches import newest_of_each_owner, parse_entry_batch
from potboiler.server.errors import Conflict, InvalidArgument
from potboiler.server.feeders import Feeders
from potboiler.server.hlc import Stamp
from potboiler.server.ids import parse_uuid
from potboiler.server.log import Log, Promise
from potboiler.server.membership import Membership
from potboiler.v1 import replication_pb2
from potboiler.v1.entry_pb2 import Entry

#: Most entries in one EntryBatch message.
MAX_BATCH = 1000
#: Most bytes of entries in one EntryBatch message (well under the 64 MiB message limit).
MAX_BATCH_BYTES = 4 << 20
#: Most entries sent to a peer and not yet acknowledged.
WINDOW = 20_000
#: How long a peer must make no progress on another owner's log, and an entry of that log must have
#: been on this node, before this node forwards it.
FORWARD_DELAY = 0.1
#: A session told that its peer gets an owner's log from another stream (Ack.redundant_owners) waits
#: this many times FORWARD_DELAY before forwarding that log again: the stream that feeds the peer
#: forwards first, and this one only if that one stops or is that much slower (two forwarding paths
#: to one node, as across a ring, would otherwise both forward each entry written now and then).
ELSEWHERE_FACTOR = 3
#: This node's own entries a message waits for (up to the replicator's linger, 5 ms) once one has
#: gone out under steady load. At 1,000 appends/s a fixed 5 ms wait cost each entry 2.5 ms of lag on
#: average and 5 at worst, for 0.2 messages per entry per peer; waiting for 4 entries costs 1.5 and
#: 3, for 0.27 (the replication benchmark: lag p99 6-9 ms instead of 8-13). Waiting for 2 gave 0.5
#: messages per entry, whose cost on the receiving nodes, sharing two cores with the writer, made
#: the unary writer's p99 worse (21-22 ms).
LINGER_ENTRIES = 4
#: Least time between two messages to a peer under steady load (if the linger is longer): above
#: LINGER_ENTRIES per LINGER_GAP (2,000 appends/s), messages carry more entries instead of coming
#: more often, which each peer pays for in CPU per message. Three nodes, a StreamAppender writing
#: on one, alternated: 19,000-20,600 appends/s against 15,900-19,300 sending as soon as
#: LINGER_ENTRIES were ready; the lag at 1,000 appends/s stays as it was.
LINGER_GAP = 0.002
#: Least time between two announcements of this node's vector to a peer.
ANNOUNCE_INTERVAL = 0.05
#: Most time between two announcements (each carries a clock promise, see Log.promise).
PROMISE_INTERVAL = 1.0


def forwarded_live_age() -> float:
    """How long another owner's entry may have been on this node, still missing on a connected
    peer, with the peer LIVE: forwarded, it leaves after FORWARD_DELAY twice (held here, then no
    progress on the peer), or after ELSEWHERE_FACTOR times FORWARD_DELAY when another stream feeds
    the peer, and its Ack comes up to ANNOUNCE_INTERVAL later; the rest allows for a loaded
    machine. (This node's own entries go out at once: FORWARD_DELAY for them.) Also how long
    Arrivals remembers. A function, not a constant: tests change FORWARD_DELAY."""
    return 4 * FORWARD_DELAY + ANNOUNCE_INTERVAL


Message = replication_pb2.ReplicateRequest | replication_pb2.ReplicateResponse


class Transport(Protocol):
    """One end of a replication stream."""

    async def send(
        self, message: replication_pb2.ReplicateRequest | replication_pb2.ReplicateResponse
    ) -> None:
        """Send one message."""
        ...

    def receive(self) -> AsyncIterator[Message]:
        """The messages from the other end, until it closes."""
        ...


class ClientTransport:
    """The dialing end: a grpc.aio bidi call."""

    def __init__(self, call: Any) -> None:
        self._call = call

    async def send(self, message: Any) -> None:
        """Write one message on the call."""
        await self._call.write(message)

    async def receive(self) -> AsyncIterator[Message]:
        """The call's messages until the peer closes it; InvalidArgument for one not decoded."""
        while True:
            message = await self._call.read()
            if message is grpc.aio.EOF:
                return
            if message is None:  # grpc.aio's answer to a message it could not decode
                raise InvalidArgument("the peer sent a message that cannot be decoded")
            yield message


class ServerTransport:
    """The dialed end: the servicer's request iterator and context."""

    def __init__(self, requests: AsyncIterator[replication_pb2.ReplicateRequest], context: Any) -> None:
        self._requests = requests
        self._context = context

    async def send(self, message: Any) -> None:
        """Write one message with the servicer's context."""
        await self._context.write(message)

    async def receive(self) -> AsyncIterator[Message]:
        """The dialer's messages, until it closes the stream."""
        async for message in self._requests:
            yield message


@dataclass
class Counters:
    """Traffic with one peer, for status and metrics."""

    entries_out: int = 0
    entries_in: int = 0
    messages_out: int = 0
    messages_in: int = 0


def parse_entries(batch: replication_pb2.EntryBatch) -> list[Entry]:
    """The entries of an `EntryBatch`; InvalidArgument if one is not a serialized Entry."""
    try:
        return parse_entry_batch(batch.SerializeToString())
    except DecodeError as exc:
        raise InvalidArgument(f"an entry of the batch is not a serialized Entry: {exc}") from None


class SessionHost(Protocol):
    """What a `Session` needs of the node's replication (the `Replicator`)."""

    log: Log
    membership: Membership
    appender: Appender
    #: How long each owner's entries have been here.
    arrivals: Arrivals
    #: Which stream feeds this node each owner's log.
    feeders: Feeders
    #: How long a sender waits after a batch so that the next carries several entries (0: not at all).
    linger: float

    def counters_for(self, url: str) -> Counters: ...

    def learn_peers(self, urls: Iterable[str]) -> None: ...


@dataclass
class Session:
    """One replication stream with a peer, seen from this node.

    What is sent: the peer's own log only as far as its Hello showed it lacked (a node never needs
    its own entries back); this node's own entries at once; other owners' entries only when the peer
    has made no progress on that owner for FORWARD_DELAY and they have been on this node that long
    too (else a peer idle on an owner that writes now and then would get each entry twice), and then
    one batch at a time until the peer is seen taking that log from this node (its Ack reaches what
    was sent, not past it), then twice as many batches in flight with each Ack, up to the window,
    while it lags more than a batch behind, unless the peer says another stream feeds it that log
    (Ack.redundant_owners): then this session forwards that log again only once the peer has made
    no progress on it for ELSEWHERE_FACTOR times as long, or, when it is nearly caught up, still
    lacks entries that have been here that long (the other path is slower, a longer one, say),
    until the peer takes it from here. So when every node is connected to every other, each entry
    crosses each link about once, from its owner; two nodes forwarding a backlog to a third do not
    both feed it, nor do two paths to a node forward it the entries written now and then (after
    the first, which may come twice); and a line of nodes or a cut link still converges through
    forwarding. Each side announces its vector (Ack) whenever it changes, at most every
    ANNOUNCE_INTERVAL, which is how the other side knows what not to send.
    """

    host: SessionHost
    transport: Transport
    dialed: bool
    make_message: type[replication_pb2.ReplicateRequest] | type[replication_pb2.ReplicateResponse]
    peer_id: str = ""
    peer_url: str = ""
    #: The URL the peer's hello announced (peer_url becomes the member URL it is known by here).
    announced_url: str = ""
    acked: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    #: When the last message came from the peer (or the session began).
    heard_at: float = field(default_factory=time.monotonic)
    _peer_own_cap: int = 0
    #: When the peer last made progress on an owner's log (or the session began).
    _progress_at: dict[str, float] = field(default_factory=dict)
    #: Owners whose log the peer, lagging behind, is seen taking from this node, with how many
    #: batches of it may be in flight (doubling with each Ack that shows progress, as in TCP's slow
    #: start: a second forwarder feeding the same peer learns it is redundant before it has sent
    #: much).
    _feeding: dict[str, int] = field(default_factory=dict)
    #: Owners whose log the peer was last told (or seen) to get from another stream than this one:
    #: forwarded only after ELSEWHERE_FACTOR times FORWARD_DELAY.
    _elsewhere: set[str] = field(default_factory=set)
    #: Owners whose log the peer sent while another stream feeds it here (told in the next Ack).
    _redundant: set[str] = field(default_factory=set)
    #: Owners whose log the peer found forked, with the seq where (Ack.forked_logs): it takes none of
    #: their entries from there on, so none are sent.
    _forked: dict[str, int] = field(default_factory=dict)
    #: Passes of sending made: the other owners' logs take turns at going first (`_send_order`).
    _turn: int = 0
    _progress: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _writing: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, **kwargs: Any) -> None:
        """Send one protocol message (hello=, entries=, ack= or peers=); gRPC allows one write at a time."""
        await self._write(self.make_message(**kwargs))

    async def _write(self, message: Any) -> None:
        async with self._writing:
            await self.transport.send(message)
        self.host.counters_for(self.peer_url).messages_out += 1

    async def hello(self, join: bool = False) -> None:
        """Send this node's Hello."""
        host = self.host
        await self.send(
            hello=replication_pb2.Hello(
                node_id=host.log.node_id,
                url=host.membership.self_url,
                vector=vectors.to_proto(host.log.vector()),
                peers=host.membership.urls(),
                join=join,
            )
        )

    @property
    def source(self) -> str:
        """The peer, as log lines name it."""
        return f"peer {self.peer_id} ({self.peer_url})"

    def accept_hello(self, hello: replication_pb2.Hello) -> None:
        """Take in the peer's Hello: who it is and what it holds."""
        parse_uuid(hello.node_id, "node id")
        if hello.node_id == self.host.log.node_id:
            raise Conflict("a node cannot replicate with itself")
        self.peer_id = hello.node_id
        self.peer_url = self.announced_url = self.host.membership.normalise(hello.url)
        self.acked = vectors.from_proto(hello.vector)
        self.sent = dict(self.acked)
        node_log = self.host.log
        node_log.note_own_seq(self.acked.get(node_log.node_id, 0))
        self._peer_own_cap = node_log.vector().get(self.peer_id, 0)
        now = time.monotonic()
        self._progress_at = dict.fromkeys(node_log.vector(), now)

    async def run(self) -> None:
        """Stream both ways until either side closes; raises what ended it."""
        tasks = [
            asyncio.create_task(self._send_loop(), name=f"replicate to {self.peer_url}"),
            asyncio.create_task(self._receive_loop(), name=f"replicate from {self.peer_url}"),
            asyncio.create_task(self._announce_loop(), name=f"announce to {self.peer_url}"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if (exc := task.exception()) is not None:
                    raise exc
        finally:
            for task in tasks:
                task.cancel()
            # Their own ends (errors, cancellations) are reported above; a cancellation of this
            # task while it waits for them still ends it (gather raises it, suppress would not).
            await asyncio.gather(*tasks, return_exceptions=True)
            self.host.feeders.forget(self)
            self.closed.set()

    def wake(self) -> None:
        """This node's vector changed, or the peer's did: look again at what to send and announce."""
        self._progress.set()
        self._changed.set()

    async def _announce_loop(self) -> None:
        node_log = self.host.log
        self._changed.set()  # the vector in our Hello may be stale by now
        while True:
            with contextlib.suppress(TimeoutError):
                # Also when nothing changed: an idle node's clock promise must keep up with time.
                async with asyncio.timeout(PROMISE_INTERVAL):
                    await self._changed.wait()
            self._changed.clear()
            # Read together, with no await between: the promise's seq is the vector's own.
            promise = node_log.promise()
            ack = replication_pb2.Ack(vector=vectors.to_proto(node_log.vector()))
            ack.clock.wall_ms, ack.clock.logical = promise.stamp
            # Others' promises, passed on: a node not replicating with their owner hears them too.
            for owner, known in node_log.promises().items():
                if owner != node_log.node_id and owner != self.peer_id:
                    relayed = ack.promises.add(owner=owner, seq=known.seq)
                    relayed.clock.wall_ms, relayed.clock.logical = known.stamp
            ack.redundant_owners.extend(sorted(self._redundant))
            self._redundant.clear()
            ack.your_log_forked_at, ack.your_entry_before_fork = node_log.fork_of(self.peer_id)
            for owner, seq in sorted(node_log.forks().items()):
                ack.forked_logs.add(owner=owner, seq=seq)
            await self.send(ack=ack)
            await asyncio.sleep(ANNOUNCE_INTERVAL)  # coalesce: at most one announcement per interval

    async def _send_loop(self) -> None:
        host = self.host
        while True:
            self._progress.clear()
            sent_any, held_back = await self._send_available()
            if sent_any:
                if host.linger and sum(self._unacked().values()) < MAX_BATCH:
                    await self._linger(host.linger)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FORWARD_DELAY if held_back else None):
                    await self._progress.wait()

    async def _linger(self, seconds: float) -> None:
        """After a message, under steady load: wait up to `seconds` until LINGER_ENTRIES of this
        node's own entries are ready to go, so the next message carries several, and at least
        LINGER_GAP."""
        node_log = self.host.log
        me = node_log.node_id
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + seconds
        earliest = start + min(LINGER_GAP, seconds)
        while True:
            self._progress.clear()
            ready = node_log.own_seq() - max(self.sent.get(me, 0), self.acked.get(me, 0))
            now = loop.time()
            if (ready >= LINGER_ENTRIES and now >= earliest) or now >= deadline:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout((deadline if ready < LINGER_ENTRIES else earliest) - now):
                    await self._progress.wait()

    def _unacked(self) -> dict[str, int]:
        return {o: s - self.acked.get(o, 0) for o, s in self.sent.items() if s > self.acked.get(o, 0)}

    def send_limit(self, owner: str, seq: int, now: float) -> tuple[int, bool]:
        """How far to send `owner`'s log now, and whether more is held back for later (a fed peer
        that has nearly caught up stops being fed here)."""
        if owner in self._forked:  # the peer takes nothing of it past the fork: as if it ended there
            seq = min(seq, max(self._forked[owner] - 1, self.acked.get(owner, 0)))
        if owner == self.peer_id:
            if self.acked.get(owner, 0) >= seq:  # as ever: the peer holds all its own log held here
                return min(seq, self._peer_own_cap), False
            # The peer lacks entries of its own log that are here (it was restored from an older copy
            # of its store, and they came back by another path since its Hello): send those that
            # have been here for a while (the peer's Acks, every ANNOUNCE_INTERVAL, would otherwise
            # show it has them).
            cap = max(self._peer_own_cap, self.host.arrivals.held(owner, now, FORWARD_DELAY))
            return min(seq, cap), cap < seq
        if owner == self.host.log.node_id:
            return seq, False
        sent, acked = self.sent.get(owner, 0), self.acked.get(owner, 0)
        if owner in self._feeding:
            if acked + MAX_BATCH < seq:  # a backlog the peer is taking from this node
                limit = min(seq, acked + self._feeding[owner] * MAX_BATCH)
                return limit, limit < seq
            # Nearly caught up: new entries may well reach it from their owner, so hold them back.
            del self._feeding[owner]
        delay = FORWARD_DELAY
        if owner in self._elsewhere:
            delay *= ELSEWHERE_FACTOR
            if acked + MAX_BATCH >= seq:
                # Nearly caught up, and only by way of a slower path (a longer one, say) if the peer
                # still lacks entries that have been here that long: forward those.
                limit = min(seq, max(sent, self.host.arrivals.held(owner, now, delay)))
                return limit, limit < seq
        if now - self._progress_at.get(owner, 0.0) < delay:
            return sent, seq > sent
        # A probe: if the peer gets this log from elsewhere too, it receives one batch twice at most.
        settled = self.host.arrivals.held(owner, now, delay)
        limit = min(seq, max(sent, acked + MAX_BATCH), max(sent, settled))
        return limit, limit < seq

    async def _send_available(self) -> tuple[bool, bool]:
        """Send batches of what the peer lacks, within the window; returns (sent anything, held any back)."""
        host = self.host
        sent_any = held_back = False
        now = time.monotonic()
        vector = host.log.vector()
        for owner in self._send_order(vector):
            seq = vector[owner]
            limit, held = self.send_limit(owner, seq, now)
            held_back |= held
            while self.sent.get(owner, 0) < limit:
                room = WINDOW - sum(self._unacked().values())
                if room <= 0:
                    return sent_any, held_back
                after = max(self.sent.get(owner, 0), self.acked.get(owner, 0))
                if after >= limit:  # the peer acknowledged past it meanwhile (the log grew since)
                    break
                blobs = host.log.chain_bytes(parse_uuid(owner), after, min(MAX_BATCH, room, limit - after))
                parts: list[bytes] = []
                size = 0
                for blob in blobs:
                    size += len(blob)
                    if parts and size > MAX_BATCH_BYTES:
                        break
                    parts.append(blob)
                if not parts:
                    break
                # The stored bytes go out as they are: no parse, no serializing again.
                await self._write(self.make_message(entries=replication_pb2.EntryBatch(entries=parts)))
                # Never back: while this batch was written, an Ack may have shown the peer holds more.
                self.sent[owner] = max(self.sent.get(owner, 0), after + len(parts))
                host.counters_for(self.peer_url).entries_out += len(parts)
                sent_any = True
        return sent_any, held_back

    def _send_order(self, vector: dict[str, int]) -> list[str]:
        """The owners whose logs a pass sends, in the order it takes the window's room: this node's
        own first (its new entries go at once), then the others, from the next one each pass. In a
        fixed order, a forwarded log's backlog took every ack's room, and the logs after it, this
        node's own among them, waited until it was all sent."""
        own = self.host.log.node_id
        others = sorted(owner for owner in vector if owner != own)
        if others:
            turn = self._turn % len(others)
            self._turn += 1
            others = others[turn:] + others[:turn]
        return [own, *others] if own in vector else others

    def peer_has(self, owner: str, seq: int, now: float, elsewhere: bool = False) -> None:
        """Take in that the peer holds `owner`'s log up to `seq` (from an Ack, or entries it sent).
        `elsewhere`: the Ack says another stream feeds the peer that log (what this node forwarded,
        it held already), so stop feeding it and forward it only after a longer silence."""
        sent = self.sent.get(owner, 0)
        if elsewhere:
            self._feeding.pop(owner, None)
            self._elsewhere.add(owner)
            self._progress_at[owner] = now
        if seq > self.acked.get(owner, 0):
            self.acked[owner] = seq
            self._progress_at[owner] = now
            if seq > sent:  # beyond what this node sent: the peer has another source
                self._feeding.pop(owner, None)
            elif not elsewhere:  # the peer takes the log from this node
                self._elsewhere.discard(owner)
                self._feeding[owner] = min(2 * self._feeding.get(owner, 1), WINDOW // MAX_BATCH)
        if seq > sent:
            self.sent[owner] = seq

    def _peer_found_fork(self, owner: str, seq: int) -> None:
        """Take in that the peer found `owner`'s log forked at `seq`: what was sent of it past the
        fork will never be acknowledged, and no longer counts against the window. (Every Ack says
        so again, which also takes back a batch that was being written as the first one came.)"""
        if seq < 1:
            return
        self._forked[owner] = seq
        taken = max(seq - 1, self.acked.get(owner, 0))
        if self.sent.get(owner, 0) > taken:
            self.sent[owner] = taken

    async def _receive_loop(self) -> None:
        host = self.host
        async for message in self.transport.receive():
            counters = host.counters_for(self.peer_url)
            counters.messages_in += 1
            kind = message.WhichOneof("message")
            now = self.heard_at = time.monotonic()
            if kind == "entries":
                blobs = list(message.entries.entries)
                entries = parse_entries(message.entries)
                counters.entries_in += len(entries)
                # The peer holds what it sends.
                newest = {owner: e.seq for owner, e in newest_of_each_owner(entries).items()}
                for owner, seq in newest.items():
                    self.peer_has(owner, seq, now)
                new = await host.appender.ingest(entries, blobs, self.source)
                fresh = set(newest) if new and len(newest) == 1 else {e.owner for e in new}
                self._redundant |= host.feeders.brought(self, self.peer_id, newest, fresh, time.monotonic())
                self._changed.set()  # acknowledge, even when every entry was a duplicate
            elif kind == "ack":
                vector = vectors.from_proto(message.ack.vector)
                host.log.note_own_seq(vector.get(host.log.node_id, 0))
                if message.ack.your_log_forked_at:
                    ack = message.ack
                    host.log.note_own_fork(ack.your_log_forked_at, ack.your_entry_before_fork, self.source)
                for forked in message.ack.forked_logs:
                    parse_uuid(forked.owner, "forked owner")  # as the vector's owners
                    self._peer_found_fork(forked.owner, forked.seq)
                redundant = set(message.ack.redundant_owners)
                for owner in redundant:
                    parse_uuid(owner, "redundant owner")  # as the vector's owners: else the stream ends
                for owner in vector.keys() | redundant:
                    self.peer_has(owner, vector.get(owner, 0), now, elsewhere=owner in redundant)
                if message.ack.HasField("clock"):
                    clock = message.ack.clock
                    promise = Promise(Stamp(clock.wall_ms, clock.logical), vector.get(self.peer_id, 0))
                    host.log.note_promise(self.peer_id, promise)
                for relayed in message.ack.promises:
                    parse_uuid(relayed.owner, "promise owner")  # as the vector's owners
                    if relayed.owner != host.log.node_id:
                        stamp = Stamp(relayed.clock.wall_ms, relayed.clock.logical)
                        host.log.note_promise(relayed.owner, Promise(stamp, relayed.seq))
                self._progress.set()
            elif kind == "peers":
                host.learn_peers(message.peers.urls)
            else:
                raise InvalidArgument(f"unexpected {kind} message after the hello")
