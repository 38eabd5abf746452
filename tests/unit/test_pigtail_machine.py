"""Unit and property tests of Pigtail's pure state machine (``potboiler.pigtail.machine``)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from potboiler.pigtail.events import (
    Event,
    InvalidEvent,
    QueueCreated,
    QueueDeleted,
    TaskAdded,
    TaskClaimed,
    TaskDone,
    TaskEvent,
    TaskReleased,
    TaskRetried,
    event_from_json,
    event_queue,
)
from potboiler.pigtail.machine import (
    Incarnation,
    QueueState,
    Reason,
    Stamp,
    Standing,
    TaskState,
    TaskView,
    Verdict,
    apply_queue_event,
    apply_task_event,
    check_add,
    check_claim,
    check_create,
    check_delete,
    check_done,
    check_release,
    check_retry,
    compact_task,
    find_by_key,
    queue_config,
    queue_exists,
    task_view,
    task_view_after,
)
from tests.pigtail_oracle import apply_to_queue, claimable_order, list_dead, list_tasks

Q = "jobs"
N1 = "00000000-0000-4000-8000-000000000001"
N2 = "00000000-0000-4000-8000-000000000002"


def _roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


class Replica:
    """What the Pigtail service does with delivered events: apply them and store the states as JSON."""

    def __init__(self) -> None:
        self.queues: dict[str, QueueState] = {}
        self.tasks: dict[str, TaskState] = {}

    def apply(self, event: Event, stamp: Stamp) -> None:
        name = event_queue(event)
        self.queues[name] = _roundtrip(apply_to_queue(self.queues.get(name), event, stamp))
        if not isinstance(event, QueueCreated | QueueDeleted):
            old = self.tasks.get(event.task_id)
            self.tasks[event.task_id] = _roundtrip(apply_task_event(old, event, stamp))

    @property
    def queue(self) -> QueueState | None:
        return self.queues.get(Q)

    def task(self, task_id: str = "t") -> TaskState | None:
        return self.tasks.get(task_id)

    def view(self, task_id: str = "t", now_ms: int = 0) -> TaskView | None:
        return task_view(self.tasks.get(task_id), self.queue, now_ms)

    def views(self, now_ms: int) -> dict[str, TaskView | None]:
        return {task_id: self.view(task_id, now_ms) for task_id in sorted(self.tasks)}


def claim(worker: str, task_id: str = "t") -> TaskClaimed:
    return TaskClaimed(Q, task_id, worker)


def done(worker: str, task_id: str = "t") -> TaskDone:
    return TaskDone(Q, task_id, worker)


def retry(task_id: str = "t") -> TaskRetried:
    return TaskRetried(Q, task_id)


def release(worker: str, task_id: str = "t") -> TaskReleased:
    return TaskReleased(Q, task_id, worker)


def heartbeat(worker: str, task_id: str = "t") -> TaskClaimed:
    return TaskClaimed(Q, task_id, worker, renew=True)


Step = tuple[int, str, Event]
"""(wall_ms, owner, event): the event is applied with stamp (wall_ms, 0, owner)."""


def run(
    steps: list[Step],
    *,
    timeout_ms: int = 100,
    max_attempts: int | None = None,
    not_before_ms: int | None = None,
    priority: int = 0,
) -> Replica:
    """A queue created at 0, task "t" added at 1, then ``steps``."""
    replica = Replica()
    replica.apply(QueueCreated(Q, timeout_ms, max_attempts), Stamp(0, 0, N1))
    replica.apply(
        TaskAdded(Q, "t", "job", {"x": 1}, not_before_ms=not_before_ms, priority=priority), Stamp(1, 0, N1)
    )
    for wall, owner, event in steps:
        replica.apply(event, Stamp(wall, 0, owner))
    return replica


# --------------------------------------------------------------------------------------------------------
# Transitions, table-driven
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    steps: list[Step]
    now_ms: int
    state: str
    worker: str | None
    attempts: int
    max_attempts: int | None = None
    not_before_ms: int | None = None
    lease_expires_ms: int | None = None
    done_by: str | None = None


TRANSITIONS = [
    Case("added task is pending", [], 50, "pending", None, 0),
    Case("claim starts a lease", [(10, N1, claim("A"))], 50, "working", "A", 1, lease_expires_ms=110),
    Case("lease still runs just before expiry", [(10, N1, claim("A"))], 109, "working", "A", 1),
    Case("expired lease shows as pending", [(10, N1, claim("A"))], 110, "pending", "A", 1),
    Case(
        "renewal by the holder extends the lease",
        [(10, N1, claim("A")), (90, N1, claim("A"))],
        150,
        "working",
        "A",
        1,
        lease_expires_ms=190,
    ),
    Case(
        "claim again after own expiry is a new attempt",
        [(10, N1, claim("A")), (200, N1, claim("A"))],
        250,
        "working",
        "A",
        2,
    ),
    Case(
        "other worker's claim is void while held",
        [(10, N1, claim("A")), (50, N2, claim("B"))],
        60,
        "working",
        "A",
        1,
    ),
    Case(
        "other worker wins after expiry",
        [(10, N1, claim("A")), (110, N2, claim("B"))],
        150,
        "working",
        "B",
        2,
    ),
    Case(
        "a void claim is no lease: its worker may start one once the lease expires",
        [(10, N1, claim("A")), (50, N2, claim("B")), (120, N2, claim("B"))],
        150,
        "working",
        "B",
        2,
    ),
    Case(
        "the same stamp order wins whatever the arrival order (node id breaks the tie)",
        [(10, N2, claim("A")), (10, N1, claim("B"))],
        50,
        "working",
        "B",
        1,
    ),
    Case("done by the holder", [(10, N1, claim("A")), (20, N1, done("A"))], 30, "done", "A", 1, done_by="A"),
    Case("done by anyone", [(10, N1, claim("A")), (20, N2, done("B"))], 30, "done", "A", 1, done_by="B"),
    Case("done without a claim", [(20, N2, done("B"))], 30, "done", None, 0, done_by="B"),
    Case("done naming no worker", [(10, N1, claim("A")), (20, N2, done(""))], 30, "done", "A", 1),
    Case("claim after done is void", [(20, N1, done("A")), (30, N2, claim("B"))], 40, "done", None, 0),
    Case(
        "the earliest done wins",
        [(10, N1, claim("A")), (30, N1, done("A")), (20, N2, done("B"))],
        40,
        "done",
        "A",
        1,
        done_by="B",
    ),
    Case(
        "done is final, also after the lease expired",
        [(10, N1, claim("A")), (500, N1, done("A"))],
        600,
        "done",
        "A",
        1,
        1,
    ),
    Case(
        "working at max attempts is not dead",
        [(10, N1, claim("A")), (110, N2, claim("B"))],
        150,
        "working",
        "B",
        2,
        max_attempts=2,
    ),
    Case(
        "dead once the last allowed lease expires",
        [(10, N1, claim("A")), (110, N2, claim("B"))],
        210,
        "dead",
        "B",
        2,
        max_attempts=2,
    ),
    Case(
        "claim of a dead task is void", [(10, N1, claim("A")), (200, N2, claim("B"))], 250, "dead", "A", 1, 1
    ),
    Case(
        "retry takes a dead task back to pending",
        [(10, N1, claim("A")), (200, N2, retry())],
        250,
        "pending",
        None,
        0,
        1,
    ),
    Case(
        "claim after retry starts attempt 1 again",
        [(10, N1, claim("A")), (200, N2, retry()), (210, N2, claim("B"))],
        250,
        "working",
        "B",
        1,
        1,
    ),
    Case("retry of a live task is void", [(10, N1, claim("A")), (50, N2, retry())], 200, "dead", "A", 1, 1),
    Case(
        "retry without max_attempts is void",
        [(10, N1, claim("A")), (200, N1, retry())],
        250,
        "pending",
        "A",
        1,
    ),
    Case(
        "retry after done is void",
        [(10, N1, claim("A")), (20, N1, done("A")), (200, N1, retry())],
        250,
        "done",
        "A",
        1,
        1,
    ),
    Case(
        "release by the holder ends the lease there",
        [(10, N1, claim("A")), (20, N2, release("A"))],
        30,
        "pending",
        "A",
        1,
        lease_expires_ms=20,
    ),
    Case(
        "release by another worker is void",
        [(10, N1, claim("A")), (20, N1, release("B"))],
        30,
        "working",
        "A",
        1,
    ),
    Case(
        "release of an expired lease is void",
        [(10, N1, claim("A")), (150, N2, claim("B")), (160, N1, release("A"))],
        170,
        "working",
        "B",
        2,
    ),
    Case(
        "a claim after a release starts a new attempt",
        [(10, N1, claim("A")), (20, N1, release("A")), (20, N2, claim("B"))],
        30,
        "working",
        "B",
        2,
        lease_expires_ms=120,
    ),
    Case(
        "a release on the last attempt dead-letters the task",
        [(10, N1, claim("A")), (20, N1, release("A"))],
        30,
        "dead",
        "A",
        1,
        1,
    ),
    Case(
        "release after done is void",
        [(10, N1, claim("A")), (20, N1, done("A")), (30, N1, release("A"))],
        40,
        "done",
        "A",
        1,
    ),
    Case("release before any claim is void", [(20, N1, release("A"))], 30, "pending", None, 0),
    Case(
        "an unsent release takes the attempt back: not dead-lettered",
        [(10, N1, claim("A")), (20, N1, TaskReleased(Q, "t", "A", unsent=True))],
        30,
        "pending",
        "A",
        0,
        1,
    ),
    Case(
        "a heartbeat by the holder renews the lease",
        [(10, N1, claim("A")), (60, N2, heartbeat("A"))],
        150,
        "working",
        "A",
        1,
        lease_expires_ms=160,
    ),
    Case(
        "a heartbeat after its worker's release starts no lease",
        [(10, N1, claim("A")), (20, N1, release("A")), (21, N1, heartbeat("A"))],
        30,
        "pending",
        "A",
        1,
        lease_expires_ms=20,
    ),
    Case(
        "a heartbeat after the lease expired starts no lease",
        [(10, N1, claim("A")), (120, N1, heartbeat("A"))],
        130,
        "pending",
        "A",
        1,
    ),
    Case(
        "a heartbeat by another worker is void",
        [(10, N1, claim("A")), (20, N2, heartbeat("B"))],
        30,
        "working",
        "A",
        1,
    ),
    Case("a heartbeat before any claim is void", [(20, N1, heartbeat("A"))], 30, "pending", None, 0),
    Case("delayed task before it is due", [], 100, "delayed", None, 0, not_before_ms=500),
    Case("delayed task once due is pending", [], 500, "pending", None, 0, not_before_ms=500),
    Case("claim before due is void", [(100, N1, claim("A"))], 150, "delayed", None, 0, not_before_ms=500),
    Case("claim once due", [(500, N1, claim("A"))], 550, "working", "A", 1, not_before_ms=500),
]


@pytest.mark.parametrize("case", TRANSITIONS, ids=lambda case: case.name)
def test_transition(case: Case) -> None:
    replica = run(case.steps, max_attempts=case.max_attempts, not_before_ms=case.not_before_ms)
    view = replica.view(now_ms=case.now_ms)
    assert view is not None
    assert (view["state"], view["worker"], view["attempts"]) == (case.state, case.worker, case.attempts)
    if case.lease_expires_ms is not None:
        assert view["lease_expires_ms"] == case.lease_expires_ms
    if case.done_by is not None:
        assert view["done_by"] == case.done_by
    # The same events in reverse arrival order give the same state (everything is judged by stamp).
    backwards = run(case.steps[::-1], max_attempts=case.max_attempts, not_before_ms=case.not_before_ms)
    assert backwards.tasks == replica.tasks
    assert backwards.view(now_ms=case.now_ms) == view


def test_view_fields() -> None:
    replica = run([(10, N1, claim("A"))], max_attempts=3, not_before_ms=5, priority=7)
    assert replica.view(now_ms=20) == {
        "task_id": "t",
        "queue": Q,
        "task_name": "job",
        "state": "working",
        "info": {"x": 1},
        "worker": "A",
        "attempts": 1,
        "max_attempts": 3,
        "priority": 7,
        "not_before_ms": 5,
        "added_ms": 1,
        "lease_expires_ms": 110,
        "done_by": None,
        "idempotency_key": None,
    }


def test_view_after_an_event_counts_nothing_stamped_later() -> None:
    """A claim's view as it left the task: working at its own wall time, whatever came after it
    (another worker's claim once its lease ended, a done)."""
    replica = run([(10, N1, claim("A")), (200, N2, claim("B")), (250, N2, done("B"))])
    view = task_view_after(replica.task(), replica.queue, Stamp(10, 0, N1))
    assert view is not None
    assert (view["state"], view["worker"], view["attempts"], view["lease_expires_ms"]) == (
        "working",
        "A",
        1,
        110,
    )
    assert view["done_by"] is None
    later = task_view_after(replica.task(), replica.queue, Stamp(200, 0, N2))
    assert later is not None and (later["state"], later["worker"], later["attempts"]) == ("working", "B", 2)
    final = task_view_after(replica.task(), replica.queue, Stamp(250, 0, N2))
    assert final == replica.view(now_ms=250) and final is not None and final["state"] == "done"
    assert task_view_after(None, replica.queue, Stamp(10, 0, N1)) is None


@dataclass(frozen=True)
class CheckCase:
    name: str
    steps: list[Step]
    worker: str
    now_ms: int
    verdict: Verdict
    reason: Reason | None = None
    holder: str | None = None
    until_ms: int | None = None
    renewal: bool = False
    max_attempts: int | None = None
    not_before_ms: int | None = None


CLAIM_CHECKS = [
    CheckCase("pending task", [], "A", 50, Verdict.OK, holder="A", until_ms=150),
    CheckCase("renewal", [(10, N1, claim("A"))], "A", 50, Verdict.OK, holder="A", until_ms=150, renewal=True),
    CheckCase("held by another", [(10, N1, claim("A"))], "B", 50, Verdict.CONFLICT, Reason.HELD, "A", 110),
    CheckCase("expired lease", [(10, N1, claim("A"))], "B", 110, Verdict.OK, holder="B", until_ms=210),
    CheckCase("done", [(10, N1, done("A"))], "A", 50, Verdict.CONFLICT, Reason.DONE),
    CheckCase("dead", [(10, N1, claim("A"))], "A", 200, Verdict.CONFLICT, Reason.DEAD, max_attempts=1),
    CheckCase("delayed", [], "A", 50, Verdict.CONFLICT, Reason.NOT_DUE, until_ms=500, not_before_ms=500),
    CheckCase(
        "judged no earlier than the stamps already seen",
        [(10, N1, claim("A"))],
        "B",
        0,
        Verdict.CONFLICT,
        Reason.HELD,
        "A",
        110,
    ),
]


@pytest.mark.parametrize("case", CLAIM_CHECKS, ids=lambda case: case.name)
def test_check_claim(case: CheckCase) -> None:
    replica = run(case.steps, max_attempts=case.max_attempts, not_before_ms=case.not_before_ms)
    decision = check_claim(replica.task(), replica.queue, case.worker, case.now_ms)
    assert decision.verdict is case.verdict
    assert decision.reason is case.reason
    if case.verdict is Verdict.OK:
        assert decision.ok
        assert decision.renewal is case.renewal
        # The check predicts the replay: applying the claim at now_ms gives exactly that lease.
        replica.apply(claim(case.worker), Stamp(case.now_ms, 1, N2))
        view = replica.view(now_ms=case.now_ms)
        assert view is not None
        assert (view["worker"], view["lease_expires_ms"]) == (case.holder, case.until_ms)
    else:
        assert not decision.ok and decision.message
        if case.holder is not None:
            assert f"held by worker {case.holder!r} until {case.until_ms}" in decision.message
        elif case.until_ms is not None:
            assert f"delayed until {case.until_ms}" in decision.message


def test_check_claim_not_found() -> None:
    replica = run([])
    assert check_claim(None, replica.queue, "A", 5).reason is Reason.UNKNOWN_TASK
    assert check_claim(replica.task(), None, "A", 5).reason is Reason.NO_QUEUE
    replica.apply(QueueDeleted(Q), Stamp(3, 0, N1))
    decision = check_claim(replica.task(), replica.queue, "A", 5)
    assert (decision.verdict, decision.reason) == (Verdict.NOT_FOUND, Reason.NO_QUEUE)


def test_check_done() -> None:
    replica = run([(10, N1, claim("A"))])
    assert check_done(replica.task(), replica.queue).verdict is Verdict.OK  # held by A: done by anyone
    replica.apply(done("B"), Stamp(20, 0, N1))
    again = check_done(replica.task(), replica.queue)
    assert again.ok and again.noop
    assert check_done(None, replica.queue).verdict is Verdict.NOT_FOUND


def test_check_release() -> None:
    replica = run([(10, N1, claim("A"))])
    assert check_release(replica.task(), replica.queue, "A", 20).ok
    assert check_release(replica.task(), replica.queue, "B", 20).reason is Reason.NOT_HELD
    assert check_release(replica.task(), replica.queue, "A", 110).reason is Reason.NOT_HELD  # expired
    replica.apply(release("A"), Stamp(20, 0, N1))
    assert check_release(replica.task(), replica.queue, "A", 30).reason is Reason.NOT_HELD
    assert check_claim(replica.task(), replica.queue, "B", 30).ok
    replica.apply(done("A"), Stamp(40, 0, N1))
    assert check_release(replica.task(), replica.queue, "A", 50).reason is Reason.DONE
    assert check_release(None, replica.queue, "A", 50).verdict is Verdict.NOT_FOUND


def test_check_retry() -> None:
    replica = run([(10, N1, claim("A"))], max_attempts=1)
    assert check_retry(replica.task(), replica.queue, 50).reason is Reason.NOT_DEAD
    assert check_retry(replica.task(), replica.queue, 200).ok
    replica.apply(retry(), Stamp(200, 0, N1))
    assert check_retry(replica.task(), replica.queue, 300).reason is Reason.NOT_DEAD
    replica.apply(done("A"), Stamp(300, 0, N1))
    assert check_retry(replica.task(), replica.queue, 400).reason is Reason.DONE
    assert check_retry(None, replica.queue, 400).verdict is Verdict.NOT_FOUND


def test_dead_letter_listing() -> None:
    replica = run([(10, N1, claim("A"))], max_attempts=1)
    assert list_tasks(replica.tasks, replica.queue, 50) == {"t": {"task_name": "job", "state": "working"}}
    assert list_dead(replica.tasks, replica.queue, 50) == {}
    assert list_tasks(replica.tasks, replica.queue, 200) == {}
    assert list_dead(replica.tasks.values(), replica.queue, 200) == {
        "t": {"task_name": "job", "state": "dead"}
    }
    assert claimable_order(replica.tasks, replica.queue, 200) == []


def test_listing_shows_delayed_and_hides_done() -> None:
    replica = run([], not_before_ms=500)
    assert list_tasks(replica.tasks, replica.queue, 100) == {"t": {"task_name": "job", "state": "delayed"}}
    assert claimable_order(replica.tasks, replica.queue, 100) == []
    assert claimable_order(replica.tasks, replica.queue, 500) == ["t"]
    replica.apply(done("A"), Stamp(600, 0, N1))
    assert list_tasks(replica.tasks, replica.queue, 700) == {}


def test_priority_and_delay_order() -> None:
    replica = Replica()
    replica.apply(QueueCreated(Q, 100), Stamp(0, 0, N1))
    adds = [
        # (task, priority, not_before_ms, added at)
        ("low-old", 0, None, 10),
        ("high-new", 5, None, 20),
        ("high-old", 5, None, 15),
        ("low-delayed-past", 0, 5, 30),  # available at max(30, 5) = 30
        ("low-delayed", 0, 40, 12),  # available at 40
        ("top-future", 9, 1000, 25),
        ("taken", 9, None, 11),
    ]
    for task_id, priority, not_before, wall in adds:
        replica.apply(TaskAdded(Q, task_id, task_id, None, not_before, priority), Stamp(wall, 0, N1))
    replica.apply(claim("A", "taken"), Stamp(50, 0, N1))
    expected = ["high-old", "high-new", "low-old", "low-delayed-past", "low-delayed"]
    assert claimable_order(replica.tasks, replica.queue, 100) == expected
    assert claimable_order(replica.tasks, replica.queue, 1000) == ["taken", "top-future", *expected]


# --------------------------------------------------------------------------------------------------------
# Idempotency keys
# --------------------------------------------------------------------------------------------------------


def test_idempotency_key_known_is_a_noop() -> None:
    replica = run([])
    assert check_add(replica.queue, "k").ok and not check_add(replica.queue, "k").noop
    replica.apply(TaskAdded(Q, "t2", "job", idempotency_key="k"), Stamp(10, 0, N1))
    decision = check_add(replica.queue, "k")
    assert decision.ok and decision.noop and decision.task_id == "t2"
    assert check_add(replica.queue, None).task_id is None
    assert check_add(None, "k").verdict is Verdict.NOT_FOUND


@pytest.mark.parametrize("reverse", [False, True])
def test_concurrent_idempotent_adds_lowest_stamp_wins(reverse: bool) -> None:
    events: list[tuple[Event, Stamp]] = [
        (TaskAdded(Q, "from-n1", "job", idempotency_key="k"), Stamp(10, 0, N1)),
        (TaskAdded(Q, "from-n2", "job", idempotency_key="k"), Stamp(9, 5, N2)),
        (claim("A", "from-n1"), Stamp(11, 0, N1)),
    ]
    replica = run([])
    for event, stamp in events[::-1] if reverse else events:
        replica.apply(event, stamp)
    assert find_by_key(replica.queue, "k") == "from-n2"
    assert replica.view("from-n1", 20) is None
    assert check_claim(replica.task("from-n1"), replica.queue, "A", 20).verdict is Verdict.NOT_FOUND
    assert set(list_tasks(replica.tasks, replica.queue, 20)) == {"t", "from-n2"}


# --------------------------------------------------------------------------------------------------------
# Queue life
# --------------------------------------------------------------------------------------------------------


def test_delete_and_recreate_gives_an_empty_queue() -> None:
    replica = run([(10, N1, claim("A"))])
    replica.apply(TaskAdded(Q, "keyed", "job", idempotency_key="k"), Stamp(12, 0, N1))
    assert check_delete(replica.queue).ok
    replica.apply(QueueDeleted(Q), Stamp(20, 0, N1))
    assert not queue_exists(replica.queue)
    assert check_delete(replica.queue).verdict is Verdict.NOT_FOUND
    assert check_add(replica.queue).verdict is Verdict.NOT_FOUND
    assert replica.view(now_ms=30) is None
    replica.apply(QueueCreated(Q, 500, 2), Stamp(30, 0, N2))
    assert queue_config(replica.queue) is not None
    assert replica.view(now_ms=40) is None  # the old incarnation's tasks never come back
    assert find_by_key(replica.queue, "k") is None  # nor do its keys
    replica.apply(TaskAdded(Q, "fresh", "job"), Stamp(40, 0, N2))
    assert list_tasks(replica.tasks, replica.queue, 50) == {"fresh": {"task_name": "job", "state": "pending"}}
    # The history keeps only the latest delete and what follows; older stragglers change nothing.
    queue = replica.queue
    assert queue is not None and [m["op"] for m in queue["history"]] == ["deleted", "created"]
    before = json.dumps(queue, sort_keys=True)
    replica.apply(QueueCreated(Q, 100), Stamp(5, 0, N2))
    replica.apply(TaskAdded(Q, "late", "job", idempotency_key="k"), Stamp(6, 0, N2))
    assert json.dumps(replica.queue, sort_keys=True) == before


@pytest.mark.parametrize(
    ("create_at", "delete_at", "exists"),
    [(Stamp(40, 0, N1), Stamp(50, 0, N2), False), (Stamp(60, 0, N1), Stamp(50, 0, N2), True)],
)
def test_concurrent_create_and_delete_resolve_by_stamp(
    create_at: Stamp, delete_at: Stamp, exists: bool
) -> None:
    for order in ((create_at, delete_at), (delete_at, create_at)):
        replica = Replica()
        replica.apply(QueueCreated(Q, 100), Stamp(0, 0, N1))
        for stamp in order:
            replica.apply(QueueCreated(Q, 100) if stamp == create_at else QueueDeleted(Q), stamp)
        assert queue_exists(replica.queue) is exists


def test_task_added_concurrently_with_delete_stays_hidden() -> None:
    replica = Replica()
    replica.apply(QueueCreated(Q, 100), Stamp(0, 0, N1))
    replica.apply(QueueDeleted(Q), Stamp(50, 0, N2))
    replica.apply(TaskAdded(Q, "t", "job"), Stamp(60, 0, N1))  # N1 had not seen the delete
    replica.apply(QueueCreated(Q, 100), Stamp(100, 0, N2))
    assert replica.view(now_ms=200) is None


def test_create_of_existing_queue_keeps_its_settings() -> None:
    replica = Replica()
    replica.apply(QueueCreated(Q, 100, 3), Stamp(0, 0, N1))
    replica.apply(QueueCreated(Q, 500), Stamp(10, 0, N2))
    config = queue_config(replica.queue)
    assert config is not None and (config.timeout_ms, config.max_attempts) == (100, 3)
    assert check_create(replica.queue, 100, 3).noop
    assert check_create(replica.queue, 500).reason is Reason.EXISTS
    assert check_create(None, 100).ok and not check_create(None, 100).noop


# --------------------------------------------------------------------------------------------------------
# Events, purity, duplicates, compaction
# --------------------------------------------------------------------------------------------------------

EVENTS: list[Event] = [
    QueueCreated(Q, 100),
    QueueCreated(Q, 100, 3),
    QueueDeleted(Q),
    TaskAdded(Q, "t", "job"),
    TaskAdded(
        Q, "t", "job", {"a": [1, 2.5, None, True, "x"]}, not_before_ms=5, priority=-2, idempotency_key="k"
    ),
    TaskClaimed(Q, "t", "w"),
    TaskClaimed(Q, "t", "w", renew=True),
    TaskDone(Q, "t", "w"),
    TaskReleased(Q, "t", "w"),
    TaskReleased(Q, "t", "w", unsent=True),
    TaskRetried(Q, "t"),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda event: type(event).__name__)
def test_event_json_roundtrip(event: Event) -> None:
    assert event_from_json(_roundtrip(event.to_json())) == event


@pytest.mark.parametrize(
    "raw",
    [
        {"kind": "nope"},
        {"kind": "queue_created", "name": Q, "timeout_ms": 0},
        {"kind": "queue_created", "name": Q, "timeout_ms": True},
        {"kind": "queue_created", "name": Q, "timeout_ms": 10, "max_attempts": 0},
        {"kind": "queue_created", "name": "", "timeout_ms": 10},
        {"kind": "queue_deleted"},
        {"kind": "task_added", "queue": Q, "task_id": "t", "task_name": "n", "priority": 1.5},
        {"kind": "task_added", "queue": Q, "task_id": "t", "task_name": "n", "info": {1, 2}},
        {"kind": "task_claimed", "queue": Q, "task_id": "t"},
        {"kind": "task_claimed", "queue": Q, "task_id": "t", "worker_id": "w", "renew": "yes"},
        {"kind": "task_retried", "queue": Q},
        {"kind": "task_released", "queue": Q, "task_id": "t", "worker_id": ""},
        {"kind": "task_released", "queue": Q, "task_id": "t", "worker_id": "w", "unsent": 1},
        # Past the API's limits: only appended by hand, and beyond the typed answers' int32 fields.
        {"kind": "queue_created", "name": Q, "timeout_ms": 86_400_001},
        {"kind": "queue_created", "name": Q, "timeout_ms": 10, "max_attempts": 1_001},
        {"kind": "queue_created", "name": Q, "timeout_ms": 10, "max_attempts": 3_000_000_000},
        {"kind": "task_added", "queue": Q, "task_id": "t", "task_name": "n", "priority": 3_000_000_000},
        {"kind": "task_added", "queue": Q, "task_id": "t", "task_name": "n", "priority": -1_000_001},
        {"kind": "task_added", "queue": Q, "task_id": "t", "task_name": "n", "not_before_ms": 2**63},
    ],
)
def test_event_from_json_rejects(raw: dict[str, Any]) -> None:
    with pytest.raises(InvalidEvent):
        event_from_json(raw)


def test_bad_stamps_and_mismatched_states() -> None:
    bad: list[Any] = [[1, 2], [1, True, "n"], ["1", 0, "n"], "abc"]
    for raw in bad:
        with pytest.raises(InvalidEvent):
            Stamp.coerce(raw)
    assert Stamp.coerce([1, 2, "n"]) == Stamp(1, 2, "n") < Stamp(1, 2, "o") < Stamp(1, 3, "a")
    replica = run([])
    task, queue = replica.task(), replica.queue
    assert task is not None and queue is not None
    with pytest.raises(InvalidEvent):
        apply_task_event(task, claim("A", "other"), Stamp(5, 0, N1))
    with pytest.raises(InvalidEvent):
        apply_queue_event(queue, QueueDeleted("other"), Stamp(5, 0, N1))


def test_apply_is_pure_and_duplicates_change_nothing() -> None:
    replica = run([(10, N1, claim("A")), (20, N1, done("A"))], max_attempts=2)
    task, queue = replica.task(), replica.queue
    assert task is not None and queue is not None
    frozen = json.dumps(task, sort_keys=True), json.dumps(queue, sort_keys=True)
    duplicates: list[tuple[TaskEvent, Stamp]] = [
        (TaskAdded(Q, "t", "job", {"x": 1}), Stamp(1, 0, N1)),
        (claim("A"), Stamp(10, 0, N1)),
        (done("A"), Stamp(20, 0, N1)),
        (claim("B"), Stamp(30, 0, N2)),  # after done: pruned at once
        (retry(), Stamp(40, 0, N2)),
    ]
    for event, stamp in duplicates:
        assert apply_task_event(task, event, stamp.to_json()) is task
    assert apply_queue_event(queue, QueueCreated(Q, 100, 2), Stamp(0, 0, N1)) is queue
    deleted = apply_queue_event(queue, QueueDeleted(Q), Stamp(50, 0, N1))
    assert [mark["op"] for mark in deleted["history"]] == ["deleted"]
    assert deleted["keys"] is queue["keys"]  # the key index is changed per key, apart
    new = apply_task_event(task, done("B"), Stamp(5, 0, N2))
    assert new is not task and new["done"] == {"at": [5, 0, N2], "worker": "B"} and new["claims"] == []
    assert (json.dumps(task, sort_keys=True), json.dumps(queue, sort_keys=True)) == frozen


def test_compaction_keeps_views_and_bounds_heartbeats() -> None:
    steps: list[Step] = [(10 + 20 * i, N1, claim("A")) for i in range(50)]
    steps.append((500, N2, claim("B")))  # void: A heartbeats
    replica = run(steps, max_attempts=3)
    task, queue = replica.task(), replica.queue
    assert task is not None and queue is not None
    horizon = Stamp(900, 0, N1)
    compacted = compact_task(task, queue, horizon)
    assert len(compacted["claims"]) == 5 and compacted["base"] is not None
    # The last heartbeat at or before the horizon is at 10 + 20 * 44 = 890.
    assert compacted["base"] == {"horizon": [900, 0, N1], "holder": "A", "lease_from_ms": 890, "attempts": 1}
    assert compact_task(compacted, queue, horizon) is compacted
    assert compact_task(compacted, queue, Stamp(800, 0, N1)) is compacted
    for now in (900, 1000, 1100, 2000):
        assert task_view(compacted, queue, now) == task_view(task, queue, now)
    # Late duplicates of folded events are ignored; later events still apply on top of the base.
    assert apply_task_event(compacted, claim("A"), Stamp(10, 0, N1)) is compacted
    later: list[tuple[TaskEvent, Stamp]] = [
        (claim("B"), Stamp(1200, 0, N2)),
        (claim("B"), Stamp(1250, 0, N2)),
        (retry(), Stamp(1500, 0, N1)),
    ]
    for event, stamp in later:
        task = apply_task_event(task, event, stamp)
        compacted = apply_task_event(compacted, event, stamp)
    for now in (1200, 1300, 1400, 1600):
        assert task_view(compacted, queue, now) == task_view(task, queue, now)
    # A hidden task or a task added after the horizon is left alone.
    assert compact_task(task, queue, Stamp(0, 5, N1)) is task


# --------------------------------------------------------------------------------------------------------
# Replication: random interleavings of events from several simulated nodes
# --------------------------------------------------------------------------------------------------------

WORKERS = ("w0", "w1", "w2")
NODE_NAMES = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(4)]


