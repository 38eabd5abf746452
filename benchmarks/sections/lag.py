"""§4 replication visibility lag on three nodes: writes at a steady rate (1,000/s) on node 0, each
carrying its send time; an observer process on node 2 time-stamps each one as it arrives there:
etcd a Watch on member 2, JetStream an ordered consumer of a client connected to server 3 (index 2),
Potboiler SubscribeEntries on node 2 (Potboiler written to both with unary AppendEntry and with an
AppendEntryStream, one entry per message). Lag = arrival - send (one machine, one clock). Writes that
node 0 acknowledged but node 2 never showed within a grace period are lost.

The writer sends each write at its scheduled time without waiting for earlier answers, so a slow
server shows as lag, not as a lower rate.
"""

from __future__ import annotations

import asyncio
import collections
import json
import multiprocessing
import multiprocessing.connection
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import grpc
import uvloop
from google.protobuf.struct_pb2 import Value

from benchmarks.append import GRPC_OPTIONS
from benchmarks.common import Json, frozen_heap, percentile
from benchmarks.peers.etcd import EtcdClient
from benchmarks.sections import ServerCpu, Settings, System
from potboiler.v1 import log_pb2, log_pb2_grpc

#: A write: (index, payload) -> acknowledged.
Write = Callable[[int, bytes], Awaitable[None]]
MP = multiprocessing.get_context("spawn")
WARM = -1


def payload(run: str, i: int, sent_ns: int) -> bytes:
    """Write `i` of run `run`, sent at `sent_ns` (wall clock, ns): what the observer reads back."""
    return json.dumps({"run": run, "i": i, "t": sent_ns}).encode()


# -- the observer (a process of its own) ------------------------------------------------------------


async def arrivals(kind: str, endpoint: str, run: str, after: int) -> AsyncIterator[tuple[int, int]]:
    """(index, send time in ns) of each write of run `run` as it arrives at the observed server."""
    if kind == "etcd":
        client = EtcdClient(endpoint)
        try:
            async for _key, value in client.watch_prefix(f"lag/{run}/".encode()):
                data = json.loads(value)
                yield int(data["i"]), int(data["t"])
        finally:
            await client.close()
    elif kind == "jetstream":
        import nats

        nc = await nats.connect(endpoint, connect_timeout=5)
        try:
            sub = await nc.jetstream().subscribe(f"bench.lag.{run}", ordered_consumer=True)
            async for message in sub.messages:
                data = json.loads(message.data)
                yield int(data["i"]), int(data["t"])
        finally:
            await nc.close()
    elif kind == "potboiler":
        async with grpc.aio.insecure_channel(endpoint, options=GRPC_OPTIONS) as channel:
            stub = log_pb2_grpc.LogServiceStub(channel)
            request = log_pb2.SubscribeEntriesRequest(after_position=after, max_batch=1000)
            async for response in stub.SubscribeEntries(request):
                for delivered in response.entries:
                    fields = delivered.entry.data.struct_value.fields
                    if fields["run"].string_value == run:
                        yield int(fields["i"].number_value), int(fields["t"].number_value)
    else:
        raise ValueError(f"unknown system {kind!r}")


def observer_main(
    kind: str, endpoint: str, run: str, after: int, conn: multiprocessing.connection.Connection
) -> None:
    """The observer process. Sends ("ready",) once a warm-up write arrived; then receives ("finish",
    acked indices, grace seconds), waits until all of them arrived or the grace is over, and sends
    ("result", {index: (send_ns, first arrival_ns)}, how many arrivals were repeats)."""
    uvloop.run(_observe(kind, endpoint, run, after, conn))


async def _observe(
    kind: str, endpoint: str, run: str, after: int, conn: multiprocessing.connection.Connection
) -> None:
    seen: dict[int, tuple[int, int]] = {}
    duplicates = 0
    ready, complete = asyncio.Event(), asyncio.Event()
    expected: set[int] = set()
    finishing = False

    async def read() -> None:
        nonlocal duplicates
        async for i, sent in arrivals(kind, endpoint, run, after):
            now = time.time_ns()
            if i == WARM:
                ready.set()
                continue
            if i in seen:
                duplicates += 1
                continue
            seen[i] = (sent, now)
            if finishing and expected.issubset(seen):
                complete.set()

    reader = asyncio.create_task(read())
    try:
        await ready.wait()
        with frozen_heap():
            conn.send(("ready",))
            _, acked, grace = await asyncio.get_running_loop().run_in_executor(None, conn.recv)
            expected.update(acked)
            finishing = True
            if not expected.issubset(seen):
                with suppress(TimeoutError):
                    await asyncio.wait_for(complete.wait(), grace)
        conn.send(("result", seen, duplicates))
    finally:
        reader.cancel()
        with suppress(asyncio.CancelledError, grpc.RpcError, Exception):
            await reader


