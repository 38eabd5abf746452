"""§1 REST write throughput with wrk, 32 connections: etcd's grpc-gateway `POST /v3/kv/put` (the
KV Put RPC; base64 key and value in JSON) against Potboiler's `POST /log` through its Envoy, both
answered once the write is acknowledged by the server.

Both bodies carry the same JSON event (etcd's base64-encoded as its value, under one key: every put is
a new revision of it, i.e. a new entry in etcd's log).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from benchmarks import wrk
from benchmarks.append import BODY
from benchmarks.common import Json, rounded
from benchmarks.sections import ServerCpu, Settings, System

#: etcd's request: the same event as Potboiler's body, as the value of key "bench/rest".
ETCD_BODY = {
    "key": base64.b64encode(b"bench/rest").decode(),
    "value": base64.b64encode(json.dumps(BODY).encode()).decode(),
}


def wrk_post(url: str, body: object, settings: Settings, system: System, workdir: Path) -> Json:
    """POST `body` as JSON to `url` with wrk at `settings.concurrency` connections for
    `settings.duration` seconds (after a warm-up run); requests/s counts 2xx answers only."""
    run = wrk.poster(url, body, settings.concurrency, workdir)

    if settings.warmup > 0:
        run(settings.warmup)
    cpu = ServerCpu(system.pids)
    cpu.begin()
    raw = run(settings.duration)
    cpu.end()
    seconds = raw["duration_us"] / 1e6
    good = wrk.succeeded(raw)
    errors = wrk.errors(raw)
    return {
        "requests": raw["requests"],
        "seconds": rounded(seconds, 3),
        "writes_per_s": rounded(good / seconds),
        "errors": errors,
        "status_errors": raw["status_errors"],
        "latency_ms": {k: round(v / 1000, 3) for k, v in raw["latency_us"].items()},
        "server_cpu_us_per_write": cpu.per_item_us(good),
    }


def etcd_put(url: str, settings: Settings, system: System, workdir: Path) -> Json:
    """wrk on etcd's gateway at `url` (a member's client URL)."""
    return wrk_post(f"{url}/v3/kv/put", ETCD_BODY, settings, system, workdir)


def potboiler_append(url: str, settings: Settings, system: System, workdir: Path) -> Json:
    """wrk on Potboiler's `POST /log` at `url` (a node's core REST URL)."""
    return wrk_post(f"{url}/log", BODY, settings, system, workdir)
