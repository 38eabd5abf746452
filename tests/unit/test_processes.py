"""Base ports for node processes: free, outside the ephemeral range, and never handed out twice in a
row (parallel test workers used to start nodes on the same ports)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from potboiler.server import processes
from potboiler.server.ports import GRPC_PORT_OFFSET, cluster_bases
from potboiler.server.processes import find_base_port


@pytest.fixture(autouse=True)
def private_picks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "picks.json"
    monkeypatch.setattr(processes, "_RECENT_PICKS", path)
    return path


@pytest.fixture
def all_ports_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every port counts as free: tests of a narrow range must not depend on what other test
    workers have bound in it at the time."""
    monkeypatch.setattr(processes, "ports_free", lambda host, base: True)


def ranges(base: int, count: int) -> set[int]:
    return set(cluster_bases(base, count))


def test_picks_do_not_overlap_while_reserved() -> None:
    taken: set[int] = set()
    for count in (3, 1, 4, 2) * 10:
        base = find_base_port(count=count)
        assert taken.isdisjoint(ranges(base, count))
        taken |= ranges(base, count)


@pytest.mark.usefixtures("all_ports_free")
def test_a_reservation_expires(private_picks: Path) -> None:
    first = find_base_port(start=20000, end=20500)
    stale = time.time() - processes._RESERVE_S - 1
    private_picks.write_text(json.dumps({str(first): [stale, 1]}))
    picks = {find_base_port(start=20000, end=20500) for _ in range(4)}
    assert first in picks


@pytest.mark.usefixtures("all_ports_free")
def test_a_node_killed_or_stopped_keeps_its_ports_reserved(private_picks: Path, tmp_path: Path) -> None:
    """A test that stops a node to start it again on its ports, longer after they were picked than a
    reservation lasts: meanwhile another process must not pick them."""
    base = find_base_port(start=20000, end=20300)
    other = ({20000, 20100} - {base}).pop()
    stale = time.time() - processes._RESERVE_S - 1
    private_picks.write_text(json.dumps({str(base): [stale, 1]}))
    processes.NodeProcess(tmp_path / "n", base).kill()  # not running: as after a crash
    when, nodes = json.loads(private_picks.read_text())[str(base)]
    assert time.time() - when < 60 and nodes == 1  # reserved again, from now
    assert find_base_port(start=20000, end=20300) == other


def test_a_node_on_a_port_chosen_otherwise_reserves_nothing(private_picks: Path, tmp_path: Path) -> None:
    """`potboiler cluster --base-port 8000`: the picks file is the tests' and benchmarks' business."""
    node = processes.NodeProcess(tmp_path / "n", 8000)
    node.kill()
    node.stop()
    assert not private_picks.exists()


@pytest.mark.usefixtures("all_ports_free")
def test_when_every_range_is_reserved_a_free_one_is_still_found() -> None:
    picks = [find_base_port(start=20000, end=20300) for _ in range(4)]
    assert set(picks) <= {20000, 20100}


def test_no_eligible_range_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "_ephemeral_ports", lambda: range(40000, 41000))
    with pytest.raises(RuntimeError, match="ephemeral range"):
        find_base_port(start=40000, end=40500)


def test_an_ipv6_node_is_named_with_brackets(tmp_path: Path) -> None:
    node = processes.NodeProcess(tmp_path / "n", 9000, host="::1")
    assert node.url == "http://[::1]:9000"
    assert node.port_url(node.ports.kv) == "http://[::1]:9001"
    assert node.grpc_target == "[::1]:9010"


def test_a_node_is_up_once_it_has_said_so_since_it_was_started(tmp_path: Path) -> None:
    """Its ports answering could be another process's: the node's own line tells (an earlier run's,
    further up the same log file, does not)."""
    log = tmp_path / "n.log"
    up = "node 0196a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b: its ports\n"
    log.write_text("an earlier run\n" + up)
    node = processes.NodeProcess(tmp_path / "n", 8000, log_file=log)
    node._log_start = log.stat().st_size
    assert not node._said_up()
    with open(log, "a") as f:
        f.write("starting\n")
    assert not node._said_up()
    with open(log, "a") as f:
        f.write(up)
    assert node._said_up()


@pytest.mark.usefixtures("all_ports_free")
def test_a_released_range_is_no_longer_reserved(private_picks: Path) -> None:
    first = find_base_port(start=20000, end=20300)
    assert str(first) in json.loads(private_picks.read_text())
    processes.release_base_port(first)
    assert str(first) not in json.loads(private_picks.read_text())
    processes.NodeProcess(Path("/nonexistent"), first).kill()  # released: no longer renewed either
    assert str(first) not in json.loads(private_picks.read_text())


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_ports_free_sees_a_bound_port_on_either_family(host: str) -> None:
    """A port taken on the host's own address family counts (an IPv6 host is checked with IPv6)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.socket(family).close()
    except OSError:
        pytest.skip(f"no {host} on this machine")
    with socket.socket(family) as taken:
        # Another test worker may bind a picked range's port before this test does (a pick
        # reserves it only against other pickers): then pick again.
        for _ in range(10):
            base = find_base_port(host)
            if processes.ports_free(host, base):
                try:
                    taken.bind((host, base + GRPC_PORT_OFFSET))
                    break
                except OSError:
                    pass
            processes.release_base_port(base)
        else:
            pytest.fail("every picked range was taken before this test could bind it")
        taken.listen()
        assert not processes.ports_free(host, base)
    processes.release_base_port(base)