# -- the writer -------------------------------------------------------------------------------------


@dataclass
class Paced:
    sent: int = 0
    errors: int = 0
    first_error: str | None = None
    acked: dict[int, tuple[int, int]] = field(default_factory=dict)  # i -> (send_ns, ack_ns)
    seconds: float = 0.0


async def paced(write: Write, run: str, rate: int, seconds: float, warm: bool = False) -> Paced:
    """`rate` writes a second for `seconds`, each sent on schedule (not waiting for earlier answers)."""
    result = Paced()
    loop = asyncio.get_running_loop()
    tasks = []

    async def one(i: int, sent: int) -> None:
        data = payload(run, WARM if warm else i, sent)
        try:
            await write(i, data)
        except Exception as error:  # counted: the benchmark reports errors, it does not stop on them
            result.errors += 1
            result.first_error = result.first_error or repr(error)[:300]
            return
        result.acked[i] = (sent, time.time_ns())

    start = loop.time()
    start_ns = time.time_ns()
    for i in range(int(rate * seconds)):
        if (wait := start + i / rate - loop.time()) > 0:
            await asyncio.sleep(wait)
        # Stamped with when it was due, not when the writer got to it: a writer that falls behind
        # must not leave its own delay out of the lag (coordinated omission).
        tasks.append(asyncio.create_task(one(i, start_ns + i * 1_000_000_000 // rate)))
        result.sent += 1
    result.seconds = loop.time() - start
    await asyncio.gather(*tasks)
    return result


def lags_by_second(seen: Iterable[tuple[int, int]], first: int) -> dict[int, list[int]]:
    """The lags (ns) of the writes sent in each second after `first` (ns), from (sent_ns,
    arrived_ns) pairs, by second."""
    seconds: dict[int, list[int]] = {}
    for sent, arrived in seen:
        seconds.setdefault((sent - first) // 1_000_000_000, []).append(arrived - sent)
    return dict(sorted(seconds.items()))


def lag_p99_by_second(seen: list[tuple[int, int]]) -> list[float]:
    """The p99 lag (ms) of the writes sent in each second of a run, from (sent_ns, arrived_ns)."""
    if not seen:
        return []
    seconds = lags_by_second(seen, min(sent for sent, _ in seen))
    return [round(percentile(lags, 99) / 1e6, 1) for lags in seconds.values()]


def summary_ms(values_ns: list[int]) -> Json:
    ordered = sorted(v / 1e6 for v in values_ns)
    if not ordered:
        return {"count": 0}
    return {
        "count": len(ordered),
        "p50": round(percentile(ordered, 50), 3),
        "p99": round(percentile(ordered, 99), 3),
        "max": round(ordered[-1], 3),
    }


def measure(
    kind: str,
    writer: Callable[[str], Any],
    observe_at: str,
    after: int,
    settings: Settings,
    system: System,
) -> Json:
    """One lag run. `writer(run)` is an async context manager yielding a `Write` on node 0;
    the observer process watches `observe_at` (node 2) from position `after` (Potboiler's)."""
    run = uuid.uuid4().hex[:12]
    parent, child = MP.Pipe()
    observer = MP.Process(target=observer_main, args=(kind, observe_at, run, after, child), daemon=True)
    observer.start()
    try:
        return uvloop.run(_measure(writer, run, parent, observer, settings, system))
    finally:
        if observer.is_alive():
            observer.terminate()
        observer.join(10)


async def _measure(
    writer: Callable[[str], Any],
    run: str,
    parent: multiprocessing.connection.Connection,
    observer: multiprocessing.process.BaseProcess,
    settings: Settings,
    system: System,
) -> Json:
    async with writer(run) as write:
        deadline = time.monotonic() + 60
        while not parent.poll(0):  # warm up until the observer sees the run's writes
            if time.monotonic() > deadline or not observer.is_alive():
                raise RuntimeError("the observer on node 2 did not see the warm-up writes")
            await paced(write, run, settings.lag_rate, 0.2, warm=True)
        assert parent.recv() == ("ready",)
        cpu = ServerCpu(system.pids)
        with frozen_heap():
            cpu.begin()
            result = await paced(write, run, settings.lag_rate, settings.lag_seconds)
            cpu.end()
    parent.send(("finish", sorted(result.acked), settings.lag_grace))
    if not await asyncio.get_running_loop().run_in_executor(None, parent.poll, settings.lag_grace + 30):
        raise RuntimeError("the observer did not report")
    kind, seen, duplicates = parent.recv()
    assert kind == "result"
    lags = [arrived - sent for sent, arrived in seen.values()]
    lag = summary_ms(lags)
    figures: Json = {
        "rate_per_s": settings.lag_rate,
        "achieved_rate_per_s": round(result.sent / result.seconds, 1) if result.seconds else None,
        "sent": result.sent,
        "acked": len(result.acked),
        "errors": result.errors,
        "lost": sum(1 for i in result.acked if i not in seen),
        "duplicates": duplicates,
        "lag_p50_ms": lag.get("p50"),
        "lag_p99_ms": lag.get("p99"),
        "lag_max_ms": lag.get("max"),
        "ack_ms_on_node0": summary_ms([ack - sent for sent, ack in result.acked.values()]),
        # A tail that comes from a few seconds (a stall) shows here, one that is even (the
        # per-write path) does not.
        "lag_p99_ms_by_second": lag_p99_by_second(list(seen.values())),
        "server_cpu_us_per_write": cpu.per_item_us(result.sent),
    }
    if result.first_error:
        figures["first_error"] = result.first_error
    return figures


def entry_value(data: bytes) -> Value:
    """Potboiler entry data from a JSON payload."""
    value = Value()
    value.struct_value.update(json.loads(data))
    return value


@asynccontextmanager
async def etcd_writer(target: str, run: str) -> AsyncIterator[Write]:
    """Puts on one etcd member, key lag/<run>/<i>."""
    client = EtcdClient(target)

    async def write(i: int, data: bytes) -> None:
        await client.put(f"lag/{run}/{i}".encode(), data)

    try:
        yield write
    finally:
        await client.close()


@asynccontextmanager
async def jetstream_writer(url: str, run: str) -> AsyncIterator[Write]:
    """JetStream publishes (acknowledged) through one server, subject bench.lag.<run>."""
    import nats

    nc = await nats.connect(url, connect_timeout=5)
    js = nc.jetstream(timeout=10)

    async def write(i: int, data: bytes) -> None:
        await js.publish(f"bench.lag.{run}", data)

    try:
        yield write
    finally:
        await nc.close()


@asynccontextmanager
async def potboiler_writer(target: str, run: str) -> AsyncIterator[Write]:
    """AppendEntry on one node's gRPC port."""
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        stub = log_pb2_grpc.LogServiceStub(channel)

        async def write(i: int, data: bytes) -> None:
            await stub.AppendEntry(log_pb2.AppendEntryRequest(data=entry_value(data)), timeout=10.0)

        yield write


@asynccontextmanager
async def potboiler_stream_writer(target: str, run: str) -> AsyncIterator[Write]:
    """One AppendEntryStream on one node's gRPC port, one entry per message: the API for a client
    writing at a steady rate. Acks come back in order, so each write waits for the next in line."""
    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        call = log_pb2_grpc.LogServiceStub(channel).AppendEntryStream()
        waiting: collections.deque[asyncio.Future[None]] = collections.deque()

        async def read_acks() -> None:
            try:
                async for _ in call:
                    waiting.popleft().set_result(None)
            finally:  # ended or failed: the writes still waiting are counted as errors, not awaited forever
                for future in waiting:
                    future.set_exception(RuntimeError("the append stream ended"))

        reader = asyncio.create_task(read_acks())
        writing = asyncio.Lock()  # one write at a time on a call; the queue of futures keeps their order

        async def write(i: int, data: bytes) -> None:
            request = log_pb2.AppendEntryStreamRequest(
                entries=[log_pb2.AppendEntryRequest(data=entry_value(data))]
            )
            future = asyncio.get_running_loop().create_future()
            async with writing:
                waiting.append(future)
                await call.write(request)
            await future

        try:
            yield write
        finally:
            await call.done_writing()
            with suppress(grpc.RpcError):
                await reader
