"""Reading the raw bodies of Pigtail's REST writes (pigtail/restbody.py), and that the gateway hands
them over raw."""

from __future__ import annotations

import pytest
from google.api.httpbody_pb2 import HttpBody

from potboiler.pigtail import restbody
from potboiler.server.errors import InvalidArgument
from potboiler.server.jsonvalue import JSON
from potboiler.server.rest_routes import RawBodyRoute, raw_body_routes


def test_every_pigtail_write_path_takes_its_body_raw() -> None:
    routes = raw_body_routes()
    for method, path in [
        ("POST", "/create"),
        ("POST", "/queue/{queue}"),
        ("POST", "/queue/{queue}/claim"),
        ("PUT", "/queue/{queue}/{task_id}"),
        ("DELETE", "/queue/{queue}/{task_id}"),
        ("POST", "/queue/{queue}/{task_id}/heartbeat"),
        ("POST", "/queue/{queue}/{task_id}/retry"),
    ]:
        assert RawBodyRoute(method, path) in routes


def test_members_are_checked_and_the_paths_tolerated() -> None:
    body = HttpBody(data=b'{"worker_id": "w", "queue": "q", "task_id": "t"}')
    assert restbody.members(body, restbody.WORKER) == {"worker_id": "w", "queue": "q", "task_id": "t"}
    with pytest.raises(InvalidArgument, match="unknown members: 'wait_ms'"):
        restbody.members(HttpBody(data=b'{"worker_id": "w", "wait_ms": 5}'), restbody.WORKER)
    assert restbody.members(HttpBody(), restbody.WORKER, empty_ok=True) == {}
    with pytest.raises(InvalidArgument, match="must be JSON"):
        restbody.members(HttpBody(), restbody.WORKER)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), (5, 5), (-5, -5), (1e3, 1000), (2.0**70, 2**70), ("1000", 1000), ("-7", -7)],
)
def test_integers_read_like_the_protobuf_json_mapping(value: JSON, expected: int | None) -> None:
    assert restbody.optional_integer({"n": value}, "n") == expected
    assert restbody.integer({"n": value}, "n") == (expected or 0)


@pytest.mark.parametrize("value", [True, 1.5, "1e3", " 1", "", "٣", "1_000", [1], {"n": 1}])
def test_anything_else_is_not_an_integer(value: JSON) -> None:
    with pytest.raises(InvalidArgument, match="n must be an integer"):
        restbody.optional_integer({"n": value}, "n")


def test_a_decimal_string_beyond_every_limit_is_out_of_range() -> None:
    assert restbody.optional_integer({"n": "-" + "9" * 19}, "n") == -(10**19 - 1)
    with pytest.raises(InvalidArgument, match="n is out of range"):
        restbody.optional_integer({"n": "1" * 21}, "n")
    with pytest.raises(InvalidArgument, match="n is out of range"):  # int() itself refuses 4,301 digits
        restbody.optional_integer({"n": "1" * 5_000}, "n")


def test_texts() -> None:
    assert restbody.text({}, "s") == "" and restbody.text({"s": None}, "s") == ""
    assert restbody.optional_text({"s": None}, "s") is None
    assert restbody.optional_text({"s": "x"}, "s") == "x"
    with pytest.raises(InvalidArgument, match="s must be a string, not 7"):
        restbody.text({"s": 7}, "s")
    with pytest.raises(InvalidArgument, match=r"not \[\"xxxx"):
        restbody.text({"s": ["x" * 100]}, "s")
