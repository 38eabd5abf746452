"""UUID handling: ids travel as canonical lower-case hyphenated strings and are stored as 16 bytes.

These run for every entry on the hot paths, so they avoid the (slow) `uuid.UUID` class.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from potboiler.server.errors import InvalidArgument, quoted


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
    raise InvalidArgument(f"{what} {quoted(text)} is not a UUID (expected the form 8-4-4-4-12 hex digits)")


def canonical_uuid(text: str, what: str = "id") -> bytes:
    """`parse_uuid` for ids that are stored as they came (another node's entries): only the canonical
    lower-case form, which every node writes, so that one id has one text everywhere."""
    raw = parse_uuid(text, what)
    if text.lower() != text:
        raise InvalidArgument(f"{what} {quoted(text)} is not in the canonical lower-case form")
    return raw


def parse_uuids(texts: Sequence[str]) -> list[bytes] | None:
    """The 16 bytes of each UUID in hyphenated form, by the rules of `parse_uuid` but checked and
    converted all at once (a few string operations in C instead of several per id); None if any
    one is not a UUID."""
    count = len(texts)
    if any(len(text) != 36 for text in texts):
        return None
    joined = "".join(texts)
    if any(joined[i::36].count("-") != count for i in (8, 13, 18, 23)):
        return None
    try:
        flat = bytes.fromhex(joined.replace("-", ""))
    except ValueError:
        return None
    if len(flat) != 16 * count:  # a hyphen elsewhere, or whitespace, took the place of a digit
        return None
    return [flat[i : i + 16] for i in range(0, 16 * count, 16)]


def uuid_str(raw: bytes) -> str:
    """The canonical string form of 16 UUID bytes."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_uuids(n: int, unix_ms: int | None = None) -> list[bytes]:
    """`n` fresh time-ordered (version 7, RFC 9562) UUIDs as bytes: 48 bits of Unix time in ms
    (`unix_ms`, else now), then 74 random bits, from one read of the OS's random source.

    Ids made at about the same time sort together, so indexing them by id inserts near the end of
    the index instead of anywhere in it, which makes RocksDB's writes and compactions cheaper."""
    if unix_ms is None:
        unix_ms = time.time_ns() // 1_000_000
    if n <= _FEW:
        # Integer arithmetic per id: the column-wise way below has a fixed cost of about 7 µs.
        rand = int.from_bytes(os.urandom(10 * n), "big")
        out = []
        for _ in range(n):
            r, rand = rand & _RAND_80, rand >> 80
            value = unix_ms << 80 | _VERSION_VARIANT | (r >> 68) << 64 | (r & _RAND_62)
            out.append(value.to_bytes(16, "big"))
        return out
    ms = unix_ms.to_bytes(6, "big")
    b = bytearray(os.urandom(16 * n))
    # Column by column (byte k of every id at once, with strided slices): no Python loop per id
    # but the final split.
    for k in range(6):
        b[k::16] = ms[k : k + 1] * n
    b[6::16] = b[6::16].translate(_VERSION_7)
    b[8::16] = b[8::16].translate(_VARIANT_RFC)
    ids = bytes(b)
    return [ids[i : i + 16] for i in range(0, 16 * n, 16)]


#: Up to how many ids `new_uuids` makes one by one.
_FEW = 8
_RAND_80 = (1 << 80) - 1
_RAND_62 = (1 << 62) - 1
#: The version nibble (7) and the variant bits (10) in place in a UUID as an integer.
_VERSION_VARIANT = 0x7 << 76 | 0b10 << 62
#: Byte maps that set the version nibble (7) and the variant bits (10) of a random byte.
_VERSION_7 = bytes((x & 0x0F) | 0x70 for x in range(256))
_VARIANT_RFC = bytes((x & 0x3F) | 0x80 for x in range(256))


def new_uuid() -> tuple[bytes, str]:
    """A fresh time-ordered (version 7) UUID as (bytes, string)."""
    [raw] = new_uuids(1)
    return raw, uuid_str(raw)
