"""The checks every CRDT type shares: that a value is plain, finite JSON, that an object holds the
fields it needs (and no others), and :func:`canonical_json`, the text by which items and values compare.

Each check raises :class:`~potboiler.kv.crdts.errors.InvalidOperation` with a message saying what is
wrong; ``_show`` and ``_kind`` describe the offending value in it."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import cast

from potboiler.kv.crdts.errors import InvalidOperation
from potboiler.server.jsonvalue import JSON


def canonical_json(data: JSON) -> str:
    """Canonical JSON text of ``data`` (sorted keys, no spaces): equal JSON values give equal strings."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _kind(x: object) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "a boolean"
    if isinstance(x, int | float):
        return "a number"
    if isinstance(x, str):
        return "a string"
    if isinstance(x, list):
        return "a list"
    if isinstance(x, dict):
        return "an object"
    return type(x).__name__


def _show(x: object) -> str:
    text = repr(x) if isinstance(x, str) else _kind(x)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_json(data: object, what: str) -> JSON:
    """Return ``data`` typed as JSON after checking it really is plain, finite JSON."""
    if type(data) in _PLAIN:  # most items and values: nothing to walk
        return cast(JSON, data)
    stack: list[object] = [data]
    while stack:
        x = stack.pop()
        if x is None or isinstance(x, bool | int | str):
            continue
        if isinstance(x, float):
            if not math.isfinite(x):
                raise InvalidOperation(f"{what} contains a non-finite number ({x})")
        elif isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, dict):
            for k, v in x.items():
                if not isinstance(k, str):
                    raise InvalidOperation(f"{what} contains an object key that is not a string ({k!r})")
                if type(v) not in _PLAIN:
                    stack.append(v)
        else:
            raise InvalidOperation(f"{what} contains a value that is not JSON ({type(x).__name__})")
    return cast(JSON, data)


#: The types of the JSON scalars `_check_json` takes as they are (a float may be NaN or infinite).
_PLAIN = frozenset({str, int, bool, type(None)})


def _obj(x: JSON, what: str) -> dict[str, JSON]:
    if not isinstance(x, dict):
        raise InvalidOperation(f"{what} must be an object, got {_kind(x)}")
    return x


def _no_unknown_fields(d: Mapping[str, JSON], allowed: tuple[str, ...], what: str) -> None:
    for k in d:
        if k not in allowed:
            unknown = sorted(k for k in d if k not in allowed)
            names = ", ".join(repr(k) for k in unknown)
            raise InvalidOperation(f"{what} has unknown field(s) {names} (allowed: {', '.join(allowed)})")


def _str_field(d: Mapping[str, JSON], name: str, what: str) -> str:
    x = d.get(name)
    if not isinstance(x, str):
        raise InvalidOperation(f"{what} needs a string {name!r}")
    return x


def _int_field(d: Mapping[str, JSON], name: str, what: str) -> int:
    x = d.get(name)
    if not isinstance(x, int) or isinstance(x, bool):
        raise InvalidOperation(f"{what} needs an integer {name!r}")
    return x


def _tags_field(d: Mapping[str, JSON], name: str, what: str) -> list[str]:
    x = d.get(name)
    if not isinstance(x, list) or not all(isinstance(t, str) for t in x):
        raise InvalidOperation(f"{what} needs a list of string tags {name!r}")
    return [t for t in x if isinstance(t, str)]
