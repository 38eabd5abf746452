"""The steady writes a nemesis run goes on under, and their history.

One writer per node sends that node a paced stream of operations, one at a time, with a short
timeout, and records each in the `History` with its outcome, as Jepsen does:

- ``ok``: acknowledged (2xx);
- ``fail``: certainly did not happen (a 4xx answer, or no connection could be made);
- ``info``: unknown (a timeout, a reset, a 5xx from the gateway): it may have happened, now or later.

Operations (each value unique, so the checker can tell them apart):

- ``append``: ``POST /log`` of ``{"nemesis": tag, "w": writer, "n": n}`` (always);
- ``incr``: PN-Counter increments and decrements (a negative value), ``lww``: LWW sets (when the node
  runs the KV service);
- ``orset-add`` / ``orset-remove``: OR-Set adds of new items and again of items added before (by any
  writer, so adds race removes of the same item), each add with unique metadata ``{"w": writer, "n": n}``;
  removes of an item the writer's node shows (whoever added it), the metadata it showed recorded as the
  op's `result`;
- ``task-add``, ``task-claim``, ``task-done``: Pigtail adds, claims by worker ``w<i>`` of tasks not
  known done and completions; ``task-heartbeat`` before some completions, ``task-release`` instead of
  some, and some claims walked away from (a crashed worker); the queue dead-letters a task at its
  second claim not completed (``max_attempts`` 2), and ``task-retry`` takes a task its node lists as
  dead back (when the node runs Pigtail).

Which services a node runs comes from `potboiler.server.services.SERVICES`; the parts of the workload
of a service that is not there are skipped, and named in `Workload.skipped`. A new service's part is a
new `_op_*` method and an entry in `KINDS`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import httpx

from potboiler.server.services import SERVICES
from tests.faults.cluster import ClusterNode

#: KV tables the workload writes, by type.
LWW_TABLE, ORSET_TABLE, COUNTER_TABLE = "lww", "orset", "ctr"
#: The Pigtail queue the workload uses, its claim timeout and its dead-letter limit.
QUEUE, QUEUE_TIMEOUT_MS, QUEUE_MAX_ATTEMPTS = "nemesis", 1000, 2
#: Keys per KV table (few, so that writes contend).
KEYS = 4


@dataclass
class Op:
    """One operation and what became of it."""

    kind: str
    node: int
    writer: int
    n: int
    key: str = ""
    value: Any = None
    outcome: str = "info"
    result: Any = None
    status: int = 0
    error: str = ""
    start: float = 0.0
    end: float = 0.0


@dataclass
class History:
    """Every operation of a run."""

    ops: list[Op] = field(default_factory=list)

    def of(self, *kinds: str, outcome: str | None = None) -> list[Op]:
        """The operations of the given kinds (and outcome)."""
        return [o for o in self.ops if o.kind in kinds and (outcome is None or o.outcome == outcome)]

    def counts(self) -> dict[str, dict[str, int]]:
        """{kind: {outcome: count}}."""
        out: dict[str, dict[str, int]] = {}
        for op in self.ops:
            kind = out.setdefault(op.kind, {"ok": 0, "fail": 0, "info": 0})
            kind[op.outcome] += 1
        return out

    def dump(self, path: Path) -> None:
        """Write the history as JSON lines (for reading after a failure)."""
        with path.open("w") as out:
            for op in self.ops:
                out.write(json.dumps(asdict(op), default=str) + "\n")


def services_available() -> list[str]:
    """The optional services nodes run (of those the workload knows)."""
    return [name for name in ("kv", "pigtail") if name in SERVICES]


class Workload:
    """Paced writers, one per node (see the module docstring)."""

    #: kind of step -> (weight, service it needs or None).
    KINDS: ClassVar[dict[str, tuple[int, str | None]]] = {
        "append": (4, None),
        "incr": (2, "kv"),
        "lww": (1, "kv"),
        "orset": (1, "kv"),
        "task-add": (1, "pigtail"),
        "task-work": (2, "pigtail"),
        "task-retry": (1, "pigtail"),
    }

    def __init__(
        self,
        nodes: Sequence[ClusterNode],
        *,
        tag: str,
        seed: int,
        rate: float = 12.0,
        timeout: float = 2.0,
        services: Sequence[str] | None = None,
    ) -> None:
        self.nodes = list(nodes)
        self.tag = tag
        self.seed = seed
        self.rate = rate
        self.timeout = timeout
        self.services = list(services_available() if services is None else services)
        self.skipped = sorted(
            {
                f"{svc}: service not registered in potboiler.server.services"
                for _, svc in self.KINDS.values()
                if svc
            }
            - {f"{svc}: service not registered in potboiler.server.services" for svc in self.services}
        )
        self.kinds = {k: w for k, (w, svc) in self.KINDS.items() if svc is None or svc in self.services}
        self.history = History()
        #: Acknowledged tasks no worker has acknowledged done yet.
        self._open_tasks: list[str] = []
        self._items: dict[str, list[str]] = {}

    # -- setup ---------------------------------------------------------------------------------

    async def setup(self, client: httpx.AsyncClient) -> None:
        """Create the tables and the queue (on node 0) before the run."""
        node = self.nodes[0]
        if "kv" in self.services:
            for table, crdt in ((LWW_TABLE, "LWW"), (ORSET_TABLE, "ORSET"), (COUNTER_TABLE, "PNCOUNTER")):
                r = await client.post(
                    f"{node.kv_url}/kv/_config/{table}", json={"op": "set", "change": {"crdt": crdt}}
                )
                assert r.status_code == 200, r.text
            for k in range(KEYS):
                r = await client.post(
                    f"{node.kv_url}/kv/{ORSET_TABLE}/s{k}", json={"op": "create", "change": {}}
                )
                assert r.status_code == 200, r.text
        if "pigtail" in self.services:
            r = await client.post(
                f"{node.pigtail_url}/create",
                json={"name": QUEUE, "timeout_ms": QUEUE_TIMEOUT_MS, "max_attempts": QUEUE_MAX_ATTEMPTS},
            )
            assert r.status_code in (200, 201), r.text

    async def ready_everywhere(self, client: httpx.AsyncClient) -> bool:
        """Whether every node knows the tables and the queue."""
        for node in self.nodes:
            if "kv" in self.services:
                r = await client.get(f"{node.kv_url}/kv")
                if r.status_code != 200 or not {LWW_TABLE, ORSET_TABLE, COUNTER_TABLE} <= set(r.json()):
                    return False
            if "pigtail" in self.services:
                r = await client.get(f"{node.pigtail_url}/queue/{QUEUE}")
                if r.status_code != 200:
                    return False
        return True

    # -- running -------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> History:
        """Run every writer until `stop` is set."""
        timeout = httpx.Timeout(self.timeout, connect=min(1.0, self.timeout))
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            await asyncio.gather(*(self._writer(client, i, stop) for i in range(len(self.nodes))))
        return self.history

    async def _writer(self, client: httpx.AsyncClient, i: int, stop: asyncio.Event) -> None:
        rng = random.Random(self.seed * 1000 + i)
        kinds, weights = list(self.kinds), list(self.kinds.values())
        loop = asyncio.get_running_loop()
        due = loop.time()
        n = 0
        steps: dict[str, Callable[[httpx.AsyncClient, int, int, random.Random], Awaitable[None]]] = {
            "append": self._op_append,
            "incr": self._op_incr,
            "lww": self._op_lww,
            "orset": self._op_orset,
            "task-add": self._op_task_add,
            "task-work": self._op_task_work,
            "task-retry": self._op_task_retry,
        }
        while not stop.is_set():
            n += 1
            await steps[rng.choices(kinds, weights)[0]](client, i, n, rng)
            # Pace the writer at `rate` operations a second (no catching up in bursts after a stall).
            due = max(due + 1.0 / self.rate, loop.time())
            with_stop = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait([with_stop], timeout=max(0.0, due - loop.time()))
            finally:
                with_stop.cancel()

    async def _call(
        self, client: httpx.AsyncClient, op: Op, method: str, url: str, body: Any
    ) -> httpx.Response | None:
        """Send one request and record its outcome in `op` (and the history)."""
        op.start = time.monotonic()
        self.history.ops.append(op)
        response = None
        try:
            response = await client.request(method, url, json=body)
            op.status = response.status_code
            if response.is_success:
                op.outcome = "ok"
            elif 400 <= response.status_code < 500:
                op.outcome = "fail"
            else:
                op.outcome = "info"
            if not response.is_success:
                op.error = response.text[:200]
        except httpx.ConnectError as exc:
            op.outcome, op.error = "fail", f"{type(exc).__name__}: {exc}"
        except httpx.HTTPError as exc:
            op.outcome, op.error = "info", f"{type(exc).__name__}: {exc}"
        except AttributeError as exc:
            # anyio (under httpx) raises this instead of a connection error when the socket is
            # closed while the connection is being set up (a killed node, a cut link): indeterminate.
            op.outcome, op.error = "info", f"connection closed while connecting ({exc})"
        op.end = time.monotonic()
        return response

    async def _op_append(self, client: httpx.AsyncClient, i: int, n: int, rng: random.Random) -> None:
        value = {"nemesis": self.tag, "w": i, "n": n}
        op = Op("append", i, i, n, value=value)
        r = await self._call(client, op, "POST", f"{self.nodes[i].url}/log", value)
        if r is not None and op.outcome == "ok":
            op.result = r.json()["id"]

    async def _op_incr(self, client: httpx.AsyncClient, i: int, n: int, rng: random.Random) -> None:
        key, amount = f"c{rng.randrange(KEYS)}", rng.randint(1, 5)
        verb = "decrement" if rng.random() < 0.3 else "increment"
        op = Op("incr", i, i, n, key=key, value=-amount if verb == "decrement" else amount)
        url = f"{self.nodes[i].kv_url}/kv/{COUNTER_TABLE}/{key}"
        await self._call(client, op, "POST", url, {"op": verb, "change": amount})

    async def _op_lww(self, client: httpx.AsyncClient, i: int, n: int, rng: random.Random) -> None:
        key, value = f"l{rng.randrange(KEYS)}", f"v-{i}-{n}"
        op = Op("lww", i, i, n, key=key, value=value)
        await self._call(
            client, op, "POST", f"{self.nodes[i].kv_url}/kv/{LWW_TABLE}/{key}", {"op": "set", "change": value}
        )

    async def _op_orset(self, client: httpx.AsyncClient, i: int, n: int, rng: random.Random) -> None:
        key = f"s{rng.randrange(KEYS)}"
        url = f"{self.nodes[i].kv_url}/kv/{ORSET_TABLE}/{key}"
        known = self._items.setdefault(key, [])
        roll = rng.random()
        if roll < 0.35:
            # Remove an item this node shows, whoever added it: the node's observed adds go with it.
            try:
                shown = (await client.get(url)).json()
            except (httpx.HTTPError, ValueError):
                return
            if not isinstance(shown, list) or not shown:
                return
            element = rng.choice(shown)
            item = element.get("item")
            op = Op("orset-remove", i, i, n, key=key, value=item, result=element.get("metadata"))
            await self._call(client, op, "POST", url, {"op": "remove", "change": {"item": item, "key": item}})
            return
        # Mostly a new item; sometimes one added before (maybe removed since, maybe being removed).
        item = rng.choice(known) if known and roll < 0.5 else f"i-{i}-{n}"
        op = Op("orset-add", i, i, n, key=key, value=item)
        body = {"op": "add", "change": {"item": item, "key": item, "metadata": {"w": i, "n": n}}}
        await self._call(client, op, "POST", url, body)
        if op.outcome == "ok" and item not in known:
            known.append(item)

    async def _op_task_add(self, client: httpx.AsyncClient, i: int, n: int, rng: random.Random) -> None:
        name = f"t-{i}-{n}"
        op = Op("task-add", i, i, n, value=name)
        r = await self._call(
            client,
            op,
            "POST",
            f"{self.nodes[i].pigtail_url}/queue/{QUEUE}",
            {"task_name": name, "info": {"w": i, "n": n}},
        )
        if r is not None and op.outcome == "ok":
            op.result = r.json()["id"]
            self._open_tasks.append(op.result)

    async def _op_task_work(self, client: httpx.AsyncClient, i: int, n: int, rng: random.Random) -> None:
        """Claim a task not known done; then complete it (after a heartbeat, sometimes), release it, or
        walk away (a crashed worker)."""
        if not self._open_tasks:
            await self._op_task_add(client, i, n, rng)
            return
        task = rng.choice(self._open_tasks)
        worker = f"w{i}"
        url = f"{self.nodes[i].pigtail_url}/queue/{QUEUE}/{task}"
        claim = Op("task-claim", i, i, n, key=task, value=worker)
        await self._call(client, claim, "PUT", url, {"worker_id": worker})
        roll = rng.random()
        if claim.outcome != "ok" or roll < 0.15:
            return
        if roll < 0.3:
            release = Op("task-release", i, i, n, key=task, value=worker)
            await self._call(client, release, "POST", f"{url}/release", {"worker_id": worker})
            return
        if roll < 0.45:
            beat = Op("task-heartbeat", i, i, n, key=task, value=worker)
            await self._call(client, beat, "POST", f"{url}/heartbeat", {"worker_id": worker})
            if beat.outcome != "ok":
                return
        done = Op("task-done", i, i, n, key=task, value=worker)
        await self._call(client, done, "DELETE", url, {"worker_id": worker})
        if done.outcome == "ok" and task in self._open_tasks:
            self._open_tasks.remove(task)

    async def _op_task_retry(self, client: httpx.AsyncClient, i: int, n: int, rng: random.Random) -> None:
        """Take back a task this node lists as dead-lettered (else do task work)."""
        url = f"{self.nodes[i].pigtail_url}/queue/{QUEUE}"
        try:
            dead = (await client.get(f"{url}/dead")).json()
        except (httpx.HTTPError, ValueError):
            return
        if not isinstance(dead, dict) or not dead:
            await self._op_task_work(client, i, n, rng)
            return
        task = rng.choice(sorted(dead))
        op = Op("task-retry", i, i, n, key=task)
        await self._call(client, op, "POST", f"{url}/{task}/retry", {})
