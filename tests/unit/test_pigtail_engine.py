"""Pigtail's operations (``potboiler.pigtail.engine``) against an in-memory log and a MemoryStore, with a
clock the tests move: read-your-writes, conflicts, expiry, races between claims, dead letters, delays,
idempotency, claim-next and the lease stream, restart, bad input."""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
import pytest
from google.api.httpbody_pb2 import HttpBody

from potboiler.pigtail import engine
from potboiler.pigtail.codec import decode
from potboiler.pigtail.engine import Pigtail
from potboiler.pigtail.events import Event, QueueCreated, QueueDeleted, TaskAdded, TaskClaimed, TaskDone
from potboiler.pigtail.machine import ListEntry, TaskStatus, TaskView, task_view
from potboiler.pigtail.scheduler import OTHERS_AFTER_MS, Rank, Scheduler, rank
from potboiler.pigtail.servicer import PigtailRestServicer, PigtailServicer
from potboiler.pigtail.state import Applied
from potboiler.pigtail.validate import MAX_INFO_DEPTH
from potboiler.pigtail.worksession import work_session
from potboiler.server.backoff import Backoff
from potboiler.server.errors import AlreadyExists, Contended, InvalidArgument, NotFound, TooLarge, Unavailable
from potboiler.server.hlc import MAX_DRIFT_MS, HybridClock, Stamp
from potboiler.server.log import Promise
from potboiler.server.log_delivered import DeliveredBatch
from potboiler.server.logclient import APPLY_ATTEMPTS
from potboiler.server.storage import MemoryStore, Write
from potboiler.v1 import pigtail_pb2
from potboiler.v1.entry_pb2 import Entry
from tests.conftest import loop_turns, wait_for
from tests.fakelog import FakeLog
from tests.pigtail_oracle import claimable_order, list_dead, list_tasks

B = "00000000-0000-4000-8000-00000000000b"
T0 = 1_700_000_000_000
T = TypeVar("T")


class Clock:
    """A physical clock the test sets."""

    def __init__(self) -> None:
        self.ms = T0

    def __call__(self) -> int:
        return self.ms


class Harness:
    def __init__(self) -> None:
        self.physical = Clock()
        self.clock = HybridClock(self.physical)
        self.log = FakeLog(self.clock)
        self.store = MemoryStore()
        self.pigtail = Pigtail(self.log, self.store, self.clock)

    def advance(self, ms: int) -> None:
        self.physical.ms += ms

    async def restart(self) -> None:
        await self.pigtail.stop()
        self.pigtail = Pigtail(self.log, self.store, self.clock)
        await self.pigtail.start()

    async def add(self, queue: str = "q", **kwargs: object) -> str:
        view, created = await self.pigtail.add_task(queue, "job", **kwargs)  # type: ignore[arg-type]
        assert created
        return view["task_id"]


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    harness = Harness()
    await harness.pigtail.start()
    try:
        yield harness
    finally:
        await harness.pigtail.stop()


async def test_create_add_claim_complete_reads_its_writes(h: Harness) -> None:
    config, created = await h.pigtail.create_queue("q", 1000)
    assert created and config.timeout_ms == 1000 and config.max_attempts is None
    assert await h.pigtail.create_queue("q", 1000) == (config, False)
    view, created = await h.pigtail.add_task("q", "hello_world", {"foo": "bar"})
    task_id = view["task_id"]
    assert created and view["state"] == "pending" and view["worker"] is None
    assert await h.pigtail.list_tasks("q") == [(task_id, {"task_name": "hello_world", "state": "pending"})]
    view, renewal = await h.pigtail.claim("q", task_id, "w1")
    assert not renewal and view["state"] == "working" and view["worker"] == "w1"
    assert view["info"] == {"foo": "bar"}
    assert view["lease_expires_ms"] == T0 + 1000
    view, renewal = await h.pigtail.claim("q", task_id, "w1")
    assert renewal
    view, already = await h.pigtail.complete("q", task_id, "w1")
    assert not already and view["state"] == "done" and view["done_by"] == "w1"
    assert await h.pigtail.list_tasks("q") == []
    assert (await h.pigtail.get_task("q", task_id))["state"] == "done"
    view, already = await h.pigtail.complete("q", task_id, "w2")
    assert already and view["done_by"] == "w1"


async def test_completes_of_one_task_at_once_mark_it_done_once(h: Harness) -> None:
    """A worker sending its complete again before the first is answered (or two calls racing on
    one node): one TaskDone, and only one answer saying the task was not done already."""
    await h.pigtail.create_queue("q", 1000)
    task_id = await h.add()
    await h.pigtail.claim("q", task_id, "w1")
    answers = await asyncio.gather(*(h.pigtail.complete("q", task_id, "w1") for _ in range(3)))
    assert sorted(already for _, already in answers) == [False, True, True]
    events = [decode(entry) for entry in h.log.entries]
    assert sum(isinstance(e.event, TaskDone) for e in events if e is not None) == 1


async def test_events_depend_on_the_queue_create_and_the_task_add(h: Harness) -> None:
    await h.pigtail.create_queue("q", 1000)
    create = h.log.entries[-1]
    task_id = await h.add()
    add = h.log.entries[-1]
    assert list(add.dependencies) == [create.id]
    await h.pigtail.claim("q", task_id, "w")
    assert list(h.log.entries[-1].dependencies) == [create.id, add.id]
    await h.pigtail.delete_queue("q")
    assert list(h.log.entries[-1].dependencies) == [create.id]


async def test_conflicts_and_not_found(h: Harness) -> None:
    await h.pigtail.create_queue("q", 1000)
    task_id = await h.add()
    await h.pigtail.claim("q", task_id, "w1")
    count = len(h.log.entries)
    with pytest.raises(Contended, match="held by worker 'w1'"):
        await h.pigtail.claim("q", task_id, "w2")
    with pytest.raises(Contended, match="held by worker 'w1'"):
        await h.pigtail.heartbeat("q", task_id, "w2")
    await h.pigtail.complete("q", task_id, "w1")
    with pytest.raises(Contended, match="done"):
        await h.pigtail.claim("q", task_id, "w2")
    with pytest.raises(NotFound, match="no such task"):
        await h.pigtail.claim("q", str(uuid.uuid4()), "w2")
    with pytest.raises(NotFound, match="no such task"):
        await h.pigtail.get_task("q", "not-an-id")
    with pytest.raises(NotFound, match="no such queue 'nope'"):
        await h.pigtail.add_task("nope", "job")
    with pytest.raises(NotFound, match="no such queue"):
        await h.pigtail.list_tasks("nope")
    with pytest.raises(NotFound, match="no such queue"):
        await h.pigtail.delete_queue("nope")
    with pytest.raises(AlreadyExists, match="timeout_ms=1000 and no max_attempts"):
        await h.pigtail.create_queue("q", 5)
    assert len(h.log.entries) == count + 1  # only the done was appended


