"""UUID handling: ids travel as canonical lower-case hyphenated strings and are stored as 16 bytes."""

from __future__ import annotations

import re
import uuid

from potboiler.server.errors import InvalidArgument

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


def parse_uuid(text: str, what: str = "id") -> bytes:
    """The 16 bytes of a UUID in hyphenated form; InvalidArgument naming `what` otherwise."""
    if not _UUID.match(text):
        raise InvalidArgument(f"{what} {text!r} is not a UUID (expected the form 8-4-4-4-12 hex digits)")
    return uuid.UUID(text).bytes


def uuid_str(raw: bytes) -> str:
    """The canonical string form of 16 UUID bytes."""
    return str(uuid.UUID(bytes=raw))


def new_uuid() -> tuple[bytes, str]:
    """A fresh random UUID as (bytes, string)."""
    u = uuid.uuid4()
    return u.bytes, str(u)
