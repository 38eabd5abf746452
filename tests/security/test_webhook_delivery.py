"""Webhook delivery under the SSRF rules, in process against real HTTP receivers: redirects are not
followed (a 3xx is a failed attempt), a receiver's oversized answer is cut, and a target refused
by the policy at delivery time is a failed attempt, retried and reported in `last_error`."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.struct_pb2 import Value

from potboiler.server import webhooks as webhooks_module
from potboiler.server.appender import Appender
from potboiler.server.entries import NewEntry
from potboiler.server.log import Log
from potboiler.server.lookups import REGISTRATION_LOOKUPS
from potboiler.server.storage import RocksStore
from potboiler.server.webhook_policy import PolicyMode, WebhookPolicy
from potboiler.server.webhooks import MAX_RESPONSE_BYTES, Webhooks, WebhookState
from tests.conftest import wait_for
from tests.webhook_receiver import Answer, Receiver


@dataclass
class Hooks:
    """A log with its appender and webhooks under a policy."""

    store: RocksStore
    appender: Appender
    webhooks: Webhooks

    async def append(self, count: int) -> None:
        await self.appender.append(
            [NewEntry(Value(number_value=i).SerializeToString()) for i in range(count)]
        )

    def state(self, url: str) -> WebhookState:
        return next(s for s in self.webhooks.states() if s.url == url)


@pytest.fixture
async def hooks_factory(tmp_path: Path) -> AsyncIterator[list[Hooks]]:
    started: list[Hooks] = []
    yield started
    for hooks in started:
        await hooks.webhooks.stop()
        await hooks.appender.stop()
        hooks.store.close()


async def start(started: list[Hooks], path: Path, policy: WebhookPolicy) -> Hooks:
    store = RocksStore(path)
    appender = Appender(Log(store), store)
    appender.start()
    webhooks = Webhooks(store, appender, policy=policy)
    webhooks.start()
    hooks = Hooks(store, appender, webhooks)
    started.append(hooks)
    return hooks


async def test_a_redirect_is_not_followed_and_counts_as_a_failure(
    tmp_path: Path, hooks_factory: list[Hooks], receiver: Receiver
) -> None:
    receiver.answer = lambda path: Answer(307, {"location": "/target"}) if path == "/hook" else Answer()
    hooks = await start(hooks_factory, tmp_path / "db", WebhookPolicy())
    url = receiver.url("/hook")
    await hooks.webhooks.register(url)
    await hooks.append(1)
    await wait_for(lambda: hooks.state(url).failed_attempts >= 2)
    assert hooks.state(url).last_error == "HTTP 307"
    assert hooks.state(url).position == 0
    assert receiver.received("/target") == []


async def test_an_oversized_answer_is_cut_and_delivery_goes_on(
    tmp_path: Path, hooks_factory: list[Hooks], receiver: Receiver
) -> None:
    """The receiver answers 200 with a body that never ends: the node reads at most
    MAX_RESPONSE_BYTES of it, hangs up, and delivers the next entries."""
    receiver.answer = lambda path: Answer(200, endless=True)
    hooks = await start(hooks_factory, tmp_path / "db", WebhookPolicy())
    url = receiver.url("/hook")
    await hooks.webhooks.register(url)
    await hooks.append(3)
    await wait_for(lambda: hooks.state(url).delivered == 3)
    assert hooks.state(url).failed_attempts == 0
    assert len(receiver.received("/hook")) == 3
    # What the receiver managed to write before the node hung up is bounded by the cap plus what
    # the sockets buffer, not by the (endless) body.
    assert receiver.bytes_sent < 3 * (MAX_RESPONSE_BYTES + (16 << 20))


async def test_a_target_refused_at_delivery_is_a_failed_attempt_retried_with_backoff(
    tmp_path: Path, hooks_factory: list[Hooks], receiver: Receiver
) -> None:
    """Registered while its name resolved to a public address; at delivery the name resolves to
    loopback (DNS rebinding): every attempt fails, nothing reaches the receiver."""
    answers = {"count": 0}

    def resolve(host: str, port: int) -> list[str]:
        answers["count"] += 1
        return ["93.184.216.34"] if answers["count"] == 1 else ["127.0.0.1"]

    policy = WebhookPolicy(PolicyMode.DENY_PRIVATE, resolver=resolve)
    hooks = await start(hooks_factory, tmp_path / "db", policy)
    url = f"http://rebind.example:{receiver.port}/hook"
    await hooks.webhooks.register(url)
    await hooks.append(2)
    await wait_for(lambda: hooks.state(url).failed_attempts >= 3)
    state = hooks.state(url)
    assert "rebind.example resolves to an address that is not public" in state.last_error
    assert "127.0.0.1" not in state.last_error  # shown to whoever lists webhooks: logged instead
    assert state.position == 0 and state.delivered == 0
    assert receiver.received() == []


async def test_a_stricter_policy_after_a_restart_stops_delivery_to_stored_urls(
    tmp_path: Path, hooks_factory: list[Hooks], receiver: Receiver
) -> None:
    hooks = await start(hooks_factory, tmp_path / "db", WebhookPolicy())
    url = receiver.url("/hook")
    await hooks.webhooks.register(url)
    await hooks.append(1)
    await wait_for(lambda: hooks.state(url).delivered == 1)
    hooks_factory.remove(hooks)
    await hooks.webhooks.stop()
    await hooks.appender.stop()
    hooks.store.close()

    hooks = await start(hooks_factory, tmp_path / "db", WebhookPolicy(PolicyMode.DENY_PRIVATE))
    await hooks.append(1)
    await wait_for(lambda: hooks.state(url).failed_attempts >= 1)
    assert "127.0.0.1 is a loopback address" in hooks.state(url).last_error
    assert len(receiver.received()) == 1


async def test_a_receiver_that_never_answers_times_out(
    tmp_path: Path, hooks_factory: list[Hooks], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket that accepts connections (in the kernel's backlog) and never answers: each attempt
    ends at the deadline and counts as a failure."""
    monkeypatch.setattr(webhooks_module, "ATTEMPT_TIMEOUT", 0.3)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/hook"
        hooks = await start(hooks_factory, tmp_path / "db", WebhookPolicy())
        await hooks.webhooks.register(url)
        await hooks.append(1)
        await wait_for(lambda: hooks.state(url).failed_attempts >= 2)
        assert hooks.state(url).last_error == "no complete answer within 0.3s"
        assert hooks.state(url).delivered == 0