async def test_bad_input_appends_nothing(h: Harness) -> None:
    await h.pigtail.create_queue("q", 1000)
    task_id = await h.add()
    count = len(h.log.entries)
    with pytest.raises(InvalidArgument, match="timeout_ms"):
        await h.pigtail.create_queue("r", -1)
    with pytest.raises(InvalidArgument, match="queue name"):
        await h.pigtail.create_queue("no spaces", 10)
    with pytest.raises(InvalidArgument, match="max_attempts"):
        await h.pigtail.create_queue("r", 10, 0)
    with pytest.raises(InvalidArgument, match="task_name is required"):
        await h.pigtail.add_task("q", "")
    with pytest.raises(InvalidArgument, match="not both"):
        await h.pigtail.add_task("q", "job", not_before_ms=T0, delay_ms=5)
    with pytest.raises(TooLarge, match="info"):
        await h.pigtail.add_task("q", "job", "x" * 600_000)
    deep: Any = 1
    for _ in range(MAX_INFO_DEPTH + 1):
        deep = [deep]
    for key in (None, "used"):  # also where the key would make it a repeat of an earlier add
        if key == "used":
            await h.pigtail.add_task("q", "job", idempotency_key=key)
            count += 1
        with pytest.raises(InvalidArgument, match=f"deeper than {MAX_INFO_DEPTH} levels"):
            await h.pigtail.add_task("q", "job", deep, idempotency_key=key)
    assert (await h.pigtail.add_task("q", "job", deep[0]))[1]  # as deep as allowed
    count += 1
    with pytest.raises(InvalidArgument, match="worker_id is required"):
        await h.pigtail.claim("q", task_id, "")
    with pytest.raises(InvalidArgument, match="wait_ms"):
        await h.pigtail.claim_next("q", "w", -1)
    assert len(h.log.entries) == count


async def test_an_expired_claim_goes_back_to_pending(h: Harness) -> None:
    await h.pigtail.create_queue("q", 1000)
    task_id = await h.add()
    await h.pigtail.claim("q", task_id, "w1")
    h.advance(999)
    assert (await h.pigtail.list_tasks("q"))[0][1]["state"] == "working"
    h.advance(1)
    assert (await h.pigtail.list_tasks("q"))[0][1]["state"] == "pending"
    with pytest.raises(Contended, match="holds no unexpired lease"):
        await h.pigtail.heartbeat("q", task_id, "w1")
    view, _ = await h.pigtail.claim("q", task_id, "w2")
    assert view["worker"] == "w2" and view["attempts"] == 2


async def test_heartbeat_extends_the_lease(h: Harness) -> None:
    await h.pigtail.create_queue("q", 1000)
    task_id = await h.add()
    await h.pigtail.claim("q", task_id, "w1")
    h.advance(800)
    view = await h.pigtail.heartbeat("q", task_id, "w1")
    assert view["lease_expires_ms"] == T0 + 1800 and view["attempts"] == 1
    h.advance(900)
    assert (await h.pigtail.get_task("q", task_id))["state"] == "working"


async def test_a_heartbeat_racing_its_workers_release_does_not_take_the_task_again(h: Harness) -> None:
    """A release and then a heartbeat of the same worker, both checked before either is applied (two
    WorkTasks messages, or two calls): the heartbeat must not start a new lease and count an attempt."""
    await h.pigtail.create_queue("q", 60_000)
    task_id = await h.add()
    await h.pigtail.claim("q", task_id, "w1")
    h.advance(5)
    h.log.held = True
    count = len(h.log.entries)
    released = asyncio.ensure_future(h.pigtail.release("q", task_id, "w1"))
    await wait_for(lambda: len(h.log.entries) == count + 1)
    beat = asyncio.ensure_future(h.pigtail.heartbeat("q", task_id, "w1"))
    await wait_for(lambda: len(h.log.entries) == count + 2)
    h.log.release()
    assert (await released)["state"] == "pending"
    with pytest.raises(Contended, match="lease ended before this heartbeat took effect"):
        await beat
    view = await h.pigtail.get_task("q", task_id)
    assert (view["state"], view["attempts"]) == ("pending", 1)


async def applied_late(h: Harness, call: Awaitable[T], ms: int, *remote: tuple[int, Event]) -> T:
    """Run `call` with the log's delivery held until its entry is appended, then `ms` later deliver
    it, after the `remote` events (another node's, stamped at those walls): the answer comes then."""
    h.log.held = True
    count = len(h.log.entries)
    running = asyncio.ensure_future(call)
    await wait_for(lambda: len(h.log.entries) > count)
    h.advance(ms)
    for wall_ms, event in remote:
        h.log.remote(B, wall_ms, event)
    h.log.release()
    return await running


async def test_a_claim_answers_the_task_as_it_left_it_though_its_lease_ended_since(h: Harness) -> None:
    """With a 1 ms timeout the lease has ended by the time the claim is applied: the answer still
    says working, with the worker and the lease's end; a read after that says pending."""
    await h.pigtail.create_queue("q", 1)
    task_id = await h.add()
    view, renewal = await applied_late(h, h.pigtail.claim("q", task_id, "w1"), 5)
    assert not renewal
    assert (view["state"], view["worker"], view["attempts"]) == ("working", "w1", 1)
    assert view["lease_expires_ms"] == T0 + 1
    later = await h.pigtail.get_task("q", task_id)
    assert (later["state"], later["worker"], later["lease_expires_ms"]) == ("pending", "w1", T0 + 1)
    claimed = await applied_late(h, h.pigtail.claim_next("q", "w2"), 5)
    assert claimed is not None and (claimed["state"], claimed["worker"]) == ("working", "w2")
    assert claimed["lease_expires_ms"] == T0 + 6
    assert (await h.pigtail.get_task("q", task_id))["state"] == "pending"


async def test_a_heartbeat_answers_the_lease_it_extended_though_it_ended_since(h: Harness) -> None:
    await h.pigtail.create_queue("q", 10)
    task_id = await h.add()
    await h.pigtail.claim("q", task_id, "w1")
    h.advance(5)
    view = await applied_late(h, h.pigtail.heartbeat("q", task_id, "w1"), 20)
    assert (view["state"], view["worker"], view["lease_expires_ms"]) == ("working", "w1", T0 + 15)
    assert (await h.pigtail.get_task("q", task_id))["state"] == "pending"


async def test_a_claim_loses_to_an_earlier_claim_only(h: Harness) -> None:
    """Another node's claim stamped after the claim's lease ended does not make it lose (it won, and
    answers so); one stamped before it, while the task was claimable, does; so does a done."""
    await h.pigtail.create_queue("q", 1)
    task_id = await h.add()
    view, _ = await applied_late(
        h, h.pigtail.claim("q", task_id, "w1"), 5, (T0 + 3, TaskClaimed("q", task_id, "w2"))
    )
    assert (view["state"], view["worker"]) == ("working", "w1")
    assert (await h.pigtail.get_task("q", task_id))["worker"] == "w2"
    await h.pigtail.create_queue("r", 1000)
    task_id = await h.add("r")
    h.advance(10)  # now T0 + 15
    earlier = (T0 + 14, TaskClaimed("r", task_id, "w3"))
    with pytest.raises(Contended, match="a concurrent claim won: it is working, held by worker 'w3'"):
        await applied_late(h, h.pigtail.claim("r", task_id, "w1"), 5, earlier)
    done = (T0 + 21, TaskDone("r", task_id, "w3"))
    with pytest.raises(Contended, match="task is done"):
        await applied_late(h, h.pigtail.claim("r", task_id, "w3"), 5, done)


async def test_a_released_task_is_pending_again_at_once(h: Harness) -> None:
    await h.pigtail.create_queue("q", 60_000)
    task_id = await h.add()
    await h.pigtail.claim("q", task_id, "w1")
    with pytest.raises(Contended, match="worker 'w2' holds no unexpired lease"):
        await h.pigtail.release("q", task_id, "w2")
    h.advance(5)
    view = await h.pigtail.release("q", task_id, "w1")
    assert (view["state"], view["worker"], view["attempts"]) == ("pending", "w1", 1)
    assert view["lease_expires_ms"] == T0 + 5
    with pytest.raises(Contended, match="holds no unexpired lease"):
        await h.pigtail.release("q", task_id, "w1")  # given back already
    view, renewal = await h.pigtail.claim("q", task_id, "w2")
    assert not renewal and view["attempts"] == 2
    await h.pigtail.complete("q", task_id)
    with pytest.raises(Contended, match="done"):
        await h.pigtail.release("q", task_id, "w2")
    with pytest.raises(NotFound):
        await h.pigtail.release("q", "no-such-task", "w2")


