"""§6 task queue, end to end (add, claim, done) with 4 worker processes: RQ on Redis against Pigtail
over REST (the contract's flow: list, claim, done) and over its gRPC lease stream (WorkTasks: tasks
leased and completed on one stream per worker) — the parts of benchmarks/queue.py, which describes
each flow.
"""

from __future__ import annotations

import uvloop

from benchmarks import queue
from benchmarks.common import Json
from benchmarks.peers.process import tree_rss_mb
from benchmarks.sections import Settings
from potboiler.server.processes import NodeProcess

#: What is said about RQ's Redis in the results (benchmarks/queue.py starts it).
RQ_CONFIG = {
    "redis": "redis-server " + " ".join(queue.REDIS_OPTIONS),
    "workers": f"{queue.WORKERS} rq SimpleWorker processes, a no-op job",
}


class RedisPid:
    """The Redis server of RQ as a system of the comparison (its memory)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    @property
    def pids(self) -> list[int]:
        return [self.pid]

    def rss_mb(self) -> float:
        return tree_rss_mb(self.pids)

    def settle(self) -> None:
        """One server: nothing to wait for."""

    def stop(self) -> None:
        """Stopped by benchmarks/queue.py's redis_server()."""


def rq(url: str, pid: int, settings: Settings) -> Json:
    return uvloop.run(queue.rq_run(url, pid, settings.queue_tasks, settings.queue_warmup))


def pigtail_rest(node: NodeProcess, settings: Settings) -> Json:
    return uvloop.run(
        queue.pigtail_rest(node, queue.rest_poll_worker, settings.queue_tasks, settings.queue_warmup)
    )


def pigtail_work(node: NodeProcess, settings: Settings) -> Json:
    return uvloop.run(
        queue.pigtail_grpc(node, queue.work_worker, settings.queue_tasks, settings.queue_warmup)
    )