class HangingDns:
    """socket.getaddrinfo for tests: names ending in .dead.test hang (until the test ends), as with
    a DNS server that never answers; receiver.test is 127.0.0.1; anything else as the system says."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.hanging = 0
        self._lock = threading.Lock()
        self._system = socket.getaddrinfo

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, bytes):
            host = host.decode()
        if host.endswith(".dead.test"):
            with self._lock:
                self.hanging += 1
            self.released.wait(30)
            raise socket.gaierror("no answer")
        return self._system("127.0.0.1" if host == "receiver.test" else host, port, *args, **kwargs)


@pytest.fixture
def hanging_dns(monkeypatch: pytest.MonkeyPatch) -> Iterator[HangingDns]:
    dns = HangingDns()
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    try:
        yield dns
    finally:
        dns.released.set()  # the lookup threads end


async def test_receivers_whose_names_never_resolve_hold_up_no_other_receiver_nor_the_default_pool(
    tmp_path: Path, hooks_factory: list[Hooks], receiver: Receiver, hanging_dns: HangingDns
) -> None:
    """Lookups that hang (a DNS server that never answers) keep their threads until the resolver
    gives up; they run in lookup threads of their own, one per host, so a receiver on another
    host, and everything else a node runs in the loop's default threads, go on."""
    dead = [f"h{i}.dead.test" for i in range(12)]  # more than the default pool's threads
    hooks = await start(hooks_factory, tmp_path / "db", WebhookPolicy())
    for host in dead:
        await hooks.webhooks.register(f"http://{host}:{receiver.port}/hook")
    good = receiver.url("/hook", host="receiver.test")
    await hooks.webhooks.register(good)
    await hooks.append(1)
    await wait_for(lambda: hooks.state(good).position == 1, timeout=10)
    # One lookup per dead host, each holding its thread (counted as its lookup thread starts).
    await wait_for(lambda: hanging_dns.hanging == len(dead), timeout=10)
    async with asyncio.timeout(2):
        await asyncio.to_thread(lambda: None)
    assert all(hooks.state(f"http://{host}:{receiver.port}/hook").position == 0 for host in dead)


async def test_registrations_whose_names_never_resolve_leave_the_deliveries_lookup_threads(
    tmp_path: Path, hooks_factory: list[Hooks], receiver: Receiver, hanging_dns: HangingDns
) -> None:
    """Under deny-private a registration resolves its host: however many of them hang, they share
    a few lookup threads, and deliveries to a receiver by name go on."""
    policy = WebhookPolicy(PolicyMode.DENY_PRIVATE, address_check=lambda address: None)
    hooks = await start(hooks_factory, tmp_path / "db", policy)
    good = receiver.url("/hook", host="receiver.test")
    await hooks.webhooks.register(good)
    registering = [
        asyncio.ensure_future(hooks.webhooks.register(f"http://h{i}.dead.test/hook")) for i in range(150)
    ]
    try:
        await wait_for(lambda: hanging_dns.hanging == REGISTRATION_LOOKUPS, timeout=10)
        await hooks.append(1)
        await wait_for(lambda: hooks.state(good).position == 1, timeout=10)
        assert hanging_dns.hanging == REGISTRATION_LOOKUPS  # the rest of the registrations wait
    finally:
        for task in registering:
            task.cancel()
        await asyncio.gather(*registering, return_exceptions=True)
