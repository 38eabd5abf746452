"""REST bodies as the node parses them (`rest.parse_body`): strict JSON, bounded nesting, and no
integer a double would change; and the queries it checks itself (`rest.check_query`)."""

from __future__ import annotations

import json

import pytest
from google.api.httpbody_pb2 import HttpBody
from hypothesis import given
from hypothesis import strategies as st

from potboiler.server.errors import InvalidArgument
from potboiler.server.jsonvalue import MAX_EXACT_INTEGER
from potboiler.server.rest import check_query, parse_body


def parse(raw: bytes | str) -> object:
    return parse_body(HttpBody(data=raw.encode() if isinstance(raw, str) else raw))


@given(
    n=st.integers(MAX_EXACT_INTEGER + 1, 10**40) | st.integers(-(10**40), -MAX_EXACT_INTEGER - 1),
    wrap=st.sampled_from(["{}", '{{"a": [1, {{"b": {}}}]}}', "[{}, 1e30]"]),
)
def test_an_integer_beyond_2_to_the_53_is_refused_anywhere(n: int, wrap: str) -> None:
    with pytest.raises(InvalidArgument, match=f"the integer {n} is beyond 2\\^53"):
        parse(wrap.format(n))


@given(n=st.integers(-MAX_EXACT_INTEGER, MAX_EXACT_INTEGER))
def test_integers_up_to_2_to_the_53_come_back_exact(n: int) -> None:
    assert parse(f'{{"n": {n}, "s": "{n}{n}"}}') == {"n": n, "s": f"{n}{n}"}


@pytest.mark.parametrize(
    "raw",
    [
        '"12345678901234567890"',  # digits in a string
        "[0.12345678901234567890123]",  # a long fraction: a float, rounded as floats are
        "[1e30, 1E19, 12345678901234567e0, 18446744073709551616.0]",  # floats that are integral
    ],
)
def test_long_digit_runs_that_are_no_integer_literal_pass(raw: str) -> None:
    assert parse(raw) == json.loads(raw)


def test_a_deep_body_with_a_long_number_is_refused_for_its_depth() -> None:
    # The integer check parses again with the json module, which recurses: it runs only on bodies
    # whose depth is known to be bounded.
    with pytest.raises(InvalidArgument, match="deeper than 64 levels"):
        parse("[" * 990 + "12345678901234567890" + "]" * 990)


@pytest.mark.parametrize(
    "path",
    [
        "/log",
        "/log?",
        "/log?dependency=a",
        "/log?dependency=a&dependency=b",
        "/log?&dependency=",
        "/log?depend%65ncy=x",
    ],
)
def test_a_query_of_named_parameters_with_values_passes(path: str) -> None:
    check_query(path, {"dependency"})


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("/log?dependency", "'dependency' has no value"),
        ("/log?dependency=a&dependency", "'dependency' has no value"),
        ("/log?body=x", "unknown query parameter 'body'"),
        ("/log?Dependency=a", "unknown query parameter 'Dependency'"),
    ],
)
def test_a_query_with_other_names_or_no_value_is_refused(path: str, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        check_query(path, {"dependency"})
