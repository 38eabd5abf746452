"""The core REST contract through a real node and its Envoy: every path, status code, header and body
shape, and the errors (all JSON with a message)."""

from __future__ import annotations

import json
import signal
import socket
import uuid
from collections.abc import Callable, Iterator
from http.client import HTTPConnection
from typing import Any

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from potboiler.server.entries import MAX_DEPENDENCIES, MAX_ENTRY_BYTES
from potboiler.server.gateway import MAX_BODY_BYTES
from potboiler.server.processes import NodeProcess
from potboiler.v1 import webhooks_pb2, webhooks_pb2_grpc
from tests.conftest import wait_for_sync
from tests.node_processes import NodeProcesses

pytestmark = pytest.mark.e2e

RestClient = Callable[[NodeProcess], httpx.Client]
JSON = Any
ENTRY_KEYS = {"data", "dependencies", "id", "next", "owner", "prev", "seq", "when"}


@pytest.fixture(scope="module")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One node for the tests that only add entries (they do not depend on the log being empty). After
    them (all the bad requests of this module that ran in this process), its log holds no traceback."""
    with NodeProcesses(tmp_path_factory.mktemp("rest")) as factory:
        node = factory("shared")
        yield node
    tail = node.log_file.read_text(errors="replace")
    assert "Traceback" not in tail, tail[max(0, tail.index("Traceback") - 2000) :]


@pytest.fixture(scope="module")
def http(shared_node: NodeProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=shared_node.url, timeout=30.0) as client:
        yield client


@pytest.fixture
def fresh(node_process: NodeProcesses, rest_client: RestClient) -> tuple[NodeProcess, httpx.Client]:
    """A node of this test's own, with an empty log."""
    node = node_process("fresh")
    return node, rest_client(node)


def post(http: httpx.Client, body: str | bytes, params: Any = None) -> httpx.Response:
    return http.post("/log", content=body, params=params, headers={"content-type": "application/json"})


def append(http: httpx.Client, data: JSON, params: Any = None) -> str:
    response = post(http, json.dumps(data), params)
    assert response.status_code == 201, response.text
    entry_id: str = response.json()["id"]
    return entry_id


#: The gRPC status code an error body carries for each HTTP status, whether the node or Envoy made it.
GRPC_CODE = {400: 3, 404: 5, 405: 12, 413: 8}


