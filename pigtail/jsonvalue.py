"""Conversions between `google.protobuf.Value` (what log entries and REST bodies carry) and plain JSON.

Numbers travel as doubles in a `Value`, so `1` and `1.0` cannot be told apart on the wire: `from_value`
gives an `int` for every integral number within ±2**53 (where doubles are exact), a `float` otherwise.
That is what the state machine needs (its events hold integer fields) and gives the same Python value on
every node.
"""

from __future__ import annotations

from google.protobuf.struct_pb2 import NULL_VALUE, ListValue, Struct, Value

from potboiler.pigtail.machine import JSONValue

_EXACT = float(2**53)


def _number(n: float) -> int | float:
    if n.is_integer() and -_EXACT <= n <= _EXACT:
        return int(n)
    return n


def from_value(v: Value) -> JSONValue:
    """The plain JSON of a Value (an unset Value is null)."""
    kind = v.WhichOneof("kind")
    if kind == "string_value":
        return v.string_value
    if kind == "number_value":
        return _number(v.number_value)
    if kind == "struct_value":
        return from_struct(v.struct_value)
    if kind == "list_value":
        return [from_value(x) for x in v.list_value.values]
    if kind == "bool_value":
        return v.bool_value
    return None


def from_struct(s: Struct) -> dict[str, JSONValue]:
    """The plain JSON object of a Struct."""
    return {k: from_value(x) for k, x in s.fields.items()}


def set_value(out: Value, x: JSONValue) -> Value:
    """Store the plain JSON `x` in `out` (which is returned)."""
    if isinstance(x, str):
        out.string_value = x
    elif isinstance(x, bool):
        out.bool_value = x
    elif isinstance(x, int | float):
        out.number_value = x
    elif isinstance(x, dict):
        out.struct_value.SetInParent()
        fields = out.struct_value.fields
        for k, y in x.items():
            set_value(fields[k], y)
    elif isinstance(x, list):
        out.list_value.SetInParent()
        values: ListValue = out.list_value
        for y in x:
            set_value(values.values.add(), y)
    else:
        out.null_value = NULL_VALUE
    return out


def to_value(x: JSONValue) -> Value:
    """A new Value holding the plain JSON `x`."""
    return set_value(Value(), x)


def to_struct(x: dict[str, JSONValue]) -> Struct:
    """A new Struct holding the plain JSON object `x`."""
    out = Struct()
    for k, y in x.items():
        set_value(out.fields[k], y)
    return out
