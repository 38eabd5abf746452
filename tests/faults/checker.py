"""The checker of a nemesis run, in the manner of Jepsen's set checker, and the figures it reports.

After the cluster is healed and quiet, every node's whole log is read through the subscription from
position 0 and its KV and Pigtail state through REST, and compared with the history:

- log: every acknowledged append is present on every node (lost = 0); nothing is present that was never
  attempted, nor anything whose request certainly failed (invented = 0); each entry id is delivered
  once per node and each append appears under one id only (duplicated = 0); all nodes hold the same
  entries, heads and version vectors;
- KV: every node shows the same tables, keys and values; each counter is the sum of its
  acknowledged changes plus some of those whose outcome is unknown (equal to the acknowledged sum
  when none is unknown); each LWW key with an acknowledged write has a value, one
  that was written, and the write with the greatest (HLC stamp, owner) among those in the log; each
  OR-Set is exactly what its log spells out by OR-Set rules (items and metadata), every acknowledged
  add is in the log, removes name only adds of their element their node had delivered before them,
  and an acknowledged remove took away the add its node had shown;
- Pigtail: every acknowledged task is done on every node (at least once), all nodes show the same
  task views (states, attempts, leases) and no open task, and no task is present that was never added;
  a task whose done a worker had acknowledged was done by that (not by the drain), no node accepted a
  claim after acknowledging the task's done, and no task counts more attempts than the queue allows
  (releases count, heartbeats do not, a retry of a dead-lettered task resets them);
- every kind of operation was acknowledged at least once (else its checks ran on nothing).
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.faults.cluster import FaultCluster
from tests.faults.workload import (
    COUNTER_TABLE,
    LWW_TABLE,
    ORSET_TABLE,
    QUEUE,
    QUEUE_MAX_ATTEMPTS,
    History,
    Op,
)

#: Name of the user property (and report section) figures are recorded under.
FIGURES_PROPERTY = "figures"


@dataclass
class Verdict:
    """The checker's findings: figures for the report, problems for the assertion."""

    figures: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def expect(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)


def percentile_summary(samples: Sequence[float]) -> dict[str, Any]:
    """p50 / max / count of durations in seconds (rounded to ms)."""
    if not samples:
        return {"p50": None, "max": None, "samples": 0}
    return {
        "p50": round(statistics.median(samples), 3),
        "max": round(max(samples), 3),
        "samples": len(samples),
    }


def report_figures(
    figures: dict[str, Any], directory: Path, record_property: Any, name: str = "figures.json"
) -> str:
    """Print the figures as one JSON line, write them to `directory/name`, and attach them to the test
    report (user property `figures`, shown in the terminal summary). Returns the line."""
    line = json.dumps(figures, sort_keys=True)
    print(line)
    (directory / name).write_text(line + "\n")
    record_property(FIGURES_PROPERTY, line)
    return line


