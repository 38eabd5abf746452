"""CRDT operations on one big key: the CPU cost of an op on an OR-Set (and a G-Set, an MV register)
holding many elements, as a KV write and read pay it (prepare on the writing node, apply on every
node, value on each read). No node is started: the pure functions of `potboiler.kv.crdts`.

    .venv/bin/python -m benchmarks.crdt_ops [--elements 4000] [--repeat 20] [--quick]

Prints JSON: milliseconds per prepare (an add of a new element, and a remove of one), apply and value,
per type. An op that walks every element costs in proportion to the size; these figures show how much.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Callable

from potboiler.kv.crdts import JSON, CrdtType, EventContext, Stamp, apply, prepare, value


def _state(crdt: CrdtType, elements: int, owner: str) -> JSON:
    """A state with `elements` elements, built as many adds would build it (without the quadratic
    cost of making them one by one)."""
    adds: dict[str, JSON] = {}
    for i in range(elements):
        adds[str(uuid.UUID(int=i))] = {
            "item": {"n": i, "text": "hello world"},
            "key": f"k{i}",
            "metadata": {"m": i},
            "owner": owner,
            "seq": i + 1,
            "stamp": [1_700_000_000_000 + i, 0, owner],
        }
    if crdt is CrdtType.ORSET:
        return {"vv": {owner: elements}, "adds": adds}
    gset = prepare(crdt, None, "add", {"item": 0, "key": "k"})
    state = apply(crdt, None, gset, EventContext(str(uuid.uuid4()), owner, 1, Stamp(1, 0, owner)))
    for i in range(1, elements):
        change: JSON = {"item": {"n": i}, "key": f"k{i}"}
        ctx = EventContext(str(uuid.uuid4()), owner, i + 1, Stamp(1 + i, 0, owner))
        state = apply(crdt, state, prepare(crdt, state, "add", change), ctx)
    return state


def _ms(run: Callable[[], object], repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        run()
    return round((time.perf_counter() - started) / repeat * 1000, 3)


def measure(crdt: CrdtType, elements: int, repeat: int) -> dict[str, float]:
    """Milliseconds per op on a state of `elements` elements."""
    owner = str(uuid.uuid4())
    state = _state(crdt, elements, owner)
    add: JSON = {"item": {"n": -1}, "key": "new", "metadata": None}
    payload = prepare(crdt, state, "add", add)
    ctx = EventContext(str(uuid.uuid4()), owner, elements + 1, Stamp(2_000_000_000_000, 0, owner))
    figures = {
        "prepare_add_ms": _ms(lambda: prepare(crdt, state, "add", add), repeat),
        "apply_add_ms": _ms(lambda: apply(crdt, state, payload, ctx), repeat),
        "value_ms": _ms(lambda: value(crdt, state), repeat),
    }
    if crdt is CrdtType.ORSET:
        gone: JSON = {"item": {"n": 7, "text": "hello world"}, "key": "k7"}
        figures["prepare_remove_ms"] = _ms(lambda: prepare(crdt, state, "remove", gone), repeat)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--elements", type=int, default=4000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 300 elements, 3 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.elements, args.repeat = 300, 3
    out = {
        "elements": args.elements,
        "ORSET": measure(CrdtType.ORSET, args.elements, args.repeat),
        "GSET": measure(CrdtType.GSET, min(args.elements, 1000), args.repeat),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
