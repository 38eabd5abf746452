"""Unit tests of benchmarks/compare.py's pure parts: spreads, ratios, verdicts, the table, the goals,
wrk's summary counts, what is reported missing, and how contenders take turns and settle (no
processes are started)."""

from __future__ import annotations

import pytest

from benchmarks import wrk
from benchmarks.compare import goals
from benchmarks.peers import INSTALL_COMMAND, missing, missing_message
from benchmarks.peers.process import settle
from benchmarks.report import HIGHER, LOWER, Row, Spread, number, ratio, render_table, samples, verdict
from benchmarks.sections import Contender, alternate


def test_spread_is_min_median_max() -> None:
    assert Spread.of([3.0, 1.0, 2.0]) == Spread(1.0, 2.0, 3.0, 3)
    assert Spread.of([4.0, 1.0]) == Spread(1.0, 2.5, 4.0, 2)
    assert Spread.of([]) is None


def test_ratio_is_potboiler_over_peer_and_none_when_undefined() -> None:
    assert ratio(300.0, 100.0) == pytest.approx(3.0)
    assert ratio(1.0, 0.0) is None
    assert ratio(None, 2.0) is None
    assert ratio(2.0, None) is None


def test_row_ratio_uses_medians_and_verdict_follows_direction() -> None:
    faster = Row("1", "writes/s", "writes/s", "etcd", HIGHER, [90.0, 100.0, 110.0], [150.0, 200.0, 400.0])
    assert faster.ratio == pytest.approx(2.0)
    assert faster.potboiler_ahead is True
    slower_lag = Row("4", "lag p99", "ms", "etcd", LOWER, [5.0], [10.0])
    assert slower_lag.ratio == pytest.approx(2.0)
    assert slower_lag.potboiler_ahead is False
    equal_lost = Row("4", "lost", "count", "etcd", LOWER, [0.0], [0.0])
    assert equal_lost.ratio is None
    assert equal_lost.potboiler_ahead is True
    unmeasured = Row("4", "lost", "count", "etcd", LOWER, [], [0.0])
    assert unmeasured.potboiler_ahead is None


def test_row_json_has_spreads_ratio_and_samples() -> None:
    data = Row("2", "acked writes/s, 1 node", "writes/s", "JetStream", HIGHER, [10.0, 20.0], [5.0]).to_json()
    assert data["peer_spread"] == {"min": 10.0, "median": 15.0, "max": 20.0, "count": 2}
    assert data["potboiler_spread"]["median"] == 5.0
    assert data["ratio_potboiler_to_peer"] == pytest.approx(0.333)
    assert data["potboiler_at_least_as_good"] is False
    assert data["peer_samples"] == [10.0, 20.0]


def test_wrk_counts_only_the_requests_without_an_error_status_as_succeeded() -> None:
    summary = {
        "requests": 1000,
        "status_errors": 40,
        "timeouts": 2,
        "connect_errors": 0,
        "read_errors": 1,
        "write_errors": 0,
    }
    assert wrk.succeeded(summary) == 960
    assert wrk.errors(summary) == 43


def test_numbers_are_printed_with_about_three_digits() -> None:
    assert number(12345.6) == "12,346"
    assert number(45.67) == "45.7"
    assert number(2.5) == "2.50"
    assert number(0.01234) == "0.0123"
    assert number(0) == "0.00"


def test_table_has_one_line_per_row_with_direction_and_verdict() -> None:
    rows = [
        Row(
            "1",
            "REST writes/s, 1 node",
            "writes/s",
            "etcd",
            HIGHER,
            [1000.0, 1100.0, 1200.0],
            [550.0, 600.0, 700.0],
        ),
        Row("4", "lag p99", "ms", "JetStream", LOWER, [5.0], []),
    ]
    lines = render_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[0].startswith("| § | figure | peer |")
    assert "| 1,000 / **1,100** / 1,200 | 550 / **600** / 700 | 0.55x ↑ | no |" in lines[2]
    assert lines[3].endswith("| **5.00** | — | — | — |")


def test_samples_skip_failed_repetitions() -> None:
    reps: list[dict[str, object]] = [
        {"writes_per_s": 10.0},
        {"error": "boom"},
        {"writes_per_s": 12},
        {"writes_per_s": None},
        {"writes_per_s": True},
    ]
    assert samples(reps, "writes_per_s") == [10.0, 12.0]


