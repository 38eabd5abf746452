"""Feeders: which incoming stream feeds this node an owner's log, and which streams are redundant."""

from __future__ import annotations

from potboiler.server.feeders import Feeders

OWNER = "owner"
B, C, OWN = object(), object(), object()  # two forwarding streams and the owner's own stream


def test_the_first_stream_with_new_entries_feeds_and_another_is_redundant() -> None:
    feeders = Feeders(quiet=1.0)
    assert feeders.brought(B, "b", [OWNER], {OWNER}, now=0.0) == set()
    assert feeders.brought(C, "c", [OWNER], set(), now=0.1) == {OWNER}  # duplicates
    assert feeders.brought(C, "c", [OWNER], {OWNER}, now=0.2) == {OWNER}  # even new ones: B feeds
    assert feeders.brought(B, "b", [OWNER], set(), now=0.3) == set()  # the feeder is never redundant


def test_a_quiet_feeder_is_replaced() -> None:
    feeders = Feeders(quiet=1.0)
    feeders.brought(B, "b", [OWNER], {OWNER}, now=0.0)
    assert feeders.brought(C, "c", [OWNER], {OWNER}, now=1.5) == set()
    assert feeders.brought(B, "b", [OWNER], {OWNER}, now=1.6) == {OWNER}


def test_duplicates_with_no_feeder_are_redundant() -> None:
    assert Feeders(quiet=1.0).brought(B, "b", [OWNER], set(), now=0.0) == {OWNER}


def test_the_owners_own_stream_always_feeds_its_log() -> None:
    feeders = Feeders(quiet=1.0)
    feeders.brought(B, "b", [OWNER], {OWNER}, now=0.0)
    assert feeders.brought(OWN, OWNER, [OWNER], set(), now=0.1) == set()
    assert feeders.brought(B, "b", [OWNER], {OWNER}, now=0.2) == {OWNER}


def test_an_ended_stream_feeds_nothing() -> None:
    feeders = Feeders(quiet=1.0)
    feeders.brought(B, "b", [OWNER, "other"], {OWNER, "other"}, now=0.0)
    feeders.forget(B)
    assert feeders.brought(C, "c", [OWNER], {OWNER}, now=0.1) == set()
