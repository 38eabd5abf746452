"""Replication on a local 3-node cluster: visibility lag, catch-up of a new node, messages per entry.

    .venv/bin/python -m benchmarks.replication            # 1M entries: 5-7 minutes on a busy 2-core machine
    .venv/bin/python -m benchmarks.replication --quick    # a smoke run: 2 s of load, 100,000 entries
    .venv/bin/python -m benchmarks.replication --profile /tmp/prof   # also py-spy the nodes

Starts its own cluster (three `potboiler node` processes with their Envoys, each peered with the
others) in a temporary directory on free ports, and stops everything on exit, errors, Ctrl-C and
SIGTERM. Then:

(a) visibility lag: a subscriber process opens SubscribeEntries on node 2 (and is seen to receive a
    warm-up entry) before the load starts; this process then appends on node 0 at a steady 1,000
    entries/s for 10 s over gRPC (node 0's direct port B+10), each entry's data carrying the time it
    was due to be sent, `{"t": <ns>}` (so a writer that falls behind its schedule counts its own
    delay too). Lag = time the subscriber received the entry - that time (same machine, same clock). Entries acknowledged by node 0 but never seen on node 2 within a grace
    period are counted as lost, and arrivals of an entry seen already as duplicates (an entry's lag
    is that of its first arrival). Measured twice, with two writers: unary AppendEntry per entry
    ("unary_writer"), then one entry per message on one AppendEntryStream ("stream_writer"), the API
    for a client writing at a steady rate. A unary call costs node 0 (and the client) about half as
    much CPU again as a stream message, which on 2 cores shared by 3 nodes, the writer and the
    subscriber is what decides the lag's tail. The writer and the subscriber keep their own full
    garbage collections out of the load (`frozen_heap`): one took 12-25 ms, which showed as lag.
(c) during (a): node 0's Prometheus counters (port B+5) before and after, per peer: messages and
    entries sent and received, divided by the entries appended (for each writer); and each node's
    garbage collector passes (`gc`: how many and how long per generation, each a stop of the node).
(b) catch-up: 1,000,000 entries are appended to the cluster (AppendEntries of 1,000, spread round-robin
    over the three nodes); the time until all three hold everything (GET /status vectors) is the
    convergence time. Then a fresh 4th node is started with node 0 as its only peer, and the time
    until its vector totals everything gives the catch-up rate. If the three have not converged within
    `converge_timeout` after the writes, that is reported and the new node catches up on what node 0
    holds; if the earlier phases used up the time budget, the catch-up is cut short (after at least a
    minute) and its rate is measured on what arrived.

Prints one JSON object (progress goes to stderr) with every figure, under "targets" each target
figure beside its goal with `meets_target`, and `meets_targets` for all of them. CPU use of each node
(with its Envoy) during each phase is included; on this 2-core machine the nodes compete for the CPU
with each other (and with anything else running, reported as `other_cpu_percent`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import httpx
import uvloop
from google.protobuf.struct_pb2 import Struct, Value

from benchmarks.common import (
    cpu_seconds,
    frozen_heap,
    machine_cpu_seconds,
    percentile,
    process_tree,
    progress,
    sigterm_as_interrupt,
)
from benchmarks.sections.lag import WARM, lags_by_second, paced, potboiler_stream_writer, potboiler_writer
from potboiler.server.ports import NODE_SPACING
from potboiler.server.processes import NodeProcess, find_base_port
from potboiler.v1 import log_pb2, log_pb2_grpc

Json = dict[str, Any]

#: The two ways (a) writes on node 0: unary AppendEntry, and one entry per AppendEntryStream message.
LAG_WRITERS = {"unary": potboiler_writer, "stream": potboiler_stream_writer}
#: Targets from the issue.
TARGET_P99_LAG_MS = 10.0
TARGET_CATCH_UP_PER_S = 100_000.0
TARGET_MESSAGES_PER_ENTRY_PER_PEER = 1.0
#: Entries per AppendEntries call when loading the cluster, and calls in flight per node.
LOAD_BATCH = 1_000
LOAD_IN_FLIGHT = 2
#: The data of every catch-up entry.
LOAD_DATA = {"kind": "bench", "n": 1, "text": "a small JSON event"}
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
_METRIC_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?:peer|generation)="([^"]*)"\})?\s+(\S+)$')


@dataclass(frozen=True)
class Settings:
    """How long and how much each phase runs."""

    rate: int
    seconds: float
    grace: float
    entries: int
    converge_timeout: float
    catch_up_timeout: float
    #: Seconds the whole run should take at most: the catch-up is cut short (and its rate measured on
    #: what arrived) if the earlier phases used the time up, but is given at least `min_catch_up`.
    budget: float
    min_catch_up: float


FULL = Settings(
    rate=1_000,
    seconds=10.0,
    grace=10.0,
    entries=1_000_000,
    converge_timeout=120.0,
    catch_up_timeout=120.0,
    budget=300.0,
    min_catch_up=60.0,
)
QUICK = Settings(
    rate=1_000,
    seconds=2.0,
    grace=5.0,
    entries=100_000,
    converge_timeout=60.0,
    catch_up_timeout=60.0,
    budget=150.0,
    min_catch_up=20.0,
)


# -- output and figures ----------------------------------------------------------------------------


def summary_ms(samples_ns: Sequence[int]) -> Json:
    """count, min, p50, p90, p99, max and mean of nanosecond samples, in milliseconds."""
    if not samples_ns:
        return {"count": 0}
    ordered = sorted(s / 1e6 for s in samples_ns)
    return {
        "count": len(ordered),
        "min": round(ordered[0], 3),
        "p50": round(percentile(ordered, 50), 3),
        "p90": round(percentile(ordered, 90), 3),
        "p99": round(percentile(ordered, 99), 3),
        "max": round(ordered[-1], 3),
        "mean": round(sum(ordered) / len(ordered), 3),
    }


def target(value: float | None, goal: float, kind: str) -> Json:
    """A figure beside its target; kind is "<=", "<", ">=" or "==". A missing value misses it."""
    meets = False
    if value is not None and not math.isnan(value):
        meets = {
            "<=": value <= goal,
            "<": value < goal,
            ">=": value >= goal,
            "==": value == goal,
        }[kind]
    return {"value": value, "target": f"{kind} {goal:g}", "meets_target": meets}


# -- processes and CPU -----------------------------------------------------------------------------


class CpuWindow:
    """CPU use of named process trees (each node with its Envoy, the subscriber) and of this client,
    and of the rest of the machine, between `begin()` and `end()`, in percent of one core. The client
    counts this process alone: the nodes are among its children."""

    def __init__(self, pids: dict[str, int], client: bool = False) -> None:
        self.pids = dict(pids)
        self.client = client
        self._start: dict[str, dict[int, float]] = {}
        self._machine = 0.0
        self._at = 0.0
        self.figures: Json = {}
        self.used: dict[str, float] = {}

    def _now(self) -> dict[str, dict[int, float]]:
        """CPU seconds so far of each process of each tree, by name (and of this process, as "client")."""
        now = {
            name: {p: cpu_seconds(p) for p in (process_tree(pid) if pid > 0 else ())}  # 0: no process
            for name, pid in self.pids.items()
        }
        if self.client:
            now["client"] = {os.getpid(): cpu_seconds(os.getpid())}
        return now

    def begin(self) -> CpuWindow:
        self._start = self._now()
        self._machine = machine_cpu_seconds()
        self._at = time.monotonic()
        return self

    def end(self) -> Json:
        elapsed = time.monotonic() - self._at
        # A process that started in the window (a new node's Envoy) counts from 0.
        used = {
            name: sum(seconds - self._start[name].get(p, 0.0) for p, seconds in tree.items())
            for name, tree in self._now().items()
        }
        self.used = used
        machine = machine_cpu_seconds() - self._machine
        self.figures = {name: round(100 * u / elapsed, 1) for name, u in used.items()}
        self.figures["other_cpu_percent"] = round(100 * max(0.0, machine - sum(used.values())) / elapsed, 1)
        self.figures["cores"] = os.cpu_count()
        return self.figures

    def ms_per(self, items: int) -> Json:
        """CPU milliseconds each process spent per item (e.g. per entry) over the window: the cost,
        which, unlike latency, other load on the machine barely changes."""
        return {name: round(1000 * u / items, 4) if items else math.nan for name, u in self.used.items()}


class Cluster:
    """Nodes in one temporary directory on free ports; all stopped (and the directory removed) on exit,
    also on errors, Ctrl-C and SIGTERM. Other child processes registered with `adopt` are stopped too."""

    def __init__(self, slots: int) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="potboiler-bench-replication-"))
        self.base = find_base_port(count=slots)
        self.nodes: list[NodeProcess] = []
        self.children: list[subprocess.Popen[bytes] | multiprocessing.process.BaseProcess] = []
        self._old_sigterm: Any = None

    def __enter__(self) -> Cluster:
        self._old_sigterm = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if exc is not None:
                self._show_logs()
            for child in self.children:
                with suppress(Exception):
                    child.terminate()
            for node in self.nodes:
                try:
                    node.stop(timeout=10.0)
                except Exception:
                    node.kill()
            for child in self.children:
                with suppress(Exception):
                    if isinstance(child, subprocess.Popen):
                        child.wait(5)
                    else:
                        child.join(5)
            shutil.rmtree(self.root, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, self._old_sigterm)

    def _show_logs(self, lines: int = 15) -> None:
        """On an error, the end of each node's log (the directory is removed afterwards)."""
        for node in self.nodes:
            with suppress(OSError):
                tail = node.log_file.read_text(errors="replace").splitlines()[-lines:]
                progress(f"end of {node.log_file.name} ({node.url}):\n" + "\n".join(tail))

    def url_of(self, slot: int) -> str:
        return f"http://127.0.0.1:{self.base + NODE_SPACING * slot}"

    def add_node(self, slot: int, peers: Sequence[str], wait: bool = True) -> NodeProcess:
        """Start the node of slot `slot` (base port B + NODE_SPACING * slot) with a fresh data directory."""
        node = NodeProcess(
            self.root / f"node{slot}",
            self.base + NODE_SPACING * slot,
            peers=peers,
            extra_args=["--log-level", "WARNING"],
        )
        self.nodes.append(node)
        node.start(wait=wait)
        return node