def test_missing_names_each_absent_program_and_module() -> None:
    present_programs = {"etcd", "redis-server"}
    lacking = missing(
        ["etcd", "jetstream", "redis", "rq", "wrk"],
        which=lambda name: f"/usr/bin/{name}" if name in present_programs else None,
        has_module=lambda name: name == "redis",
    )
    assert set(lacking) == {"jetstream", "rq", "wrk"}
    assert [n.name for n in lacking["jetstream"]] == ["nats-server", "nats"]
    assert [n.name for n in lacking["rq"]] == ["rq"]
    message = missing_message(lacking)
    assert "nats-server" in message and "nats-py" in message and "wrk" in message
    assert INSTALL_COMMAND in message


def test_nothing_missing_when_everything_is_installed() -> None:
    assert (
        missing(
            ["etcd", "jetstream", "redis", "rq", "wrk"],
            which=lambda n: "/bin/" + n,
            has_module=lambda n: True,
        )
        == {}
    )


def test_goals_need_every_named_peer_and_report_unmeasured() -> None:
    rows = [
        Row("4", "lag p99 at 1000/s", "ms", "etcd", LOWER, [50.0], [20.0]),
        Row("4", "lag p99 at 1000/s", "ms", "JetStream", LOWER, [5.0], [20.0]),
        Row("6", "tasks/s, Pigtail REST", "tasks/s", "RQ", HIGHER, [80.0], [130.0]),
    ]
    verdicts = goals(rows)
    assert verdicts["p99 replication lag <= etcd's and JetStream's"] is False
    assert verdicts["queue >= 1.0x RQ (REST)"] is True
    assert verdicts["REST writes >= 1.0x etcd, 1 node"] is None


def test_a_row_with_a_failed_run_gives_no_verdict() -> None:
    # Potboiler's second run did not finish: its one sample must not decide the row.
    row = Row(
        "5", "catch-up", "entries/s", "etcd", HIGHER, [90.0, 100.0], [150.0], peer_runs=2, potboiler_runs=2
    )
    assert not row.complete and row.potboiler_ahead is None
    assert verdict(row) == "— (a run failed)"
    assert Row("5", "catch-up", "entries/s", "etcd", HIGHER, [90.0], [150.0], 1, 1).potboiler_ahead


def test_lost_writes_are_judged_by_the_worst_run() -> None:
    # One lost write in one of three runs: the median is 0 like the peer's, the worst run is not.
    row = Row("4", "lost", "count", "etcd", LOWER, [0.0, 0.0, 0.0], [0.0, 1.0, 0.0], judged_by="max")
    assert row.potboiler_ahead is False


class FakeSystem:
    """A system that records what is done to it; its `settle` can fail."""

    def __init__(self, fail_settle: bool = False) -> None:
        self.events: list[str] = []
        self.fail_settle = fail_settle

    @property
    def pids(self) -> list[int]:
        return []

    def rss_mb(self) -> float:
        return 1.0

    def settle(self) -> None:
        self.events.append("settle")
        if self.fail_settle:
            raise TimeoutError("the members did not agree")

    def stop(self) -> None:
        pass


def test_each_measurement_is_followed_by_its_system_settling_untimed() -> None:
    peer, pot = FakeSystem(), FakeSystem(fail_settle=True)

    def measure(system: FakeSystem, name: str) -> dict[str, object]:
        system.events.append(f"measure {name}")
        return {"writes_per_s": 1.0}

    results = alternate(
        "test",
        2,
        [
            Contender("peer", peer, lambda: measure(peer, "peer")),
            Contender("potboiler", pot, lambda: measure(pot, "potboiler")),
        ],
    )
    assert peer.events == ["measure peer", "settle"] * 2
    assert pot.events == ["measure potboiler", "settle"] * 2
    assert all("settle_s" in figures for figures in results["peer"])
    # A system that does not settle is noted, and the run goes on.
    assert all("settle_error" in figures and "settle_s" not in figures for figures in results["potboiler"])
    assert [f["writes_per_s"] for f in results["potboiler"]] == [1.0, 1.0]


def test_settle_polls_until_the_members_agree_and_gives_up_after_the_timeout() -> None:
    answers: list[bool | Exception] = [RuntimeError("not answering"), False, True]

    def agree() -> bool:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    settle(agree, timeout=10.0)
    assert answers == []
    with pytest.raises(TimeoutError):
        settle(lambda: False, timeout=0.1)
