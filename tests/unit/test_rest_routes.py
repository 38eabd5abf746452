"""The gateway routes derived from the API's REST bindings: which methods reach the transcoder on
which path templates, and the 405 answers for the rest."""

from __future__ import annotations

import json
import re

import pytest
from google.api import annotations_pb2

from potboiler.pigtail.validate import MAX_WAIT_MS
from potboiler.server.rest_routes import (
    LONG_REST_CALLS,
    REST_CLUSTER,
    REST_TIMEOUT,
    RawBodyRoute,
    RestBinding,
    allowed_methods,
    descriptor_set,
    listener_of,
    method_routes,
    overlap,
    path_match,
    path_variables,
    raw_body_routes,
    rest_bindings,
    transcoded_routes,
)


def binding(method: str, path: str) -> RestBinding:
    return RestBinding("core", method, path, raw_body=False)


def route_for(routes: list[dict[str, object]], method: str, path: str) -> dict[str, object] | None:
    """The first of `routes` Envoy would take for this request (path and :method matchers only)."""
    for route in routes:
        match = route["match"]
        assert isinstance(match, dict)
        if "path" in match and match["path"] != path:
            continue
        if "safe_regex" in match and not re.fullmatch(match["safe_regex"]["regex"], path):
            continue
        for header in match.get("headers", []):
            assert header["name"] == ":method"
            wanted = header["string_match"]
            if not re.fullmatch(
                wanted["safe_regex"]["regex"] if "safe_regex" in wanted else wanted["exact"], method
            ):
                break
        else:
            return route
    return None


def test_templates_overlap_when_some_path_matches_both() -> None:
    assert overlap("/log/{id}", "/log/register")
    assert overlap("/queue/{q}/{id}", "/queue/{q}/claim")
    assert not overlap("/queue/{q}", "/queue/{q}/claim")
    assert not overlap("/log/first", "/log/register")


def test_a_more_specific_template_comes_first_and_answers_for_its_path_alone() -> None:
    bindings = [
        binding("GET", "/log/{id}"),
        binding("POST", "/log/register"),
        binding("GET", "/log"),
        binding("POST", "/log"),
    ]
    assert allowed_methods(bindings) == [
        ("/log/register", ["POST"]),  # GET /log/register is a 405, not GET /log/{id} with id "register"
        ("/log", ["GET", "POST"]),
        ("/log/{id}", ["GET"]),
    ]


def test_templates_as_specific_as_each_other_admit_each_others_methods() -> None:
    bindings = [binding("GET", "/a/{x}/c"), binding("POST", "/a/b/{y}")]
    # /a/b/c is decided by the first.
    assert allowed_methods(bindings) == [("/a/b/{y}", ["GET", "POST"]), ("/a/{x}/c", ["GET"])]


def test_every_binding_reaches_the_transcoder_through_its_listeners_routes() -> None:
    for b in rest_bindings():
        path = re.sub(r"\{[^}]+\}", "x1", b.path)
        route = route_for(method_routes(b.listener), b.method, path)
        assert route is not None and "route" in route, (b, route)


def test_head_goes_on_wherever_get_does() -> None:
    # As a GET (gateway/lua/responses.lua), its answer then losing its body.
    for b in rest_bindings():
        if b.method == "GET":
            path = re.sub(r"\{[^}]+\}", "x1", b.path)
            route = route_for(method_routes(b.listener), "HEAD", path)
            assert route is not None and "route" in route, (b, route)


@pytest.mark.parametrize(
    ("listener", "method", "path", "allow"),
    [
        ("core", "PUT", "/log", "GET, HEAD, POST"),
        ("core", "DELETE", "/log/0190c5a8-0000-7000-8000-000000000000", "GET, HEAD"),
        ("core", "PATCH", "/nodes", "DELETE, GET, HEAD, POST"),
        ("kv", "DELETE", "/kv/t/k", "GET, HEAD, POST"),
        ("pigtail", "GET", "/create", "POST"),
        ("pigtail", "PATCH", "/queue/q/t1", "DELETE, GET, HEAD, PUT"),
        ("pigtail", "PUT", "/queue/q/t1/heartbeat", "POST"),
        ("browser", "POST", "/", "GET, HEAD"),
    ],
)
def test_a_method_no_binding_takes_gets_405_with_allow(
    listener: str, method: str, path: str, allow: str
) -> None:
    route = route_for(method_routes(listener), method, path)
    assert route is not None
    assert route["direct_response"]["status"] == 405  # type: ignore[index]
    assert route["response_headers_to_add"][0]["header"] == {"key": "allow", "value": allow}  # type: ignore[index]
    filters = route["typed_per_filter_config"]
    assert isinstance(filters, dict)
    assert filters["envoy.filters.http.grpc_json_transcoder"]["disabled"] is True


def test_unknown_paths_are_left_to_the_transcoder() -> None:
    assert route_for(method_routes("core"), "GET", "/nope") is None
    assert route_for(method_routes("kv"), "GET", "/kv/t/k/extra") is None


def test_transcoded_requests_pass_every_method_route() -> None:
    # The transcoder rewrites :path to the RPC's and Envoy picks a route again: it must be the
    # catch-all to the node, not a REST template's 405.
    for listener in ("core", "kv", "browser", "pigtail"):
        for method in ("POST", "GET"):
            assert (
                route_for(method_routes(listener), method, "/potboiler.v1.KvRestService/GetKvValue") is None
            )


