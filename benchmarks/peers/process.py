"""A peer's server process: started in its own session with its output in a log file, stopped for sure.

Also free loopback ports for the peers' servers, the resident memory of a set of processes, and
waiting for a cluster's members to agree (`settle`).
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.common import process_tree, rss_bytes


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports that are free now (bound to port 0 together, then released)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def settle(agree: Callable[[], bool], timeout: float = 60.0) -> None:
    """Poll `agree()` every 50 ms until it is true (its exceptions count as false); TimeoutError after
    `timeout`. For a cluster whose members may still be applying or replicating the last
    measurement's writes, so that the next system measured does not share the machine with that."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if agree():
                return
        except Exception:  # a member not answering yet: not settled
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the members did not agree within {timeout:g}s")
        time.sleep(0.05)


def tree_rss_mb(pids: Sequence[int]) -> float:
    """Resident memory in MB of the processes `pids` and all their descendants."""
    seen = {p for pid in pids for p in process_tree(pid)}
    return round(sum(rss_bytes(p) for p in seen) / 1e6, 1)


class ServerProcess:
    """One server child process (etcd, nats-server, redis-server…).

    It runs in its own session, so a terminal's Ctrl-C reaches it only through the benchmark, which
    stops it with `stop` (SIGTERM, then SIGKILL after a timeout). It may be started again after a
    stop, with the same command and data."""

    def __init__(self, name: str, command: Sequence[str], log_file: Path) -> None:
        self.name = name
        self.command = list(command)
        self.log_file = log_file
        self.process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"ServerProcess({self.name!r})"

    @property
    def pid(self) -> int:
        """The process id (it must be running)."""
        assert self.process is not None, f"{self.name} is not started"
        return self.process.pid

    def start(self) -> None:
        """Start the process (its output is appended to the log file)."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def alive(self) -> bool:
        """Whether the process is running."""
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait, SIGKILL if it does not stop in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_tail(self, lines: int = 20) -> str:
        """The end of the process's output."""
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError as error:
            return f"({self.log_file}: {error})"

    def wait_for(self, ready: Callable[[], bool], timeout: float = 60.0, what: str = "ready") -> None:
        """Poll `ready()` every 50 ms until it is true; fail with the end of the log if the process
        exits or `timeout` passes first. Exceptions from `ready` count as not ready."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except Exception:  # not answering yet: any client error means "not ready"
                pass
            if not self.alive():
                raise RuntimeError(f"{self.name} exited before it was {what}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not {what} after {timeout:g}s:\n{self.log_tail()}")
            time.sleep(0.05)


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:`port`."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0
