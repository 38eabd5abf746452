"""The materialised KV state of one node on a `Store`: applying log entries, preparing writes, reads.

Keys (table and key names are ASCII, so they sort as their names; `\\x00` ends a table name):

    c                          -> u64 BE: position of the last log entry applied (the cursor)
    s<T><table>\\x00<key>      -> the CRDT state of `key` in `table` for type code T: JSON (orjson), or
                                  for an LWW register a binary record (see potboiler.kv.encoding)

A key's state is kept per table *type* (T is one byte: L, O, G, P, M). A table's type comes from the
built-in LWW table `_config`; reads look only at the states of the table's current type. Keeping the
types apart makes every node's state a function of the set of events it applied, whatever order the
table configs and the writes arrive in:

- an event prepared for type X (see `potboiler.kv.events`) is applied to the X states, even before the
  table is configured, so a write never waits and is never lost;
- an event written while its node did not know the table is applied, prepared against an empty state,
  to every type whose ops include its op; the states of the type the table gets are the ones that show;
- re-typing a table shows the states of its new type (empty unless writes of that type were made).

A batch of entries is applied with ONE store write holding every changed state and the new cursor, so
a restart resumes exactly after the last applied entry: nothing is skipped or applied twice.
"""

from __future__ import annotations

import itertools
import logging
import struct
from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, cast

from google.protobuf.struct_pb2 import Value

from potboiler.kv.crdts import (
    CRDT_BY_NAME,
    CrdtType,
    EventContext,
    InvalidOperation,
    Stamp,
    apply,
    apply_change,
    causal_dependencies,
    counter_total,
    observed_tags,
    prepare,
    value,
)
from potboiler.kv.encoding import LwwRecord, Stored, decode, encode, to_json
from potboiler.kv.events import CONFIG_TABLE, TYPES_OF_OP, KvEvent
from potboiler.server.entries import MAX_DEPENDENCIES
from potboiler.server.errors import InvalidArgument, NotFound, quoted
from potboiler.server.jsonvalue import JSON, MAX_EXACT_INTEGER, as_sent, from_value, json_text, to_value
from potboiler.server.names import check_name, is_name
from potboiler.server.storage import Store, Write, prefix_end
from potboiler.v1.entry_pb2 import Entry

log = logging.getLogger(__name__)

CURSOR_KEY = b"c"
#: The format of the states this code writes. A store in another format is rebuilt from the log at
#: start (`discard_if_stale`), so bump it when some events' states would differ from what older code
#: stored. 1 (unmarked): until 30 November 2026. 2: an OR-Set remove that takes nothing away leaves a
#: missing key missing (format 1 made it an empty set).
STATE_FORMAT = 2
_U64 = struct.Struct(">Q")
_CODE = {
    CrdtType.LWW: b"L",
    CrdtType.ORSET: b"O",
    CrdtType.GSET: b"G",
    CrdtType.PNCOUNTER: b"P",
    CrdtType.MVREGISTER: b"M",
}
_CONFIG_PREFIX = b"s" + _CODE[CrdtType.LWW] + CONFIG_TABLE.encode() + b"\x00"
_ALL_OPS = ", ".join(TYPES_OF_OP)


def table_prefix(crdt: CrdtType, table: str) -> bytes:
    """The prefix of every state key of `table` for type `crdt`."""
    return b"s" + _CODE[crdt] + table.encode() + b"\x00"


def state_key(crdt: CrdtType, table: str, key: str) -> bytes:
    """The store key of one key's state."""
    return b"s" + _CODE[crdt] + table.encode() + b"\x00" + key.encode()


@dataclass(frozen=True)
class TableInfo:
    """A configured table."""

    name: str
    crdt: CrdtType
    #: Id of the `_config` entry that gave the table its type (its LWW winner).
    config_id: str


@dataclass(frozen=True)
class PlannedWrite:
    """A validated write: the event to append and the entries it depends on."""

    event: KvEvent
    dependencies: tuple[str, ...]
    #: The table is not known here yet (the event waits for it on every node).
    pending: bool


