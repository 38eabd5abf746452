"""Webhooks without a network: the retry `Backoff`, and `Webhooks` delivering to an httpx
MockTransport (order, cursor persistence, retries, deregistration, limits)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf.struct_pb2 import Value
from hypothesis import given
from hypothesis import strategies as st

from potboiler.server.appender import Appender
from potboiler.server.backoff import Backoff
from potboiler.server.entries import NewEntry
from potboiler.server.errors import InvalidArgument, NotFound, TooLarge
from potboiler.server.log import Log
from potboiler.server.replicator import RECONNECT
from potboiler.server.storage import RocksStore
from potboiler.server.turns import EVERY
from potboiler.server.webhook_policy import PolicyMode, WebhookPolicy
from potboiler.server.webhooks import BATCH, MAX_WEBHOOKS, Webhooks
from tests.conftest import loop_turns, wait_for

# -- Backoff ---------------------------------------------------------------------------------


def test_backoff_defaults_double_from_a_tenth_up_to_ten_seconds() -> None:
    b = Backoff()
    assert [b.delay(n) for n in range(1, 9)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0]
    assert b.delay(50) == 10.0
    assert all(isinstance(b.delay(n), float) for n in (1, 5, 60))


def test_backoff_custom() -> None:
    b = Backoff(first=1.0, cap=3.0)
    assert [b.delay(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 3.0]
    assert Backoff(first=0.0, cap=5.0).delay(7) == 0.0


@given(
    first=st.floats(min_value=0.001, max_value=5.0),
    cap=st.floats(min_value=0.001, max_value=60.0),
    failures=st.integers(min_value=1, max_value=1000),
)
def test_backoff_is_monotone_and_capped(first: float, cap: float, failures: int) -> None:
    b = Backoff(first=first, cap=cap)
    assert 0 < b.delay(failures) <= cap
    assert b.delay(failures) <= b.delay(failures + 1)
    assert b.delay(1) == min(first, cap)


@pytest.mark.parametrize("backoff", [Backoff(), RECONNECT], ids=["webhooks", "replication"])
def test_backoff_after_a_very_long_outage_stays_at_the_cap(backoff: Backoff) -> None:
    assert backoff.delay(1025) == backoff.cap
    assert backoff.delay(10**6) == backoff.cap


# -- Webhooks against a mock transport -----------------------------------------------------------


class EmptyStream(httpx.AsyncByteStream):
    """An answer body not yet read (as from a real server), and empty."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b""


@dataclass
class Receiver:
    """The mock HTTP side: records posts per URL; `status(url, attempt)` decides each answer."""

    status: Callable[[str, int], int] = lambda url, attempt: 200
    posts: list[tuple[str, Any, str]] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)

    def handle(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        n = self.attempts[url] = self.attempts.get(url, 0) + 1
        code = self.status(url, n)
        if code < 0:
            raise httpx.ConnectError("connection refused", request=request)
        if code == 200:
            self.posts.append((url, json.loads(request.content), request.headers["content-type"]))
        return httpx.Response(code, stream=EmptyStream())

    def ids(self, url: str) -> list[str]:
        return [body["id"] for u, body, _ in self.posts if u == url]


#: Retry almost at once in these tests.
FAST = Backoff(first=0.001, cap=0.01)


@dataclass
class Harness:
    """A log on RocksDB with its appender and webhooks (fast backoff), restartable on the same store."""

    path: Path
    receiver: Receiver
    backoff: Backoff = FAST
    store: RocksStore = field(init=False)
    appender: Appender = field(init=False)
    webhooks: Webhooks = field(init=False)

    async def start(self) -> None:
        self.store = RocksStore(self.path)
        self.appender = Appender(Log(self.store), self.store)
        self.appender.start()
        transport = httpx.MockTransport(lambda request: self.receiver.handle(request))
        self.webhooks = Webhooks(
            self.store,
            self.appender,
            transport=lambda: transport,
            backoff=self.backoff,
        )
        self.webhooks.start()

    async def stop(self) -> None:
        try:
            await self.webhooks.stop()
        finally:
            await self.appender.stop()
            self.store.close()

    async def append(self, *values: float) -> list[str]:
        entries = await self.appender.append(
            [NewEntry(Value(number_value=v).SerializeToString()) for v in values]
        )
        return [e.id for e in entries]


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path / "db", Receiver())
    await h.start()
    try:
        yield h
    finally:
        await h.stop()


URL = "http://receiver.test/hook"


