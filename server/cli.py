"""The `potboiler` command: run a node or a local cluster, or show a node's status."""

from __future__ import annotations

import os

# Envoy is forked from a process that runs gRPC threads; grpc's fork handlers are not needed for
# that (the child execs at once), and without this grpc warns on every node start.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import argparse
import asyncio
import logging
import signal
import sys
import threading
from pathlib import Path

from potboiler.server.gateway import Ports
from potboiler.server.hlc import HybridClock, skewed_clock
from potboiler.server.node import Node, NodeConfig
from potboiler.server.processes import NodeProcess

log = logging.getLogger("potboiler")


def _common(parser: argparse.ArgumentParser, data_dir: str) -> None:
    parser.add_argument("--base-port", type=int, default=8000, help="base port B (default 8000)")
    parser.add_argument(
        "--data-dir", type=Path, default=Path(data_dir), help=f"data directory (default {data_dir})"
    )
    parser.add_argument("--peer", action="append", default=[], help="root URL of a node to join (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    parser.add_argument(
        "--fsync", action="store_true", help="sync every write batch to disk (survives power loss)"
    )
    parser.add_argument("--log-level", default="INFO", help="log level (default INFO)")
    parser.add_argument(
        "--no-gossip", action="store_true", help="do not learn peers from other nodes (static membership)"
    )
    parser.add_argument(
        "--clock-skew-ms",
        type=int,
        default=0,
        help="offset added to this node's physical clock (for fault-injection tests; default 0)",
    )


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="potboiler", description="Potboiler: an AP event-sourcing system.")
    sub = p.add_subparsers(dest="command", required=True)
    node = sub.add_parser("node", help="run one node (log, KV, Pigtail and its Envoy gateway)")
    _common(node, "data")
    cluster = sub.add_parser("cluster", help="run N nodes on this machine, peered with each other")
    cluster.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    _common(cluster, "data")
    status = sub.add_parser("status", help="show a node's replication status")
    status.add_argument("--url", default="http://127.0.0.1:8000", help="the node's root URL")
    return p


def ports_line(host: str, base: int) -> str:
    """Where a node's ports are, for people."""
    ports = Ports(base)
    return (
        f"REST http://{host}:{ports.core}  KV http://{host}:{ports.kv}  browser http://{host}:{ports.browser}  "
        f"Pigtail http://{host}:{ports.pigtail}  gRPC {host}:{ports.grpc}  metrics http://{host}:{ports.metrics}"
    )


async def run_node(config: NodeConfig) -> None:
    """Run a node until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    node = Node(config)
    try:
        await node.start()
        print(f"node {node.log.node_id}: {ports_line(config.host, config.base_port)}", flush=True)
        await stop.wait()
    finally:
        await node.stop()


def run_cluster(args: argparse.Namespace) -> int:
    """Run N node processes, each peered with the others, until SIGINT or SIGTERM."""
    if args.nodes < 1:
        print("--nodes must be at least 1", file=sys.stderr)
        return 2
    urls = [f"http://{args.host}:{args.base_port + 100 * i}" for i in range(args.nodes)]
    extra = ["--log-level", args.log_level] + (["--fsync"] if args.fsync else [])
    extra += ["--no-gossip"] if args.no_gossip else []
    nodes = [
        NodeProcess(
            args.data_dir / f"node{i}",
            args.base_port + 100 * i,
            host=args.host,
            peers=[u for u in urls if u != url],
            extra_args=extra,
            log_file=args.data_dir / f"node{i}.log",
        )
        for i, url in enumerate(urls)
    ]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.set())
    code = 0
    try:
        for node in nodes:
            node.start(wait=False)
        for i, node in enumerate(nodes):
            node.wait_ready()
            print(f"node{i}: {ports_line(args.host, node.ports.base)}  (log {node.log_file})", flush=True)
        print(f"cluster of {args.nodes} nodes is up; Ctrl-C stops them all", flush=True)
        while not stop.wait(0.5):
            if dead := [n for n in nodes if not n.alive()]:
                print(f"a node exited (see {dead[0].log_file}); stopping the cluster", file=sys.stderr)
                code = 1
                break
    except (RuntimeError, TimeoutError) as exc:
        print(f"cluster failed to start: {exc}", file=sys.stderr)
        code = 1
    finally:
        for node in nodes:
            node.signal(signal.SIGTERM) if node.alive() else None
        for node in nodes:
            node.stop()
    return code


def show_status(url: str) -> int:
    """Print a node's status as JSON."""
    import httpx

    response = httpx.get(f"{url.rstrip('/')}/status", timeout=5)
    print(response.text)
    return 0 if response.is_success else 1


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `potboiler` console script."""
    args = parser().parse_args(argv)
    if args.command == "status":
        return show_status(args.url)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format=f"%(asctime)s {os.getpid()} %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "cluster":
        return run_cluster(args)
    config = NodeConfig(
        data_dir=args.data_dir,
        host=args.host,
        base_port=args.base_port,
        peers=args.peer,
        fsync=args.fsync,
        gossip=not args.no_gossip,
        clock=HybridClock(skewed_clock(args.clock_skew_ms)) if args.clock_skew_ms else None,
    )
    try:
        asyncio.run(run_node(config))
    except OSError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
