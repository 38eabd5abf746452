"""The nemesis checker's OR-Set checks, on made-up logs and histories: a run that followed the OR-Set
rules passes, and each way of breaking them is named (a checker that passes everything proves nothing)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

from tests.faults.checker import Verdict, check_orsets
from tests.faults.cluster import FaultCluster
from tests.faults.workload import ORSET_TABLE, History, Op

A, B = "node-a", "node-b"
CLUSTER = cast(
    FaultCluster,
    SimpleNamespace(nodes=[SimpleNamespace(node_id=A, index=0), SimpleNamespace(node_id=B, index=1)]),
)


def add(
    tag: str, owner: str, item: str, w: int, n: int, wall: int, supersedes: list[str] | None = None
) -> dict[str, Any]:
    change = {
        "op": "add",
        "item": item,
        "key": item,
        "metadata": {"w": w, "n": n},
        "supersedes": supersedes or [],
    }
    return _entry(
        tag, owner, wall, {"table": ORSET_TABLE, "key": "s0", "crdt": "ORSET", "op": "add", "change": change}
    )


def remove(tag: str, owner: str, item: str, tags: list[str], wall: int) -> dict[str, Any]:
    change = {"op": "remove", "item": item, "key": item, "tags": tags}
    return _entry(
        tag,
        owner,
        wall,
        {"table": ORSET_TABLE, "key": "s0", "crdt": "ORSET", "op": "remove", "change": change},
    )


def _entry(tag: str, owner: str, wall: int, data: dict[str, Any]) -> dict[str, Any]:
    return {"id": tag, "owner": owner, "when": {"wall_ms": str(wall), "logical": 0}, "data": data}


def shown(item: str, w: int, n: int) -> dict[str, Any]:
    return {"item": item, "key": item, "metadata": {"w": w, "n": n}}


def history(*ops: Op) -> History:
    return History(ops=list(ops))


# A on node a adds x (w0 n1); node b saw it and removed it (w1 n2, acknowledged); concurrently node a
# added x again (w0 n3), which b had not seen: add wins, x stays with the re-add's metadata.
ADD_X = add("e1", A, "x", 0, 1, wall=10)
REMOVE_X = remove("e2", B, "x", ["e1"], wall=20)
READD_X = add("e3", A, "x", 0, 3, wall=15, supersedes=["e1"])
LOG_A = [ADD_X, READD_X, REMOVE_X]
LOG_B = [ADD_X, REMOVE_X, READD_X]
OPS = (
    Op("orset-add", 0, 0, 1, key="s0", value="x", outcome="ok"),
    Op("orset-remove", 1, 1, 2, key="s0", value="x", outcome="ok", result={"w": 0, "n": 1}),
    Op("orset-add", 0, 0, 3, key="s0", value="x", outcome="ok"),
)


def run(per_node: list[list[dict[str, Any]]], sets: dict[str, Any], *ops: Op) -> list[str]:
    verdict = Verdict()
    check_orsets(verdict, CLUSTER, history(*ops), per_node, sets)
    return verdict.problems


def test_a_run_by_the_rules_passes() -> None:
    assert run([LOG_A, LOG_B], {"s0": [shown("x", 0, 3)]}, *OPS) == []


def test_an_item_shown_that_the_log_removed_is_named() -> None:
    log = [ADD_X, remove("e2", A, "x", ["e1"], wall=20)]
    ops = (OPS[0], Op("orset-remove", 0, 0, 2, key="s0", value="x", outcome="ok", result={"w": 0, "n": 1}))
    [problem] = run([log, log], {"s0": [shown("x", 0, 1)]}, *ops)
    assert "not what its log spells out" in problem


def test_a_concurrent_add_lost_to_a_remove_is_named() -> None:
    # The re-add was not named by the remove, so x must stay: a state without it broke add-wins.
    [problem] = run([LOG_A, LOG_B], {"s0": []}, *OPS)
    assert "lacks" in problem


def test_stale_metadata_is_named() -> None:
    [problem] = run([LOG_A, LOG_B], {"s0": [shown("x", 9, 9)]}, *OPS)
    assert "other metadata" in problem


def test_an_acknowledged_add_missing_from_the_log_is_named() -> None:
    lost = Op("orset-add", 1, 1, 7, key="s0", value="y", outcome="ok")
    assert any(
        "missing from the log" in p for p in run([LOG_A, LOG_B], {"s0": [shown("x", 0, 3)]}, *OPS, lost)
    )


def test_an_add_nobody_sent_is_named() -> None:
    ghost = add("e9", B, "z", 1, 9, wall=30)
    problems = run([[*LOG_A, ghost], [*LOG_B, ghost]], {"s0": [shown("x", 0, 3), shown("z", 1, 9)]}, *OPS)
    assert any("never sent" in p for p in problems)


def test_a_remove_naming_an_add_its_node_had_not_delivered_is_named() -> None:
    # Node b's remove names e3, which b delivered only after it.
    bad = remove("e2", B, "x", ["e1", "e3"], wall=20)
    problems = run([[ADD_X, READD_X, bad], [ADD_X, bad, READD_X]], {"s0": []}, *OPS)
    assert any("had not delivered before it" in p for p in problems)


def test_a_remove_naming_another_element_is_named() -> None:
    y = add("e4", A, "y", 0, 4, wall=12)
    bad = remove("e2", B, "x", ["e1", "e4"], wall=20)
    ops = (*OPS, Op("orset-add", 0, 0, 4, key="s0", value="y", outcome="ok"))
    problems = run([[ADD_X, y, READD_X, bad], [ADD_X, y, bad, READD_X]], {"s0": [shown("x", 0, 3)]}, *ops)
    assert any("which is not an add of" in p for p in problems)


def test_an_acknowledged_remove_that_left_the_add_it_saw_is_named() -> None:
    empty = remove("e2", B, "x", [], wall=20)
    problems = run([[ADD_X, empty], [ADD_X, empty]], {"s0": [shown("x", 0, 1)]}, *OPS[:2])
    assert any("left the add it saw" in p for p in problems)


def test_more_removes_logged_than_sent_is_named() -> None:
    again = remove("e5", B, "x", [], wall=25)
    problems = run([[*LOG_A, again], [*LOG_B, again]], {"s0": [shown("x", 0, 3)]}, *OPS)
    assert any("beyond those sent" in p for p in problems)
