"""Real network partitions between node processes on one machine, with iptables.

Every node of a fault cluster binds its own loopback address (127.x.y.N) and runs with its own group
id (`tests.faults.cluster` starts it through a tiny setgid wrapper). Outgoing connections on loopback
all leave from 127.0.0.1, whoever makes them, so an address alone cannot say which node dialed; the
group id can. This module keeps every rule in dedicated chains named ``POTBOILER-TEST-<pid>`` (one in
the filter table, jumped to from OUTPUT, and one in the nat table, jumped to from OUTPUT), so that:

- each new connection a node makes is marked (conntrack mark) with that node's mark
  (``-m owner --gid-owner G -j CONNMARK --set-mark M``);
- a partition between nodes A and B drops every packet, in both directions, of the connections A
  made to B's address and of those B made to A's (``-m connmark --mark M_A -m conntrack
  --ctorigdst ADDR_B -j DROP`` and the mirror rule); on loopback every packet passes OUTPUT, so one
  chain sees both directions;
- a redirect sends the connections a node makes to a peer's port through a proxy instead (DNAT in
  the nat chain), which is how `tests.faults.proxy` sits between chosen nodes without the nodes
  knowing: their peer URLs stay the real ones.

Rules are scoped by this process's group ids and marks, so parallel test workers never touch each
other's nodes. `close()` removes the jumps and the chains whatever happened; chains left behind by a
test process that died are removed when the next firewall starts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

CHAIN_PREFIX = "POTBOILER-TEST-"
_CHAIN_RE = re.compile(rf"^-N ({re.escape(CHAIN_PREFIX)}(\d+))$", re.MULTILINE)
TABLES = ("filter", "nat")


class FirewallUnavailable(RuntimeError):
    """iptables cannot be used here (not root, not installed, or the kernel refuses the rules)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Firewall:
    """This test process's iptables chains, and the rules in them (see the module docstring)."""

    chain: str = field(default_factory=lambda: f"{CHAIN_PREFIX}{os.getpid()}")
    #: Partition and reset rules currently in the filter chain (each as its match/target arguments).
    _blocks: list[tuple[str, ...]] = field(default_factory=list)
    _installed: bool = False
    #: How many rules were ever added (a figure for the reports).
    rules_added: int = 0

    # -- running iptables ----------------------------------------------------------------------

    @staticmethod
    def _run(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        # -w: wait for the xtables lock (parallel test workers run iptables too).
        result = subprocess.run(["iptables", "-w", "10", *args], capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise FirewallUnavailable(f"iptables {' '.join(args)} failed: {result.stderr.strip()}")
        return result

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this machine cannot run the fault tests' rules, or None if it can."""
        if os.geteuid() != 0:
            return "the fault-injection tests need root for iptables (run as root, as CI does)"
        if shutil.which("iptables") is None:
            return "iptables is not installed (apt-get install iptables; ./test installs it)"
        try:
            result = cls._run(["-L", "-n"], check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"iptables -L failed: {exc}"
        if result.returncode != 0:
            return f"iptables -L failed: {result.stderr.strip()}"
        return None

    # -- lifecycle -----------------------------------------------------------------------------

    def install(self) -> None:
        """Create the chains and jump to them; raises FirewallUnavailable if the kernel refuses the
        matches this needs (owner, connmark, conntrack, DNAT)."""
        self.remove_stale()
        try:
            for table in TABLES:
                self._run(["-t", table, "-N", self.chain])
                self._run(["-t", table, "-I", "OUTPUT", "1", "-j", self.chain])
            self._installed = True
            # Probe every kind of rule used later, so a kernel without them skips the tests up front.
            probe_mark = ["-m", "owner", "--gid-owner", "1", "-j", "CONNMARK", "--set-mark", "1"]
            probe_drop = [
                "-m",
                "connmark",
                "--mark",
                "1",
                "-m",
                "conntrack",
                "--ctorigdst",
                "127.255.255.254",
            ]
            probe_dnat = ["-p", "tcp", "-m", "owner", "--gid-owner", "1", "-d", "127.255.255.254"]
            probe_dnat += ["--dport", "1", "-j", "DNAT", "--to-destination", "127.255.255.254:2"]
            for table, rule in (
                ("filter", probe_mark),
                ("filter", [*probe_drop, "-j", "DROP"]),
                ("nat", probe_dnat),
            ):
                self._run(["-t", table, "-A", self.chain, *rule])
                self._run(["-t", table, "-D", self.chain, *rule])
        except FirewallUnavailable:
            self.close()
            raise

    def close(self) -> None:
        """Remove the jumps and the chains (every rule in them goes too). Safe to call twice."""
        self._blocks.clear()
        self._remove_chain(self.chain)
        self._installed = False

    @classmethod
    def _remove_chain(cls, chain: str) -> None:
        for table in TABLES:
            while cls._run(["-t", table, "-D", "OUTPUT", "-j", chain], check=False).returncode == 0:
                pass
            cls._run(["-t", table, "-F", chain], check=False)
            cls._run(["-t", table, "-X", chain], check=False)

    @classmethod
    def remove_stale(cls) -> None:
        """Remove chains left by test processes that no longer run (killed before their teardown)."""
        for table in TABLES:
            listing = cls._run(["-t", table, "-S"], check=False).stdout
            for match in _CHAIN_RE.finditer(listing):
                if not _pid_alive(int(match.group(2))):
                    cls._remove_chain(match.group(1))

    def rules(self, table: str = "filter") -> list[str]:
        """The rules in this process's chain of `table`, as `iptables -S` prints them."""
        out = self._run(["-t", table, "-S", self.chain]).stdout.splitlines()
        return [line for line in out if line.startswith("-A ")]

    # -- node identity -------------------------------------------------------------------------

    def mark_connections(self, gid: int, mark: int) -> None:
        """Mark every new connection made by processes of group `gid` with `mark` (rules that mark
        come first in the chain, so a connection is marked before any partition rule looks)."""
        rule = ["-m", "conntrack", "--ctstate", "NEW", "-m", "owner", "--gid-owner", str(gid)]
        self._run(["-I", self.chain, "1", *rule, "-j", "CONNMARK", "--set-mark", str(mark)])
        self.rules_added += 1

    def redirect(self, gid: int, address: str, port: int, to_address: str, to_port: int) -> None:
        """Send the connections group `gid` makes to address:port to to_address:to_port instead."""
        rule = ["-p", "tcp", "-m", "owner", "--gid-owner", str(gid), "-d", address, "--dport", str(port)]
        self._run(
            [
                "-t",
                "nat",
                "-A",
                self.chain,
                *rule,
                "-j",
                "DNAT",
                "--to-destination",
                f"{to_address}:{to_port}",
            ]
        )
        self.rules_added += 1

    # -- partitions ----------------------------------------------------------------------------

    def block(self, mark: int, address: str) -> None:
        """Drop every packet of the connections marked `mark` that were made to `address`."""
        rule = (
            "-m",
            "connmark",
            "--mark",
            str(mark),
            "-m",
            "conntrack",
            "--ctorigdst",
            address,
            "-j",
            "DROP",
        )
        if rule in self._blocks:
            return
        self._run(["-A", self.chain, *rule])
        self._blocks.append(rule)
        self.rules_added += 1

    def cut(self, a: tuple[int, str], b: tuple[int, str]) -> None:
        """Partition two nodes, each given as (mark, address): nothing passes either way."""
        self.block(a[0], b[1])
        self.block(b[0], a[1])

    def partition(self, groups: Iterable[Iterable[tuple[int, str]]]) -> int:
        """Cut every pair of nodes that are in different groups; returns how many pairs were cut."""
        sides = [list(g) for g in groups]
        cut = 0
        for i, side in enumerate(sides):
            for other in sides[i + 1 :]:
                for a in side:
                    for b in other:
                        self.cut(a, b)
                        cut += 1
        return cut

    def heal(self) -> None:
        """Remove every partition rule (connection marks and redirects stay)."""
        while self._blocks:
            rule = self._blocks.pop()
            self._run(["-D", self.chain, *rule], check=False)

    @property
    def blocked(self) -> int:
        """How many drop rules are in place."""
        return len(self._blocks)
