"""Append throughput, memory and restart time of one node, without and with --fsync.

    .venv/bin/python -m benchmarks.append            # a few minutes
    .venv/bin/python -m benchmarks.append --quick    # a smoke test: ~1 s per phase, 100,000 entries

Starts its own nodes (each with its Envoy) in a temporary directory on free ports, and for each of
no-fsync and --fsync measures:

1. REST `POST /log` through Envoy at 32 connections, with `wrk` (a Lua script sends the JSON body) if
   it is installed, else with an asyncio httpx client (which, on one core, may be the bottleneck);
2. gRPC unary AppendEntry at 32 concurrent calls (grpc.aio), from 1 and from 2 client processes;
3. AppendEntries with 100 and 1000 entries per call, a few calls in flight;
4. AppendEntryStream from one client: one entry per message with up to 256 messages unacked, and 10
   entries per message; then 32 concurrent appends from one client through `potboiler.client`'s
   StreamAppender, each awaiting its own acknowledgement (the appends waiting when the stream is ready
   share a message);
5. with 1,000,000 entries appended by AppendEntries: resident memory of the node's process tree (node
   and Envoy), restart time (stop, start, until REST answers) and that all entries are still there.

Before that, the same gRPC clients run against a no-op LogService (a bare grpc.aio server):
"calibration_noop_grpc_server" is the floor that grpc.aio, the clients and the machine set.

Prints one JSON object with every figure and, under "targets", each target figure with its goal and
`meets_target`. The stream with one entry per message has none: grpc.aio spends about 100 µs of
CPU on each message on each side, so one Python client sending one entry per message stays under
10,000 a second even against the do-nothing server (9,015 on 1 December); the issue's streaming
target, one Python client with an ack per entry, is what the 10-per-message stream and the
StreamAppender (which sends the appends waiting together) measure. Progress goes to stderr. Each phase also reports the CPU use of the node and its
Envoy, of the client and of everything else on the machine ("other_cpu_percent"), and the CPU
microseconds the server and the client spent per call or entry. Throughput depends on what else the
machine runs; CPU per item much less so, which makes it the figure to compare between runs on a
busy machine. "conditions" (load averages and an fsync probe) say how busy the machine was.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import functools
import json
import multiprocessing
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import uvloop
from google.protobuf import json_format
from google.protobuf.struct_pb2 import Value

from benchmarks import wrk
from benchmarks.common import (
    Bench,
    CpuWindow,
    Json,
    LoadResult,
    ProcessStats,
    emit,
    machine_conditions,
    measuring_cpu,
    merge_loads,
    node_pid,
    progress,
    rounded,
    run_load,
    target,
)
from potboiler.client.appender import StreamAppender
from potboiler.server.processes import NodeProcess
from potboiler.v1 import log_pb2, log_pb2_grpc

#: The JSON body of every REST append, and the data of every gRPC one.
BODY = {"kind": "bench", "n": 1, "text": "a small JSON event"}
#: Targets from the issue.
TARGET_REST = 4_000
TARGET_UNARY = 5_000
TARGET_STREAM = 16_000
TARGET_BATCH = 100_000
TARGET_RESTART_S = 2.0
TARGET_MEMORY_MB = 300.0
#: Entries per AppendEntries call when loading the million.
LOAD_BATCH = 1_000
Ctx = grpc.aio.ServicerContext[Any, Any]
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


@dataclass(frozen=True)
class Settings:
    """How long and how hard each phase runs."""

    duration: float
    warmup: float
    concurrency: int
    batch_in_flight: int
    stream_window: int
    entries: int
    modes: tuple[bool, ...]
    force_python_rest: bool


def data_value() -> Value:
    """The data of a benchmark entry."""
    return json_format.ParseDict(BODY, Value())


def entry_request() -> log_pb2.AppendEntryRequest:
    return log_pb2.AppendEntryRequest(data=data_value())


def batch_request(n: int) -> log_pb2.AppendEntriesRequest:
    entry = entry_request()
    return log_pb2.AppendEntriesRequest(entries=[entry] * n)


def own_seq(target_addr: str) -> int:
    """The highest seq of the node's log (it is the only owner in these benchmarks)."""
    with grpc.insecure_channel(target_addr) as channel:
        heads = log_pb2_grpc.LogServiceStub(channel).ListHeads(log_pb2.ListHeadsRequest(), timeout=10)
    return max((h.seq for h in heads.heads), default=0)