def test_trailing_slashes_are_the_same_path() -> None:
    # The transcoder drops them (`GET /log/` and `GET /log//` are `GET /log`), so a method it would
    # not take there is a 405 too, not the transcoder's 404, and a raw body stays raw.
    for b in rest_bindings():
        for slashes in ("/", "//"):
            path = re.sub(r"\{[^}]+\}", "x1", b.path).rstrip("/") + slashes
            route = route_for(method_routes(b.listener), b.method, path)
            assert route is not None and "route" in route, (b, path, route)
            if b.raw_body:
                raw = [r.route()["match"] for r in raw_body_routes(b.listener) if r.method == b.method]
                assert any(re.fullmatch(m["safe_regex"]["regex"], path) for m in raw), (b, path)  # type: ignore[index]
    for path in ("/log/", "/log//"):
        route = route_for(method_routes("core"), "PUT", path)
        assert route is not None and route["direct_response"]["status"] == 405  # type: ignore[index]
    assert route_for(method_routes("core"), "GET", "/log//x") is None  # an empty segment is no id
    assert route_for(method_routes("kv"), "GET", "/kv/t/") is not None  # /kv/{table}, not a key


def test_literal_segments_match_only_themselves() -> None:
    regex = path_match("/v1.0/{id}")["safe_regex"]
    assert isinstance(regex, dict)
    assert re.fullmatch(regex["regex"], "/v1.0/x")
    assert not re.fullmatch(regex["regex"], "/v1x0/x")


def test_raw_body_routes_belong_to_their_listener() -> None:
    assert RawBodyRoute("POST", "/log") in raw_body_routes("core")
    assert RawBodyRoute("POST", "/log") not in raw_body_routes("kv")
    assert {r for listener in ("core", "kv", "browser", "pigtail") for r in raw_body_routes(listener)} == set(
        raw_body_routes()
    )


def test_wildcard_templates_are_refused() -> None:
    with pytest.raises(ValueError, match="unsupported path template"):
        path_match("/files/{path=**}")
    with pytest.raises(ValueError, match="unsupported path template"):
        path_match("/files/*")


def test_the_fields_paths_bind_are_ignored_as_query_parameters_per_listener() -> None:
    assert path_variables("core") == ["id"]
    assert path_variables("kv") == ["key", "table"]
    assert path_variables("browser") == ["table"]
    assert path_variables("pigtail") == ["queue", "task_id"]


def test_no_rest_binding_needs_a_query_parameter_that_another_path_binds() -> None:
    """Ignoring a path-bound name in the query is per listener: no binding there may take that
    field from the query."""
    fds = descriptor_set()
    fields = {f".{f.package}.{m.name}": {x.name for x in m.field} for f in fds.file for m in f.message_type}
    for f in fds.file:
        for service in f.service:
            for method in service.method:
                rule = method.options.Extensions[annotations_pb2.http]
                kind = rule.WhichOneof("pattern")
                if kind is None or rule.body == "*":
                    continue
                path = getattr(rule, kind)
                bound = set(re.findall(r"\{([A-Za-z0-9_]+)\}", path)) | {rule.body}
                from_query = fields[method.input_type] - bound
                assert not from_query & set(path_variables(listener_of(service.name))), path


def test_a_body_bound_whole_lists_the_members_it_takes() -> None:
    members = {(b.method, b.path): b.members for b in rest_bindings()}
    assert members[("POST", "/nodes")] == members[("DELETE", "/nodes")] == (("url", "string"),)
    assert members[("POST", "/log/register")] == (("url", "string"),)
    assert members[("POST", "/log")] is None  # a raw body: the node checks it
    [route] = [r for r in method_routes("core") if "metadata" in r and "/nodes" in json.dumps(r["match"])]
    assert route["metadata"] == {
        "filter_metadata": {
            "envoy.filters.http.lua": {"members": {"POST": {"url": "string"}, "DELETE": {"url": "string"}}}
        }
    }


def test_a_raw_body_route_of_a_less_specific_template_comes_after_the_405_of_a_more_specific_one() -> None:
    routes = method_routes("pigtail")
    for method, path in (("PUT", "/queue/q/claim"), ("DELETE", "/queue/q/dead")):
        route = route_for(routes, method, path)
        assert route is not None and route["direct_response"]["status"] == 405  # type: ignore[index]
    claim = route_for(routes, "PUT", "/queue/q/t1")
    assert claim is not None and "route" in claim


def test_transcoded_calls_go_to_the_rest_bridge_the_long_polls_with_their_own_timeout() -> None:
    """Once transcoded, every REST call goes to the node's REST bridge within REST_TIMEOUT, but those
    that may wait longer (a Pigtail claim-next, up to its 60 s) get theirs; the catch-all comes last."""
    routes = transcoded_routes()
    assert routes[-1]["match"] == {"prefix": "/"}
    assert routes[-1]["route"] == {"cluster": REST_CLUSTER, "timeout": REST_TIMEOUT}
    claim = route_for(routes, "POST", "/potboiler.v1.PigtailRestService/RestClaimNextTask")
    assert claim is not None and claim["route"] == {"cluster": REST_CLUSTER, "timeout": "90s"}
    assert float(REST_TIMEOUT.removesuffix("s")) < MAX_WAIT_MS / 1000 < 90
    # Each long call names a method of the API.
    methods = {
        f"/{f.package}.{s.name}/{m.name}" for f in descriptor_set().file for s in f.service for m in s.method
    }
    assert set(LONG_REST_CALLS) <= methods