def pid_of(node: NodeProcess) -> int:
    assert node.process is not None, "the node is not started"
    return node.process.pid


# -- REST status and metrics -----------------------------------------------------------------------


def vector_total(status: Json) -> int:
    """How many entries a node holds, from its GET /status answer (uint64 fields are JSON strings)."""
    return sum(int(c["seq"]) for c in status.get("vector", []))


async def get_status(client: httpx.AsyncClient, node: NodeProcess, timeout: float = 15.0) -> Json:
    response = await client.get(f"{node.url}/status", timeout=timeout)
    response.raise_for_status()
    status: Json = response.json()
    return status


async def totals(client: httpx.AsyncClient, nodes: Sequence[NodeProcess]) -> list[int]:
    """Each node's vector total."""
    return [vector_total(s) for s in await asyncio.gather(*(get_status(client, n) for n in nodes))]


async def scrape(client: httpx.AsyncClient, node: NodeProcess) -> dict[tuple[str, str], float]:
    """A node's Prometheus samples as {(name, its peer or generation label or ""): value}."""
    response = await client.get(node.port_url(node.ports.metrics) + "/metrics", timeout=15.0)
    response.raise_for_status()
    out: dict[tuple[str, str], float] = {}
    for line in response.text.splitlines():
        if line.startswith("#"):
            continue
        m = _METRIC_LINE.match(line.strip())
        if m:
            out[(m.group(1), m.group(2) or "")] = float(m.group(3))
    return out


