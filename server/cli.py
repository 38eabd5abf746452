"""The `potboiler` command: run a node or a local cluster, or show a node's status."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from potboiler.server.gateway import Ports
from potboiler.server.node import Node, NodeConfig

log = logging.getLogger("potboiler")


def _common(parser: argparse.ArgumentParser, data_dir: str) -> None:
    parser.add_argument("--base-port", type=int, default=8000, help="base port B (default 8000)")
    parser.add_argument("--data-dir", type=Path, default=Path(data_dir), help=f"data directory (default {data_dir})")
    parser.add_argument("--peer", action="append", default=[], help="root URL of a node to join (repeatable)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1)")
    parser.add_argument("--fsync", action="store_true", help="sync every write batch to disk (survives power loss)")
    parser.add_argument("--log-level", default="INFO", help="log level (default INFO)")


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
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def terminate(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, terminate)
    signal.signal(signal.SIGTERM, terminate)
    for i, url in enumerate(urls):
        cmd = [
            sys.executable, "-m", "potboiler.server.cli", "node",
            "--base-port", str(args.base_port + 100 * i),
            "--data-dir", str(args.data_dir / f"node{i}"),
            "--host", args.host,
            "--log-level", args.log_level,
        ]  # fmt: skip
        cmd += [arg for peer in urls if peer != url for arg in ("--peer", peer)]
        cmd += ["--fsync"] if args.fsync else []
        # Each node runs in its own process group so Ctrl-C reaches it only through us, once.
        children.append(subprocess.Popen(cmd, start_new_session=True))
    print(f"cluster of {args.nodes} nodes; Ctrl-C stops them all", flush=True)
    code = 0
    while children and not stopping:
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                if child.wait(timeout=0.2) != 0:
                    code = child.returncode
                    print(f"node process {child.pid} exited with {code}; stopping the cluster", file=sys.stderr)
                    terminate(signal.SIGTERM, None)
                    break
    for child in children:
        try:
            child.wait(timeout=15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
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
    if args.command == "cluster":
        return run_cluster(args)
    config = NodeConfig(
        data_dir=args.data_dir, host=args.host, base_port=args.base_port, peers=args.peer, fsync=args.fsync
    )
    asyncio.run(run_node(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
