"""Fixtures for end-to-end tests: real `potboiler node` processes, each with its Envoy gateway.

NodeProcesses, the factory behind `node_process`, and the helpers about a node's processes live in
tests/node_processes.py.

- `node_process`: a factory, `node_process("a")` starts a node with data in tmp_path/a on a free base
  port and waits until it serves; every node it started is stopped at teardown (SIGTERM, SIGKILL if it
  hangs), and on a failing test the tail of each node's log is printed.
- `rest_client(node)`: an httpx.Client on the node's core REST port (closed at teardown).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from potboiler.server.processes import NodeProcess
from tests.node_processes import NodeProcesses


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/e2e is an e2e test (`-m "not e2e"` skips them)."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def node_process(tmp_path: Path) -> Iterator[NodeProcesses]:
    """Factory of real node processes, all stopped at teardown."""
    with NodeProcesses(tmp_path) as factory:
        yield factory


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
