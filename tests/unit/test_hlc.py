from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from potboiler.server.hlc import MAX_DRIFT_MS, MAX_LOGICAL, HybridClock, Stamp


def test_follows_physical_time() -> None:
    t = [1000]
    clock = HybridClock(lambda: t[0])
    assert clock.now() == Stamp(1000, 0)
    t[0] = 1005
    assert clock.now() == Stamp(1005, 0)


def test_same_millisecond_counts_logically() -> None:
    clock = HybridClock(lambda: 7)
    assert [clock.now() for _ in range(3)] == [Stamp(7, 0), Stamp(7, 1), Stamp(7, 2)]


def test_never_goes_backwards_when_physical_time_does() -> None:
    t = [500]
    clock = HybridClock(lambda: t[0])
    first = clock.now()
    t[0] = 100
    assert clock.now() > first


def test_observed_stamps_are_exceeded() -> None:
    clock = HybridClock(lambda: 10)
    clock.observe(Stamp(99, 4))
    assert clock.now() == Stamp(99, 5)
    clock.observe(Stamp(50, 0))
    assert clock.now() == Stamp(99, 6)


def test_restart_resumes_after_last_stamp() -> None:
    clock = HybridClock(lambda: 1, last=Stamp(2000, 3))
    assert clock.now() == Stamp(2000, 4)


logicals = st.integers(0, 100) | st.integers(MAX_LOGICAL - 100, MAX_LOGICAL)


@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6), logicals), max_size=60))
def test_stamps_strictly_increase_and_fit_their_fields(ops: list[tuple[int, int, int]]) -> None:
    t = [0]
    clock = HybridClock(lambda: t[0])
    previous = Stamp(-1, 0)
    for kind, wall, logical in ops:
        if kind == 0:
            clock.observe_remote(Stamp(wall, logical))
            assert clock.last >= min(Stamp(wall, logical), Stamp(t[0] + MAX_DRIFT_MS, 0))
            continue
        t[0] = wall
        count = 1 if kind == 1 else logical % 1000 + 1
        first = clock.now_many(count)
        assert first > previous
        assert clock.last == Stamp(first.wall_ms, first.logical + count - 1)
        assert clock.last.logical <= MAX_LOGICAL
        previous = clock.last


def test_a_stamp_at_the_largest_logical_moves_on_to_the_next_millisecond() -> None:
    clock = HybridClock(lambda: 5)
    clock.observe_remote(Stamp(6, MAX_LOGICAL))
    assert clock.now() == Stamp(7, 0)
    clock.observe_remote(Stamp(7, MAX_LOGICAL - 2))
    assert clock.now_many(3) == Stamp(8, 0) and clock.last == Stamp(8, 2)
    assert clock.now_many(2) == Stamp(8, 3)


def test_a_remote_stamp_far_ahead_moves_the_clock_only_to_the_drift_bound() -> None:
    t = [1_000_000]
    clock = HybridClock(lambda: t[0])
    clock.observe_remote(Stamp(t[0] + MAX_DRIFT_MS + 3_600_000, 7))
    assert clock.last == Stamp(t[0] + MAX_DRIFT_MS, 0)
    assert clock.now() == Stamp(t[0] + MAX_DRIFT_MS, 1)
    # within the bound, a remote stamp is adopted as it is
    clock.observe_remote(Stamp(t[0] + MAX_DRIFT_MS, 5))
    assert clock.now() == Stamp(t[0] + MAX_DRIFT_MS, 6)
    t[0] += 2 * MAX_DRIFT_MS
    assert clock.now() == Stamp(t[0], 0)


def test_own_history_is_observed_however_far_ahead() -> None:
    clock = HybridClock(lambda: 1_000)
    clock.observe(Stamp(1_000 + 10 * MAX_DRIFT_MS, 3))
    assert clock.now() == Stamp(1_000 + 10 * MAX_DRIFT_MS, 4)
