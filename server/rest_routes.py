"""The gateway's REST routes, derived from the API's `google.api.http` bindings in the descriptor set.

Envoy's transcoder maps a request to an RPC by method and path, and answers 404 for anything it cannot
map, even a known path asked with the wrong method. Two kinds of route come from the bindings here:

- raw-body routes: the bindings whose `body` is a `google.api.HttpBody` field; the node parses those
  bodies, so they skip the gateway's Lua JSON check;
- method routes: for every path template of a listener, the methods a binding takes there go on to the
  transcoder, and any other method gets 405 with an `Allow` header, from Envoy itself.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

import potboiler.v1

DESCRIPTOR = Path(next(iter(potboiler.v1.__path__))) / "potboiler.binpb"

#: Longest Envoy waits for the node's answer to a REST call before it answers 504 itself: a node that
#: stalled (stopped, swapped out) answers nothing, and its REST bridge, a unix socket, has no pings
#: to tell. Longer than a REST call takes (a KV read waits at most 5 s for the node's own writes to
#: be applied). gRPC calls through Envoy have no such limit (HTTP/2 pings tell a stalled node).
REST_TIMEOUT = "30s"
#: REST calls that may take longer, by gRPC method: a Pigtail claim-next waits up to 60 s for a task.
LONG_REST_CALLS = {"/potboiler.v1.PigtailRestService/RestClaimNextTask": "90s"}
#: The Envoy cluster of REST calls: the node's REST bridge (potboiler.server.rest_bridge).
REST_CLUSTER = "node_rest"

_VARIABLE = re.compile(r"\{[A-Za-z_][A-Za-z0-9_.]*\}")
_LUA = "envoy.filters.http.lua"
_LUA_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.LuaPerRoute"
_DISABLED = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}


@functools.cache
def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """The API's descriptor set (the file Envoy's transcoder reads), parsed once."""
    return descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR.read_bytes())


def listener_of(service: str) -> str:
    """The REST listener that transcodes a service of the API: `Kv*` on the KV port, `KvBrowser*` on
    the browser port, `Pigtail*` on the Pigtail port, the rest on the core port."""
    if service.startswith("KvBrowser"):
        return "browser"
    if service.startswith("Kv"):
        return "kv"
    if service.startswith("Pigtail"):
        return "pigtail"
    return "core"


@dataclass(frozen=True)
class RestBinding:
    """One REST binding of an RPC: an HTTP method on a path template, on one listener."""

    listener: str
    method: str
    path: str
    raw_body: bool
    #: The members a body bound whole to the request message (`body: "*"`) may have, with the kind
    #: of JSON value each takes (see `json_kind`): its fields (proto and JSON names) the path does
    #: not bind. None for other bindings.
    members: tuple[tuple[str, str], ...] | None = None

    @property
    def variables(self) -> list[str]:
        """The names of the fields the path binds."""
        return [v[1:-1] for v in _VARIABLE.findall(self.path)]


def rest_bindings() -> list[RestBinding]:
    """Every REST binding of the API, in the order of the descriptor set."""
    fds = descriptor_set()
    messages = {f".{f.package}.{m.name}": m for f in fds.file for m in f.message_type}
    out = []
    for f in fds.file:
        if f.package != "potboiler.v1":
            continue
        for service in f.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                kind = rule.WhichOneof("pattern")
                if kind is None:
                    continue
                if kind == "custom" or rule.additional_bindings:
                    # The routes here would answer 405 to the methods of such bindings.
                    raise ValueError(
                        f"{service.name}.{method.name}: custom and additional bindings are not supported"
                    )
                fields = messages[method.input_type].field
                types = {field.name: field.type_name for field in fields}
                raw = bool(rule.body) and types.get(rule.body) == ".google.api.HttpBody"
                path = getattr(rule, kind)
                members = None
                if rule.body == "*":
                    bound = {v[1:-1] for v in _VARIABLE.findall(path)}
                    named = (
                        (n, json_kind(field))
                        for field in fields
                        if field.name not in bound
                        for n in (field.name, field.json_name)
                    )
                    members = tuple(dict(named).items())
                out.append(RestBinding(listener_of(service.name), kind.upper(), path, raw, members))
    return out


_FD = descriptor_pb2.FieldDescriptorProto
#: JSON kinds of scalar fields in proto3's JSON mapping (64-bit integers also as strings).
_KINDS = {
    _FD.TYPE_STRING: "string",
    _FD.TYPE_BYTES: "string",
    _FD.TYPE_BOOL: "boolean",
    _FD.TYPE_DOUBLE: "number",
    _FD.TYPE_FLOAT: "number",
    _FD.TYPE_INT32: "number",
    _FD.TYPE_UINT32: "number",
    _FD.TYPE_SINT32: "number",
    _FD.TYPE_FIXED32: "number",
    _FD.TYPE_SFIXED32: "number",
    _FD.TYPE_INT64: "number or string",
    _FD.TYPE_UINT64: "number or string",
    _FD.TYPE_SINT64: "number or string",
    _FD.TYPE_FIXED64: "number or string",
    _FD.TYPE_SFIXED64: "number or string",
}


def json_kind(field: descriptor_pb2.FieldDescriptorProto) -> str:
    """The kind of JSON value a field takes: "array" (repeated), "object" (a message), a scalar's
    kind, or "any" (an enum: a name or a number)."""
    if field.label == _FD.LABEL_REPEATED:
        return "array"
    if field.type == _FD.TYPE_MESSAGE:
        return "object"
    return _KINDS.get(field.type, "any")


def path_variables(listener: str) -> list[str]:
    """The fields some path of a listener binds. The transcoder would also set them from a query
    parameter of the same name, overriding the path (`/kv/users/alice?key=bob` wrote `bob`): the
    gateway ignores such query parameters."""
    return sorted({v for b in rest_bindings() if b.listener == listener for v in b.variables})


def _segments(template: str) -> list[str | None]:
    """A template's segments, None for a variable."""
    return [None if _VARIABLE.fullmatch(s) else s for s in template.split("/")]


