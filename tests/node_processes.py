"""Real `potboiler node` processes (each with its Envoy child) for the suites that need them: e2e,
security, bad input; and the pids of a node's processes.

- `NodeProcesses(root)`: a factory. `factory("a")` starts a node with data in root/a on a free base
  port and waits until it serves; `factory.start(node)` starts one again (after a kill, say). Used as
  a context manager (the suites' fixtures do), it stops every node it made at the end (SIGTERM, then
  SIGKILL), gives their base ports back and prints the tail of each node's log (which pytest shows
  when the test fails).
- `processes_of(data_dir)`: pids of the live processes of a node (the node and its Envoy).
- `processes_matching(predicate)`: pids of the live processes whose arguments satisfy `predicate`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from potboiler.server.ports import Ports
from potboiler.server.processes import NodeProcess, find_base_port, release_base_port
from tests.conftest import wait_for_sync

#: How many times a node is started on a fresh base port when its ports were taken meanwhile.
START_ATTEMPTS = 3
#: How long a node may take to serve after its start (slow, loaded CI machines).
START_TIMEOUT = 60.0


def processes_matching(predicate: Callable[[list[str]], bool]) -> list[int]:
    """Pids of live (not zombie) processes whose argument list satisfies `predicate`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state = stat.rsplit(")", 1)[-1].split()[:1]
        if state and state[0] not in ("Z", "X") and predicate(argv):
            pids.append(int(entry.name))
    return pids


def processes_of(data_dir: Path) -> list[int]:
    """Pids of live processes with `data_dir`, or a path inside it, as an argument: the node process
    (`--data-dir DIR`) and its Envoy (`-c DIR/gateway/envoy.yaml`), which may outlive a killed node
    for a moment."""
    text = str(data_dir)
    return processes_matching(lambda argv: any(a == text or a.startswith(text + "/") for a in argv))


class NodeProcesses:
    """Starts `potboiler node` processes; `close()` (or leaving its `with` block) stops them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[NodeProcess] = []
        self._count = 0
        #: Nodes that keep their ports: given them explicitly, or known by them already (they served).
        self._pinned: set[NodeProcess] = set()

    def __call__(
        self,
        name: str | None = None,
        *,
        peers: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        base_port: int | None = None,
        start: bool = True,
    ) -> NodeProcess:
        """A node with data in root/name (root/nodeN without a name), started and ready unless
        start=False. On `base_port` if given, where it stays; else on a free base port, which it leaves
        for a fresh one if another test process takes its ports before it first serves."""
        self._count += 1
        data_dir = self.root / (name or f"node{self._count}")
        node = NodeProcess(
            data_dir, find_base_port() if base_port is None else base_port, peers=peers, extra_args=extra_args
        )
        self.started.append(node)
        if base_port is not None:
            self._pinned.add(node)
        if start:
            self.start(node)
        return node

    def start(self, node: NodeProcess) -> NodeProcess:
        """(Re)start a node and wait until it serves. If a node that may move (see `__call__`) finds
        its ports taken ("in use" in its log), it moves to a fresh base port; a node that has served
        keeps its ports, which are part of its name among peers."""
        # A node killed a moment ago may still have its Envoy exiting (it follows its parent's death
        # asynchronously): wait until the old processes are gone, so that they free the ports.
        wait_for_sync(lambda: not processes_of(node.data_dir), message=f"old processes of {node.data_dir}")
        for attempt in range(START_ATTEMPTS):
            log_size = node.log_file.stat().st_size if node.log_file.exists() else 0
            try:
                node.start(timeout=START_TIMEOUT)
            except (RuntimeError, TimeoutError):
                node.stop()
                new_log = node.log_file.read_bytes()[log_size:].decode(errors="replace")
                if node in self._pinned or "in use" not in new_log or attempt == START_ATTEMPTS - 1:
                    raise
                release_base_port(node.ports.base)
                node.ports = Ports(find_base_port())
                continue
            self._pinned.add(node)
            return node
        raise AssertionError("unreachable")

    def stop_all(self) -> list[str]:
        """Stop every node started (SIGTERM, then SIGKILL), newest first, and give their base ports
        back; returns the problems met."""
        problems = []
        for node in reversed(self.started):
            try:
                node.stop()
            except Exception as exc:  # stop the others anyway, then report
                problems.append(f"{node.data_dir}: {exc!r}")
                node.kill()
            release_base_port(node.ports.base)
        return problems

    def close(self) -> None:
        """`stop_all()`, print the end of each node's log (pytest shows it when the test fails, where
        the logs explain it), then fail on any problem met stopping them."""
        problems = self.stop_all()
        for node in self.started:
            print(f"--- {node.log_file} (base port {node.ports.base}) ---\n{node.log_tail()}")
        assert not problems, problems

    def __enter__(self) -> NodeProcesses:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