def delta(
    after: dict[tuple[str, str], float], before: dict[tuple[str, str], float], name: str, peer: str = ""
) -> int:
    return int(after.get((name, peer), 0.0) - before.get((name, peer), 0.0))


async def wait_totals(
    client: httpx.AsyncClient, nodes: Sequence[NodeProcess], want: int, timeout: float, interval: float = 0.1
) -> float | None:
    """Poll until every node's vector totals at least `want`; the monotonic time it was seen, or None
    on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all(t >= want for t in await totals(client, nodes)):
                return time.monotonic()
        except httpx.HTTPError:  # a node too busy to answer in time: ask again
            pass
        await asyncio.sleep(interval)
    return None


# -- the subscriber process ------------------------------------------------------------------------


def subscriber_main(target: str, after: int, run: str, conn: multiprocessing.connection.Connection) -> None:
    """Runs in its own process: subscribe to a node and time-stamp every entry of run `run` on arrival.

    Protocol on `conn`: sends ("ready",) once a warm-up entry of the run has arrived; receives
    ("finish", acked indices, grace seconds), keeps reading until all of them arrived or the grace
    period is over, then sends ("result", {index: (send_ns, observed_ns, owner_wall_ms)}, duplicates):
    each entry as it first arrived, and how many arrivals were repeats."""
    uvloop.run(_subscribe(target, after, run, conn))


async def _subscribe(target: str, after: int, run: str, conn: multiprocessing.connection.Connection) -> None:
    seen: dict[int, tuple[int, int, int]] = {}
    duplicates = 0
    ready = asyncio.Event()
    complete = asyncio.Event()
    expected: set[int] = set()
    finishing = False

    async def read(stub: log_pb2_grpc.LogServiceAsyncStub) -> None:
        nonlocal finishing, duplicates
        stream = stub.SubscribeEntries(log_pb2.SubscribeEntriesRequest(after_position=after, max_batch=1000))
        async for response in stream:
            now = time.time_ns()
            for delivered in response.entries:
                entry = delivered.entry
                fields = entry.data.struct_value.fields
                if fields["run"].string_value != run:
                    continue
                i = int(fields["i"].number_value)
                if i == WARM:
                    ready.set()
                    continue
                if i in seen:  # a repeat: the first arrival stays the entry's
                    duplicates += 1
                    continue
                seen[i] = (int(fields["t"].number_value), now, entry.when.wall_ms)
            if finishing and expected.issubset(seen):
                complete.set()

    async with grpc.aio.insecure_channel(target, options=GRPC_OPTIONS) as channel:
        reader = asyncio.create_task(read(log_pb2_grpc.LogServiceStub(channel)))
        try:
            await ready.wait()
            with frozen_heap():
                conn.send(("ready",))
                loop = asyncio.get_running_loop()
                message = await loop.run_in_executor(None, conn.recv)
                _, acked, grace = message
                expected.update(acked)
                finishing = True
                if not expected.issubset(seen):
                    with suppress(TimeoutError):
                        await asyncio.wait_for(complete.wait(), grace)
            conn.send(("result", dict(seen), duplicates))
        finally:
            reader.cancel()
            with suppress(asyncio.CancelledError, grpc.RpcError):
                await reader


# -- (a) visibility lag and (c) messages -----------------------------------------------------------


def entry_data(fields: dict[str, Any]) -> Value:
    value = Value()
    struct = Struct()
    struct.update(fields)
    value.struct_value.CopyFrom(struct)
    return value


async def measure_lag(
    cluster: Cluster, settings: Settings, profile: Path | None, writer: str
) -> tuple[Json, Json]:
    """(a) visibility lag from node 0 to node 2 with writes by `writer` ("unary" or "stream"), and (c)
    node 0's messages per entry per peer."""
    node0, node1, node2 = cluster.nodes[:3]
    run = uuid.uuid4().hex[:12]
    async with httpx.AsyncClient() as client:
        start_position = int((await get_status(client, node2)).get("delivered_position", 0))
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        subscriber = ctx.Process(
            target=subscriber_main,
            args=(node2.grpc_target, start_position, run, child),
            name="subscriber",
            daemon=True,
        )
        subscriber.start()
        cluster.children.append(subscriber)
        async with LAG_WRITERS[writer](node0.grpc_target, run) as write:
            # Warm up (channels, replication streams) until the subscriber sees the run's entries.
            deadline = time.monotonic() + 30
            while not parent.poll(0):
                if time.monotonic() > deadline or not subscriber.is_alive():
                    raise RuntimeError("the subscriber on node 2 did not see the warm-up entries")
                await paced(write, run, 1000, 0.2, warm=True)
            assert parent.recv() == ("ready",)
            progress(
                f"(a) subscriber ready on node 2; appending {settings.rate}/s for {settings.seconds:g}s on node 0"
            )
            metrics_before = await scrape(client, node0)
            peer_metrics_before = [await scrape(client, n) for n in (node1, node2)]
            with frozen_heap():
                cpu = CpuWindow(
                    {
                        "node0": pid_of(node0),
                        "node1": pid_of(node1),
                        "node2": pid_of(node2),
                        "subscriber": subscriber.pid or 0,
                    },
                    client=True,
                ).begin()
                spies = start_profiles(
                    cluster, profile, f"lag-{writer}", {"node0": node0, "node2": node2}, settings.seconds
                )
                result = await paced(write, run, settings.rate, settings.seconds)
            cpu_figures = cpu.end()
            stop_profiles(spies)
        progress(
            f"(a) sent {result.sent}, acked {len(result.acked)}, errors {result.errors}; waiting for node 2"
        )
        parent.send(("finish", sorted(result.acked), settings.grace))
        if not parent.poll(settings.grace + 30):
            raise RuntimeError("the subscriber did not report")
        kind, seen, duplicates = parent.recv()
        assert kind == "result"
        subscriber.join(10)
        # Every acked entry is on node 2 now (or lost): the replication traffic for them is done.
        await asyncio.sleep(0.2)
        metrics_after = await scrape(client, node0)
        peer_metrics_after = [await scrape(client, n) for n in (node1, node2)]

    lags = [observed - send for send, observed, _ in seen.values()]
    acks = [ack - send for send, ack in result.acked.values()]
    ack_to_observe = [seen[i][1] - ack for i, (_, ack) in result.acked.items() if i in seen]
    to_stamp = [seen[i][2] * 1_000_000 - send for i, (send, _) in result.acked.items() if i in seen]
    lost = sum(1 for i in result.acked if i not in seen)
    # Lag by second of the load: a lag that grows second by second is a backlog (the cluster cannot keep
    # up with the rate), a flat one is the per-entry path.
    first_send = min((send for send, _ in result.acked.values()), default=0)
    by_second = lags_by_second(((send, observed) for send, observed, _ in seen.values()), first_send)
    lag_by_second = [
        {"second": sec, "p50": summary_ms(v)["p50"], "p99": summary_ms(v)["p99"]}
        for sec, v in by_second.items()
    ]
    lag_fig: Json = {
        "rate_per_s": settings.rate,
        "seconds": round(result.seconds, 3),
        "sent": result.sent,
        "acked": len(result.acked),
        "errors": result.errors,
        "observed_on_node2": sum(1 for i in result.acked if i in seen),
        "lost": lost,
        "duplicates": duplicates,
        "grace_s": settings.grace,
        "lag_ms": summary_ms(lags),
        "lag_ms_by_second": lag_by_second,
        "breakdown_ms": {
            "append_ack_on_node0": summary_ms(acks),
            "ack_on_node0_to_seen_on_node2": summary_ms(ack_to_observe),
            "send_to_owner_stamp_ms_resolution": summary_ms(to_stamp),
        },
        "achieved_rate_per_s": round(result.sent / result.seconds, 1) if result.seconds else math.nan,
        "gc": {
            f"node{slot}": collector_passes(before, after)
            for slot, before, after in zip(
                (0, 1, 2),
                [metrics_before, *peer_metrics_before],
                [metrics_after, *peer_metrics_after],
                strict=True,
            )
        },
        "cpu_percent": cpu_figures,
        "cpu_ms_per_entry": cpu.ms_per(result.sent),
    }
    if result.errors:
        lag_fig["errored_but_seen_on_node2"] = sum(1 for i in seen if i not in result.acked)
    if result.first_error:
        lag_fig["first_error"] = result.first_error

    appended = delta(metrics_after, metrics_before, "potboiler_appends_total")
    per_peer: Json = {}
    for slot, before, after in zip((1, 2), peer_metrics_before, peer_metrics_after, strict=True):
        name = f"node{slot}"
        # The peer label is the peer's root URL as node 0 knows it.
        peer_url = cluster.url_of(slot)
        counts = {
            key: delta(metrics_after, metrics_before, f"potboiler_replication{key}_total", peer_url)
            for key in ("_messages_out", "_messages_in")
        }
        entries_out = delta(metrics_after, metrics_before, "potboiler_replicated_entries_out_total", peer_url)
        entries_in = delta(metrics_after, metrics_before, "potboiler_replicated_entries_in_total", peer_url)
        # What the peer sent to / got from the third node, to see forwarding and echoes.
        other_url = cluster.url_of(3 - slot)
        per_peer[name] = {
            "url": peer_url,
            "messages_out": counts["_messages_out"],
            "messages_in": counts["_messages_in"],
            "entries_out": entries_out,
            "entries_in": entries_in,
            "messages_out_per_entry": ratio(counts["_messages_out"], appended),
            "messages_in_per_entry": ratio(counts["_messages_in"], appended),
            "entries_out_per_entry": ratio(entries_out, appended),
            "entries_in_per_entry": ratio(entries_in, appended),
            "entries_per_message_out": ratio(entries_out, counts["_messages_out"]),
            "peer_to_third_node": {
                "messages_out": delta(after, before, "potboiler_replication_messages_out_total", other_url),
                "entries_out": delta(after, before, "potboiler_replicated_entries_out_total", other_url),
                "entries_in": delta(after, before, "potboiler_replicated_entries_in_total", other_url),
            },
        }
    worst = max((p["messages_out_per_entry"] for p in per_peer.values()), default=math.nan)
    # The whole cluster: every entry needs 2 transfers (node 0 to each peer); more are echoes or duplicates.
    cluster_entries = cluster_messages = 0
    for before, after in zip(
        [metrics_before, *peer_metrics_before], [metrics_after, *peer_metrics_after], strict=True
    ):
        cluster_entries += sum_delta(after, before, "potboiler_replicated_entries_out_total")
        cluster_messages += sum_delta(after, before, "potboiler_replication_messages_out_total")
    net_fig: Json = {
        "appended_on_node0": appended,
        "per_peer": per_peer,
        "messages_out_per_entry_per_peer": worst,
        "cluster_entries_sent_per_entry": ratio(cluster_entries, appended),
        "cluster_entries_sent_per_entry_minimum": 2,
        "cluster_messages_sent_per_entry": ratio(cluster_messages, appended),
        "note": (
            "messages_out counts every replication message node 0 sent to the peer: entry batches AND the "
            "acks node 0 sends for each batch the peer sends it (plus hellos and peer lists). Node 0 acks "
            "every batch it receives, and the peer acks every batch node 0 sends, so on one link "
            "messages_out(0->P) = batches(0->P) + batches(P->0) = messages_in(P->0); the metrics cannot "
            "split batches from acks further. entries_in > 0 means the peer sends node 0 entries it "
            "already has (its own, echoed back, or ones it also got from the third node)."
        ),
    }
    return lag_fig, net_fig


