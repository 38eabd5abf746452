"""The narrow interface KV and Pigtail use to reach the log: append, subscribe from a position, and
what each owner has promised about its clock; and what both build on it to apply the log to their
state (`apply_forever`, `Attempts`, `CatchUp`, `Linger`, `discard_if_stale`).

`LocalLogClient` is the in-process implementation (a method call into the node's Appender). Append
and subscribe also exist as LogService RPCs; the clock promises do not, as only services inside the
node use them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

from google.protobuf.struct_pb2 import Value

from potboiler.server.appender import Appender
from potboiler.server.backoff import Backoff
from potboiler.server.entries import Appended, validate_new_entry
from potboiler.server.errors import Unavailable
from potboiler.server.log import Promise
from potboiler.server.log_delivered import DeliveredBatch
from potboiler.server.storage import Store, clear, clearing, mark_format, stored_format

log = logging.getLogger(__name__)

#: Longest a service's write waits for this node's log to be unblocked (see `LocalLogClient.append`).
BLOCKED_WAIT = 5.0
#: Waits of a service's applier before it reads the log again after a failure.
APPLY_RETRY = Backoff(first=0.1, cap=5.0)


class LogClient(Protocol):
    """What a service built on the log may do with it."""

    @property
    def node_id(self) -> str:
        """This node's id (the owner of the entries it appends)."""
        ...

    async def append(self, data: Value, dependencies: Sequence[str] = ()) -> Appended:
        """Append one entry to this node's log; returns it once durable. Unavailable, appending
        nothing, while an entry of this node's log waits for a dependency (see `LocalLogClient`)."""
        ...

    def subscribe(
        self, after_position: int, limit: int = 1000, mark: bytes | None = None
    ) -> AsyncIterator[DeliveredBatch]:
        """Batches of entries delivered after `after_position`, forever, in delivery order, each of
        at most `limit` entries; with `mark`, the bytes every entry the caller applies holds, a
        batch may hold more entries, of which at most `limit` hold `mark`."""
        ...

    def promises(self) -> dict[str, Promise]:
        """The newest clock promise of each owner that made one (see `Promise`), this node's included."""
        ...

    def position(self) -> int:
        """The position of the newest entry delivered here (0 before any)."""
        ...


def discard_if_stale(client: LogClient, position: int, store: Store, what: str, state_format: int) -> bool:
    """Clear a service's `store` (True) if it must apply the log again from 0, and mark it as written
    in `state_format`, the service's format:
    - its stored `position` in the log is beyond the log's own: the log lost entries the service had
      applied (a power cut without --fsync, which can keep the service's last write but not the log's;
      or a log restored from an older copy). Those positions will go to other entries, which the
      service would skip;
    - it was written in another format (an older or newer version of the service, which makes other
      states of some events); a store that marks none, having applied entries, is in format 1;
    - an earlier such clear was cut short."""
    end = client.position()
    written_in = stored_format(store) or (1 if position else state_format)
    if clearing(store):
        log.warning("the %s state was being rebuilt from the log when the node stopped: rebuilding it", what)
    elif written_in != state_format:
        log.warning(
            "the %s state was written in format %d, and this node's code writes format %d: rebuilding "
            "the %s state from the log",
            what,
            written_in,
            state_format,
            what,
        )
    elif position > end:
        log.warning(
            "the %s state has applied the log up to position %d, but the log ends at %d (it lost writes: "
            "a power cut without --fsync, or a restored copy): rebuilding the %s state from the log",
            what,
            position,
            end,
            what,
        )
    else:
        if stored_format(store) is None:
            mark_format(store, state_format)  # a new store (or one written before formats were marked)
        return False
    clear(store)
    mark_format(store, state_format)
    return True


class LocalLogClient:
    """A LogClient calling the node's own Appender."""

    def __init__(self, appender: Appender) -> None:
        self._appender = appender

    @property
    def node_id(self) -> str:
        return self._appender.log.node_id

    async def append(self, data: Value, dependencies: Sequence[str] = ()) -> Appended:
        # A service answers a write from its applied state, so the write must be delivered here soon.
        # Behind an own entry that waits for a dependency (a client may append one that depends on an
        # entry not here yet, or on none that exists) it would wait as long: give the dependency a
        # moment to arrive, then refuse rather than acknowledge a write nobody can see.
        new = validate_new_entry(data, dependencies)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BLOCKED_WAIT
        while True:
            await self._appender.wait_own_log_unblocked(max(0.0, deadline - loop.time()))
            try:
                [entry] = await self._appender.append([new], unless_blocked=True)
            except Unavailable:
                # Blocked again before the write (an entry that waits went into the same batch first):
                # wait out what is left of the moment, as above.
                if loop.time() >= deadline or not self._appender.log.own_log_blocked():
                    raise
                continue
            return entry

    def subscribe(
        self, after_position: int, limit: int = 1000, mark: bytes | None = None
    ) -> AsyncIterator[DeliveredBatch]:
        appender = self._appender
        return appender.follow(
            after_position,
            lambda position: appender.delivered_batch(position, limit, mark),
            DeliveredBatch.last,
        )

    def promises(self) -> dict[str, Promise]:
        return self._appender.log.promises()

    def position(self) -> int:
        return self._appender.log.position


