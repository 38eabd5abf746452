"""The `potboiler` command: run a node or a local cluster, or show a node's status."""

from __future__ import annotations

import os

# Envoy is forked from a process that runs gRPC threads; grpc's fork handlers are not needed for
# that (the child execs at once), and without this grpc warns on every node start.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import argparse
import asyncio
import gc
import logging
import resource
import signal
import sys
import tempfile
import threading
from pathlib import Path

import uvloop

from potboiler.server.config_files import SecurityConfigError
from potboiler.server.errors import InvalidArgument, PotboilerError
from potboiler.server.grpc_errors import quiet_client_gone
from potboiler.server.hlc import HybridClock, skewed_clock
from potboiler.server.node import Node, NodeConfig
from potboiler.server.ports import Ports, cluster_bases
from potboiler.server.processes import NodeProcess
from potboiler.server.security import SecurityConfig
from potboiler.server.tls import RestTlsFiles, TlsFiles, tls_context_for
from potboiler.server.tokens import PeerToken, Role, TokenStore, token_line
from potboiler.server.urls import node_url, url_host
from potboiler.server.webhook_policy import AllowedTarget, PolicyMode, WebhookPolicy

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
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        help="log level (default INFO)",
    )
    parser.add_argument(
        "--no-gossip", action="store_true", help="do not learn peers from other nodes (static membership)"
    )
    parser.add_argument(
        "--clock-skew-ms",
        type=int,
        default=0,
        # Offset added to this node's physical clock, for the fault-injection tests: not for users.
        help=argparse.SUPPRESS,
    )
    _security_flags(parser)


def _security_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security (all off by default; see the README, 'Running it safely')")
    group.add_argument("--tls-ca", type=Path, help="mTLS between nodes: the cluster CA certificate (PEM)")
    group.add_argument("--tls-cert", type=Path, help="mTLS: this node's certificate (PEM), naming its host")
    group.add_argument("--tls-key", type=Path, help="mTLS: this node's private key (PEM)")
    group.add_argument(
        "--auth-tokens",
        type=Path,
        help="require bearer tokens: a file of '<sha256 hex> <read|write|admin>' lines (see hash-token)",
    )
    group.add_argument(
        "--peer-token", help="admin token sent when dialing peers that require tokens (without mTLS)"
    )
    group.add_argument(
        "--peer-token-file", type=Path, help="file holding the peer token (instead of --peer-token)"
    )
    group.add_argument(
        "--rest-tls-cert", type=Path, help="serve the REST ports over HTTPS with this certificate"
    )
    group.add_argument("--rest-tls-key", type=Path, help="the private key of --rest-tls-cert")
    group.add_argument(
        "--webhook-policy",
        choices=[m.value for m in PolicyMode],
        default=PolicyMode.ALLOW_ALL.value,
        help="which webhook targets are allowed (default allow-all)",
    )
    group.add_argument(
        "--webhook-allow",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="a webhook target admitted by --webhook-policy allowlist (repeatable)",
    )


#: The security flags `potboiler cluster` passes on to each node: (attribute, flag).
_FORWARDED = [
    ("tls_ca", "--tls-ca"),
    ("tls_cert", "--tls-cert"),
    ("tls_key", "--tls-key"),
    ("auth_tokens", "--auth-tokens"),
    ("peer_token_file", "--peer-token-file"),
    ("rest_tls_cert", "--rest-tls-cert"),
    ("rest_tls_key", "--rest-tls-key"),
]


def security_config(args: argparse.Namespace) -> SecurityConfig:
    """The security settings from the command line; SecurityConfigError if they do not fit."""
    tls_files = (args.tls_ca, args.tls_cert, args.tls_key)
    tls = None
    if any(tls_files):
        if not all(tls_files):
            raise SecurityConfigError("mTLS needs all of --tls-ca, --tls-cert and --tls-key")
        tls = TlsFiles(args.tls_ca, args.tls_cert, args.tls_key)
    rest_tls = None
    if args.rest_tls_cert or args.rest_tls_key:
        if not (args.rest_tls_cert and args.rest_tls_key):
            raise SecurityConfigError("HTTPS for REST needs both --rest-tls-cert and --rest-tls-key")
        rest_tls = RestTlsFiles(args.rest_tls_cert, args.rest_tls_key)
    peer_token = PeerToken(args.peer_token) if args.peer_token else None
    if args.peer_token_file is not None:
        if peer_token:
            raise SecurityConfigError("give --peer-token or --peer-token-file, not both")
        peer_token = PeerToken.load(args.peer_token_file)
    return SecurityConfig(
        tls=tls,
        tokens=TokenStore.load(args.auth_tokens) if args.auth_tokens else None,
        peer_token=peer_token,
        rest_tls=rest_tls,
        webhook_policy=WebhookPolicy(
            PolicyMode(args.webhook_policy),
            tuple(AllowedTarget.parse(a) for a in args.webhook_allow),
        ),
    )


