"""Prometheus metrics of a node, served on port B+5 (`/metrics`).

Nothing on the hot path is instrumented: a collector reads the node's own counters (appender,
replicator, webhooks, store) when Prometheus scrapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import grpc
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from potboiler.server.gc_pacing import GENERATIONS, CollectorPauses
from potboiler.server.replicator import PeerState
from potboiler.server.rest import GRPC_CODE_OF_STATUS
from potboiler.server.urls import origin

if TYPE_CHECKING:
    from potboiler.server.node import Node

log = logging.getLogger(__name__)


def _collector_pauses(pauses: CollectorPauses) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """The garbage collector's passes per generation (each stops the node's event loop)."""
    labels = ["generation"]
    passes = CounterMetricFamily("potboiler_gc_passes", "Garbage collector passes", labels=labels)
    seconds = CounterMetricFamily(
        "potboiler_gc_pause_seconds", "Time the garbage collector's passes took", labels=labels
    )
    longest = GaugeMetricFamily(
        "potboiler_gc_longest_pause_seconds",
        "The longest garbage collector pass since the node started",
        labels=labels,
    )
    for generation in range(GENERATIONS):
        name = [str(generation)]
        passes.add_metric(name, pauses.passes[generation])
        seconds.add_metric(name, pauses.seconds[generation])
        longest.add_metric(name, pauses.longest[generation])
    yield from (passes, seconds, longest)


class NodeCollector(Collector):
    """Reads a node's state at scrape time."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        node = self._node
        log = node.log
        yield CounterMetricFamily(
            "potboiler_appends", "Entries appended to this node's own log", value=node.appender.appended
        )
        yield CounterMetricFamily(
            "potboiler_entries_ingested", "Entries stored from peers", value=node.appender.ingested
        )
        yield CounterMetricFamily(
            "potboiler_write_batches", "Write batches committed", value=node.appender.batches
        )
        yield CounterMetricFamily(
            "potboiler_held_write_batches",
            "Write batches held open for more appends while the node was saturated",
            value=node.appender.held_batches,
        )
        yield from _collector_pauses(node.gc_pauses)
        yield GaugeMetricFamily("potboiler_entries", "Entries held, all owners", value=log.total())
        yield GaugeMetricFamily(
            "potboiler_pending_entries", "Entries waiting for a dependency", value=log.pending
        )
        yield GaugeMetricFamily(
            "potboiler_delivered_position", "Newest delivery position", value=log.position
        )
        stores = GaugeMetricFamily(
            "potboiler_store_bytes",
            "Approximate size of each store (the log's, each service's)",
            labels=["store"],
        )
        stores.add_metric(["log"], node.store.size_bytes())
        for name, service in node.services.items():
            stores.add_metric([name], service.store_bytes())
        yield stores

        entries_in = CounterMetricFamily(
            "potboiler_replicated_entries_in", "Entries received per peer", labels=["peer"]
        )
        entries_out = CounterMetricFamily(
            "potboiler_replicated_entries_out", "Entries sent per peer", labels=["peer"]
        )
        msgs_in = CounterMetricFamily(
            "potboiler_replication_messages_in", "Messages received per peer", labels=["peer"]
        )
        msgs_out = CounterMetricFamily(
            "potboiler_replication_messages_out", "Messages sent per peer", labels=["peer"]
        )
        for url, c in sorted(node.replicator.counters.items()):
            entries_in.add_metric([url], c.entries_in)
            entries_out.add_metric([url], c.entries_out)
            msgs_in.add_metric([url], c.messages_in)
            msgs_out.add_metric([url], c.messages_out)
        yield from (entries_in, entries_out, msgs_in, msgs_out)

        peer_lag = GaugeMetricFamily(
            "potboiler_peer_lag_entries", "Entries a peer has not acknowledged", labels=["peer"]
        )
        behind = GaugeMetricFamily(
            "potboiler_peer_behind_entries",
            "Entries a peer holds (as last acknowledged) that this node does not",
            labels=["peer"],
        )
        connected = GaugeMetricFamily(
            "potboiler_peer_connected", "1 if a stream with the peer is open", labels=["peer"]
        )
        states = GaugeMetricFamily(
            "potboiler_peer_state",
            "1 for the state replication with the peer is in",
            labels=["peer", "state"],
        )
        for peer, view in node.replicator.views():
            peer_lag.add_metric([peer.url], view.lag)
            behind.add_metric([peer.url], view.behind)
            connected.add_metric([peer.url], 0 if view.state is PeerState.DISCONNECTED else 1)
            for each in PeerState:
                states.add_metric([peer.url, each.name.lower()], 1 if each is view.state else 0)
        yield from (peer_lag, behind, connected, states)

        # The metrics port is open: a webhook's series name only where it goes and a digest of its
        # URL (ListWebhooks shows the same digest), as a path or query may be its secret.
        labels = ["target", "webhook"]
        delivered = CounterMetricFamily(
            "potboiler_webhook_deliveries", "Entries delivered per webhook", labels=labels
        )
        failed = CounterMetricFamily(
            "potboiler_webhook_failures", "Failed delivery attempts per webhook", labels=labels
        )
        pending = GaugeMetricFamily(
            "potboiler_webhook_pending_entries",
            "Entries delivered here not yet delivered to the webhook",
            labels=labels,
        )
        for state in node.webhooks.states():
            names = [origin(state.url), node.webhooks.digest(state.url)]
            delivered.add_metric(names, state.delivered)
            failed.add_metric(names, state.failed_attempts)
            pending.add_metric(names, max(0, log.position - state.position))
        yield from (delivered, failed, pending)


