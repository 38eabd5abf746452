"""One Potboiler node: the log and its services on a gRPC server, with its Envoy gateway."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from potboiler.server.appender import Appender
from potboiler.server.config_files import FileVersion, SecurityConfigError, file_version
from potboiler.server.decoding import GuardedServer
from potboiler.server.errors import InvalidArgument
from potboiler.server.gateway import Gateway
from potboiler.server.gc_pacing import GC_THRESHOLDS, CallPacer, CollectorPauses
from potboiler.server.hlc import HybridClock
from potboiler.server.log import Log
from potboiler.server.log_servicer import LogServicer
from potboiler.server.logclient import LocalLogClient
from potboiler.server.membership import Membership
from potboiler.server.metrics import MetricsServer
from potboiler.server.nodes_servicer import NodesServicer
from potboiler.server.peer_watch import PeerWatch
from potboiler.server.plugin import NodeContext, NodeService
from potboiler.server.ports import Ports
from potboiler.server.replication_servicer import ReplicationServicer
from potboiler.server.replicator import Replicator, channel_options
from potboiler.server.rest_bridge import RestBridge
from potboiler.server.rest_servicer import CoreRestServicer
from potboiler.server.security import SecurityConfig
from potboiler.server.services import ServiceFactory, default_services
from potboiler.server.storage import RocksStore
from potboiler.server.urls import node_url, url_host
from potboiler.server.webhooks import Webhooks
from potboiler.server.webhooks_servicer import WebhooksServicer
from potboiler.v1 import (
    core_rest_pb2_grpc,
    log_pb2,
    log_pb2_grpc,
    nodes_pb2_grpc,
    replication_pb2_grpc,
    webhooks_pb2_grpc,
)

log = logging.getLogger(__name__)

#: Largest gRPC message a node accepts (a batch of entries, a replication batch).
MAX_MESSAGE_BYTES = 64 << 20


def server_options() -> list[tuple[str, int]]:
    """gRPC server options: no silent port sharing, big messages, keepalive."""
    return [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.ping_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.http2.max_pings_without_data", 0),
        # Envoy forwards a REST request's whole path (query included) as metadata, twice.
        ("grpc.max_metadata_size", 256 * 1024),
    ]


@dataclass
class NodeConfig:
    """How to run a node."""

    data_dir: Path = Path("data")
    host: str = "127.0.0.1"
    base_port: int = 8000
    peers: list[str] = field(default_factory=list)
    #: The root URL peers reach this node at, if not http://host:B: where --host is a wildcard
    #: address (0.0.0.0, ::) and nodes on several machines share a base port, each names its own.
    advertise_url: str = ""
    #: Sync every write batch to disk (survives power loss), not just to the WAL.
    fsync: bool = False
    #: Start Envoy (the REST ports); off in in-process tests that speak gRPC only.
    gateway: bool = True
    #: Port of the gRPC server; base_port + 10 unless set (0 lets the OS choose).
    grpc_port: int | None = None
    services: list[tuple[str, ServiceFactory]] = field(default_factory=default_services)
    clock: HybridClock | None = None
    #: Learn peers from other nodes' peer lists (off: membership is only what operators add).
    gossip: bool = True
    #: Serve Prometheus metrics on base_port + 5.
    metrics: bool = True
    #: mTLS between nodes, client tokens, HTTPS for REST, the webhook policy (all off by default).
    security: SecurityConfig = field(default_factory=SecurityConfig)

    @property
    def ports(self) -> Ports:
        """The node's ports from its base port."""
        return Ports(self.base_port)

    @property
    def url(self) -> str:
        """The node's root URL, its name among peers."""
        return self.advertise_url or f"http://{url_host(self.host)}:{self.base_port}"

    def check(self) -> None:
        """InvalidArgument if --host is not an IP address (Envoy binds and connects to addresses,
        not names), a port of the node is out of range, the node's URL or a peer's is not a node
        root URL, or a peer is this node."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise InvalidArgument(
                f"bad --host: {self.host!r} is not an IP address (e.g. 127.0.0.1, 0.0.0.0 or ::1)"
            ) from None
        self.ports.check()
        try:
            own = node_url(self.url)
        except InvalidArgument as exc:
            raise InvalidArgument(
                f"bad {'--advertise-url' if self.advertise_url else '--host'}: {exc}"
            ) from None
        for peer in self.peers:
            try:
                url = node_url(peer)
            except InvalidArgument as exc:
                raise InvalidArgument(f"bad --peer: {exc}") from None
            if url == own:
                raise InvalidArgument(f"bad --peer: {peer} is this node itself")


#: How often a node looks whether its tokens file (--auth-tokens) or its peer token file changed.
TOKENS_POLL_S = 1.0


class Node:
    """A running node. `start()` opens the store and serves; `stop()` undoes it all."""

    def __init__(self, config: NodeConfig) -> None:
        config.check()
        self.config = config
        self.store = RocksStore(config.data_dir / "log")
        self.log = Log(self.store, config.clock)
        self.appender = Appender(self.log, self.store, sync=config.fsync)
        self.membership = Membership(self.store, config.url)
        security = config.security
        self.webhooks = Webhooks(self.store, self.appender, policy=security.webhook_policy, sync=config.fsync)
        self.replicator = Replicator(
            self.appender,
            self.membership,
            gossip=config.gossip,
            channel=lambda target: security.peer_channel(target, channel_options()),
            metadata=security.peer_metadata,
        )
        self.peer_watch = PeerWatch(self.replicator)
        #: The services by name (KV, Pigtail), in the order they start.
        self.services: dict[str, NodeService] = {}
        self.server: grpc.aio.Server | None = None
        self.gateway: Gateway | None = None
        #: Envoy's way in for REST calls (set when the gateway runs).
        self.rest_bridge: RestBridge | None = None
        self.grpc_port = 0
        self.metrics: MetricsServer | None = None
        self._health = health.aio.HealthServicer()
        #: Watch the tokens file and the peer token file for changes.
        self._watches: list[asyncio.Task[None]] = []
        #: Checks every call when tokens or mTLS are on (and ends streams whose token is revoked).
        self._auth = config.security.auth_interceptor()
        #: The garbage collector's passes, for the metrics.
        self.gc_pauses = CollectorPauses()

    async def start(self) -> None:
        """Serve gRPC, start the services and the gateway."""
        config = self.config
        for warning in config.security.warnings():
            log.warning("%s", warning)
        gc.set_threshold(*GC_THRESHOLDS)
        self.gc_pauses.start()
        self.appender.start()
        server = grpc.aio.server(
            options=server_options(), interceptors=[self._auth] if self._auth is not None else []
        )
        server.add_generic_rpc_handlers([CallPacer()])  # first: grpc asks it about every call
        # Our services answer requests that are not valid protobuf with INVALID_ARGUMENT.
        ours = GuardedServer(server)
        log_pb2_grpc.add_LogServiceServicer_to_server(LogServicer(self.appender), ours)
        core_rest_pb2_grpc.add_CoreRestServiceServicer_to_server(
            CoreRestServicer(self.appender, self.membership, self.replicator.in_cluster), ours
        )
        nodes_pb2_grpc.add_NodesServiceServicer_to_server(
            NodesServicer(self.log, self.membership, self.replicator.status), ours
        )
        replication_pb2_grpc.add_ReplicationServiceServicer_to_server(
            ReplicationServicer(self.replicator), ours
        )
        webhooks_pb2_grpc.add_WebhooksServiceServicer_to_server(WebhooksServicer(self.webhooks), ours)
        names = [
            log_pb2.DESCRIPTOR.services_by_name["LogService"].full_name,
            "potboiler.v1.CoreRestService",
            "potboiler.v1.NodesService",
            "potboiler.v1.WebhooksService",
            "potboiler.v1.ReplicationService",
        ]
        context = NodeContext(
            log=LocalLogClient(self.appender),
            data_dir=config.data_dir,
            clock=self.log.clock,
        )
        for name, factory in config.services:
            service = factory(NodeContext(context.log, config.data_dir / name, context.clock))
            names += service.register(ours)
            self.services[name] = service
        health_pb2_grpc.add_HealthServicer_to_server(self._health, ours)
        names.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], ours)
        port = config.ports.grpc if config.grpc_port is None else config.grpc_port
        try:
            address = f"{url_host(config.host)}:{port}"
            tls = config.security.tls
            if tls is None:
                self.grpc_port = server.add_insecure_port(address)
            else:
                self.grpc_port = server.add_secure_port(address, tls.server_credentials())
        except RuntimeError:
            raise OSError(
                f"cannot listen on {address} (gRPC): the port is in use, or the address is not one of "
                "this machine's"
            ) from None
        await server.start()
        self.server = server
        for service in self.services.values():
            await service.start()
        self.webhooks.start()
        self.replicator.start()
        self.peer_watch.start()
        tokens = config.security.tokens
        if tokens is not None and tokens.path is not None:
            self._watch(tokens.path, tokens.version, self.reload_tokens)
        peer_token = config.security.peer_token
        if peer_token is not None and peer_token.path is not None:
            self._watch(peer_token.path, peer_token.version, self.reload_peer_token)
        for peer in config.peers:
            self._seed(peer)
        for name in names:
            await self._set_health(name, serving=True)
        await self._set_health("", serving=True)
        if config.metrics:
            self.metrics = MetricsServer(self, config.host, config.ports.metrics)
        if config.gateway:
            self.rest_bridge = RestBridge(ours.method_handler, self._auth, max_body=MAX_MESSAGE_BYTES)
            self.gateway = Gateway(
                config.host,
                config.ports,
                config.host,
                config.data_dir / "gateway",
                tls=config.security.tls,
                rest_tls=config.security.rest_tls,
                serve_rest=self.rest_bridge.listen,
            )
            await self.gateway.start()
        log.info("node %s serving %s (gRPC on port %d)", self.log.node_id, config.url, self.grpc_port)

    def _watch(self, path: Path, read: FileVersion | None, reload: Callable[[], Awaitable[None]]) -> None:
        """Call `reload` within TOKENS_POLL_S of each change of the file at `path` from the version
        `read` on (the one in use, taken when it was read: a change while the node starts counts)."""
        seen = read

        async def watch() -> None:
            nonlocal seen
            while True:
                await asyncio.sleep(TOKENS_POLL_S)
                if (version := file_version(path)) != seen:
                    seen = version
                    try:
                        await reload()
                    except Exception:  # a bug in a reload must not stop the node watching its files
                        log.exception("reloading %s failed", path)

        self._watches.append(asyncio.create_task(watch(), name=f"watching {path}"))

    async def reload_tokens(self) -> None:
        """Read the tokens file (--auth-tokens) again and check calls against its tokens from now on
        (done within TOKENS_POLL_S of each change of the file): tokens can be added, revoked and
        changed without a restart. Streaming calls running on a token that no longer allows them
        are ended. A file that cannot be read or is not valid leaves the tokens in use as they
        were, and says why in the log."""
        tokens = self.config.security.tokens
        assert tokens is not None and tokens.path is not None  # watched only when read from a file
        if not self._reloaded("tokens", tokens.reload):
            return
        if len(tokens):
            log.info("reloaded the tokens file %s: %d tokens", tokens.path, len(tokens))
        else:
            log.warning("the tokens file %s holds no tokens now: every call is refused", tokens.path)
        if self._auth is not None and (ended := self._auth.end_revoked()):
            log.info("ended %d streaming calls whose token no longer allows them", ended)

    async def reload_peer_token(self) -> None:
        """Read the peer token file (--peer-token-file) again and present its token when dialing
        peers from now on (done within TOKENS_POLL_S of each change of the file); streams already
        open keep theirs. A file that cannot be read or is empty leaves the token in use as it
        was, and says why in the log."""
        peer_token = self.config.security.peer_token
        assert peer_token is not None and peer_token.path is not None  # watched only then
        if self._reloaded("peer token", peer_token.reload):
            log.info("reloaded the peer token file %s", peer_token.path)

    def _reloaded(self, what: str, reload: Callable[[], object]) -> bool:
        """Run `reload` of the `what` in use; False, having logged why, if it failed. Then logs
        what in the security settings is now likely not what an operator means."""
        try:
            reload()
        except SecurityConfigError as exc:
            log.error("kept the %s in use: %s", what, exc)
            return False
        for warning in self.config.security.warnings():
            log.warning("%s", warning)
        return True

    def _seed(self, peer: str) -> None:
        # A seed is not an operator's add: it neither undoes a DELETE /nodes made here nor asks a peer
        # that removed this node to take it back (`potboiler cluster` names every node at each start).
        if self.membership.is_removed(peer):
            log.info("not replicating with --peer %s: it was removed here (POST /nodes adds it again)", peer)
        else:
            self.membership.learn(peer)

    async def _set_health(self, name: str, *, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._health.set(name, status)

    async def stop(self) -> None:
        """Stop dialing peers, then the server (letting calls in flight finish for a moment, those
        through Envoy too), the gateway, the services and the log. Every step runs, whatever failed
        before it (logged): the store is closed in the end."""
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("the file watches", self._stop_watches),  # first: no reload while calls are torn down
            ("the gRPC server", self._stop_server),
            ("the gateway", self._stop_gateway),
            ("the metrics server", self._stop_metrics),
            ("the peer watch", self.peer_watch.stop),
            ("replication", self.replicator.stop),
            ("webhooks", self.webhooks.stop),
            *((f"the {name} service", service.stop) for name, service in reversed(self.services.items())),
            ("the appender", self.appender.stop),
        ]
        try:
            for what, step in steps:
                try:
                    await step()
                except Exception:
                    log.exception("stopping %s failed", what)
        finally:
            self.services.clear()
            self.store.close()
            self.gc_pauses.stop()

    async def _stop_watches(self) -> None:
        for watch in self._watches:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        self._watches.clear()

    async def _stop_server(self) -> None:
        # No new stream to a peer first: one dialed while the server stops would outlive the node.
        self.replicator.stop_dialing()
        if self.gateway is not None:
            self.gateway.stop_restarting()  # Envoy exiting now is no failure to start it again after
        if self.server is not None:
            await self._set_health("", serving=False)
            stopping = [self.server.stop(grace=1.0)]
            if self.rest_bridge is not None:
                stopping.append(self.rest_bridge.stop(grace=1.0))
            await asyncio.gather(*stopping)
            self.server = None
        if self._auth is not None:
            await self._auth.close()

    async def _stop_gateway(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
            self.gateway = None

    async def _stop_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
