"""KV benchmark: REST sets and gets through Envoy, and the rate of rebuilding KV state from the log.

    .venv/bin/python -m benchmarks.kv [--rounds 3] [--duration 5] [--concurrency 32] [--keys 1] [--rebuild-events 200000]

1. Starts one `potboiler node` process (with its Envoy) on free ports in a temporary directory and creates
   the LWW table `t`.
2. Sets: `POST /kv/t/k` with `{"op": "set", "change": {...}}` on the KV port (B+1) at `--concurrency`
   concurrent connections for `--duration` seconds (with `--keys N`, the keys k0..k{N-1} in turn). Each
   answer is a 200 once the write is durable in the log (reads on the node wait until it is applied).
3. Gets: `GET /kv/t/k` the same way.
   For both, the CPU time the node process (and, in `cpu`, each process of its tree: the node and its
   Envoy) spent per successful (2xx) request, which other work on the machine skews much less than
   requests/s.
   Both use wrk when it is installed (`wrk -t2 -c32`, the load generator's CPU kept apart from Python),
   else an asyncio httpx client; the output says which.
4. For scale, unless --no-reference: the same wrk load on the core log's `POST /log` and `GET /log`.
5. Rebuild: the node is stopped, its log is topped up to `--rebuild-events` entries with KV events (sets
   spread over 10,000 keys, appended straight to the log in batches; the entries already there count,
   among them the plain entries of step 4's `POST /log`), then the log is reopened (so every entry is
   read from its store, as after a restart) and a fresh KV state (empty store) is built from the whole
   log exactly as a node rebuilds after losing its `kv` folder: the log subscription from
   position 0 feeding `KvService.apply` (read entries, apply, one store write per batch with the cursor).
   The figures are KV events applied per second of wall time and per second of CPU time (the latter
   is less sensitive to other work on the machine); the log's other entries are read and skipped in
   that time but not counted.

Sets and gets alternate for `--rounds` rounds, and the rebuild is made `--rounds` times (each into a
fresh KV store, from the same log; the first may run while RocksDB still compacts the log just
written, the later ones on the settled store). Each figure is the median run, with every run's figure
beside it (`runs_per_s`, `runs_events_per_s`): on these shared 2-core machines one run can be tens of
percent off the next.

Prints one JSON object with the figures beside their targets (>= 2,500 sets/s, >= 4,000 gets/s,
>= 50,000 KV events/s applied). Progress goes to stderr. A 2-core machine shares its cores between the load
generator, Envoy and the node, so these are whole-system figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import uvloop
from google.protobuf.struct_pb2 import Value

from benchmarks.common import Bench, CpuWindow, cpu_seconds, median_run
from potboiler.kv.crdts import CrdtType
from potboiler.kv.events import KvEvent
from potboiler.kv.service import APPLY_BATCH, KvService
from potboiler.server.entries import NewEntry
from potboiler.server.jsonvalue import to_value
from potboiler.server.logclient import LocalLogClient
from potboiler.server.node import Node, NodeConfig
from potboiler.server.plugin import NodeContext
from potboiler.server.processes import NodeProcess

Json = dict[str, Any]

TARGETS = {"sets_per_s": 2500.0, "gets_per_s": 4000.0, "rebuild_events_per_s": 50000.0}


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def figure(value: float, target: float) -> Json:
    return {"value": round(value, 1), "target": f">= {target:g}", "meets_target": value >= target}


# -- REST load -------------------------------------------------------------------------------------

_WRK_SET = """
counter = 0
keys = {keys}
request = function()
  counter = counter + 1
  local path = "/kv/t/k"
  if keys > 1 then path = "/kv/t/k" .. (counter % keys) end
  local body = '{{"op": "set", "change": {{"n": ' .. counter .. ', "text": "hello"}}}}'
  return wrk.format("POST", path, {{["Content-Type"] = "application/json"}}, body)
end
"""


_WRK_LOG = """
wrk.method = "POST"
wrk.body = '{"n": 1, "text": "hello"}'
wrk.headers["Content-Type"] = "application/json"
"""


def _wrk_figures(output: str, duration: float) -> Json:
    """Requests/s, errors and latency from wrk's text report."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: (.*)", output)
    latency = re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", output)
    failed = int(non_2xx.group(1)) if non_2xx else 0
    out: Json = {
        "requests": total,
        # Answered requests only: wrk's rate counts the failed ones too.
        "per_s": round(rps * (total - failed) / total, 1) if total else 0.0,
        "non_2xx": failed,
    }
    if socket_errors:
        out["socket_errors"] = socket_errors.group(1).strip()
    if latency:
        out["latency"] = {"mean": latency.group(1), "stdev": latency.group(2), "max": latency.group(3)}
    return out


