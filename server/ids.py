"""UUID handling: ids travel as canonical lower-case hyphenated strings and are stored as 16 bytes.

These run for every entry on the hot paths, so they avoid the (slow) `uuid.UUID` class.
"""

from __future__ import annotations

import os

from potboiler.server.errors import InvalidArgument


def parse_uuid(text: str, what: str = "id") -> bytes:
    """The 16 bytes of a UUID in hyphenated form; InvalidArgument naming `what` otherwise."""
    # Hyphens where they belong, and exactly 32 hex digits besides (fromhex rejects anything else
    # but whitespace, which leaves fewer than 16 bytes): about 3x faster than a regular expression.
    if len(text) == 36 and text[8] == text[13] == text[18] == text[23] == "-":
        try:
            raw = bytes.fromhex(text.replace("-", ""))
        except ValueError:
            raw = b""
        if len(raw) == 16:
            return raw
    raise InvalidArgument(f"{what} {text!r} is not a UUID (expected the form 8-4-4-4-12 hex digits)")


def uuid_str(raw: bytes) -> str:
    """The canonical string form of 16 UUID bytes."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_uuids(n: int) -> list[bytes]:
    """`n` fresh random (version 4) UUIDs as bytes, from one read of the OS's random source."""
    b = bytearray(os.urandom(16 * n))
    for i in range(6, 16 * n, 16):
        b[i] = (b[i] & 0x0F) | 0x40
        b[i + 2] = (b[i + 2] & 0x3F) | 0x80
    return [bytes(b[i : i + 16]) for i in range(0, 16 * n, 16)]


def new_uuid() -> tuple[bytes, str]:
    """A fresh random (version 4) UUID as (bytes, string)."""
    [raw] = new_uuids(1)
    return raw, uuid_str(raw)
