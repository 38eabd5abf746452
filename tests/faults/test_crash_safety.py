"""Crash safety of the store: a node running with --fsync is killed with SIGKILL in the middle of heavy
appends (many concurrent gRPC batches, and KV counter increments when the KV service runs), restarted,
and checked, five times over the same data directory: every acknowledged entry is there after every
restart (with the data it was acknowledged with), nothing is there that was not sent, no entry is
delivered twice, and the KV counter holds at least every acknowledged increment."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import grpc
import httpx
from google.protobuf.struct_pb2 import Struct, Value

from potboiler.v1 import log_pb2, log_pb2_grpc
from tests.conftest import wait_for_sync
from tests.faults.checker import Verdict, fail_on_problems, report_figures
from tests.faults.cluster import ClusterNode, FaultCluster
from tests.faults.workload import services_available

SEED = 4242
ROUNDS = 5
#: Concurrent append calls, entries per call.
APPENDERS, BATCH = 8, 25
#: The kill comes after this many acknowledged entries of the round (drawn from the seed).
KILL_AFTER = (300, 3000)
COUNTER = ("crash", "hits")


class Round:
    """What one round sent and what was acknowledged."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.attempted: set[int] = set()
        self.acked: dict[str, int] = {}  # entry id -> n
        self.increments_acked = 0
        self.increments_attempted = 0
        self.next_n = 0


def entry_data(round_: int, n: int) -> Value:
    data = Struct()
    data.update({"crash": round_, "n": n, "pad": "p" * 200})
    return Value(struct_value=data)


async def appender(stub: log_pb2_grpc.LogServiceAsyncStub, r: Round, stop: asyncio.Event) -> None:
    while not stop.is_set():
        ns = list(range(r.next_n, r.next_n + BATCH))
        r.next_n += BATCH
        r.attempted.update(ns)
        request = log_pb2.AppendEntriesRequest(
            entries=[log_pb2.AppendEntryRequest(data=entry_data(r.number, n)) for n in ns]
        )
        try:
            response = await stub.AppendEntries(request, timeout=10)
        except grpc.aio.AioRpcError:
            return  # the node is gone
        for n, appended in zip(ns, response.entries, strict=True):
            r.acked[appended.id] = n


async def incrementer(node: ClusterNode, r: Round, stop: asyncio.Event) -> None:
    url = f"{node.kv_url}/kv/{COUNTER[0]}/{COUNTER[1]}"
    async with httpx.AsyncClient(timeout=5.0) as client:
        while not stop.is_set():
            r.increments_attempted += 1
            try:
                response = await client.post(url, json={"op": "increment", "change": 1})
            # The node is gone. anyio (under httpx) raises AttributeError instead of a connection
            # error when the socket is closed while the connection is being set up.
            except (httpx.HTTPError, AttributeError):
                return
            if response.status_code != 200:
                return
            r.increments_acked += 1