#: Longest a scrape waits for the node's event loop.
SCRAPE_TIMEOUT = 10.0
#: Connections served at once (a thread each); more are closed unanswered. The port is open: a flood
#: of connections must not take a thread each from the node. (One holding all of them, and renewing
#: them as they time out, keeps scrapers out: keep the port behind a firewall, as the README says.)
MAX_CONNECTIONS = 64
#: A scrape answered within this many seconds of another gets that one's result: however many
#: clients scrape, the node's event loop reads its state at most this often.
SCRAPE_INTERVAL = 0.25


class _Handler(BaseHTTPRequestHandler):
    """`/metrics` for GET and HEAD (as every port of a node takes HEAD wherever it takes GET); a JSON
    error, as on the node's other ports, for any other path or method. One request per connection
    (HTTP/1.0, as Prometheus scrapes): a connection made before the server stopped is answered at
    most once more."""

    #: Seconds a connection may take to send its whole request (a scraper sends it at once): a client
    #: that sends nothing, or a byte at a time, holds its slot this long.
    timeout = 3
    server: _HttpServer

    def handle(self) -> None:
        # `timeout` bounds each read only: a deadline for the request as a whole closes the
        # connection under a client that trickles it.
        self._deadline = threading.Timer(self.timeout, self._expire)
        self._deadline.daemon = True
        self._deadline.start()
        try:
            super().handle()
        finally:
            self._deadline.cancel()

    def _expire(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The handler's own errors as JSON; a method it does not take (501 here) is a 405."""
        self._deadline.cancel()
        if code == 501:
            self._fail(405, f"{self.command} is not allowed here: /metrics takes GET or HEAD", True)
            return
        self.close_connection = True
        self._fail(code, message or HTTPStatus(code).phrase, self.command != "HEAD")

    def _answer(self, send_body: bool) -> None:
        self._deadline.cancel()  # the request is in: the scrape may take its own time
        path = urlsplit(self.path).path
        if path.rstrip("/") != "/metrics":
            self._fail(404, f"No such path: {path} (metrics are at /metrics)", send_body)
            return
        try:
            body = self.server.scrape()
        except TimeoutError:
            self._fail(503, "the node did not answer the scrape in time", send_body)
            return
        except Exception:  # the node is stopping (its stores closed, its loop gone), or a bug
            log.exception("metrics scrape failed")
            self._fail(503, "the node cannot be read now (its log says why)", send_body)
            return
        self._send(200, CONTENT_TYPE_LATEST, body, send_body)

    def _fail(self, status: int, message: str, send_body: bool) -> None:
        """An error as the node's other ports answer theirs: {"code": <gRPC code>, "message", "details"}."""
        code = GRPC_CODE_OF_STATUS.get(status, grpc.StatusCode.UNKNOWN).value[0]
        body = json.dumps({"code": code, "message": message, "details": []}).encode()
        self._send(status, "application/json", body, send_body)

    def _send(self, status: int, content_type: str, body: bytes, send_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status == 405:
            self.send_header("Allow", "GET, HEAD")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged."""


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._registry = registry
        self._loop = loop
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._scraping = threading.Lock()
        self._last: tuple[float, bytes] | None = None  # (when it was read, the metrics)
        super().__init__((host, port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def scrape(self) -> bytes:
        """The metrics, read on the node's event loop (whose state they read, and which changes it
        meanwhile only between its steps), or those read less than SCRAPE_INTERVAL ago; one read at
        a time. TimeoutError if the loop does not get to it in time."""

        async def collect() -> bytes:
            return generate_latest(self._registry)

        if not self._scraping.acquire(timeout=SCRAPE_TIMEOUT):
            raise TimeoutError
        try:
            now = time.monotonic()
            if self._last is None or now - self._last[0] >= SCRAPE_INTERVAL:
                body = asyncio.run_coroutine_threadsafe(collect(), self._loop).result(SCRAPE_TIMEOUT)
                self._last = (now, body)
            return self._last[1]
        finally:
            self._scraping.release()


class MetricsServer:
    """The node's metrics over HTTP on host:port, in a background thread."""

    def __init__(self, node: Node, host: str, port: int) -> None:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(NodeCollector(node))
        try:
            self._httpd = _HttpServer(host, port, registry, asyncio.get_running_loop())
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} (metrics): {exc.strerror}") from None
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The port it listens on."""
        port: int = self._httpd.server_address[1]
        return port

    def stop(self) -> None:
        """Stop serving and free the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
