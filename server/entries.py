"""What a client's new entry may be: the log's limits, and the checks an entry passes before it is
appended (`validate_new_entry`; `validate_serialized_entry` and `validate_serialized_batch` for data
as the client serialized it), which clients run too (potboiler.client), so this module needs nothing
of the node's store; and what an append answers (`Appended`, `AppendedEntries`)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import NamedTuple, overload

from google.protobuf.struct_pb2 import Value

from potboiler.server.errors import InvalidArgument, PotboilerError, TooDeep, TooLarge
from potboiler.server.hlc import Stamp
from potboiler.server.ids import parse_uuid
from potboiler.v1.entry_pb2 import Entry

#: Largest serialized `data` of one entry (1 MiB).
MAX_ENTRY_BYTES = 1 << 20
#: Most entries in one append call or stream message.
MAX_BATCH_ENTRIES = 10_000
#: Most dependencies of one entry.
MAX_DEPENDENCIES = 1_000
#: Deepest nesting of arrays and objects in entry data: deeper data could not be carried inside the
#: messages that wrap entries (subscriptions, replication) within protobuf's decoding depth limit.
MAX_DEPTH = 30


class NewEntry(NamedTuple):
    """A validated entry to append locally: its data (a `google.protobuf.Value`, serialized) and the
    16-byte ids of its dependencies."""

    data: bytes
    dependencies: tuple[bytes, ...] = ()


class Appended(NamedTuple):
    """An entry appended to this node's log, as its appender answers: its id, seq and stamp, and the
    entry serialized (`entry()` parses it)."""

    id: str
    seq: int
    when: Stamp
    blob: bytes

    def entry(self) -> Entry:
        """The entry itself."""
        return Entry.FromString(self.blob)


class AppendedEntries(Sequence[Appended]):
    """The entries of one append to this node's log, in order, as its appender answers: consecutive
    seqs from `first_seq`, stamps from `stamp` with `logical` counting up, their ids and each entry
    serialized. An `Appended` is made only for an entry looked at (an acknowledgement of a batch is
    written from the lists, see `potboiler.server.wire.append_acks`)."""

    __slots__ = ("blobs", "first_seq", "ids", "stamp")

    def __init__(self, ids: Sequence[str], first_seq: int, stamp: Stamp, blobs: Sequence[bytes]) -> None:
        self.ids = ids
        self.first_seq = first_seq
        self.stamp = stamp
        self.blobs = blobs

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> Appended: ...

    @overload
    def __getitem__(self, index: slice) -> list[Appended]: ...

    def __getitem__(self, index: int | slice) -> Appended | list[Appended]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = range(len(self.ids))[index]  # IndexError past the end; negative indexes count back
        wall_ms, logical = self.stamp
        return Appended(self.ids[i], self.first_seq + i, Stamp(wall_ms, logical + i), self.blobs[i])


def validate_new_entry(data: Value | None, dependencies: Iterable[str]) -> NewEntry:
    """Check a client's entry; InvalidArgument / TooLarge say what is wrong."""
    if data is None or data.WhichOneof("kind") is None:
        raise InvalidArgument(_NO_DATA)
    return validate_serialized_entry(data.SerializeToString(), dependencies, data)


def validate_serialized_entry(
    serialized: bytes, dependencies: Iterable[str], data: Value | None = None
) -> NewEntry:
    """`validate_new_entry` for data as a serialized `Value` (a well-formed one: its request was
    parsed), which is parsed only if a check needs it (`data`: the Value, if at hand)."""
    # Each kind is a field of Value, written first by every protobuf library (they write fields in
    # number order, and Value has no other): a first byte that is none of their keys is settled
    # by parsing (unknown fields first, say), and no byte at all is no kind.
    if not serialized or (
        serialized[0] not in _KIND_KEYS and _value(serialized, data).WhichOneof("kind") is None
    ):
        raise InvalidArgument(_NO_DATA)
    size = len(serialized)
    if size > MAX_ENTRY_BYTES:
        raise TooLarge(f"entry data is {size} bytes, more than the limit of {MAX_ENTRY_BYTES}")
    if serialized.count(_STRUCT_TAG) + serialized.count(_LIST_TAG) > MAX_DEPTH and _too_deep(
        _value(serialized, data)
    ):
        raise TooDeep(f"entry data is nested deeper than {MAX_DEPTH} levels of arrays and objects")
    # Most data has neither 0x7f nor 0xff anywhere (never in UTF-8 text, nor in the doubles of
    # everyday numbers): two searches for them first cost half of one by the pattern.
    if (
        (serialized.find(b"\x7f") >= 0 or serialized.find(b"\xff") >= 0)
        and _NON_FINITE_HINT.search(serialized)
        and _has_non_finite(_value(serialized, data))
    ):
        raise InvalidArgument("entry data must be JSON, which has no NaN or infinite numbers")
    if (serialized.find(b"\x12\x00") >= 0 or serialized.find(b"\x0a\x00") >= 0) and _has_unset(
        _value(serialized, data)
    ):
        raise InvalidArgument(
            "entry data holds a google.protobuf.Value with no kind set; a JSON null is null_value"
        )
    # One dependency named twice (or in upper and lower case) is one dependency.
    deps = tuple(dict.fromkeys(parse_uuid(d, "dependency") for d in dependencies)) if dependencies else ()
    if len(deps) > MAX_DEPENDENCIES:
        raise TooLarge(f"an entry may have at most {MAX_DEPENDENCIES} dependencies, not {len(deps)}")
    return NewEntry(serialized, deps)


