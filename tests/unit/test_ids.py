"""UUID parsing and printing: the fast paths agree with the uuid module and reject what it rejects."""

from __future__ import annotations

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


def test_new_uuids_are_distinct_version_4() -> None:
    ids = new_uuids(1000)
    assert len(set(ids)) == 1000
    assert all(uuid.UUID(bytes=raw).version == 4 for raw in ids)
