"""Webhook delivery: how fast a node POSTs its log to registered URLs, what each POST costs it, and
what a catch-up of its webhooks does to its appends.

    .venv/bin/python -m benchmarks.webhooks [--entries 5000] [--webhooks 1] [--quick]

1. Starts one `potboiler node` process and a receiver process (a bare asyncio HTTP/1.1 server that
   answers every POST with 204 at once, so the figures are the node's), and appends `--entries`
   entries in batches.
2. Registers `--webhooks` URLs of the receiver; each gets the whole log from position 1, one POST per
   entry in order. Meanwhile a probe makes one unary `AppendEntry` every 20 ms (added to what the
   webhooks deliver: the run waits for those too).
3. Reports deliveries per second (all webhooks together), the node's CPU time per delivery, and the
   probe's append latency during the catch-up against the same probe on the idle node afterwards.

Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import time
from collections.abc import Callable

import grpc
from google.protobuf.struct_pb2 import Value

from benchmarks.common import Bench, cpu_seconds, emit, node_pid, progress, rounded, summary
from potboiler.server.processes import NodeProcess
from potboiler.v1 import log_pb2, log_pb2_grpc, webhooks_pb2, webhooks_pb2_grpc

MP = multiprocessing.get_context("spawn")
#: Time between two probe appends, seconds.
PROBE_INTERVAL = 0.02
#: How long the probe runs on the idle node, seconds.
IDLE_PROBE_S = 3.0


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, rest = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(rest)
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        writer.close()


async def _serve(conn: multiprocessing.connection.Connection) -> None:
    server = await asyncio.start_server(_answer, "127.0.0.1", 0)
    conn.send(server.sockets[0].getsockname()[1])
    await asyncio.to_thread(conn.recv)  # until told to stop
    server.close()


def receiver_main(conn: multiprocessing.connection.Connection) -> None:
    """The receiver process: serve until the parent sends anything (or goes away)."""
    asyncio.run(_serve(conn))


class Receiver:
    """The receiver process, stopped by the bench."""

    def __init__(self) -> None:
        self._conn, child = MP.Pipe()
        self._process = MP.Process(target=receiver_main, args=(child,), daemon=True)
        self._process.start()
        self.port: int = self._conn.recv()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(None)
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()


async def _probe(log: log_pb2_grpc.LogServiceAsyncStub, done: Callable[[], bool]) -> list[float]:
    """Append one entry every PROBE_INTERVAL until `done()`; the latencies in seconds."""
    latencies = []
    while not done():
        started = time.perf_counter()
        await log.AppendEntry(log_pb2.AppendEntryRequest(data=Value(string_value="probe")))
        latencies.append(time.perf_counter() - started)
        await asyncio.sleep(PROBE_INTERVAL)
    return latencies


async def measure(node: NodeProcess, port: int, entries: int, webhooks: int) -> dict[str, object]:
    """Append `entries`, register `webhooks` URLs and time their catch-up (see the module's text)."""
    async with grpc.aio.insecure_channel(node.grpc_target) as channel:
        log = log_pb2_grpc.LogServiceStub(channel)
        hooks = webhooks_pb2_grpc.WebhooksServiceStub(channel)
        batch = [log_pb2.AppendEntryRequest(data=Value(string_value="x" * 100)) for _ in range(1000)]
        for start in range(0, entries, 1000):
            await log.AppendEntries(log_pb2.AppendEntriesRequest(entries=batch[: entries - start]))
        pid = node_pid(node)
        cpu_before, started = cpu_seconds(pid), time.perf_counter()
        for i in range(webhooks):
            await hooks.RegisterWebhook(
                webhooks_pb2.RegisterWebhookRequest(url=f"http://127.0.0.1:{port}/hook{i}")
            )

        async def delivered_to_all(position: int) -> None:
            while True:
                listed = (await hooks.ListWebhooks(webhooks_pb2.ListWebhooksRequest())).webhooks
                if min(w.delivered_position for w in listed) >= position:
                    return
                await asyncio.sleep(0.05)

        caught_up = False
        probe = asyncio.create_task(_probe(log, lambda: caught_up))
        await delivered_to_all(entries)
        caught_up = True
        during = await probe
        # The probe's entries too (one node: its delivery positions are its own log's seqs).
        last = (await log.ListHeads(log_pb2.ListHeadsRequest())).heads[0].seq
        await delivered_to_all(last)
        seconds = time.perf_counter() - started
        cpu = cpu_seconds(pid) - cpu_before
        delivered = last * webhooks
        idle_until = time.monotonic() + IDLE_PROBE_S
        idle = await _probe(log, lambda: time.monotonic() >= idle_until)
        return {
            "entries": entries,
            "webhooks": webhooks,
            "deliveries_per_s": rounded(delivered / seconds),
            "node_cpu_us_per_delivery": rounded(cpu / delivered * 1e6),
            "append_ms_during_catch_up": summary(during, scale=1000),
            "append_ms_idle": summary(idle, scale=1000),
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--entries", type=int, default=5000)
    parser.add_argument("--webhooks", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 500 entries")
    args = parser.parse_args(argv)
    if args.quick:
        args.entries = 500
    with Bench() as bench:
        receiver = Receiver()
        bench.adopt(receiver)
        node = bench.start_node()
        progress(f"delivering {args.entries} entries to {args.webhooks} webhook(s)")
        emit({"webhooks": asyncio.run(measure(node, receiver.port, args.entries, args.webhooks))})


if __name__ == "__main__":
    main()
