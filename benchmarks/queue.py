"""Task queue throughput end to end (add -> claim -> done), Potboiler's Pigtail against RQ on Redis.

    .venv/bin/python -m benchmarks.queue                 # 2,000 tasks per run, a minute or two
    .venv/bin/python -m benchmarks.queue --tasks 300     # a quick look

In one run, on this machine, with 4 workers each (separate processes, one task at a time) and a
no-op task:

1. Pigtail over REST, the contract's flow: workers poll ``GET /queue/Q``, claim pending tasks with
   ``PUT /queue/Q/{id}`` and mark them done with ``DELETE /queue/Q/{id}``; tasks are added with
   ``POST /queue/Q`` (16 in flight) through Envoy;
2. Pigtail over REST with the claim-next extra: workers ``POST /queue/Q/claim`` (long-poll) then
   ``DELETE``;
3. Pigtail over gRPC: workers hold a ``LeaseTasks`` stream (the node pushes the next task as soon as
   there is one) and complete each task with ``CompleteTask``; tasks are added with ``AddTask``;
   once with one task held at a time, once with 4 (like Celery's prefetch);
4. Pigtail over gRPC on one ``WorkTasks`` stream per worker: tasks pushed as on the lease stream, each
   completed by a message on the same stream (no call per task), counted when the node answers it;
5. RQ on a local Redis (``redis-server`` started here on a free port in a temporary directory, AOF
   with ``appendfsync everysec``, like the node's write-ahead log without --fsync): 4 ``SimpleWorker``
   processes (no fork per job) run a no-op function; jobs are enqueued from 16 threads (16 in flight,
   as Pigtail's adds).

Each run starts once its 4 fresh worker processes have started and connected (idle: the queue is
empty), and ends when the last task is done; tasks/s is the number of tasks over that time. A task
counts as done once the node has answered its done with a success: a Pigtail worker whose ``DELETE``
or complete fails counts the failure instead (``failed_completions``), and the task, still leased to
it, is claimed again when its lease expires (``TIMEOUT_MS``). REST requests (producer and workers)
use a minimal keep-alive HTTP/1.1 client (httpx costs ~2.5 ms of CPU per request here and would be
the bottleneck); gRPC uses grpcio; RQ uses redis-py, its own client. A short warm-up run precedes
each measured one. Prints one JSON object with every figure, the ratios Potboiler / RQ and, under
"targets", whether Potboiler >= RQ.

Needs Debian's ``redis-server`` (``apt-get install -y redis-server``) and the Python packages ``rq``
and ``redis`` (``.venv/bin/pip install rq redis``, or the project's dev extras); the script says which
is missing. ``--skip-rq`` measures Potboiler alone.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import multiprocessing
import os
import queue as queue_module
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import grpc
import orjson
import uvloop

from benchmarks.common import Bench, CpuWindow, Json, emit, median_run, node_pid, progress, rounded, target
from potboiler.server.processes import NodeProcess
from potboiler.v1 import pigtail_pb2, pigtail_pb2_grpc

WORKERS = 4
PRODUCER_CONCURRENCY = 16
#: How long a polling REST worker waits before listing again when nothing is pending.
POLL_INTERVAL_S = 0.01
TIMEOUT_MS = 30_000
#: Redis like the node: bound to loopback, append-only file synced every second (the node writes its
#: write-ahead log on every batch and syncs only with --fsync), no snapshots, quiet.
REDIS_OPTIONS = [
    "--bind",
    "127.0.0.1",
    "--save",
    "",
    "--appendonly",
    "yes",
    "--appendfsync",
    "everysec",
    "--loglevel",
    "warning",
]
#: Spawned (not forked) worker processes: the parent runs gRPC and asyncio threads.
MP = multiprocessing.get_context("spawn")

Counter = Synchronized  # multiprocessing.Value("i"): tasks done so far, summed over the workers


def noop(n: int) -> None:
    """The RQ job: does nothing (like Pigtail's workers, which only read the task's info)."""
    del n


# -- what is missing -------------------------------------------------------------------------------------


def missing_for_rq() -> list[str]:
    """What RQ's side needs and is not installed, as instructions."""
    missing = []
    if shutil.which("redis-server") is None:
        missing.append("redis-server is not installed: apt-get install -y redis-server")
    for module in ("redis", "rq"):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the Python package {module!r} is not installed: .venv/bin/pip install rq redis")
    return list(dict.fromkeys(missing))


