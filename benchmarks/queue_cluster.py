"""Pigtail on a 3-node cluster: how many tasks are handed to more than one worker, and how soon.

    .venv/bin/python -m benchmarks.queue_cluster [--tasks 60] [--workers 1] [--quick]

Delivery is at-least-once: two workers on two nodes that claim one task before their claims reach each
other both get it. Starts a 3-node cluster (`potboiler node` processes with their Envoys, peered) in
a temporary directory, creates a queue (timeout 30 s), and runs `--workers` workers per node, each a
loop of gRPC `ClaimNextTask` (long-poll) then `CompleteTask` on its node, a no-op task in between.
Two scenarios:

1. trickle: the workers wait idle; `--tasks` tasks are added one at a time, round-robin over the
   nodes, every 200 ms (so each is claimed before the next is added);
2. backlog: 3 x `--tasks` tasks are added first, then the workers start and drain the queue.

For each: tasks handed to more than one worker (claim answers, counted per task), and the time from
sending an add to the first claim answer of its task (trickle). Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import time

import grpc
from google.protobuf.struct_pb2 import Value

from benchmarks.common import Bench, emit, progress, summary
from potboiler.server.processes import NodeProcess
from potboiler.v1 import pigtail_pb2, pigtail_pb2_grpc

QUEUE_TIMEOUT_MS = 30_000
TRICKLE_INTERVAL_S = 0.2


class Workers:
    """Claim-then-complete loops on every node, recording who got which task and when."""

    def __init__(
        self, stubs: list[pigtail_pb2_grpc.PigtailServiceAsyncStub], queue: str, per_node: int
    ) -> None:
        self._stubs = stubs
        self._queue = queue
        self._per_node = per_node
        self.claims: dict[str, list[str]] = collections.defaultdict(list)
        self.first_claim: dict[str, float] = {}
        self._claimed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for n, stub in enumerate(self._stubs):
            for w in range(self._per_node):
                self._tasks.append(asyncio.create_task(self._work(stub, f"node{n}-w{w}")))

    async def _work(self, stub: pigtail_pb2_grpc.PigtailServiceAsyncStub, worker: str) -> None:
        while True:
            answer = await stub.ClaimNextTask(
                pigtail_pb2.ClaimNextTaskRequest(queue=self._queue, worker_id=worker, wait_ms=1000)
            )
            if not answer.HasField("task"):
                continue
            task_id = answer.task.task_id
            self.first_claim.setdefault(task_id, time.perf_counter())
            self.claims[task_id].append(worker)
            self._claimed.set()
            await stub.CompleteTask(
                pigtail_pb2.CompleteTaskRequest(queue=self._queue, task_id=task_id, worker_id=worker)
            )

    async def until_claimed(self, ids: list[str], timeout: float = 60.0) -> None:
        async with asyncio.timeout(timeout):
            while not all(i in self.claims for i in ids):
                self._claimed.clear()
                await self._claimed.wait()
        await asyncio.sleep(1.0)  # claims of the same tasks still on their way

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task

    def figures(self, ids: list[str]) -> dict[str, object]:
        twice = sum(1 for i in ids if len(set(self.claims[i])) > 1)
        return {
            "tasks": len(ids),
            "handed_to_several_workers": twice,
            "percent": round(100 * twice / len(ids), 1),
        }


async def add(stub: pigtail_pb2_grpc.PigtailServiceAsyncStub, queue: str, n: int) -> str:
    answer = await stub.AddTask(
        pigtail_pb2.AddTaskRequest(queue=queue, task_name=f"t{n}", info=Value(number_value=n))
    )
    return str(answer.task.task_id)


async def scenario(nodes: list[NodeProcess], name: str, tasks: int, per_node: int) -> dict[str, object]:
    channels = [grpc.aio.insecure_channel(node.grpc_target) for node in nodes]
    stubs: list[pigtail_pb2_grpc.PigtailServiceAsyncStub] = [
        pigtail_pb2_grpc.PigtailServiceStub(c) for c in channels
    ]
    try:
        await stubs[0].CreateQueue(pigtail_pb2.CreateQueueRequest(name=name, timeout_ms=QUEUE_TIMEOUT_MS))
        for stub in stubs:  # the queue known everywhere before anyone claims
            async with asyncio.timeout(30):
                while True:
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await stub.GetQueue(pigtail_pb2.GetQueueRequest(name=name))
                        break
                    await asyncio.sleep(0.05)
        workers = Workers(stubs, name, per_node)
        added_at: dict[str, float] = {}
        if name == "trickle":
            workers.start()
            await asyncio.sleep(0.5)
            ids = []
            for n in range(tasks):
                sent = time.perf_counter()
                task_id = await add(stubs[n % len(stubs)], name, n)
                added_at[task_id] = sent
                ids.append(task_id)
                await asyncio.sleep(TRICKLE_INTERVAL_S)
        else:
            ids = [await add(stubs[n % len(stubs)], name, n) for n in range(tasks * 3)]
            workers.start()
        await workers.until_claimed(ids)
        await workers.stop()
        out = workers.figures(ids)
        if added_at:
            out["add_to_claim_ms"] = summary([workers.first_claim[i] - added_at[i] for i in ids], scale=1000)
        return out
    finally:
        for channel in channels:
            await channel.close()


async def measure(nodes: list[NodeProcess], tasks: int, per_node: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in ("trickle", "backlog"):
        progress(f"{name}: {per_node} worker(s) per node")
        out[name] = await scenario(nodes, name, tasks, per_node)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--workers", type=int, default=1, help="workers per node")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 tasks")
    args = parser.parse_args(argv)
    if args.quick:
        args.tasks = 10
    with Bench() as bench:
        nodes = bench.start_cluster(3, name="queue")
        emit({"queue_cluster": asyncio.run(measure(nodes, args.tasks, args.workers))})


if __name__ == "__main__":
    main()