@dataclass
class SimEvent:
    owner: int
    stamp: Stamp
    event: Event
    clock: tuple[int, ...]
    """The owner's delivered-event counts per node when it made the event (its own count included)."""


@dataclass
class SimNode:
    index: int
    skew_ms: int
    delivered: list[int]
    replica: Replica = field(default_factory=Replica)
    hlc: tuple[int, int] = (0, 0)

    def stamp(self, phys_ms: int) -> Stamp:
        wall = max(phys_ms + self.skew_ms, self.hlc[0])
        logical = self.hlc[1] + 1 if wall == self.hlc[0] else 0
        self.hlc = (wall, logical)
        return Stamp(wall, logical, NODE_NAMES[self.index])


class Cluster:
    """Nodes with skewed HLCs; the log delivers events per owner in order and in causal order."""

    def __init__(self, skews: list[int]) -> None:
        self.nodes = [SimNode(i, skew, [0] * len(skews)) for i, skew in enumerate(skews)]
        self.log: list[SimEvent] = []
        self.phys_ms = 1_000

    def emit(self, node: SimNode, event: Event) -> SimEvent:
        stamp = node.stamp(self.phys_ms)
        node.delivered[node.index] += 1
        sim = SimEvent(node.index, stamp, event, tuple(node.delivered))
        self.log.append(sim)
        node.replica.apply(event, stamp)
        return sim

    def has(self, node: SimNode, sim: SimEvent) -> bool:
        return node.delivered[sim.owner] >= sim.clock[sim.owner]

    def ready(self, node: SimNode) -> list[SimEvent]:
        return [
            sim
            for sim in self.log
            if node.delivered[sim.owner] == sim.clock[sim.owner] - 1
            and all(node.delivered[o] >= c for o, c in enumerate(sim.clock) if o != sim.owner)
        ]

    def deliver(self, node: SimNode, sim: SimEvent) -> None:
        node.hlc = max(node.hlc, (sim.stamp.wall_ms, sim.stamp.logical))
        node.delivered[sim.owner] += 1
        node.replica.apply(sim.event, sim.stamp)

    def duplicate(self, node: SimNode, pick: int) -> None:
        seen = [sim for sim in self.log if self.has(node, sim)]
        if seen:
            sim = seen[pick % len(seen)]
            node.replica.apply(sim.event, sim.stamp)

    def heal(self, rng: random.Random) -> None:
        """Deliver everything everywhere, in a random causal order, with duplicate deliveries."""
        while True:
            waiting = [(node, self.ready(node)) for node in self.nodes]
            waiting = [(node, ready) for node, ready in waiting if ready]
            if not waiting:
                break
            node, ready = rng.choice(waiting)
            self.deliver(node, rng.choice(ready))
            if rng.random() < 0.2:
                self.duplicate(node, rng.randrange(1 << 30))
        assert all(
            node.delivered == [sum(1 for s in self.log if s.owner == n.index) for n in self.nodes]
            for node in self.nodes
        )

    def serial(self, upto: int | None = None) -> Replica:
        """A replica that applied the whole log in stamp order (the reference)."""
        replica = Replica()
        for sim in sorted(self.log, key=lambda s: s.stamp)[:upto]:
            replica.apply(sim.event, sim.stamp)
        return replica


