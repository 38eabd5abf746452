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
        "--max-tasks", type=int, default=0, help="stop after this many tasks (default 0: never)"
    )
    parser.add_argument(
        "--idle-exit",
        type=float,
        default=0.0,
        help="stop when no task comes for this many seconds (0: never)",
    )
    parser.add_argument("--in-flight", type=int, default=1, help="tasks held at once (default 1)")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    done = 0
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = pigtail_pb2_grpc.PigtailServiceStub(channel)
        stream = stub.WorkTasks()
        start = pigtail_pb2.LeaseTasksRequest(
            queue=args.queue, worker_id=args.worker_id, max_in_flight=args.in_flight
        )
        try:
            await stream.write(pigtail_pb2.WorkTasksRequest(start=start))
            while args.max_tasks == 0 or done < args.max_tasks:
                read = stream.read()
                message = await (asyncio.wait_for(read, args.idle_exit) if args.idle_exit else read)
                if not isinstance(message, pigtail_pb2.WorkTasksResponse):
                    break  # the stream ended
                kind = message.WhichOneof("response")
                if kind == "task":
                    info = json_format.MessageToDict(message.task.info)  # the task's info as plain JSON
                    print(f"hello world: {info}", file=sys.stderr, flush=True)
                    await stream.write(pigtail_pb2.WorkTasksRequest(complete_task_id=message.task.task_id))
                elif kind == "completed":
                    print(f"done {message.completed.task.task_id}", flush=True)
                    done += 1
                elif kind == "failure":
                    failure = message.failure
                    print(f"task {failure.task_id}: {failure.message}", file=sys.stderr, flush=True)
        except TimeoutError:
            pass  # idle for --idle-exit seconds
        except grpc.aio.AioRpcError as error:
            print(f"work stream failed: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        finally:
            stream.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
