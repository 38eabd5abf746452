"""Replication with a node's peers: `Replicator` keeps a `Peer` per member URL, and over each one
replication stream at a time (a `Session`, see `replication_session.py`).

`Replicator` dials each peer's direct gRPC port with capped exponential backoff and keepalive,
accepts the peer's inbound streams, and keeps one stream per pair (the one dialed by the node with
the lower id when both dial). It follows membership: peers learned from a Hello or a PeerList are
added (gossip), and a removed peer is refused until added again.

A node is known by the node id it answers with, not only by a URL: a member URL that turns out to name
this node itself, or a peer known under another URL, is dropped (an alias), and a stream accepted
from a known node id belongs to that node's Peer whatever URL it announces.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc

# FORWARD_DELAY is read as replication_session.FORWARD_DELAY when used: tests change it there.
from potboiler.server import replication_session, vectors
from potboiler.server.appender import Appender
from potboiler.server.arrivals import Arrivals
from potboiler.server.backoff import Backoff
from potboiler.server.errors import Conflict, InvalidArgument, NotFound, PotboilerError, Removed
from potboiler.server.feeders import Feeders
from potboiler.server.grpc_errors import status_of
from potboiler.server.ids import uuid_str
from potboiler.server.log_plan import Plan
from potboiler.server.membership import Membership
from potboiler.server.ports import GRPC_PORT_OFFSET
from potboiler.server.replication_session import (
    ClientTransport,
    Counters,
    ServerTransport,
    Session,
    forwarded_live_age,
)
from potboiler.server.urls import host_port, url_host
from potboiler.v1 import nodes_pb2, replication_pb2, replication_pb2_grpc

# Named as when replication was one module: the log format prints it, and peer_watch.py shares it.
log = logging.getLogger("potboiler.server.replication")

#: A peer that has sent nothing for this long (it sends a promise every PROMISE_INTERVAL) is SILENT.
SILENT_AFTER = 3 * replication_session.PROMISE_INTERVAL
#: Reconnection delays: 50 ms doubling to 5 s.
RECONNECT = Backoff(first=0.05, cap=5.0)
#: A stream that lasted this long worked: the next attempt after it ends starts the backoff afresh.
#: One that ends sooner (a peer refusing what it is sent, say) counts as another failure.
STABLE_SESSION_S = 10.0


class PeerState(enum.Enum):
    """How replication with one peer stands (see PeerStatus.State in nodes.proto)."""

    DISCONNECTED = nodes_pb2.PeerStatus.STATE_DISCONNECTED
    CATCHING_UP = nodes_pb2.PeerStatus.STATE_CATCHING_UP
    LIVE = nodes_pb2.PeerStatus.STATE_LIVE
    SILENT = nodes_pb2.PeerStatus.STATE_SILENT


def grpc_target(url: str) -> str:
    """host:port of the direct gRPC server of the node with root URL `url`."""
    host, port = host_port(url)
    return f"{url_host(host)}:{port + GRPC_PORT_OFFSET}"


@dataclass
class Peer:
    """Replication state with one member URL."""

    url: str
    node_id: str = ""
    sessions: list[Session] = field(default_factory=list)
    last_error: str = ""
    acked: dict[str, int] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: Whether a stream with it has been open since this node started.
    reached: bool = False
    #: When its last stream ended (time.monotonic), or this Peer was made.
    down_since: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class PeerView:
    """How replication with a peer stands at one moment (see `Replicator.views`)."""

    state: PeerState
    #: The peer's version vector as last acknowledged (or as kept from before, while it is away).
    acked: dict[str, int]
    #: Entries this node holds that the peer has not acknowledged.
    lag: int
    #: Entries the peer holds (as last acknowledged) that this node does not.
    behind: int
    #: Seconds since the last message on the open stream (0 when none is open).
    silent: float
    #: Seconds since the last stream ended (0 while one is open).
    down: float


def channel_options() -> list[tuple[str, int]]:
    """Options of the channels to peers: keepalive, big messages, no port sharing."""
    return [
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        # grpcio waits this long (default 60 s) for a ping's answer, whatever keepalive_timeout_ms says:
        # a half-open connection must be noticed in seconds.
        ("grpc.http2.ping_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


class Replicator:
    """All of a node's replication: a Peer per member, dialing and accepting streams."""

    def __init__(
        self,
        appender: Appender,
        membership: Membership,
        *,
        gossip: bool = True,
        backoff: Backoff = RECONNECT,
        linger: float = 0.005,
        channel: Callable[[str], grpc.aio.Channel] | None = None,
        metadata: Callable[[], tuple[tuple[str, str], ...]] = tuple,
    ) -> None:
        self.appender = appender
        #: Opens a channel to a peer's gRPC target (plaintext unless given, e.g. mTLS).
        self._channel = channel or (
            lambda target: grpc.aio.insecure_channel(target, options=channel_options())
        )
        #: Gives the metadata of each replication call dialed (e.g. a peer token, which may change).
        self._metadata = metadata
        self.log = appender.log
        self.membership = membership
        self.gossip = gossip
        self.backoff = backoff
        self.linger = linger
        self.peers: dict[str, Peer] = {}
        self.counters: dict[str, Counters] = {}
        #: How long each owner's entries have been here (what is settled enough to forward, what a
        #: LIVE peer must hold).
        self.arrivals = Arrivals(forwarded_live_age(), self.log.vector())
        #: Which stream feeds this node each owner's log (the others are told to stop forwarding it).
        self.feeders = Feeders(replication_session.FORWARD_DELAY)
        self._running = False
        #: Peers being dropped after a removal (see _on_membership).
        self._dropping: set[asyncio.Task[None]] = set()
        #: Peer lists being sent (see _broadcast_peers).
        self._broadcasts: set[asyncio.Task[None]] = set()
        appender.on_commit(self._on_commit)
        membership.on_change(self._on_membership)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start dialing every member."""
        self._running = True
        for url in self.membership.urls():
            self._add_peer(url)

    def stop_dialing(self) -> None:
        """Open no more streams (the node is stopping): the open ones run on until `stop`. Else a
        stream the peer dialed, ended as this node's server stops, is dialed again, and the peer
        holds a live stream from a node that has gone until `stop` cuts it."""
        self._running = False
        for peer in self.peers.values():
            peer.wake.set()  # out of the wait between attempts

    async def stop(self) -> None:
        """Close every stream and stop dialing (and wait for peers being dropped already)."""
        self.stop_dialing()
        for url in list(self.peers):
            if (peer := self._forget_peer(url)) is not None:
                await self._drop_peer(peer)
        await asyncio.gather(*self._dropping)
        for task in self._broadcasts:
            task.cancel()
        await asyncio.gather(*self._broadcasts, return_exceptions=True)

    def counters_for(self, url: str) -> Counters:
        """Traffic counters of one peer URL: kept (and shown in metrics) while it is a peer, so that
        a URL dropped as an alias, or a stream's before its hello, leaves no series behind."""
        if url not in self.peers:
            return Counters()
        return self.counters.setdefault(url, Counters())

    # -- membership ---------------------------------------------------------------------

    def _on_membership(self, url: str, added: bool) -> None:
        if not self._running:
            return
        if added:
            self._add_peer(url)
        elif (peer := self._forget_peer(url)) is not None:
            # Forgotten at once, so that an add right after it starts a new Peer. The drop task is
            # kept, so that it is not collected while it runs and stop() can wait for it.
            dropping = asyncio.get_running_loop().create_task(self._drop_peer(peer))
            self._dropping.add(dropping)
            dropping.add_done_callback(self._dropping.discard)
        self._broadcast_peers()

    def learn_peers(self, urls: Iterable[str]) -> None:
        """Gossip: add the peers another node told of (unless removed here, or gossip is off)."""
        if not self.gossip:
            return
        for url in urls:
            with contextlib.suppress(PotboilerError):
                self.membership.learn(url)

    def _broadcast_peers(self) -> None:
        urls = self.membership.urls()
        for peer in self.peers.values():
            for session in peer.sessions:
                task = asyncio.get_running_loop().create_task(self._send_quietly(session, urls))
                self._broadcasts.add(task)
                task.add_done_callback(self._broadcasts.discard)

    @staticmethod
    async def _send_quietly(session: Session, urls: list[str]) -> None:
        """Send a peer list on a stream, which may be ending: its own loops see that and report it
        (a failed write raises whatever grpc's layers do, not only RpcError)."""
        try:
            await session.send(peers=replication_pb2.PeerList(urls=urls))
        except Exception as exc:
            log.debug("peer list not sent to %s: %r", session.peer_url, exc)

    def _add_peer(self, url: str) -> None:
        if (known := self.peers.get(url)) is not None:
            known.wake.set()  # added again: end its wait between attempts
            if any(not s.closed.is_set() for s in known.sessions):
                # Replicating with it now, so it holds this node as a peer: nothing to ask it.
                # (Left joining, the next stream would undo a removal of this node made there later.)
                self.membership.joined(url)
            return
        peer = Peer(url, acked=self.membership.acked_of(url))
        self.peers[url] = peer
        peer.task = asyncio.get_running_loop().create_task(self._dial_loop(peer), name=f"dial {url}")
        peer.task.add_done_callback(_log_failure)

    def _forget_peer(self, url: str) -> Peer | None:
        """Take a peer out of the table (its traffic counters with it); `_drop_peer` ends it."""
        self.counters.pop(url, None)
        return self.peers.pop(url, None)

    async def _drop_peer(self, peer: Peer) -> None:
        """End a forgotten peer's dial loop and streams."""
        if peer.task is not None:
            peer.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):  # (an error is logged)
                await peer.task
        for session in list(peer.sessions):
            session.closed.set()
        log.info("stopped replicating with %s", peer.url)

    # -- the streams --------------------------------------------------------------------

    def _on_commit(self, plan: Plan) -> None:
        if not plan.stored:
            return
        now = time.monotonic()
        for owner, (seq, _) in plan.heads.items():
            self.arrivals.grew(uuid_str(owner), seq, now)
        for peer in self.peers.values():
            for session in peer.sessions:
                session.wake()

    async def _dial_loop(self, peer: Peer) -> None:
        target = grpc_target(peer.url)
        failures = 0
        while self._running:
            try:
                channel = self._channel(target)
            except Exception as exc:  # e.g. its TLS files unreadable halfway through a rotation
                peer.last_error = f"no channel could be opened: {_describe(exc)}"
                failures += 1
                await self._pause(peer, failures)
                continue
            async with channel:
                await self._dial_streams(peer, channel)
            return

    async def _pause(self, peer: Peer, failures: int) -> None:
        """Wait before the next attempt to reach `peer` (its `failures`-th in a row failed), or until
        it is added again; say so now and then."""
        delay = self.backoff.delay(failures)
        if failures in (1, 5) or failures % 50 == 0:
            # A peer not reached yet may just not have started: a warning once it was up.
            log.log(
                logging.WARNING if peer.reached else logging.INFO,
                "replication with %s: %s; retrying in %.2fs",
                peer.url,
                peer.last_error,
                delay,
            )
        peer.wake.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await peer.wake.wait()

    async def _dial_streams(self, peer: Peer, channel: grpc.aio.Channel) -> None:
        """Dial `peer` over `channel` until this node stops or the peer is dropped."""
        failures = 0
        stub = replication_pb2_grpc.ReplicationServiceStub(channel)
        while self._running:
            # While the peer's own stream to us is the one kept, do not dial.
            if peer.sessions and not any(s.dialed for s in peer.sessions):
                since = time.monotonic()
                await asyncio.wait([asyncio.ensure_future(s.closed.wait()) for s in peer.sessions])
                if time.monotonic() - since >= STABLE_SESSION_S:
                    failures = 0  # connected meanwhile: a failure from now on is a new outage's first
                continue
            call = stub.Replicate(metadata=self._metadata() or None)
            session = Session(
                self, ClientTransport(call), dialed=True, make_message=replication_pb2.ReplicateRequest
            )
            session.peer_url = peer.url
            joining = self.membership.is_joining(peer.url)
            connected_at: float | None = None
            try:
                await session.hello(join=joining)
                first = await call.read()
                if not isinstance(first, replication_pb2.ReplicateResponse) or not first.HasField("hello"):
                    raise InvalidArgument("the peer did not start with a hello")
                if first.hello.node_id == self.log.node_id:
                    self._drop_alias(peer, "this node itself")
                    return
                session.accept_hello(first.hello)
                session.peer_url = peer.url
                if (why := self._alias_of(peer.url, session.peer_id)) is not None:
                    self._drop_alias(peer, why)
                    return
                if not self._register(peer, session):
                    continue
                self.membership.identify(peer.url, session.peer_id)
                self.learn_peers(first.hello.peers)
                connected_at = time.monotonic()
                self.membership.joined(peer.url)
                log.info("connected to %s (node %s)", peer.url, peer.node_id)
                await self._run_session(peer, session)
                peer.last_error = "the peer closed the stream"
            except grpc.aio.AioRpcError as exc:
                peer.last_error = _describe(exc)
                if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                    if self.membership.is_joining(peer.url) and not joining:
                        continue  # an operator added it since this hello: ask to join now
                    log.warning("%s removed this node from its peers; removing it here too", peer.url)
                    with contextlib.suppress(NotFound):  # (removed meanwhile, by an operator say)
                        self.membership.remove(peer.url)
                    return
            except (
                grpc.RpcError,
                grpc.aio.UsageError,
                asyncio.InvalidStateError,  # grpc.aio writing on a call a reset already ended
                PotboilerError,
                OSError,
                ValueError,
            ) as exc:
                peer.last_error = _describe(exc)
                log.debug("stream to %s ended: %s", peer.url, peer.last_error)
            except Exception as exc:  # e.g. this node's store failed: keep dialing, after a pause
                peer.last_error = _describe(exc)
                log.exception("stream to %s failed", peer.url)
            finally:
                call.cancel()
                self._unregister(peer, session)
            if not self._running:
                return  # the node stops: no new attempt
            if peer.sessions:
                # The peer's own stream replaced this one (both dialed) and is live: no failure.
                peer.last_error = ""
                continue
            if connected_at is not None and time.monotonic() - connected_at >= STABLE_SESSION_S:
                failures = 0  # (a stream that ends soon after its hello is a failure like any)
            failures += 1
            await self._pause(peer, failures)

    async def serve(self, requests: AsyncIterator[replication_pb2.ReplicateRequest], context: Any) -> None:
        """Run the dialed end of a stream (called by the servicer)."""
        iterator = aiter(requests)
        session = Session(
            self,
            ServerTransport(iterator, context),
            dialed=False,
            make_message=replication_pb2.ReplicateResponse,
        )
        first = await anext(iterator, None)
        if first is None:
            return
        if first.WhichOneof("message") != "hello":
            raise InvalidArgument("the first message of a replication stream must be a hello")
        if first.hello.node_id == self.log.node_id:
            # This node dialed itself under a URL it does not know as its own: its dialing end
            # learns so from this hello, and drops that URL.
            await session.hello()
            return
        session.accept_hello(first.hello)
        peer = self._accepted_peer(session, join=first.hello.join)
        session.peer_url = peer.url
        self.membership.joined(peer.url)
        await session.hello()
        if not self._register(peer, session):
            return
        self.learn_peers(first.hello.peers)
        log.info("accepted stream from %s (node %s)", peer.url, peer.node_id)
        ended = "the stream ended"
        try:
            await self._run_session(peer, session)
            # A dialer never closes its side (it cancels its call): grpc ends the requests so when
            # the connection goes (the peer's process died, or stopped answering its pings).
            ended = "the connection ended (the peer's process or its network went away)"
        except asyncio.CancelledError:
            ended = "the stream was cut (the peer went away, or this node stops)"
            raise
        except Exception as exc:
            ended = _describe(exc)
            raise
        finally:
            self._unregister(peer, session)
            if self._running and not peer.sessions and self.peers.get(peer.url) is peer:
                peer.last_error = ended
                log.info("stream from %s ended: %s", peer.url, ended)

    def _accepted_peer(self, session: Session, *, join: bool) -> Peer:
        """The Peer of an accepted stream: the member that answered as the dialer's node id, whatever
        URL the dialer announces; else the announced URL's (learned now, unless removed here and the
        dialer does not ask to join). Removed if refused, Conflict if it is no peer."""
        node_id, url = session.peer_id, session.peer_url
        if (known := self.membership.url_of(node_id)) is not None:
            twin = self.peers.get(known)
            sessions = twin.sessions if twin is not None else []
            first = next((s for s in sessions if not s.closed.is_set()), None)
            if first is not None and first.announced_url != url:
                # A live stream with the node (either way dialed) where it announced another URL: not
                # the node reconnecting (it announces the URL it did) but another process with the
                # same id, which would take turns with the first for the peer's one slot.
                why = (
                    f"node {node_id} is connected here as {first.announced_url} and dials again as "
                    f"{url}: two nodes share one id (a copied data directory?)"
                )
                log.warning("refused a stream: %s", why)
                raise Conflict(why)
            url = known
        else:
            if self.membership.is_removed(url) or self.membership.is_removed_node(node_id):
                if not join:
                    raise Removed(f"{url} (node {node_id}) was removed from this node's peers")
                log.info("%s joins again after its removal", url)
                self.membership.add(url, join=False)
            self.membership.learn(url, dialed_in=True)
        peer = self.peers.get(url)
        if peer is None and url == self.membership.self_url:
            raise Conflict(
                f"node {node_id} announces {url}, this node's own URL: nodes on several machines that "
                "serve on a wildcard --host (0.0.0.0) need --advertise-url naming each one's address"
            )
        if peer is None:
            raise Conflict(f"{url} is not a peer of this node")
        self.membership.identify(url, node_id)
        return peer

    def _alias_of(self, url: str, node_id: str) -> str | None:
        """Why member `url`, which answered as `node_id`, is not a peer of its own: the node is a
        member under another URL, or was removed here (and `url` was not added by an operator)."""
        known = self.membership.url_of(node_id)
        if known is not None and known != url:
            return f"node {node_id}, a peer here as {known}"
        if known is None and self.membership.is_removed_node(node_id) and not self.membership.is_joining(url):
            return f"node {node_id}, which was removed here"
        return None

    def _drop_alias(self, peer: Peer, what: str) -> None:
        # Dropped once, and marked removed: gossip does not bring it back, so this is logged once.
        log.warning("%s is %s: dropping that URL from this node's peers", peer.url, what)
        self.membership.drop_alias(peer.url)

    def _register(self, peer: Peer, session: Session) -> bool:
        """Add a session to its peer, keeping one per pair; False if this one is dropped."""
        if self.peers.get(peer.url) is not peer:
            return False  # the peer was removed (DELETE /nodes) while the hellos were exchanged
        peer.node_id = session.peer_id
        keep_dialed = self.log.node_id < session.peer_id
        for other in list(peer.sessions):
            if other.dialed != session.dialed and session.dialed != keep_dialed:
                # Both nodes dialed: the stream dialed by the node with the lower id is kept.
                return False
            other.closed.set()  # the replaced stream (or a stale one of the same direction)
            peer.sessions.remove(other)
        peer.sessions.append(session)
        peer.reached = True
        return True

    def _unregister(self, peer: Peer, session: Session) -> None:
        # Over: wakes a dial loop that held back while this stream (dialed by the peer) was kept.
        session.closed.set()
        if session in peer.sessions:
            peer.sessions.remove(session)
            peer.acked = dict(session.acked)
            if not peer.sessions:  # for its status while it is away, also after a restart here
                peer.down_since = time.monotonic()
                try:
                    self.keep_acked(peer.url, peer.acked)
                except Exception:  # only its status while away is at stake: not the dial loop
                    log.exception("could not keep the vector %s acknowledged", peer.url)

    async def _run_session(self, peer: Peer, session: Session) -> None:
        peer.last_error = ""
        runner = asyncio.ensure_future(session.run())
        closer = asyncio.ensure_future(session.closed.wait())
        try:
            done, _ = await asyncio.wait({runner, closer}, return_when=asyncio.FIRST_COMPLETED)
            if runner in done:
                runner.result()
        finally:
            runner.cancel()
            closer.cancel()
            # A cancellation of the dial loop (the peer's removal) that arrives while the session
            # winds down must still end it: suppressing it here left the loop waiting for good.
            try:
                await asyncio.gather(runner, closer, return_exceptions=True)
            finally:
                peer.acked = dict(session.acked)

    # -- status -------------------------------------------------------------------------

    def in_cluster(self, node_id: str) -> bool:
        """Whether `node_id` is this node, a peer it has talked to, or the owner of entries it holds."""
        return (
            node_id == self.log.node_id
            or any(peer.node_id == node_id for peer in self.peers.values())
            or node_id in self.log.vector()
        )

    def keep_acked(self, url: str, vector: dict[str, int]) -> None:
        """Keep `vector` as what peer `url` acknowledged last (its status while it is away, also
        after a restart of this node)."""
        self.membership.note_acked(url, vector)

    def views(self) -> list[tuple[Peer, PeerView]]:
        """Every peer with how replication with it stands, by URL. A connected peer is SILENT when
        nothing came from it for SILENT_AFTER, else LIVE when it holds every entry of this node's own
        that has been here for FORWARD_DELAY, and every other entry that has been here for
        `forwarded_live_age()` (what is newer may be on its way), else CATCHING_UP."""
        mine = self.log.vector()
        now = time.monotonic()
        me = self.log.node_id
        ages = {
            owner: replication_session.FORWARD_DELAY if owner == me else forwarded_live_age()
            for owner in mine
        }
        out = []
        for url in sorted(self.peers):
            peer = self.peers[url]
            session = peer.sessions[0] if peer.sessions else None
            acked = session.acked if session else peer.acked
            silent = 0.0 if session is None else now - session.heard_at
            if session is None:
                state = PeerState.DISCONNECTED
            elif silent > SILENT_AFTER:
                state = PeerState.SILENT
            elif all(acked.get(owner, 0) >= self.arrivals.held(owner, now, ages[owner]) for owner in mine):
                state = PeerState.LIVE
            else:
                state = PeerState.CATCHING_UP
            view = PeerView(
                state=state,
                acked=dict(acked),
                lag=vectors.lag(mine, acked),
                behind=vectors.lag(acked, mine),
                silent=silent,
                down=0.0 if session is not None else now - peer.down_since,
            )
            out.append((peer, view))
        return out

    def status(self) -> list[nodes_pb2.PeerStatus]:
        """Per peer: state, acknowledged vector, lag both ways and last error (see `views`)."""
        return [
            nodes_pb2.PeerStatus(
                url=peer.url,
                # As last seen, also before this start's first stream with it.
                node_id=peer.node_id or self.membership.node_id_of(peer.url),
                state=view.state.value,
                vector=vectors.to_proto(view.acked),
                lag=view.lag,
                last_error=peer.last_error,
                silent_ms=round(view.silent * 1000),
                behind=view.behind,
                down_ms=round(view.down * 1000),
            )
            for peer, view in self.views()
        ]


def _log_failure(task: asyncio.Task[None]) -> None:
    """Log the error that ended a dial loop (a bug: it retries whatever the peer does), as nobody
    awaits the task until the peer is dropped."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("%s stopped with an error", task.get_name(), exc_info=exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, PotboilerError):
        return f"{status_of(exc).name}: {exc}"
    return f"{type(exc).__name__}: {exc}"