NODE = st.integers(0, 3)
TASK_PICK = st.integers(0, 15)
CLAIM = st.tuples(st.just("claim"), NODE, st.sampled_from(WORKERS), TASK_PICK, st.booleans())
ACTION = st.one_of(
    st.tuples(st.just("tick"), st.integers(0, 80)),
    st.tuples(
        st.just("add"),
        NODE,
        st.integers(0, 2),
        st.none() | st.integers(0, 300),
        st.sampled_from([None, "k0", "k1"]),
    ),
    CLAIM,
    CLAIM,
    CLAIM,
    st.tuples(st.just("done"), NODE, st.sampled_from(WORKERS), TASK_PICK, st.booleans()),
    st.tuples(st.just("retry"), NODE, TASK_PICK, st.booleans()),
    st.tuples(st.just("release"), NODE, st.sampled_from(WORKERS), TASK_PICK, st.booleans()),
    st.tuples(st.just("heartbeat"), NODE, st.sampled_from(WORKERS), TASK_PICK, st.booleans()),
    st.tuples(st.just("deliver"), NODE, st.integers(1, 6), st.integers(0, 1 << 20)),
    st.tuples(st.just("dup"), NODE, st.integers(0, 1 << 20)),
    st.tuples(st.just("queue"), NODE, st.integers(0, 15)),
)


