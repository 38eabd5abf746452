#!/usr/bin/env python3
"""Pigtail example worker on the gRPC lease stream: one WorkTasks stream, on which the node hands it
the next claimable task of the queue as soon as there is one (no polling) and it completes each task
(no call per task); the node answers every complete once it has taken effect.

    python examples/pigtail/lease_worker.py                   # against 127.0.0.1:8000 (gRPC via Envoy)
    python examples/pigtail/lease_worker.py --max-tasks 10 --idle-exit 5

Prints `done <task id>` for every task it completes. Needs the `potboiler` package (its generated
gRPC stubs, `potboiler.v1`); a client in another language generates the same from proto/.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys

import grpc
from google.protobuf import json_format

from potboiler.v1 import pigtail_pb2, pigtail_pb2_grpc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="127.0.0.1:8000", help="host:port of the node's gRPC (B or B+10)")
    parser.add_argument("--queue", default="example", help="queue name (default: example)")
    parser.add_argument(
        "--worker-id",
        default=f"{socket.gethostname()}-{os.getpid()}",
        help="this worker's id (default host-pid)",
    )
    parser.add_argument(
        "--max-tasks",
        type=int,
        default=0,
        help="take no more tasks after this many; those already handed to it (up to --in-flight) "
        "are completed too (default 0: never stop)",
    )
    parser.add_argument(
        "--idle-exit",
        type=float,
        default=0.0,
        help="stop when no task comes for this many seconds (0: never)",
    )
    parser.add_argument("--in-flight", type=int, default=1, help="tasks held at once (default 1)")
    return parser.parse_args(argv)


#: Seconds between looks for a queue that does not exist yet.
QUEUE_POLL_S = 1.0


async def run(args: argparse.Namespace) -> int:
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = pigtail_pb2_grpc.PigtailServiceStub(channel)
        waited = 0.0
        while True:
            try:
                await work(stub, args)
                return 0
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND or (args.idle_exit and waited >= args.idle_exit):
                    print(f"work stream failed: {error.code().name}: {error.details()}", file=sys.stderr)
                    return 1
            print(f"no queue {args.queue!r} yet", file=sys.stderr, flush=True)  # (or deleted meanwhile)
            await asyncio.sleep(QUEUE_POLL_S)
            waited += QUEUE_POLL_S


async def work(stub: pigtail_pb2_grpc.PigtailServiceStub, args: argparse.Namespace) -> None:
    """One WorkTasks stream, until --max-tasks or --idle-exit ends it (or an error)."""
    taken = 0  # tasks this worker took on
    stream = stub.WorkTasks()
    start = pigtail_pb2.LeaseTasksRequest(
        queue=args.queue, worker_id=args.worker_id, max_in_flight=args.in_flight
    )
    stopping = False  # no more tasks asked for: finish those held, then close
    closed = False  # this worker's side of the stream
    completing: set[str] = set()  # completes sent and not answered yet

    async def stop() -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            await stream.write(pigtail_pb2.WorkTasksRequest(stop_leasing=True))

    async def close_when_done() -> None:
        nonlocal closed
        if stopping and not completing and not closed:
            closed = True
            await stream.done_writing()  # every task taken is answered: the node ends the stream

    try:
        await stream.write(pigtail_pb2.WorkTasksRequest(start=start))
        while True:
            # A read is not cancelled on a timeout: that would cancel the whole call.
            read = asyncio.ensure_future(stream.read())
            if args.idle_exit and not stopping:
                await asyncio.wait([read], timeout=args.idle_exit)
                if not read.done():  # no task for --idle-exit seconds
                    await stop()
                    await close_when_done()
            message = await read
            if not isinstance(message, pigtail_pb2.WorkTasksResponse):
                return  # the node ended the stream, having answered every complete
            kind = message.WhichOneof("response")
            if kind == "task":
                task_id = message.task.task_id
                if closed:  # sent as this worker closed: it goes back when its lease ends
                    print(f"task {task_id} left to others", file=sys.stderr, flush=True)
                    continue
                if not stopping:
                    taken += 1
                    if args.max_tasks and taken >= args.max_tasks:
                        await stop()  # before this task's complete, which would make room
                info = json_format.MessageToDict(message.task.info)  # the task's info as plain JSON
                print(f"hello world: {info}", file=sys.stderr, flush=True)
                completing.add(task_id)
                await stream.write(pigtail_pb2.WorkTasksRequest(complete_task_id=task_id))
                continue
            if kind == "completed":
                task_id = message.completed.task.task_id
                print(f"done {task_id}", flush=True)
            elif kind == "failure":
                task_id = message.failure.task_id
                print(f"task {task_id}: {message.failure.message}", file=sys.stderr, flush=True)
            else:
                continue
            completing.discard(task_id)
            await close_when_done()
    finally:
        stream.cancel()


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
