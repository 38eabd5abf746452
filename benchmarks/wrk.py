"""wrk, the HTTP load generator the REST benchmarks use: POST one JSON body at N connections and read
back its summary as JSON (printed by a Lua `done` hook)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import Json

SCRIPT = """\
-- POST a JSON body; prints a JSON summary when done.
wrk.method = "POST"
wrk.body = %s
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nWRK_JSON {"requests": %%d, "duration_us": %%d, "connect_errors": %%d, "read_errors": %%d, ' ..
    '"write_errors": %%d, "status_errors": %%d, "timeouts": %%d, "latency_us": {"min": %%d, ' ..
    '"median": %%d, "p90": %%d, "p99": %%d, "max": %%d, "mean": %%f}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def version() -> str:
    """wrk's version line."""
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else "wrk"


def poster(url: str, body: object, concurrency: int, workdir: Path) -> Callable[[float], Json]:
    """A function that POSTs `body` (as JSON) to `url` for a number of seconds and returns wrk's
    summary: requests, duration_us, the error counts, latency_us percentiles."""
    script = workdir / f"post-{os.getpid()}.lua"
    script.write_text(SCRIPT % json.dumps(json.dumps(body)))
    threads = str(min(2, os.cpu_count() or 1))

    def run(seconds: float) -> Json:
        cmd = ["wrk", "-t", threads, "-c", str(concurrency), "-d", f"{max(1, round(seconds))}s"]
        cmd += ["--timeout", "10s", "-s", str(script), url]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no summary:\n{out.stdout}\n{out.stderr}")
        figures: Json = json.loads(line.removeprefix("WRK_JSON "))
        return figures

    return run


def succeeded(summary: Json) -> int:
    """The requests of a summary that succeeded: wrk's `requests` counts every answer, those with an
    error status (400 or more, `status_errors`) too."""
    return int(summary["requests"]) - int(summary["status_errors"])


def errors(summary: Json) -> int:
    """Every failed request of a summary (connection errors, timeouts, non-2xx answers)."""
    keys = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    return sum(int(summary[k]) for k in keys)
