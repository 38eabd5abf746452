"""Names clients give things: KV tables and keys, Pigtail queues (and the task ids in its events).

A name is 1 to 128 letters, digits, ``_`` or ``-``: safe in a URL path, a store key and an HTML page
as it is.
"""

from __future__ import annotations

import re

from potboiler.server.errors import InvalidArgument

_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")
#: Characters of a bad name its error message shows (cut with "...": the message adds its length
#: when that is what is wrong).
_SHOWN = 40


def is_name(name: str) -> bool:
    """Whether `name` is a valid name."""
    return _NAME.fullmatch(name) is not None


def check_name(name: str, what: str) -> str:
    """`name` if it is a valid name, else InvalidArgument saying why ("<what> name '...' is
    invalid: ...")."""
    if not is_name(name):
        shown = name if len(name) <= _SHOWN else name[: _SHOWN - 3] + "..."
        raise InvalidArgument(
            f"{what} name {shown!r} is invalid: use 1 to 128 letters, digits, '_' or '-'"
            + (f" (it has {len(name)} characters)" if len(name) > 128 else "")
        )
    return name
