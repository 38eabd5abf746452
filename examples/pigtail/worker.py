#!/usr/bin/env python3
"""Pigtail example worker: polls GET /queue/example, claims pending `hello_world` tasks with PUT and its
worker id, reads `info` from the claim's answer, does the work and marks each task done with DELETE,
over plain HTTP.

    python examples/pigtail/worker.py                         # against http://127.0.0.1:8003, forever
    python examples/pigtail/worker.py --exit-when-empty       # stop once the queue lists no task

Prints `done <task id>` for every task it completes. A 409 on a claim means another worker got the
task first (or it is done): the worker just moves on.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import httpx


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8003", help="the node's Pigtail port (B+3)")
    parser.add_argument("--queue", default="example", help="queue name (default: example)")
    parser.add_argument(
        "--worker-id",
        default=f"{socket.gethostname()}-{os.getpid()}",
        help="this worker's id (default host-pid)",
    )
    parser.add_argument("--poll-interval", type=float, default=1.0, help="seconds between polls (default 1)")
    parser.add_argument(
        "--max-tasks", type=int, default=0, help="stop after this many tasks (default 0: never)"
    )
    parser.add_argument(
        "--exit-when-empty", action="store_true", help="stop once GET /queue/<queue> lists no task at all"
    )
    return parser.parse_args(argv)


def work(info: object) -> None:
    """The task itself: hello_world just says hello."""
    print(f"hello world: {info}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    done = 0
    with httpx.Client(base_url=args.url, timeout=10.0) as client:
        while args.max_tasks == 0 or done < args.max_tasks:
            listing = client.get(f"/queue/{args.queue}")
            if listing.status_code == 404:
                print(f"no queue {args.queue!r} yet", file=sys.stderr, flush=True)
                time.sleep(args.poll_interval)
                continue
            listing.raise_for_status()
            tasks: dict[str, dict[str, str]] = listing.json()
            if not tasks and args.exit_when_empty:
                break
            claimed_any = False
            for task_id, task in tasks.items():
                if task["task_name"] != "hello_world" or task["state"] != "pending":
                    continue
                claim = client.put(f"/queue/{args.queue}/{task_id}", json={"worker_id": args.worker_id})
                if claim.status_code in (404, 409):
                    continue  # another worker was first, or it is gone
                claim.raise_for_status()
                claimed_any = True
                work(claim.json()["info"])
                finished = client.request(
                    "DELETE", f"/queue/{args.queue}/{task_id}", json={"worker_id": args.worker_id}
                )
                finished.raise_for_status()
                print(f"done {task_id}", flush=True)
                done += 1
                if args.max_tasks and done >= args.max_tasks:
                    break
            if not claimed_any:
                time.sleep(args.poll_interval)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
