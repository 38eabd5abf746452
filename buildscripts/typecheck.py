"""Run mypy on Potboiler's own code as the packages it installs as.

The source folders (server/, kv/, pigtail/, client/, gen/potboiler/v1) install under other names
(potboiler.server, ...), which mypy cannot see through the editable-install finder. This script
mirrors the package layout with directory symlinks in build/typecheck and checks the packages from
there, plus tests/, benchmarks/ and buildscripts/ as plain files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIRROR = ROOT / "build" / "typecheck"
PACKAGES = {
    "server": "server",
    "kv": "kv",
    "pigtail": "pigtail",
    "client": "client",
    "v1": "gen/potboiler/v1",
}


def main() -> int:
    pkg = MIRROR / "potboiler"
    pkg.mkdir(parents=True, exist_ok=True)
    for name, folder in PACKAGES.items():
        link = pkg / name
        if not link.is_symlink():
            link.symlink_to(ROOT / folder, target_is_directory=True)
    files = [str(pkg / name) for name in ("server", "kv", "pigtail", "client")]
    files += [str(p) for p in ("tests", "benchmarks", "buildscripts") if (ROOT / p).exists()]
    cmd = [sys.executable, "-m", "mypy", *files]
    return subprocess.run(cmd, cwd=ROOT, env={"MYPYPATH": str(MIRROR), "PATH": ""}).returncode


if __name__ == "__main__":
    sys.exit(main())