def validate_serialized_batch(entries: Sequence[tuple[bytes, Iterable[str]]]) -> list[NewEntry]:
    """Check a batch of a client's entries, each as (data serialized, dependencies; see
    `validate_serialized_entry`): all or nothing, the first error saying which entry it is about."""
    if not entries:
        raise InvalidArgument("a batch needs at least one entry")
    if len(entries) > MAX_BATCH_ENTRIES:
        raise TooLarge(f"a batch may hold at most {MAX_BATCH_ENTRIES} entries, not {len(entries)}")
    out = []
    for i, (data, dependencies) in enumerate(entries):
        try:
            out.append(validate_serialized_entry(data, dependencies))
        except PotboilerError as exc:
            raise exc.prefixed(f"entry {i}: ") from None
    return out


_NO_DATA = "an entry needs data: a JSON value in the request body"

#: The keys (field number << 3 | wire type) of Value's kinds: null_value = 1, number_value = 2
#: (64-bit), string_value = 3, bool_value = 4, struct_value = 5, list_value = 6.
_KIND_KEYS = frozenset((1 << 3 | 0, 2 << 3 | 1, 3 << 3 | 2, 4 << 3 | 0, 5 << 3 | 2, 6 << 3 | 2))


def _value(serialized: bytes, data: Value | None) -> Value:
    """The Value, parsed from `serialized` unless at hand."""
    return data if data is not None else Value.FromString(serialized)


#: The tag bytes of `Value.struct_value` and `Value.list_value` (fields 5 and 6, length-delimited).
#: Each array or object nested in data is a Value whose serialized form starts with one of them, so
#: data holding these bytes (as tags or otherwise) at most MAX_DEPTH times in all cannot be too deep:
#: two counts in C instead of walking the data.
_STRUCT_TAG = bytes([5 << 3 | 2])
_LIST_TAG = bytes([6 << 3 | 2])


#: The last two bytes of every NaN or infinite double as protobuf writes it (little-endian, all 11
#: exponent bits set): data whose serialized form has no such pair has no such number. A match may
#: be a false alarm (other bytes), which `_has_non_finite` settles.
_NON_FINITE_HINT = re.compile(rb"[\xf0-\xff][\x7f\xff]")


def _values(data: Value) -> Iterator[tuple[str | None, Value]]:
    """Every value in `data` (itself included), with its kind."""
    stack = [data]
    while stack:
        v = stack.pop()
        kind = v.WhichOneof("kind")
        yield kind, v
        if kind == "list_value":
            stack.extend(v.list_value.values)
        elif kind == "struct_value":
            stack.extend(v.struct_value.fields.values())


def _has_non_finite(data: Value) -> bool:
    """Whether any number in `data` is NaN or infinite (which JSON cannot carry)."""
    return any(kind == "number_value" and not math.isfinite(v.number_value) for kind, v in _values(data))


def _has_unset(data: Value) -> bool:
    """Whether a value nested in `data` has no kind (JSON has no such value: each reader would show
    it differently). Asked only of data holding an empty list item or object member in its bytes
    (`\\x0a\\x00`, `\\x12\\x00`), as every such value is."""
    return any(kind is None for kind, _ in _values(data))


def _too_deep(data: Value) -> bool:
    """Whether arrays/objects in `data` nest deeper than MAX_DEPTH (callers only ask for data that
    holds enough of their tag bytes to be that deep)."""
    level: list[Value] = [data]
    for _ in range(MAX_DEPTH + 1):  # each round: is there an array or object at this depth?
        children: list[Value] = []
        containers = False
        for v in level:
            kind = v.WhichOneof("kind")
            if kind == "list_value":
                containers = True
                children.extend(v.list_value.values)
            elif kind == "struct_value":
                containers = True
                children.extend(v.struct_value.fields.values())
        if not containers:
            return False
        level = children
    return True
