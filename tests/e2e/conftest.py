"""Fixtures for end-to-end tests: real `potboiler node` processes, each with its Envoy gateway.

Import the helpers in a test module as `from tests.e2e.conftest import NodeProcesses, ...` (this file
registers itself under that name, as tests/conftest.py does).

- `node_process`: a factory, `node_process("a")` starts a node with data in tmp_path/a on a free base
  port and waits until its REST port answers; every node it started is stopped at teardown (SIGTERM,
  SIGKILL if it hangs), and on a failing test the tail of each node's log is printed.
- `rest_client(node)`: an httpx.Client on the node's core REST port (closed at teardown).
- `processes_of(data_dir)`: pids of the live processes of a node (the node and its Envoy).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import httpx
import pytest

from potboiler.server.ports import Ports
from potboiler.server.processes import NodeProcess, find_base_port, release_base_port
from tests.conftest import wait_for_sync

sys.modules.setdefault("tests.e2e.conftest", sys.modules[__name__])

#: How many times a node is started on a fresh base port when its port was taken meanwhile.
START_ATTEMPTS = 3
#: How long a node may take to answer REST after its start (slow, loaded CI machines).
START_TIMEOUT = 60.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e is an e2e test (`-m "not e2e"` skips them)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)


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
    (`--data-dir DIR`) and its Envoy (`-c DIR/gateway/envoy.yaml`)."""
    text = str(data_dir)
    return processes_matching(lambda argv: any(a == text or a.startswith(text + "/") for a in argv))


class NodeProcesses:
    """Starts `potboiler node` processes; `stop_all()` stops every one of them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[NodeProcess] = []
        self._count = 0
        self._served: set[int] = set()

    def __call__(
        self,
        name: str | None = None,
        *,
        peers: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        start: bool = True,
    ) -> NodeProcess:
        """A node with data in root/name on a free base port; started (and ready) unless start=False."""
        self._count += 1
        data_dir = self.root / (name or f"node{self._count}")
        node = NodeProcess(data_dir, find_base_port(), peers=peers, extra_args=extra_args)
        self.started.append(node)
        if start:
            self.start(node)
        return node

    def start(self, node: NodeProcess) -> NodeProcess:
        """(Re)start a node and wait until it serves. If a node that has never served finds its ports
        taken (another test process got them after they were chosen), it moves to a fresh base port;
        a node that has served keeps its ports, which are part of its name among peers."""
        # A node killed a moment ago may still have its Envoy exiting (it follows its parent's death
        # asynchronously): wait until the old processes are gone, so they free the ports.
        wait_for_sync(lambda: not processes_of(node.data_dir), message=f"old processes of {node.data_dir}")
        for attempt in range(START_ATTEMPTS):
            log_size = node.log_file.stat().st_size if node.log_file.exists() else 0
            try:
                node.start(timeout=START_TIMEOUT)
            except (RuntimeError, TimeoutError):
                node.stop()
                new_log = node.log_file.read_bytes()[log_size:].decode(errors="replace")
                if id(node) in self._served or "in use" not in new_log or attempt == START_ATTEMPTS - 1:
                    raise
                node.ports = Ports(find_base_port())
                continue
            self._served.add(id(node))
            return node
        raise AssertionError("unreachable")

    def stop_all(self) -> list[str]:
        """Stop every node started (SIGTERM, then SIGKILL); returns problems found."""
        problems = []
        for node in reversed(self.started):
            try:
                node.stop()
            except Exception as exc:  # stop the others anyway
                problems.append(f"{node.data_dir}: {exc!r}")
                node.kill()
            release_base_port(node.ports.base)
        return problems


@pytest.fixture
def node_process(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[NodeProcesses]:
    """Factory of real node processes, all stopped at teardown."""
    factory = NodeProcesses(tmp_path)
    try:
        yield factory
    finally:
        problems = factory.stop_all()
        for node in factory.started:
            # Printed output shows only when the test fails: then the logs explain it.
            print(f"--- {node.log_file} (base port {node.ports.base}) ---\n{node.log_tail()}")
        assert not problems, problems


@pytest.fixture
def rest_client() -> Iterator[Callable[[NodeProcess], httpx.Client]]:
    """`rest_client(node)`: an httpx.Client with the node's core REST URL as base (closed at teardown)."""
    clients: list[httpx.Client] = []

    def make(node: NodeProcess) -> httpx.Client:
        client = httpx.Client(base_url=node.url, timeout=30.0)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            client.close()
