"""A small asyncio TCP proxy for slow, stalled, half-open and reset links between nodes.

tc netem is not available on the machines these tests run on, so links are shaped in user space: the
proxy runs in its own thread with its own event loop (tests may be sync or async, and may block), and
listens once per direction of a link; `tests.faults.netfilter.Firewall.redirect` makes a node's
connections to a peer land on the listener instead of the peer, and the proxy forwards them to the
real peer. What a link does is its `LinkMode`, changed at any time from the test's thread:

- latency and jitter: each chunk is released `latency + uniform(0, jitter)` seconds after it was
  read, never before the chunk ahead of it (order is kept, as TCP would);
- bandwidth: bytes per second and direction;
- stalled: nothing is forwarded and connections stay open (the ends see silence, not an error).

And actions on the connections a link carries now:

- `reset(link)`: abort both sides with an RST;
- `sever(link)`: half-open connections: the side towards the peer is closed, while the dialer's side
  stays open and swallows whatever the dialer sends without a word back. Only the dialer's keepalive
  can find out.

The queue between reading and writing is bounded, so a slow link pushes back on the sender through
TCP flow control, as a slow network would, instead of growing the proxy's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

#: Largest chunk read at once.
CHUNK = 64 * 1024
#: Most chunks held between reading and writing, per direction of a connection.
QUEUE_CHUNKS = 16


@dataclass(frozen=True)
class LinkMode:
    """How a link behaves (see the module docstring)."""

    latency_s: float = 0.0
    jitter_s: float = 0.0
    #: Bytes per second in each direction; None is unlimited.
    bandwidth: float | None = None
    stalled: bool = False


NORMAL = LinkMode()


@dataclass(eq=False)
class _Connection:
    link: str
    downstream: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    severed: bool = False


@dataclass
class LinkStats:
    """What one link carried."""

    connections: int = 0
    bytes: int = 0
    resets: int = 0
    severed: int = 0


class Proxy:
    """Listeners forwarding to targets, grouped in named links; runs in a thread of its own."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._servers: list[asyncio.Server] = []
        self._modes: dict[str, LinkMode] = {}
        self._flowing: dict[str, asyncio.Event] = {}
        self._connections: set[_Connection] = set()
        self.stats: dict[str, LinkStats] = {}
        self._thread.start()

    # -- the test thread's side ----------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    def listen(self, link: str, host: str, target: tuple[str, int]) -> int:
        """Listen on host (a free port) for `link`, forwarding to target; returns the port."""
        return self._call(self._listen(link, host, target))

    def set_mode(self, link: str, mode: LinkMode) -> None:
        """Change how a link behaves from now on."""
        self._call(self._set_mode(link, mode))

    def reset(self, link: str) -> int:
        """Abort every connection of a link with an RST; returns how many."""
        return self._call(self._reset(link))

    def sever(self, link: str) -> int:
        """Make every connection of a link half-open (see the module docstring); returns how many."""
        return self._call(self._sever(link))

    def connections(self, link: str) -> int:
        """How many connections the link carries now."""
        return sum(1 for c in list(self._connections) if c.link == link)

    def links(self) -> list[str]:
        """The names of the links."""
        return sorted(self._modes)

    def close(self) -> None:
        """Close every listener and connection and stop the thread."""
        if self._loop.is_closed():
            return
        with contextlib.suppress(TimeoutError, RuntimeError):
            self._call(self._close(), timeout=10.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)
        self._loop.close()

    # -- the proxy's loop ----------------------------------------------------------------------

    async def _listen(self, link: str, host: str, target: tuple[str, int]) -> int:
        self._modes.setdefault(link, NORMAL)
        flowing = self._flowing.setdefault(link, asyncio.Event())
        flowing.set()
        self.stats.setdefault(link, LinkStats())

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve(link, target, reader, writer)

        server = await asyncio.start_server(accept, host, 0)
        self._servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    async def _set_mode(self, link: str, mode: LinkMode) -> None:
        self._modes[link] = mode
        flowing = self._flowing[link]
        if mode.stalled:
            flowing.clear()
        else:
            flowing.set()

    async def _serve(
        self, link: str, target: tuple[str, int], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*target)
        except OSError:
            _abort(writer)
            return
        conn = _Connection(link, writer, up_writer)
        self._connections.add(conn)
        self.stats[link].connections += 1
        conn.tasks = [
            asyncio.create_task(self._pipe(conn, reader, up_writer, to_peer=True)),
            asyncio.create_task(self._pipe(conn, up_reader, writer, to_peer=False)),
        ]
        try:
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            self._connections.discard(conn)
            for w in (writer, up_writer):
                _close(w)

    async def _pipe(
        self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, to_peer: bool
    ) -> None:
        """Forward one direction: a reader task queues chunks with their release times, this task
        writes them out when due, at the link's bandwidth."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(QUEUE_CHUNKS)
        loop = asyncio.get_running_loop()
        link = conn.link

        async def read() -> None:
            release = 0.0
            try:
                while True:
                    await self._flowing[link].wait()
                    data = await reader.read(CHUNK)
                    if not data:
                        break
                    if conn.severed:
                        continue  # half-open: swallow what the dialer sends
                    mode = self._modes[link]
                    delay = mode.latency_s + (self._rng.uniform(0, mode.jitter_s) if mode.jitter_s else 0.0)
                    release = max(release, loop.time() + delay)
                    await queue.put((release, data))
            except (ConnectionError, OSError):
                pass
            finally:
                await queue.put(None)

        reading = asyncio.create_task(read())
        try:
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                await self._flowing[link].wait()
                if conn.severed:
                    continue
                writer.write(data)
                await writer.drain()
                self.stats[link].bytes += len(data)
                mode = self._modes[link]
                if mode.bandwidth:
                    await asyncio.sleep(len(data) / mode.bandwidth)
            if not conn.severed and writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            pass
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
            if not conn.severed:
                # One direction ended: end the whole connection, as a plain TCP path would.
                for w in (conn.downstream, conn.upstream):
                    _close(w)

    async def _reset(self, link: str) -> int:
        victims = [c for c in self._connections if c.link == link]
        for conn in victims:
            for w in (conn.downstream, conn.upstream):
                _abort(w)
        self.stats[link].resets += len(victims)
        return len(victims)

    async def _sever(self, link: str) -> int:
        victims = [c for c in self._connections if c.link == link and not c.severed]
        for conn in victims:
            conn.severed = True
            _abort(conn.upstream)
        self.stats[link].severed += len(victims)
        return len(victims)

    async def _close(self) -> None:
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            for w in (conn.downstream, conn.upstream):
                _abort(w)
        tasks = [t for c in self._connections for t in c.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)
        self._servers.clear()


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        writer.close()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError, RuntimeError):
        writer.transport.abort()