# -- 1. REST ---------------------------------------------------------------------------------------


def rest_wrk(url: str, settings: Settings, workdir: Path, window: CpuWindow) -> Json:
    """POST /log with wrk at `concurrency` connections (a short warm-up run first). `ops` counts the
    successful requests only (as the httpx client's does), `requests` every answered one."""
    run = wrk.poster(f"{url}/log", BODY, settings.concurrency, workdir)
    if settings.warmup > 0:
        run(settings.warmup)
    window.begin()
    raw = run(settings.duration)
    window.end()
    seconds = raw["duration_us"] / 1e6
    good = wrk.succeeded(raw)
    errors = wrk.errors(raw)
    lat = raw["latency_us"]
    return {
        "client": "wrk",
        "concurrency": settings.concurrency,
        "seconds": rounded(seconds, 3),
        "requests": raw["requests"],
        "ops": good,
        "ops_per_s": rounded(good / seconds),
        "errors": errors,
        "status_errors": raw["status_errors"],
        "latency_ms": {k: round(v / 1000, 3) for k, v in lat.items()},
    }


async def rest_python(url: str, settings: Settings, window: CpuWindow) -> Json:
    """POST /log with an asyncio httpx client (one process: likely client-bound)."""
    body = json.dumps(BODY).encode()
    limits = httpx.Limits(
        max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency
    )
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10.0) as client:

        async def post() -> int:
            response = await client.post("/log", content=body, headers={"content-type": "application/json"})
            if response.status_code != 201:
                raise RuntimeError(f"POST /log answered {response.status_code}: {response.text[:200]}")
            return 1

        result = await run_load(
            post,
            concurrency=settings.concurrency,
            duration=settings.duration,
            warmup=settings.warmup,
            on_start=window.begin,
            on_end=window.end,
        )
    return {"client": "httpx (asyncio, one process)", **result.figures()}


# -- 2. gRPC unary ---------------------------------------------------------------------------------


def unary_client(
    grpc_target: str, concurrency: int, duration: float, warmup: float, start_at: float
) -> LoadResult:
    """One client process: `concurrency` AppendEntry calls in flight on one channel. Starts its load
    at wall-clock `start_at` so that several processes measure the same window."""

    async def main() -> LoadResult:
        async with grpc.aio.insecure_channel(grpc_target, options=GRPC_OPTIONS) as channel:
            stub = log_pb2_grpc.LogServiceStub(channel)
            request = entry_request()
            await stub.ListHeads(log_pb2.ListHeadsRequest())  # connect before the clock starts
            await asyncio.sleep(max(0.0, start_at - time.time()))

            async def append() -> int:
                await stub.AppendEntry(request)
                return 1

            return await run_load(append, concurrency=concurrency, duration=duration, warmup=warmup)

    return uvloop.run(main())