def assert_error(response: httpx.Response, status: int, *words: str) -> str:
    """The response is a JSON error with this status, its gRPC code and a message containing `words`."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict), body
    # One shape whether the node or Envoy answered.
    assert sorted(body) == ["code", "details", "message"], body
    assert body["code"] == GRPC_CODE[status], body
    message = body.get("message")
    assert isinstance(message, str) and message.strip(), body
    for word in words:
        assert word in message, (word, message)
    return message


def node_id(http: httpx.Client) -> str:
    status = http.get("/status")
    assert status.status_code == 200
    value: str = status.json()["node_id"]
    return value


def assert_no_content(response: httpx.Response) -> None:
    assert response.status_code == 204, (response.status_code, response.text)
    assert response.content == b""
    assert "content-type" not in response.headers


# -- the log ---------------------------------------------------------------------------------


def test_a_new_node_then_its_first_entries(fresh: tuple[NodeProcess, httpx.Client]) -> None:
    node, http = fresh
    for path in ("/log", "/log/first"):
        response = http.get(path)
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        assert response.json() == {}
    status = http.get("/status")
    assert status.status_code == 200
    body = status.json()
    owner = body["node_id"]
    assert str(uuid.UUID(owner)) == owner
    assert body["url"] == node.url
    assert body["vector"] == [] and body["peers"] == []
    assert int(body["pending"]) == 0 and int(body["delivered_position"]) == 0

    ids = [append(http, {"n": i}) for i in range(3)]
    assert http.get("/log").json() == {owner: ids[-1]}
    assert http.get("/log/first").json() == {owner: ids[0]}
    first = http.get(f"/log/{ids[0]}").json()
    assert (first["prev"], first["seq"], first["next"]) == (None, 1, ids[1])
    body = http.get("/status").json()
    assert body["node_id"] == owner
    assert [(c["owner"], int(c["seq"])) for c in body["vector"]] == [(owner, 3)]
    assert int(body["delivered_position"]) == 3


@pytest.mark.parametrize(
    "data",
    [
        {"a": 1, "b": "two"},
        [1, "two", None, {"x": []}],
        "a string",
        "",
        42,
        -3.25,
        0,
        True,
        False,
        None,
        {},
        [],
        {"deep": {"er": {"est": [[[{"k": [1, 2, {"z": None}]}]]]}}},
        {"unicode": "héllo ☃ 𝄞", "escapes": 'a"b\\c\nd\u0000'},
    ],
    ids=[
        "object",
        "array",
        "string",
        "empty-string",
        "int",
        "float",
        "zero",
        "true",
        "false",
        "null",
        "empty-object",
        "empty-array",
        "nested",
        "unicode",
    ],
)
def test_post_any_json(http: httpx.Client, data: JSON) -> None:
    response = post(http, json.dumps(data))
    assert response.status_code == 201, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"id"}
    entry_id = body["id"]
    assert str(uuid.UUID(entry_id)) == entry_id
    assert response.headers["location"] == f"/log/{entry_id}"
    entry = http.get(response.headers["location"])
    assert entry.status_code == 200
    assert entry.json()["data"] == data


json_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x7f"), max_size=20)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | json_text,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(json_text, children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=json_values)
def test_any_json_round_trips(http: httpx.Client, data: JSON) -> None:
    response = post(http, json.dumps(data))
    assert response.status_code == 201, response.text
    assert http.get(response.headers["location"]).json()["data"] == data


def test_entry_shape(http: httpx.Client) -> None:
    first_id = append(http, {"first": True})
    first = http.get(f"/log/{first_id}").json()
    assert set(first) == ENTRY_KEYS
    assert first["next"] is None
    assert first["dependencies"] == []
    assert first["owner"] == node_id(http)
    assert set(first["when"]) == {"wall_ms", "logical"}
    assert all(isinstance(v, int) and v >= 0 for v in first["when"].values())
    assert isinstance(first["seq"], int) and first["seq"] >= 1

    second_id = append(http, "second")
    first = http.get(f"/log/{first_id}").json()
    second = http.get(f"/log/{second_id}").json()
    assert first["next"] == second_id
    assert second["prev"] == first_id
    assert second["next"] is None
    assert second["seq"] == first["seq"] + 1
    assert (second["when"]["wall_ms"], second["when"]["logical"]) > (
        first["when"]["wall_ms"],
        first["when"]["logical"],
    )


def test_entries_print_their_members_sorted_at_every_depth(http: httpx.Client) -> None:
    """As webhooks receive them: the same entry reads byte for byte the same everywhere."""
    entry_id = append(http, {"name": 1, "nested": {"b": [{"z": 0, "y": 1}], "a": None}, "n": 2.5})
    response = http.get(f"/log/{entry_id}")
    assert response.headers["content-type"] == "application/json"
    text = response.content
    assert text.startswith(
        b'{"data":{"n":2.5,"name":1,"nested":{"a":null,"b":[{"y":1,"z":0}]}},"dependencies":[]'
    )
    assert text.endswith(
        b'"when":{"logical":%d,"wall_ms":%d}}'
        % tuple(response.json()["when"][k] for k in ("logical", "wall_ms"))
    )
    heads = http.get("/log")
    assert heads.headers["content-type"] == "application/json" and list(heads.json()) == sorted(heads.json())


def test_the_path_names_the_entry_not_the_query(http: httpx.Client) -> None:
    first, second = append(http, "first"), append(http, "second")
    response = http.get(f"/log/{first}", params={"id": second})
    assert response.status_code == 200 and response.json()["data"] == "first"


def test_unknown_entry_is_404(http: httpx.Client) -> None:
    unknown = str(uuid.uuid4())
    assert_error(http.get(f"/log/{unknown}"), 404, unknown)


@pytest.mark.parametrize(
    "bad_id", ["nope", "1234", "00000000-0000-0000-0000-00000000000", "00000000000000000000000000000000"]
)
def test_non_uuid_id_is_400(http: httpx.Client, bad_id: str) -> None:
    assert_error(http.get(f"/log/{bad_id}"), 400, bad_id)


def test_upper_case_id_finds_the_entry(http: httpx.Client) -> None:
    entry_id = append(http, "case")
    response = http.get(f"/log/{entry_id.upper()}")
    assert response.status_code == 200
    assert response.json()["id"] == entry_id


@pytest.mark.parametrize(
    "body",
    ["{bad", "{", "[1,", "1 2", '{"a":1}garbage', "nul", "NaN", "01", "[1 2]", "+1", " ", "\n"],
)
def test_invalid_json_is_400(http: httpx.Client, body: str) -> None:
    before = http.get("/log").json()
    assert_error(post(http, body), 400)
    assert http.get("/log").json() == before


@pytest.mark.parametrize(
    "body",
    ["'single'", "{'a': 1}", "{a: 1}", "[1,]", '{"a": 1,}'],
    ids=[
        "single-quotes",
        "single-quoted-key",
        "unquoted-key",
        "array-trailing-comma",
        "object-trailing-comma",
    ],
)
def test_lenient_non_json_is_400(http: httpx.Client, body: str) -> None:
    before = http.get("/log").json()
    assert_error(post(http, body), 400)
    assert http.get("/log").json() == before


def test_too_deeply_nested_json_is_400(fresh: tuple[NodeProcess, httpx.Client]) -> None:
    # A node of its own: the failure logs tracebacks, which test_node_log_has_no_tracebacks forbids.
    _, http = fresh
    for body in (b"[" * 60 + b"1" + b"]" * 60, b'{"a":' * 40 + b"1" + b"}" * 40):
        assert_error(post(http, body), 400)


def nested_json(depth: int, shape: str) -> bytes:
    if shape == "arrays":
        return b"[" * depth + b'"x"' + b"]" * depth
    return b'{"a":' * depth + b'"x"' + b"}" * depth


def test_every_accepted_entry_can_be_read_back(fresh: tuple[NodeProcess, httpx.Client]) -> None:
    _, http = fresh
    problems = []
    for shape in ("arrays", "objects"):
        deepest = ""
        for depth in range(1, 120):
            response = post(http, nested_json(depth, shape))
            if response.status_code != 201:
                break
            deepest = response.json()["id"]
        assert deepest
        response = http.get(f"/log/{deepest}")
        if response.status_code != 200:
            problems.append((shape, response.status_code, response.text))
    assert not problems, problems


def test_raw_del_in_a_string_is_valid_json(http: httpx.Client) -> None:
    response = post(http, b'"a\x7fb"')
    assert response.status_code == 201, response.text
    assert http.get(response.headers["location"]).json()["data"] == "a\x7fb"


def test_empty_body_is_400(http: httpx.Client) -> None:
    before = http.get("/log").json()
    assert_error(http.post("/log"), 400, "JSON")
    assert_error(post(http, b""), 400)
    assert http.get("/log").json() == before


def test_bad_dependency_is_400(http: httpx.Client) -> None:
    before = http.get("/log").json()
    assert_error(post(http, "1", params={"dependency": "bad"}), 400, "dependency", "bad")
    good = str(uuid.uuid4())
    assert_error(post(http, "1", params=[("dependency", good), ("dependency", "")]), 400, "dependency")
    assert http.get("/log").json() == before


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("dependency", "'dependency' has no value"),
        ("body=x", "unknown query parameter 'body'"),
        ("body.data=eA", "unknown query parameter 'body.data'"),
    ],
)
def test_a_query_the_transcoder_would_drop_or_misread_is_400(
    http: httpx.Client, query: str, words: str
) -> None:
    """A bare `?dependency` (dropped by the transcoder: the entry would lose the order it asks for),
    or a query naming the request's body (taken as a field the body then replaces)."""
    before = http.get("/log").json()
    bad = http.post(f"/log?{query}", content=b"1", headers={"content-type": "application/json"})
    assert_error(bad, 400, words)
    assert http.get("/log").json() == before


