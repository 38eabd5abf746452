"""Webhooks: every registered URL receives every delivered entry as an HTTP POST of its JSON.

Targets are subject to the node's `WebhookPolicy` (potboiler.server.webhook_policy): checked when a URL
is registered (a refusal is a 400) and on every delivery attempt (a refusal is a failed attempt).
Delivery follows no redirects (a 3xx is a failure), has connect and read timeouts and an overall
deadline per attempt, and reads at most `MAX_RESPONSE_BYTES` of a receiver's answer.

Each URL has a durable cursor over this node's delivery order (`w<url>` -> position). One task per
URL posts entries one by one in that order — so in causal order — advancing the cursor after each
2xx, and retrying a failing entry with capped exponential backoff. A slow or dead receiver only
delays its own task: appends and other receivers never wait for it. The tasks take turns at the work
of a delivery (`Appender.turns`): however many catch up on a long log at once, the node's requests wait behind
one delivery at a time. Registrations and cursors survive a restart; delivery is at-least-once (a
crash between a 2xx and the cursor write resends). With `sync` (the node's --fsync) a cursor is
synced after each batch of up to `BATCH` entries, not after each POST: a power loss resends at most
that many.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from potboiler.server.appender import Appender
from potboiler.server.backoff import Backoff
from potboiler.server.entry_json import entry_json
from potboiler.server.errors import InvalidArgument, NotFound, TooLarge, quoted
from potboiler.server.lookups import REGISTRATION_LOOKUPS, in_lookup_thread
from potboiler.server.storage import Store, Write, prefix_end
from potboiler.server.urls import digest, lower_case_origin, shown, webhook_url
from potboiler.server.webhook_policy import WebhookPolicy
from potboiler.v1.entry_pb2 import Entry

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

#: Most entries a webhook's task reads from the log at a time.
BATCH = 100
#: Retry delays of a failing receiver: 0.1 s doubling to 10 s.
RETRY = Backoff(first=0.1, cap=10.0)
#: Most registered webhooks per node.
MAX_WEBHOOKS = 100
#: Most bytes read of a receiver's answer; the rest is not read (the connection is closed).
MAX_RESPONSE_BYTES = 64 << 10
#: Longest one delivery attempt may take, seconds (a receiver dribbling its answer cannot hold it).
ATTEMPT_TIMEOUT = 30.0
_U64 = struct.Struct(">Q")
_PREFIX = b"w"
#: The node's secret key of the digests that name its webhooks where their URLs are not shown.
_DIGEST_KEY = b"mwebhook_digest_key"
#: Header naming the node whose webhook POSTs: a node of the same cluster refuses to append such a
#: POST to its log (see CoreRestServicer.PostLogEntry), since every entry would come back again.
ORIGIN_HEADER = "x-potboiler-webhook-from"


@dataclass
class WebhookState:
    """Delivery progress of one URL."""

    url: str
    position: int = 0
    failures: int = 0
    last_error: str = ""
    delivered: int = 0
    failed_attempts: int = 0


class Webhooks:
    """The registered URLs and their delivery tasks."""

    def __init__(
        self,
        store: Store,
        appender: Appender,
        *,
        transport: Callable[[], httpx.AsyncBaseTransport] | None = None,
        backoff: Backoff = RETRY,
        policy: WebhookPolicy | None = None,
        sync: bool = False,
    ) -> None:
        self._store = store
        self._sync = sync
        self._appender = appender
        self._policy = policy or WebhookPolicy()
        #: What makes the delivery transport, if not `webhook_http.delivery_transport` (tests give theirs).
        self._transport_factory = transport
        #: Made at the first delivery (TLS set-up is slow).
        self._transport: httpx.AsyncBaseTransport | None = None
        self._registration_lookups = asyncio.Semaphore(REGISTRATION_LOOKUPS)
        self._running = False
        self._backoff = backoff
        self._states: dict[str, WebhookState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        #: The WAL syncs running (each in a thread, which a cancellation does not stop).
        self._syncing: set[asyncio.Future[None]] = set()
        self._load()
        digest_key = store.get(_DIGEST_KEY)
        if digest_key is None:
            digest_key = secrets.token_bytes(32)
            store.write([(_DIGEST_KEY, digest_key)], sync=True)
        self._digest_key = digest_key

    def _load(self) -> None:
        """The registrations and their cursors from the store. One stored before URLs were kept with
        their scheme and host in lower case is moved to its key in that form, in one synced write;
        two that are now one keep the cursor further along (both delivered to one receiver)."""
        moved: list[Write] = []
        renamed: set[str] = set()
        for key, value in self._store.scan(_PREFIX, prefix_end(_PREFIX)):
            url = key[1:].decode()
            form = lower_case_origin(url)
            position = _U64.unpack(value)[0]
            if form in self._states:
                position = max(position, self._states[form].position)
            self._states[form] = WebhookState(form, position)
            if form != url:
                moved.append((key, None))
                renamed.add(form)
        if moved:
            moved += [(_PREFIX + form.encode(), _U64.pack(self._states[form].position)) for form in renamed]
            self._store.write(moved, sync=True)

    def digest(self, url: str) -> str:
        """The name of a webhook where its URL is not shown (logs, metrics), stable across restarts."""
        return digest(url, self._digest_key)

    def _shown(self, url: str) -> str:
        return shown(url, self._digest_key)

    def start(self) -> None:
        """Start delivering to every registered URL."""
        self._running = True
        for url in self._states:
            self._spawn(url)

    async def stop(self) -> None:
        """Stop every delivery task (cursors are already durable)."""
        self._running = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task  # (a delivery task ends only when cancelled or deregistered)
        # The store closes after this: their threads must be done.
        await asyncio.gather(*self._syncing, return_exceptions=True)
        if self._transport is not None:
            await self._transport.aclose()
            self._transport = None

    async def register(self, url: str) -> None:
        """Register `url` (delivery starts at the beginning of the log); again is a no-op.
        InvalidArgument if it is not an http(s) URL or the webhook policy refuses it. It is kept
        with its scheme and host in lower case (`webhook_url`)."""
        url = webhook_url(url)
        if url in self._states:
            return
        self._check_room()
        # In a lookup thread: a policy that refuses private addresses resolves the host, and a slow
        # DNS server must not stall the node (nor the event loop's default thread pool, nor take
        # every lookup thread: registrations share a few).
        async with self._registration_lookups:
            await in_lookup_thread(self._policy.check_url, url)
        if url in self._states:
            return  # registered meanwhile
        self._check_room()
        self._store.write([(_PREFIX + url.encode(), _U64.pack(0))], sync=True)
        self._states[url] = WebhookState(url)
        log.info("webhook %s registered", self._shown(url))
        if self._running:
            self._spawn(url)

    def _check_room(self) -> None:
        if len(self._states) >= MAX_WEBHOOKS:
            raise TooLarge(f"this node already has the maximum of {MAX_WEBHOOKS} webhooks")

    def deregister(self, url: str) -> None:
        """Stop delivering to `url` and forget it; InvalidArgument if it is empty, NotFound if it is
        not registered."""
        if not url:
            raise InvalidArgument("url is required")
        if url not in self._states:  # as registered, or as `register` keeps it
            with contextlib.suppress(InvalidArgument):
                url = webhook_url(url)
        if url not in self._states:
            raise NotFound(f"no webhook registered for {quoted(url)}")
        # On disk first: a failed write changes nothing, as for registering.
        self._store.write([(_PREFIX + url.encode(), None)], sync=True)
        del self._states[url]
        task = self._tasks.pop(url, None)
        if task is not None:
            task.cancel()
        log.info("webhook %s deregistered", self._shown(url))

    def states(self) -> list[WebhookState]:
        """Every registered URL's progress, sorted by URL."""
        return [self._states[u] for u in sorted(self._states)]

    def _spawn(self, url: str) -> None:
        self._tasks[url] = asyncio.create_task(
            self._deliver(self._states[url]), name=f"webhook {self._shown(url)}"
        )

    async def _deliver(self, state: WebhookState) -> None:
        """Deliver to `state.url` until it is deregistered. An error other than the receiver's (the
        store failing to write the cursor, say) is logged, and delivery resumes after a backoff
        from the entry after the last one the receiver accepted."""
        failures = 0
        while True:
            resumed_at = state.position
            try:
                await self._deliver_from(state)
                return
            except Exception as exc:
                failures = 1 if state.position != resumed_at else failures + 1
                state.last_error = f"{type(exc).__name__}: {exc}"
                delay = self._backoff.delay(failures)
                log.exception("webhook %s: delivery failed; resuming in %.1fs", self._shown(state.url), delay)
                await asyncio.sleep(delay)

    async def _deliver_from(self, state: WebhookState) -> None:
        """Deliver from `state.position` on; returns once `state.url` is deregistered."""
        key = _PREFIX + state.url.encode()
        while True:
            batch = self._appender.delivered(state.position, BATCH)
            if not batch:
                await self._appender.wait_delivered(state.position)
                continue
            for position, entry in batch:
                await self._appender.turns.take()
                body = entry_json(self._appender.log.with_next(Entry.FromString(entry.SerializeToString())))
                await self._post_until_accepted(state, body)
                if state.url not in self._states:
                    return
                state.position = position
                state.delivered += 1
                self._store.write([(key, _U64.pack(position))])
            if self._sync:
                # A WAL sync, not a write: a deregistration meanwhile cannot be undone by it.
                # Shielded and kept: a stop meanwhile waits for the thread before the store closes.
                syncing = asyncio.ensure_future(asyncio.to_thread(self._store.sync))
                self._syncing.add(syncing)
                syncing.add_done_callback(self._syncing.discard)
                await asyncio.shield(syncing)

    async def _post_until_accepted(self, state: WebhookState, body: bytes) -> None:
        import httpx  # here, not at the top: a node that delivers nowhere starts ~80 ms sooner without it

        while True:
            try:
                async with asyncio.timeout(ATTEMPT_TIMEOUT):
                    status = await self._post(state.url, body)
                if 200 <= status < 300:
                    if state.failures:
                        log.info(
                            "webhook %s takes deliveries again, after %d failed attempts",
                            self._shown(state.url),
                            state.failures,
                        )
                    state.failures, state.last_error = 0, ""
                    return
                error = f"HTTP {status}"
            except (httpx.HTTPError, httpx.InvalidURL, UnicodeError) as exc:  # UnicodeError: IDNA
                error = f"{type(exc).__name__}: {exc}"
            except TimeoutError:
                error = f"no complete answer within {ATTEMPT_TIMEOUT:g}s"
            state.failures += 1
            state.failed_attempts += 1
            state.last_error = error
            delay = self._backoff.delay(state.failures)
            if state.failures in (1, 5) or state.failures % 50 == 0:  # not a line a retry all outage long
                log.warning(
                    "webhook %s failed (%s); attempt %d, retrying in %.1fs",
                    self._shown(state.url),
                    error,
                    state.failures,
                    delay,
                )
            await asyncio.sleep(delay)

    async def _post(self, url: str, body: bytes) -> int:
        """POST one entry; returns the status, having read at most MAX_RESPONSE_BYTES of the answer."""
        from potboiler.server.webhook_http import delivery_transport, post

        if self._transport is None:
            make = self._transport_factory
            self._transport = make() if make is not None else delivery_transport(self._policy)
        return await post(
            self._transport, url, body, {ORIGIN_HEADER: self._appender.log.node_id}, MAX_RESPONSE_BYTES
        )