# -- a minimal HTTP/1.1 client ----------------------------------------------------------------------------
#
# httpx costs about 2.5 ms of CPU per request on this machine (asyncio flavour), which would make the
# load generator, not the queue, the bottleneck. These clients keep one connection alive and speak just
# enough HTTP/1.1 for JSON requests with a Content-Length answer (what Envoy sends).


def _request_bytes(method: str, path: str, body: object, host: str) -> bytes:
    data = b"" if body is None else orjson.dumps(body)
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    return (head + f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def _content_length(line: bytes) -> int | None:
    name, _, value = line.partition(b":")
    return int(value) if name.strip().lower() == b"content-length" else None


class SyncHttp:
    """One keep-alive HTTP/1.1 connection (for worker processes)."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self._host = parts.netloc
        self._sock = socket.create_connection((parts.hostname, parts.port or 80))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._file = self._sock.makefile("rb")

    def request(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        """(status, parsed JSON body or None)."""
        self._sock.sendall(_request_bytes(method, path, body, self._host))
        status = int(self._file.readline().split()[1])
        length = 0
        while (line := self._file.readline()) not in (b"\r\n", b""):
            length = _content_length(line) or length
        payload = self._file.read(length) if length else b""
        return status, orjson.loads(payload) if payload else None

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class AsyncHttp:
    """One keep-alive HTTP/1.1 connection (for the producer)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str) -> None:
        self._reader, self._writer, self._host = reader, writer, host

    @classmethod
    async def connect(cls, url: str) -> AsyncHttp:
        parts = urllib.parse.urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        return cls(reader, writer, parts.netloc)

    async def request(self, method: str, path: str, body: object = None) -> tuple[int, bytes]:
        """(status, raw body)."""
        self._writer.write(_request_bytes(method, path, body, self._host))
        status = int((await self._reader.readline()).split()[1])
        length = 0
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            length = _content_length(line) or length
        return status, await self._reader.readexactly(length) if length else b""

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


# -- worker processes ------------------------------------------------------------------------------------


def _count(counter: Any) -> None:
    with counter.get_lock():
        counter.value += 1


def _succeeded(status: int) -> bool:
    return 200 <= status < 300


def rest_poll_worker(
    url: str, queue: str, worker_id: str, counter: Any, failed: Any, stop: EventType, ready: Any
) -> None:
    """The contract's worker (as examples/pigtail/worker.py): list, claim pending tasks (a few per
    listing, in random order so the workers rarely collide), mark each done; polls again after
    POLL_INTERVAL_S when nothing is pending. A done the node refuses counts in `failed`, not in
    `counter`: the task shows as pending again once its lease expires, and is claimed again."""
    rng = random.Random(worker_id)
    http = SyncHttp(url)
    _count(ready)
    try:
        while not stop.is_set():
            _, tasks = http.request("GET", f"/queue/{queue}")
            pending = [task_id for task_id, task in tasks.items() if task["state"] == "pending"]
            if not pending:
                time.sleep(POLL_INTERVAL_S)
                continue
            rng.shuffle(pending)
            for task_id in pending[:16]:
                status, task = http.request("PUT", f"/queue/{queue}/{task_id}", {"worker_id": worker_id})
                if status != 200:
                    continue  # another worker was first
                task["info"]  # the work: nothing
                status, _ = http.request("DELETE", f"/queue/{queue}/{task_id}", {"worker_id": worker_id})
                _count(counter if _succeeded(status) else failed)
    finally:
        http.close()


