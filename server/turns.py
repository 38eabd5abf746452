"""Turns: background tasks with CPU work to do (webhooks, subscribers and services catching up) take
turns at it, at most one turn every few passes of the event loop, so that what the node serves
meanwhile is not held up behind all of them in every pass.

A request needs several passes of the loop (a unary append about eight). With N background tasks
runnable, each would run a step in every pass, and the request would wait for N steps in each: four
webhooks catching up made a unary append take 14.5 ms at the median instead of 2.1
(`benchmarks/webhooks.py`). With a turn every fourth pass it took 3.1 ms, for 8% fewer deliveries a
second: a pass with nothing else to run costs the loop a few microseconds.
"""

from __future__ import annotations

import asyncio
from collections import deque

#: Passes of the event loop from one turn to the next.
EVERY = 4


class Turns:
    """Hands out turns at most one every `every` passes of the running loop, in the order asked for."""

    def __init__(self, every: int = EVERY) -> None:
        self._every = every
        self._waiting: deque[asyncio.Future[None]] = deque()
        #: A turn was handed out less than `every` passes ago.
        self._taken = False
        #: Passes since the last turn was handed out.
        self._passes = 0

    async def take(self) -> None:
        """Return when it is the caller's turn: at once if none was handed out in the last `every`
        passes and nobody waits, else in a later pass. The turn lasts until the caller next awaits
        something that suspends it."""
        loop = asyncio.get_running_loop()
        if not self._taken:
            self._taken = True
            self._passes = 0
            loop.call_soon(self._tick)
            return
        waiter = loop.create_future()
        self._waiting.append(waiter)
        await waiter  # a cancelled waiter is skipped by _tick

    def _tick(self) -> None:
        """Runs once a pass while a turn is out: `every` passes after it, wakes the next waiter (whose
        turn runs in the next pass), or, if nobody waits, lets the next caller take one at once."""
        loop = asyncio.get_running_loop()
        self._passes += 1
        if self._passes < self._every:
            loop.call_soon(self._tick)
            return
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._passes = 0
                loop.call_soon(self._tick)
                return
        self._taken = False
