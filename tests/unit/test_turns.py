"""`Turns`: at most one turn in any `every` passes of the event loop, handed out in order."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from potboiler.server.turns import Turns
from tests.conftest import loop_turns


async def test_a_turn_nobody_took_is_given_at_once() -> None:
    turns = Turns()
    async with loop_turns() as counted:
        before = counted.count
        await turns.take()
        assert counted.count == before  # no pass went by


@pytest.mark.parametrize("every", [1, 2, 4])
async def test_turns_are_spaced_by_every_passes_in_the_order_asked(every: int) -> None:
    turns = Turns(every)
    taken: list[tuple[int, int]] = []

    async with loop_turns() as counted:

        async def worker(name: int) -> None:
            for _ in range(3):
                await turns.take()
                taken.append((name, counted.count))
                await asyncio.sleep(0)  # as a caller does between its turns

        await asyncio.gather(*(worker(n) for n in range(4)))

    at = [pass_ for _, pass_ in taken]
    assert len(taken) == 12
    assert all(later - earlier >= every for earlier, later in itertools.pairwise(at))
    # In the order asked: each worker asks again after its turn, behind the others.
    assert [name for name, _ in taken] == [0, 1, 2, 3] * 3


async def test_a_cancelled_waiter_is_skipped() -> None:
    turns = Turns(2)
    await turns.take()
    cancelled = asyncio.create_task(turns.take())
    waiting = asyncio.create_task(turns.take())
    await asyncio.sleep(0)
    cancelled.cancel()
    async with asyncio.timeout(1):
        await waiting
    assert cancelled.cancelled()


async def test_once_nobody_waits_the_next_turn_is_given_at_once_again() -> None:
    turns = Turns(3)
    await turns.take()
    for _ in range(3):
        await asyncio.sleep(0)
    async with loop_turns() as counted:
        before = counted.count
        await turns.take()
        assert counted.count == before
