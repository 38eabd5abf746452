"""Node processes: start `potboiler node` as a child, wait until it serves, stop or kill it.

Used by `potboiler cluster`, the end-to-end tests and the benchmarks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from potboiler.server.gateway import die_with_parent
from potboiler.server.ports import NODE_SPACING, PORT_OFFSETS, Ports, cluster_bases
from potboiler.server.urls import url_host

#: The line a node prints once it serves (see potboiler.server.cli.run_node).
_UP_LINE = re.compile(rb"^node [0-9a-f-]{36}: ", re.MULTILINE)


def ports_free(host: str, base: int) -> bool:
    """Whether every port a node with base `base` needs is free on `host`. Bound with SO_REUSEADDR,
    as the node's servers and Envoy bind theirs: a port that only closed connections still hold
    (TIME_WAIT, for a minute) is free to them, and the tests leave many such ports behind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for offset in PORT_OFFSETS:
        with socket.socket(family) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, base + offset))
            except OSError:
                return False
    return True


def _ephemeral_ports() -> range:
    """The range the kernel takes outgoing connections' local ports from (a node must not use it:
    any connection made meanwhile could take one of its ports)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


#: Base ports handed out recently, shared by every process on the machine (see find_base_port).
_RECENT_PICKS = Path(tempfile.gettempdir()) / "potboiler-base-ports.json"
#: How long a handed-out base port stays reserved: time enough for its nodes to bind their ports.
_RESERVE_S = 60.0
#: The base ports `find_base_port` handed to this process (each node's of a range): those that
#: `reserve_base_port` keeps reserved. A node on a port chosen otherwise (`potboiler cluster`'s)
#: writes nothing to the shared file.
_HANDED_OUT: set[int] = set()


def find_base_port(host: str = "127.0.0.1", start: int = 10000, end: int = 65400, count: int = 1) -> int:
    """A base port B such that `count` nodes at B, B+NODE_SPACING, ... can bind all their ports,
    outside the kernel's ephemeral range.

    Checking that ports are free does not reserve them: two processes (parallel test workers, say)
    that look at once could both pick the same range, and the first to start its nodes would take
    the other's. So picks are recorded, under a lock, in a file every process shares, and a range
    picked in the last minute is not handed out again while another is free."""
    ephemeral = _ephemeral_ports()
    # Eligible slots only, so that the starting point spreads pickers over all of them.
    slots = [
        base
        for base in range(start, end - NODE_SPACING * count, NODE_SPACING)
        if base + NODE_SPACING * count < ephemeral.start or base > ephemeral.stop
    ]
    if not slots:
        raise RuntimeError(
            f"no base port between {start} and {end} lies outside the ephemeral range {ephemeral}"
        )
    first = (os.getpid() * 7919 + time.monotonic_ns() // 1000) % len(slots)
    with _recent_picks() as recent:
        taken = {b for first, (_, n) in recent.items() for b in cluster_bases(first, n)}
        # A second pass ignores the reservations: better a rare collision than no port at all.
        for avoid in (taken, set()):
            for i in range(len(slots)):
                base = slots[(first + i) % len(slots)]
                wanted = cluster_bases(base, count)
                if avoid.isdisjoint(wanted) and all(ports_free(host, b) for b in wanted):
                    recent[base] = (time.time(), count)
                    _HANDED_OUT.update(wanted)
                    return base
    raise RuntimeError("no free port range found")


def reserve_base_port(base: int) -> None:
    """Hand out base port `base` again, now, if `find_base_port` handed it to this process: a node
    stopped to be started again on its ports (a restart, a crash test) keeps them from other pickers
    for another `_RESERVE_S`, however long ago they were first picked."""
    if base not in _HANDED_OUT:
        return
    with _recent_picks() as recent:
        recent[base] = (time.time(), max(1, recent.get(base, (0.0, 1))[1]))


def release_base_port(base: int) -> None:
    """Give base port `base` back (its node is gone for good, at the end of a test): other pickers
    may have it at once, rather than when its reservation runs out. A busy test run otherwise ran out
    of unreserved ranges, and pickers then shared ranges."""
    if base not in _HANDED_OUT:
        return
    _HANDED_OUT.discard(base)
    with _recent_picks() as recent:
        recent.pop(base, None)


@contextlib.contextmanager
def _recent_picks() -> Iterator[dict[int, tuple[float, int]]]:
    """The base ports handed out in the last `_RESERVE_S`, {base: (when, how many nodes)}, under
    the lock every process shares; written back at the end of the block."""
    with open(_RECENT_PICKS.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        now = time.time()
        try:
            recent = {
                int(b): (float(t), int(n))
                for b, (t, n) in json.loads(_RECENT_PICKS.read_text()).items()
                if now - float(t) < _RESERVE_S
            }
        except (OSError, ValueError, TypeError, AttributeError):
            recent = {}
        yield recent
        _RECENT_PICKS.write_text(json.dumps(recent))


class NodeProcess:
    """One `potboiler node` child process."""

    def __init__(
        self,
        data_dir: Path,
        base_port: int,
        host: str = "127.0.0.1",
        peers: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        log_file: Path | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.data_dir = data_dir
        self.host = host
        self.ports = Ports(base_port)
        self.peers = list(peers)
        self.extra_args = list(extra_args)
        self.log_file = log_file or data_dir.with_name(data_dir.name + ".log")
        #: Whether the node gets SIGTERM when the thread that started it dies (`potboiler
        #: cluster`: a cluster killed outright takes its nodes, and they their Envoys, with it).
        self.die_with_parent = die_with_parent
        self.process: subprocess.Popen[bytes] | None = None
        #: Where this start's output begins in the log file (it keeps earlier runs' output).
        self._log_start = 0

    @property
    def url(self) -> str:
        """The node's root URL, its name among peers (http:// even when REST is served over HTTPS)."""
        return f"http://{url_host(self.host)}:{self.ports.core}"

    @property
    def rest_tls(self) -> bool:
        """Whether the node serves REST over HTTPS (started with --rest-tls-cert)."""
        return "--rest-tls-cert" in self.extra_args

    @property
    def rest_url(self) -> str:
        """The URL of the node's core REST port (https:// with --rest-tls-cert)."""
        return self.port_url(self.ports.core)

    def port_url(self, port: int) -> str:
        """http(s)://host:port of one of the node's REST ports."""
        return f"{'https' if self.rest_tls else 'http'}://{url_host(self.host)}:{port}"

    @property
    def grpc_target(self) -> str:
        """host:port of the node's own gRPC server."""
        return f"{url_host(self.host)}:{self.ports.grpc}"

    def command(self) -> list[str]:
        """The command line that runs the node."""
        cmd = [
            sys.executable, "-m", "potboiler.server.cli", "node",
            "--base-port", str(self.ports.base),
            "--data-dir", str(self.data_dir),
            "--host", self.host,
        ]  # fmt: skip
        for peer in self.peers:
            cmd += ["--peer", peer]
        return cmd + self.extra_args

    def start(self, wait: bool = True, timeout: float = 60.0) -> NodeProcess:
        """Start the node (in its own session, so terminal signals reach it only through us)."""
        reserve_base_port(self.ports.base)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            self._log_start = out.tell()
            self.process = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent() if self.die_with_parent else None,
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0, interrupted: Callable[[], bool] = lambda: False) -> bool:
        """Wait until the node has said it is up (the line it prints once every port is bound) and
        answers REST on its core port: 200, or 401/403 when it requires tokens (either way the
        request went through Envoy to the node's gRPC server and back). The line tells this node
        from another process that holds its ports. Over HTTPS the certificate is not checked:
        nothing secret is sent, and only the answer's status counts. False if `interrupted()`
        said so first (e.g. Ctrl-C while a cluster starts)."""
        import httpx  # here, not at the top: node processes import this module too, never needing it

        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode}; see {self.log_file}")
            try:
                if self._said_up():
                    status = httpx.get(f"{self.rest_url}/log", timeout=1.0, verify=False).status_code
                    if status in (200, 401, 403):
                        return True
            except httpx.HTTPError:
                pass
            if interrupted():
                return False
            if time.monotonic() > deadline:
                raise TimeoutError(f"node at {self.url} not ready after {timeout}s; see {self.log_file}")
            time.sleep(0.05)

    def _said_up(self) -> bool:
        """Whether the node printed its ports line (`node <id>: ...`) since it was started."""
        try:
            with open(self.log_file, "rb") as f:
                f.seek(self._log_start)
                return _UP_LINE.search(f.read()) is not None
        except OSError:
            return False

    def log_tail(self, lines: int = 40) -> str:
        """The end of the node's log file (stdout and stderr of the node and its Envoy)."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError as exc:
            return f"({self.log_file}: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        """Whether the process is running."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait, SIGKILL if it does not stop in time; returns the exit code."""
        if self.process is None:
            return None
        reserve_base_port(self.ports.base)  # it may be started again on its ports
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the node (a crash); its Envoy follows it (PR_SET_PDEATHSIG)."""
        reserve_base_port(self.ports.base)  # it may be started again on its ports
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def signal(self, sig: int) -> None:
        """Send a signal to the node process (e.g. SIGSTOP / SIGCONT)."""
        if self.process is not None:
            self.process.send_signal(sig)