def _act(cluster: Cluster, action: tuple[Any, ...], config: tuple[int, int | None]) -> None:
    kind = action[0]
    if kind == "tick":
        cluster.phys_ms += action[1]
        return
    node = cluster.nodes[action[1] % len(cluster.nodes)]
    replica, now = node.replica, cluster.phys_ms + node.skew_ms
    known = sorted(replica.tasks)
    if kind == "add":
        _, _, priority, delay, key = action
        decision = check_add(replica.queue, key)
        if decision.ok and not decision.noop:
            not_before = None if delay is None else now + delay
            cluster.emit(
                node, TaskAdded(Q, f"t{len(cluster.log)}", "job", {"n": 1}, not_before, priority, key)
            )
    elif kind in ("claim", "heartbeat", "done", "retry", "release") and known:
        task_id = known[action[-2] % len(known)]
        task, force = replica.tasks[task_id], action[-1]
        if kind == "claim":
            ok = check_claim(task, replica.queue, action[2], now).ok
            event: Event = claim(action[2], task_id)
        elif kind == "heartbeat":  # as the service checks it: the worker renews its own lease
            decision = check_claim(task, replica.queue, action[2], now)
            ok = decision.ok and decision.renewal
            event = heartbeat(action[2], task_id)
        elif kind == "done":  # mostly by the lease holder, as a worker would; sometimes by anyone
            decision = check_done(task, replica.queue)
            view = task_view(task, replica.queue, now)
            holder = view is not None and view["worker"] == action[2] and view["state"] == "working"
            ok = decision.ok and not decision.noop and (holder or action[3] % 4 == 0)
            force = force and action[3] % 8 == 0
            event = done(action[2], task_id)
        elif kind == "release":
            ok = check_release(task, replica.queue, action[2], now).ok
            event = release(action[2], task_id)
        else:
            ok = check_retry(task, replica.queue, now).ok
            force = force and action[2] % 4 == 0
            event = retry(task_id)
        if ok or force:  # forced: a racing or stale service appends anyway
            cluster.emit(node, event)
    elif kind == "deliver":
        _, _, count, pick = action
        for i in range(count):
            ready = cluster.ready(node)
            if ready:
                cluster.deliver(node, ready[(pick + i) % len(ready)])
    elif kind == "dup":
        cluster.duplicate(node, action[2])
    elif kind == "queue":
        if action[2] == 0 and queue_exists(replica.queue):
            cluster.emit(node, QueueDeleted(Q))
        elif action[2] == 1 and not queue_exists(replica.queue):
            cluster.emit(node, QueueCreated(Q, *config))


