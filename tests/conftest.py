"""Helpers and fixtures shared by every test suite.

Import the helpers in a test module as `from tests.conftest import wait_for, GrpcNode, ...`: pytest
loads this file as the module `conftest`, and registers it under `tests.conftest` too (below), so the
import resolves to this very module both at run time and for mypy.

- `wait_for(predicate, timeout)` / `wait_for_sync(...)`: poll a condition until it holds or a
  deadline passes. Tests never sleep for a fixed time.
- `loop_turns()`: count the event loop's turns meanwhile (that long work lets others run).
- `grpc_node`: an in-process, gRPC-only `Node` on an OS-chosen port, with an aio channel and stubs.
- `grpc_node_factory`: start several of them (each with its own data dir); all stopped at teardown.
- `receiver`: a webhook receiver (tests/webhook_receiver.py), closed at teardown.

Real node processes (with Envoy) are started by `tests.node_processes.NodeProcesses`, through the
fixtures of the suites that use them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

import grpc
import hypothesis
import pytest
from grpc_health.v1 import health_pb2

from potboiler.server.node import Node, NodeConfig
from potboiler.v1 import core_rest_pb2_grpc, log_pb2, log_pb2_grpc, nodes_pb2_grpc, webhooks_pb2_grpc
from tests.webhook_receiver import Receiver

if TYPE_CHECKING:
    from potboiler.v1.core_rest_pb2_grpc import CoreRestServiceAsyncStub
    from potboiler.v1.log_pb2_grpc import LogServiceAsyncStub
    from potboiler.v1.nodes_pb2_grpc import NodesServiceAsyncStub
    from potboiler.v1.webhooks_pb2_grpc import WebhooksServiceAsyncStub

# pytest imports this file as `conftest`; make `from tests.conftest import ...` find this same module.
sys.modules.setdefault("tests.conftest", sys.modules[__name__])

# Property tests, the same on every run (CI must be deterministic) and with no time limit per
# example: on a loaded 2-core machine one example can stall past hypothesis's 200 ms, which it
# reports as a failure. Tests may still set their own settings on top of these.
hypothesis.settings.register_profile("potboiler", deadline=None, derandomize=True, database=None)
hypothesis.settings.load_profile("potboiler")

T = TypeVar("T")

#: The default deadline of `wait_for`: generous, because CI machines are slow and busy.
DEFAULT_TIMEOUT = 20.0
#: How often `wait_for` re-checks its condition.
POLL_INTERVAL = 0.01


class WaitTimeout(AssertionError):
    """A condition did not hold before its deadline."""


@overload
async def wait_for(
    predicate: Callable[[], Awaitable[T]],
    timeout: float = ...,
    message: str | Callable[[], str] = ...,
    interval: float = ...,
) -> T: ...


@overload
async def wait_for(
    predicate: Callable[[], T],
    timeout: float = ...,
    message: str | Callable[[], str] = ...,
    interval: float = ...,
) -> T: ...


async def wait_for(
    predicate: Callable[[], Any],
    timeout: float = DEFAULT_TIMEOUT,
    message: str | Callable[[], str] = "",
    interval: float = POLL_INTERVAL,
) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy, and return that.
    Raises WaitTimeout (an AssertionError) after `timeout` seconds, with `message` (or its result)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            text = message() if callable(message) else message
            raise WaitTimeout(f"condition not met after {timeout}s: {text or predicate!r}")
        await asyncio.sleep(interval)


def wait_for_sync(
    predicate: Callable[[], T],
    timeout: float = DEFAULT_TIMEOUT,
    message: str | Callable[[], str] = "",
    interval: float = POLL_INTERVAL,
) -> T:
    """`wait_for` for plain (non-async) tests: blocks the calling thread while polling."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise WaitTimeout(f"condition not met after {timeout}s: {text or predicate!r}")
        time.sleep(interval)


class LoopTurns:
    """How many times a task of its own got to run: see `loop_turns`."""

    count = 0


@contextlib.asynccontextmanager
async def loop_turns() -> AsyncIterator[LoopTurns]:
    """Count the turns of the event loop while the block runs: work that never awaits leaves the
    count where it was, however long it takes."""
    turns = LoopTurns()

    async def count() -> None:
        while True:
            await asyncio.sleep(0)
            turns.count += 1

    counter = asyncio.create_task(count())
    try:
        yield turns
    finally:
        counter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await counter