def rest_claim_worker(
    url: str, queue: str, worker_id: str, counter: Any, failed: Any, stop: EventType, ready: Any
) -> None:
    """A worker on the claim-next extra: one long-poll claim, one done per task. A done the node
    refuses counts in `failed`, not in `counter`: the task is claimed again once its lease expires."""
    http = SyncHttp(url)
    _count(ready)
    try:
        while not stop.is_set():
            status, task = http.request(
                "POST", f"/queue/{queue}/claim", {"worker_id": worker_id, "wait_ms": 1000}
            )
            if status != 200:
                continue
            status, _ = http.request("DELETE", f"/queue/{queue}/{task['id']}", {"worker_id": worker_id})
            _count(counter if _succeeded(status) else failed)
    finally:
        http.close()


def lease_worker(
    target_: str,
    queue: str,
    worker_id: str,
    counter: Any,
    failed: Any,
    stop: EventType,
    ready: Any,
    in_flight: int = 1,
) -> None:
    """A worker on the gRPC lease stream: the node pushes each task (up to `in_flight` held at once,
    the next ones claimed while the worker works); CompleteTask marks it done. A CompleteTask that
    fails counts in `failed`, not in `counter`: the task is leased again once its lease expires."""
    with grpc.insecure_channel(target_) as channel:
        stub = pigtail_pb2_grpc.PigtailServiceStub(channel)
        request = pigtail_pb2.LeaseTasksRequest(queue=queue, worker_id=worker_id, max_in_flight=in_flight)
        _count(ready)
        stream = stub.LeaseTasks(request)
        for message in stream:
            try:
                stub.CompleteTask(
                    pigtail_pb2.CompleteTaskRequest(
                        queue=queue, task_id=message.task.task_id, worker_id=worker_id
                    )
                )
            except grpc.RpcError:
                _count(failed)
            else:
                _count(counter)
            if stop.is_set():
                break
        stream.cancel()


def work_worker(
    target_: str, queue: str, worker_id: str, counter: Any, failed: Any, stop: EventType, ready: Any
) -> None:
    """A worker on the WorkTasks stream: the node pushes each task as on the lease stream, and the
    worker completes it on the same stream; a task counts once the node has answered its complete (a
    complete the node answers with a failure counts in `failed`)."""
    requests: queue_module.SimpleQueue[pigtail_pb2.WorkTasksRequest | None] = queue_module.SimpleQueue()
    requests.put(
        pigtail_pb2.WorkTasksRequest(start=pigtail_pb2.LeaseTasksRequest(queue=queue, worker_id=worker_id))
    )

    def outgoing() -> Iterator[pigtail_pb2.WorkTasksRequest]:
        while (request := requests.get()) is not None:
            yield request

    with grpc.insecure_channel(target_) as channel:
        stub = pigtail_pb2_grpc.PigtailServiceStub(channel)
        _count(ready)
        responses = stub.WorkTasks(outgoing())
        try:
            for message in responses:
                if message.HasField("task"):
                    requests.put(pigtail_pb2.WorkTasksRequest(complete_task_id=message.task.task_id))
                elif message.HasField("completed"):
                    _count(counter)
                elif message.HasField("failure"):
                    _count(failed)
                if stop.is_set():
                    break
        finally:
            requests.put(None)
            responses.cancel()


def rq_worker(
    redis_url: str, queue: str, worker_id: str, counter: Any, failed: Any, stop: EventType, ready: Any
) -> None:
    """One RQ SimpleWorker (runs jobs in its own process, no fork per job)."""
    from redis import Redis
    from rq import Queue, SimpleWorker

    del counter, failed, stop  # RQ's finished-job registry counts, and the worker runs until terminated
    connection = Redis.from_url(redis_url)
    worker = SimpleWorker(
        [Queue(queue, connection=connection)], connection=connection, name=f"{worker_id}-{os.getpid()}"
    )
    _count(ready)
    worker.work(logging_level="WARNING")


# -- one measured run ------------------------------------------------------------------------------------