def collector_passes(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> Json:
    """A node's garbage collector passes between two scrapes, per generation: how many and their time
    in all (each stops the node), and the longest since the node started."""
    return {
        f"generation{g}": {
            "passes": delta(after, before, "potboiler_gc_passes_total", str(g)),
            "ms": round(
                1000
                * (
                    after.get(("potboiler_gc_pause_seconds_total", str(g)), 0.0)
                    - before.get(("potboiler_gc_pause_seconds_total", str(g)), 0.0)
                ),
                2,
            ),
            "longest_ms_since_start": round(
                1000 * after.get(("potboiler_gc_longest_pause_seconds", str(g)), 0.0), 2
            ),
        }
        for g in range(3)
    }


def sum_delta(after: dict[tuple[str, str], float], before: dict[tuple[str, str], float], name: str) -> int:
    """A counter's increase summed over all its peer labels."""
    return int(
        sum(v for (n, _), v in after.items() if n == name)
        - sum(v for (n, _), v in before.items() if n == name)
    )


def ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else math.nan


# -- (b) catch-up ----------------------------------------------------------------------------------


async def load_cluster(nodes: Sequence[NodeProcess], entries: int) -> tuple[float, float]:
    """Append `entries` entries in AppendEntries calls of LOAD_BATCH, round-robin over the nodes with
    LOAD_IN_FLIGHT calls in flight per node. Returns (start, end) monotonic times."""
    batches = math.ceil(entries / LOAD_BATCH)
    request = log_pb2.AppendEntriesRequest(
        entries=[log_pb2.AppendEntryRequest(data=entry_data(LOAD_DATA)) for _ in range(LOAD_BATCH)]
    )
    last = entries - (batches - 1) * LOAD_BATCH
    last_request = log_pb2.AppendEntriesRequest(entries=list(request.entries)[:last])
    per_node = [list(range(i, batches, len(nodes))) for i in range(len(nodes))]
    channels = [grpc.aio.insecure_channel(n.grpc_target, options=GRPC_OPTIONS) for n in nodes]
    try:

        async def worker(stub: log_pb2_grpc.LogServiceAsyncStub, todo: list[int]) -> None:
            while todo:
                b = todo.pop(0)
                await stub.AppendEntries(last_request if b == batches - 1 else request, timeout=60.0)

        start = time.monotonic()
        await asyncio.gather(
            *(
                worker(log_pb2_grpc.LogServiceStub(ch), todo)
                for ch, todo in zip(channels, per_node, strict=True)
                for _ in range(LOAD_IN_FLIGHT)
            )
        )
        return start, time.monotonic()
    finally:
        for ch in channels:
            await ch.close()


async def measure_catch_up(cluster: Cluster, settings: Settings, profile: Path | None, began: float) -> Json:
    nodes = cluster.nodes[:3]
    pids = {f"node{i}": pid_of(n) for i, n in enumerate(nodes)}
    async with httpx.AsyncClient() as client:
        base = max(await totals(client, nodes))
        if await wait_totals(client, nodes, base, 30) is None:
            raise RuntimeError("the cluster did not converge before the load")
        want = base + settings.entries
        progress(
            f"(b) appending {settings.entries:,} entries over 3 nodes; the cluster holds {base:,} already"
        )
        cpu = CpuWindow(pids, client=True).begin()
        seen: list[tuple[float, list[int]]] = []  # (monotonic time, each node's total)

        async def watch() -> float:
            """Poll until all three hold everything; the time that was seen."""
            while True:
                with suppress(httpx.HTTPError):  # a node too busy to answer in time: ask again
                    counts = await totals(client, nodes)
                    seen.append((time.monotonic(), counts))
                    if min(counts) >= want:
                        return seen[-1][0]
                await asyncio.sleep(0.25)

        watcher = asyncio.create_task(watch())
        start, end = await load_cluster(nodes, settings.entries)
        at_end = next((c for t, c in reversed(seen) if t <= end), [0, 0, 0])
        progress(
            f"(b) appended in {end - start:.1f}s (the nodes held {at_end} then); "
            f"waiting up to {settings.converge_timeout:g}s for all three to hold {want:,}"
        )
        done: float | None = None
        try:
            done = await asyncio.wait_for(watcher, settings.converge_timeout)
        except TimeoutError:
            progress(f"(b) the 3 nodes did not converge within {settings.converge_timeout:g}s: {seen[-1][1]}")
        cpu_write = cpu.end()
        write: Json = {
            "entries": settings.entries,
            "batch": LOAD_BATCH,
            "calls_in_flight_per_node": LOAD_IN_FLIGHT,
            "write_seconds": round(end - start, 3),
            "write_entries_per_s": round(settings.entries / (end - start)),
            "converged": done is not None,
            "converge_seconds_from_write_start": round(done - start, 3) if done else None,
            "converge_seconds_after_write_end": round(done - end, 3) if done else None,
            "entries_missing_per_node_at_write_end": [want - c for c in at_end],
            "cpu_percent": cpu_write,
            "cpu_ms_per_entry": cpu.ms_per(settings.entries),
        }
        if done is None:
            write["entries_missing_per_node_at_timeout"] = [want - c for c in seen[-1][1]]
            # The new node is to catch up on what node 0, its peer, holds.
            want = (await totals(client, nodes[:1]))[0]

        # A fresh node joins node 0 and catches up on everything.
        progress(f"(b) starting a 4th node joined to node 0; it has to fetch {want:,} entries")
        node0_before = await scrape(client, nodes[0])
        spawned = time.monotonic()
        fresh = cluster.add_node(3, [nodes[0].url], wait=False)
        cpu = CpuWindow({**pids, "node3": pid_of(fresh)}).begin()
        spies = start_profiles(cluster, profile, "catchup", {"node0": nodes[0], "node3": fresh}, None)
        ready: float | None = None
        finished: float | None = None
        samples: list[tuple[float, int]] = []
        allowed = min(
            settings.catch_up_timeout, max(settings.min_catch_up, settings.budget - (spawned - began))
        )
        deadline = spawned + allowed
        while time.monotonic() < deadline:
            try:
                total = vector_total(await get_status(client, fresh, timeout=3.0))
            except httpx.HTTPError:
                if not fresh.alive():
                    raise RuntimeError(f"the 4th node exited; see {fresh.log_file}") from None
                await asyncio.sleep(0.05)
                continue
            now = time.monotonic()
            ready = ready or now
            samples.append((now - spawned, total))
            if total >= want:
                finished = now
                break
            await asyncio.sleep(0.1)
        cpu_catch = cpu.end()
        stop_profiles(spies)
        fresh_metrics = await scrape(client, fresh)
        node0_after = await scrape(client, nodes[0])
        got = samples[-1][1] if samples else 0
        in_by_peer = {
            f"node{i}": int(
                fresh_metrics.get(("potboiler_replicated_entries_in_total", cluster.url_of(i)), 0.0)
            )
            for i in range(3)
        }
        catch: Json = {
            "entries": want,
            "held": got,
            "complete": finished is not None,
            "time_allowed_s": round(allowed, 1),
            "seconds_from_spawn": round((finished or time.monotonic()) - spawned, 3),
            "seconds_from_ready": round((finished or time.monotonic()) - (ready or spawned), 3),
            "startup_seconds": round((ready or spawned) - spawned, 3),
            "entries_per_s_from_spawn": round(got / ((finished or time.monotonic()) - spawned)),
            "entries_per_s_from_ready": round(
                got / max(1e-9, (finished or time.monotonic()) - (ready or spawned))
            ),
            "entries_received_by_source": in_by_peer,
            "entries_received_total": sum(in_by_peer.values()),
            # Copies received per entry held: 1 when each entry came once, 3 when all three peers sent it.
            "copies_received_per_entry": ratio(sum(in_by_peer.values()), got),
            "node0_messages_out": delta(
                node0_after, node0_before, "potboiler_replication_messages_out_total", fresh.url
            ),
            "node0_entries_out": delta(
                node0_after, node0_before, "potboiler_replicated_entries_out_total", fresh.url
            ),
            "progress_samples": thin(samples, 20),
            "cpu_percent": cpu_catch,
            "cpu_ms_per_entry": cpu.ms_per(got),
            # What the new node (with its Envoy) would take in with a whole core to itself (it is
            # CPU-bound: this is the rate the machine's other load leaves aside).
            "entries_per_cpu_second_of_new_node": round(got / cpu.used["node3"])
            if cpu.used.get("node3")
            else None,
        }
    return {"cluster_write": write, "new_node": catch}


def thin(samples: Sequence[tuple[float, int]], count: int) -> list[list[float]]:
    """About `count` evenly spaced (seconds, entries) samples, always with the last."""
    if not samples:
        return []
    step = max(1, len(samples) // count)
    picked = list(samples[::step])
    if picked[-1] != samples[-1]:
        picked.append(samples[-1])
    return [[round(t, 2), n] for t, n in picked]


# -- profiling (optional) --------------------------------------------------------------------------


def start_profiles(
    cluster: Cluster, folder: Path | None, phase: str, nodes: dict[str, NodeProcess], seconds: float | None
) -> list[subprocess.Popen[bytes]]:
    """With --profile, sample the nodes' Python stacks with py-spy (raw folded output, one file per
    node and phase) until `stop_profiles` or for `seconds`."""
    if folder is None:
        return []
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    folder.mkdir(parents=True, exist_ok=True)
    spies = []
    for name, node in nodes.items():
        cmd = [
            spy,
            "record",
            "--nonblocking",
            "-r",
            "200",
            "-f",
            "raw",
            "-o",
            str(folder / f"{phase}-{name}.txt"),
        ]
        cmd += ["--pid", str(pid_of(node))]
        if seconds:
            cmd += ["-d", str(math.ceil(seconds))]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cluster.children.append(proc)
        spies.append(proc)
    return spies


def stop_profiles(spies: Sequence[subprocess.Popen[bytes]]) -> None:
    """Let py-spy write what it sampled (SIGINT) and wait for it."""
    for proc in spies:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for proc in spies:
        with suppress(subprocess.TimeoutExpired):
            proc.wait(30)


# -- main ------------------------------------------------------------------------------------------


@contextmanager
def cluster_of_three() -> Iterator[Cluster]:
    with Cluster(slots=4) as cluster:
        urls = [cluster.url_of(i) for i in range(3)]
        for i in range(3):
            cluster.add_node(i, [u for u in urls if u != urls[i]], wait=False)
        for node in cluster.nodes:
            node.wait_ready()
        yield cluster


async def wait_connected(cluster: Cluster, timeout: float = 30.0) -> None:
    """Until every node reports every other as connected (state LIVE or CATCHING_UP)."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while True:
            statuses = [await get_status(client, n) for n in cluster.nodes]
            if all(
                len(s.get("peers", [])) == len(cluster.nodes) - 1
                and all(p.get("state") in ("STATE_LIVE", "STATE_CATCHING_UP") for p in s["peers"])
                for s in statuses
            ):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not connect: {json.dumps(statuses)[:2000]}")
            await asyncio.sleep(0.1)


async def run(settings: Settings, quick: bool, profile: Path | None) -> Json:
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    began = time.monotonic()
    with cluster_of_three() as cluster:
        progress(f"3 nodes up at {', '.join(n.url for n in cluster.nodes)} (data in {cluster.root})")
        await wait_connected(cluster)
        lag_fig, net_fig = await measure_lag(cluster, settings, profile, "unary")
        stream_lag_fig, stream_net_fig = await measure_lag(cluster, settings, profile, "stream")
        catch_fig = await measure_catch_up(cluster, settings, profile, began)
    new_node = catch_fig["new_node"]
    lags = {"unary_writer": (lag_fig, net_fig), "stream_writer": (stream_lag_fig, stream_net_fig)}
    targets: Json = {}
    for name, (lag, net) in lags.items():
        targets[f"visibility_lag_p99_ms_{name}"] = target(lag["lag_ms"].get("p99"), TARGET_P99_LAG_MS, "<=")
        targets[f"visibility_lost_entries_{name}"] = target(lag["lost"], 0, "==")
        targets[f"messages_per_entry_per_peer_{name}"] = target(
            net["messages_out_per_entry_per_peer"], TARGET_MESSAGES_PER_ENTRY_PER_PEER, "<"
        )
    targets["catch_up_entries_per_s"] = target(
        new_node["entries_per_s_from_spawn"], TARGET_CATCH_UP_PER_S, ">="
    )
    return {
        "benchmark": "replication",
        "quick": quick,
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": load_at_start,
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        },
        "cluster": {"nodes": 3, "transport": "gRPC direct ports (B+10), loopback", "fsync": False},
        "visibility_lag": {name: lag for name, (lag, _) in lags.items()},
        "network": {name: net for name, (_, net) in lags.items()},
        "catch_up": catch_fig,
        "targets": targets,
        "meets_targets": all(t["meets_target"] for t in targets.values()),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s of load, 100,000 entries")
    parser.add_argument("--profile", type=Path, help="py-spy the nodes during each phase into this folder")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    began = time.monotonic()
    try:
        result = uvloop.run(run(settings, args.quick, args.profile))
    except KeyboardInterrupt:
        progress("interrupted; every node is stopped")
        return 130
    result["wall_seconds"] = round(time.monotonic() - began, 1)
    print(json.dumps(result, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
