"""§5 catch-up on three nodes: member 2 is stopped, N entries are written through member 0, member 2
is started again, and the time from its start until it holds everything gives entries/s.

What "holds everything" means for each: etcd member 2's own revision (Maintenance.Status on it)
reaches member 0's; JetStream server 3's (index 2) local replica of the stream, from its own
monitoring endpoint (/jsz), holds as many messages as the stream; Potboiler node 2's version vector
(GET /status on it) totals node 0's. Entries are written the way each system takes bulk writes:
etcd transactions of 100 puts (one raft entry each, etcd's limit is 128), JetStream publish_async in
windows of 1,000, Potboiler AppendEntries of 1,000.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

import uvloop

from benchmarks.common import Json, progress
from benchmarks.peers.etcd import EtcdClient, EtcdCluster
from benchmarks.peers.nats import STREAM, NatsCluster
from benchmarks.peers.potboiler import PotboilerCluster
from benchmarks.sections import ServerCpu, Settings
from benchmarks.sections.clients import PAYLOAD, potboiler_batch

DOWN = 2
ETCD_TXN = 100
NATS_WINDOW = 1000
POTBOILER_BATCH = 1000


def wait_caught_up(
    held: Callable[[], int], want: int, timeout: float
) -> tuple[float | None, float | None, int]:
    """Poll `held()` every 50 ms until it reaches `want`: (time it first answered, time it reached
    `want` or None on timeout, last value); errors (the server still starting) count as no answer."""
    deadline = time.monotonic() + timeout
    first: float | None = None
    last = 0
    while time.monotonic() < deadline:
        try:
            last = held()
        except Exception:  # not serving yet
            time.sleep(0.05)
            continue
        now = time.monotonic()
        first = first or now
        if last >= want:
            return first, now, last
        time.sleep(0.05)
    return first, None, last


def _figures(
    entries: int, write_s: float, spawned: float, first: float | None, done: float | None, cpu: ServerCpu
) -> Json:
    end = done or time.monotonic()
    return {
        "entries": entries,
        "write_s": round(write_s, 3),
        "write_entries_per_s": round(entries / write_s) if write_s else None,
        "complete": done is not None,
        "catch_up_s": round(end - spawned, 3),
        "startup_s": round(first - spawned, 3) if first else None,
        "entries_per_s": round(entries / (end - spawned)) if done else None,
        "server_cpu_us_per_entry": cpu.per_item_us(entries),
    }


def _run(
    write: Callable[[], int],
    restart: Callable[[], None],
    held: Callable[[], int],
    pids: Callable[[], list[int]],
    entries: int,
    settings: Settings,
) -> Json:
    """Write (member down), restart it, wait for it; `write()` returns the count member 2 must reach."""
    began = time.monotonic()
    want = write()
    write_s = time.monotonic() - began
    spawned = time.monotonic()
    restart()
    cpu = ServerCpu(pids())
    cpu.begin()
    first, done, last = wait_caught_up(held, want, settings.catch_up_timeout)
    cpu.end()
    out = _figures(entries, write_s, spawned, first, done, cpu)
    if done is None:
        out["held_at_timeout"] = last
        out["wanted"] = want
    return out


def etcd(cluster: EtcdCluster, settings: Settings) -> Json:
    n = settings.catch_up_entries
    cluster.stop_member(DOWN)

    async def write() -> int:
        client = EtcdClient(cluster.targets[0])
        counter = itertools.count()
        batches = iter(range(0, n, ETCD_TXN))
        try:

            async def worker() -> None:
                for start in batches:
                    size = min(ETCD_TXN, n - start)
                    items = [(f"bench/catchup/{next(counter)}".encode(), PAYLOAD) for _ in range(size)]
                    await client.put_many(items)

            await asyncio.gather(*(worker() for _ in range(8)))
            return await client.revision()
        finally:
            await client.close()

    async def revision() -> int:
        client = EtcdClient(cluster.targets[DOWN])
        try:
            return await client.revision(timeout=1.0)
        finally:
            await client.close()

    return _run(
        lambda: uvloop.run(write()),
        lambda: cluster.start_member(DOWN),
        lambda: uvloop.run(revision()),
        lambda: cluster.pids,
        n,
        settings,
    )


def jetstream(cluster: NatsCluster, settings: Settings) -> Json:
    import nats

    n = settings.catch_up_entries
    cluster.stop_server(DOWN)

    async def write() -> int:
        nc = await nats.connect(cluster.urls[0], connect_timeout=5)
        js = nc.jetstream(timeout=30, publish_async_max_pending=NATS_WINDOW * 2)
        try:
            deadline = time.monotonic() + 60
            while True:  # the stream may be electing a new leader if it was on the stopped server
                try:
                    await js.publish("bench.catchup", PAYLOAD, timeout=5)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    progress("  JetStream not taking writes yet (leader election?); retrying")
            for start in range(0, n - 1, NATS_WINDOW):
                size = min(NATS_WINDOW, n - 1 - start)
                futures = [await js.publish_async("bench.catchup", PAYLOAD) for _ in range(size)]
                await asyncio.gather(*futures)
            info = await js.stream_info(STREAM)
            return int(info.state.messages)
        finally:
            await nc.close()

    return _run(
        lambda: uvloop.run(write()),
        lambda: cluster.start_server(DOWN),
        lambda: cluster.stream_messages(DOWN),
        lambda: cluster.pids,
        n,
        settings,
    )


def potboiler(cluster: PotboilerCluster, settings: Settings) -> Json:
    n = settings.catch_up_entries
    cluster.stop_member(DOWN)

    async def write() -> int:
        done = 0
        async with potboiler_batch(cluster.targets[0], POTBOILER_BATCH) as append:

            async def worker() -> None:
                nonlocal done
                while done < n:
                    done += POTBOILER_BATCH
                    await append()

            await asyncio.gather(worker(), worker())
        return cluster.held(0)

    return _run(
        lambda: uvloop.run(write()),
        lambda: cluster.start_member(DOWN),
        lambda: cluster.held(DOWN),
        lambda: cluster.pids,
        n,
        settings,
    )