class Linger:
    """Lets a consumer of the log apply fewer, bigger batches when nobody is waiting for it.

    After applying a batch smaller than its read limit (so it has caught up), the consumer calls
    `pause()`, which waits up to `seconds` so that what is delivered meanwhile arrives as one batch:
    under a steady stream of small commits a consumer then wakes and writes its store at most
    1/`seconds` times a second instead of once per commit. A caller that waits for the consumer's
    progress (e.g. to answer its own write) calls `hurry()`, which ends the pause at once.
    """

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._hurry = asyncio.Event()

    def hurry(self) -> None:
        """End the current (or next) pause now."""
        self._hurry.set()

    async def pause(self, batch_size: int, limit: int) -> None:
        """Pause after a batch of `batch_size` entries read with `limit` (no pause for a full batch:
        more is waiting; only a turn of the event loop, as nothing else awaits between batches and a
        rebuild from the log would otherwise hold the whole node up until it ends)."""
        if batch_size < limit and not self._hurry.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._seconds):
                    await self._hurry.wait()
        else:
            await asyncio.sleep(0)
        self._hurry.clear()


class CatchUp:
    """Whether a service's state shows everything this node had delivered when the service
    started: what it acknowledged before a restart, and all it held when its state was rebuilt from
    the log. Until then an answer from the state could deny a write the client was told about, so
    callers wait (`wait`); the applier reports its progress (`note`)."""

    def __init__(self, what: str, linger: Linger, wait_s: float) -> None:
        self._what = what
        self._linger = linger
        self._wait_s = wait_s
        self._done = asyncio.Event()
        self._target = 0
        self._position = 0

    def start(self, log_position: int, state_position: int) -> None:
        """The service starts with its state at `state_position` and the log at `log_position`."""
        self._target = log_position
        self.note(state_position)

    def note(self, state_position: int) -> None:
        """The state now shows the log up to `state_position`."""
        self._position = state_position
        if state_position >= self._target:
            self._done.set()

    @property
    def done(self) -> bool:
        """Whether the state has caught up."""
        return self._done.is_set()

    async def wait(self) -> None:
        """Return once the state has caught up; Unavailable if it has not within wait_s."""
        if self._done.is_set():
            return
        self._linger.hurry()
        try:
            async with asyncio.timeout(self._wait_s):
                await self._done.wait()
        except TimeoutError:
            raise Unavailable(
                f"the {self._what} state here is still being brought up to date with the log (at "
                f"position {self._position} of {self._target}); try again"
            ) from None


#: Times an applier tries an entry that fails before it skips it (see `Attempts`): with APPLY_RETRY's
#: backoff, for about 11 s.
APPLY_ATTEMPTS = 8


class Attempts:
    """Failed tries at applying the entry at one position, in a row: an entry that fails alike every
    time (a bug, or data a service cannot take, failing so on every node) is skipped after
    APPLY_ATTEMPTS, rather than stopping the service for good; one that fails once (a store read
    failing) is applied on a later try."""

    def __init__(self) -> None:
        self.position = 0
        self.count = 0

    def failed(self, position: int) -> bool:
        """Count a failure at `position`; whether to skip that entry now."""
        self.count = self.count + 1 if self.position == position else 1
        self.position = position
        return self.count >= APPLY_ATTEMPTS


async def apply_forever(
    client: LogClient,
    position: Callable[[], int],
    apply: Callable[[DeliveredBatch], Awaitable[None]],
    linger: Linger,
    limit: int,
    what: str,
    retry: Backoff = APPLY_RETRY,
    mark: bytes | None = None,
) -> None:
    """Apply the log to a service's state, batch by batch, from its stored `position()` on, for
    ever: batches of at most `limit` entries holding `mark`, the bytes every entry the service
    applies holds (`LogClient.subscribe`). A failure (the service's store failing, or a bug) is
    logged, and applying resumes from the stored position after a backoff: nothing is skipped for
    it."""
    failures = 0
    while True:
        try:
            async for batch in client.subscribe(position(), limit, mark):
                await apply(batch)
                failures = 0
                await linger.pause(len(batch), limit)
        except Exception:
            failures += 1
            delay = retry.delay(failures)
            log.exception("%s applier failed at position %d; retrying in %.1fs", what, position(), delay)
            await asyncio.sleep(delay)