@contextmanager
def worker_processes(target_fn: Callable[..., None], args: list[tuple[Any, ...]]) -> Iterator[None]:
    """One process per item of `args`, running `target_fn(*item)`; stopped (SIGTERM, then SIGKILL) on exit."""
    processes = [MP.Process(target=target_fn, args=a, daemon=True) for a in args]
    for p in processes:
        p.start()
    try:
        yield
    finally:
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()


async def all_ready(ready: Any, timeout: float = 60.0) -> None:
    """Wait until every worker process has started and connected (their start-up is not timed:
    a fresh process imports the benchmark and its client library, which would weigh on a run of
    a few seconds, more on the side whose library is bigger)."""
    deadline = time.monotonic() + timeout
    while _value(ready) < WORKERS:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {_value(ready)} of {WORKERS} workers started within {timeout:g} s")
        await asyncio.sleep(0.01)


async def produce(add: Callable[[int], Awaitable[None]], tasks: int, concurrency: int) -> None:
    numbers = iter(range(tasks))

    async def one() -> None:
        for n in numbers:
            await add(n)

    await asyncio.gather(*(one() for _ in range(concurrency)))


async def timed_run(
    add: Callable[[int], Awaitable[None]],
    done: Callable[[], int],
    tasks: int,
    cpu: CpuWindow,
    failed: Callable[[], int] | None = None,
) -> Json:
    """Add `tasks` tasks while the (already running) workers do them; time until the last is done.
    With `failed`, how many dones the node refused (those tasks are done later, when claimed again)."""
    start = time.monotonic()
    cpu.begin()
    producer = asyncio.create_task(produce(add, tasks, PRODUCER_CONCURRENCY))
    deadline = start + max(120.0, tasks / 10)
    while done() < tasks:
        if time.monotonic() > deadline:
            producer.cancel()
            refused = "" if failed is None else f" ({failed()} dones refused)"
            raise TimeoutError(f"only {done()} of {tasks} tasks done after {deadline - start:g} s{refused}")
        await asyncio.sleep(0.005)
    await producer
    elapsed = time.monotonic() - start
    cpu.end()
    out: Json = {"tasks": tasks, "seconds": rounded(elapsed, 3), "tasks_per_s": rounded(tasks / elapsed)}
    if failed is not None:
        out["failed_completions"] = failed()
    return {**out, **cpu.figures(tasks)}


async def measure(
    node: NodeProcess,
    worker: Callable[..., None],
    endpoint: str,
    make_add: Callable[[str], Callable[[int], Awaitable[None]]],
    tasks: int,
    warmup: int,
    extra: tuple[Any, ...] = (),
) -> Json:
    """A warm-up run then a measured run, each on a fresh queue with fresh workers
    `worker(endpoint, queue, worker_id, counter, failed, stop, ready, *extra)` (`counter` counts the
    tasks done, `failed` the dones the node refused), timed once they are all ready; the measured
    run's figures."""
    out: Json = {}
    for phase, count in (("warmup", warmup), ("measured", tasks)):
        queue = await create_queue(node)
        counter = MP.Value("i", 0)
        failed = MP.Value("i", 0)
        stop = MP.Event()
        ready = MP.Value("i", 0)
        args = [(endpoint, queue, f"w{i}", counter, failed, stop, ready, *extra) for i in range(WORKERS)]
        with worker_processes(worker, args):
            await all_ready(ready)
            result = await timed_run(
                make_add(queue),
                functools.partial(_value, counter),
                count,
                CpuWindow(node_pid(node)),
                functools.partial(_value, failed),
            )
            stop.set()
        if phase == "measured":
            out = result
    return out


def _value(counter: Any) -> int:
    return int(counter.value)


# -- Potboiler -------------------------------------------------------------------------------------------


async def create_queue(node: NodeProcess) -> str:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    http = await AsyncHttp.connect(node.port_url(node.ports.pigtail))
    try:
        status, body = await http.request("POST", "/create", {"name": name, "timeout_ms": TIMEOUT_MS})
    finally:
        await http.close()
    if status != 201:
        raise RuntimeError(f"POST /create: {status} {body!r}")
    return name


