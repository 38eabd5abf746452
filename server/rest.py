"""How servicers shape REST answers through Envoy.

gRPC has no 201 or 204, so a servicer sets trailing metadata `x-http-code` (and `location`); the
Lua filter in gateway/lua/responses.lua turns it into the HTTP status and header and empties 204
bodies. Trailing, not initial: trailing metadata travels in the batch that ends the call, while
grpc.aio sends initial metadata set by hand as a batch of its own (about 100 µs of node CPU per
call). Plain gRPC clients see only harmless metadata.
"""

from __future__ import annotations

import json
import re
from typing import Any

import grpc
import orjson
from google.api.httpbody_pb2 import HttpBody
from google.protobuf.struct_pb2 import Value

from potboiler.server.errors import InvalidArgument
from potboiler.server.jsonvalue import JSON, to_value

HTTP_CODE_HEADER = "x-http-code"
Ctx = grpc.aio.ServicerContext[Any, Any]
#: Nesting beyond which a body is refused before it is converted (the exact limit, MAX_DEPTH in
#: potboiler.server.log, is checked on the converted value; this only keeps the conversion's
#: recursion bounded).
_MAX_BODY_NESTING = 64
#: The largest integer every double up to it holds exactly.
MAX_EXACT_INTEGER = 2**53
#: A run of digits as long as MAX_EXACT_INTEGER's: bodies without one hold no integer beyond it, so
#: only those are parsed again (in Python) to look at their integers.
_LONG_DIGITS = re.compile(rb"\d{16}")


def created(context: Ctx, location: str) -> None:
    """Answer REST with 201 Created and a Location header."""
    context.set_trailing_metadata(((HTTP_CODE_HEADER, "201"), ("location", location)))


def located(context: Ctx, location: str) -> None:
    """Answer REST with a Location header (and the usual 200)."""
    context.set_trailing_metadata((("location", location),))


def no_content(context: Ctx) -> None:
    """Answer REST with 204 No Content."""
    context.set_trailing_metadata(((HTTP_CODE_HEADER, "204"),))


def http_status(context: Ctx, status: int) -> None:
    """Answer REST with `status` (for a body the servicer writes itself, e.g. an error page)."""
    context.set_trailing_metadata(((HTTP_CODE_HEADER, str(status)),))


def json_body(body: HttpBody) -> Value:
    """A raw REST body (an `HttpBody` request field, which Envoy passes through untouched) as a
    Value: see `parse_body`."""
    return to_value(parse_body(body))


def json_object_body(body: HttpBody, members: set[str]) -> dict[str, JSON]:
    """A raw REST body that must be a JSON object with no other members than `members` (see
    `parse_body`)."""
    value = parse_body(body)
    if not isinstance(value, dict):
        raise InvalidArgument("the request body must be a JSON object")
    if unknown := sorted(value.keys() - members):
        raise InvalidArgument(f"the request body has unknown members: {', '.join(map(repr, unknown))}")
    return value


def parse_body(body: HttpBody) -> JSON:
    """A raw REST body as plain JSON: strict JSON (RFC 8259: no NaN, comments, trailing commas, lone
    surrogates or bytes that are not UTF-8), else InvalidArgument (400) saying what is wrong."""
    raw = body.data
    if not raw.strip():
        raise InvalidArgument("the request body must be JSON")
    try:
        value: JSON = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidArgument(f"the request body is not valid JSON: {exc}") from None
    if _LONG_DIGITS.search(raw):
        _refuse_inexact_integers(raw)
    if (
        len(raw) > _MAX_BODY_NESTING
        and isinstance(value, dict | list)
        and _nesting(value) > _MAX_BODY_NESTING
    ):
        raise InvalidArgument(
            f"the request body nests arrays and objects deeper than {_MAX_BODY_NESTING} levels"
        )
    return value


def _refuse_inexact_integers(raw: bytes) -> None:
    """InvalidArgument if the JSON `raw` holds an integer that a double (what every number becomes
    in an entry) cannot hold exactly: stored, it would silently read back as another number."""

    def integer(literal: str) -> int:
        n = int(literal)
        if abs(n) > MAX_EXACT_INTEGER:
            raise InvalidArgument(
                f"the number {literal} cannot be stored exactly: JSON numbers are kept as IEEE doubles, "
                f"exact for integers up to 2^53 ({MAX_EXACT_INTEGER}); send bigger integers as strings"
            )
        return n

    json.loads(raw, parse_int=integer)


def _nesting(value: dict[str, JSON] | list[JSON]) -> int:
    level: list[JSON] = [value]
    depth = 0
    while level and depth <= _MAX_BODY_NESTING:
        depth += 1
        children: list[JSON] = []
        for v in level:
            if isinstance(v, dict):
                children.extend(v.values())
            elif isinstance(v, list):
                children.extend(v)
        level = [c for c in children if isinstance(c, dict | list)]
    return depth
