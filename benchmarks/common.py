"""Shared helpers of the benchmarks: figures, a load generator, node processes and their resources.

Every benchmark prints ONE JSON object on stdout (progress goes to stderr), so runs can be kept and
compared. The helpers here:

- `summary` / `percentile`: min, median, percentiles and max of a list of samples;
- `run_load`: N concurrent asyncio workers calling one async operation for a fixed time, counting
  operations and items (e.g. entries per call) and each operation's latency;
- `ProcessStats`, `CpuWindow`: resident memory of a process and its children (the node and its
  Envoy), and the CPU use of server, client and the rest of the machine, read from /proc;
- `frozen_heap`: keeps the measuring process's own full garbage collections out of a latency run;
- `Bench`: starts nodes in one temporary directory on free ports and stops every one of them on
  exit, also on errors, Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Protocol

from potboiler.server.ports import cluster_bases
from potboiler.server.processes import NodeProcess, find_base_port

#: A JSON-able figure tree.
Json = dict[str, Any]

_PAGE = os.sysconf("SC_PAGE_SIZE")
_TICKS = os.sysconf("SC_CLK_TCK")


# -- output ----------------------------------------------------------------------------------------


def progress(message: str) -> None:
    """A progress line for people (stderr; stdout carries only the JSON result)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def emit(result: Json) -> None:
    """Print the benchmark's result: one JSON object on stdout."""
    print(json.dumps(result, indent=2, sort_keys=False), flush=True)


def rounded(value: float, digits: int = 1) -> float:
    """A figure rounded for printing."""
    return round(value, digits)


def target(value: float | None, goal: float, *, at_least: bool) -> Json:
    """A measured figure beside its target, with whether it meets it (None, e.g. from a failed
    phase, does not)."""
    meets = value is not None and (value >= goal if at_least else value < goal)
    return {"value": value, "target": (">= " if at_least else "< ") + f"{goal:g}", "meets_target": meets}


# -- statistics ------------------------------------------------------------------------------------


