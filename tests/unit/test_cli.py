"""The `potboiler` command line: what `cluster` passes to its nodes, and how bad arguments and a node
that cannot start are reported (one line, an exit code, no traceback)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from potboiler.server import cli
from potboiler.server.node import NodeConfig
from potboiler.server.processes import NodeProcess, find_base_port


@pytest.fixture
def never_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node or cluster that these tests start by mistake fails the test instead of serving forever."""

    async def run_node(config: NodeConfig) -> None:
        raise AssertionError("the node was started")

    def start(self: NodeProcess, *args: object, **kwargs: object) -> NodeProcess:
        raise AssertionError("a cluster node was started")

    monkeypatch.setattr(cli, "run_node", run_node)
    monkeypatch.setattr(NodeProcess, "start", start)


def flag_values(command: list[str], flag: str) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command) if arg == flag]


def test_cluster_nodes_get_the_other_nodes_every_peer_and_the_clock_skew(tmp_path: Path) -> None:
    args = cli.parser().parse_args(
        [
            "cluster", "--nodes", "2", "--base-port", "9000", "--data-dir", str(tmp_path),
            "--peer", "http://10.0.0.7:8000", "--peer", "http://127.0.0.1:9100", "--clock-skew-ms", "250",
        ]
    )  # fmt: skip
    first, second = cli.cluster_nodes(args)
    assert flag_values(first.command(), "--peer") == ["http://127.0.0.1:9100", "http://10.0.0.7:8000"]
    assert flag_values(second.command(), "--peer") == ["http://127.0.0.1:9000", "http://10.0.0.7:8000"]
    assert flag_values(first.command(), "--clock-skew-ms") == ["250"]
    assert flag_values(second.command(), "--clock-skew-ms") == ["250"]


@pytest.mark.usefixtures("never_started")
@pytest.mark.parametrize("command", ["node", "cluster"])
@pytest.mark.parametrize("peer", ["not a url", "ftp://127.0.0.1:8300", "http://127.0.0.1:8300/path"])
def test_a_malformed_peer_is_a_one_line_error(
    command: str, peer: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    assert cli.main([command, "--data-dir", str(data), "--peer", peer]) == 2
    err = capsys.readouterr().err
    assert err.startswith("potboiler: bad --peer") and err.count("\n") == 1, err
    assert not data.exists()


@pytest.mark.usefixtures("never_started")
def test_a_peer_that_is_the_node_itself_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    assert (
        cli.main(["node", "--data-dir", str(data), "--base-port", "8300", "--peer", "http://127.0.0.1:8300/"])
        == 2
    )
    err = capsys.readouterr().err
    assert "is this node itself" in err and err.count("\n") == 1, err
    assert not data.exists()


@pytest.mark.parametrize("error", [RuntimeError("envoy exited with 1; config in x"), OSError("port in use")])
def test_a_node_that_cannot_start_is_a_one_line_error(
    error: Exception,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def failing(config: NodeConfig) -> None:
        raise error

    monkeypatch.setattr(cli, "run_node", failing)
    assert cli.main(["node", "--data-dir", str(tmp_path)]) == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [str(error)]
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.usefixtures("never_started")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["node", "--host", "localhost"], "bad --host: 'localhost' is not an IP address"),
        (["node", "--base-port", "65530"], "bad --base-port: 65530"),
        (["node", "--base-port", "0"], "bad --base-port: 0"),
        (["cluster", "--nodes", "2", "--base-port", "65430"], "bad --nodes: 2 nodes from --base-port 65430"),
        (["cluster", "--nodes", "1", "--base-port", "65530"], "bad --base-port: 65530"),
        (["cluster", "--host", "nosuchhost.invalid"], "is not an IP address"),
    ],
)
def test_a_host_or_base_port_a_node_cannot_use_is_a_one_line_error(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    assert cli.main([*args, "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not data.exists()


@pytest.mark.parametrize("command", ["node", "cluster"])
def test_a_log_level_is_one_of_the_levels(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main([command, "--log-level", "WARNNG"])
    assert exited.value.code == 2 and "invalid choice: 'WARNNG'" in capsys.readouterr().err
    assert cli.parser().parse_args([command, "--log-level", "debug"]).log_level == "DEBUG"


def test_status_of_a_node_that_does_not_answer_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    closed = find_base_port()  # nothing listens there
    assert cli.main(["status", "--url", f"http://127.0.0.1:{closed}"]) == 1
    assert cli.main(["status", "--url", f"127.0.0.1:{closed}"]) == 1
    missing = str(tmp_path / "none.pem")
    assert cli.main(["status", "--url", f"https://127.0.0.1:{closed}", "--cacert", missing]) == 1
    err = capsys.readouterr().err
    assert err.count("potboiler: cannot get the status of") == 3 and "Traceback" not in err, err


def test_output_to_a_reader_that_has_gone_ends_without_a_traceback() -> None:
    """`potboiler hash-token - | head -c 0`, say: the reader closes the pipe before anything is written."""
    read_end, write_end = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-m", "potboiler.server.cli", "hash-token", "-"],
        stdin=subprocess.PIPE,
        stdout=write_end,
        stderr=subprocess.PIPE,
    )
    os.close(write_end)
    os.close(read_end)  # nobody reads: the child's write fails with EPIPE
    _, err = child.communicate(b"s3cret\n", timeout=60)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err


@pytest.mark.parametrize(
    ("soft", "hard", "raised"),
    [
        (1024, 524_288, 524_288),
        (1024, resource.RLIM_INFINITY, cli.OPEN_FILES),
        (524_288, 524_288, None),
        (resource.RLIM_INFINITY, resource.RLIM_INFINITY, None),
    ],
)
def test_a_node_raises_its_open_files_limit_to_the_hard_one(
    monkeypatch: pytest.MonkeyPatch, soft: int, hard: int, raised: int | None
) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    cli.raise_open_files_limit()
    assert calls == ([] if raised is None else [(raised, hard)])


def test_a_limit_that_cannot_be_raised_is_kept(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def refuse(which: int, limits: tuple[int, int]) -> None:
        raise ValueError("not allowed")

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, resource.RLIM_INFINITY))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    cli.raise_open_files_limit()
    assert "could not raise the limit on open files from 1024" in caplog.text
