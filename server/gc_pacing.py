"""The cyclic garbage collector in a node: its thresholds (`GC_THRESHOLDS`), collecting the garbage
grpc.aio leaves behind every call a little at a time (`CallPacer`), and the collector's passes,
which stop the event loop, counted and timed for the metrics (`CollectorPauses`).

grpc.aio's server (1.78) finds a call's handler through a nested function that its coroutine's
closure holds, so each call leaves a reference cycle of five objects (the closure, the function,
the call details, the metadata tuple and its item) that only the cyclic collector frees. A node
takes its young collections every 50,000 objects (`GC_THRESHOLDS`: the entries it holds in
memory made smaller thresholds cost far more in all), so at 1,000 unary calls a second that
garbage filled the young generation, and its collection, every 10 to 15 s, stalled the node for
33 to 77 ms (freeing 18,000 to 35,000 objects), which showed as the worst lag in the replication
benchmark. Collected every 500 calls, the node's young collections took 1 ms at the median and
4 ms at most, and its longest collection of any generation 13-15 ms instead of 33-77 (four runs
each way, alternated); the collector's total time stayed the same.

`CallPacer` is registered as the first generic handler of the node's gRPC server, where grpc asks
it about every call it receives (and it answers none: the next handler serves it), and runs a young
collection every `calls` calls. It counts only calls through grpc.aio: those of the REST bridge, which
leave no garbage, never reach it.
"""

from __future__ import annotations

import contextlib
import gc
import time

import grpc

#: The collector's generations, youngest first.
GENERATIONS = 3

#: The process's collector thresholds once a node runs in it. Entries held in memory (the
#: appender's tail, the services' caches) are long-lived and many: with Python's defaults (700, 10,
#: 10) the older passes walk them every few thousand allocations, which cost about 1 us per
#: replicated entry and a third of a KV rebuild's time (measured). A young pass walks what is young
#: then: 10-12 ms for 50,000 live objects (a node taking 1,000 replicated entries a second, about
#: every 15 s); a young threshold of 5,000 instead took 20 times the collector's time in all.
GC_THRESHOLDS = (50_000, 20, 10)

#: Calls through grpc.aio between two young collections: their garbage (5 objects each) and what
#: else is young then take the collector about a millisecond.
CALLS_PER_COLLECTION = 500


class CallPacer(grpc.GenericRpcHandler):
    """Counts the calls the gRPC server receives and collects the young generation every `calls`."""

    def __init__(self, calls: int = CALLS_PER_COLLECTION) -> None:
        self._calls = calls
        self._left = calls
        #: Young collections run so far.
        self.collections = 0

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> None:
        self._left -= 1
        if self._left <= 0:
            self._left = self._calls
            self.collections += 1
            gc.collect(0)


class CollectorPauses:
    """The collector's passes in this process since `start()`, per generation: how many, their time
    in all, and the longest (each stops the event loop for as long as it takes)."""

    def __init__(self) -> None:
        self.passes = [0] * GENERATIONS
        self.seconds = [0.0] * GENERATIONS
        self.longest = [0.0] * GENERATIONS
        self._began = 0.0

    def start(self) -> None:
        """Time every pass from now on."""
        gc.callbacks.append(self._note)

    def stop(self) -> None:
        """Stop timing passes."""
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._note)

    def _note(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        took = time.perf_counter() - self._began
        generation = info["generation"]
        self.passes[generation] += 1
        self.seconds[generation] += took
        self.longest[generation] = max(self.longest[generation], took)
