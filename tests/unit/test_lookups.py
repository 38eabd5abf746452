"""Host lookups for webhooks: one in flight per host, shared; IP addresses are their own."""

from __future__ import annotations

import asyncio
import threading

import pytest

from potboiler.server import lookups
from potboiler.server.lookups import Lookups, in_lookup_thread
from potboiler.server.webhooks import MAX_WEBHOOKS
from tests.conftest import wait_for


async def test_callers_share_the_lookup_in_flight_for_a_host() -> None:
    calls: list[str] = []
    release = threading.Event()

    def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        release.wait(5)
        return ["192.0.2.1"]

    resolve = Lookups(resolver).resolve
    waiting = [asyncio.ensure_future(resolve("a.test", 80)) for _ in range(5)]
    other = asyncio.ensure_future(resolve("b.test", 80))
    await wait_for(lambda: len(calls) == 2, 5, "both lookups to start")
    release.set()
    assert await asyncio.gather(*waiting, other) == [["192.0.2.1"]] * 6
    assert sorted(calls) == ["a.test", "b.test"]
    assert await resolve("a.test", 80) == ["192.0.2.1"] and len(calls) == 3  # none in flight now


async def test_a_caller_giving_up_leaves_the_lookup_to_the_others() -> None:
    release = threading.Event()

    started = threading.Event()

    def resolver(host: str, port: int) -> list[str]:
        started.set()
        release.wait(5)
        raise OSError("no answer")

    resolve = Lookups(resolver).resolve
    impatient = asyncio.ensure_future(resolve("a.test", 80))
    patient = asyncio.ensure_future(resolve("a.test", 80))
    await wait_for(started.is_set, 5, "the lookup to start")
    impatient.cancel()
    release.set()
    with pytest.raises(OSError, match="no answer"):
        await patient


async def test_addresses_are_not_looked_up() -> None:
    def resolver(host: str, port: int) -> list[str]:
        raise AssertionError("looked up")

    resolve = Lookups(resolver).resolve
    assert await resolve("127.0.0.1", 80) == ["127.0.0.1"]
    assert await resolve("::1", 80) == ["::1"]


async def test_lookup_threads_are_their_own() -> None:
    # a thread for each host a node's webhooks may name, and the registrations' own
    assert lookups.THREADS == lookups.DELIVERY_LOOKUPS + lookups.REGISTRATION_LOOKUPS
    assert lookups.DELIVERY_LOOKUPS >= MAX_WEBHOOKS
    name = await in_lookup_thread(lambda: threading.current_thread().name)
    assert name.startswith("webhook-dns")