def test_dependencies_in_the_query(fresh: tuple[NodeProcess, httpx.Client]) -> None:
    _, http = fresh
    a = append(http, "a")
    b = append(http, "b")
    c = append(http, "c", params=[("dependency", a), ("dependency", b)])
    assert http.get(f"/log/{c}").json()["dependencies"] == [a, b]
    # A dependency on an entry this node has never seen is accepted; the entry waits for it.
    unknown = str(uuid.uuid4())
    d = append(http, "d", params={"dependency": unknown})
    entry = http.get(f"/log/{d}").json()
    assert entry["dependencies"] == [unknown] and entry["prev"] == c
    status = http.get("/status").json()
    assert int(status["pending"]) == 1
    assert int(status["delivered_position"]) == 3


def test_the_most_dependencies_fit_in_the_query(http: httpx.Client) -> None:
    deps = [str(uuid.UUID(int=i + 1)) for i in range(MAX_DEPENDENCIES)]
    # Several times: the first request on a fresh connection sometimes gets through.
    for _ in range(5):
        response = post(http, "1", params=[("dependency", d) for d in deps])
        assert response.status_code == 201, response.text
        assert http.get(response.headers["location"]).json()["dependencies"] == deps


@pytest.mark.parametrize("name", ["Dependency", "depends", "whatever"])
def test_unknown_query_parameters_are_a_400_and_append_nothing(http: httpx.Client, name: str) -> None:
    """A mistyped `dependency` would otherwise append the entry without the order it asked for."""
    before = http.get("/log").json()
    response = post(http, "1", params={name: str(uuid.UUID(int=1))})
    assert_error(response, 400)
    # Not the transcoder's words, which name the request's protobuf type.
    assert response.json()["message"] == f"unknown query parameter '{name}'"
    assert http.get("/log").json() == before