def _strings(value: Any) -> Iterator[str]:
    """Every string anywhere inside a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _stamp(entry: dict[str, Any]) -> tuple[int, int, str]:
    when = entry.get("when", {})
    return (int(when.get("wall_ms", 0)), int(when.get("logical", 0)), str(entry["owner"]))


def check_log(
    verdict: Verdict, cluster: FaultCluster, history: History, tag: str
) -> list[list[dict[str, Any]]]:
    """The log checks; returns every node's entries (for the KV and Pigtail checks)."""
    per_node = [cluster.entries(n.index) for n in cluster.nodes]
    vectors = cluster.vectors()
    heads = [cluster.heads(n.index) for n in cluster.nodes]
    attempted = {(o.writer, o.n): o for o in history.of("append")}
    acked = {k for k, o in attempted.items() if o.outcome == "ok"}
    failed = {k for k, o in attempted.items() if o.outcome == "fail"}
    lost_total = dup_total = invented_total = 0
    unknown_present = 0
    for node, entries in zip(cluster.nodes, per_node, strict=True):
        ids = [e["id"] for e in entries]
        dup_ids = len(ids) - len(set(ids))
        ours = Counter(
            (e["data"]["w"], e["data"]["n"])
            for e in entries
            if isinstance(e.get("data"), dict) and e["data"].get("nemesis") == tag
        )
        present = set(ours)
        dup_values = sum(c - 1 for c in ours.values())
        lost = acked - present
        invented = (present - set(attempted)) | (present & failed)
        lost_total += len(lost)
        dup_total += dup_ids + dup_values
        invented_total += len(invented)
        unknown_present = max(unknown_present, len(present - acked - failed))
        verdict.expect(
            not lost, f"{node.name}: {len(lost)} acknowledged appends lost, e.g. {sorted(lost)[:5]}"
        )
        verdict.expect(
            not invented,
            f"{node.name}: {len(invented)} appends present that were never made or failed: {sorted(invented)[:5]}",
        )
        verdict.expect(dup_ids == 0, f"{node.name}: {dup_ids} entry ids delivered more than once")
        verdict.expect(dup_values == 0, f"{node.name}: {dup_values} appends present under more than one id")
        total = sum(vectors[node.index].values())
        verdict.expect(
            total == len(set(ids)),
            f"{node.name}: vector counts {total} entries, subscription gave {len(set(ids))}",
        )
    id_sets = [sorted(e["id"] for e in entries) for entries in per_node]
    verdict.expect(
        all(s == id_sets[0] for s in id_sets),
        f"nodes hold different entries: counts {[len(s) for s in id_sets]}",
    )
    verdict.expect(all(h == heads[0] for h in heads), "GET /log heads differ between nodes")
    verdict.expect(all(v == vectors[0] for v in vectors), "version vectors differ between nodes")
    verdict.figures["log"] = {
        "entries_per_node": len(id_sets[0]),
        "appends_acknowledged": len(acked),
        "lost": lost_total,
        "duplicated": dup_total,
        "invented": invented_total,
        "unacknowledged_present": unknown_present,
    }
    return per_node


def kv_dump(cluster: FaultCluster, i: int) -> dict[str, dict[str, Any]]:
    """Every table, key and value of node i's KV store."""
    kv = cluster.nodes[i].kv_url
    out: dict[str, dict[str, Any]] = {}
    for table in cluster.get(f"{kv}/kv"):
        out[table] = {key: cluster.get(f"{kv}/kv/{table}/{key}") for key in cluster.get(f"{kv}/kv/{table}")}
    return out


def _normal(value: Any) -> Any:
    """A JSON value with lists of objects sorted, so set-like answers compare by content."""
    if isinstance(value, list):
        items = [_normal(v) for v in value]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    return value


def check_kv(
    verdict: Verdict, cluster: FaultCluster, history: History, per_node: list[list[dict[str, Any]]]
) -> None:
    """The KV checks (see the module docstring)."""
    entries = per_node[0]
    dumps = [_normal(kv_dump(cluster, n.index)) for n in cluster.nodes]
    verdict.expect(all(d == dumps[0] for d in dumps), "KV state differs between nodes")
    state = dumps[0]
    figures: dict[str, Any] = {}
    # Counters: the acknowledged sum, plus any of the changes whose outcome is unknown.
    exact = bounded = 0
    for key, value in sorted(state.get(COUNTER_TABLE, {}).items()):
        ops = [o for o in history.of("incr") if o.key == key]
        acked = sum(o.value for o in ops if o.outcome == "ok")
        unknown = [o.value for o in ops if o.outcome == "info"]
        low, high = acked + sum(v for v in unknown if v < 0), acked + sum(v for v in unknown if v > 0)
        verdict.expect(
            low <= value <= high,
            f"counter {key} is {value}; acknowledged changes sum to {acked}, unknown ones {unknown}",
        )
        exact += value == acked
        bounded += 1
    for key in {o.key for o in history.of("incr", outcome="ok")} - set(state.get(COUNTER_TABLE, {})):
        verdict.problems.append(f"counter {key} has acknowledged increments but no value")
    figures["counters"] = bounded
    figures["counters_equal_to_acknowledged_sum"] = exact
    figures["increments_acknowledged"] = len(history.of("incr", outcome="ok"))
    figures["increments_unknown"] = len(history.of("incr", outcome="info"))
    # LWW: a value that was written, and the greatest (stamp, owner) among the sets in the log.
    lww_ok = 0
    for key, value in sorted(state.get(LWW_TABLE, {}).items()):
        # (Not those that certainly failed: refused with a 4xx before anything was appended, or
        # never sent.)
        written = {o.value for o in history.of("lww") if o.key == key and o.outcome != "fail"}
        verdict.expect(value in written, f"LWW {key} is {value!r}, which was never written")
        candidates = [
            (_stamp(e), s)
            for e in entries
            if isinstance(e.get("data"), dict)
            and e["data"].get("table") == LWW_TABLE
            and e["data"].get("key") == key
            for s in _strings(e["data"].get("change"))
            if s in written
        ]
        verdict.expect(bool(candidates), f"LWW {key} is {value!r}, but no write of it is in the log")
        if candidates:
            winner = max(candidates)[1]
            verdict.expect(
                value == winner, f"LWW {key} is {value!r}, but the latest write in the log is {winner!r}"
            )
            lww_ok += value == winner
        # The latest by stamps is the latest in time for writes one after the other: a writer's
        # acknowledged set is stamped after its previous acknowledged set of the key.
        stamped = {s: stamp for stamp, s in candidates}
        last: dict[int, Op] = {}
        for o in sorted((o for o in history.of("lww", outcome="ok") if o.key == key), key=lambda o: o.start):
            before = last.get(o.writer)
            if before is not None and before.end < o.start:
                earlier, later = stamped.get(before.value), stamped.get(o.value)
                verdict.expect(
                    earlier is not None and later is not None and earlier < later,
                    f"LWW {key}: {o.value!r} was written after {before.value!r} but is not stamped after it",
                )
            last[o.writer] = o
    for key in {o.key for o in history.of("lww", outcome="ok")} - set(state.get(LWW_TABLE, {})):
        verdict.problems.append(f"LWW {key} has acknowledged writes but no value")
    figures["lww_keys"] = len(state.get(LWW_TABLE, {}))
    figures["lww_latest_write_wins"] = lww_ok
    figures.update(check_orsets(verdict, cluster, history, per_node, state.get(ORSET_TABLE, {})))
    verdict.figures["kv"] = figures