def path_match(template: str) -> dict[str, object]:
    """An Envoy route match for the paths of a template, with any number of trailing slashes (the
    transcoder drops them: `GET /log/` and `GET /log//` are `GET /log`): a regex with one segment per
    variable. Templates with wildcards (`**`, `{x=...}`) are refused."""
    segments = _segments(template)
    if any(s is not None and ("{" in s or "*" in s) for s in segments):
        raise ValueError(f"unsupported path template: {template}")
    path = "/".join("[^/]+" if s is None else re.escape(s) for s in segments).rstrip("/")  # "": the root
    return {"safe_regex": {"regex": f"{path}/*" if path else "/+"}}


@dataclass(frozen=True)
class RawBodyRoute:
    """A REST path whose RPC takes the request body raw, as a `google.api.HttpBody` field."""

    method: str
    path: str

    def route(self) -> dict[str, object]:
        """The Envoy route: to the node, with the Lua request check swapped for responses only."""
        match = path_match(self.path)
        match["headers"] = [{"name": ":method", "string_match": {"exact": self.method}}]
        return {
            "match": match,
            "route": {"cluster": REST_CLUSTER, "timeout": REST_TIMEOUT},
            "typed_per_filter_config": {
                _LUA: {"@type": _LUA_PER_ROUTE, "name": "raw_body"},
            },
        }


def raw_body_routes(listener: str | None = None) -> list[RawBodyRoute]:
    """Every REST path of the descriptor set (of one listener, if given) whose `body` is a
    google.api.HttpBody field."""
    return [
        RawBodyRoute(b.method, b.path)
        for b in rest_bindings()
        if b.raw_body and listener in (None, b.listener)
    ]


def overlap(a: str, b: str) -> bool:
    """Whether some path matches both templates (each variable is one segment)."""
    sa, sb = _segments(a), _segments(b)
    return len(sa) == len(sb) and all(x is None or y is None or x == y for x, y in zip(sa, sb, strict=True))


def _literals(template: str) -> int:
    return sum(s is not None for s in _segments(template))


