"""redis-server on loopback with its data in a temporary directory, for Redis Streams (XADD).

Redis runs with its built-in defaults (no configuration file): no append-only file, RDB snapshots on
the default schedule — an acknowledged XADD is in memory only. (RQ's broker in the queue section is
started by benchmarks/queue.py with appendonly everysec, as that benchmark has always done.)
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.peers.process import ServerProcess, free_ports, tree_rss_mb

#: What is said about the Redis configuration in the results.
CONFIG = {
    "version": "7.0 (Debian redis-server)",
    "durability": "built-in defaults: appendonly no, RDB snapshot schedule 3600 1 300 100 60 10000",
    "flags": "--port P --bind 127.0.0.1 --dir TMP (no config file)",
}


class RedisServer:
    """One redis-server on a free loopback port."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_ports(1)[0]
        root.mkdir(parents=True, exist_ok=True)
        self.server = ServerProcess(
            "redis-server",
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(root)],
            root / "redis.log",
        )

    def __repr__(self) -> str:
        return "RedisServer()"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pids(self) -> list[int]:
        return [self.server.pid] if self.server.alive() else []

    def rss_mb(self) -> float:
        return tree_rss_mb(self.pids)

    def start(self) -> RedisServer:
        """Start it; returns once it answers PING."""
        from redis import Redis

        self.server.start()

        def ping() -> bool:
            with Redis.from_url(self.url, socket_timeout=1.0) as client:
                return bool(client.ping())

        self.server.wait_for(ping)
        return self

    def settle(self) -> None:
        """One server: nothing to wait for."""

    def stop(self) -> None:
        self.server.stop()