async def test_delivers_every_entry_in_order_as_json(harness: Harness) -> None:
    before = await harness.append(0, 1)
    await harness.webhooks.register(URL)
    after = await harness.append(2, 3, 4)
    await wait_for(lambda: len(harness.receiver.ids(URL)) >= 5)
    assert harness.receiver.ids(URL) == before + after
    url, body, content_type = harness.receiver.posts[0]
    assert (url, content_type) == (URL, "application/json")
    assert set(body) == {"data", "dependencies", "id", "next", "owner", "prev", "seq", "when"}
    assert (body["data"], body["seq"], body["prev"], body["next"]) == (0, 1, None, before[1])
    # Integers stay integers (a typed receiver refuses 1.0 for an int).
    assert all(
        type(n) is int for n in (body["data"], body["seq"], body["when"]["wall_ms"], body["when"]["logical"])
    )
    [state] = harness.webhooks.states()
    await wait_for(lambda: state.position == 5)
    assert (state.url, state.delivered, state.failures, state.last_error) == (URL, 5, 0, "")


async def test_cursor_survives_a_restart(harness: Harness) -> None:
    await harness.webhooks.register(URL)
    first = await harness.append(1, 2, 3)
    await wait_for(lambda: harness.webhooks.states()[0].position == 3)
    await harness.stop()
    await harness.start()
    assert [(s.url, s.position) for s in harness.webhooks.states()] == [(URL, 3)]
    second = await harness.append(4, 5)
    await wait_for(lambda: len(harness.receiver.ids(URL)) >= 5)
    assert harness.receiver.ids(URL) == first + second


@pytest.mark.parametrize("failure", [500, 404, -1], ids=["http-500", "http-404", "connect-error"])
async def test_failures_are_retried_until_accepted(harness: Harness, failure: int) -> None:
    harness.receiver.status = lambda url, attempt: failure if attempt <= 3 else 200
    await harness.webhooks.register(URL)
    ids = await harness.append(1, 2)
    await wait_for(lambda: len(harness.receiver.ids(URL)) >= 2)
    assert harness.receiver.ids(URL) == ids
    assert harness.receiver.attempts[URL] == 5
    [state] = harness.webhooks.states()
    assert (state.failures, state.last_error) == (0, "")