async def test_a_release_on_the_last_attempt_dead_letters_the_task(h: Harness) -> None:
    await h.pigtail.create_queue("q", 60_000, 1)
    task_id = await h.add()
    await h.pigtail.claim("q", task_id, "w1")
    assert (await h.pigtail.release("q", task_id, "w1"))["state"] == "dead"


async def test_a_waiting_claim_gets_a_released_task(h: Harness) -> None:
    await h.pigtail.create_queue("q", 60_000)
    task_id = await h.add()
    await h.pigtail.claim("q", task_id, "w1")
    waiting = asyncio.create_task(h.pigtail.claim_next("q", "w2", wait_ms=30_000))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    await h.pigtail.release("q", task_id, "w1")
    view = await asyncio.wait_for(waiting, 10)
    assert view is not None and (view["task_id"], view["worker"]) == (task_id, "w2")


async def test_concurrent_claims_on_one_node_have_one_winner(h: Harness) -> None:
    await h.pigtail.create_queue("q", 1000)
    task_id = await h.add()
    results = await asyncio.gather(
        *(h.pigtail.claim("q", task_id, f"w{i}") for i in range(5)), return_exceptions=True
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(r, Contended) for r in results if isinstance(r, BaseException))
    assert (await h.pigtail.get_task("q", task_id))["worker"] == winners[0][0]["worker"]


async def test_adds_to_a_queue_created_by_a_node_far_ahead_are_refused_saying_why(h: Harness) -> None:
    """The create is stamped further ahead of this node's clock than it follows (60 s): a task added
    here would be stamped before its queue and never show (the add answered "deleted
    concurrently"). Refused, saying why, until the clocks agree."""
    h.log.remote(B, T0 + 2 * MAX_DRIFT_MS, QueueCreated("q", 1000))
    await wait_for(lambda: h.pigtail.state.config("q") is not None, message="the create applied")
    with pytest.raises(Unavailable, match="queue 'q' was created by a node whose clock runs more than 60 s"):
        await h.add()
    assert await h.pigtail.list_tasks("q") == []
    h.advance(2 * MAX_DRIFT_MS + 1)
    task_id = await h.add()
    assert [listed for listed, _ in await h.pigtail.list_tasks("q")] == [task_id]


async def test_a_create_after_a_delete_by_a_node_far_ahead_is_refused_saying_why(h: Harness) -> None:
    await h.pigtail.create_queue("q", 1000)
    h.log.remote(B, T0 + 2 * MAX_DRIFT_MS, QueueDeleted("q"))
    await wait_for(lambda: h.pigtail.state.config("q") is None, message="the delete applied")
    with pytest.raises(Unavailable, match="queue 'q' was deleted by a node whose clock runs more than 60 s"):
        await h.pigtail.create_queue("q", 1000)
    h.advance(2 * MAX_DRIFT_MS + 1)
    assert (await h.pigtail.create_queue("q", 1000))[1]


async def test_an_earlier_claim_from_another_node_wins_when_it_arrives(h: Harness) -> None:
    await h.pigtail.create_queue("q", 1000)
    task_id = await h.add()
    h.advance(10)
    view, _ = await h.pigtail.claim("q", task_id, "local")
    assert view["worker"] == "local"
    # The other side of a partition claimed it 5 ms earlier: once replicated, it wins here too.
    h.log.remote(B, T0 + 5, TaskClaimed("q", task_id, "remote"))

    async def remote_holds() -> bool:
        return (await h.pigtail.get_task("q", task_id))["worker"] == "remote"

    await wait_for(remote_holds)
    with pytest.raises(Contended, match="held by worker 'remote'"):
        await h.pigtail.heartbeat("q", task_id, "local")


def machine_listing(h: Harness, queue: str = "q") -> list[tuple[str, object]]:
    state = h.pigtail.state
    return sorted(list_tasks(state.open_tasks(queue), state.queue(queue), h.pigtail.now_ms()).items())


async def test_an_earlier_add_with_the_same_key_from_another_node_hides_ours(h: Harness) -> None:
    await h.pigtail.create_queue("q", 1000)
    h.advance(100)
    ours = await h.add(idempotency_key="k")
    h.log.remote(B, T0 + 50, TaskAdded("q", "theirs-id", "job", idempotency_key="k"))
    await wait_for(lambda: h.pigtail.state.cursor == len(h.log.entries))
    assert [task_id for task_id, _ in await h.pigtail.list_tasks("q")] == ["theirs-id"] != [ours]
    assert sorted(await h.pigtail.list_tasks("q")) == machine_listing(h)
    info = await h.pigtail.get_queue("q")
    assert info.pending == 1


async def test_a_concurrent_delete_leaves_the_recreated_queue_empty(h: Harness) -> None:
    await h.pigtail.create_queue("q", 1000)
    h.advance(100)
    await h.add()
    h.log.remote(B, T0 + 50, QueueDeleted("q"))  # another node deleted the queue it had seen created
    await wait_for(lambda: h.pigtail.state.cursor == len(h.log.entries))
    h.advance(100)
    await h.pigtail.create_queue("q", 1000)
    assert await h.pigtail.list_tasks("q") == [] == machine_listing(h)
    assert (await h.pigtail.get_queue("q")).pending == 0


async def test_winning_settings_from_another_node_apply_to_held_claims(h: Harness) -> None:
    await h.pigtail.create_queue("q", 60_000)
    h.advance(100)
    task_id = await h.add()
    await h.pigtail.claim("q", task_id, "w1")
    # Another node created the queue concurrently, earlier, with a 1 s timeout: its settings win.
    h.log.remote(B, T0 - 5, QueueCreated("q", 1000))
    await wait_for(lambda: h.pigtail.state.cursor == len(h.log.entries))
    config = h.pigtail.state.config("q")
    assert config is not None and config.timeout_ms == 1000
    h.advance(5000)
    assert (await h.pigtail.get_task("q", task_id))["state"] == "pending"
    assert await h.pigtail.list_tasks("q") == [(task_id, {"task_name": "job", "state": "pending"})]
    claimed = await h.pigtail.claim_next("q", "w2")
    assert claimed is not None and claimed["task_id"] == task_id


async def test_idempotency_key_makes_a_repeated_add_a_no_op(h: Harness) -> None:
    await h.pigtail.create_queue("q", 1000)
    first, created = await h.pigtail.add_task("q", "job", 1, idempotency_key="order-7")
    assert created
    count = len(h.log.entries)
    again, created = await h.pigtail.add_task("q", "job", 2, idempotency_key="order-7")
    assert not created and again["task_id"] == first["task_id"] and again["info"] == 1
    assert len(h.log.entries) == count
    await h.pigtail.complete("q", first["task_id"])
    _, created = await h.pigtail.add_task("q", "job", 3, idempotency_key="order-7")
    assert not created  # keys last as long as the queue


async def test_dead_letter_and_retry(h: Harness) -> None:
    await h.pigtail.create_queue("q", 100, max_attempts=2)
    task_id = await h.add()
    for worker in ("w1", "w2"):
        await h.pigtail.claim("q", task_id, worker)
        h.advance(100)
    assert await h.pigtail.list_tasks("q") == []
    assert await h.pigtail.list_dead("q") == [(task_id, {"task_name": "job", "state": "dead"})]
    with pytest.raises(Contended, match="dead-lettered"):
        await h.pigtail.claim("q", task_id, "w3")
    assert await h.pigtail.claim_next("q", "w3") is None
    view = await h.pigtail.retry("q", task_id)
    assert view["state"] == "pending" and view["attempts"] == 0
    assert await h.pigtail.list_dead("q") == []
    with pytest.raises(Contended, match="only a dead-lettered task"):
        await h.pigtail.retry("q", task_id)
    claimed = await h.pigtail.claim_next("q", "w3")
    assert claimed is not None and claimed["task_id"] == task_id


