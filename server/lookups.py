"""Host name lookups for webhooks, in threads of their own, one lookup per host at a time.

`getaddrinfo` blocks, and a lookup that hangs (a DNS server that never answers) cannot be cancelled:
it keeps its thread for as long as the system resolver keeps trying, 10-30 s. In the event loop's
default thread pool (cpu_count + 4 threads, shared with everything else a node runs in threads) a
few receivers with such names would hold up every other receiver's lookups and every other user of
that pool. Here lookups run in a pool of their own with a thread for each webhook a node may have,
plus a few that registrations share (see `REGISTRATION_LOOKUPS`), and each host has at most one
delivery lookup in flight, which every delivery to that host shares: however many lookups hang, a
receiver on another host gets a thread.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from potboiler.server.webhook_policy import Resolver

T = TypeVar("T")

#: Lookups of deliveries in flight at once: one per host, so at most one per webhook a node may
#: have (see potboiler.server.webhooks.MAX_WEBHOOKS).
DELIVERY_LOOKUPS = 100
#: Lookups of registrations (the deny-private check) in flight at once, per node: held to this
#: many, so that registrations naming hosts whose lookups hang cannot take the deliveries' threads.
REGISTRATION_LOOKUPS = 16
THREADS = DELIVERY_LOOKUPS + REGISTRATION_LOOKUPS

_pool: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:  # threads start as lookups need them, and serve every event loop of the process
        _pool = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="webhook-dns")
    return _pool


async def in_lookup_thread(call: Callable[..., T], *args: object) -> T:
    """`call(*args)` in a lookup thread (for a check that may resolve a name)."""
    return await asyncio.get_running_loop().run_in_executor(_executor(), call, *args)


class Lookups:
    """Resolves hosts with `resolver` in lookup threads, sharing the lookup in flight for a host."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self._in_flight: dict[tuple[str, int], asyncio.Future[list[str]]] = {}

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses of `host` (an IP address is its own); OSError or UnicodeError as the
        resolver raises them."""
        try:
            return [str(ipaddress.ip_address(host))]
        except ValueError:
            pass
        key = (host, port)
        if (lookup := self._in_flight.get(key)) is None:
            lookup = asyncio.ensure_future(in_lookup_thread(self._resolver, host, port))
            self._in_flight[key] = lookup
            lookup.add_done_callback(lambda done: self._finished(key, done))
        # Shielded: a caller that gives up (its attempt timed out) leaves the lookup to the others.
        return await asyncio.shield(lookup)

    def _finished(self, key: tuple[str, int], lookup: asyncio.Future[list[str]]) -> None:
        self._in_flight.pop(key, None)
        if not lookup.cancelled():
            lookup.exception()  # retrieved: every caller may have given up on it