def median_run(runs: Sequence[Json], key: str) -> Json:
    """The run with the median `key` (of an odd count, the middle one; else the upper middle), with
    every run's `key` beside it as `runs_<key>`, in the order run."""
    ordered = sorted(runs, key=lambda r: float(r[key]))
    return {**ordered[len(ordered) // 2], f"runs_{key}": [r[key] for r in runs]}


def percentile(samples: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100) of samples, linearly interpolated; NaN for no samples."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    k = (len(ordered) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(samples: Sequence[float], scale: float = 1.0, digits: int = 3) -> Json:
    """count, min, median, p90, p99, max and mean of samples, each multiplied by `scale` (e.g. 1000
    for seconds to milliseconds)."""
    if not samples:
        return {"count": 0}
    ordered = sorted(samples)

    def fig(v: float) -> float:
        return round(v * scale, digits)

    return {
        "count": len(ordered),
        "min": fig(ordered[0]),
        "median": fig(percentile(ordered, 50)),
        "p90": fig(percentile(ordered, 90)),
        "p99": fig(percentile(ordered, 99)),
        "max": fig(ordered[-1]),
        "mean": fig(sum(ordered) / len(ordered)),
    }


# -- load generator --------------------------------------------------------------------------------

#: One operation of a load: does one call and returns how many items (e.g. entries) it handled.
Operation = Callable[[], Awaitable[int]]


@dataclass
class LoadResult:
    """What a load run did inside its measuring window."""

    concurrency: int
    seconds: float
    ops: int
    items: int
    errors: int
    latencies: list[float] = field(default_factory=list)
    first_error: str | None = None

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds else 0.0

    @property
    def items_per_s(self) -> float:
        return self.items / self.seconds if self.seconds else 0.0

    def figures(self, item_name: str | None = None) -> Json:
        """The result as JSON figures (latency in milliseconds); with `item_name`, items and items/s
        under that name too."""
        out: Json = {
            "concurrency": self.concurrency,
            "seconds": rounded(self.seconds, 3),
            "ops": self.ops,
            "ops_per_s": rounded(self.ops_per_s),
        }
        if item_name is not None:
            out[item_name] = self.items
            out[f"{item_name}_per_s"] = rounded(self.items_per_s)
        out["errors"] = self.errors
        if self.first_error:
            out["first_error"] = self.first_error
        out["latency_ms"] = summary(self.latencies, 1000)
        return out


async def run_load(
    operation: Operation,
    *,
    concurrency: int,
    duration: float,
    warmup: float = 0.0,
    on_start: Callable[[], None] | None = None,
    on_end: Callable[[], None] | None = None,
) -> LoadResult:
    """Run `concurrency` workers that call `operation` back to back for `warmup + duration` seconds;
    count what completes inside the last `duration` seconds. Operations still running at the end are
    cancelled and not counted. An operation that raises counts as an error and its worker goes on.
    `on_start` and `on_end` are called when the measured window starts and ends."""
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + duration
    if on_start is not None:
        loop.call_at(start, on_start)
    if on_end is not None:
        loop.call_at(end, on_end)
    result = LoadResult(concurrency, duration, 0, 0, 0)

    async def worker() -> None:
        while (began := loop.time()) < end:
            try:
                items = await operation()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if loop.time() >= start:
                    result.errors += 1
                    result.first_error = result.first_error or repr(exc)[:300]
                await asyncio.sleep(0.001)
                continue
            done = loop.time()
            if start <= began and done <= end:
                result.ops += 1
                result.items += items
                result.latencies.append(done - began)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.wait(tasks, timeout=warmup + duration)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


def merge_loads(results: Sequence[LoadResult]) -> LoadResult:
    """Loads run side by side over the same window (e.g. one per client process), as one."""
    merged = LoadResult(sum(r.concurrency for r in results), max(r.seconds for r in results), 0, 0, 0)
    for r in results:
        merged.ops += r.ops
        merged.items += r.items
        merged.errors += r.errors
        merged.latencies += r.latencies
        merged.first_error = merged.first_error or r.first_error
    return merged


# -- processes -------------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat from field 3 (state) on: the name may hold spaces and parens."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (alive now)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(int(entry))[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def process_name(pid: int) -> str:
    """The process's command name (/proc/<pid>/comm)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def rss_bytes(pid: int) -> int:
    """Resident set size of one process (0 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size (shared pages split among their users); 0 if unreadable."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_seconds(pid: int, *, reaped_children: bool = False) -> float:
    """User + system CPU time of one process so far (0 if it is gone); with `reaped_children`, plus
    that of its children that have exited and been waited for."""
    try:
        fields = _stat_fields(pid)
        ticks = int(fields[11]) + int(fields[12])
        if reaped_children:
            ticks += int(fields[13]) + int(fields[14])
        return ticks / _TICKS
    except (OSError, ValueError, IndexError):
        return 0.0


def tree_cpu_seconds(pid: int, exclude: Sequence[int] = ()) -> float:
    """CPU time of `pid`, its reaped children and its live descendants, except the subtrees rooted at
    `exclude`. (Children started and reaped inside a measured interval are counted in full.)"""
    skip = {p for root in exclude for p in process_tree(root)}
    return cpu_seconds(pid, reaped_children=True) + sum(
        cpu_seconds(p) for p in process_tree(pid) if p != pid and p not in skip
    )


def machine_cpu_seconds() -> float:
    """CPU time the whole machine has been busy (all cores, from /proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS


@dataclass
class ProcessStats:
    """Memory of a process tree (e.g. a node and its Envoy)."""

    pid: int

    def memory(self) -> Json:
        """RSS (and PSS) of the tree in MB, in total and per process."""
        per: Json = {}
        rss = pss = 0
        for p in process_tree(self.pid):
            r, s = rss_bytes(p), pss_bytes(p)
            rss, pss = rss + r, pss + s
            per[f"{process_name(p)}[{p}]"] = rounded(r / 1e6)
        return {"rss_mb": rounded(rss / 1e6), "pss_mb": rounded(pss / 1e6), "rss_mb_by_process": per}


class CpuWindow:
    """CPU use between `begin()` and `end()`, in percent of one core, of: each process of the server's
    tree; the client (this process and its other children: client processes, wrk); and everything
    else on the machine (other work running beside the benchmark skews its figures).

    `begin`/`end` read /proc synchronously (about a millisecond): call them where the measured
    window starts and ends, e.g. from `run_load(on_start=..., on_end=...)`."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self._server: dict[int, float] = {}
        self._client = self._machine = self._at = 0.0
        self._figures: Json = {}
        #: CPU seconds the server tree and the client used in the window.
        self.server_s = self.client_s = 0.0

    def begin(self) -> None:
        self._server = {p: cpu_seconds(p) for p in process_tree(self.server_pid)}
        self._client = tree_cpu_seconds(os.getpid(), exclude=[self.server_pid])
        self._machine = machine_cpu_seconds()
        self._at = time.monotonic()

    def end(self) -> None:
        elapsed = time.monotonic() - self._at
        if not self._at or elapsed <= 0:
            return
        server: Json = {}
        self.server_s = 0.0
        for p in process_tree(self.server_pid):
            used = cpu_seconds(p) - self._server.get(p, 0.0)
            self.server_s += used
            server[f"{process_name(p)}[{p}]"] = rounded(100 * used / elapsed)
        self.client_s = tree_cpu_seconds(os.getpid(), exclude=[self.server_pid]) - self._client
        machine_s = machine_cpu_seconds() - self._machine
        self._figures = {
            "server_cpu_percent": server,
            "client_cpu_percent": rounded(100 * self.client_s / elapsed),
            "other_cpu_percent": rounded(
                max(0.0, 100 * (machine_s - self.server_s - self.client_s) / elapsed)
            ),
            "cores": os.cpu_count(),
        }

    def figures(self, items: int = 0) -> Json:
        """The figures of the last window ({} if none was measured); given how many items (calls,
        entries) were handled in it, also the CPU microseconds server and client spent per item: a
        figure that other load on the machine skews much less than throughput."""
        out = dict(self._figures)
        if out and items > 0:
            out["server_cpu_us_per_item"] = rounded(1e6 * self.server_s / items)
            out["client_cpu_us_per_item"] = rounded(1e6 * self.client_s / items)
        return out


@contextmanager
def measuring_cpu(window: CpuWindow) -> Iterator[CpuWindow]:
    """Measure CPU use over the block."""
    window.begin()
    yield window
    window.end()


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Over the block, Python's collector in this process leaves alone what is alive when it
    starts (`gc.freeze`). A latency benchmark's writer or observer is a Python process too: a full
    collection over its heap (grpc, httpx, asyncio) takes 12-25 ms here, every 10 s or so at 1,000
    writes a second, and would show as the measured system's lag."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def fsync_probe(directory: Path, seconds: float = 1.0) -> Json:
    """How fast the disk under `directory` syncs small writes right now: 200-byte appends, each
    followed by fdatasync, back to back. Other work on the machine can slow this by orders of
    magnitude, and with it every --fsync figure."""
    path = directory / "fsync-probe"
    latencies: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            began = time.perf_counter()
            os.write(fd, b"x" * 200)
            os.fdatasync(fd)
            latencies.append(time.perf_counter() - began)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return {"syncs_per_s": rounded(len(latencies) / seconds), "latency_ms": summary(latencies, 1000)}


def machine_conditions(directory: Path) -> Json:
    """What else the machine is doing: load averages and a one-second fsync probe."""
    return {"load_average": load_average(), "cores": os.cpu_count(), "fsync_probe": fsync_probe(directory)}


# -- nodes -----------------------------------------------------------------------------------------


def sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM is handled as Ctrl-C, so that the same cleanup runs."""
    raise KeyboardInterrupt()


class Stoppable(Protocol):
    """Something started for a benchmark that must be stopped at the end (e.g. a peer's servers)."""

    def stop(self) -> None: ...


class Bench:
    """A temporary directory and the nodes started in it; everything is stopped and removed on exit.

    Use as a context manager. Nodes run in their own sessions (a terminal's Ctrl-C does not reach
    them), so they are stopped here: on normal exit, on errors, on Ctrl-C and on SIGTERM. Other
    things started for the benchmark (other servers, client processes) are handed to `adopt` and
    stopped first, in reverse order."""

    def __init__(self, keep: bool = False) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="potboiler-bench-"))
        self.keep = keep
        self.nodes: list[NodeProcess] = []
        self.adopted: list[Stoppable] = []
        self._count = 0
        self._old_sigterm: Any = None

    def __enter__(self) -> Bench:
        self._old_sigterm = signal.signal(signal.SIGTERM, sigterm_as_interrupt)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Ignore a second Ctrl-C / SIGTERM while cleaning up: leaving nodes behind is worse.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for thing in reversed(self.adopted):
                try:
                    thing.stop()
                except Exception as error:  # go on: every other process must be stopped too
                    progress(f"stopping {thing!r} failed: {error!r}")
            for node in self.nodes:
                try:
                    node.stop(timeout=10.0)
                except Exception:
                    node.kill()
            if not self.keep:
                shutil.rmtree(self.root, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, self._old_sigterm)

    def start_node(self, extra_args: Sequence[str] = (), name: str | None = None) -> NodeProcess:
        """Start a node on free ports with a fresh data directory; wait until it answers REST."""
        self._count += 1
        data_dir = self.root / (name or f"node{self._count}")
        node = NodeProcess(data_dir, find_base_port(), extra_args=["--log-level", "WARNING", *extra_args])
        self.nodes.append(node)
        node.start()
        return node

    def adopt(self, thing: Stoppable) -> None:
        """Stop `thing` when the bench ends (before the nodes)."""
        self.adopted.append(thing)

    def start_cluster(self, count: int, name: str = "cluster", spare: int = 1) -> list[NodeProcess]:
        """`count` nodes, each peered with all the others (`--peer`), on consecutive base ports
        B, B+NODE_SPACING, ... (with `spare` more slots kept free for nodes added later), each with a fresh
        data directory `<name>-node<i>`; returns once every node answers REST."""
        base = find_base_port(count=count + spare)
        bases = cluster_bases(base, count)
        urls = [f"http://127.0.0.1:{b}" for b in bases]
        nodes = []
        for i in range(count):
            node = NodeProcess(
                self.root / f"{name}-node{i}",
                bases[i],
                peers=[u for u in urls if u != urls[i]],
                extra_args=["--log-level", "WARNING"],
            )
            self.nodes.append(node)
            node.start(wait=False)
            nodes.append(node)
        for node in nodes:
            node.wait_ready()
        return nodes


def node_pid(node: NodeProcess) -> int:
    """The node's process id (it must be running)."""
    assert node.process is not None, "the node is not started"
    return node.process.pid
