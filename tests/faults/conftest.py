"""Fixtures of the fault-injection suite: real node processes on distinct loopback addresses, iptables
partitions between them, a TCP proxy on chosen links.

The helper modules next to this file are imported as `tests.faults.<name>` (registered here, as
tests/conftest.py registers itself), so test modules and mypy see the same names:

- `netfilter`: the iptables chains (partitions, connection marks, redirects to the proxy);
- `proxy`: the asyncio TCP proxy (latency, jitter, bandwidth, stalls, half-open, resets);
- `cluster`: the cluster of node processes and the checker's reads of their state;
- `workload`, `checker`, `nemesis`: the Jepsen-style run and its set checker.

Fixtures:

- `firewall`: this process's iptables chains (skips the test, saying why, where iptables cannot run);
  every rule and chain is removed at teardown, even when the test fails.
- `proxy`: a Proxy, closed at teardown.
- `cluster`: an unstarted FaultCluster with the firewall and proxy (`cluster.start(n, ...)`); every node
  is stopped at teardown, and on failure the end of each node's log is printed.
- `local_cluster`: the same without iptables (all nodes on 127.0.0.1), for tests that need no network
  faults (crash safety).

Figures a test records with `tests.faults.checker.report_figures` are printed as JSON lines in the
terminal summary, whether or not output is captured.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.modules.setdefault("tests.faults.conftest", sys.modules[__name__])


def _register(name: str) -> None:
    """Import HERE/name.py as `tests.faults.<name>`."""
    full = f"tests.faults.{name}"
    if full in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(full, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[full] = module
    spec.loader.exec_module(module)


for _name in ("netfilter", "proxy", "cluster", "workload", "checker", "nemesis"):
    _register(_name)

from tests.faults.checker import FIGURES_PROPERTY  # noqa: E402
from tests.faults.cluster import FaultCluster, fault_cluster  # noqa: E402
from tests.faults.netfilter import Firewall, FirewallUnavailable  # noqa: E402
from tests.faults.proxy import Proxy  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every fault test starts real node processes: mark them e2e (`-m "not e2e"` skips them)."""
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.e2e)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the figures fault tests recorded, one JSON line each, even under output capture."""
    lines = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            for name, value in getattr(report, "user_properties", ()):
                if name == FIGURES_PROPERTY and getattr(report, "when", "") == "call":
                    lines.append(value if isinstance(value, str) else json.dumps(value))
    if lines:
        terminalreporter.section("fault-injection figures")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture
def firewall() -> Iterator[Firewall]:
    """This test process's iptables chains; skips where iptables cannot run."""
    reason = Firewall.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    wall = Firewall()
    try:
        wall.install()
    except FirewallUnavailable as exc:
        pytest.skip(f"iptables cannot make the rules the fault tests need: {exc}")
    try:
        yield wall
    finally:
        wall.close()


@pytest.fixture
def proxy() -> Iterator[Proxy]:
    """The TCP proxy (seeded), closed at teardown."""
    p = Proxy(seed=7)
    try:
        yield p
    finally:
        p.close()


def _print_logs(cluster: FaultCluster) -> None:
    for node in cluster.nodes:
        try:
            tail = "\n".join(node.process.log_file.read_text(errors="replace").splitlines()[-30:])
        except OSError:
            tail = "(no log)"
        # Printed output shows only when the test fails: then the logs explain it.
        print(f"--- {node.name} {node.url} ({node.process.log_file}) ---\n{tail}")


@pytest.fixture
def cluster(tmp_path: Path, firewall: Firewall, proxy: Proxy) -> Iterator[FaultCluster]:
    """An unstarted fault cluster; all its nodes are stopped (and its rules removed) at teardown."""
    with fault_cluster(tmp_path, firewall, proxy) as c:
        try:
            yield c
        finally:
            _print_logs(c)


@pytest.fixture
def local_cluster(tmp_path: Path) -> Iterator[FaultCluster]:
    """An unstarted cluster on 127.0.0.1 without iptables (for faults that are not network faults)."""
    with fault_cluster(tmp_path, None) as c:
        try:
            yield c
        finally:
            _print_logs(c)