async def test_delayed_tasks_wait_until_due(h: Harness) -> None:
    await h.pigtail.create_queue("q", 1000)
    task_id = await h.add(delay_ms=500)
    assert (await h.pigtail.list_tasks("q"))[0][1]["state"] == "delayed"
    with pytest.raises(Contended, match="delayed"):
        await h.pigtail.claim("q", task_id, "w")
    assert await h.pigtail.claim_next("q", "w") is None
    h.advance(500)
    claimed = await h.pigtail.claim_next("q", "w")
    assert claimed is not None and claimed["task_id"] == task_id


async def test_claim_next_by_priority_then_age(h: Harness) -> None:
    await h.pigtail.create_queue("q", 1000)
    old = await h.add()
    h.advance(1)
    young = await h.add()
    h.advance(1)
    urgent = await h.add(priority=10)
    order = []
    for _ in range(3):
        claimed = await h.pigtail.claim_next("q", "w")
        assert claimed is not None
        order.append(claimed["task_id"])
    assert order == [urgent, old, young]
    assert [task_id for task_id, _ in await h.pigtail.list_tasks("q")] == [urgent, old, young]
    assert await h.pigtail.claim_next("q", "w") is None


async def test_claim_next_waits_for_a_task(h: Harness) -> None:
    await h.pigtail.create_queue("q", 1000)
    waiting = asyncio.create_task(h.pigtail.claim_next("q", "w", wait_ms=10_000))
    await asyncio.sleep(0)
    assert not waiting.done()
    task_id = await h.add()
    claimed = await asyncio.wait_for(waiting, 5)
    assert claimed is not None and claimed["task_id"] == task_id and claimed["worker"] == "w"


