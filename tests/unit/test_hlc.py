from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from potboiler.server.hlc import MAX_DRIFT_MS, HybridClock, Stamp


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


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 10**6), st.integers(0, 100)), max_size=60))
def test_stamps_strictly_increase(ops: list[tuple[bool, int, int]]) -> None:
    t = [0]
    clock = HybridClock(lambda: t[0])
    previous = Stamp(-1, 0)
    for is_observe, wall, logical in ops:
        if is_observe:
            clock.observe(Stamp(wall, logical))
            assert clock.last >= Stamp(wall, logical)
        else:
            t[0] = wall
            stamp = clock.now()
            assert stamp > previous
            assert stamp > clock.last or stamp == clock.last
            previous = stamp


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
