"""§2 acknowledged writes from one Python asyncio client (32 in flight) and §3 batch appends
(Potboiler AppendEntries against JetStream publish_async batches): a fixed time of load from this
process, counting what the servers acknowledged.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import uvloop

from benchmarks.common import Json, Operation, run_load
from benchmarks.sections import ServerCpu, Settings, System

Client = Callable[[], AbstractAsyncContextManager[Operation]]


def measure(client: Client, settings: Settings, system: System, in_flight: int) -> Json:
    """`in_flight` concurrent calls of the client's operation for warm-up + duration seconds; writes/s
    (entries acknowledged per second), call latency and the servers' CPU per write in the window."""

    async def main() -> Json:
        cpu = ServerCpu(system.pids)
        async with client() as operation:
            await operation()  # connected (and, for JetStream R3, a leader known) before the clock
            result = await run_load(
                operation,
                concurrency=in_flight,
                duration=settings.duration,
                warmup=settings.warmup,
                on_start=cpu.begin,
                on_end=cpu.end,
            )
        figures = result.figures("entries")
        figures["writes_per_s"] = figures.pop("entries_per_s")
        figures["server_cpu_us_per_write"] = cpu.per_item_us(result.items)
        return figures

    return uvloop.run(main())