async def test_an_outage_is_logged_at_its_start_now_and_then_and_at_its_end(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """Not a line per retry for as long as a receiver fails (one every 10 s, for days)."""
    caplog.set_level(logging.INFO, logger="potboiler.server.webhooks")
    harness.receiver.status = lambda url, attempt: 500 if attempt <= 60 else 200
    await harness.webhooks.register(URL)
    await harness.append(1)
    await wait_for(lambda: len(harness.receiver.ids(URL)) == 1, timeout=30)
    messages = [r.getMessage() for r in caplog.records if r.name == "potboiler.server.webhooks"]
    failed = [m for m in messages if "failed (" in m]
    assert [m.split("attempt ")[1].split(",")[0] for m in failed] == ["1", "5", "50"], failed
    assert any("takes deliveries again, after 60 failed attempts" in m for m in messages), messages
    assert any("registered" in m for m in messages)


async def test_a_failure_is_logged_without_the_urls_secrets(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    url = "http://token-user:pw@receiver.test/services/T0/s3cret?key=s3cret"
    harness.receiver.status = lambda url, attempt: 500 if attempt == 1 else 200
    await harness.webhooks.register(url)
    await harness.append(1)
    await wait_for(lambda: harness.receiver.attempts.get(url, 0) >= 2)
    [line] = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert f"http://receiver.test:80 ({harness.webhooks.digest(url)})" in line
    assert "s3cret" not in line and "token-user" not in line and "pw" not in line


async def test_a_webhooks_digest_is_keyed_per_node_and_kept_across_restarts(
    harness: Harness, tmp_path: Path
) -> None:
    """Whoever sees a digest (the metrics port is open) cannot test guesses of the URL against it."""
    url = "http://user:pw@receiver.test/hook?token=1234"
    first = harness.webhooks.digest(url)
    assert first != hashlib.sha256(url.encode()).hexdigest()[:16]
    await harness.stop()
    await harness.start()
    assert harness.webhooks.digest(url) == first
    other = Harness(tmp_path / "other", Receiver())
    await other.start()
    try:
        assert other.webhooks.digest(url) != first
    finally:
        await other.stop()


async def test_a_failing_url_does_not_hold_up_others(harness: Harness) -> None:
    other = "http://other.test/hook"
    harness.receiver.status = lambda url, attempt: 503 if url == URL else 200
    await harness.webhooks.register(URL)
    await harness.webhooks.register(other)
    ids = await harness.append(1, 2, 3)
    await wait_for(lambda: harness.receiver.ids(other) == ids)
    await wait_for(lambda: harness.receiver.attempts.get(URL, 0) >= 3)
    state = next(s for s in harness.webhooks.states() if s.url == URL)
    assert state.failures >= 2 and state.last_error == "HTTP 503" and state.position == 0


async def test_webhooks_catching_up_take_turns_leaving_the_loop_to_others(harness: Harness) -> None:
    # The mock answers without suspending the caller: without turns each webhook would deliver a
    # whole batch in one pass of the loop, and everything else the node serves would wait for it.
    urls = [f"http://receiver{n}.test/hook" for n in range(4)]
    ids = await harness.append(*range(40))
    delivered_in: list[int] = []
    answer = harness.receiver.handle

    def handle(request: httpx.Request) -> httpx.Response:
        delivered_in.append(counted.count)
        return answer(request)

    harness.receiver.handle = handle  # type: ignore[method-assign]
    async with loop_turns() as counted:
        for url in urls:
            await harness.webhooks.register(url)
        await wait_for(lambda: all(harness.receiver.ids(url) == ids for url in urls))
    assert len(delivered_in) == 160
    assert all(b - a >= EVERY for a, b in itertools.pairwise(delivered_in))


async def test_deregister_stops_delivery(harness: Harness) -> None:
    await harness.webhooks.register(URL)
    ids = await harness.append(1)
    await wait_for(lambda: harness.receiver.ids(URL) == ids)
    harness.webhooks.deregister(URL)
    assert harness.webhooks.states() == []
    with pytest.raises(NotFound):
        harness.webhooks.deregister(URL)
    other = "http://other.test/hook"
    await harness.webhooks.register(other)
    await harness.append(2)
    await wait_for(lambda: len(harness.receiver.ids(other)) == 2)
    assert harness.receiver.ids(URL) == ids
    await harness.stop()
    await harness.start()
    assert [s.url for s in harness.webhooks.states()] == [other]


async def test_register_validates_and_limits(harness: Harness) -> None:
    for bad in ("", "ftp://x/", "nope", "http://"):
        with pytest.raises(InvalidArgument):
            await harness.webhooks.register(bad)
    for i in range(MAX_WEBHOOKS):
        await harness.webhooks.register(f"http://h{i}.test/")
    await harness.webhooks.register("http://h0.test/")  # known: fine at the limit
    with pytest.raises(TooLarge):
        await harness.webhooks.register("http://one-more.test/")
    assert len(harness.webhooks.states()) == MAX_WEBHOOKS


async def test_a_url_differing_in_the_case_of_its_scheme_or_host_is_the_same_webhook(
    harness: Harness,
) -> None:
    await harness.webhooks.register("http://Receiver.test/Hook")
    await harness.webhooks.register("HTTP://RECEIVER.TEST/Hook")
    await harness.webhooks.register("http://u:Secret@receiver.TEST:80/Hook")
    assert [s.url for s in harness.webhooks.states()] == [
        "http://receiver.test/Hook",
        "http://u:Secret@receiver.test:80/Hook",  # another URL: its user info and port differ
    ]
    harness.webhooks.deregister("HTTP://receiver.test/Hook")
    with pytest.raises(NotFound):
        harness.webhooks.deregister("http://receiver.test/hook")  # paths are case-sensitive
    assert [s.url for s in harness.webhooks.states()] == ["http://u:Secret@receiver.test:80/Hook"]


async def test_delivery_resumes_after_a_very_long_outage(tmp_path: Path) -> None:
    receiver = Receiver(status=lambda url, attempt: 500 if attempt <= 1100 else 200)
    harness = Harness(tmp_path / "db", receiver, backoff=Backoff(first=0.0, cap=0.0))
    await harness.start()
    try:
        await harness.webhooks.register(URL)
        ids = await harness.append(1)
        [task] = [
            t for t in asyncio.all_tasks() if t.get_name().startswith("webhook http://receiver.test:80 (")
        ]
        await wait_for(lambda: receiver.ids(URL) == ids or task.done())
        assert not task.done(), task.exception()
        assert receiver.ids(URL) == ids
    finally:
        await asyncio.wait_for(harness.stop(), 10)


class FailingCursorStore:
    """The harness's store, whose next `failures` webhook cursor writes fail (as a full disk would)."""

    def __init__(self, store: RocksStore, failures: int) -> None:
        self._store = store
        self.failures = failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def write(self, batch: Any, *, sync: bool = False) -> None:
        if self.failures and any(key.startswith(b"w") for key, _ in batch):
            self.failures -= 1
            raise OSError("IO error: No space left on device")
        self._store.write(batch, sync=sync)


async def test_a_failed_cursor_write_pauses_delivery_without_ending_it(harness: Harness) -> None:
    await harness.webhooks.register(URL)
    store = FailingCursorStore(harness.store, failures=2)
    harness.webhooks._store = store
    ids = await harness.append(1, 2, 3)
    await wait_for(
        lambda: harness.receiver.ids(URL)[-3:] == ids and harness.webhooks.states()[0].position == 3
    )
    assert store.failures == 0
    # At least once: an entry whose cursor was not written may come again, none is missed.
    assert sorted(set(harness.receiver.ids(URL))) == sorted(ids)


class SyncCountingStore:
    """The harness's store, counting WAL syncs and synced writes."""

    def __init__(self, store: RocksStore) -> None:
        self._store = store
        self.syncs = 0
        self.synced_writes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def write(self, batch: Any, *, sync: bool = False) -> None:
        self.synced_writes += sync
        self._store.write(batch, sync=sync)

    def sync(self) -> None:
        self.syncs += 1
        self._store.sync()


async def test_with_fsync_cursors_are_synced_once_a_batch(harness: Harness) -> None:
    """Without it, a cursor was durable only with the next synced log write: on a node delivering
    its history and taking no writes, a power loss would resend everything delivered since."""
    await harness.webhooks.register(URL)
    store = SyncCountingStore(harness.store)
    harness.webhooks._store, harness.webhooks._sync = store, True
    ids = await harness.append(*range(2 * BATCH + 50))
    # One per batch read (the last one's after its cursor moved): three for the history.
    await wait_for(lambda: harness.webhooks.states()[0].position == len(ids) and store.syncs == 3)
    assert harness.receiver.ids(URL) == ids
    assert store.synced_writes == 0


async def test_a_stop_waits_for_a_cursor_sync_in_flight(harness: Harness) -> None:
    """The node closes the store after the webhooks stop: a sync still running in its thread then
    failed the close ("Already borrowed")."""
    syncing, finished = threading.Event(), threading.Event()

    class SlowSyncStore(SyncCountingStore):
        def sync(self) -> None:
            syncing.set()
            time.sleep(0.2)
            super().sync()
            finished.set()

    await harness.webhooks.register(URL)
    harness.webhooks._store, harness.webhooks._sync = SlowSyncStore(harness.store), True
    await harness.append(1)
    await wait_for(syncing.is_set)
    await harness.webhooks.stop()
    assert finished.is_set()


async def test_registrations_stored_with_capitals_in_scheme_or_host_become_one(tmp_path: Path) -> None:
    """Stored before URLs were kept in lower case: each is moved to its lower-case key, and two that
    are one receiver keep the cursor further along."""
    store = RocksStore(tmp_path / "db")
    try:
        store.write(
            [
                (b"wHTTP://Receiver.test/Hook", struct.pack(">Q", 5)),
                (b"whttp://receiver.test/Hook", struct.pack(">Q", 3)),
                (b"whttp://other.test/x", struct.pack(">Q", 1)),
            ]
        )
        webhooks = Webhooks(store, Appender(Log(store), store))
        assert [(s.url, s.position) for s in webhooks.states()] == [
            ("http://other.test/x", 1),
            ("http://receiver.test/Hook", 5),
        ]
        assert [key for key, _ in store.scan(b"w", b"x")] == [
            b"whttp://other.test/x",
            b"whttp://receiver.test/Hook",
        ]
        assert store.get(b"whttp://receiver.test/Hook") == struct.pack(">Q", 5)
    finally:
        store.close()


async def test_registration_resolves_the_host_off_the_event_loop(harness: Harness) -> None:
    def slow_resolver(host: str, port: int) -> list[str]:
        time.sleep(0.3)  # a slow DNS server
        return ["93.184.216.34"]

    policy = WebhookPolicy(PolicyMode.DENY_PRIVATE, resolver=slow_resolver)
    webhooks = Webhooks(harness.store, harness.appender, policy=policy)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        await webhooks.register("http://slow-dns.test/hook")
    finally:
        ticker.cancel()
    assert ticks >= 5  # the loop kept running while the name was resolved
    assert [s.url for s in webhooks.states()] == ["http://slow-dns.test/hook"]