def allowed_methods(bindings: list[RestBinding]) -> list[tuple[str, list[str]]]:
    """Each path template of `bindings` with the methods that may reach the transcoder on it, the
    most specific templates (most literal segments) first. Envoy takes the first route that matches,
    so a path of two templates is decided by the earlier one. A more specific template answers for
    its own path alone: `GET /log/register` is a 405 (the path takes POST), not `GET /log/{id}` with
    id "register" (no id of the API is such a word: ids are UUIDs). Templates as specific as each
    other that overlap admit each other's methods."""
    methods: dict[str, set[str]] = {}
    for b in bindings:
        methods.setdefault(b.path, set()).add(b.method)
    order = sorted(methods, key=lambda t: (-_literals(t), t))
    out = []
    for i, template in enumerate(order):
        allowed = set(methods[template])
        for later in order[i + 1 :]:
            if _literals(later) == _literals(template) and overlap(template, later):
                allowed |= methods[later]
        out.append((template, sorted(allowed)))
    return out


def method_routes(listener: str) -> list[dict[str, object]]:
    """The routes of one listener's REST paths, per path template, the most specific first (see
    `allowed_methods`): its raw-body routes, one route on to the transcoder for the methods it
    takes, and one direct 405 with `Allow` (the filters skipped) for any other method. A raw-body
    route of a less specific template comes after the 405 of a more specific one (`PUT
    /queue/q/claim` is a 405, not `PUT /queue/{queue}/{task_id}`)."""
    routes: list[dict[str, object]] = []
    bindings = [b for b in rest_bindings() if b.listener == listener]
    raw = raw_body_routes(listener)
    for template, methods in allowed_methods(bindings):
        routes += [r.route() for r in raw if r.path == template]
        members = {
            b.method: dict(b.members) for b in bindings if b.path == template and b.members is not None
        }
        if "GET" in methods:  # HEAD goes on as GET (gateway/lua/responses.lua)
            methods = sorted([*methods, "HEAD"])
        allow = ", ".join(methods)
        takes = methods[0] if len(methods) == 1 else ", ".join(methods[:-1]) + " or " + methods[-1]
        match = path_match(template)
        regex = "|".join(re.escape(m) for m in methods)
        routes.append(
            {
                "match": {
                    **match,
                    "headers": [{"name": ":method", "string_match": {"safe_regex": {"regex": regex}}}],
                },
                "route": {"cluster": REST_CLUSTER, "timeout": REST_TIMEOUT},
                # What gateway/lua/request_json.lua lets through of a body bound whole to a message.
                **({"metadata": {"filter_metadata": {_LUA: {"members": members}}}} if members else {}),
            }
        )
        routes.append(
            {
                "match": match,
                "direct_response": {"status": 405, "body": {"inline_string": f"{template} takes {takes}"}},
                "response_headers_to_add": [
                    {
                        "header": {"key": "allow", "value": allow},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    }
                ],
                "typed_per_filter_config": {
                    _LUA: {"@type": _LUA_PER_ROUTE, "disabled": True},
                    "envoy.filters.http.grpc_json_transcoder": _DISABLED,
                },
            }
        )
    return routes


def transcoded_routes() -> list[dict[str, object]]:
    """The routes of REST requests once transcoded: to the node's REST bridge, within REST_TIMEOUT
    (LONG_REST_CALLS within theirs), without the gRPC headers a REST client sent (the node resets
    a call with a bad one) or binary metadata (`-bin`: grpc resets a call whose value is not
    base64)."""

    def route(match: dict[str, str], timeout: str) -> dict[str, object]:
        return {
            "match": match,
            "route": {"cluster": REST_CLUSTER, "timeout": timeout},
            "request_headers_to_remove": [
                "grpc-timeout",
                "grpc-encoding",
                "grpc-accept-encoding",
                "grpc-previous-rpc-attempts",
                "grpc-message-type",
            ],
            "typed_per_filter_config": {
                "envoy.filters.http.header_mutation": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute",
                    "mutations": {
                        "request_mutations": [{"remove_on_match": {"key_matcher": {"suffix": "-bin"}}}]
                    },
                }
            },
        }

    long_calls = [route({"path": method}, timeout) for method, timeout in LONG_REST_CALLS.items()]
    return [*long_calls, route({"prefix": "/"}, REST_TIMEOUT)]
