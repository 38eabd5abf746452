"""Protobuf wire format, written by hand for the one message a node builds from stored bytes in bulk:
a `SubscribeEntriesResponse` of entries as the store holds them serialized. Wrapping each stored
entry in its `DeliveredEntry` as bytes costs a third of building the messages field by field (which
also needs every entry parsed first, and copies each twice)."""

from __future__ import annotations

from collections.abc import Sequence

#: Field keys (field number << 3 | wire type 2, length-delimited; 0, varint).
_RESPONSE_ENTRIES = b"\x0a"  # SubscribeEntriesResponse.entries = 1
_DELIVERED_POSITION = b"\x08"  # DeliveredEntry.position = 1
_DELIVERED_ENTRY = b"\x12"  # DeliveredEntry.entry = 2

_ONE_BYTE = [bytes((n,)) for n in range(0x80)]


def varint(n: int) -> bytes:
    """The base-128 varint of `n` (>= 0), as protobuf writes it."""
    if n < 0x80:
        return _ONE_BYTE[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    if n < 0x200000:
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def subscribe_entries_response(delivered: Sequence[tuple[int, bytes]]) -> bytes:
    """A serialized `SubscribeEntriesResponse` of (position, serialized `Entry`) pairs."""
    parts: list[bytes] = []
    for position, blob in delivered:
        head = _DELIVERED_POSITION + varint(position) + _DELIVERED_ENTRY + varint(len(blob))
        parts += (_RESPONSE_ENTRIES, varint(len(head) + len(blob)), head, blob)
    return b"".join(parts)
