"""Where a node listens: every port at a fixed offset from its base port B (see the contract), and
the nodes of a local cluster `NODE_SPACING` apart."""

from __future__ import annotations

from dataclasses import dataclass

from potboiler.server.errors import InvalidArgument

#: Offset of each port from the base port.
CORE_OFFSET = 0
KV_OFFSET = 1
BROWSER_OFFSET = 2
PIGTAIL_OFFSET = 3
METRICS_OFFSET = 5
#: The node's direct gRPC port: the port of its root URL plus this.
GRPC_PORT_OFFSET = 10
#: Every offset a node binds.
PORT_OFFSETS = (CORE_OFFSET, KV_OFFSET, BROWSER_OFFSET, PIGTAIL_OFFSET, METRICS_OFFSET, GRPC_PORT_OFFSET)
#: Distance between the base ports of the nodes of `potboiler cluster` (and of the tests' clusters).
NODE_SPACING = 100


def cluster_bases(base: int, count: int) -> list[int]:
    """The base ports of `count` nodes of a local cluster whose first node's is `base`."""
    return [base + NODE_SPACING * i for i in range(count)]


@dataclass(frozen=True)
class Ports:
    """A node's ports from its base port B."""

    base: int

    @property
    def core(self) -> int:
        """B: core REST and every service's gRPC, through Envoy."""
        return self.base + CORE_OFFSET

    @property
    def kv(self) -> int:
        """B+1: KV REST, through Envoy."""
        return self.base + KV_OFFSET

    @property
    def browser(self) -> int:
        """B+2: the KV browser, through Envoy."""
        return self.base + BROWSER_OFFSET

    @property
    def pigtail(self) -> int:
        """B+3: Pigtail REST, through Envoy."""
        return self.base + PIGTAIL_OFFSET

    @property
    def metrics(self) -> int:
        """B+5: Prometheus metrics, served by the node."""
        return self.base + METRICS_OFFSET

    @property
    def grpc(self) -> int:
        """B+10: the node's own gRPC server (peers replicate through it)."""
        return self.base + GRPC_PORT_OFFSET

    def check(self) -> None:
        """InvalidArgument unless every port from the base port up is a valid port number."""
        span = max(PORT_OFFSETS)
        if not 1 <= self.base <= 65535 - span:
            raise InvalidArgument(
                f"bad --base-port: {self.base}; a node takes ports B to B+{span}, so B must be 1 to "
                f"{65535 - span}"
            )