async def pigtail_rest(node: NodeProcess, worker: Callable[..., None], tasks: int, warmup: int) -> Json:
    """Workers over REST; tasks added with POST /queue/Q (PRODUCER_CONCURRENCY connections)."""
    url = node.port_url(node.ports.pigtail)
    connections = [await AsyncHttp.connect(url) for _ in range(PRODUCER_CONCURRENCY)]
    free: asyncio.Queue[AsyncHttp] = asyncio.Queue()
    for connection in connections:
        free.put_nowait(connection)
    try:

        def make_add(queue: str) -> Callable[[int], Awaitable[None]]:
            async def add(n: int) -> None:
                connection = await free.get()
                try:
                    status, body = await connection.request(
                        "POST", f"/queue/{queue}", {"task_name": "noop", "info": {"n": n}}
                    )
                finally:
                    free.put_nowait(connection)
                if status != 201:
                    raise RuntimeError(f"POST /queue/{queue}: {status} {body!r}")

            return add

        return await measure(node, worker, url, make_add, tasks, warmup)
    finally:
        for connection in connections:
            await connection.close()


async def pigtail_grpc(
    node: NodeProcess, worker: Callable[..., None], tasks: int, warmup: int, extra: tuple[Any, ...] = ()
) -> Json:
    """Workers on a gRPC stream (`worker(endpoint, queue, worker_id, counter, failed, stop, ready,
    *extra)`); tasks added with AddTask. gRPC goes through Envoy (port B), as clients reach a node."""
    endpoint = f"{node.host}:{node.ports.core}"
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = pigtail_pb2_grpc.PigtailServiceStub(channel)

        def make_add(queue: str) -> Callable[[int], Awaitable[None]]:
            async def add(n: int) -> None:
                request = pigtail_pb2.AddTaskRequest(queue=queue, task_name="noop")
                request.info.struct_value.update({"n": n})
                await stub.AddTask(request)

            return add

        return await measure(node, worker, endpoint, make_add, tasks, warmup, extra)


# -- RQ --------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def redis_server() -> Iterator[tuple[str, int]]:
    """A redis-server on a free port in a temporary directory: (url, pid); stopped on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="potboiler-bench-redis-"))
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", *REDIS_OPTIONS, "--port", str(port), "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        from redis import Redis
        from redis.exceptions import ConnectionError as RedisConnectionError

        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 20
        while True:
            try:
                if Redis.from_url(url).ping():
                    break
            except RedisConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {port}") from None
                time.sleep(0.05)
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


async def rq_run(url: str, pid: int, tasks: int, warmup: int) -> Json:
    """RQ workers on the redis-server at `url` (pid `pid`); jobs enqueued from PRODUCER_CONCURRENCY
    threads, so that as many are in flight as Pigtail's producer has adds."""
    from redis import Redis
    from rq import Queue
    from rq.registry import FinishedJobRegistry

    out: Json = {}
    connection = Redis.from_url(url)
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(max_workers=PRODUCER_CONCURRENCY) as pool:
        for phase, count in (("warmup", warmup), ("measured", tasks)):
            name = f"bench-{uuid.uuid4().hex[:8]}"
            queue = Queue(name, connection=connection)
            registry = FinishedJobRegistry(queue=queue)

            async def add(n: int, queue: Queue = queue) -> None:
                await loop.run_in_executor(pool, functools.partial(queue.enqueue, "benchmarks.queue.noop", n))

            ready = MP.Value("i", 0)
            args = [(url, name, f"w{i}", None, None, None, ready) for i in range(WORKERS)]
            with worker_processes(rq_worker, args):
                await all_ready(ready)
                result = await timed_run(add, registry.get_job_count, count, CpuWindow(pid))
            if phase == "measured":
                out = result
    connection.close()
    return out


