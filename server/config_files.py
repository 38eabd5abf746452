"""Reading a node's security config files (tokens file, peer token file) so that changes to them can
be watched (`read_versioned`, `file_version`), and `SecurityConfigError`, which any security setting
that cannot be used raises (a missing certificate, a malformed token file, a bad flag value)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TypeAlias


class SecurityConfigError(ValueError):
    """A security setting cannot be used (missing or malformed file, bad flag value)."""


#: What tells one version of a file from the next: a digest of its bytes (see `file_version`).
FileVersion: TypeAlias = bytes


def file_version(path: Path) -> FileVersion | None:
    """The version of the (small) file at `path`, None while it cannot be read: the SHA-256 of its
    bytes, so that any change of what it says is a new version (a rewrite in place of the same size
    within one tick of the file system's clock too), and a rewrite of the same bytes is not."""
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None


def read_versioned(path: Path, what: str) -> tuple[str, FileVersion]:
    """The text of the `what` (a tokens file, say) at `path` and its version, from one read: whoever
    watches the file from this version on sees every change made after what was read.
    SecurityConfigError if it cannot be read as text."""
    try:
        data = path.read_bytes()
        return data.decode(), hashlib.sha256(data).digest()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecurityConfigError(f"cannot read the {what} {path}: {exc}") from None
