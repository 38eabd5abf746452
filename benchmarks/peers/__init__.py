"""The systems benchmarks/compare.py runs side by side with Potboiler, and what each one needs.

Each peer module starts its servers on free loopback ports with data in a temporary directory and
stops them (`stop()`); `missing()` says which of their programs and Python packages are not installed
(compare.py skips that peer's figures and says how to install them, never installing anything itself).
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

#: How the README installs every peer.
INSTALL_COMMAND = "buildscripts/bootstrap --bench"


@dataclass(frozen=True)
class Need:
    """A program on PATH (`kind` "program", from a Debian package) or a Python module (`kind`
    "module", from a PyPI distribution)."""

    kind: str
    name: str
    package: str

    def describe(self) -> str:
        if self.kind == "program":
            return f"program `{self.name}` (Debian package {self.package})"
        return f"Python module `{self.name}` (PyPI {self.package})"


ETCD = (Need("program", "etcd", "etcd-server"),)
NATS = (Need("program", "nats-server", "nats-server"), Need("module", "nats", "nats-py"))
REDIS = (Need("program", "redis-server", "redis-server"), Need("module", "redis", "redis"))
RQ = (*REDIS, Need("module", "rq", "rq"))
WRK = (Need("program", "wrk", "wrk"),)

#: What each peer (or tool) of the comparison needs.
NEEDS: Mapping[str, tuple[Need, ...]] = {
    "etcd": ETCD,
    "jetstream": NATS,
    "redis": REDIS,
    "rq": RQ,
    "wrk": WRK,
}


def _installed(need: Need, which: Callable[[str], str | None], has_module: Callable[[str], bool]) -> bool:
    return which(need.name) is not None if need.kind == "program" else has_module(need.name)


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def missing(
    names: Iterable[str],
    which: Callable[[str], str | None] = shutil.which,
    has_module: Callable[[str], bool] = _has_module,
) -> dict[str, list[Need]]:
    """For each of `names` (keys of NEEDS) that lacks something, what it lacks."""
    out: dict[str, list[Need]] = {}
    for name in names:
        lacking = [n for n in NEEDS[name] if not _installed(n, which, has_module)]
        if lacking:
            out[name] = lacking
    return out


def missing_message(lacking: Mapping[str, list[Need]]) -> str:
    """What is missing, and the command that installs it, for people."""
    lines = [
        f"  {name}: " + ", ".join(n.describe() for n in needs) + " not installed"
        for name, needs in lacking.items()
    ]
    return "\n".join(
        [
            "Not installed, so these peers' figures are skipped:",
            *lines,
            f"Install everything the comparison runs with: {INSTALL_COMMAND}  (see README, Benchmarks)",
        ]
    )