async def test_waiting_claimers_get_a_task_that_falls_due_meanwhile(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Time alone makes a delayed task claimable: claimers waiting since before it was added are
    woken then, not at the end of their own wait (nor at the lease stream's safety net)."""
    monkeypatch.setattr(engine, "LEASE_RECHECK_S", 60.0)
    await h.pigtail.create_queue("q", 60_000)
    claim = asyncio.create_task(h.pigtail.claim_next("q", "w1", wait_ms=60_000))
    leases = h.pigtail.lease("q", "w2")
    lease: asyncio.Task[TaskView] = asyncio.ensure_future(anext(leases))
    await asyncio.sleep(0.01)
    first, second = await h.add(delay_ms=100), await h.add(delay_ms=100)
    await asyncio.sleep(0.01)
    assert not claim.done() and not lease.done()
    h.advance(100)
    claimed, leased = await asyncio.wait_for(asyncio.gather(claim, lease), 5)
    assert claimed is not None
    assert {claimed["task_id"], leased["task_id"]} == {first, second}
    await leases.aclose()


async def test_a_waiting_claimer_gets_a_task_whose_claim_expires_meanwhile(h: Harness) -> None:
    await h.pigtail.create_queue("q", 100)
    waiting = [asyncio.create_task(h.pigtail.claim_next("q", w, wait_ms=60_000)) for w in ("w1", "w2")]
    await asyncio.sleep(0.01)
    task_id = await h.add()
    done, pending = await asyncio.wait(waiting, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    first = done.pop().result()
    assert first is not None and first["task_id"] == task_id
    h.advance(100)  # the first claim expires: the other claimer, waiting all along, takes the task
    second = await asyncio.wait_for(pending.pop(), 5)
    assert second is not None and second["task_id"] == task_id
    assert second["worker"] != first["worker"] and second["attempts"] == 2


async def test_lease_stream_respects_max_in_flight(h: Harness) -> None:
    await h.pigtail.create_queue("q", 60_000)
    ids = [await h.add() for _ in range(3)]
    leases = h.pigtail.lease("q", "w", max_in_flight=2)
    first = await asyncio.wait_for(anext(leases), 5)
    second = await asyncio.wait_for(anext(leases), 5)
    assert [first["task_id"], second["task_id"]] == ids[:2]
    third: asyncio.Task[TaskView] = asyncio.ensure_future(anext(leases))
    await asyncio.sleep(0.05)
    assert not third.done()  # the worker holds two already
    await h.pigtail.complete("q", first["task_id"], "w")
    got = await asyncio.wait_for(third, 5)
    assert got["task_id"] == ids[2] and got["worker"] == "w" and got["state"] == "working"
    fourth = asyncio.ensure_future(anext(leases))
    await asyncio.sleep(0.05)
    assert not fourth.done()
    await h.pigtail.complete("q", second["task_id"], "w")
    await asyncio.sleep(0.05)
    assert not fourth.done()  # nothing left to hand out: it waits, without polling
    new = await h.add()
    assert (await asyncio.wait_for(fourth, 5))["task_id"] == new
    await leases.aclose()


async def test_with_other_nodes_up_a_node_claims_from_its_share_first(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers on every node look at the same best tasks: each node takes its share first, so that two
    nodes seldom claim one task before their claims meet (one would lose, the task done twice)."""
    await h.pigtail.create_queue("q", 60_000)
    ids = [await h.add()]
    # The peer's id puts the oldest task in the peer's share (this node's share is 1 - its hash % 2).
    own_index = 1 - zlib.crc32(ids[0].encode()) % 2
    peer = "00000000-0000-4000-8000-000000000000" if own_index else "ffffffff-ffff-4fff-bfff-ffffffffffff"
    assert sorted([h.log.node_id, peer]).index(h.log.node_id) == own_index
    while len(ids) < 4 or not any(zlib.crc32(i.encode()) % 2 == own_index for i in ids):
        ids.append(await h.add())
    share = [i for i in ids if zlib.crc32(i.encode()) % 2 == own_index]
    peer_up = {peer: Promise(Stamp(h.pigtail.now_ms(), 0), 0)}
    monkeypatch.setattr(h.log, "promises", lambda: peer_up)
    claimed = [await h.pigtail.claim_next("q", f"w{i}") for i in range(len(ids))]
    got = [v["task_id"] for v in claimed if v is not None]
    assert got == share  # the others are left to the peer for a moment
    h.advance(OTHERS_AFTER_MS - 1)
    assert await h.pigtail.claim_next("q", "v") is None
    h.advance(1)  # then handed out too
    rest = [await h.pigtail.claim_next("q", f"v{i}") for i in range(len(ids) - len(share))]
    assert sorted(v["task_id"] for v in rest if v is not None) == sorted(set(ids) - set(share))


async def test_a_node_whose_peers_are_silent_hands_tasks_out_in_order(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    await h.pigtail.create_queue("q", 60_000)
    ids = [await h.add() for _ in range(4)]
    long_ago = h.pigtail.now_ms() - engine.UP_PROMISE_MS - 1
    monkeypatch.setattr(h.log, "promises", lambda: {B: Promise(Stamp(long_ago, 0), 0)})
    claimed = [await h.pigtail.claim_next("q", f"w{i}") for i in range(len(ids))]
    assert [v["task_id"] for v in claimed if v is not None] == ids


async def test_lease_stream_ends_when_the_queue_is_deleted(h: Harness) -> None:
    await h.pigtail.create_queue("q", 1000)
    leases = h.pigtail.lease("q", "w")
    pending = asyncio.ensure_future(anext(leases))
    await asyncio.sleep(0.01)
    await h.pigtail.delete_queue("q")
    with pytest.raises(NotFound, match="no such queue"):
        await asyncio.wait_for(pending, 5)


async def test_restart_resumes_from_the_stored_cursor(h: Harness) -> None:
    await h.pigtail.create_queue("q", 1000)
    done = await h.add()
    kept = await h.add()
    await h.pigtail.claim("q", kept, "w")
    await h.pigtail.complete("q", done)
    await h.restart()
    assert h.pigtail.state.cursor == len(h.log.entries)
    assert (await h.pigtail.get_task("q", done))["state"] == "done"
    assert (await h.pigtail.get_task("q", kept))["worker"] == "w"
    assert [task_id for task_id, _ in await h.pigtail.list_tasks("q")] == [kept]
    # Entries appended while it was down are applied after the restart, and new writes work.
    await h.pigtail.stop()
    h.log.remote(B, T0 + 50, TaskClaimed("q", kept, "other"))
    h.pigtail = Pigtail(h.log, h.store, h.clock)
    await h.pigtail.start()
    await wait_for(lambda: h.pigtail.state.cursor == len(h.log.entries))
    assert (await h.pigtail.get_task("q", kept))["worker"] == "w"  # a void claim: w held the lease
    await h.add()
    assert len(await h.pigtail.list_tasks("q")) == 2


@dataclass(frozen=True)
class Placed:
    """Where a scheduler has a queue's tasks (each known task's state, name and rank, and its wake time
    if it waits), and what it answers from that: listings, counts, picks (the claim order), next wake."""

    known: dict[str, tuple[TaskStatus, str, Rank]]
    where: dict[str, int | None]
    listing: list[tuple[Rank, tuple[str, ListEntry]]]
    dead: list[tuple[str, tuple[str, ListEntry]]]
    counts: dict[TaskStatus, int]
    picks: list[str]
    wake_ms: int | None


def placed(h: Harness, scheduler: Scheduler, queue: str) -> Placed:
    """Where `scheduler` has the queue's tasks now, each checked against the machine's views."""
    state, now = h.pigtail.state, h.pigtail.now_ms()
    tasks, queue_state = state.open_tasks(queue), state.queue(queue)
    args = (queue, tasks.get, queue_state, now)
    listing, dead, counts = scheduler.listing(*args), scheduler.dead(*args), scheduler.counts(*args)
    q = scheduler._queues[queue]
    known, where = dict(q.known), dict(q.where)
    picks: list[str] = []
    while (task_id := scheduler.pick(*args, exclude=set(picks))) is not None:
        picks.append(task_id)
    assert dict(entry for _, entry in listing) == list_tasks(tasks, queue_state, now)
    assert dict(entry for _, entry in dead) == list_dead(tasks, queue_state, now)
    assert picks == claimable_order(tasks, queue_state, now)
    views = {task_id: task_view(task, queue_state, now) for task_id, task in tasks.items()}
    assert known.keys() == {task_id for task_id, view in views.items() if view and view["state"] != "done"}
    for task_id, (status, name, order) in known.items():
        view = views[task_id]
        assert view is not None
        assert (status, name, order) == (view["state"], view["task_name"], rank(tasks[task_id]))
        wake = {"working": view["lease_expires_ms"], "delayed": view["not_before_ms"]}.get(status)
        assert where.get(task_id) == wake
    return Placed(known, where, listing, dead, counts, picks, scheduler.next_wake_ms(queue))


async def test_a_restart_places_the_open_tasks_where_they_were(h: Harness) -> None:
    """At start every open task is placed by where it stands (judged against its queue's incarnation,
    worked out once per queue): the same states, ranks and wake times as the scheduler that placed it
    as its events were applied had, so the same listings and picks, the machine's, as time passes."""
    await h.pigtail.create_queue("q", 1000, max_attempts=2)
    await h.pigtail.create_queue("other", 500)
    h.advance(100)
    ours = await h.add(idempotency_key="k")
    h.log.remote(B, T0 + 50, TaskAdded("q", "theirs", "job", idempotency_key="k"))  # wins the key
    expired, urgent, low, released, dead, done, working = [
        await h.add(priority=priority) for priority in (0, 5, -1, 0, 0, 0, 0)
    ]
    delayed = await h.add(delay_ms=3000)
    await h.add("other")
    other_working = await h.add("other")
    await h.pigtail.claim("q", dead, "w1")
    await h.pigtail.claim("q", expired, "w3")
    h.advance(1000)
    await h.pigtail.claim("q", dead, "w2")  # its last attempt
    h.advance(1000)  # the leases of `dead` and `expired` have ended: neither was placed since
    await h.pigtail.claim("q", released, "w1")
    await h.pigtail.release("q", released, "w1")
    await h.pigtail.complete("q", done)
    await h.pigtail.claim("q", working, "w1")
    h.advance(10)
    await h.pigtail.heartbeat("q", working, "w1")
    await h.pigtail.claim("other", other_working, "w1")
    before = h.pigtail._scheduler
    await h.restart()
    await h.pigtail.list_tasks("q")  # waits for the placing
    after = h.pigtail._scheduler
    assert ours in h.pigtail.state.open_tasks("q")  # but hidden
    for step_ms in (0, 499, 1, 500, 10_000):  # through the ends of the leases and the delay
        h.advance(step_ms)
        for queue in ("q", "other"):
            assert placed(h, after, queue) == placed(h, before, queue)
        if step_ms == 0:
            now = placed(h, after, "q")
            assert now.counts == {"pending": 5, "working": 1, "delayed": 1, "dead": 1}
            assert now.picks == [urgent, "theirs", expired, released, low]
            assert [task_id for _, (task_id, _) in now.dead] == [dead]
            assert now.known[delayed][0] == "delayed"


async def test_delete_and_recreate_gives_an_empty_queue(h: Harness) -> None:
    await h.pigtail.create_queue("q", 1000)
    await h.add()
    await h.pigtail.delete_queue("q")
    with pytest.raises(NotFound):
        await h.pigtail.list_tasks("q")
    assert await h.pigtail.list_queues() == []
    config, created = await h.pigtail.create_queue("q", 50, 3)
    assert created and (config.timeout_ms, config.max_attempts) == (50, 3)
    assert await h.pigtail.list_tasks("q") == []
    assert [name for name, _ in await h.pigtail.list_queues()] == ["q"]
    info = await h.pigtail.get_queue("q")
    assert (info.pending, info.working, info.delayed, info.dead) == (0, 0, 0, 0)


@pytest.mark.parametrize("seed", [7, 8, 9])
async def test_listing_and_claim_next_agree_with_the_machine_at_every_moment(h: Harness, seed: int) -> None:
    """The scheduler's listing (kept up to date from events, re-checked when a lease or a delay ends)
    answers what the machine's list_tasks answers, in claim order, through a random history."""
    await h.pigtail.create_queue("q", 100, max_attempts=2)
    rng = random.Random(seed)
    ids: list[str] = []
    seen: set[str] = set()
    for _ in range(400):
        op = rng.random()
        task_id = rng.choice(ids) if ids else ""
        worker = f"w{rng.randint(1, 3)}"
        with contextlib.suppress(Contended, NotFound):
            if op < 0.25 or not ids:
                delay = rng.choice([None, None, rng.randint(1, 300)])
                ids.append(await h.add(delay_ms=delay, priority=rng.randint(0, 2)))
            elif op < 0.5:
                await h.pigtail.claim("q", task_id, worker)
            elif op < 0.6:
                await h.pigtail.complete("q", task_id, worker)
            elif op < 0.7:
                await h.pigtail.retry("q", task_id)
            elif op < 0.8:
                await h.pigtail.heartbeat("q", task_id, worker)
            elif op < 0.9:
                await h.pigtail.claim_next("q", worker)
        h.advance(rng.randint(0, 60))
        now = h.pigtail.now_ms()
        state = h.pigtail.state
        expected = list_tasks(state.open_tasks("q"), state.queue("q"), now)
        listed = await h.pigtail.list_tasks("q")
        assert dict(listed) == expected
        assert [task_id for task_id, _ in listed] == sorted(
            expected, key=lambda i: rank(state.open_tasks("q")[i])
        )
        assert dict(await h.pigtail.list_dead("q")) == list_dead(state.open_tasks("q"), state.queue("q"), now)
        info = await h.pigtail.get_queue("q")
        states = [e["state"] for e in expected.values()]
        seen.update(states)
        seen.update("dead" for _ in range(info.dead))
        assert (info.pending, info.working, info.delayed) == tuple(
            states.count(s) for s in ("pending", "working", "delayed")
        )
    assert seen == {"pending", "working", "delayed", "dead"}


class FailingStore(MemoryStore):
    """A MemoryStore whose next `failures` writes fail (as a full disk would), and whose next
    `read_failures` reads fail (as a bad disk would)."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0
        self.read_failures = 0

    def get(self, key: bytes) -> bytes | None:
        if self.read_failures:
            self.read_failures -= 1
            raise OSError("IO error: a read failed")
        return super().get(key)

    def write(self, batch: Sequence[Write], *, sync: bool = False) -> None:
        if self.failures:
            self.failures -= 1
            raise OSError("IO error: No space left on device")
        super().write(batch, sync=sync)


@pytest.mark.parametrize(
    ("failing", "times"), [("failures", 3), ("read_failures", 3 * APPLY_ATTEMPTS)], ids=["writes", "reads"]
)
async def test_a_failing_store_is_retried_not_skipped(
    monkeypatch: pytest.MonkeyPatch, failing: str, times: int
) -> None:
    """Writes, or reads while planning, that fail for a while: the task is applied once the store
    works again. Reads fail here more times in a row than an entry that fails by itself is tried
    before it is skipped (a task used to be skipped so, on this node only)."""
    monkeypatch.setattr(engine, "APPLY_RETRY", Backoff(first=0.001, cap=0.01))
    clock = HybridClock(Clock())
    store = FailingStore()
    pigtail = Pigtail(FakeLog(clock), store, clock)
    await pigtail.start()
    try:
        await pigtail.create_queue("q", 1000)
        setattr(store, failing, times)
        view, created = await pigtail.add_task("q", "job")
        assert created and getattr(store, failing) == 0
        assert await pigtail.list_tasks("q") == [(view["task_id"], {"task_name": "job", "state": "pending"})]
    finally:
        await pigtail.stop()


async def failing_planning(
    h: Harness,
    monkeypatch: pytest.MonkeyPatch,
    failure: Callable[[Sequence[tuple[int, Entry]]], Exception | None],
) -> None:
    """h's Pigtail restarted with fast retries and queue "q", planning a batch raising `failure(batch)`
    when that is an exception."""
    monkeypatch.setattr(engine, "APPLY_RETRY", Backoff(first=0.001, cap=0.01))
    await h.restart()  # its applier takes the retry delays as it starts
    await h.pigtail.create_queue("q", 1000)
    plan = h.pigtail.state.plan

    def plan_or_fail(batch: DeliveredBatch, *args: Any) -> Applied:
        if (error := failure(batch.entries)) is not None:
            raise error
        return plan(batch, *args)

    monkeypatch.setattr(h.pigtail.state, "plan", plan_or_fail)


async def test_an_entry_that_cannot_be_planned_is_skipped_alone(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def bug(batch: Sequence[tuple[int, Entry]]) -> Exception | None:
        boom = any(b"boom" in entry.SerializeToString() for _, entry in batch)
        return RuntimeError("a bug") if boom else None

    await failing_planning(h, monkeypatch, bug)
    with pytest.raises(RuntimeError, match="could not be applied"):
        await h.pigtail.add_task("q", "boom")
    kept = await h.add()
    assert await h.pigtail.list_tasks("q") == [(kept, {"task_name": "job", "state": "pending"})]
    assert h.pigtail.state.cursor == len(h.log.entries)
    assert h.pigtail._plan_failures.count == APPLY_ATTEMPTS  # tried again before skipping it


async def test_an_entry_whose_planning_fails_once_is_applied_on_the_next_try(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planning reads the store: a read that fails once (an I/O error) must not drop a logged task."""
    failures = 2  # the batch, then the entry alone

    def once(batch: Sequence[tuple[int, Entry]]) -> Exception | None:
        nonlocal failures
        if not failures:
            return None
        failures -= 1
        return OSError("IO error: a read failed")

    await failing_planning(h, monkeypatch, once)
    task_id = await h.add()
    assert (await h.pigtail.get_task("q", task_id))["state"] == "pending"


def holding_claims(h: Harness) -> tuple[asyncio.Event, asyncio.Event, Callable[..., Awaitable[TaskView]]]:
    """A stand-in for Pigtail._claim that sets the first event when a claim starts and makes it only
    once the second is set."""
    claiming, go_on = asyncio.Event(), asyncio.Event()
    claim = h.pigtail._claim

    async def held_claim(queue: str, task: str, worker: str) -> TaskView:
        claiming.set()
        await go_on.wait()
        return await claim(queue, task, worker)

    return claiming, go_on, held_claim


class WorkerRequests:
    """What a test's worker sends on a WorkTasks stream: its start, then what it `put`s, until it
    `close`s its side."""

    def __init__(self, queue: str, max_in_flight: int) -> None:
        self._requests: asyncio.Queue[pigtail_pb2.WorkTasksRequest | None] = asyncio.Queue()
        start = pigtail_pb2.LeaseTasksRequest(queue=queue, worker_id="w", max_in_flight=max_in_flight)
        self._requests.put_nowait(pigtail_pb2.WorkTasksRequest(start=start))

    def put(self, **fields: Any) -> None:
        self._requests.put_nowait(pigtail_pb2.WorkTasksRequest(**fields))

    def close(self) -> None:
        self._requests.put_nowait(None)

    async def stream(self) -> AsyncIterator[pigtail_pb2.WorkTasksRequest]:
        while (request := await self._requests.get()) is not None:
            yield request


async def test_a_closed_work_session_hands_out_no_more_tasks(h: Harness) -> None:
    """The worker completes its task and closes its side at once: the completion wakes the lease
    just as the session cancels it, and the lease must still end (Python 3.11's wait_for would
    swallow that cancellation and claim the next task for the gone worker)."""
    await h.pigtail.create_queue("q", 1000, 1)
    first, second = await h.add(), await h.add()
    requests = WorkerRequests("q", max_in_flight=1)
    sent = []
    async for response in work_session(h.pigtail, requests.stream()):
        sent.append(response.WhichOneof("response"))
        if response.WhichOneof("response") == "task":
            requests.put(complete_task_id=response.task.task_id)
            requests.close()
    await wait_for(lambda: h.pigtail.state.cursor == len(h.log.entries))
    for _ in range(10):
        await asyncio.sleep(0)
    assert sent == ["task", "completed"]
    assert (await h.pigtail.get_task("q", first))["state"] == "done"
    assert (await h.pigtail.get_task("q", second))["state"] == "pending"
    assert not [t for t in asyncio.all_tasks() if "lease" in t.get_name() and not t.done()]


async def test_stop_leasing_ends_the_tasks_and_keeps_the_stream(h: Harness) -> None:
    """A worker stopping sends stop_leasing before its last complete (which would make room for
    another task), gets its completes answered on the open stream, then closes."""
    await h.pigtail.create_queue("q", 60_000)
    ids = [await h.add() for _ in range(3)]
    requests = WorkerRequests("q", max_in_flight=1)
    sent = []
    async for response in work_session(h.pigtail, requests.stream()):
        kind = response.WhichOneof("response")
        sent.append(kind)
        if kind == "task":
            requests.put(stop_leasing=True)
            requests.put(complete_task_id=response.task.task_id)
        elif kind == "completed":
            await asyncio.sleep(0.05)  # the stream stays open: a task now would come before the end
            requests.close()
    assert sent == ["task", "completed"]
    assert [(await h.pigtail.get_task("q", i))["state"] for i in ids] == ["done", "pending", "pending"]


async def test_a_work_session_takes_releases_and_hands_out_the_task_again(h: Harness) -> None:
    """A released task keeps its place in the queue: the lease, with room again, hands it out next."""
    await h.pigtail.create_queue("q", 60_000)
    first, second = await h.add(), await h.add()
    requests = WorkerRequests("q", max_in_flight=1)
    got = []
    async for response in work_session(h.pigtail, requests.stream()):
        kind = response.WhichOneof("response")
        got.append((kind, response.task.task_id if kind == "task" else None))
        if kind == "task" and len(got) == 1:
            requests.put(release_task_id=first)
        elif kind == "task":
            requests.put(complete_task_id=response.task.task_id)
        elif kind == "completed" and response.completed.task.task_id == second:
            requests.put(release_task_id="unknown")
        elif kind == "failure":
            assert response.failure.operation == pigtail_pb2.WORK_TASKS_OPERATION_RELEASE
            assert response.failure.code == 5  # NOT_FOUND
            requests.close()
    assert [g for g in got if g[0] == "task"] == [("task", first), ("task", first), ("task", second)]
    assert [g[0] for g in got if g[0] != "task"] == ["released", "completed", "completed", "failure"]
    assert (await h.pigtail.get_task("q", first))["attempts"] == 2


async def test_a_task_claimed_as_the_worker_closes_its_side_is_given_back(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker closes its side while the node is claiming a task for it: the claim is made, the
    worker can never get the task, so the stream releases it before ending (it was held until its
    lease ran out)."""
    await h.pigtail.create_queue("q", 60_000)
    task_id = await h.add()
    claiming, go_on, held_claim = holding_claims(h)
    monkeypatch.setattr(h.pigtail, "_claim", held_claim)
    requests = WorkerRequests("q", max_in_flight=1)
    session = work_session(h.pigtail, requests.stream())
    ending = asyncio.ensure_future(anext(session, None))
    await asyncio.wait_for(claiming.wait(), 10)
    requests.close()
    await asyncio.sleep(0.01)
    go_on.set()
    assert await asyncio.wait_for(ending, 10) is None  # the stream ended without sending the task
    view = await h.pigtail.get_task("q", task_id)
    assert (view["state"], view["worker"], view["attempts"]) == ("pending", "w", 0)  # not an attempt


async def test_a_task_claimed_as_the_worker_stops_leasing_goes_out_before_later_answers(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker sends stop_leasing, then its last complete, and closes its side once that is answered
    (the README's way to stop): a task whose claim was under way must reach it before that answer."""
    await h.pigtail.create_queue("q", 60_000)
    first = await h.add()
    claiming, go_on, held_claim = holding_claims(h)
    requests = WorkerRequests("q", max_in_flight=2)
    session = work_session(h.pigtail, requests.stream())
    assert (await anext(session)).task.task_id == first
    monkeypatch.setattr(h.pigtail, "_claim", held_claim)
    second = await h.add()
    await asyncio.wait_for(claiming.wait(), 10)
    requests.put(stop_leasing=True)
    requests.put(complete_task_id=first)
    for _ in range(20):
        await asyncio.sleep(0)  # the complete is made, its answer waits
    go_on.set()
    messages = [await asyncio.wait_for(anext(session), 10) for _ in range(2)]
    assert [m.WhichOneof("response") for m in messages] == ["task", "completed"]
    assert messages[0].task.task_id == second
    requests.put(complete_task_id=second)
    assert (await asyncio.wait_for(anext(session), 10)).WhichOneof("response") == "completed"
    requests.close()
    assert await asyncio.wait_for(anext(session, None), 10) is None


@pytest.mark.parametrize("how", ["work stream", "claim next"])
async def test_a_claim_under_way_when_its_caller_is_cancelled_is_given_back(
    h: Harness, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """The claim is in the log already, the call waits for it to be applied, and is cancelled (the
    client went away, a deadline): the claim is made all the same, and given back at once, with its
    attempt (a task no worker got must not be dead-lettered: here it is the only attempt allowed)."""
    await h.pigtail.create_queue("q", 60_000, 1)
    task_id = await h.add()
    appended, go_on = asyncio.Event(), asyncio.Event()
    append = h.pigtail._append

    async def slow_append(event: Any, dependencies: Any) -> Any:
        entry = await append(event, dependencies)
        if isinstance(event, TaskClaimed):
            appended.set()
            await go_on.wait()
        return entry

    monkeypatch.setattr(h.pigtail, "_append", slow_append)
    if how == "work stream":
        session = work_session(h.pigtail, WorkerRequests("q", max_in_flight=1).stream())
        call: asyncio.Future[Any] = asyncio.ensure_future(anext(session))
    else:
        call = asyncio.ensure_future(h.pigtail.claim_next("q", "w", wait_ms=10_000))
    await asyncio.wait_for(appended.wait(), 10)
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    if how == "work stream":
        await session.aclose()
    go_on.set()

    async def given_back() -> bool:
        view = await h.pigtail.get_task("q", task_id)
        return (view["state"], view["worker"], view["attempts"]) == ("pending", "w", 0)

    await wait_for(given_back)


async def test_tasks_not_sent_when_a_work_stream_is_cancelled_are_given_back(h: Harness) -> None:
    """Closed at a task's message (grpc's write of it failed, or was cut: it took no more), the
    stream gives that task back, and those claimed but not sent yet."""
    await h.pigtail.create_queue("q", 60_000)
    ids = {await h.add(), await h.add()}
    requests = WorkerRequests("q", max_in_flight=2)
    session = work_session(h.pigtail, requests.stream())
    at_message = (await anext(session)).task.task_id
    (unsent,) = ids - {at_message}

    async def both_claimed() -> bool:
        return (await h.pigtail.get_task("q", unsent))["state"] == "working"

    await wait_for(both_claimed)
    for _ in range(10):
        await asyncio.sleep(0)  # the lease puts the claimed task out to send
    await session.aclose()  # as gRPC closes the generator of a cancelled call

    async def given_back() -> bool:
        views = [await h.pigtail.get_task("q", task_id) for task_id in ids]
        return all((v["state"], v["attempts"]) == ("pending", 0) for v in views)

    await wait_for(given_back)


@pytest.mark.parametrize("stream", ["WorkTasks", "LeaseTasks"])
async def test_a_task_whose_message_went_out_stays_with_the_worker_when_its_stream_ends(
    h: Harness, stream: str
) -> None:
    """grpc asks for the next message once a task's is written: a stream cancelled then leaves the
    task claimed (the worker may be doing it); cancelled while grpc still held the message (closed
    at it), it gives the task back."""
    await h.pigtail.create_queue("q", 60_000)
    first, second = await h.add(), await h.add()
    servicer = PigtailServicer(h.pigtail)

    def open_stream() -> AsyncGenerator[Any, None]:
        if stream == "WorkTasks":
            return work_session(h.pigtail, WorkerRequests("q", max_in_flight=1).stream())
        request = pigtail_pb2.LeaseTasksRequest(queue="q", worker_id="w", max_in_flight=1)
        return cast(AsyncGenerator[Any, None], servicer.LeaseTasks(request, cast(Any, None)))

    written = open_stream()
    assert (await anext(written)).task.task_id == first
    following = asyncio.ensure_future(anext(written))  # grpc wrote it and waits for the next
    for _ in range(10):
        await asyncio.sleep(0)
    following.cancel()
    await asyncio.gather(following, return_exceptions=True)
    await written.aclose()
    cut = open_stream()
    assert (await anext(cut)).task.task_id == second
    await cut.aclose()  # closed at the message

    async def second_given_back() -> bool:
        return (await h.pigtail.get_task("q", second))["state"] == "pending"

    await wait_for(second_given_back)
    view = await h.pigtail.get_task("q", first)
    assert (view["state"], view["worker"]) == ("working", "w")


class OutOfTime:
    """The context of a call whose deadline has passed (grpc does not cancel a call at its deadline:
    the handler may run on, and finish, after it)."""

    class Aborted(Exception):
        pass

    def __init__(self) -> None:
        self.status: tuple[Any, str] | None = None

    def time_remaining(self) -> float:
        return 0.0

    async def abort(self, code: Any, details: str) -> None:
        self.status = (code, details)
        raise self.Aborted(details)


@pytest.mark.parametrize("rest", [False, True], ids=["ClaimNextTask", "RestClaimNextTask"])
async def test_a_claim_next_answered_after_its_deadline_gives_the_task_back(h: Harness, rest: bool) -> None:
    await h.pigtail.create_queue("q", 60_000, 1)
    task_id = await h.add()
    context = OutOfTime()
    with pytest.raises(OutOfTime.Aborted):
        if rest:
            body = HttpBody(content_type="application/json", data=b'{"worker_id": "w"}')
            request = pigtail_pb2.RestClaimNextTaskRequest(queue="q", body=body)
            await PigtailRestServicer(h.pigtail).RestClaimNextTask(request, cast(Any, context))
        else:
            claim = pigtail_pb2.ClaimNextTaskRequest(queue="q", worker_id="w")
            await PigtailServicer(h.pigtail).ClaimNextTask(claim, cast(Any, context))
    assert context.status is not None and context.status[0] == grpc.StatusCode.DEADLINE_EXCEEDED

    async def given_back() -> bool:
        view = await h.pigtail.get_task("q", task_id)
        return (view["state"], view["worker"], view["attempts"]) == ("pending", "w", 0)

    await wait_for(given_back)


async def test_a_lease_stream_ends_when_its_queue_is_deleted_and_created_again_at_once(h: Harness) -> None:
    """Another node's delete and re-create arrive together: the stream must not go on handing out the
    new queue's tasks (under other settings) to a worker that leased from the old one."""
    await h.pigtail.create_queue("q", 60_000)
    leases = h.pigtail.lease("q", "w")
    pending = asyncio.ensure_future(anext(leases))
    for _ in range(10):
        await asyncio.sleep(0)
    h.advance(100)
    h.log.held = True
    h.log.remote(B, T0 + 10, QueueDeleted("q"))
    h.log.remote(B, T0 + 20, QueueCreated("q", 1000))
    h.log.release()
    with pytest.raises(NotFound, match="deleted \\(and created again\\) while leasing"):
        await asyncio.wait_for(pending, 5)


async def test_a_state_ahead_of_the_log_is_rebuilt_from_it(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    """The log lost entries the state had applied (a power cut without --fsync): on start, the
    state is rebuilt from the log as it is, not resumed past entries that will take those positions."""
    await h.pigtail.create_queue("q", 1000)
    lost = await h.add()
    await wait_for(lambda: h.pigtail.state.cursor == 2)
    del h.log.entries[1:]  # the task's add is gone from the log
    await h.restart()
    await wait_for(lambda: h.pigtail.state.cursor == 1)
    assert "rebuilding the Pigtail state from the log" in caplog.text
    with pytest.raises(NotFound):
        await h.pigtail.get_task("q", lost)
    kept = await h.add()  # takes position 2
    assert (await h.pigtail.get_task("q", kept))["state"] == "pending"


async def test_a_state_rebuilt_from_the_log_is_caught_up_before_it_answers(h: Harness) -> None:
    """A node whose Pigtail state starts behind its log (rebuilt from it, or a store older than the
    log) answers no operation from that state: a queue it had acknowledged would be "no such queue"."""
    await h.pigtail.create_queue("q", 30_000)
    task_id = await h.add()
    await h.pigtail.stop()
    rebuilt = Pigtail(h.log, MemoryStore(), h.clock)
    await rebuilt.start()  # its applier has not had a turn yet
    try:
        assert (await rebuilt.get_queue("q")).pending == 1
        assert (await rebuilt.get_task("q", task_id))["state"] == "pending"
    finally:
        await rebuilt.stop()


async def test_an_operation_waits_for_the_catch_up_at_most_a_while(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    await h.pigtail.create_queue("q", 30_000)
    await h.pigtail.stop()
    monkeypatch.setattr(engine, "CATCH_UP_WAIT_S", 0.05)
    rebuilt = Pigtail(h.log, MemoryStore(), h.clock)
    await rebuilt.start()
    h.log.held = True  # from now on, nothing is delivered to the new state
    try:
        with pytest.raises(Unavailable, match="Pigtail state here is still being brought up to date"):
            await rebuilt.list_queues()
    finally:
        h.log.release()
        await rebuilt.stop()


async def test_a_lease_with_stop_cancelled_while_waiting_leaves_no_waiter_behind(h: Harness) -> None:
    """Its two waits (for work, for the stop) end with it: a wait left behind kept a place among
    the queue's ready waiters, and took the wake-up meant for a claim waiting behind it."""
    await h.pigtail.create_queue("q", 60_000)
    before = asyncio.all_tasks()
    stop = asyncio.Event()

    async def lease() -> None:
        async for _ in h.pigtail.lease("q", "w1", 1, stop):
            pass

    def waiting_for_work() -> bool:
        return any(not f.done() for f in h.pigtail._ready_waiters.get("q", ()))

    leasing = asyncio.create_task(lease())
    await wait_for(waiting_for_work)
    leasing.cancel()
    await asyncio.gather(leasing, return_exceptions=True)
    assert asyncio.all_tasks() - before == {asyncio.current_task()} - before
    assert not waiting_for_work()
    claiming = asyncio.create_task(h.pigtail.claim_next("q", "w2", wait_ms=60_000))
    await wait_for(waiting_for_work)
    task_id = await h.add()
    view = await asyncio.wait_for(claiming, 30)  # a lost wake-up would leave it waiting a minute
    assert view is not None and view["task_id"] == task_id


async def test_open_tasks_are_placed_a_chunk_at_a_time_once_started(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Placing 20,000 open tasks in the scheduler took half a second, which held up the start of the
    whole node (its log, KV, replication) when it was done at once."""
    monkeypatch.setattr(engine, "PLACE_CHUNK", 10)
    await h.pigtail.create_queue("q", 60_000)
    ids = [await h.add() for _ in range(50)]
    await h.pigtail.stop()
    h.pigtail = Pigtail(h.log, h.store, h.clock)
    async with loop_turns() as turns:
        await h.pigtail.start()
        assert turns.count == 0
        listed = await h.pigtail.list_tasks("q")  # waits for the placing
        assert turns.count >= 5
    assert sorted(task_id for task_id, _ in listed) == sorted(ids)