def wrk_load(url: str, *, method: str, keys: int, concurrency: int, duration: float, workdir: Path) -> Json:
    cmd = ["wrk", "-t2", f"-c{concurrency}", f"-d{duration:g}s", "--latency", "--timeout", "10s"]
    if method == "POST":
        script = workdir / "set.lua"
        script.write_text(_WRK_SET.format(keys=keys))
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    return _wrk_figures(out, duration)


async def httpx_load(base: str, *, method: str, keys: int, concurrency: int, duration: float) -> Json:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    errors = 0
    counter = 0
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10.0) as client:
        loop = asyncio.get_running_loop()
        end = loop.time() + duration

        async def worker() -> None:
            nonlocal errors, counter
            while loop.time() < end:
                counter += 1
                key = f"k{counter % keys}" if keys > 1 else "k"
                began = loop.time()
                if method == "POST":
                    body = {"op": "set", "change": {"n": counter, "text": "hello"}}
                    response = await client.post(f"/kv/t/{key}", json=body)
                else:
                    response = await client.get(f"/kv/t/{key}")
                if response.status_code == 200:
                    latencies.append(loop.time() - began)
                else:
                    errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    latencies.sort()
    return {
        "requests": len(latencies) + errors,
        "per_s": round(len(latencies) / duration, 1),
        "non_2xx": errors,
        "latency_ms": {
            "median": round(1000 * latencies[len(latencies) // 2], 2) if latencies else None,
            "p99": round(1000 * latencies[int(len(latencies) * 0.99)], 2) if latencies else None,
        },
    }


def rest_load(
    node: NodeProcess, kv_url: str, method: str, args: argparse.Namespace, client: str, root: Path
) -> Json:
    """One REST load of sets (POST) or gets (GET) on /kv/t/k, with the CPU its node spent per successful
    request."""
    assert node.process is not None
    pid = node.process.pid
    window, node_cpu = CpuWindow(pid), cpu_seconds(pid)
    window.begin()
    if client == "wrk":
        load = wrk_load(
            f"{kv_url}/kv/t/k",
            method=method,
            keys=args.keys,
            concurrency=args.concurrency,
            duration=args.duration,
            workdir=root,
        )
    else:
        load = uvloop.run(
            httpx_load(
                kv_url, method=method, keys=args.keys, concurrency=args.concurrency, duration=args.duration
            )
        )
    window.end()
    # Per successful (2xx) request, as benchmarks.wrk.succeeded counts them, failed ones left out.
    succeeded = load["requests"] - load["non_2xx"]
    load["cpu"] = {
        "node_cpu_us_per_request": round(1e6 * (cpu_seconds(pid) - node_cpu) / succeeded, 1)
        if succeeded
        else None,
        **window.figures(succeeded),
    }
    return load


# -- rebuild ---------------------------------------------------------------------------------------


def set_event(table: str, key: str, n: int) -> Value:
    event = KvEvent(table, key, CrdtType.LWW, "set", {"op": "set", "value": {"n": n, "text": "hello"}})
    return to_value(event.to_json())


def _log_node(data_dir: Path) -> Node:
    return Node(NodeConfig(data_dir=data_dir, gateway=False, metrics=False, grpc_port=0, services=[]))


async def top_up(data_dir: Path, events: int) -> None:
    """Append KV set events to the node's log until it holds `events` entries."""
    node = _log_node(data_dir)
    await node.start()
    try:
        have = node.log.position
        if have < events:
            progress(f"appending {events - have} KV events to the log (it holds {have})")
        n = 0
        while node.log.position < events:
            batch = min(1000, events - node.log.position)
            await node.appender.append(
                [
                    NewEntry(set_event("t", f"r{(n + i) % 10_000}", n + i).SerializeToString())
                    for i in range(batch)
                ]
            )
            n += batch
    finally:
        await node.stop()


async def rebuild(data_dir: Path, events: int, scratch: Path) -> Json:
    """Top the node's log up to `events` entries, then time a KV rebuild from position 0. The rates
    count the KV events applied: the log's other entries (plain `POST /log` appends) are read and
    skipped, in the time measured, but are not KV events.

    The rebuild runs on a node opened afresh, as after a restart: it reads every entry from the log's
    store. (Rebuilding in the process that just appended would read the newest entries, up to the
    appender's in-memory tail of 20,000, without touching the store, which flattered small runs.)"""
    await top_up(data_dir, events)
    node = _log_node(data_dir)
    await node.start()
    try:
        target = node.log.position
        client = LocalLogClient(node.appender)
        service = KvService(NodeContext(client, scratch, node.log.clock))
        progress(f"rebuilding KV state from {target} log entries")
        started = time.perf_counter()
        cpu_started = time.process_time()
        async for batch_ in client.subscribe(0, APPLY_BATCH):
            service.apply(batch_)
            if service.state.position >= target:
                break
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        applied = service.state.events_applied
        await service.stop()
    finally:
        await node.stop()
    return {
        "log_entries": target,
        "kv_events_applied": applied,
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu, 3),
        "events_per_s": round(applied / seconds, 1),
        "events_per_cpu_s": round(applied / cpu, 1) if cpu else None,
        "how": "log subscription from position 0 into KvService.apply on an empty store, in-process; "
        "per second: KV events applied (kv_events_applied), not log entries read (log_entries)",
    }


# -- main ------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of each REST load")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of sets, gets and rebuild; medians reported (default 3)"
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--keys", type=int, default=1, help="sets go to k (1) or to k0..k{N-1}")
    parser.add_argument(
        "--rebuild-events",
        type=int,
        default=200_000,
        help="log entries to rebuild from: the log is topped up to this many with KV sets (default 200000)",
    )
    parser.add_argument("--client", choices=["auto", "wrk", "httpx"], default="auto")
    parser.add_argument(
        "--no-reference", dest="reference", action="store_false", help="skip the core POST/GET /log reference"
    )
    args = parser.parse_args()
    client = args.client
    if client == "auto":
        client = "wrk" if shutil.which("wrk") else "httpx"

    result: Json = {
        "benchmark": "kv",
        "client": client,
        "cores": os.cpu_count(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    # The node runs in its own session: the bench stops it and removes the temporary directory at the
    # end, on errors, Ctrl-C and SIGTERM.
    with Bench() as bench:
        root = bench.root
        progress(f"starting a node in {root}")
        node = bench.start_node(name="node")
        kv_url = node.port_url(node.ports.kv)
        created = httpx.post(
            f"{kv_url}/kv/_config/t", json={"op": "set", "change": {"crdt": "LWW"}}, timeout=30
        )
        assert created.status_code == 200, created.text
        runs: dict[str, list[Json]] = {"sets": [], "gets": []}
        for round_ in range(1, args.rounds + 1):
            for name, method in (("sets", "POST"), ("gets", "GET")):
                progress(
                    f"round {round_}: {name}: {method} /kv/t/k at {args.concurrency} concurrent "
                    f"for {args.duration:g}s ({client})"
                )
                runs[name].append(rest_load(node, kv_url, method, args, client, root))
                progress(f"  {runs[name][-1]['per_s']}/s")
        loads = {name: median_run(rs, "per_s") for name, rs in runs.items()}
        if client == "wrk" and args.reference:
            # The same load on the core log's REST paths, for scale: what this machine gives right now
            # to a plain append (POST /log, no KV work) and a plain read (GET /log).
            core = node.url
            ref_script = root / "log.lua"
            ref_script.write_text(_WRK_LOG)
            progress("reference: POST /log and GET /log with the same load")
            result["core_reference"] = {
                "post_log": _wrk_figures(
                    subprocess.run(
                        [
                            "wrk",
                            "-t2",
                            f"-c{args.concurrency}",
                            f"-d{args.duration:g}s",
                            "-s",
                            str(ref_script),
                            f"{core}/log",
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout,
                    args.duration,
                ),
                "get_log": wrk_load(
                    f"{core}/log",
                    method="GET",
                    keys=1,
                    concurrency=args.concurrency,
                    duration=args.duration,
                    workdir=root,
                ),
            }
        check = httpx.get(f"{kv_url}/kv/t/k", timeout=30)
        result["last_value"] = check.json()
        node.stop()
        rebuilds = []
        for round_ in range(1, args.rounds + 1):
            scratch = root / f"kv-rebuild-{round_}"
            rebuilds.append(uvloop.run(rebuild(root / "node", args.rebuild_events, scratch)))
            shutil.rmtree(scratch, ignore_errors=True)
            progress(f"round {round_}: rebuild: {rebuilds[-1]['events_per_s']} KV events/s")
        rebuilt = median_run(rebuilds, "events_per_s")
        result["sets"] = {**loads["sets"], "target": figure(loads["sets"]["per_s"], TARGETS["sets_per_s"])}
        result["gets"] = {**loads["gets"], "target": figure(loads["gets"]["per_s"], TARGETS["gets_per_s"])}
        result["rebuild"] = {
            **rebuilt,
            "target": figure(rebuilt["events_per_s"], TARGETS["rebuild_events_per_s"]),
        }
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; node stopped", file=sys.stderr)
        sys.exit(130)
