"""Webhooks: every registered URL receives every delivered entry as an HTTP POST of its JSON.

Each URL has a durable cursor over this node's delivery order (`w<url>` -> position). One task per
URL posts entries one by one in that order — so in causal order — advancing the cursor after each
2xx, and retrying a failing entry with capped exponential backoff. A slow or dead receiver only
delays its own task: appends and other receivers never wait for it. Registrations and cursors
survive a restart; delivery is at-least-once (a crash between a 2xx and the cursor write resends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from potboiler.server.appender import Appender
from potboiler.server.entry_json import entry_json
from potboiler.server.errors import NotFound, TooLarge
from potboiler.server.storage import Store, prefix_end
from potboiler.server.urls import http_url

log = logging.getLogger(__name__)

#: Most registered webhooks per node.
MAX_WEBHOOKS = 100
_U64 = struct.Struct(">Q")
_PREFIX = b"w"


@dataclass
class WebhookState:
    """Delivery progress of one URL."""

    url: str
    position: int = 0
    failures: int = 0
    last_error: str = ""
    delivered: int = 0
    failed_attempts: int = 0


@dataclass(frozen=True)
class Backoff:
    """Retry delays: `first` seconds, doubling up to `cap`."""

    first: float = 0.1
    cap: float = 10.0

    def delay(self, failures: int) -> float:
        """The wait after `failures` consecutive failures (>= 1)."""
        return float(min(self.cap, self.first * 2 ** (failures - 1)))


class Webhooks:
    """The registered URLs and their delivery tasks."""

    def __init__(
        self,
        store: Store,
        appender: Appender,
        *,
        client: Callable[[], httpx.AsyncClient] = lambda: httpx.AsyncClient(timeout=10.0),
        backoff: Backoff = Backoff(),
    ) -> None:
        self._store = store
        self._appender = appender
        self._client_factory = client
        self._client: httpx.AsyncClient | None = None
        self._backoff = backoff
        self._states: dict[str, WebhookState] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        for key, value in store.scan(_PREFIX, prefix_end(_PREFIX)):
            url = key[1:].decode()
            self._states[url] = WebhookState(url, _U64.unpack(value)[0])

    def start(self) -> None:
        """Start delivering to every registered URL."""
        self._client = self._client_factory()
        for url in self._states:
            self._spawn(url)

    async def stop(self) -> None:
        """Stop every delivery task (cursors are already durable)."""
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def register(self, url: str) -> None:
        """Register `url` (delivery starts at the beginning of the log); again is a no-op."""
        http_url(url)
        if url in self._states:
            return
        if len(self._states) >= MAX_WEBHOOKS:
            raise TooLarge(f"this node already has the maximum of {MAX_WEBHOOKS} webhooks")
        self._store.write([(_PREFIX + url.encode(), _U64.pack(0))], sync=True)
        self._states[url] = WebhookState(url)
        if self._client is not None:
            self._spawn(url)

    def deregister(self, url: str) -> None:
        """Stop delivering to `url` and forget it; NotFound if it is not registered."""
        if url not in self._states:
            raise NotFound(f"no webhook registered for {url!r}")
        del self._states[url]
        task = self._tasks.pop(url, None)
        if task is not None:
            task.cancel()
        self._store.write([(_PREFIX + url.encode(), None)], sync=True)

    def states(self) -> list[WebhookState]:
        """Every registered URL's progress, sorted by URL."""
        return [self._states[u] for u in sorted(self._states)]

    def _spawn(self, url: str) -> None:
        self._tasks[url] = asyncio.create_task(self._deliver(self._states[url]), name=f"webhook {url}")

    async def _deliver(self, state: WebhookState) -> None:
        key = _PREFIX + state.url.encode()
        while True:
            batch = self._appender.log.delivered(state.position, 100)
            if not batch:
                await self._appender.wait_delivered(state.position)
                continue
            for position, entry in batch:
                body = entry_json(self._appender.log.with_next(entry))
                await self._post_until_accepted(state, body)
                if state.url not in self._states:
                    return
                state.position = position
                state.delivered += 1
                await asyncio.to_thread(self._store.write, [(key, _U64.pack(position))])

    async def _post_until_accepted(self, state: WebhookState, body: bytes) -> None:
        assert self._client is not None
        while True:
            try:
                response = await self._client.post(
                    state.url, content=body, headers={"content-type": "application/json"}
                )
                if response.is_success:
                    state.failures, state.last_error = 0, ""
                    return
                error = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            state.failures += 1
            state.failed_attempts += 1
            state.last_error = error
            delay = self._backoff.delay(state.failures)
            log.warning(
                "webhook %s failed (%s); attempt %d, retrying in %.1fs",
                state.url,
                error,
                state.failures,
                delay,
            )
            await asyncio.sleep(delay)
