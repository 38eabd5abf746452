"""Potboiler side by side with etcd, NATS JetStream, Redis Streams and RQ, in one run.

    .venv/bin/python -m benchmarks.compare            # every section, ~12-15 minutes on 2 cores
    .venv/bin/python -m benchmarks.compare --quick    # a smoke run: a couple of minutes
    .venv/bin/python -m benchmarks.compare --only lag --only catchup

Sections (each figure measured repeatedly, peer and Potboiler taking turns within the run):

  rest     1. REST writes/s with wrk, 32 connections: etcd gateway POST /v3/kv/put vs POST /log,
              1 node and 3-node clusters
  acked    2. acknowledged writes/s from one Python asyncio client, 32 in flight: etcd KV.Put,
              JetStream publish (file storage), Redis XADD, Potboiler gRPC AppendEntry and the
              StreamAppender of potboiler.client (appends in flight share stream messages); 1 and 3 nodes
  batch    3. batch appends: Potboiler AppendEntries of 100 vs JetStream publish_async in batches of 100
  lag      4. replication visibility lag at 1,000 writes/s, written on node 0, seen on node 2
  catchup  5. catch-up: entries/s for a member restarted after 100,000 entries were written without it
  queue    6. tasks/s end to end with 4 workers: RQ vs Pigtail over REST and its gRPC lease stream
              (WorkTasks: tasks leased and completed on one stream per worker)
           7. (always) the servers' resident memory at the end of every measurement

Every server runs on loopback on free ports with its data in one temporary directory, in its
shipped configuration (stated in the JSON under "configurations"), and is stopped at the end, on
errors, Ctrl-C and SIGTERM. Nothing is installed: a missing peer is named with the command that
installs it (buildscripts/bootstrap --bench) and its figures are skipped.

Prints one Markdown table on stdout (progress on stderr) and writes every figure to a JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from benchmarks import queue
from benchmarks.common import Bench, Json, load_average, progress
from benchmarks.peers import etcd as etcd_peer
from benchmarks.peers import missing, missing_message, redis_streams
from benchmarks.peers import nats as nats_peer
from benchmarks.peers import potboiler as potboiler_peer
from benchmarks.peers.etcd import EtcdCluster
from benchmarks.peers.nats import NatsCluster
from benchmarks.peers.potboiler import PotboilerCluster
from benchmarks.peers.redis_streams import RedisServer
from benchmarks.report import HIGHER, LOWER, Row, render_table, samples
from benchmarks.sections import (
    Contender,
    SectionResult,
    Settings,
    System,
    alternate,
    catchup,
    clients,
    compare_rows,
    lag,
    rest,
    tasks,
    throughput,
)

SECTIONS = ("rest", "acked", "batch", "lag", "catchup", "queue")
#: What each section needs besides Potboiler (it runs with any of these peers present).
SECTION_PEERS = {
    "rest": ("etcd",),
    "acked": ("etcd", "jetstream", "redis"),
    "batch": ("jetstream",),
    "lag": ("etcd", "jetstream"),
    "catchup": ("etcd", "jetstream"),
    "queue": ("rq",),
}
#: Tools a section cannot run without.
SECTION_TOOLS = {"rest": ("wrk",)}

DEFAULT = Settings(quick=False, reps=3, duration=4.0, warmup=1.0, lag_seconds=8.0)
QUICK = Settings(
    quick=True,
    reps=1,
    duration=1.5,
    warmup=0.5,
    lag_seconds=2.0,
    lag_grace=5.0,
    catch_up_entries=20_000,
    catch_up_reps=1,
    catch_up_timeout=60.0,
    queue_tasks=300,
    queue_warmup=50,
)

#: §2's and §4's second Potboiler contender: writes through an append stream (§2: potboiler.client's
#: StreamAppender; §4: a writer of one entry per stream message).
STREAM = "potboiler-stream"
#: The suffix of §2's rows for the StreamAppender.
STREAM_APPENDER = " (Potboiler: StreamAppender)"

#: The issue's goals: name -> (section, figure) of the rows whose peers Potboiler should match or beat.
GOALS = {
    "REST writes >= 1.0x etcd, 1 node": ("1", "REST writes/s, 1 node", ("etcd",)),
    "REST writes >= 1.0x etcd, 3 nodes": ("1", "REST writes/s, 3 nodes", ("etcd",)),
    "Python-client acked writes >= 1.0x JetStream, 1 node": (
        "2",
        f"acked writes/s, 1 node{STREAM_APPENDER}",
        ("JetStream",),
    ),
    "Python-client acked writes >= 1.0x JetStream, 3 nodes": (
        "2",
        f"acked writes/s, 3 nodes{STREAM_APPENDER}",
        ("JetStream",),
    ),
    "p99 replication lag <= etcd's and JetStream's": ("4", "lag p99", ("etcd", "JetStream")),
    "catch-up >= etcd and JetStream": ("5", "catch-up", ("etcd", "JetStream")),
    "queue >= 1.0x RQ (REST)": ("6", "tasks/s, Pigtail REST", ("RQ",)),
    "queue >= 1.0x RQ (lease stream)": ("6", "tasks/s, Pigtail lease stream (WorkTasks)", ("RQ",)),
}

#: Display names of the peers.
NAMES = {
    "etcd": "etcd",
    "jetstream": "JetStream",
    "redis": "Redis Streams",
    "rq": "RQ",
    "potboiler": "Potboiler",
}


def display(results: dict[str, list[Json]]) -> dict[str, list[Json]]:
    """Results keyed by display name (the table's peer column), Potboiler's kept as they are."""
    return {(k if k in ("potboiler", STREAM) else NAMES[k]): v for k, v in results.items()}


class Startable(System, Protocol):
    """A peer's servers, made but not started yet."""

    def start(self) -> object: ...


class Run:
    """One comparison run: the settings, the peers available, and the rows and figures gathered."""

    def __init__(
        self, settings: Settings, sections: Sequence[str], available: set[str], bench: Bench
    ) -> None:
        self.settings = settings
        self.sections = list(sections)
        self.available = available
        self.bench = bench
        self.rows: list[Row] = []
        self.figures: Json = {}

    def wants(self, section: str, peer: str | None = None) -> bool:
        return section in self.sections and (peer is None or peer in self.available)

    def add(self, key: str, result: SectionResult) -> None:
        self.rows += result.rows
        self.figures[key] = result.figures

    # -- topologies -----------------------------------------------------------------------------

    def single_node(self) -> None:
        """§1-§3 on one node of each system."""
        if not any(self.wants(s) for s in ("rest", "acked", "batch")):
            return
        root = self.bench.root
        progress("starting one node of each system")
        pot = PotboilerCluster(self.bench, 1, "single").start()
        etcd = self._start("etcd", lambda: EtcdCluster(root / "etcd-1", 1), ("rest", "acked"))
        nats = self._start("jetstream", lambda: NatsCluster(root / "nats-1", 1), ("acked", "batch"))
        redis = self._start("redis", lambda: RedisServer(root / "redis"), ("acked",))
        self._rest(1, pot, etcd)
        self._acked(1, pot, etcd, nats, redis)
        self._batch(1, pot, nats)
        for system in (pot, etcd, nats, redis):
            if system is not None:
                system.stop()

    def three_nodes(self) -> None:
        """§1-§5 on clusters of three."""
        if not any(self.wants(s) for s in ("rest", "acked", "batch", "lag", "catchup")):
            return
        root = self.bench.root
        progress("starting a 3-node cluster of each system")
        pot = PotboilerCluster(self.bench, 3, "three").start()
        etcd = self._start(
            "etcd", lambda: EtcdCluster(root / "etcd-3", 3), ("rest", "acked", "lag", "catchup")
        )
        nats = self._start(
            "jetstream", lambda: NatsCluster(root / "nats-3", 3), ("acked", "batch", "lag", "catchup")
        )
        self._rest(3, pot, etcd)
        self._acked(3, pot, etcd, nats, None)
        self._batch(3, pot, nats)
        self._lag(pot, etcd, nats)
        self._catch_up(pot, etcd, nats)
        for system in (pot, etcd, nats):
            if system is not None:
                system.stop()

    def _start(self, peer: str, make: Callable[[], Startable], sections: Sequence[str]) -> System | None:
        """Make and start `peer`'s servers if a chosen section needs them; they are handed to the bench
        before they start, so that they are stopped even if starting fails half-way."""
        if not any(self.wants(s, peer) for s in sections):
            return None
        progress(f"  {NAMES[peer]}")
        system = make()
        self.bench.adopt(system)
        system.start()
        return system

    # -- sections -------------------------------------------------------------------------------

    def _rest(self, size: int, pot: PotboilerCluster, etcd: System | None) -> None:
        if not self.wants("rest", "etcd") or etcd is None:
            return
        assert isinstance(etcd, EtcdCluster)
        s, root = self.settings, self.bench.root
        results = alternate(
            f"1. REST writes, {size} node(s)",
            s.reps,
            [
                Contender("etcd", etcd, functools.partial(rest.etcd_put, etcd.urls[0], s, etcd, root)),
                Contender(
                    "potboiler", pot, functools.partial(rest.potboiler_append, pot.urls[0], s, pot, root)
                ),
            ],
        )
        nodes = _nodes(size)
        named = display(results)
        result = SectionResult(
            compare_rows("1", f"REST writes/s, {nodes}", "writes/s", HIGHER, named, "writes_per_s", ["etcd"])
            + compare_rows(
                "1",
                f"REST server CPU per write, {nodes}",
                "µs",
                LOWER,
                named,
                "server_cpu_us_per_write",
                ["etcd"],
            ),
            results,
        )
        self.add(f"1_rest_{size}", result)

    def _acked(
        self, size: int, pot: PotboilerCluster, etcd: System | None, nats: System | None, redis: System | None
    ) -> None:
        if not self.wants("acked"):
            return
        s = self.settings

        def potboiler(client: Callable[[str], Any]) -> Callable[[], Json]:
            return functools.partial(
                throughput.measure, functools.partial(client, pot.targets[0]), s, pot, s.concurrency
            )

        # Potboiler is written to twice: unary AppendEntry per write (as the peers' clients do), and
        # through potboiler.client's StreamAppender, its Python client for many writes in flight.
        contenders = [
            Contender("potboiler", pot, potboiler(clients.potboiler_append)),
            Contender(STREAM, pot, potboiler(clients.potboiler_stream_append)),
        ]
        if isinstance(etcd, EtcdCluster):
            client = functools.partial(clients.etcd_put, etcd.targets[0])
            contenders.insert(
                0,
                Contender(
                    "etcd", etcd, functools.partial(throughput.measure, client, s, etcd, s.concurrency)
                ),
            )
        if isinstance(nats, NatsCluster):
            client = functools.partial(clients.jetstream_publish, nats.urls[0])
            contenders.insert(
                0,
                Contender(
                    "jetstream", nats, functools.partial(throughput.measure, client, s, nats, s.concurrency)
                ),
            )
        if isinstance(redis, RedisServer):
            client = functools.partial(clients.redis_xadd, redis.url, s.concurrency)
            contenders.insert(
                0,
                Contender(
                    "redis", redis, functools.partial(throughput.measure, client, s, redis, s.concurrency)
                ),
            )
        if len(contenders) == 2:
            return
        results = display(alternate(f"2. acked writes, {size} node(s)", s.reps, contenders))
        nodes = _nodes(size)
        peers = ["etcd", "JetStream", "Redis Streams"]
        rows = []
        for potboiler_key, suffix in (("potboiler", ""), (STREAM, STREAM_APPENDER)):
            rows += compare_rows(
                "2",
                f"acked writes/s, {nodes}{suffix}",
                "writes/s",
                HIGHER,
                results,
                "writes_per_s",
                peers,
                potboiler_key,
            )
            rows += compare_rows(
                "2",
                f"server CPU per acked write, {nodes}{suffix}",
                "µs",
                LOWER,
                results,
                "server_cpu_us_per_write",
                peers,
                potboiler_key,
            )
        rows += compare_rows("7", f"server RSS after §2, {nodes}", "MB", LOWER, results, "rss_mb", peers)
        self.add(f"2_acked_{size}", SectionResult(rows, results))

    def _batch(self, size: int, pot: PotboilerCluster, nats: System | None) -> None:
        if not self.wants("batch", "jetstream") or not isinstance(nats, NatsCluster):
            return
        s = self.settings
        pb_client = functools.partial(clients.potboiler_batch, pot.targets[0], s.batch)
        js_client = functools.partial(clients.jetstream_batch, nats.urls[0], s.batch)
        results = display(
            alternate(
                f"3. batches of {s.batch}, {size} node(s)",
                s.reps,
                [
                    Contender(
                        "jetstream",
                        nats,
                        functools.partial(throughput.measure, js_client, s, nats, s.batches_in_flight),
                    ),
                    Contender(
                        "potboiler",
                        pot,
                        functools.partial(throughput.measure, pb_client, s, pot, s.batches_in_flight),
                    ),
                ],
            )
        )
        figure = f"batch appends ({s.batch}/batch, {s.batches_in_flight} in flight), {_nodes(size)}"
        rows = compare_rows("3", figure, "entries/s", HIGHER, results, "writes_per_s", ["JetStream"])
        # Beside the rate: a client-bound peer shows as a low rate at a low server cost per entry.
        rows += compare_rows(
            "3",
            f"server CPU per entry in batches, {_nodes(size)}",
            "µs",
            LOWER,
            results,
            "server_cpu_us_per_write",
            ["JetStream"],
        )
        self.add(f"3_batch_{size}", SectionResult(rows, results))

    def _lag(self, pot: PotboilerCluster, etcd: System | None, nats: System | None) -> None:
        if not self.wants("lag"):
            return
        s = self.settings
        contenders = []
        if isinstance(etcd, EtcdCluster) and self.wants("lag", "etcd"):
            writer = functools.partial(lag.etcd_writer, etcd.targets[0])
            contenders.append(
                Contender(
                    "etcd", etcd, functools.partial(lag.measure, "etcd", writer, etcd.targets[2], 0, s, etcd)
                )
            )
        if isinstance(nats, NatsCluster) and self.wants("lag", "jetstream"):
            writer = functools.partial(lag.jetstream_writer, nats.urls[0])
            contenders.append(
                Contender(
                    "jetstream",
                    nats,
                    functools.partial(lag.measure, "jetstream", writer, nats.urls[2], 0, s, nats),
                )
            )
        if not contenders:
            return

        def potboiler_lag(make_writer: Callable[[str, str], Any]) -> Json:
            after = int(str(pot.status(2).get("delivered_position", 0)))
            writer = functools.partial(make_writer, pot.targets[0])
            return lag.measure("potboiler", writer, pot.targets[2], after, s, pot)

        # Potboiler is written to twice: unary AppendEntry per write (as the peers' clients do), and
        # an AppendEntryStream (one entry per message), its API for a steady writer.
        contenders[1:1] = [
            Contender("potboiler", pot, functools.partial(potboiler_lag, lag.potboiler_writer)),
            Contender(STREAM, pot, functools.partial(potboiler_lag, lag.potboiler_stream_writer)),
        ]
        results = display(alternate(f"4. replication lag at {s.lag_rate}/s, 3 nodes", s.reps, contenders))
        peers = ["etcd", "JetStream"]
        rows = []
        for potboiler, suffix in (("potboiler", ""), (STREAM, " (Potboiler: stream writer)")):
            for key, name in (
                ("lag_p50_ms", "lag p50"),
                ("lag_p99_ms", "lag p99"),
                ("lag_max_ms", "lag max"),
            ):
                figure = f"{name} at {s.lag_rate}/s, node 0 → node 2{suffix}"
                rows += compare_rows("4", figure, "ms", LOWER, results, key, peers, potboiler)
            for key, name in (
                ("lost", "writes lost (acked, never seen on node 2)"),
                ("duplicates", "writes seen twice on node 2"),
                ("errors", "writes failed on node 0"),
            ):
                rows += compare_rows(
                    "4", f"{name}{suffix}", "count", LOWER, results, key, peers, potboiler, judged_by="max"
                )
        self.add("4_lag", SectionResult(rows, results))

    def _catch_up(self, pot: PotboilerCluster, etcd: System | None, nats: System | None) -> None:
        if not self.wants("catchup"):
            return
        s = self.settings
        contenders = []
        if isinstance(etcd, EtcdCluster) and self.wants("catchup", "etcd"):
            contenders.append(Contender("etcd", etcd, functools.partial(catchup.etcd, etcd, s)))
        if isinstance(nats, NatsCluster) and self.wants("catchup", "jetstream"):
            contenders.append(Contender("jetstream", nats, functools.partial(catchup.jetstream, nats, s)))
        if not contenders:
            return
        contenders.insert(1, Contender("potboiler", pot, functools.partial(catchup.potboiler, pot, s)))
        results = display(
            alternate(f"5. catch-up of {s.catch_up_entries:,} entries, 3 nodes", s.catch_up_reps, contenders)
        )
        peers = ["etcd", "JetStream"]
        rows = compare_rows(
            "5",
            f"catch-up of {s.catch_up_entries:,} entries, from restart",
            "entries/s",
            HIGHER,
            results,
            "entries_per_s",
            peers,
        )
        rows += compare_rows("7", "server RSS after §5, 3 nodes", "MB", LOWER, results, "rss_mb", peers)
        self.add("5_catch_up", SectionResult(rows, results))

    def queue(self) -> None:
        """§6 on one Potboiler node and RQ's Redis."""
        if not self.wants("queue", "rq"):
            return
        s = self.settings
        progress("starting a Potboiler node and RQ's redis-server")
        pot = PotboilerCluster(self.bench, 1, "queue").start()
        node = pot.nodes[0]
        with queue.redis_server() as (url, pid):
            redis = tasks.RedisPid(pid)
            results = alternate(
                f"6. queue, {queue.WORKERS} workers",
                s.reps,
                [
                    Contender("rq", redis, functools.partial(tasks.rq, url, pid, s)),
                    Contender("pigtail_rest", pot, functools.partial(tasks.pigtail_rest, node, s)),
                    Contender("pigtail_work", pot, functools.partial(tasks.pigtail_work, node, s)),
                ],
            )
        pot.stop()
        rq = samples(results["rq"], "tasks_per_s")
        rows = [
            Row(
                "6",
                "tasks/s, Pigtail REST",
                "tasks/s",
                "RQ",
                HIGHER,
                rq,
                samples(results["pigtail_rest"], "tasks_per_s"),
                peer_runs=len(results["rq"]),
                potboiler_runs=len(results["pigtail_rest"]),
            ),
            Row(
                "6",
                "tasks/s, Pigtail lease stream (WorkTasks)",
                "tasks/s",
                "RQ",
                HIGHER,
                rq,
                samples(results["pigtail_work"], "tasks_per_s"),
                peer_runs=len(results["rq"]),
                potboiler_runs=len(results["pigtail_work"]),
            ),
            Row(
                "7",
                "server RSS after §6 (RQ: redis-server)",
                "MB",
                "RQ",
                LOWER,
                samples(results["rq"], "rss_mb"),
                samples(results["pigtail_rest"] + results["pigtail_work"], "rss_mb"),
            ),
        ]
        self.add("6_queue", SectionResult(rows, results))


def _nodes(size: int) -> str:
    return "1 node" if size == 1 else f"{size} nodes"


# -- the run ----------------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def goals(rows: Sequence[Row]) -> Json:
    """Each goal of the issue: met when Potboiler's median is at least as good as every named peer's."""
    out: Json = {}
    for name, (section, figure, peers) in GOALS.items():
        matching = [
            r for r in rows if r.section == section and r.figure.startswith(figure) and r.peer in peers
        ]
        verdicts = [r.potboiler_ahead for r in matching]
        out[name] = None if not verdicts or None in verdicts else all(verdicts)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: short phases, one repetition")
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only these sections (repeatable)"
    )
    parser.add_argument(
        "--json", type=Path, help="where to write the figures (default build/compare-<date>.json)"
    )
    parser.add_argument("--reps", type=int, help="repetitions of each throughput and lag figure")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, data)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = QUICK if args.quick else DEFAULT
    if args.reps:
        settings = Settings(**{**settings.__dict__, "reps": args.reps})
    sections = args.only or list(SECTIONS)
    needed = sorted({p for s in sections for p in (*SECTION_PEERS[s], *SECTION_TOOLS.get(s, ()))})
    lacking = missing(needed)
    if lacking:
        print(missing_message(lacking), file=sys.stderr)
    available = {p for p in needed if p not in lacking}
    runnable = [
        s
        for s in sections
        if all(t in available for t in SECTION_TOOLS.get(s, ()))
        and any(p in available for p in SECTION_PEERS[s])
    ]
    if not runnable:
        print("Nothing to compare: every section chosen lacks its peers or tools.", file=sys.stderr)
        return 2
    now = datetime.datetime.now().astimezone()
    json_path = args.json or Path("build") / f"compare-{now:%Y-%m-%d-%H%M}.json"
    result: Json = {
        "benchmark": "compare",
        "date": now.isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version()},
        "load_average_at_start": load_average(),
        "settings": settings.__dict__,
        "sections": runnable,
        "skipped": {name: [n.describe() for n in needs] for name, needs in lacking.items()},
        "configurations": {
            "potboiler": potboiler_peer.CONFIG,
            "etcd": etcd_peer.CONFIG,
            "jetstream": nats_peer.CONFIG,
            "redis_streams": redis_streams.CONFIG,
            "rq": tasks.RQ_CONFIG,
            "clients": {
                "rest": "wrk -t2 -c32, one request body per system (the same JSON event)",
                "python": "one asyncio process: grpc.aio for etcd (API subset compiled at run time) and "
                "Potboiler (the node's own gRPC port), nats-py for JetStream, redis-py asyncio for Redis",
            },
        },
    }
    began = time.monotonic()
    run: Run | None = None
    try:
        with Bench(keep=args.keep) as bench:
            if args.keep:
                progress(f"data and logs in {bench.root}")
            run = Run(settings, runnable, available, bench)
            run.single_node()
            run.three_nodes()
            run.queue()
    except KeyboardInterrupt:
        progress("interrupted; everything started was stopped")
        return 130
    result["load_average_at_end"] = load_average()
    result["total_seconds"] = round(time.monotonic() - began, 1)
    result["goals"] = goals(run.rows)
    rows = sorted(run.rows, key=lambda r: r.section)  # stable: each section's rows in measured order
    result["rows"] = [row.to_json() for row in rows]
    result["figures"] = run.figures
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(render_table(rows))
    print()
    for name, met in result["goals"].items():
        print(f"- {name}: {'met' if met else 'not met' if met is False else 'not measured'}")
    progress(f"figures in {json_path} ({result['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
