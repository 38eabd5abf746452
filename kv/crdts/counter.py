"""The PN-Counter (a counter of increments and decrements).

State: ``{"counts": {owner: {"seq": n, "p": <number>, "n": <number>}}}`` — per owner the totals of its
increments (``p``) and decrements (``n``) and the highest seq folded in.
:func:`~potboiler.kv.crdts.dispatch.prepare` refuses an amount that would take the local totals past
:data:`MAX_COUNTER_INT` or the float range; a float total that concurrent writers still push past the
float range is answered as the largest finite float."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

from potboiler.kv.crdts.checks import _int_field, _no_unknown_fields, _obj, _show
from potboiler.kv.crdts.errors import InvalidOperation
from potboiler.kv.crdts.types import EventContext
from potboiler.server.jsonvalue import JSON

MAX_COUNTER_INT = 2**63 - 1
"""Largest integer a PN-Counter amount (and a node's running total) may reach, so states fit int64 JSON."""


@dataclass(frozen=True)
class _PnEntry:
    seq: int
    p: int | float
    n: int | float

    def rank(self) -> tuple[int, int | float, int | float]:
        return (self.seq, self.p, self.n)


def _load_pn(state: JSON | None) -> dict[str, _PnEntry]:
    if state is None:
        return {}
    what = "PN-Counter state"
    out: dict[str, _PnEntry] = {}
    for owner, raw in _obj(_obj(state, what).get("counts"), f"{what} 'counts'").items():
        entry_what = f"{what} count of {owner!r}"
        e = _obj(raw, entry_what)
        p, n = e.get("p"), e.get("n")
        if not isinstance(p, int | float) or isinstance(p, bool):
            raise InvalidOperation(f"{entry_what} needs a number 'p'")
        if not isinstance(n, int | float) or isinstance(n, bool):
            raise InvalidOperation(f"{entry_what} needs a number 'n'")
        out[owner] = _PnEntry(_int_field(e, "seq", entry_what), p, n)
    return out


def _dump_pn(counts: Mapping[str, _PnEntry]) -> JSON:
    return {"counts": {o: {"seq": counts[o].seq, "p": counts[o].p, "n": counts[o].n} for o in sorted(counts)}}


def _sum(numbers: list[int | float]) -> int | float:
    """Exact sum of ints; correctly rounded (hence order-independent) sum as soon as a float is involved."""
    if all(isinstance(x, int) for x in numbers):
        return sum(int(x) for x in numbers)
    try:
        return math.fsum(numbers)
    except OverflowError:  # an intermediate sum overflowed: add exactly, then round
        exact = sum((Fraction(x) for x in numbers), Fraction(0))
        try:
            return float(exact)
        except OverflowError:
            return math.inf if exact > 0 else -math.inf


def _amount(raw: JSON, what: str) -> int | float:
    if not isinstance(raw, int | float) or isinstance(raw, bool):
        raise InvalidOperation(f"{what} must be a number, got {_show(raw)}")
    if not math.isfinite(raw):
        raise InvalidOperation(f"{what} must be a finite number, got {raw}")
    if raw < 0:
        raise InvalidOperation(f"{what} must not be negative, got {raw}")
    if isinstance(raw, int) and raw > MAX_COUNTER_INT:
        raise InvalidOperation(f"{what} is too large (maximum {MAX_COUNTER_INT})")
    return raw


def counter_total(state: JSON | None, op: str, amount: int | float) -> int | Fraction:
    """The exact total of one side of a PN-Counter ``state`` (every owner's increments for ``op``
    ``increment``, else decrements) with ``amount`` added: an int when every number is one, else a
    Fraction (a float sum rounds).  Raises :class:`InvalidOperation` for a state that is not a
    PN-Counter's."""
    counts = _load_pn(state).values()
    numbers = [*(e.p if op == "increment" else e.n for e in counts), amount]
    if all(isinstance(x, int) for x in numbers):
        return sum(int(x) for x in numbers)
    return sum((Fraction(x) for x in numbers), Fraction(0))


def _beyond_floats(total: Fraction) -> bool:
    """Whether ``total`` rounds to a float beyond the finite ones."""
    try:
        float(total)
    except OverflowError:
        return True
    return False


def _pn_prepare(state: JSON | None, op: str, change: JSON) -> JSON:
    what = f"PN-Counter {op!r} amount"
    amount = _amount(change, what)
    total = counter_total(state, op, amount)
    if total > MAX_COUNTER_INT if isinstance(total, int) else _beyond_floats(total):
        raise InvalidOperation(f"{what} {amount} would overflow the counter's {op}s")
    return {"op": op, "amount": amount}


def _pn_apply(state: JSON | None, op: str, payload: dict[str, JSON], ctx: EventContext) -> JSON:
    what = f"PN-Counter {op!r} payload"
    _no_unknown_fields(payload, ("op", "amount"), what)
    return _pn_add(state, op, _amount(payload.get("amount"), f"{what} 'amount'"), ctx)


def _pn_add(state: JSON | None, op: str, amount: int | float, ctx: EventContext) -> JSON:
    counts = _load_pn(state)
    current = counts.get(ctx.owner, _PnEntry(0, 0, 0))
    if state is not None and ctx.seq <= current.seq:
        return state
    p, n = (current.p + amount, current.n) if op == "increment" else (current.p, current.n + amount)
    if not all(math.isfinite(x) for x in (p, n) if isinstance(x, float)):
        # Only an event appended past the API's checks (straight to the log) gets here. Its owner's
        # total is the same on every node, so every node skips it alike.
        raise InvalidOperation(
            f"PN-Counter {op!r} amount {amount} takes {ctx.owner}'s total beyond any number"
        )
    counts[ctx.owner] = _PnEntry(ctx.seq, p, n)
    return _dump_pn(counts)


def _pn_merge(a: JSON, b: JSON) -> JSON:
    counts = _load_pn(a)
    for owner, entry in _load_pn(b).items():
        current = counts.get(owner)
        if current is None or entry.rank() > current.rank():
            counts[owner] = entry
    return _dump_pn(counts)


def _pn_value(state: JSON | None) -> JSON:
    counts = _load_pn(state).values()
    total = _sum([e.p for e in counts] + [-e.n for e in counts])
    # Concurrent writers can push a float total past the float range; answer the nearest JSON number.
    return max(-sys.float_info.max, min(sys.float_info.max, total)) if isinstance(total, float) else total
