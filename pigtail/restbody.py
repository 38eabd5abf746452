"""The bodies of Pigtail's REST writes, which reach the node raw (a `google.api.HttpBody` field of each
PigtailRestService request, see pigtail.proto), so the gateway spends nothing on them.

A body is parsed strictly (:func:`potboiler.server.rest.parse_body`: RFC 8259 JSON, else 400) and must
be a JSON object with no other members than its path's (the path's own ``queue`` and ``task_id`` are
tolerated and ignored: the path names them). Members are read as the protobuf JSON mapping read them
when the gateway parsed these bodies: null is the same as absent, and an integer may also be given as
an integral number (``1e3``) or a decimal string (``"1000"``). Each failure is an InvalidArgument that
says what is wrong; the values themselves are checked by the engine (:mod:`potboiler.pigtail.validate`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import orjson
from google.api.httpbody_pb2 import HttpBody

from potboiler.server import rest
from potboiler.server.errors import InvalidArgument
from potboiler.server.jsonvalue import JSON

#: Members the path names, tolerated in any body and ignored.
_PATH = ("queue", "task_id")
#: The members each body may have.
CREATE = {"name", "timeout_ms", "max_attempts", *_PATH}
ADD = {"task_name", "info", "not_before_ms", "delay_ms", "priority", "idempotency_key", *_PATH}
CLAIM_NEXT = {"worker_id", "wait_ms", *_PATH}
WORKER = {"worker_id", *_PATH}
RETRY = {*_PATH}

_DECIMAL = re.compile(r"-?[0-9]+", re.ASCII)
#: More digits than any integer member can have within its limits (int64 has 19).
_MAX_DIGITS = 20


def members(body: HttpBody, allowed: set[str], *, empty_ok: bool = False) -> dict[str, JSON]:
    """The body as a JSON object with no members but `allowed`; an empty body is {} if `empty_ok`."""
    if empty_ok and not body.data:
        return {}
    return rest.json_object_body(body, allowed)


def text(body: Mapping[str, JSON], name: str) -> str:
    """A string member ('' when absent or null)."""
    return optional_text(body, name) or ""


def optional_text(body: Mapping[str, JSON], name: str) -> str | None:
    """A string member (None when absent or null)."""
    value = body.get(name)
    if value is None or isinstance(value, str):
        return value
    raise InvalidArgument(f"{name} must be a string, not {_shown(value)}")


def integer(body: Mapping[str, JSON], name: str) -> int:
    """An integer member (0 when absent or null)."""
    value = optional_integer(body, name)
    return 0 if value is None else value


def optional_integer(body: Mapping[str, JSON], name: str) -> int | None:
    """An integer member (None when absent or null): a JSON integer, an integral number or a decimal
    string."""
    value = body.get(name)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        if len(value) > _MAX_DIGITS:  # beyond every limit (and int() refuses past 4,300 digits)
            raise InvalidArgument(f"{name} is out of range: {_shown(value)}")
        return int(value)
    raise InvalidArgument(f"{name} must be an integer, not {_shown(value)}")


def _shown(value: JSON) -> str:
    shown = orjson.dumps(value).decode()
    return shown if len(shown) <= 40 else shown[:37] + "..."
