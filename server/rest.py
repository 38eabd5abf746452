"""How servicers shape REST answers through Envoy.

gRPC has no 201 or 204, so a servicer sets trailing metadata `x-http-code` (and `location`); the
Lua filter in gateway/lua/responses.lua turns it into the HTTP status and header and empties 204
bodies. Trailing, not initial: trailing metadata travels in the batch that ends the call, while
grpc.aio sends initial metadata set by hand as a batch of its own (about 100 µs of node CPU per
call). Plain gRPC clients see only harmless metadata.
"""

from __future__ import annotations

import json
from urllib.parse import unquote_plus

import grpc
import orjson
from google.api.httpbody_pb2 import HttpBody
from google.protobuf.struct_pb2 import Value

from potboiler.server.errors import InvalidArgument, quoted
from potboiler.server.grpc_context import Ctx
from potboiler.server.jsonvalue import (
    JSON,
    MAX_EXACT_INTEGER,
    big_integer_message,
    json_text,
    nesting,
    scalars,
    to_value,
)

HTTP_CODE_HEADER = "x-http-code"
#: Nesting beyond which a body is refused before it is converted (the exact limit, MAX_DEPTH in
#: potboiler.server.entries, is checked on the converted value; this only keeps the conversion's
#: recursion bounded).
_MAX_BODY_NESTING = 64
#: A run of digits as long as MAX_EXACT_INTEGER's, in a body whose digits are all made "0": bodies
#: without one hold no integer beyond it, so only those have their numbers looked at (a translate and
#: a substring search: about ten times cheaper than a regular expression on a big body).
_LONG_DIGITS = b"0" * len(str(MAX_EXACT_INTEGER))
_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))

#: The gRPC status code each HTTP status stands for, in the errors a node's ports answer by
#: themselves (Envoy's, the metrics port's): the node's own errors carry their gRPC code (the
#: transcoder's JSON of a gRPC status), so every error body reads the same.
GRPC_CODE_OF_STATUS = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    414: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    431: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
    505: grpc.StatusCode.UNIMPLEMENTED,
}


#: The metadata in which Envoy's transcoder passes on a REST request's path, query included.
ORIGINAL_PATH = "x-envoy-original-path"


def check_query(path: str, names: set[str]) -> None:
    """InvalidArgument unless every parameter of `path`'s query is `name=value` with a name in
    `names` (for a path whose RPC the transcoder would hand others to, or drop them)."""
    query = path.partition("?")[2]
    for part in query.split("&"):
        if not part:
            continue
        name, equals, _ = part.partition("=")
        name = unquote_plus(name)
        if name not in names:
            raise InvalidArgument(f"unknown query parameter {name[:100]!r}")
        if not equals:
            raise InvalidArgument(f"query parameter {name!r} has no value: give {name}=<value>")


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


def json_answer(value: object) -> HttpBody:
    """A REST answer of JSON text (`json_text`), which Envoy passes on as it is."""
    return text_answer(json_text(value))


def text_answer(text: bytes) -> HttpBody:
    """A REST answer of JSON text already written."""
    return HttpBody(content_type="application/json", data=text)


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
        raise InvalidArgument(f"the request body has unknown members: {', '.join(map(quoted, unknown))}")
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
    if (
        len(raw) > _MAX_BODY_NESTING
        and isinstance(value, dict | list)
        and nesting(value, _MAX_BODY_NESTING) > _MAX_BODY_NESTING
    ):
        raise InvalidArgument(
            f"the request body nests arrays and objects deeper than {_MAX_BODY_NESTING} levels"
        )
    if _LONG_DIGITS in raw.translate(_DIGITS_AS_ZERO):
        _refuse_big_integers(value, raw)
    return value


def _refuse_big_integers(value: JSON, raw: bytes) -> None:
    """InvalidArgument if the JSON `value` (parsed from `raw`, nested at most _MAX_BODY_NESTING deep)
    holds an integer beyond 2^53: every number of an entry is a double, which holds every integer up
    to 2^53 exactly but not all beyond, so it could read back as another number."""
    maybe_integer = False
    for item in scalars(value):
        if isinstance(item, int) and not isinstance(item, bool):
            if abs(item) > MAX_EXACT_INTEGER:
                raise InvalidArgument(big_integer_message(str(item)))
        elif isinstance(item, float) and abs(item) > MAX_EXACT_INTEGER and item.is_integer():
            maybe_integer = True
    if maybe_integer:
        # orjson reads an integer literal beyond 64 bits (-2^63 to 2^64 - 1) as a float: tell it from
        # a float literal (1e30) by the literal itself, which the json module hands over as written.
        def integer(literal: str) -> int:
            if abs(n := int(literal)) > MAX_EXACT_INTEGER:
                raise InvalidArgument(big_integer_message(literal))
            return n

        json.loads(raw, parse_int=integer)
