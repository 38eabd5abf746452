"""Conversions between `google.protobuf.Value` (what entries and REST bodies carry) and plain JSON,
shared by the services built on the log.

JSON numbers travel as doubles in a `Value` (REST bodies go through Envoy as `Value` too), so `1` and
`1.0` cannot be told apart on the wire. `from_value` therefore gives an `int` for every integral number
within ±2**53 (where doubles are exact) and a `float` otherwise: counters sum integers exactly and the
same JSON gives the same Python value on every node.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TypeAlias

import orjson
from google.protobuf.struct_pb2 import NULL_VALUE, ListValue, Struct, Value

from potboiler.server.errors import InvalidArgument, TooDeep

#: A plain JSON value as Python holds it.
JSON: TypeAlias = bool | int | float | str | list["JSON"] | dict[str, "JSON"] | None

#: The largest integer every double up to it holds exactly.
MAX_EXACT_INTEGER = 2**53
_EXACT = float(MAX_EXACT_INTEGER)


def big_integer_message(literal: str) -> str:
    """What is wrong with an integer beyond MAX_EXACT_INTEGER in an entry."""
    return (
        f"the integer {literal} is beyond 2^53 ({MAX_EXACT_INTEGER}): JSON numbers are kept as IEEE "
        "doubles, which hold every integer up to 2^53 but not all beyond; send bigger integers as strings"
    )


def read_number(n: float) -> int | float:
    """A number as `from_value` reads it from a Value's double."""
    return int(n) if n.is_integer() and -_EXACT <= n <= _EXACT else n


def as_sent(x: JSON) -> JSON:
    """`x` as every node reads it back once it has travelled in a Value, i.e. `from_value(to_value(x))`
    without building the Value: `1.0` reads back as `1`, an integer beyond 2**53 as the nearest
    double. What a client sends and what the log holds compare equal only in this form."""
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int | float):
        try:
            return read_number(float(x))
        except OverflowError:  # beyond any double: no Value holds it (to_value refuses it)
            return x
    if isinstance(x, dict):
        return {k: as_sent(y) for k, y in x.items()}
    if isinstance(x, list):
        return [as_sent(y) for y in x]
    return x


def from_value(v: Value) -> JSON:
    """The plain JSON of a Value (an unset Value is null)."""
    kind = v.WhichOneof("kind")
    if kind == "struct_value":
        return from_struct(v.struct_value)
    if kind == "string_value":
        return v.string_value
    if kind == "number_value":
        return read_number(v.number_value)
    if kind == "list_value":
        return [_scalar(x) for x in v.list_value.values]
    if kind == "bool_value":
        return v.bool_value
    return None


def _scalar(x: Value) -> JSON:
    # from_value, with strings and numbers (the common leaves) handled without a further call.
    kind = x.WhichOneof("kind")
    if kind == "string_value":
        return x.string_value
    if kind == "number_value":
        return read_number(x.number_value)
    return from_value(x)


def from_struct(s: Struct) -> dict[str, JSON]:
    """The plain JSON object of a Struct."""
    # Indexing by key is much faster than .items() on upb map containers.
    fields = s.fields
    return {k: _scalar(fields[k]) for k in fields}


def set_value(out: Value, x: JSON) -> Value:
    """Store the plain JSON `x` in `out` (which is returned)."""
    if isinstance(x, str):
        out.string_value = x
    elif isinstance(x, bool):
        out.bool_value = x
    elif isinstance(x, int | float):
        out.number_value = x
    elif isinstance(x, dict):
        fields = out.struct_value.fields
        out.struct_value.SetInParent()
        for k, y in x.items():
            set_value(fields[k], y)
    elif isinstance(x, list):
        set_list(out.list_value, x)
    else:
        out.null_value = NULL_VALUE
    return out


def set_list(out: ListValue, items: list[JSON]) -> ListValue:
    """Store the plain JSON list `items` in `out` (which is returned)."""
    out.SetInParent()
    values = out.values
    for y in items:
        set_value(values.add(), y)
    return out


def to_value(x: JSON) -> Value:
    """A new Value holding the plain JSON `x`."""
    return set_value(Value(), x)


def nesting(x: object, limit: int) -> int:
    """How deep arrays and objects nest in `x` (0 for anything else), counted no further than
    `limit` + 1 (so a structure that holds itself is deeper than any limit, not endless)."""
    level = [x] if isinstance(x, dict | list) else []
    depth = 0
    while level and depth <= limit:
        depth += 1
        children: list[object] = []
        for v in level:
            children.extend(v.values() if isinstance(v, dict) else v)
        level = [c for c in children if isinstance(c, dict | list)]
    return depth


def scalars(x: object) -> Iterator[object]:
    """Everything in `x` that is neither an array nor an object (`x` itself if it is neither), for
    `x` whose nesting is bounded (see `nesting`); InvalidArgument for an object key that is not a
    string."""
    stack = [x]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                raise InvalidArgument("JSON object keys are strings")
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        else:
            yield item


def checked_value(x: object, max_depth: int) -> Value:
    """A new Value holding `x` if it is plain JSON as a node takes it (nested at most `max_depth`
    deep); InvalidArgument otherwise (`to_value` would store any other object as null, and an
    integer beyond 2^53 as another)."""
    if nesting(x, max_depth) > max_depth:
        raise TooDeep(f"entry data is nested deeper than {max_depth} levels of arrays and objects")
    for item in scalars(x):
        if isinstance(item, int) and not isinstance(item, bool):
            if abs(item) > MAX_EXACT_INTEGER:
                raise InvalidArgument(big_integer_message(str(item)))
        elif not (item is None or isinstance(item, str | bool | float)):
            raise InvalidArgument(f"entry data must be JSON, which has no {type(item).__name__}")
    return to_value(x)  # type: ignore[arg-type]  # checked above


def json_text(value: object) -> bytes:
    """`value` as the JSON text of a REST answer: compact, object members in sorted order, integers
    exact (also past 2^53, where a google.protobuf.Value printed by the transcoder rounds them)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # an integer past 64 bits, which orjson does not write
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sorted_keys(x: JSON) -> JSON:
    """`x` with every object's keys in sorted order (how the REST answers print objects)."""
    if isinstance(x, dict):
        return {k: sorted_keys(x[k]) for k in sorted(x)}
    if isinstance(x, list):
        return [sorted_keys(v) for v in x]
    return x