@contextlib.contextmanager
def refusing_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port on which connections are refused, for as long as the block runs: bound, not listening,
    so that no other test can take it meanwhile (as it could a port bound and closed again)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        yield sock.getsockname()[1]


@dataclass
class GrpcNode:
    """An in-process node serving gRPC only, with a channel to it and a stub per service."""

    node: Node
    channel: grpc.aio.Channel
    log: LogServiceAsyncStub = field(init=False)
    rest: CoreRestServiceAsyncStub = field(init=False)
    nodes: NodesServiceAsyncStub = field(init=False)
    webhooks: WebhooksServiceAsyncStub = field(init=False)

    def __post_init__(self) -> None:
        self.log = log_pb2_grpc.LogServiceStub(self.channel)
        self.rest = core_rest_pb2_grpc.CoreRestServiceStub(self.channel)
        self.nodes = nodes_pb2_grpc.NodesServiceStub(self.channel)
        self.webhooks = webhooks_pb2_grpc.WebhooksServiceStub(self.channel)

    @property
    def target(self) -> str:
        """host:port of the node's gRPC server."""
        return f"{self.node.config.host}:{self.node.grpc_port}"

    @property
    def node_id(self) -> str:
        """The node's id (the owner of its entries)."""
        return self.node.log.node_id

    async def check_health(self, service: str = "") -> health_pb2.HealthCheckResponse:
        """grpc.health.v1.Health/Check of one service ("" for the whole server)."""
        check = self.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        response = await check(health_pb2.HealthCheckRequest(service=service))
        assert isinstance(response, health_pb2.HealthCheckResponse)
        return response

    async def heads(self) -> dict[str, log_pb2.LogHead]:
        """ListHeads as {owner: head}."""
        response = await self.log.ListHeads(log_pb2.ListHeadsRequest())
        return {h.owner: h for h in response.heads}


def grpc_only_config(data_dir: Path, **overrides: Any) -> NodeConfig:
    """A NodeConfig for an in-process node: no Envoy, no metrics port, no KV/Pigtail, gRPC on a port
    the OS picks. Its root URL stays the default http://127.0.0.1:8000 (nothing listens there)."""
    settings: dict[str, Any] = {
        "data_dir": data_dir,
        "gateway": False,
        "metrics": False,
        "grpc_port": 0,
        "services": [],
    }
    settings.update(overrides)
    return NodeConfig(**settings)


class GrpcNodeFactory:
    """Starts in-process gRPC-only nodes; `close()` stops them all (the fixture does that)."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._count = 0
        self.nodes: list[GrpcNode] = []

    async def __call__(self, name: str | None = None, **overrides: Any) -> GrpcNode:
        """Start a node with data in `root/name` (a fresh dir unless `name` reuses one)."""
        self._count += 1
        data_dir = self._root / (name or f"node{self._count}")
        node = Node(grpc_only_config(data_dir, **overrides))
        try:
            await node.start()
        except BaseException:
            await node.stop()
            raise
        channel = grpc.aio.insecure_channel(f"{node.config.host}:{node.grpc_port}")
        handle = GrpcNode(node, channel)
        self.nodes.append(handle)
        return handle

    async def stop(self, handle: GrpcNode) -> None:
        """Stop one node (its data dir stays, so it can be started again with the same name)."""
        if handle in self.nodes:
            self.nodes.remove(handle)
            await handle.channel.close()
            await handle.node.stop()

    async def close(self) -> None:
        """Stop every node still running, newest first; errors surface after all are stopped."""
        errors: list[BaseException] = []
        while self.nodes:
            try:
                await self.stop(self.nodes[-1])
            except Exception as exc:  # keep stopping the others, then report
                errors.append(exc)
        if errors:
            raise errors[0]


@pytest.fixture
async def grpc_node_factory(tmp_path: Path) -> AsyncIterator[GrpcNodeFactory]:
    """Start in-process gRPC-only nodes with `await grpc_node_factory()`; all stop at teardown."""
    factory = GrpcNodeFactory(tmp_path)
    try:
        yield factory
    finally:
        await factory.close()


@pytest.fixture
async def grpc_node(grpc_node_factory: GrpcNodeFactory) -> GrpcNode:
    """One in-process gRPC-only node (stopped at teardown by its factory)."""
    return await grpc_node_factory("node")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver answering 200 to everything (tests change `receiver.answer` or call
    `receiver.fail(path)`); closed at teardown."""
    r = Receiver()
    try:
        yield r
    finally:
        r.close()