def forwarded_security_args(args: argparse.Namespace) -> list[str]:
    """The security flags of `potboiler cluster`, as arguments of each node. A --peer-token given
    on the command line goes to the nodes in a file only this user may read (`<data-dir>/peer-token`),
    not on their command lines, which `ps` shows to everyone."""
    out: list[str] = []
    for attribute, flag in _FORWARDED:
        if (value := getattr(args, attribute)) is not None:
            out += [flag, str(Path(value).resolve())]
    if args.peer_token:
        out += ["--peer-token-file", str(private_file(args.data_dir / "peer-token", args.peer_token))]
    out += ["--webhook-policy", args.webhook_policy]
    for target in args.webhook_allow:
        out += ["--webhook-allow", target]
    return out


def private_file(path: Path, text: str) -> Path:
    """Write `text` to `path`, readable by this user only; returns its absolute path. A new file
    (mkstemp makes it 0600) takes the name's place, so whatever had the name, a link to another
    file included, is replaced, not written through."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path.parent.resolve() / path.name


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(prog="potboiler", description="Potboiler: an AP event-sourcing system.")
    sub = p.add_subparsers(dest="command", required=True)
    node = sub.add_parser("node", help="run one node (log, KV, Pigtail and its Envoy gateway)")
    _common(node, "data")
    node.add_argument(
        "--advertise-url",
        default="",
        help="root URL other nodes reach this node at (default http://HOST:B); give it with a "
        "wildcard --host such as 0.0.0.0 when nodes run on several machines",
    )
    cluster = sub.add_parser("cluster", help="run N nodes on this machine, peered with each other")
    cluster.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    _common(cluster, "data")
    status = sub.add_parser("status", help="show a node's replication status")
    status.add_argument("--url", default="http://127.0.0.1:8000", help="the node's REST URL")
    status.add_argument(
        "--token", default=os.environ.get("POTBOILER_TOKEN"), help="bearer token (or $POTBOILER_TOKEN)"
    )
    status.add_argument("--cacert", type=Path, help="CA certificate to verify an https:// URL with")
    hashing = sub.add_parser(
        "hash-token",
        help="print the tokens-file line of a token (a new random token if none is given)",
        description="Prints '<sha256 hex> <role>' for a --auth-tokens file. With no TOKEN, makes a random "
        "one and prints it on stderr; with TOKEN '-', reads it from stdin (keeps it out of `ps`).",
    )
    hashing.add_argument("token", nargs="?", help="the token; '-' reads it from stdin")
    hashing.add_argument(
        "--role", choices=[r.value for r in Role], default=Role.READ.value, help="default read"
    )
    return p


def ports_line(host: str, base: int, https: bool = False) -> str:
    """Where a node's ports are, for people."""
    ports = Ports(base)
    web = "https" if https else "http"
    host = url_host(host)
    return (
        f"REST {web}://{host}:{ports.core}  KV {web}://{host}:{ports.kv}  browser {web}://{host}:{ports.browser}  "
        f"Pigtail {web}://{host}:{ports.pigtail}  gRPC {host}:{ports.grpc}  metrics http://{host}:{ports.metrics}"
    )


#: The soft limit on open files a node raises itself to when its hard limit is unlimited.
OPEN_FILES = 1 << 20


def raise_open_files_limit() -> None:
    """Raise this process's soft limit on open files to its hard one (Envoy, started by the node,
    inherits it): a node holds a file descriptor per REST call in flight (its Envoy another), per
    peer stream and per RocksDB file, and the usual soft limit of 1,024 is soon reached."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:  # e.g. above the kernel's nr_open: keep what there is
            log.warning("could not raise the limit on open files from %d to %d: %s", soft, want, exc)


async def run_node(config: NodeConfig) -> None:
    """Run a node until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    node = Node(config)
    try:
        await node.start()
        # What exists once the node is up (modules, descriptors, servicers) lives as long as the
        # process: keep it out of the collector's full passes, which otherwise take tens of ms.
        gc.freeze()
        https = config.security.rest_tls is not None
        print(f"node {node.log.node_id}: {ports_line(config.host, config.base_port, https)}", flush=True)
        await stop.wait()
    finally:
        await node.stop()