@dataclass
class OrSetEvent:
    """An OR-Set add or remove as the log holds it."""

    tag: str
    owner: str
    op: str
    key: str
    item: Any
    metadata: Any
    #: The adds it takes away (a remove) or replaces (an add).
    named: list[str]
    stamp: tuple[int, int, str]


def orset_events(entries: Sequence[dict[str, Any]]) -> dict[str, OrSetEvent]:
    """The workload's OR-Set adds and removes in a node's log, by tag (entry id), in its delivery order."""
    out: dict[str, OrSetEvent] = {}
    for e in entries:
        data = e.get("data")
        if (
            not isinstance(data, dict)
            or data.get("table") != ORSET_TABLE
            or data.get("op") not in ("add", "remove")
        ):
            continue
        raw = data.get("change")
        change: dict[str, Any] = raw if isinstance(raw, dict) else {}
        # A write made before its node knew the table carries the client's change and "observed".
        named = change.get("tags", change.get("supersedes", data.get("observed", [])))
        out[e["id"]] = OrSetEvent(
            e["id"],
            str(e["owner"]),
            data["op"],
            str(data.get("key")),
            change.get("item"),
            change.get("metadata"),
            list(named or []),
            _stamp(e),
        )
    return out


def check_orsets(
    verdict: Verdict,
    cluster: FaultCluster,
    history: History,
    per_node: list[list[dict[str, Any]]],
    sets: dict[str, Any],
) -> dict[str, Any]:
    """The OR-Set checks. The state must be the one the log spells out by OR-Set rules (an add lives
    until a remove or a later add of its element names it); every acknowledged add is in the log, and
    an add whose entry lives shows; removes name only adds of their element that their node had
    delivered, and an acknowledged remove took away the add its node had shown; nothing is in the log
    that no writer sent. Returns figures."""
    events = orset_events(per_node[0])
    adds = {t: ev for t, ev in events.items() if ev.op == "add"}
    named = {t for ev in events.values() for t in ev.named}
    alive = {t: ev for t, ev in adds.items() if t not in named}
    # The model: per key, each element of a live add, with the metadata of its newest live add.
    model: dict[str, dict[str, OrSetEvent]] = {}
    for ev in alive.values():
        current = model.setdefault(ev.key, {}).get(json.dumps(ev.item, sort_keys=True))
        if current is None or (ev.stamp[:2], ev.tag) > (current.stamp[:2], current.tag):
            model[ev.key][json.dumps(ev.item, sort_keys=True)] = ev
    for key in sorted(set(sets) | set(model)):
        shown = sets.get(key, [])
        got = (
            {json.dumps(e.get("item"), sort_keys=True): e.get("metadata") for e in shown}
            if isinstance(shown, list)
            else {}
        )
        want = {element: ev.metadata for element, ev in model.get(key, {}).items()}
        verdict.expect(
            got == want,
            f"OR-Set {key} is not what its log spells out: shows {sorted(set(got) - set(want))[:5]} it should not, "
            f"lacks {sorted(set(want) - set(got))[:5]}, other metadata for "
            f"{sorted(k for k in set(got) & set(want) if got[k] != want[k])[:5]}",
        )
    # Each add carries unique metadata {"w", "n"}: find each operation's entry.
    by_op = {
        (ev.metadata.get("w"), ev.metadata.get("n")): ev
        for ev in adds.values()
        if isinstance(ev.metadata, dict)
    }
    attempted = {(o.writer, o.n): o for o in history.of("orset-add")}
    lost = [k for k, o in attempted.items() if o.outcome == "ok" and k not in by_op]
    verdict.expect(not lost, f"acknowledged OR-Set adds missing from the log: {lost[:5]}")
    invented = [k for k in by_op if k not in attempted or attempted[k].outcome == "fail"]
    verdict.expect(not invented, f"OR-Set adds in the log that were never sent or failed: {invented[:5]}")
    # Removes: only adds of their own element, delivered on their node before them.
    index = {n.node_id: n.index for n in cluster.nodes}
    positions = [{e["id"]: p for p, e in enumerate(entries)} for entries in per_node]
    removes = [ev for ev in events.values() if ev.op == "remove"]
    for ev in removes + [a for a in adds.values() if a.named]:
        at = positions[index[ev.owner]] if ev.owner in index else {}
        for tag in ev.named:
            target = adds.get(tag)
            verdict.expect(
                target is not None and target.key == ev.key and target.item == ev.item,
                f"OR-Set {ev.op} {ev.tag} names {tag}, which is not an add of {ev.key}/{ev.item!r}",
            )
            verdict.expect(
                tag in at and at[tag] < at.get(ev.tag, -1),
                f"OR-Set {ev.op} {ev.tag} names {tag}, which its node had not delivered before it",
            )
    sent: Counter[tuple[int, str, Any]] = Counter(
        (o.writer, o.key, o.value) for o in history.of("orset-remove") if o.outcome != "fail"
    )
    logged = Counter((index.get(ev.owner, -1), ev.key, ev.item) for ev in removes)
    extra = [k for k, c in logged.items() if c > sent[k]]
    verdict.expect(not extra, f"OR-Set removes in the log beyond those sent: {extra[:5]}")
    # An acknowledged remove took away the add its node showed (the newest of the element there).
    for o in history.of("orset-remove", outcome="ok"):
        seen = by_op.get((o.result.get("w"), o.result.get("n"))) if isinstance(o.result, dict) else None
        verdict.expect(
            seen is not None and seen.tag not in alive,
            f"OR-Set {o.key}: the remove of {o.value!r} by w{o.writer} (acknowledged) left the add it saw",
        )
    return {
        "orset_items": sum(len(v) for v in model.values()),
        "orset_adds_acknowledged": len(history.of("orset-add", outcome="ok")),
        "orset_readds": sum(1 for o in history.of("orset-add") if not o.value.endswith(f"-{o.writer}-{o.n}")),
        "orset_removes_acknowledged": len(history.of("orset-remove", outcome="ok")),
        "orset_removes_of_others_adds": sum(
            1
            for o in history.of("orset-remove", outcome="ok")
            if isinstance(o.result, dict) and o.result.get("w") != o.writer
        ),
        "orset_adds_alive": len(alive),
    }


