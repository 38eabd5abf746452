#!/usr/bin/env python3
"""Pigtail example provider: creates the queue "example" (claims time out after 1000 ms) and adds a
`hello_world` task with info {"foo": "bar"} every few seconds, over plain HTTP.

    python examples/pigtail/provider.py                      # against http://127.0.0.1:8003, forever
    python examples/pigtail/provider.py --interval 0.2 --count 5

Prints the id of each task it adds, one per line. Exits 1 with a message when the node refuses.
"""

from __future__ import annotations

import argparse
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
        "--timeout-ms", type=int, default=1000, help="claim timeout of the queue (default 1000)"
    )
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between tasks (default 3)")
    parser.add_argument("--count", type=int, default=0, help="how many tasks to add (default 0: forever)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with httpx.Client(base_url=args.url, timeout=10.0) as client:
        created = client.post("/create", json={"name": args.queue, "timeout_ms": args.timeout_ms})
        if created.status_code not in (200, 201):
            print(
                f"cannot create queue {args.queue!r}: {created.status_code} {created.text}", file=sys.stderr
            )
            return 1
        added = 0
        while args.count == 0 or added < args.count:
            if added:
                time.sleep(args.interval)
            response = client.post(
                f"/queue/{args.queue}", json={"task_name": "hello_world", "info": {"foo": "bar"}}
            )
            if response.status_code != 201:
                print(f"cannot add a task: {response.status_code} {response.text}", file=sys.stderr)
                return 1
            print(response.json()["id"], flush=True)
            added += 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