def cluster_nodes(args: argparse.Namespace) -> list[NodeProcess]:
    """The node processes of `potboiler cluster`: each peered with the other nodes and with every
    --peer (a --peer naming a node of the cluster is one of those); InvalidArgument if --host or a
    --peer does not make a node root URL."""
    bases = cluster_bases(args.base_port, args.nodes)
    for i, base in enumerate(bases):  # as each node will check them: before starting any
        try:
            NodeConfig(data_dir=args.data_dir, host=args.host, base_port=base).check()
        except InvalidArgument as exc:
            if i == 0 or "--base-port" not in str(exc):
                raise
            raise InvalidArgument(
                f"bad --nodes: {args.nodes} nodes from --base-port {args.base_port} take ports past "
                f"65535 (node {i} would have base port {base}); start lower, or with fewer nodes"
            ) from None
    try:
        urls = [node_url(f"http://{url_host(args.host)}:{base}") for base in bases]
    except InvalidArgument as exc:
        raise InvalidArgument(f"bad --host: {exc}") from None
    try:
        outside = [url for url in dict.fromkeys(map(node_url, args.peer)) if url not in urls]
    except InvalidArgument as exc:
        raise InvalidArgument(f"bad --peer: {exc}") from None
    extra = ["--log-level", args.log_level] + (["--fsync"] if args.fsync else [])
    extra += ["--no-gossip"] if args.no_gossip else []
    extra += ["--clock-skew-ms", str(args.clock_skew_ms)] if args.clock_skew_ms else []
    extra += forwarded_security_args(args)
    return [
        NodeProcess(
            args.data_dir / f"node{i}",
            base,
            host=args.host,
            peers=[u for u in urls if u != url] + outside,
            extra_args=extra,
            log_file=args.data_dir / f"node{i}.log",
            die_with_parent=True,
        )
        for i, (base, url) in enumerate(zip(bases, urls, strict=True))
    ]


def run_cluster(args: argparse.Namespace) -> int:
    """Run N node processes, each peered with the others, until SIGINT or SIGTERM."""
    if args.nodes < 1:
        print("potboiler: --nodes must be at least 1", file=sys.stderr)
        return 2
    try:
        nodes = cluster_nodes(args)
    except InvalidArgument as exc:
        print(f"potboiler: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    # SIGHUP too: a closed terminal stops the cluster like Ctrl-C (and were the cluster killed
    # outright, its nodes would die with it: see NodeProcess's die_with_parent).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stop.set())
    code = 0
    try:
        for node in nodes:
            node.start(wait=False)
        for i, node in enumerate(nodes):
            if not node.wait_ready(interrupted=stop.is_set):
                break  # stopped while starting
            line = ports_line(args.host, node.ports.base, node.rest_tls)
            print(f"node{i}: {line}  (log {node.log_file})", flush=True)
        else:
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


def show_status(url: str, token: str | None = None, cacert: Path | None = None) -> int:
    """Print a node's status as JSON."""
    import httpx

    headers = {"authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(
            f"{url.rstrip('/')}/status", timeout=5, headers=headers, verify=tls_context_for(cacert)
        )
    except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:  # OSError: the --cacert file
        print(f"potboiler: cannot get the status of {url}: {exc or type(exc).__name__}", file=sys.stderr)
        return 1
    print_out(response.text)
    return 0 if response.is_success else 1


def hash_token_command(token: str | None, role: str) -> int:
    """`potboiler hash-token`: print the tokens-file line of a token (made up if not given)."""
    import secrets

    if token == "-":
        token = sys.stdin.readline().strip()
    if not token:
        token = secrets.token_urlsafe(32)
        print(f"token (give it to the client, keep it secret): {token}", file=sys.stderr)
    print_out(token_line(token, Role(role)))
    return 0


def print_out(text: str) -> None:
    """Print `text` on stdout; a reader that has gone (`| head`) ends the output without a traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python would fail again flushing stdout at exit: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `potboiler` console script."""
    args = parser().parse_args(argv)
    if args.command == "status":
        return show_status(args.url, args.token, args.cacert)
    if args.command == "hash-token":
        return hash_token_command(args.token, args.role)
    try:
        security = security_config(args)
    except SecurityConfigError as exc:
        print(f"potboiler: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format=f"%(asctime)s {os.getpid()} %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    quiet_client_gone()
    if args.command == "cluster":
        return run_cluster(args)
    config = NodeConfig(
        data_dir=args.data_dir,
        host=args.host,
        base_port=args.base_port,
        peers=args.peer,
        advertise_url=args.advertise_url,
        fsync=args.fsync,
        gossip=not args.no_gossip,
        clock=HybridClock(skewed_clock(args.clock_skew_ms)) if args.clock_skew_ms else None,
        security=security,
    )
    try:
        config.check()
    except InvalidArgument as exc:
        print(f"potboiler: {exc}", file=sys.stderr)
        return 2
    raise_open_files_limit()
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run_node(config))
    except (OSError, RuntimeError, PotboilerError) as exc:
        # A port in use, Envoy failing to start...: say what, not where in the code.
        log.debug("the node failed", exc_info=True)
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
