"""UUID parsing and printing: the fast paths agree with the uuid module and reject what it rejects."""

from __future__ import annotations

import time
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from potboiler.server.errors import InvalidArgument
from potboiler.server.ids import new_uuids, parse_uuid, uuid_str


@given(st.binary(min_size=16, max_size=16))
def test_round_trip_matches_the_uuid_module(raw: bytes) -> None:
    text = uuid_str(raw)
    assert text == str(uuid.UUID(bytes=raw))
    assert parse_uuid(text) == raw
    assert parse_uuid(text.upper()) == raw


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0123456789abcdef0123456789abcdef",  # no hyphens
        "0123456789abcdef0123456789abcdef0123",  # right length, no hyphens
        "0123456-789ab-cdef-0123-456789abcdef",  # hyphens in the wrong places
        "01234567-89ab-cdef-0123-456789abcde ",  # whitespace, which bytes.fromhex skips
        "01234567-89ab-cdef-0123-4567 9abcdef",
        "01234567-89ab-cdef-0123-45678-abcdef",  # an extra hyphen
        "01234567-89ab-cdef-0123-456789abcdeg",  # not hex
        "01234567-89ab-cdef-0123-456789abcdé",  # not ASCII
        "{01234567-89ab-cdef-0123-456789abcdef}",
    ],
)
def test_rejects_what_is_not_a_hyphenated_uuid(text: str) -> None:
    with pytest.raises(InvalidArgument, match="is not a UUID"):
        parse_uuid(text, "dependency")


def test_new_uuids_are_distinct_version_7_with_the_time() -> None:
    before = time.time_ns() // 1_000_000
    ids = new_uuids(1000)
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 1000
    for raw in ids:
        u = uuid.UUID(bytes=raw)
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert before <= int.from_bytes(raw[:6], "big") <= after


@given(st.integers(min_value=0, max_value=2**48 - 1), st.integers(min_value=1, max_value=50))
def test_new_uuids_carry_the_given_time_and_sort_by_it(unix_ms: int, n: int) -> None:
    ids = new_uuids(n, unix_ms)
    assert len(set(ids)) == n
    assert all(int.from_bytes(raw[:6], "big") == unix_ms for raw in ids)
    assert all(uuid.UUID(bytes=raw).version == 7 for raw in ids)
    assert all(uuid.UUID(bytes=raw).variant == uuid.RFC_4122 for raw in ids)
    later = new_uuids(1, unix_ms + 1) if unix_ms < 2**48 - 1 else []
    assert all(raw < other for raw in ids for other in later)
