"""A Jepsen-style run: a 5-node cluster under steady writes (log appends, KV LWW / OR-Set / counter ops,
Pigtail adds, claims, heartbeats, releases, completions and retries of dead-lettered tasks) while a nemesis partitions it (one node off, majorities, ring,
bridge), kill -9s and restarts nodes, pauses them (SIGSTOP/SIGCONT), slows, stalls and resets links
through a proxy, with two nodes' clocks skewed. Then everything heals, the cluster must become quiet,
and the checker (tests/faults/checker.py) compares every node's state with the history.

The figures (operations, lost, duplicated, convergence after heals, faults injected) are printed as
one JSON line, written to figures.json in the test's directory and shown in the terminal summary.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import wait_for, wait_for_sync
from tests.faults.checker import (
    check_all,
    fail_on_problems,
    kv_dump,
    percentile_summary,
    report_figures,
    task_views,
)
from tests.faults.cluster import FaultCluster
from tests.faults.nemesis import Nemesis, wait_quiet
from tests.faults.workload import QUEUE, History, Workload

#: The schedule's seed, and how long the nemesis injects faults (the writes run as long); both can be
#: changed for a longer or different run, e.g. POTBOILER_NEMESIS_S=600 POTBOILER_NEMESIS_SEED=7.
SEED = int(os.environ.get("POTBOILER_NEMESIS_SEED", "20240607"))
DURATION_S = float(os.environ.get("POTBOILER_NEMESIS_S", "40"))
NODES = 5
#: Physical clock offsets (ms) of some nodes.
CLOCK_SKEW_MS = {1: 2_500, 3: -2_500}
#: Longest the queue drain after the heal may take (claims must time out first).
DRAIN_TIMEOUT_S = 60.0


def drain_queue(cluster: FaultCluster, history: History) -> int:
    """Complete every acknowledged task not done yet, and every other task node 0 lists (an add whose
    answer never came, from a paused node say, may have landed) or lists as dead, on node 0, as worker
    "drain" (claims held by others must time out first; dead tasks are retried first); returns how
    many the drain completed."""
    url = f"{cluster.nodes[0].pigtail_url}/queue/{QUEUE}"
    remaining = {o.result for o in history.of("task-add", outcome="ok")}
    drained = 0
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    with httpx.Client(timeout=10.0) as client:
        remaining |= set(client.get(url).json()) | set(client.get(f"{url}/dead").json())
        while remaining:
            for task in sorted(remaining):
                state = client.get(f"{url}/{task}").json().get("state")
                if state == "done":
                    remaining.discard(task)
                    continue
                if state == "dead":
                    client.post(f"{url}/{task}/retry", json={})
                if client.put(f"{url}/{task}", json={"worker_id": "drain"}).status_code != 200:
                    continue  # claimed by a worker whose claim has not timed out yet
                done = client.request("DELETE", f"{url}/{task}", json={"worker_id": "drain"})
                if done.status_code == 200:
                    drained += 1
                    remaining.discard(task)
            assert time.monotonic() < deadline, f"{len(remaining)} tasks not done after {DRAIN_TIMEOUT_S}s"
            if remaining:
                time.sleep(0.1)
    return drained


def same_everywhere(cluster: FaultCluster, read: Any) -> bool:
    """Whether `read(node_index)` gives the same answer on every node."""
    try:
        answers = [read(n.index) for n in cluster.nodes]
    except httpx.HTTPError:
        return False
    return all(a == answers[0] for a in answers)


@pytest.mark.timeout(DURATION_S + 240)  # start, heal, drain and check come on top of the schedule
async def test_nemesis(cluster: FaultCluster, tmp_path: Path, record_property: Any) -> None:
    began = time.monotonic()

    def skew(i: int) -> list[str]:
        return ["--clock-skew-ms", str(CLOCK_SKEW_MS[i])] if i in CLOCK_SKEW_MS else []

    # Every link of the last node goes through the proxy.
    proxied = [(NODES - 1, j) for j in range(NODES - 1)]
    await asyncio.to_thread(cluster.start, NODES, extra_args=skew, proxied=proxied)
    cluster.count("clock-skew", len(CLOCK_SKEW_MS))
    workload = Workload(cluster.nodes, tag=f"nemesis-{SEED}", seed=SEED)
    for skipped in workload.skipped:
        print(f"workload part skipped: {skipped}")
    async with httpx.AsyncClient(timeout=10.0) as client:
        await workload.setup(client)
        await wait_for(
            lambda: workload.ready_everywhere(client), timeout=30, message="tables and queue everywhere"
        )

    stop = asyncio.Event()
    writers = asyncio.create_task(workload.run(stop))
    nemesis = Nemesis(cluster, seed=SEED)
    try:
        await asyncio.to_thread(nemesis.run, DURATION_S)
    finally:
        stop.set()
        history = await writers
    history.dump(tmp_path / "history.jsonl")
    (tmp_path / "nemesis.log").write_text("\n".join(nemesis.log) + "\n")

    cluster.heal_network()
    quiet_s = await asyncio.to_thread(wait_quiet, cluster)
    drained = 0
    if "kv" in workload.services:
        await asyncio.to_thread(
            wait_for_sync,
            lambda: same_everywhere(cluster, lambda i: kv_dump(cluster, i)),
            30,
            "KV state equal",
        )
    if "pigtail" in workload.services:
        drained = await asyncio.to_thread(drain_queue, cluster, history)
        await asyncio.to_thread(wait_quiet, cluster)
        acked = sorted({o.result for o in history.of("task-add", outcome="ok")})
        await asyncio.to_thread(
            wait_for_sync,
            lambda: same_everywhere(cluster, lambda i: task_views(cluster, i, acked)),
            30,
            "task views equal",
        )

    verdict = await asyncio.to_thread(check_all, cluster, history, workload.tag, workload.services, drained)
    verdict.figures.update(
        {
            "test": "nemesis",
            "seed": SEED,
            "nodes": NODES,
            "nemesis_s": DURATION_S,
            "services": workload.services,
            "skipped": workload.skipped,
            "convergence_after_heal_s": percentile_summary(nemesis.convergence),
            "final_quiescence_s": round(quiet_s, 3),
            "faults": dict(sorted(cluster.faults.items())),
            "faults_injected": sum(cluster.faults.values()),
            "wall_s": round(time.monotonic() - began, 1),
        }
    )
    report_figures(verdict.figures, tmp_path, record_property)
    verdict.problems += nemesis.problems
    fail_on_problems(verdict)