def _observed(replica: Replica, now_ms: int) -> tuple[Any, ...]:
    tasks, queue = replica.tasks, replica.queue
    return (
        replica.views(now_ms),
        list_tasks(tasks, queue, now_ms),
        list_dead(tasks, queue, now_ms),
        claimable_order(tasks, queue, now_ms),
        queue_config(queue),
    )


def _stands_as_viewed(replica: Replica, now_ms: int) -> bool:
    """Whether where each task stands (what the scheduler places it by) is what its view says."""
    incarnation = Incarnation(replica.queue)
    standings = {task_id: incarnation.standing(task, now_ms) for task_id, task in replica.tasks.items()}
    viewed = {
        task_id: None if view is None else Standing(view["state"], view["lease_expires_ms"])
        for task_id, view in replica.views(now_ms).items()
    }
    return standings == viewed


SIM_SETTINGS = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@SIM_SETTINGS
@given(
    skews=st.lists(st.integers(-40, 40), min_size=2, max_size=4),
    timeout_ms=st.sampled_from([40, 150, 1000]),
    max_attempts=st.sampled_from([None, 1, 2]),
    actions=st.lists(ACTION, min_size=10, max_size=60),
    seed=st.integers(0, 1 << 32),
    cut=st.floats(0, 1),
)
def test_replicas_converge(
    skews: list[int],
    timeout_ms: int,
    max_attempts: int | None,
    actions: list[tuple[Any, ...]],
    seed: int,
    cut: float,
) -> None:
    cluster = Cluster(skews)
    config = (timeout_ms, max_attempts)
    cluster.emit(cluster.nodes[0], QueueCreated(Q, timeout_ms, max_attempts))
    for i in range(3):  # a few tasks every node knows, so that claims have something to race for
        cluster.emit(cluster.nodes[i % len(skews)], TaskAdded(Q, f"seed{i}", "job", priority=i % 2))
    for node in cluster.nodes:
        while ready := cluster.ready(node):
            cluster.deliver(node, ready[0])
    for action in actions:
        _act(cluster, action, config)
    rng = random.Random(seed)
    cluster.heal(rng)

    reference = cluster.serial()
    end = max(s.stamp.wall_ms for s in cluster.log)
    nows = [end - 100, end, end + timeout_ms // 2, end + 10 * timeout_ms]
    for node in cluster.nodes:
        assert node.replica.queues == reference.queues
        assert node.replica.tasks == reference.tasks
        for now in nows:
            assert _observed(node.replica, now) == _observed(reference, now)
    for now in nows:
        assert _stands_as_viewed(reference, now)
        for view in reference.views(now).values():
            if view is not None and view["max_attempts"] is not None:
                assert view["attempts"] <= view["max_attempts"]

    # Compaction at a stable horizon, then the rest of the log in any order (with duplicates), gives the
    # same views as the uncompacted reference.
    ordered = sorted(cluster.log, key=lambda s: s.stamp)
    upto = int(cut * len(ordered))
    compacted = cluster.serial(upto)
    if upto:
        horizon = ordered[upto - 1].stamp
        queue = compacted.queue
        assert queue is not None
        compacted.tasks = {k: compact_task(t, queue, horizon) for k, t in compacted.tasks.items()}
    rest = ordered[upto:] + rng.sample(ordered, min(len(ordered), 5))
    rng.shuffle(rest)
    for sim in rest:
        compacted.apply(sim.event, sim.stamp)
    for now in nows:
        assert compacted.views(now) == reference.views(now)
        assert _stands_as_viewed(compacted, now)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    skews=st.lists(st.integers(-50, 50), min_size=2, max_size=4),
    offsets=st.lists(st.integers(0, 40), min_size=4, max_size=4),
    seed=st.integers(0, 1 << 32),
    both_done=st.booleans(),
)
def test_partition_claims_agree_on_one_winner(
    skews: list[int], offsets: list[int], seed: int, both_done: bool
) -> None:
    cluster = Cluster(skews)
    first = cluster.nodes[0]
    cluster.emit(first, QueueCreated(Q, 1_000))
    cluster.emit(first, TaskAdded(Q, "t", "job"))
    cluster.heal(random.Random(seed))
    start = cluster.phys_ms
    claims: dict[str, Stamp] = {}
    for node, offset in zip(cluster.nodes, offsets, strict=False):  # partitioned: nothing is delivered
        worker = f"w{node.index}"
        cluster.phys_ms = start + offset
        decision = check_claim(
            node.replica.task(), node.replica.queue, worker, cluster.phys_ms + node.skew_ms
        )
        assert decision.ok and not decision.renewal
        claims[worker] = cluster.emit(node, claim(worker)).stamp
    cluster.phys_ms = start + 100
    dones: dict[str, Stamp] = {}
    if both_done:
        for node in cluster.nodes:
            dones[f"w{node.index}"] = cluster.emit(node, done(f"w{node.index}")).stamp
    cluster.heal(random.Random(seed + 1))

    winner = min(claims, key=lambda worker: claims[worker])
    now = cluster.phys_ms + 200
    for node in cluster.nodes:
        view = node.replica.view(now_ms=now)
        assert view is not None
        assert (view["worker"], view["attempts"]) == (winner, 1)
        if both_done:
            assert view["state"] == "done"
            assert view["done_by"] == min(dones, key=lambda worker: dones[worker])
            continue
        assert view["state"] == "working"
        for worker in claims:
            decision = check_claim(node.replica.task(), node.replica.queue, worker, now)
            if worker == winner:
                assert decision.ok and decision.renewal
            else:
                assert (decision.verdict, decision.reason) == (Verdict.CONFLICT, Reason.HELD)
                assert f"held by worker {winner!r}" in decision.message