def task_views(cluster: FaultCluster, i: int, task_ids: Sequence[str]) -> dict[str, Any]:
    """Node i's REST view of each task."""
    url = cluster.nodes[i].pigtail_url
    return {t: cluster.get(f"{url}/queue/{QUEUE}/{t}?verbose=true") for t in task_ids}


def check_queue(
    verdict: Verdict, cluster: FaultCluster, history: History, entries: list[dict[str, Any]], drained: int
) -> None:
    """The Pigtail checks (see the module docstring)."""
    acked = sorted({o.result for o in history.of("task-add", outcome="ok")})
    views = [task_views(cluster, n.index, acked) for n in cluster.nodes]
    verdict.expect(all(v == views[0] for v in views), "task views differ between nodes")
    not_done = [t for t, v in views[0].items() if v.get("state") != "done"]
    verdict.expect(not not_done, f"{len(not_done)} acknowledged tasks are not done: {not_done[:5]}")
    for node in cluster.nodes:
        listing = cluster.get(f"{node.pigtail_url}/queue/{QUEUE}")
        verdict.expect(listing == {}, f"{node.name} still lists open tasks: {list(listing)[:5]}")
    names = {o.value for o in history.of("task-add")}
    in_log = {
        s
        for e in entries
        if isinstance(e.get("data"), dict) and "pigtail" in e["data"]
        for s in _strings(e["data"]["pigtail"])
        if s.startswith("t-") and s.count("-") == 2
    }
    invented = in_log - names
    verdict.expect(not invented, f"tasks in the log that were never added: {sorted(invented)[:5]}")
    # A worker's acknowledged done is the task's first (the drain completes only tasks not done).
    by_workers = {o.key for o in history.of("task-done", outcome="ok")}
    redone = sorted(t for t in by_workers if views[0].get(t, {}).get("done_by") == "drain")
    verdict.expect(not redone, f"tasks whose acknowledged done was lost (the drain did them): {redone[:5]}")
    # Done is final, and a node shows its own writes: it refuses claims once it has answered a done.
    dones = {(o.node, o.key): o.end for o in reversed(history.of("task-done", outcome="ok"))}
    late = [
        o.key
        for o in history.of("task-claim", outcome="ok")
        if (o.node, o.key) in dones and o.start > dones[o.node, o.key]
    ]
    verdict.expect(not late, f"claims accepted after the same node acknowledged a done: {late[:5]}")
    # Attempts are counted once per winning claim, and a dead-lettered task takes no claim until a
    # retry resets them: no task shows more than the queue allows.
    over = sorted(t for t, v in views[0].items() if int(v.get("attempts", 0)) > QUEUE_MAX_ATTEMPTS)
    verdict.expect(not over, f"tasks with more attempts than max_attempts {QUEUE_MAX_ATTEMPTS}: {over[:5]}")
    claimers: dict[str, set[str]] = {}
    for o in history.of("task-claim", outcome="ok"):
        claimers.setdefault(o.key, set()).add(o.value)
    verdict.figures["queue"] = {
        "tasks_acknowledged": len(acked),
        "done": len(acked) - len(not_done),
        "completed_by_workers": len({o.key for o in history.of("task-done", outcome="ok")}),
        "completed_by_drain": drained,
        "claimed_by_several_workers": sum(1 for ws in claimers.values() if len(ws) > 1),
        "heartbeats_acknowledged": len(history.of("task-heartbeat", outcome="ok")),
        "releases_acknowledged": len(history.of("task-release", outcome="ok")),
        "retries_acknowledged": len(history.of("task-retry", outcome="ok")),
    }


def check_all(
    cluster: FaultCluster, history: History, tag: str, services: Sequence[str], drained: int = 0
) -> Verdict:
    """Every check of a nemesis run (KV and Pigtail ones when those services ran)."""
    verdict = Verdict()
    counts = history.counts()
    verdict.figures["ops"] = {
        "attempted": len(history.ops),
        "acknowledged": sum(c["ok"] for c in counts.values()),
        "failed": sum(c["fail"] for c in counts.values()),
        "indeterminate": sum(c["info"] for c in counts.values()),
        "by_kind": counts,
    }
    idle = sorted(kind for kind, outcomes in counts.items() if not outcomes["ok"])
    verdict.expect(not idle, f"operations never acknowledged, so never checked: {idle}")
    per_node = check_log(verdict, cluster, history, tag)
    if "kv" in services:
        check_kv(verdict, cluster, history, per_node)
    if "pigtail" in services:
        check_queue(verdict, cluster, history, per_node[0], drained)
    return verdict


def fail_on_problems(verdict: Verdict) -> None:
    """Fail the test with every problem found (figures are reported before this)."""
    if verdict.problems:
        pytest.fail("the checker found problems:\n- " + "\n- ".join(verdict.problems), pytrace=False)
