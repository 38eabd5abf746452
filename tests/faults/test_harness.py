"""The process harness the fault and end-to-end tests share (potboiler.server.processes): parallel test
workers must get different base ports, or a node whose ports another worker's node took exits while
that other node answers its URL (and its test then talks to the wrong node)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from potboiler.server import processes

WORKERS = 200


def test_parallel_workers_get_spread_out_base_ports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(processes, "ports_free", lambda host, base: True)  # nothing bound yet
    monkeypatch.setattr(processes, "_RECENT_PICKS", tmp_path / "picks.json")
    monkeypatch.setattr(processes, "_ephemeral_ports", lambda: range(32768, 61000))
    chosen = Counter[int]()
    for pid in range(10_000, 10_000 + WORKERS):
        monkeypatch.setattr(processes, "os", SimpleNamespace(getpid=lambda pid=pid: pid))
        monkeypatch.setattr(
            processes, "time", SimpleNamespace(monotonic_ns=lambda: 5_000_000_000, time=lambda: 1_000.0)
        )
        chosen[processes.find_base_port()] += 1
    base, times = chosen.most_common(1)[0]
    assert times <= WORKERS // 20, f"{times} of {WORKERS} workers would pick base port {base}"