# -- main ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=2000, help="tasks per measured run (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="tasks per warm-up run (default 200)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of every variant, interleaved; medians reported (default 3)",
    )
    parser.add_argument(
        "--only", action="append", choices=VARIANTS, help="run only these variants (repeatable)"
    )
    parser.add_argument("--skip-rq", action="store_true", help="measure Potboiler only")
    return parser.parse_args(argv)


#: The Potboiler variants: name -> what it is.
VARIANTS = {
    "rest_poll": "Pigtail over REST (poll GET /queue/Q, PUT claim, DELETE done)",
    "rest_claim_next": "Pigtail over REST with claim-next (POST /queue/Q/claim long-poll, DELETE done)",
    "grpc_lease": "Pigtail over gRPC (LeaseTasks stream, one task at a time, CompleteTask)",
    "grpc_lease_prefetch4": "Pigtail over gRPC (LeaseTasks stream, 4 in flight like Celery's prefetch)",
    "grpc_work": "Pigtail over gRPC (WorkTasks stream: tasks in, completes out on the same stream)",
}


async def run_variant(name: str, node: NodeProcess, tasks: int, warmup: int) -> Json:
    if name == "rest_poll":
        return await pigtail_rest(node, rest_poll_worker, tasks, warmup)
    if name == "rest_claim_next":
        return await pigtail_rest(node, rest_claim_worker, tasks, warmup)
    if name == "grpc_lease":
        return await pigtail_grpc(node, lease_worker, tasks, warmup, (1,))
    if name == "grpc_lease_prefetch4":
        return await pigtail_grpc(node, lease_worker, tasks, warmup, (4,))
    return await pigtail_grpc(node, work_worker, tasks, warmup)


def ratio(a: Json, b: Json) -> float | None:
    if not a or not b or not b.get("tasks_per_s"):
        return None
    return rounded(a["tasks_per_s"] / b["tasks_per_s"], 2)


async def run(args: argparse.Namespace) -> int:
    if not args.skip_rq and (missing := missing_for_rq()):
        print("benchmarks/queue.py compares with RQ on Redis, but:", *missing, sep="\n  ", file=sys.stderr)
        print("Install them, or pass --skip-rq to measure Potboiler alone.", file=sys.stderr)
        return 2
    names = args.only or list(VARIANTS)
    result: Json = {
        "benchmark": "queue",
        "workers": WORKERS,
        "tasks": args.tasks,
        "rounds": args.rounds,
        "producer_concurrency": PRODUCER_CONCURRENCY,
        "cores": os.cpu_count(),
    }
    runs: dict[str, list[Json]] = {name: [] for name in [*names, *([] if args.skip_rq else ["rq"])]}
    with Bench() as bench, contextlib.ExitStack() as stack:
        node = bench.start_node()
        redis = None if args.skip_rq else stack.enter_context(redis_server())
        for round_ in range(1, args.rounds + 1):
            for name in names:
                progress(f"round {round_}: {VARIANTS[name]}")
                runs[name].append(await run_variant(name, node, args.tasks, args.warmup))
                progress(f"  {runs[name][-1]['tasks_per_s']} tasks/s")
            if redis is not None:
                progress(f"round {round_}: RQ on Redis (4 SimpleWorker processes, no-op job)")
                runs["rq"].append(await rq_run(*redis, args.tasks, args.warmup))
                progress(f"  {runs['rq'][-1]['tasks_per_s']} tasks/s")
    potboiler = {name: median_run(runs[name], "tasks_per_s") for name in names}
    result["potboiler"] = potboiler
    if args.skip_rq:
        emit(result)
        return 0
    rq = median_run(runs["rq"], "tasks_per_s")
    result["rq"] = rq
    result["ratio_to_rq"] = {name: ratio(figures, rq) for name, figures in potboiler.items()}
    result["targets"] = {
        f"{name}_tasks_per_s_vs_rq": target(figures["tasks_per_s"], rq["tasks_per_s"], at_least=True)
        for name, figures in potboiler.items()
    }
    emit(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return uvloop.run(run(parse_args(argv)))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