CONFIG_INFO = TableInfo(CONFIG_TABLE, CrdtType.LWW, "")


def _table_of_config(name: str, state: JSON) -> TableInfo | None:
    """The table a `_config` LWW state describes, or None if its value is not {"crdt": <type>}, or it
    would configure `_config` itself (the KV API writes neither; an entry appended by hand may)."""
    if not isinstance(state, dict) or name == CONFIG_TABLE:
        return None
    config, tag = state.get("value"), state.get("tag")
    if not isinstance(config, dict) or not isinstance(tag, str):
        return None
    try:
        return TableInfo(name, CrdtType.parse(config.get("crdt")), tag)
    except InvalidOperation:
        return None


def _counter_op(op: str, amount: JSON) -> tuple[str, JSON]:
    """A PN-Counter op with a negative amount as the other op: increment -3 is decrement 3 (a
    counter's sides only grow, so the event says which)."""
    if isinstance(amount, int | float) and not isinstance(amount, bool) and amount < 0:
        return _OPPOSITE[op], -amount
    return op, amount


def _check_exact_counter(
    table: str, state: JSON | None, op: str, amount: JSON, asked: tuple[str, JSON]
) -> None:
    """Refuse a PN-Counter amount that would take this node's total of its side (increments or
    decrements, all nodes' as seen here) past MAX_EXACT_INTEGER (2**53): numbers travel as IEEE
    doubles (google.protobuf.Value), through Envoy and in log entries, and stop being exact beyond it.
    (Writers on different nodes may still, together, pass it: each checks what it has seen.) `asked`:
    the op and amount as the client gave them (`increment -3` is `decrement 3` here)."""
    if not isinstance(amount, int | float):
        return  # prepare() has refused it already
    try:
        total = counter_total(state, op, amount)  # exact: near 2**53, float sums round
    except InvalidOperation:
        # A damaged state: only a write to a table not known here gets this far with one (a known
        # table's prepare() refuses it first), and its observed context skips that state too.
        return
    if total > MAX_EXACT_INTEGER:
        what = "increments" if op == "increment" else "decrements"
        raise InvalidArgument(
            f"table {table!r}: PN-Counter {asked[0]!r} amount {asked[1]} would take the counter's {what} past "
            f"2**53 = {MAX_EXACT_INTEGER}: a counter's totals are kept within it, where every integer is exact"
        )


def _shown(crdt: CrdtType, stored: Stored) -> JSON:
    """A key's value as REST answers it and the browser shows it."""
    if isinstance(stored, LwwRecord):
        return from_value(stored.message())
    shown = value(crdt, stored)
    if isinstance(shown, float) and shown.is_integer() and abs(shown) <= MAX_EXACT_INTEGER:
        return int(shown)  # a counter's 1.5 + 1.5: 3, as a JSON number is read everywhere else
    return shown