def test_entry_size_limit_exactly(http: httpx.Client) -> None:
    # A JSON string of n characters is a Value of n + 4 bytes (for n in 2^14..2^21).
    at_limit = json.dumps("x" * (MAX_ENTRY_BYTES - 4))
    response = post(http, at_limit)
    assert response.status_code == 201, response.text
    entry = http.get(response.headers["location"]).json()
    assert len(entry["data"]) == MAX_ENTRY_BYTES - 4


def test_entry_over_the_limit_is_413(http: httpx.Client) -> None:
    over = json.dumps("x" * (MAX_ENTRY_BYTES - 3))
    assert len(over) < MAX_BODY_BYTES
    assert_error(post(http, over), 413, str(MAX_ENTRY_BYTES))


def test_entry_over_the_limit_is_refused_with_a_clear_message(http: httpx.Client) -> None:
    before = http.get("/log").json()
    response = post(http, json.dumps("x" * (MAX_ENTRY_BYTES - 3)))
    assert 400 <= response.status_code < 500
    assert_error(response, response.status_code, str(MAX_ENTRY_BYTES))
    assert http.get("/log").json() == before


def test_oversized_body_is_413_and_the_node_keeps_serving(http: httpx.Client) -> None:
    before = http.get("/log").json()
    body = json.dumps("x" * (MAX_BODY_BYTES + 1024))
    assert_error(post(http, body), 413, f"the limit of {MAX_BODY_BYTES >> 20} MiB")
    assert_error(post(http, b"[" + b"1," * (MAX_BODY_BYTES // 2) + b"1]"), 413)
    assert http.get("/log").json() == before
    assert post(http, "1").status_code == 201


# -- webhooks registration --------------------------------------------------------------------


def test_register_and_deregister(http: httpx.Client) -> None:
    url = f"http://127.0.0.1:9/hook-{uuid.uuid4()}"
    assert_no_content(http.post("/log/register", json={"url": url}))
    assert_no_content(http.post("/log/register", json={"url": url}))
    assert_no_content(http.post("/log/deregister", json={"url": url}))
    assert_error(http.post("/log/deregister", json={"url": url}), 404, url)


@pytest.mark.parametrize(
    "body",
    [
        {"url": "ftp://example.com/hook"},
        {"url": "garbage"},
        {"url": "http://"},
        {"url": "http://exa mple.com/"},
        {"url": ""},
        {},
        {"url": 5},
        {"url": ["http://example.com"]},
    ],
    ids=["ftp", "garbage", "no-host", "space", "empty", "missing", "number", "list"],
)
def test_register_bad_url_is_400(http: httpx.Client, body: JSON) -> None:
    assert_error(http.post("/log/register", json=body), 400)


@pytest.mark.parametrize("path", ["/log/register", "/log/deregister", "/nodes"])
def test_registration_bodies_must_be_json(http: httpx.Client, path: str) -> None:
    assert_error(http.post(path, content=b"url=http://x", headers={"content-type": "application/json"}), 400)
    assert_error(http.post(path), 400)


@pytest.mark.parametrize("url", [5, True, ["http://127.0.0.1:9/x"], {"a": 1}])
@pytest.mark.parametrize("path", ["/log/register", "/log/deregister", "/nodes"])
def test_a_url_that_is_not_a_string_is_told_so(http: httpx.Client, path: str, url: JSON) -> None:
    """Not in protobuf's words ("url: invalid value 5 for type TYPE_STRING", or no name at all)."""
    assert_error(http.post(path, json={"url": url}), 400, "url must be a JSON string")


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/log/register"), ("POST", "/log/deregister"), ("POST", "/nodes"), ("DELETE", "/nodes")],
)
def test_registration_bodies_take_no_other_members_and_are_objects(
    shared_node: NodeProcess, http: httpx.Client, method: str, path: str
) -> None:
    """The transcoder would drop a member the request message lacks without a word."""

    def webhook_urls() -> list[str]:
        with grpc.insecure_channel(shared_node.grpc_target) as channel:
            stub = webhooks_pb2_grpc.WebhooksServiceStub(channel)
            return [w.url for w in stub.ListWebhooks(webhooks_pb2.ListWebhooksRequest(), timeout=10).webhooks]

    url = "http://127.0.0.1:9/members"
    nodes, hooks = http.get("/nodes").json(), webhook_urls()
    body = {"url": url, "Url": url, "x" * 100: {"a": [1, {"b": 2}]}}
    message = assert_error(http.request(method, path, json=body), 400, "unknown members: 'Url', 'xxx")
    assert len(message) < 200, message
    assert_error(http.request(method, path, json=[url]), 400, "must be a JSON object with url")
    # Long keys are cut between characters, not inside one.
    cut = assert_error(http.request(method, path, json={"url": url, "a" + "\u00e9" * 40: 1}), 400)
    assert "'a" + "\u00e9" * 31 + "...'" in cut, cut
    # A key of bytes that are all UTF-8 continuations (no character to cut before): no Lua error.
    odd = b'{"url": "http://127.0.0.1:9/x", "' + b"\x80" * 70 + b'": 1}'
    headers = {"content-type": "application/json"}
    assert_error(http.request(method, path, content=odd, headers=headers), 400, "unknown members: '...'")
    assert "attempt to compare" not in shared_node.log_tail(200)
    # Keys are read as JSON reads them: escapes decoded, also in the message.
    escaped = b'{"url": "http://127.0.0.1:9/x", "\\u00e9\\ud83d\\ude00\\"": 1}'
    assert_error(
        http.request(method, path, content=escaped, headers=headers), 400, "members: '\u00e9\U0001f600\"'"
    )
    assert (http.get("/nodes").json(), webhook_urls()) == (nodes, hooks)


def test_an_escaped_member_name_is_the_member(http: httpx.Client) -> None:
    """`{"u\\u0072l": U}` is `{"url": U}` to any JSON reader, the transcoder included."""
    headers = {"content-type": "application/json"}
    url = "http://127.0.0.1:9/escaped"
    assert_no_content(
        http.post("/log/register", content=b'{"u\\u0072l": "%s"}' % url.encode(), headers=headers)
    )
    assert_no_content(
        http.post("/log/deregister", content=b'{"\\u0075rl": "%s"}' % url.encode(), headers=headers)
    )


def test_connection_is_reused_after_204(http: httpx.Client) -> None:
    # A 204 with a body would break HTTP/1.1 keep-alive: the next request on the connection must work.
    url = "http://127.0.0.1:9/keepalive"
    for _ in range(3):
        assert_no_content(http.post("/log/register", json={"url": url}))
        assert http.get("/log").status_code == 200
    assert_no_content(http.post("/log/deregister", json={"url": url}))
    assert http.get("/log").status_code == 200


def test_204_has_no_content_length_and_no_lua_error(shared_node: NodeProcess, http: httpx.Client) -> None:
    node = shared_node
    response = http.post("/log/register", json={"url": "http://127.0.0.1:9/x"})
    assert_no_content(response)
    problems = []
    if "content-length" in response.headers:
        problems.append("204 with a content-length header")
    if "[lua]" in node.log_file.read_text(errors="replace"):
        problems.append("Lua error in the node's log")
    assert not problems, problems


# -- nodes -----------------------------------------------------------------------------------


def test_nodes(http: httpx.Client) -> None:
    response = http.get("/nodes")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == []
    peer = "http://127.0.0.1:9"  # nothing listens there: it is retried in the background
    assert_no_content(http.post("/nodes", json={"url": peer}))
    assert_no_content(http.post("/nodes", json={"url": peer + "/"}))
    assert http.get("/nodes").json() == [peer]
    assert_error(http.post("/nodes", json={"url": "bad"}), 400, "bad")
    assert_error(http.post("/nodes", json={"url": "http://127.0.0.1:9/some/path"}), 400)
    assert_error(http.post("/nodes", json={}), 400)
    assert_error(http.request("DELETE", "/nodes", json={"url": "http://127.0.0.1:19"}), 404, "127.0.0.1:19")
    assert_no_content(http.request("DELETE", "/nodes", json={"url": peer}))
    assert http.get("/nodes").json() == []
    assert_error(http.request("DELETE", "/nodes", json={"url": peer}), 404)


@pytest.mark.parametrize("suffix", ["", "/"])
def test_a_node_refuses_itself_as_peer(shared_node: NodeProcess, http: httpx.Client, suffix: str) -> None:
    node = shared_node
    assert_error(http.post("/nodes", json={"url": node.url + suffix}), 400, "itself")
    assert http.get("/nodes").json() == []


# -- unknown paths and methods ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nothing"),
        ("GET", "/"),
        ("GET", "/log/a/b"),
        ("GET", "/kv"),  # a path of another port
        ("POST", "/create"),
    ],
)
def test_unknown_paths_are_404_json(http: httpx.Client, method: str, path: str) -> None:
    content = b"{}" if method in ("PUT", "POST", "PATCH", "DELETE") else None
    assert_error(http.request(method, path, content=content), 404)