def grpc_unary(grpc_target: str, settings: Settings, processes: int, window: CpuWindow) -> Json:
    """AppendEntry at `concurrency` calls in flight in total, spread over client processes."""
    per_process = [settings.concurrency // processes] * processes
    per_process[0] += settings.concurrency - sum(per_process)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        start_at = time.time() + 3.0  # time for the processes to spawn and import grpc
        futures = [
            pool.submit(unary_client, grpc_target, c, settings.duration, settings.warmup, start_at)
            for c in per_process
        ]
        time.sleep(max(0.0, start_at + settings.warmup - time.time()))
        window.begin()
        time.sleep(settings.duration)
        window.end()
        results = [f.result(timeout=settings.duration + settings.warmup + 120) for f in futures]
    merged = merge_loads(results)
    return {
        "client_processes": processes,
        "concurrency_per_process": per_process,
        **merged.figures(),
        "ops_per_s_by_process": [rounded(r.ops_per_s) for r in results],
    }


# -- 3. batches ------------------------------------------------------------------------------------


async def grpc_batch(grpc_target: str, settings: Settings, per_call: int, window: CpuWindow) -> Json:
    """AppendEntries with `per_call` entries, `batch_in_flight` calls in flight."""
    async with grpc.aio.insecure_channel(grpc_target, options=GRPC_OPTIONS) as channel:
        stub = log_pb2_grpc.LogServiceStub(channel)
        request = batch_request(per_call)

        async def append() -> int:
            response = await stub.AppendEntries(request)
            return len(response.entries)

        result = await run_load(
            append,
            concurrency=settings.batch_in_flight,
            duration=settings.duration,
            warmup=settings.warmup,
            on_start=window.begin,
            on_end=window.end,
        )
    return {"entries_per_call": per_call, **result.figures("entries")}


# -- 4. streams ------------------------------------------------------------------------------------


async def grpc_stream(grpc_target: str, settings: Settings, per_message: int, window: CpuWindow) -> Json:
    """One AppendEntryStream with `per_message` entries per message and up to `stream_window`
    messages unacknowledged. Counts the acks that arrive in the measuring window; each ack's latency
    is the time from writing its message to reading its ack."""
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(grpc_target, options=GRPC_OPTIONS) as channel:
        stub = log_pb2_grpc.LogServiceStub(channel)
        await stub.ListHeads(log_pb2.ListHeadsRequest())
        request = log_pb2.AppendEntryStreamRequest(entries=[entry_request()] * per_message)
        call = stub.AppendEntryStream()
        unacked = asyncio.Semaphore(settings.stream_window)
        sent: collections.deque[float] = collections.deque()
        start = loop.time() + settings.warmup
        end = start + settings.duration
        result = LoadResult(settings.stream_window, settings.duration, 0, 0, 0)
        loop.call_at(start, window.begin)
        loop.call_at(end, window.end)

        async def writer() -> None:
            while loop.time() < end:
                await unacked.acquire()
                sent.append(loop.time())
                await call.write(request)
            await call.done_writing()

        async def reader() -> None:
            while True:
                response = await call.read()
                if not isinstance(response, log_pb2.AppendEntryStreamResponse):
                    return  # EOF
                now = loop.time()
                began = sent.popleft()
                unacked.release()
                if start <= now <= end:
                    result.ops += 1
                    result.items += len(response.entries)
                    result.latencies.append(now - began)

        write_task = asyncio.create_task(writer())
        try:
            await asyncio.wait_for(reader(), settings.warmup + settings.duration + 60)
            await write_task
        finally:
            write_task.cancel()
            call.cancel()
    return {
        "entries_per_message": per_message,
        "window_messages": settings.stream_window,
        **result.figures("entries"),
    }


async def grpc_pipelined(grpc_target: str, settings: Settings, window: CpuWindow) -> Json:
    """`concurrency` coroutines appending one entry at a time through one StreamAppender."""
    async with (
        grpc.aio.insecure_channel(grpc_target, options=GRPC_OPTIONS) as channel,
        StreamAppender(channel) as appender,
    ):
        data = data_value()
        await appender.append(data)  # connected before the clock starts

        async def append() -> int:
            await appender.append(data)
            return 1

        result = await run_load(
            append,
            concurrency=settings.concurrency,
            duration=settings.duration,
            warmup=settings.warmup,
            on_start=window.begin,
            on_end=window.end,
        )
    return {"appends_in_flight": settings.concurrency, **result.figures("entries")}


# -- 5. a million entries: memory, restart ---------------------------------------------------------


async def load_entries(grpc_target: str, total: int, in_flight: int) -> Json:
    """Append `total` entries with AppendEntries of LOAD_BATCH, `in_flight` calls at a time."""
    async with grpc.aio.insecure_channel(grpc_target, options=GRPC_OPTIONS) as channel:
        stub = log_pb2_grpc.LogServiceStub(channel)
        remaining = total
        began = time.monotonic()

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                n = min(LOAD_BATCH, remaining)
                remaining -= n
                response = await stub.AppendEntries(batch_request(n))
                assert len(response.entries) == n

        await asyncio.gather(*(worker() for _ in range(in_flight)))
        seconds = time.monotonic() - began
    return {"entries": total, "seconds": rounded(seconds, 3), "entries_per_s": rounded(total / seconds)}


def wait_rest(node: NodeProcess, timeout: float = 120.0) -> float:
    """Poll the node's GET /log every 10 ms until it answers 200; returns when (monotonic). Fails
    early, with the end of its log, if the node exits."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1.0) as client:
        while True:
            try:
                if client.get(f"{node.url}/log").status_code == 200:
                    return time.monotonic()
            except httpx.HTTPError:
                pass
            if not node.alive():
                raise RuntimeError(f"the node exited while starting; its log ends:\n{node.log_tail(20)}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{node.url} did not answer within {timeout}s; its log ends:\n{node.log_tail(20)}"
                )
            time.sleep(0.01)


def million(bench: Bench, settings: Settings, fsync: bool) -> Json:
    """Memory and restart of a fresh node holding `settings.entries` entries. A failure is recorded
    under "error" with the figures measured before it."""
    node = bench.start_node(["--fsync"] if fsync else [], name=f"million-{'fsync' if fsync else 'nofsync'}")
    stats = ProcessStats(node_pid(node))
    out: Json = {"memory_empty": stats.memory()}
    try:
        progress(f"  loading {settings.entries:,} entries")
        with measuring_cpu(CpuWindow(node_pid(node))) as window:
            out["load"] = uvloop.run(
                load_entries(node.grpc_target, settings.entries, settings.batch_in_flight)
            )
        out["load"].update(window.figures(settings.entries))
        time.sleep(0.5)
        out["memory_loaded"] = stats.memory()
        out["seq_before_restart"] = own_seq(node.grpc_target)
        began = time.monotonic()
        node.stop()
        out["stop_s"] = rounded(time.monotonic() - began, 3)
        began = time.monotonic()
        node.start(wait=False)
        out["restart_s"] = rounded(wait_rest(node) - began, 3)
        stats = ProcessStats(node_pid(node))
        out["seq_after_restart"] = own_seq(node.grpc_target)
        out["all_entries_present"] = out["seq_after_restart"] == settings.entries
        time.sleep(0.5)
        out["memory_after_restart"] = stats.memory()
    except Exception as exc:
        progress(f"  failed: {exc!r}")
        out["error"] = str(exc) or repr(exc)
    finally:
        node.stop()
    return out


# -- calibration -----------------------------------------------------------------------------------


class NoopLogService(log_pb2_grpc.LogServiceServicer):
    """A LogService that stores nothing: what grpc.aio alone costs."""

    _ack = log_pb2.AppendEntryResponse(id="00000000-0000-4000-8000-000000000000", seq=1)

    async def AppendEntry(
        self, request: log_pb2.AppendEntryRequest, context: Ctx
    ) -> log_pb2.AppendEntryResponse:
        return self._ack

    async def AppendEntries(
        self, request: log_pb2.AppendEntriesRequest, context: Ctx
    ) -> log_pb2.AppendEntriesResponse:
        return log_pb2.AppendEntriesResponse(entries=[self._ack] * len(request.entries))

    async def AppendEntryStream(
        self, request_iterator: AsyncIterator[log_pb2.AppendEntryStreamRequest], context: Ctx
    ) -> AsyncIterator[log_pb2.AppendEntryStreamResponse]:
        async for message in request_iterator:
            yield log_pb2.AppendEntryStreamResponse(entries=[self._ack] * len(message.entries))

    async def ListHeads(self, request: log_pb2.ListHeadsRequest, context: Ctx) -> log_pb2.ListHeadsResponse:
        return log_pb2.ListHeadsResponse()

    async def GetEntry(self, request: log_pb2.GetEntryRequest, context: Ctx) -> log_pb2.GetEntryResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "a no-op server")
        raise AssertionError("unreachable")

    async def SubscribeEntries(
        self, request: log_pb2.SubscribeEntriesRequest, context: Ctx
    ) -> AsyncIterator[log_pb2.SubscribeEntriesResponse]:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "a no-op server")
        yield log_pb2.SubscribeEntriesResponse()  # unreachable: abort raises


def serve_noop(address: str) -> None:
    """Serve NoopLogService at `address` until terminated (run in a process of its own)."""

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *GRPC_OPTIONS])
        log_pb2_grpc.add_LogServiceServicer_to_server(NoopLogService(), server)
        server.add_insecure_port(address)
        await server.start()
        await server.wait_for_termination()

    uvloop.run(serve())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def calibration(settings: Settings) -> Json:
    """The same gRPC clients against NoopLogService, a bare grpc.aio server in a process of its own:
    the floor that grpc.aio, the clients and this machine (with whatever else runs on it) set. A node
    figure far below it is the node's own cost; a target above it is out of reach for any grpc.aio
    server here."""
    address = f"127.0.0.1:{free_port()}"
    process = multiprocessing.get_context("spawn").Process(target=serve_noop, args=(address,), daemon=True)
    process.start()
    out: Json = {}
    try:
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
        assert process.pid is not None
        pid = process.pid

        def measure(key: str, run: Callable[[CpuWindow], Json]) -> None:
            progress(f"[calibration] no-op gRPC server: {key}")
            window = CpuWindow(pid)
            figures = run(window)
            figures.update(window.figures(int(figures.get("entries") or figures["ops"])))
            out[key] = figures

        measure("grpc_unary_1_process", functools.partial(grpc_unary, address, settings, 1))
        measure("stream_1", lambda w: uvloop.run(grpc_stream(address, settings, 1, w)))
        measure("batch_1000", lambda w: uvloop.run(grpc_batch(address, settings, 1000, w)))
    finally:
        process.terminate()
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()
    return out


# -- the run ---------------------------------------------------------------------------------------


def mode(bench: Bench, settings: Settings, fsync: bool, use_wrk: bool) -> Json:
    """Every phase against one node (fresh for the throughput phases, another for the million)."""
    name = "fsync" if fsync else "no_fsync"
    node = bench.start_node(["--fsync"] if fsync else [], name=name)
    pid = node_pid(node)
    url, grpc_target = node.url, node.grpc_target
    out: Json = {"conditions": machine_conditions(bench.root)}

    def phase(key: str, label: str, run: Callable[[CpuWindow], Json]) -> None:
        """Run one phase; a failure is recorded under "error" and the run goes on. CPU per item is
        per entry, or per successful call (`ops`: failed ones are not counted)."""
        progress(f"[{name}] {label}")
        try:
            before = own_seq(grpc_target)
            window = CpuWindow(pid)
            figures = run(window)
            figures.update(window.figures(int(figures.get("entries") or figures["ops"])))
            figures["appended_seen_by_node"] = own_seq(grpc_target) - before
        except Exception as exc:
            progress(f"  failed: {exc!r}")
            figures = {"error": repr(exc)}
        out[key] = figures

    if use_wrk:
        phase("rest", "REST POST /log (wrk)", lambda w: rest_wrk(url, settings, bench.root, w))
    else:
        phase("rest", "REST POST /log (httpx)", lambda w: uvloop.run(rest_python(url, settings, w)))
    for processes in (1, 2):
        plural = "es" if processes > 1 else ""
        phase(
            f"grpc_unary_{processes}_process{plural}",
            f"gRPC AppendEntry, {processes} client process{plural}",
            functools.partial(grpc_unary, grpc_target, settings, processes),
        )
    for n in (100, 1000):

        def batch(w: CpuWindow, n: int = n) -> Json:
            return uvloop.run(grpc_batch(grpc_target, settings, n, w))

        phase(f"batch_{n}", f"AppendEntries x{n}", batch)
    for n in (1, 10):

        def stream(w: CpuWindow, n: int = n) -> Json:
            return uvloop.run(grpc_stream(grpc_target, settings, n, w))

        phase(f"stream_{n}", f"AppendEntryStream, {n}/message", stream)
    phase(
        "pipelined",
        f"StreamAppender, {settings.concurrency} appends in flight",
        lambda w: uvloop.run(grpc_pipelined(grpc_target, settings, w)),
    )
    out["memory_after_phases"] = ProcessStats(pid).memory()
    node.stop()
    progress(f"[{name}] {settings.entries:,} entries: memory and restart")
    out["million"] = million(bench, settings, fsync)
    return out


def targets(figures: Json, entries: int) -> Json:
    """The figures the issue sets targets for, each with its goal and whether it meets it (a figure
    missing because its phase failed is null and does not meet its target)."""

    def get(*path: str) -> Any:
        value: Any = figures
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    memory = [get("million", k, "rss_mb") for k in ("memory_loaded", "memory_after_restart")]
    return {
        "rest_requests_per_s": target(get("rest", "ops_per_s"), TARGET_REST, at_least=True),
        "grpc_unary_calls_per_s_1_process": target(
            get("grpc_unary_1_process", "ops_per_s"), TARGET_UNARY, at_least=True
        ),
        "grpc_unary_calls_per_s_2_processes": target(
            get("grpc_unary_2_processes", "ops_per_s"), TARGET_UNARY, at_least=True
        ),
        "stream_entries_per_s_10_per_message": target(
            get("stream_10", "entries_per_s"), TARGET_STREAM, at_least=True
        ),
        "stream_entries_per_s_pipelined_appends": target(
            get("pipelined", "entries_per_s"), TARGET_STREAM, at_least=True
        ),
        "batch_entries_per_s_100_per_call": target(
            get("batch_100", "entries_per_s"), TARGET_BATCH, at_least=True
        ),
        "batch_entries_per_s_1000_per_call": target(
            get("batch_1000", "entries_per_s"), TARGET_BATCH, at_least=True
        ),
        f"restart_s_with_{entries}_entries": target(
            get("million", "restart_s"), TARGET_RESTART_S, at_least=False
        ),
        f"memory_mb_with_{entries}_entries": target(
            None if None in memory else max(memory), TARGET_MEMORY_MB, at_least=False
        ),
        f"all_{entries}_entries_present_after_restart": bool(get("million", "all_entries_present")),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.append", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: ~1 s phases, 100,000 entries")
    p.add_argument(
        "--duration", type=float, help="seconds each throughput phase measures (default 5; 1 quick)"
    )
    p.add_argument("--warmup", type=float, help="seconds of warm-up before each phase (default 1; 0.3 quick)")
    p.add_argument(
        "--entries", type=int, help="entries for memory and restart (default 1,000,000; 100,000 quick)"
    )
    p.add_argument(
        "--concurrency", type=int, default=32, help="calls in flight for REST and unary (default 32)"
    )
    p.add_argument("--batch-in-flight", type=int, default=4, help="AppendEntries calls in flight (default 4)")
    p.add_argument("--stream-window", type=int, default=256, help="unacked stream messages (default 256)")
    p.add_argument("--mode", choices=["both", "no-fsync", "fsync"], default="both", help="which modes")
    p.add_argument("--python-rest", action="store_true", help="use the httpx client even if wrk is installed")
    p.add_argument(
        "--no-calibration", action="store_true", help="skip measuring a no-op gRPC server for comparison"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (node logs, data)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        duration=args.duration if args.duration is not None else (1.0 if args.quick else 5.0),
        warmup=args.warmup if args.warmup is not None else (0.3 if args.quick else 1.0),
        concurrency=args.concurrency,
        batch_in_flight=args.batch_in_flight,
        stream_window=args.stream_window,
        entries=args.entries if args.entries is not None else (100_000 if args.quick else 1_000_000),
        modes={"both": (False, True), "no-fsync": (False,), "fsync": (True,)}[args.mode],
        force_python_rest=args.python_rest,
    )
    use_wrk = shutil.which("wrk") is not None and not settings.force_python_rest
    if not use_wrk and not settings.force_python_rest:
        progress(
            "wrk is not installed: REST uses an asyncio httpx client, which may be the bottleneck. "
            "For client-independent REST figures install it: `apt-get install -y wrk` (Debian/Ubuntu)."
        )
    result: Json = {
        "benchmark": "append",
        "quick": args.quick,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": {
            "duration_s": settings.duration,
            "warmup_s": settings.warmup,
            "concurrency": settings.concurrency,
            "batch_in_flight": settings.batch_in_flight,
            "stream_window": settings.stream_window,
            "entries": settings.entries,
            "entry_data": BODY,
        },
        "rest_client": wrk.version() if use_wrk else "httpx (asyncio, one process)",
    }
    began = time.monotonic()
    with Bench(keep=args.keep) as bench:
        if args.keep:
            progress(f"data and node logs in {bench.root}")
        result["machine"]["conditions_before"] = machine_conditions(bench.root)
        if not args.no_calibration:
            result["calibration_noop_grpc_server"] = calibration(settings)
        modes: Json = {}
        for fsync in settings.modes:
            modes["fsync" if fsync else "no_fsync"] = mode(bench, settings, fsync, use_wrk)
        result["machine"]["conditions_after"] = machine_conditions(bench.root)
    result["modes"] = modes
    result["targets"] = {name: targets(figures, settings.entries) for name, figures in modes.items()}
    result["all_targets_met"] = all(
        (t["meets_target"] if isinstance(t, dict) else bool(t))
        for per_mode in result["targets"].values()
        for t in per_mode.values()
    )
    result["total_seconds"] = rounded(time.monotonic() - began)
    emit(result)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; nodes stopped", file=sys.stderr)
        sys.exit(130)