class _StoreFailed(Exception):
    """A store read failed while applying: `error`."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class EventFailed(Exception):
    """Applying the log entry at `position` failed (the cause is chained)."""

    def __init__(self, position: int, entry_id: str) -> None:
        super().__init__(f"the log entry {entry_id} at position {position} could not be applied")
        self.position = position
        self.entry_id = entry_id


class KvState:
    """The KV tables of one node in its own store. Single writer: `apply_batch` is called by one task."""

    def __init__(self, store: Store) -> None:
        self._store = store
        raw = store.get(CURSOR_KEY)
        self._position = _U64.unpack(raw)[0] if raw is not None else 0
        self._tables: dict[str, TableInfo] = {}
        for k, v in store.scan(_CONFIG_PREFIX, prefix_end(_CONFIG_PREFIX)):
            name = k[len(_CONFIG_PREFIX) :].decode()
            info = _table_of_config(name, to_json(decode(v)))
            if info is not None:
                self._tables[name] = info
        self._lww_prefixes: dict[str, bytes] = {}
        #: Decoded states by store key, as committed (bounded; see apply_batch).
        self._cache: dict[bytes, Stored] = {}
        #: Serialized size of each cached state, and their sum.
        self._cache_sizes: dict[bytes, int] = {}
        self._cache_bytes = 0
        #: The JSON text of values read lately, by state key (see `get_text`).
        self._texts: dict[bytes, bytes] = {}
        #: How many events were applied since the state was opened (benchmarks/kv.py reports it).
        self.events_applied = 0

    # -- reads ----------------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """Position (in the node's delivery order) of the last log entry applied."""
        return self._position

    def tables(self) -> list[TableInfo]:
        """The configured tables, sorted by name (without `_config`)."""
        return [self._tables[name] for name in sorted(self._tables)]

    def table(self, name: str) -> TableInfo:
        """The table called `name`: InvalidArgument for a bad name, NotFound if unknown."""
        check_name(name, "table")
        if name == CONFIG_TABLE:
            return CONFIG_INFO
        info = self._tables.get(name)
        if info is None:
            raise NotFound(f"No such table '{name}'")
        return info

    def state(self, crdt: CrdtType, table: str, key: str) -> JSON | None:
        """The stored state of a key for a type (as JSON), or None."""
        return to_json(self._stored(state_key(crdt, table, key)))

    def _stored(self, skey: bytes) -> Stored | None:
        cached = self._cache.get(skey, _MISSING)
        if cached is not _MISSING:
            return cast(Stored, cached)
        raw = self._store.get(skey)
        return None if raw is None else decode(raw)

    def get_text(self, table: str, key: str) -> bytes:
        """The key's value as REST answers it (`json_text`): InvalidArgument for a bad name, NotFound
        if the table or the key does not exist. Kept for the next read of the key until it changes
        (reads of a key far outnumber its writes)."""
        crdt, skey = self._state_key(table, key)
        text = self._texts.get(skey)
        if text is None:
            text = json_text(_shown(crdt, self._existing(skey, key)))
            if len(text) <= _TEXT_BYTES:
                if len(self._texts) >= _TEXTS:
                    self._texts.clear()
                self._texts[skey] = text
        return text

    def get_message(self, table: str, key: str) -> tuple[CrdtType, Value]:
        """The table's type and the key's value as a Value (an LWW value is kept as one: no
        conversion): InvalidArgument for a bad name, NotFound if the table or the key does not exist."""
        crdt, stored = self._get_stored(table, key)
        if isinstance(stored, LwwRecord):
            return crdt, stored.message()
        return crdt, to_value(value(crdt, stored))

    def _get_stored(self, table: str, key: str) -> tuple[CrdtType, Stored]:
        crdt, skey = self._state_key(table, key)
        return crdt, self._existing(skey, key)

    def _state_key(self, table: str, key: str) -> tuple[CrdtType, bytes]:
        """The table's type and the key's state key: InvalidArgument for a bad name, NotFound if the
        table does not exist."""
        check_name(table, "table")
        check_name(key, "key")  # a bad name is a 400 whether or not the table exists
        info = self.table(table)
        return info.crdt, state_key(info.crdt, table, key)

    def _existing(self, skey: bytes, key: str) -> Stored:
        stored = self._stored(skey)
        if stored is None:
            raise NotFound(f"No such key '{key}'")
        return stored

    def keys(self, table: str, after: str = "", limit: int | None = None) -> list[str]:
        """The table's keys in name order, those after `after`, at most `limit` of them."""
        return [k for k, _ in self.items(table, after, limit, states=False)]

    def items(
        self, table: str, after: str = "", limit: int | None = None, *, states: bool = True
    ) -> Iterator[tuple[str, JSON]]:
        """(key, value) of the table's keys in name order (value None when `states` is False)."""
        info = self.table(table)
        prefix = table_prefix(info.crdt, table)
        start = prefix + after.encode() + b"\x00" if after else prefix
        n = len(prefix)
        for k, raw in self._store.scan(start, prefix_end(prefix), limit=limit):
            yield k[n:].decode(), _shown(info.crdt, decode(raw)) if states else None

    # -- writes ---------------------------------------------------------------------------------

    def plan_reads_state(self, table: str) -> bool:
        """Whether `plan_write` reads a key's state to plan a write to `table`: it does for every
        table type but LWW (an OR-Set remove names the adds it saw, a counter checks its sum stays
        exact...), also for a table not known here (its candidate types' states), not for `_config`."""
        if table == CONFIG_TABLE:
            return False
        info = self._tables.get(table)
        return info is None or info.crdt is not CrdtType.LWW

    def plan_write(
        self, table: str, key: str, op: str, change: JSON, *, has_change: bool = True
    ) -> PlannedWrite:
        """Validate a client's write and build its event. InvalidArgument says what is wrong."""
        check_name(table, "table")
        check_name(key, "table" if table == CONFIG_TABLE else "key")  # a _config key names a table
        if not op:
            raise InvalidArgument(f"the request needs an 'op' (one of: {_ALL_OPS})")
        if not has_change and op != "create":
            raise InvalidArgument(f"op {quoted(op)} needs a 'change'")
        if not has_change:
            change = {}
        elif op in _ELEMENT_OPS:
            # An element's item as every node reads it from the log, where numbers are doubles: a
            # client's `1.0` names the `1` the state holds (crdts compares items by their JSON).
            change = as_sent(change)
        if table == CONFIG_TABLE:
            return self._plan_config(key, op, change)
        info = self._tables.get(table)
        asked = op, change  # as the client put it, for error messages
        if (info is None or info.crdt is CrdtType.PNCOUNTER) and op in _OPPOSITE:
            op, change = _counter_op(op, change)
        if info is None:
            return self._plan_unknown_table(table, key, op, change, asked)
        # An LWW set needs no observed context: its state is not read (see plan_reads_state).
        state = None if info.crdt is CrdtType.LWW else self.state(info.crdt, table, key)
        try:
            payload = prepare(info.crdt, state, op, change)
        except InvalidOperation as exc:
            raise InvalidArgument(f"table {table!r}: {exc}") from None
        if info.crdt is CrdtType.PNCOUNTER:
            _check_exact_counter(table, state, op, change, asked)
        deps = dict.fromkeys([info.config_id, *causal_dependencies(info.crdt, state, payload)])
        return PlannedWrite(
            KvEvent(table, key, info.crdt, op, payload), tuple(deps)[:MAX_DEPENDENCIES], pending=False
        )

    def _plan_config(self, name: str, op: str, change: JSON) -> PlannedWrite:
        if name == CONFIG_TABLE:
            raise InvalidArgument(f"{CONFIG_TABLE!r} is built in: it cannot be configured")
        if op != "set":
            raise InvalidArgument(
                f'the {CONFIG_TABLE} table takes only op \'set\' (with a change like {{"crdt": "LWW"}}), not {quoted(op)}'
            )
        if not isinstance(change, dict) or set(change) != {"crdt"}:
            raise InvalidArgument(
                f'a {CONFIG_TABLE} change must be an object like {{"crdt": "LWW"}} '
                f"(types: {', '.join(c.value for c in CrdtType)})"
            )
        try:
            CrdtType.parse(change["crdt"])
            payload = prepare(CrdtType.LWW, None, "set", change)
        except InvalidOperation as exc:
            raise InvalidArgument(f"{CONFIG_TABLE} {name!r}: {exc}") from None
        return PlannedWrite(KvEvent(CONFIG_TABLE, name, CrdtType.LWW, op, payload), (), pending=False)

    def _plan_unknown_table(
        self, table: str, key: str, op: str, change: JSON, asked: tuple[str, JSON]
    ) -> PlannedWrite:
        types = TYPES_OF_OP.get(op)
        if types is None:
            raise InvalidArgument(f"unknown op {quoted(op)} (valid ops: {_ALL_OPS})")
        errors = []
        for crdt in types:
            try:
                prepare(crdt, None, op, change)
                break
            except InvalidOperation as exc:
                errors.append(str(exc))
        else:
            raise InvalidArgument(f"table {table!r} (not known here yet): {'; '.join(errors)}")
        if op in ("increment", "decrement"):
            # Against this node's counter state for the key: its earlier writes count, as they would
            # once the table is known.
            _check_exact_counter(table, self.state(CrdtType.PNCOUNTER, table, key), op, change, asked)
        # This node has applied its earlier writes to the key (and those of other nodes that did not
        # know the table either) to every candidate type: their tags are the write's observed context.
        observed: dict[str, None] = {}
        deps: dict[str, None] = {}
        for crdt in types:
            state = self.state(crdt, table, key)
            try:
                payload = prepare(crdt, state, op, change)
            except InvalidOperation:
                continue
            observed.update(dict.fromkeys(observed_tags(payload)))
            deps.update(dict.fromkeys(causal_dependencies(crdt, state, payload)))
        event = KvEvent(table, key, None, op, change, tuple(sorted(observed)))
        return PlannedWrite(event, tuple(deps)[:MAX_DEPENDENCIES], pending=True)

    # -- applying the log -----------------------------------------------------------------------

    def _cache_written(self, writes: list[Write], states: dict[bytes, Stored]) -> None:
        """Keep the states just written (each no bigger than _CACHE_STATE_BYTES serialized) in the
        cache, replacing what it held for their keys; empty it when it grows past its limits."""
        cache, sizes = self._cache, self._cache_sizes
        total = self._cache_bytes
        for k, blob in writes:
            total -= sizes.pop(k, 0)
            size = len(blob or b"")
            if size <= _CACHE_STATE_BYTES:
                cache[k] = states[k]
                sizes[k] = size
                total += size
            else:
                cache.pop(k, None)
        self._cache_bytes = total
        if len(cache) > _CACHE_STATES or total > _CACHE_BYTES:
            self._forget_cache()

    def _forget_cache(self) -> None:
        self._texts.clear()
        self._cache.clear()
        self._cache_sizes.clear()
        self._cache_bytes = 0

    def apply_batch(
        self,
        batch: Sequence[tuple[int, Entry]],
        blobs: Sequence[bytes] | None = None,
        skip: AbstractSet[int] = frozenset(),
        last: int | None = None,
    ) -> None:
        """Apply delivered log entries (in delivery order, after `position`) and store the changed
        states together with the new cursor in one write. Entries that are not KV events are skipped:
        given the entries serialized (`blobs`, in the same order), most of them without reading them.
        So are the entries at the positions in `skip`. `last`: the position the batch reaches, if
        beyond its last entry (the entries after it were delivered and are not KV events). EventFailed if an entry fails in another way
        than being an invalid event (nothing is written then).

        This is the rebuild hot path: entry data is read straight from its protobuf Struct (only the
        change is converted to JSON), states are read at most once per batch (and kept across batches
        in a bounded cache), and LWW sets (also the LWW candidate of a set made where its table was
        not known) are compared without the generic CRDT machinery and keep their entry, as it was
        serialized, as the key's state (an `LwwRecord`). A write made where its table was not known
        is applied to its other candidate types by `crdts.apply_change`, its change checked once."""
        if batch:
            last = max(batch[-1][0], last or 0)
        if last is None or last <= self._position:
            return
        if blobs is not None and b"".join(blobs).find(EVENT_MARK) < 0:
            batch, blobs = (), ()  # no KV event (one search in C), but the cursor moves on
        states: dict[bytes, Stored] = {}
        cache = self._cache
        get = self._store.get

        def read(skey: bytes) -> bytes | None:
            try:
                return get(skey)
            except Exception as exc:  # the store failing: no fault of the entry, never skipped for it
                raise _StoreFailed(exc) from exc

        lww_prefixes = self._lww_prefixes
        applied = 0
        floor = self._position
        # Each entry with its serialized form, when given: an LWW set keeps it as the key's state.
        pairs = zip(batch, itertools.repeat(None)) if blobs is None else zip(batch, blobs, strict=True)
        for (position, entry), blob in pairs:
            if position <= floor:
                continue  # already applied (a subscription resumed from an older cursor)
            if position in skip:
                log.error(
                    "skipping the log entry %s at position %d: KV could not apply it", entry.id, position
                )
                continue
            try:
                if blob is not None and blob.find(EVENT_MARK) < 0:
                    continue  # not a KV event (see potboiler.server.log_delivered.DeliveredBatch.marked), and not read
                # Data that is not a Struct reads as an empty one (without changing the entry).
                event = _event_of_fields(entry.data.struct_value.fields)
                if event is None:
                    continue
                table, key, crdt, op, change, observed = event
                lww_done = False
                # An LWW set, and the LWW candidate of a set written where its table was not known
                # (its change is the value), keep their entry as the key's state (see _lww_set).
                if op == "set" and (crdt is None or (crdt is _LWW and _is_set_payload(change))):
                    prefix = lww_prefixes.get(table)
                    if prefix is None:
                        prefix = lww_prefixes[table] = table_prefix(_LWW, table)
                    skey = prefix + key.encode()
                    state = states[skey] if skey in states else cache.get(skey, _MISSING)
                    if state is _MISSING:
                        raw = read(skey)
                        state = None if raw is None else decode(raw)
                    new = _lww_set(state, entry, blob)
                    if new is not _MISSING:
                        if new is not state:
                            states[skey] = new
                        if crdt is _LWW:
                            applied += 1
                            continue
                        lww_done = True
                ctx = _context(entry)
                raw_change = from_value(change)
                # A write made where its table was not known applies, prepared as every node does
                # (against nothing, with its observed context), to each type whose ops include its op.
                for each in TYPES_OF_OP[op] if crdt is None else (crdt,):
                    if lww_done and each is _LWW:
                        continue
                    skey = state_key(each, table, key)
                    state = states[skey] if skey in states else cache.get(skey, _MISSING)
                    if state is _MISSING:
                        raw = read(skey)
                        state = None if raw is None else decode(raw)
                    state = to_json(state)
                    try:
                        if crdt is None:
                            new = apply_change(each, state, op, raw_change, observed, ctx)
                        else:
                            new = apply(each, state, raw_change, ctx)
                    except InvalidOperation as exc:
                        log.warning("skipping KV event %s (%s/%s): %s", entry.id, table, key, exc)
                        continue
                    if new is not state:
                        states[skey] = new
                applied += 1
            except _StoreFailed as failed:
                raise failed.error from None  # the store's own error, for the applier to retry
            except Exception as exc:  # not an invalid event (those are skipped above): a bug, a damaged state
                raise EventFailed(position, entry.id) from exc

        writes: list[Write] = [(k, encode(state)) for k, state in states.items()]
        writes.append((CURSOR_KEY, _U64.pack(last)))
        try:
            self._store.write(writes)
        except BaseException:
            self._forget_cache()  # it may hold states that were not written
            raise
        texts = self._texts
        for k in states:
            texts.pop(k, None)
        self._cache_written(writes[:-1], states)
        self._position = last
        self.events_applied += applied
        for k, state in states.items():
            if k.startswith(_CONFIG_PREFIX):
                name = k[len(_CONFIG_PREFIX) :].decode()
                info = _table_of_config(name, to_json(state))
                if info is None:
                    self._tables.pop(name, None)
                else:
                    self._tables[name] = info


#: What every KV event's serialized entry holds (see `potboiler.server.log_delivered.DeliveredBatch.marked`): the key "table"
#: of its data's Struct, as a map entry's key (field 1) is written.
EVENT_MARK = b"\n\x05table"
_MISSING: Any = object()
_LWW = CrdtType.LWW
#: Most states kept decoded in memory across batches, the most (serialized) bytes of them, and the
#: largest one kept. The cache is emptied when it grows past a limit.
_CACHE_STATES = 50_000
_CACHE_BYTES = 8 << 20
_CACHE_STATE_BYTES = 2048
#: Most values kept as JSON text for reads, and the largest one kept (see `KvState.get_text`): at most
#: 40 MiB. Emptied when full.
_TEXTS = 10_000
_TEXT_BYTES = 4096
_new_record = tuple.__new__
#: The ops whose change names a set's element (OR-Set and G-Set).
_ELEMENT_OPS = frozenset({"add", "remove"})
#: A PN-Counter's ops, each with the other.
_OPPOSITE = {"increment": "decrement", "decrement": "increment"}
_NAMES: dict[str, bool] = {}


def _valid_name(name: str) -> bool:
    ok = _NAMES.get(name)
    if ok is None:
        ok = is_name(name)
        if len(_NAMES) < 100_000:
            _NAMES[name] = ok
    return ok


def _event_of_fields(
    fields: Any,
) -> tuple[str, str, CrdtType | None, str, Value, tuple[str, ...]] | None:
    """(table, key, crdt, op, change, observed) of an entry's data if it is a KV event (see
    potboiler.kv.events), else None. `fields` is the data's Struct map."""
    count = len(fields)
    if count != 5 and count != 6:
        return None
    # `in`, then `[]`: cheaper than `get` (and `[]` alone would add a missing key to the map).
    if not (
        "table" in fields and "key" in fields and "crdt" in fields and "op" in fields and "change" in fields
    ):
        return None
    table, key, crdt, op, change = (
        fields["table"],
        fields["key"],
        fields["crdt"],
        fields["op"],
        fields["change"],
    )
    t, k, o = table.string_value, key.string_value, op.string_value
    # The names' memo looked up here, not through _valid_name: two calls fewer per event.
    if not ((_NAMES.get(t) or _valid_name(t)) and (_NAMES.get(k) or _valid_name(k))) or o not in TYPES_OF_OP:
        return None
    name = crdt.string_value
    if name:
        c = CRDT_BY_NAME.get(name)
        return None if c is None or count == 6 else (t, k, c, o, change, ())
    if crdt.WhichOneof("kind") != "null_value":
        return None
    if count == 5:
        return t, k, None, o, change, ()
    observed = fields.get("observed")
    if observed is None or observed.WhichOneof("kind") != "list_value":
        return None
    tags = []
    for tag in observed.list_value.values:
        if tag.WhichOneof("kind") != "string_value":
            return None
        tags.append(tag.string_value)
    return t, k, None, o, change, tuple(tags)


def _context(entry: Entry) -> EventContext:
    when = entry.when
    owner = entry.owner
    return EventContext(entry.id, owner, entry.seq, Stamp(when.wall_ms, when.logical, owner))


def _is_set_payload(change: Value) -> bool:
    """Whether an LWW event's change is the payload `crdts.prepare` makes of a set: {"op": "set",
    "value": ...} (anything else takes the generic path, which says what is wrong)."""
    payload = change.struct_value.fields  # empty if the change is not a Struct
    if len(payload) != 2 or not ("op" in payload and "value" in payload):
        return False
    return payload["op"].string_value == "set"


def _lww_set(state: Stored | None, entry: Entry, blob: bytes | None) -> Any:
    """`crdts.apply` of the LWW set of `entry`, for the common case: the new state (an `LwwRecord` of
    the entry, serialized as `blob` if given), `state` itself when the event loses (or is a
    duplicate), or _MISSING when the state is unusual (the caller then takes the generic path, which
    also reports what is wrong)."""
    when = entry.when
    wall, logical = when.wall_ms, when.logical
    if isinstance(state, LwwRecord):
        # Stamps seldom tie: only then are owners and ids compared, which reads the state's entry.
        old_wall, old_logical = state[0], state[1]
        if old_wall != wall or old_logical != logical:
            if old_wall > wall or (old_wall == wall and old_logical > logical):
                return state
        elif state.rank() >= (wall, logical, entry.owner, entry.id):
            return state
    elif state is not None:
        # JSON states are written by crdts: a stamp [wall, logical, owner] and a tag. Anything else
        # (a damaged store) fails the comparison and goes the generic way, which says what is wrong.
        try:
            old = cast(Any, state)["stamp"]
            if (old[0], old[1], old[2], cast(Any, state)["tag"]) >= (wall, logical, entry.owner, entry.id):
                return state
        except (TypeError, KeyError, IndexError):
            return _MISSING
    # tuple.__new__: a NamedTuple's own __new__ is a Python function, a frame per event.
    return _new_record(LwwRecord, (wall, logical, entry.SerializeToString() if blob is None else blob))