@pytest.mark.parametrize(
    ("port", "method", "path", "allow"),
    [
        ("core", "PUT", "/log", "GET, HEAD, POST"),
        ("core", "DELETE", "/log", "GET, HEAD, POST"),
        ("core", "PATCH", "/log", "GET, HEAD, POST"),
        ("core", "DELETE", "/log/3f1c0e4a-5b7d-4c8e-9f60-1a2b3c4d5e6f", "GET, HEAD"),
        ("core", "POST", "/status", "GET, HEAD"),
        ("core", "PUT", "/log/register", "POST"),
        # Not GET /log/{id} with id "register" (a 400: not a UUID) or GET /queue/q/{task_id}.
        ("core", "GET", "/log/register", "POST"),
        ("core", "GET", "/log/deregister", "POST"),
        ("pigtail", "GET", "/queue/q/claim", "POST"),
        ("pigtail", "PUT", "/queue/q/claim", "POST"),  # not PUT /queue/q/{task_id} (a raw-body route)
        ("pigtail", "DELETE", "/queue/q/dead", "GET, HEAD"),
        ("kv", "DELETE", "/kv/t/k", "GET, HEAD, POST"),
        ("kv", "PUT", "/kv", "GET, HEAD"),
        ("pigtail", "GET", "/create", "POST"),
        ("pigtail", "PATCH", "/queue/q/t1", "DELETE, GET, HEAD, PUT"),
        ("browser", "DELETE", "/", "GET, HEAD"),
        # With trailing slashes, which the transcoder takes as the same path.
        ("core", "PUT", "/log/", "GET, HEAD, POST"),
        ("core", "PUT", "/log//", "GET, HEAD, POST"),
        ("core", "PATCH", "/nodes/", "DELETE, GET, HEAD, POST"),
        ("kv", "PUT", "/kv/", "GET, HEAD"),
        ("kv", "DELETE", "/kv/t/k/", "GET, HEAD, POST"),
    ],
)
def test_a_known_path_with_another_method_is_405_with_allow(
    shared_node: NodeProcess, port: str, method: str, path: str, allow: str
) -> None:
    url = shared_node.port_url(getattr(shared_node.ports, port))
    content = b"{}" if method in ("PUT", "POST", "PATCH", "DELETE") else None
    with httpx.Client(base_url=url, timeout=30.0) as client:
        response = client.request(method, path, content=content)
    assert response.headers["allow"] == allow
    takes = " or ".join(allow.rsplit(", ", 1))
    assert_error(response, 405, f"{method} is not allowed here", f"takes {takes}")


