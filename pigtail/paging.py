"""Pages of a task listing. A listing is in a fixed order (a sort key per task, unique), and a page
token is the key of the last task a page gave: the next page starts after it, even if tasks came,
went or moved in between (a task that moved may then be skipped or given twice, as in any listing of
a changing set)."""

from __future__ import annotations

import base64
import binascii
import bisect
from collections.abc import Sequence
from typing import Any, TypeVar

import orjson

from potboiler.server.errors import InvalidArgument

#: Tasks per page when the request names no size, and the most it may name: a page must fit the
#: 4 MiB a gRPC client takes by default, and a summary may take some 1,600 bytes (a name of 256
#: characters of 4 UTF-8 bytes each, an id of up to 128, and their framing).
MAX_PAGE_SIZE = 2_000
#: Nesting of a sort key: a tuple holding tuples (a rank holds its Stamp).
_KEY_DEPTH = 2

_Item = TypeVar("_Item")


def page(listing: Sequence[tuple[Any, _Item]], page_size: int, page_token: str) -> tuple[list[_Item], str]:
    """The page of `listing` ((sort key, item) pairs in key order) after `page_token` (empty: from the
    start), at most `page_size` items (0: MAX_PAGE_SIZE), and the token of the next page ("" after
    the last)."""
    size = min(page_size or MAX_PAGE_SIZE, MAX_PAGE_SIZE)
    start = 0
    if page_token:
        after = _decode(page_token)
        try:
            start = bisect.bisect_right(listing, after, key=lambda pair: pair[0])
        except TypeError:  # a token of another listing: its key does not compare
            raise InvalidArgument("page_token is not one this listing gave") from None
    chosen = listing[start : start + size]
    more = start + size < len(listing)
    return [item for _, item in chosen], _encode(chosen[-1][0]) if more else ""


def _encode(key: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(key, default=_named_tuple)).decode()


def _named_tuple(value: Any) -> list[Any]:
    if isinstance(value, tuple):  # a NamedTuple (a Stamp), which orjson leaves to us
        return list(value)
    raise TypeError(f"{type(value).__name__} is not part of a sort key")


def _decode(token: str) -> Any:
    try:
        return _tuples(orjson.loads(base64.urlsafe_b64decode(token.encode())))
    except (binascii.Error, ValueError):
        raise InvalidArgument("page_token is not one this service gave") from None


def _tuples(value: Any, depth: int = 0) -> Any:
    """JSON arrays as tuples again (a sort key is a tuple, maybe nested); ValueError if nested deeper
    than any sort key."""
    if not isinstance(value, list):
        return value
    if depth == _KEY_DEPTH:
        raise ValueError("nested deeper than a sort key")
    return tuple(_tuples(v, depth + 1) for v in value)