async def run_round(cluster: FaultCluster, r: Round, kill_after: int, with_kv: bool) -> None:
    """Append hard, SIGKILL the node once `kill_after` entries are acknowledged, appends in flight."""
    node = cluster.nodes[0]
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(node.process.grpc_target) as channel:
        stub = log_pb2_grpc.LogServiceStub(channel)
        workers = [asyncio.create_task(appender(stub, r, stop)) for _ in range(APPENDERS)]
        if with_kv:
            workers += [asyncio.create_task(incrementer(node, r, stop)) for _ in range(2)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while len(r.acked) < kill_after:
            assert loop.time() < deadline, f"only {len(r.acked)} appends acknowledged in 60s"
            assert not all(w.done() for w in workers), "every appender stopped before the kill"
            await asyncio.sleep(0.005)
        await asyncio.to_thread(cluster.kill, 0)
        stop.set()
        await asyncio.gather(*workers)


async def test_kill_9_during_heavy_appends_keeps_every_acknowledged_entry(
    local_cluster: FaultCluster, tmp_path: Path, record_property: Any
) -> None:
    began = time.monotonic()
    cluster = local_cluster
    await asyncio.to_thread(cluster.start, 1, extra_args=lambda i: ["--fsync"])
    node = cluster.nodes[0]
    with_kv = "kv" in services_available()
    if with_kv:
        async with httpx.AsyncClient(timeout=10.0) as client:
            made = await client.post(
                f"{node.kv_url}/kv/_config/{COUNTER[0]}", json={"op": "set", "change": {"crdt": "PNCOUNTER"}}
            )
        assert made.status_code == 200, made.text
    rng = random.Random(SEED)
    rounds: list[Round] = []
    verdict = Verdict()
    lost_total = 0
    per_round: list[dict[str, int | float]] = []
    for number in range(ROUNDS):
        r = Round(number)
        rounds.append(r)
        await run_round(cluster, r, rng.randint(*KILL_AFTER), with_kv)
        restarted = time.monotonic()
        await asyncio.to_thread(cluster.restart, 0)
        restart_s = time.monotonic() - restarted

        entries = await asyncio.to_thread(cluster.entries, 0)
        ids = [e["id"] for e in entries]
        by_id = {e["id"]: e for e in entries}
        verdict.expect(
            len(ids) == len(by_id), f"round {number}: {len(ids) - len(by_id)} entries delivered twice"
        )
        vector = cluster.vector(0)
        verdict.expect(
            sum(vector.values()) == len(by_id), f"round {number}: vector {vector} but {len(by_id)} entries"
        )
        for earlier in rounds:
            lost = [i for i in earlier.acked if i not in by_id]
            lost_total += len(lost)
            verdict.expect(
                not lost,
                f"after round {number}: {len(lost)} acknowledged entries of round {earlier.number} lost",
            )
            wrong = [
                i
                for i, n in earlier.acked.items()
                if i in by_id and (by_id[i]["data"]["crash"], by_id[i]["data"]["n"]) != (earlier.number, n)
            ]
            verdict.expect(
                not wrong, f"round {earlier.number}: entries with other data than acknowledged: {wrong[:3]}"
            )
        mine = [e["data"] for e in entries if e["data"].get("crash") == number]
        invented = [d for d in mine if d["n"] not in r.attempted]
        verdict.expect(not invented, f"round {number}: entries never sent: {invented[:3]}")
        twice = len(mine) - len({d["n"] for d in mine})
        verdict.expect(not twice, f"round {number}: {twice} appends stored under two ids")
        survived_unacked = len(mine) - len(r.acked)
        counter: int | None = None
        if with_kv:
            acked_sum = sum(x.increments_acked for x in rounds)
            attempted_sum = sum(x.increments_attempted for x in rounds)
            url = f"{node.kv_url}/kv/{COUNTER[0]}/{COUNTER[1]}"

            def counter_caught_up(url: str = url, least: int = acked_sum) -> int | None:
                response = httpx.get(url, timeout=10)
                value = response.json() if response.status_code == 200 else 0
                return value if isinstance(value, int) and value >= least else None

            counter = await asyncio.to_thread(
                wait_for_sync, counter_caught_up, 30, f"counter >= {acked_sum} acknowledged increments"
            )
            verdict.expect(
                counter is not None and counter <= attempted_sum,
                f"round {number}: counter {counter} exceeds the {attempted_sum} increments sent",
            )
        per_round.append(
            {
                "acknowledged": len(r.acked),
                "present": len(mine),
                "unacknowledged_present": survived_unacked,
                "restart_s": round(restart_s, 2),
                **(
                    {"counter": counter or 0, "increments_acknowledged": r.increments_acked}
                    if with_kv
                    else {}
                ),
            }
        )
    figures = {
        "test": "crash-safety",
        "seed": SEED,
        "fsync": True,
        "rounds": ROUNDS,
        "kills": ROUNDS,
        "acknowledged": sum(len(x.acked) for x in rounds),
        "lost": lost_total,
        "per_round": per_round,
        "wall_s": round(time.monotonic() - began, 1),
    }
    report_figures(figures, tmp_path, record_property)
    fail_on_problems(verdict)
