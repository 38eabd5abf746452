"""When the group commit should hold a write open for more appends.

grpc.aio takes in one new call per turn of the node's event loop, and its poller thread hands
over completions only when the loop's thread lets go of the GIL. When the loop's thread is
saturated by many concurrent unary appends (32 gRPC clients' calls), the writer
therefore finds one append queued at each turn and commits batches of about one entry, each
paying a whole write, wake-ups of every reader and its own trip through grpc. Holding the write
open for a moment lets the loop idle, grpc hand over a burst of calls, and one batch take them all.
Measured on one node when REST calls still reached it through grpc.aio (before the REST bridge),
REST `POST /log` at 32 connections, interleaved runs: about 10 entries per write instead of 1.05,
275-350 µs of node CPU per request instead of 515-590 and 155-215 µs of Envoy's instead of 300-340,
3,000-3,900 requests/s instead of 1,900-2,200.

Holding a write open only pays when the loop's thread has no time to spare, and only when the
appends that would join it are still to come. A client that streams its appends (the
`StreamAppender`, 32 in flight in two or three messages) has sent everything it may already: a
hold gathers nothing and only delays its acknowledgements (17,600-19,300 entries/s fell to
13,800-15,900 when every write was held). So the writer holds writes open only while that thread
is busy most of the time (measured as the time it ran or waited to run, over short periods, with
hysteresis), and only while holds gather at least `min_gathered` jobs or `min_gathered_entries`
entries on average (a streaming client's gather 1-2 messages of up to 16 entries, unary calls' and
REST requests' 6-14 calls, batches of 100 with 4 in flight 2-3 calls, 200-300 entries: one fsync
for 300 entries instead of 140 with `--fsync`, 74,000-83,000 entries/s instead of 71,000); when
`trial_holds` of them gather less
it stops holding, and tries again after `first_retry` seconds, twice as long after each failed try
up to `retry_after` (load that is still ramping up, 32 connections opening, soon gets its holds; a
streaming client is tried every 2 s). It never holds the first write after a pause, and never
longer than it takes `enough_jobs` jobs (or `enough_entries` entries: a replication stream's
messages, for one, come many entries at a time) to queue.

With `--fsync`, the writer's own time in synced writes counts as its thread's demand too (the
`Appender` adds it to `thread_demand`): blocked in fsync, the thread is neither running nor waiting
to run, yet it holds the GIL and the process does nothing else. Uncounted, a node taking unary
appends from one client process never held a write, synced 1.5 appends at a time and took 2,900
of them a second at 314 µs of CPU each; counted, 14 appends per fsync, 6,000-7,100 a second at 139 µs.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def thread_demand() -> float:
    """Seconds the calling thread has run or waited to run: what it asked of the CPU, which is how
    saturated it is even when other processes share the cores. From Linux's per-thread schedstat;
    its CPU time alone where that is missing."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as f:
            ran, waited = f.read().split()[:2]
        return (int(ran) + int(waited)) / 1e9
    except (OSError, ValueError):
        return time.thread_time()


class CommitWindow:
    """The writer asks `hold()` before each write and reports each write to `committed()`; both
    run on the writer's (the event loop's) thread, whose demand for the CPU `cpu_clock` reads."""

    def __init__(
        self,
        *,
        max_wait: float = 0.002,
        enough_jobs: int = 16,
        enough_entries: int = 256,
        start_busy: float = 0.85,
        stop_busy: float = 0.5,
        period: float = 0.05,
        burst_gap: float = 0.01,
        min_gathered: float = 4.0,
        min_gathered_entries: float = 64.0,
        trial_holds: int = 8,
        first_retry: float = 0.1,
        retry_after: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = thread_demand,
    ) -> None:
        if period <= 0:
            raise ValueError(f"the busy period must be positive, not {period}")
        self.max_wait = max_wait
        self.enough_jobs = enough_jobs
        self.enough_entries = enough_entries
        self._start_busy = start_busy
        self._stop_busy = stop_busy
        self._period = period
        self._burst_gap = burst_gap
        self._min_gathered = min_gathered
        self._min_gathered_entries = min_gathered_entries
        self._trial_holds = trial_holds
        self._first_retry = first_retry
        self._retry_after = retry_after
        self._retry_delay = first_retry
        self._clock = clock
        self._cpu_clock = cpu_clock
        self.holding = False
        self._last_commit = -float("inf")
        self._since = clock()
        self._cpu_since = cpu_clock()
        self._retry_at = -float("inf")
        #: Held writes in the current period, and the jobs and entries their holds gathered.
        self._holds = 0
        self._gathered = 0
        self._gathered_entries = 0

    def reset(self) -> None:
        """Measure afresh from now (the writer starts: what its thread did before is not load)."""
        self._since = self._clock()
        self._cpu_since = self._cpu_clock()

    def enough(self, queued_jobs: int, queued_entries: int) -> bool:
        """Whether what is queued makes a batch worth writing without waiting for more."""
        return queued_jobs >= self.enough_jobs or queued_entries >= self.enough_entries

    def hold(self, queued_jobs: int, queued_entries: int) -> float:
        """How long to hold the next write open for more appends (0: write now), given how many
        jobs (appends, or messages of a replication stream) and entries are queued."""
        if not self.holding or self.enough(queued_jobs, queued_entries):
            return 0.0
        if self._clock() - self._last_commit > self._burst_gap:
            return 0.0  # the first write after a pause: whatever came is all there is
        return self.max_wait

    def committed(self, gathered: int | None = None, gathered_entries: int = 0) -> None:
        """A write ended; `gathered` is how many jobs joined it while it was held open (None: it
        was not held), `gathered_entries` how many entries they held. Holding stops as soon as `trial_holds` holds (or a period's) gathered too
        little; otherwise, once a period has passed, its busyness decides."""
        now = self._last_commit = self._clock()
        if gathered is not None:
            self._holds += 1
            self._gathered += gathered
            self._gathered_entries += gathered_entries
            if self._holds >= self._trial_holds and self._gathered_too_little():
                self._stop_holding(now)
        elapsed = now - self._since
        if elapsed < self._period:
            return
        cpu = self._cpu_clock()
        busy = (cpu - self._cpu_since) / elapsed
        tried = self.holding and self._holds > 0
        if tried and self._gathered_too_little():
            self._stop_holding(now)
        else:
            if tried:
                self._retry_delay = self._first_retry  # holds pay: a later failed try retries soon
            if busy >= self._start_busy and now >= self._retry_at:
                self.holding = True
            elif busy < self._stop_busy:
                self.holding = False
        self._since, self._cpu_since = now, cpu
        self._holds = self._gathered = self._gathered_entries = 0

    def _gathered_too_little(self) -> bool:
        return (
            self._gathered < self._min_gathered * self._holds
            and self._gathered_entries < self._min_gathered_entries * self._holds
        )

    def _stop_holding(self, now: float) -> None:
        """Holds gather nothing more: the appends in flight are all here already."""
        self.holding = False
        self._retry_at = now + self._retry_delay
        self._retry_delay = min(2 * self._retry_delay, self._retry_after)
        self._holds = self._gathered = self._gathered_entries = 0