def test_a_trailing_slash_is_the_same_path(http: httpx.Client) -> None:
    created = http.post("/log/", content=b'{"slash": 1}', headers={"content-type": "application/json"})
    assert created.status_code == 201
    entry_id = created.json()["id"]
    assert created.headers["location"] == f"/log/{entry_id}"
    assert http.get(f"/log/{entry_id}/").json() == http.get(f"/log/{entry_id}").json()
    assert http.get("/status/").json()["node_id"] == http.get("/status").json()["node_id"]
    # A raw body stays the node's to judge: the same answer as without the slashes.
    bad = http.post("/log//", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json() == post(http, "{not json").json()


def test_percent_encoded_letters_in_a_path_are_the_letters(http: httpx.Client) -> None:
    """RFC 3986 6.2.2.2: /log/%72egister is /log/register; routes and transcoder read it alike."""
    entry_id = append(http, {"pct": 1})
    assert (
        http.get(f"/log/%{ord(entry_id[0]):02X}{entry_id[1:]}").json() == http.get(f"/log/{entry_id}").json()
    )
    assert http.get("/log/%66irst").json() == http.get("/log/first").json()
    body = {"url": "http://127.0.0.1:9/pct"}
    assert_no_content(http.post("/log/%72egister", json=body))
    assert_no_content(http.post("/log/deregister", json=body))


def test_a_grpc_web_content_type_is_a_rest_request(http: httpx.Client) -> None:
    """Envoy transcodes application/grpc-web as REST: the gateway's body checks must apply to it."""
    headers = {"content-type": "application/grpc-web"}
    bad = http.post("/log/register", content=b"{'url': 1, bogus: 1,}", headers=headers)
    assert_error(bad, 400, "not valid JSON")
    assert http.head("/log", headers=headers).status_code == 200


def test_a_stalled_node_is_a_504_not_a_request_that_hangs(fresh: tuple[NodeProcess, httpx.Client]) -> None:
    """A stopped node still accepts connections on its REST bridge's socket and answers nothing:
    the REST call gets a 504 when the route's timeout ends (REST_TIMEOUT) instead of waiting for
    ever; then the node serves again."""
    node, http = fresh
    append(http, {"before": "the stall"})
    node.signal(signal.SIGSTOP)
    try:
        stalled = http.get("/log", timeout=60.0)
    finally:
        node.signal(signal.SIGCONT)
    assert stalled.status_code == 504 and stalled.json()["code"] == 4, stalled.text
    wait_for_sync(lambda: http.get("/log").status_code == 200, 30, "the node serving again")


def test_head_answers_as_get_without_the_body(shared_node: NodeProcess) -> None:
    # http.client, not httpx: it reads no body after a HEAD, so a body sent anyway would show up
    # as garbage before the next answer on the same connection.
    conn = HTTPConnection("127.0.0.1", shared_node.ports.core, timeout=30)
    try:
        conn.request("POST", "/log", body=b'{"head": 1}', headers={"content-type": "application/json"})
        created = conn.getresponse()
        entry_id = json.loads(created.read())["id"]
        for path in [f"/log/{entry_id}", "/log", "/status", f"/log/{uuid.uuid4()}", "/log/not-a-uuid"]:
            conn.request("GET", path)
            got = conn.getresponse()
            got_body = got.read()
            conn.request("HEAD", path)
            head = conn.getresponse()
            assert head.read() == b""
            assert head.status == got.status, path
            assert head.getheader("content-length") == str(len(got_body)), path
            assert head.getheader("content-type") == got.getheader("content-type")
        conn.request("GET", f"/log/{entry_id}")
        assert json.loads(conn.getresponse().read())["data"] == {"head": 1}  # the connection is intact
    finally:
        conn.close()


def test_http_1_0_clients_are_served(shared_node: NodeProcess, http: httpx.Client) -> None:
    """ApacheBench and `curl --http1.0` speak HTTP/1.0, with or without a Host header."""
    entry_id = append(http, {"via": "HTTP/1.1"})
    for host in (f"Host: 127.0.0.1:{shared_node.ports.core}\r\n", ""):
        with socket.create_connection(("127.0.0.1", shared_node.ports.core), timeout=30) as sock:
            sock.sendall(f"GET /log/{entry_id} HTTP/1.0\r\n{host}\r\n".encode())
            answer = b""
            while chunk := sock.recv(65536):  # an HTTP/1.0 answer ends with the connection
                answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200"), head
        assert json.loads(body)["data"] == {"via": "HTTP/1.1"}


@pytest.mark.parametrize(
    "header",
    [
        ("grpc-timeout", "soon"),
        ("grpc-timeout", "5S"),
        ("grpc-encoding", "gzip"),
        ("grpc-encoding", "bogus"),
        ("grpc-accept-encoding", "bogus"),
        ("grpc-previous-rpc-attempts", "x"),
        ("x-note-bin", "!!! not base64"),
    ],
)
def test_grpc_headers_on_a_rest_request_are_ignored(http: httpx.Client, header: tuple[str, str]) -> None:
    """The node resets a call with a bad gRPC header (a 503 from Envoy): a REST client's gRPC
    headers are none of the call's business."""
    response = http.get("/log/first", headers=dict([header]))
    assert response.status_code == 200, response.text
    response = http.post("/log", content=b'{"with": "a gRPC header"}', headers=dict([header]))
    assert response.status_code == 201, response.text
