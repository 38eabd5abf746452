"""Property tests of the REST surfaces (core B, KV B+1, Pigtail B+3) of one real node, through Envoy:
malformed JSON, invalid UTF-8, deep nesting, wrong types, bad UUIDs, odd webhook and node URLs, table,
key and queue names with separators and control characters, unknown ops, absurd numbers and timeouts.
Every one must get a 4xx with a message (never a 5xx), the node must survive, and what it stores must be
unchanged (`BadInputNode.unchanged`)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from hypothesis import assume, given
from hypothesis import strategies as st

from potboiler.server.entries import MAX_DEPTH
from tests.badinput.conftest import (
    FUZZ,
    HAS_KV,
    HAS_PIGTAIL,
    NAME,
    QUEUE,
    TABLES,
    UUID,
    BadInputNode,
    client_error,
    needs_kv,
    needs_pigtail,
)

KV_OPS = {"set", "create", "add", "remove", "increment", "decrement"}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=10,
)


def strict_json(text: str | bytes) -> bool:
    """Whether `text` is JSON by the RFC (no NaN or Infinity, no control characters in strings)."""

    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        json.loads(text, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError):
        return False
    return True


@st.composite
def malformed_json(draw: st.DrawFn) -> bytes:
    """Valid JSON broken by a cut, an inserted or replaced character, or a stray token."""
    text = json.dumps(draw(json_values))
    how = draw(st.sampled_from(["cut", "insert", "replace", "append", "prepend"]))
    junk = draw(
        st.sampled_from(["{", "}", "[", "]", ",", ":", '"', "\\", "'", "x", "NaN", "\x00", "\x01", "/*"])
    )
    at = draw(st.integers(0, len(text)))
    if how == "cut":
        text = text[:at]
    elif how == "insert":
        text = text[:at] + junk + text[at:]
    elif how == "replace":
        text = text[:at] + junk + text[at + 1 :]
    elif how == "append":
        text = text + junk
    else:
        text = junk + text
    assume(not strict_json(text))
    return text.encode()


@st.composite
def invalid_utf8(draw: st.DrawFn) -> bytes:
    """A JSON document with bytes that are not UTF-8 inside a string."""
    bad = draw(
        st.sampled_from([b"\xff", b"\xfe", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\x80"])
    )
    prefix = draw(st.text(alphabet="abc ", max_size=5)).encode()
    return b'{"s": "' + prefix + bad + b'"}'


def deep(depth: int, kind: str) -> bytes:
    if kind == "array":
        return b"[" * depth + b"1" + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


# -- core: /log -------------------------------------------------------------------------------------


def test_malformed_json_bodies_are_refused(node: BadInputNode) -> None:
    with node.unchanged():

        @FUZZ
        @given(
            body=malformed_json()
            | invalid_utf8()
            | st.binary(max_size=64).filter(lambda b: not strict_json(b))
        )
        def run(body: bytes) -> None:
            client_error(
                node.core.post("/log", content=body, headers={"content-type": "application/json"}), 400
            )

        run()


def test_deeply_nested_bodies_are_refused(node: BadInputNode) -> None:
    with node.unchanged():

        @FUZZ
        @given(depth=st.integers(MAX_DEPTH + 1, 200_000), kind=st.sampled_from(["array", "object"]))
        def run(depth: int, kind: str) -> None:
            client_error(node.core.post("/log", content=deep(depth, kind)), 400)

        run()


def test_integers_a_double_cannot_hold_exactly_are_refused(node: BadInputNode) -> None:
    """Every JSON number is kept as a double: an integer beyond 2^53 would read back as another
    number, so it is refused wherever it is (entry data, a KV change, a task's info)."""
    beyond = st.integers(2**53 + 1, 10**40) | st.integers(-(10**40), -(2**53) - 1)
    with node.unchanged():

        @FUZZ
        @given(n=beyond, nested=st.booleans())
        def run(n: int, nested: bool) -> None:
            value = f'{{"a": [1, {{"b": {n}}}], "c": "{n}"}}' if nested else str(n)
            response = node.core.post("/log", content=value, headers={"content-type": "application/json"})
            client_error(response, 400)
            assert f"the integer {n} is beyond 2^53" in response.json()["message"]
            if HAS_KV:
                change = f'{{"op": "set", "change": {value}}}'
                client_error(node.kv.post("/kv/t_lww/k", content=change), 400)
            if HAS_PIGTAIL:
                task = f'{{"task_name": "x", "info": {value}}}'
                client_error(node.pigtail.post(f"/queue/{QUEUE}", content=task), 400)

        run()

    # Up to 2^53 every integer is exact, and comes back as written.
    for n in (2**53, -(2**53), 1234567890123456):
        response = node.core.post("/log", content=f'{{"n": {n}, "s": "{n}1"}}')
        assert response.status_code == 201, response.text
        assert node.core.get(f"/log/{response.json()['id']}").json()["data"] == {"n": n, "s": f"{n}1"}


def test_bad_entry_ids_are_refused(node: BadInputNode) -> None:
    with node.unchanged():

        @FUZZ
        @given(text=st.text(min_size=1, max_size=60).filter(lambda s: not UUID.fullmatch(s)))
        def run(text: str) -> None:
            client_error(node.core.get(f"/log/{quote(text, safe='')}"), 400, 404)

        run()


def test_bad_dependencies_are_refused(node: BadInputNode) -> None:
    with node.unchanged():

        @FUZZ
        @given(dependency=st.text(max_size=60).filter(lambda s: not UUID.fullmatch(s)))
        def run(dependency: str) -> None:
            response = node.core.post("/log", params={"dependency": dependency}, json={"fine": True})
            client_error(response, 400)

        run()


# -- webhooks and nodes ---------------------------------------------------------------------------

#: Webhook and node URLs that are not http(s) URLs with a host.
ODD_URLS = [
    "",
    " ",
    "ftp://example.com/",
    "http://",
    "https://",
    "http:///path",
    "http://[::1",
    "http://[zz::1]/",
    "http://host:99999/",
    "http://host:0/",
    "http://1.2.3.4:-1/",
    "http://x:80:80/",
    "javascript:alert(1)",
    "file:///etc/passwd",
    "data:text/plain,hi",
    "mailto:a@example.com",
    "gopher://example.com/",
    "ws://example.com/",
    "//example.com/path",
    "http:example.com",
    "http:\\\\example.com",
    "h t t p://example.com",
    "http://exa mple.com/",
    "http://example.com/\n",
    "\thttp://example.com/",
    "http://example.com/\x00",
    "http://example.com/\x7f",
    "http://user:pass@",
    "http://:80/",
    "http://?",
    "http://#",
    "http://" + "a" * 3000,
]


def test_odd_webhook_urls_are_refused(node: BadInputNode) -> None:
    with node.unchanged():
        for url in ODD_URLS:
            client_error(node.core.post("/log/register", json={"url": url}), 400)
            client_error(node.core.post("/log/deregister", json={"url": url}), 400, 404)
        bodies: list[Any] = [
            {"url": 5},
            {"url": None},
            {"url": []},
            {"url": {}},
            {"url": True},
            {},
            [],
            "x",
            5,
            None,
        ]
        for body in bodies:
            client_error(node.core.post("/log/register", json=body), 400)

        @FUZZ
        @given(url=st.text(max_size=80).filter(lambda s: not s.lower().startswith(("http://", "https://"))))
        def run(url: str) -> None:
            client_error(node.core.post("/log/register", json={"url": url}), 400)

        run()


def test_odd_node_urls_are_refused(node: BadInputNode) -> None:
    with node.unchanged():
        urls = [
            *ODD_URLS,
            "http://example.com:8000/path",
            "http://example.com:8000/?q=1",
            "http://example.com:8000/#f",
        ]
        for url in urls:
            client_error(node.core.post("/nodes", json={"url": url}), 400)
            client_error(node.core.request("DELETE", "/nodes", json={"url": url}), 400, 404)

        @FUZZ
        @given(url=st.text(max_size=80).filter(lambda s: not s.lower().startswith(("http://", "https://"))))
        def run(url: str) -> None:
            client_error(node.core.post("/nodes", json={"url": url}), 400)

        run()


#: Webhook URLs whose host is not a hostname the delivery client (httpx) can use at all.
UNUSABLE_HOSTS = ["http://\u202eexample.com/", "http://exa\u200fmple.com/", "http://x\u2066y.com/"]


def test_webhook_urls_with_unusable_hosts_are_refused(node: BadInputNode) -> None:
    accepted = []
    try:
        for url in UNUSABLE_HOSTS:
            response = node.core.post("/log/register", json={"url": url})
            if response.status_code == 204:
                accepted.append(url)
            else:
                client_error(response, 400)
        assert not accepted, f"registered webhooks that can never be delivered to: {accepted}"
    finally:
        for url in accepted:
            node.core.post("/log/deregister", json={"url": url})


# -- KV -------------------------------------------------------------------------------------------

#: Names that are not 1 to 128 letters, digits, '_' or '-' (empty ones are left out: an empty path
#: segment is a different route, e.g. GET /kv/t/ lists the keys of t).
bad_names = st.text(min_size=1, max_size=140).filter(lambda s: not NAME.fullmatch(s)) | st.text(
    alphabet="abcXYZ019_-", min_size=129, max_size=200
)


@needs_kv
def test_bad_table_and_key_names_are_refused(node: BadInputNode) -> None:
    with node.unchanged():

        @FUZZ
        @given(name=bad_names, where=st.sampled_from(["table", "key", "both"]))
        def run(name: str, where: str) -> None:
            table = quote(name, safe="") if where != "key" else "t_lww"
            key = quote(name, safe="") if where != "table" else "k1"
            client_error(node.kv.post(f"/kv/{table}/{key}", json={"op": "set", "change": 1}), 400, 404)
            client_error(node.kv.get(f"/kv/{table}/{key}"), 400, 404)

        run()


@needs_kv
def test_unknown_ops_and_wrong_types_are_refused(node: BadInputNode) -> None:
    not_an_op = st.text(max_size=20).filter(lambda s: s not in KV_OPS)
    wrong_counter_amounts = st.one_of(
        st.text(max_size=10),
        st.booleans(),
        st.none(),
        st.integers(max_value=-1),
        st.lists(st.integers(), max_size=3),
    )
    not_an_object = st.one_of(
        st.integers(), st.text(max_size=10), st.booleans(), st.lists(st.integers(), max_size=3)
    )
    bodies = st.one_of(
        st.tuples(
            st.sampled_from([*sorted(TABLES), "no_such_table"]),
            st.builds(lambda op: {"op": op, "change": 1}, not_an_op),
        ),
        st.tuples(
            st.just("t_counter"), st.builds(lambda c: {"op": "increment", "change": c}, wrong_counter_amounts)
        ),
        st.tuples(st.just("t_orset"), st.builds(lambda c: {"op": "add", "change": c}, not_an_object)),
        st.tuples(
            st.sampled_from(["t_lww", "t_counter"]),
            st.sampled_from(
                [
                    {"op": "add", "change": {"item": 1, "key": "k"}},
                    {"op": "remove", "change": {"item": 1, "key": "k"}},
                ]
            ),
        ),
        st.tuples(
            st.sampled_from(sorted(TABLES)),
            st.sampled_from(
                [{"op": 5, "change": 1}, {"op": ["set"]}, {"change": 1}, {"op": "set"}, [], "set", 7]
            ),
        ),
        st.tuples(
            st.just("_config"),
            st.builds(
                lambda c: {"op": "set", "change": c},
                not_an_object
                | st.builds(
                    lambda n: {"crdt": n}, st.text(max_size=12).filter(lambda s: s not in TABLES.values())
                ),
            ),
        ),
    )
    with node.unchanged():

        @FUZZ
        @given(target=bodies)
        def run(target: tuple[str, Any]) -> None:
            table, body = target
            key = "k1" if table != "_config" else "t_new"
            client_error(node.kv.post(f"/kv/{table}/{key}", json=body), 400)

        run()


@needs_kv
def test_counter_increments_beyond_exact_numbers_are_refused_or_exact(node: BadInputNode) -> None:
    url = "/kv/t_counter/big"
    first = node.kv.post(url, json={"op": "increment", "change": 2**53})
    second = node.kv.post(url, json={"op": "increment", "change": 1})
    if first.status_code == 200 and second.status_code == 200:
        assert node.kv.get(url).json() == 2**53 + 1, "an acknowledged increment is missing from the counter"
    else:
        client_error(first if first.status_code != 200 else second, 400)


# -- Pigtail --------------------------------------------------------------------------------------


@needs_pigtail
def test_absurd_queue_settings_are_refused(node: BadInputNode) -> None:
    bad_timeouts: st.SearchStrategy[Any] = st.one_of(
        st.integers(max_value=0),
        st.integers(min_value=86_400_001, max_value=2**63 - 1),
        st.integers(min_value=2**63),
        st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
        st.text(max_size=8).filter(lambda s: not s.strip().lstrip("-").isdigit()),
        st.booleans(),
        st.lists(st.integers(), max_size=2),
    )
    with node.unchanged():

        @FUZZ
        @given(
            choice=st.one_of(
                st.builds(lambda t: {"name": "fuzzq", "timeout_ms": t}, bad_timeouts),
                st.builds(lambda n: {"name": n, "timeout_ms": 1000}, bad_names),
                st.builds(
                    lambda a: {"name": "fuzzq", "timeout_ms": 1000, "max_attempts": a},
                    st.integers(max_value=0) | st.integers(min_value=1001, max_value=2**40),
                ),
            )
        )
        def run(choice: dict[str, Any]) -> None:
            client_error(node.pigtail.post("/create", json=choice), 400)

        run()


@needs_pigtail
def test_bad_tasks_claims_and_completions_are_refused(node: BadInputNode) -> None:
    task = node.task_ids[0]
    bad_text = st.one_of(
        st.just(""),
        st.text(min_size=257, max_size=300),
        st.text(max_size=20).map(lambda s: s + "\x00"),
        st.text(max_size=20).map(lambda s: "\n" + s),
    )
    bad_done_worker = bad_text.filter(lambda s: s != "")  # an empty worker may mark a task done
    year_ms = 365 * 86_400_000
    adds = st.one_of(
        st.builds(lambda n: {"task_name": n}, bad_text),
        st.builds(
            lambda p: {"task_name": "t", "priority": p},
            st.integers(1_000_001, 2**31 - 1) | st.integers(-(2**31), -1_000_001),
        ),
        st.builds(
            lambda d: {"task_name": "t", "delay_ms": d},
            st.integers(max_value=-1) | st.integers(year_ms + 1, 2**62),
        ),
        st.builds(
            lambda t: {"task_name": "t", "not_before_ms": t},
            st.integers(max_value=-1) | st.integers(10 * year_ms * 100, 2**62),
        ),
        st.just({"task_name": "t", "delay_ms": 5, "not_before_ms": 5}),
        st.builds(
            lambda v: {"task_name": v}, st.integers() | st.booleans() | st.lists(st.integers(), max_size=2)
        ),
    )
    with node.unchanged():

        @FUZZ
        @given(
            request=st.one_of(
                st.builds(lambda b: ("POST", f"/queue/{QUEUE}", b), adds),
                st.builds(lambda w: ("PUT", f"/queue/{QUEUE}/{task}", {"worker_id": w}), bad_text),
                st.builds(lambda w: ("DELETE", f"/queue/{QUEUE}/{task}", {"worker_id": w}), bad_done_worker),
                st.builds(
                    lambda w: ("POST", f"/queue/{QUEUE}/claim", {"worker_id": "w", "wait_ms": w}),
                    st.integers(max_value=-1) | st.integers(60_001, 2**62),
                ),
                st.builds(lambda n: ("POST", f"/queue/{quote(n, safe='')}", {"task_name": "t"}), bad_names),
            )
        )
        def run(request: tuple[str, str, Any]) -> None:
            method, path, body = request
            client_error(node.pigtail.request(method, path, json=body), 400, 404)

        run()


def test_unknown_paths_and_methods_are_refused(node: BadInputNode) -> None:
    requests = [
        (node.core, "PATCH", "/log"),
        (node.core, "PUT", "/log"),
        (node.core, "GET", "/nope"),
        (node.core, "DELETE", "/log/first"),
        (node.core, "GET", "/log/" + "a" * 5000),
    ]
    if HAS_KV:
        requests += [
            (node.kv, "PUT", "/kv/t_lww/k1"),
            (node.kv, "GET", "/kv/t_lww/k1/extra"),
            (node.kv, "DELETE", "/kv"),
        ]
    if HAS_PIGTAIL:
        requests += [
            (node.pigtail, "GET", "/create"),
            (node.pigtail, "PATCH", f"/queue/{QUEUE}"),
            (node.pigtail, "GET", "/queue/no_such_queue"),
        ]
    with node.unchanged():
        for client, method, path in requests:
            client_error(client.request(method, path), 400, 404, 405, 414)
