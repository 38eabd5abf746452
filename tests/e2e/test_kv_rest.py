"""KV end to end: real `potboiler node` processes, REST through Envoy on port B+1.

One node: the seed's REST flow (create a table through `_config`, set, get, lists), 404s and 400s, every
table type. Three nodes: concurrent LWW sets converge on the (HLC, owner) winner, a concurrent OR-Set add
and remove leave the add, counters sum exactly, a table made on one node takes writes on another (also
writes sent before the table existed), and a node restart (clean or kill -9) neither loses nor
double-applies.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from potboiler.server.processes import NodeProcess
from tests.conftest import wait_for_sync
from tests.node_processes import NodeProcesses

pytestmark = pytest.mark.e2e

JSON = Any


@dataclass
class Kv:
    """A node with clients on its KV port and its core port."""

    node: NodeProcess
    http: httpx.Client
    core: httpx.Client

    def post(self, table: str, key: str, op: str, change: JSON = None) -> httpx.Response:
        return self.http.post(f"/kv/{table}/{key}", json={"op": op, "change": change})

    def ok(self, table: str, key: str, op: str, change: JSON = None) -> dict[str, Any]:
        response = self.post(table, key, op, change)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def value(self, table: str, key: str) -> JSON:
        response = self.get(f"/kv/{table}/{key}")
        assert response.status_code == 200, response.text
        return response.json()

    def value_or_none(self, table: str, key: str) -> JSON:
        response = self.get(f"/kv/{table}/{key}")
        return response.json() if response.status_code == 200 else None

    def tables(self) -> list[str]:
        response = self.get("/kv")
        assert response.status_code == 200, response.text
        tables: list[str] = response.json()
        return tables

    def entry_count(self) -> int:
        heads = self.core.get("/status").json()
        return sum(int(c["seq"]) for c in heads["vector"])


@pytest.fixture
def kv_factory(node_process: NodeProcesses) -> Iterator[Callable[..., Kv]]:
    clients: list[httpx.Client] = []

    def make(name: str, peers: list[Kv] | None = None) -> Kv:
        node = node_process(name, peers=[p.node.url for p in peers or []])
        http = httpx.Client(base_url=node.port_url(node.ports.kv), timeout=30.0)
        core = httpx.Client(base_url=node.url, timeout=30.0)
        clients.extend([http, core])
        return Kv(node, http, core)

    try:
        yield make
    finally:
        for client in clients:
            client.close()


@pytest.fixture
def kv(kv_factory: Callable[..., Kv]) -> Kv:
    return kv_factory("solo")


@pytest.fixture
def three(kv_factory: Callable[..., Kv]) -> list[Kv]:
    a = kv_factory("a")
    b = kv_factory("b", [a])
    c = kv_factory("c", [a, b])
    nodes = [a, b, c]
    wait_for_sync(
        lambda: all(len(n.core.get("/nodes").json()) == 2 for n in nodes), message="a full mesh of 3 nodes"
    )
    return nodes


def error_message(response: httpx.Response) -> str:
    message: str = response.json()["message"]
    return message


# -- one node ----------------------------------------------------------------------------------------


def test_seed_rest_flow(kv: Kv) -> None:
    assert kv.tables() == []
    created = kv.ok("_config", "test", "set", {"crdt": "LWW"})
    assert set(created) == {"id", "pending"} and created["pending"] is False
    kv.ok("test", "foo", "set", ["foo", "bar"])
    assert kv.value("test", "foo") == ["foo", "bar"]
    kv.ok("test", "foo", "set", {"nested": {"a": [1, 2.5, None, True]}, "b": {"y": 1, "x": 2}})
    answer = kv.get("/kv/test/foo")
    assert answer.headers["content-type"] == "application/json"
    assert answer.content == b'{"b":{"x":2,"y":1},"nested":{"a":[1,2.5,null,true]}}'  # members sorted
    kv.ok("test", "bar", "set", "text")
    # The table and key come from the path only: a body naming others changes nothing.
    response = kv.http.post("/kv/test/bar", json={"op": "set", "change": "body", "table": "x", "key": "y"})
    assert response.status_code == 200, response.text
    assert kv.value("test", "bar") == "body"
    # Nor does a query naming them (the transcoder would take those over the path).
    query = {"table": "_config", "key": "test"}
    response = kv.http.post("/kv/test/bar", params=query, json={"op": "set", "change": "query"})
    assert response.status_code == 200, response.text
    assert kv.value("test", "bar") == "query"
    assert kv.get("/kv/test/bar?key=foo").json() == "query"
    assert kv.tables() == ["test"]
    assert kv.get("/kv/test").json() == ["bar", "foo"]
    assert kv.value("_config", "test") == {"crdt": "LWW"}
    assert kv.get("/kv/_config").json() == ["test"]

    missing_table = kv.get("/kv/nope/foo")
    assert missing_table.status_code == 404 and error_message(missing_table) == "No such table 'nope'"
    missing_key = kv.get("/kv/test/nope")
    assert missing_key.status_code == 404 and error_message(missing_key) == "No such key 'nope'"
    assert kv.get("/kv/nope").status_code == 404

    # A write to a table nobody has created yet is well formed: 200, and it applies once it exists.
    assert kv.ok("later", "k", "set", 1)["pending"] is True
    assert kv.get("/kv/later/k").status_code == 404
    kv.ok("_config", "later", "set", {"crdt": "LWW"})
    assert kv.value("later", "k") == 1


BAD_POSTS: list[tuple[str, str | None, str]] = [
    ("/kv/test/a%20b", '{"op": "set", "change": 1}', "key name 'a b' is invalid"),
    ("/kv/te.st/k", '{"op": "set", "change": 1}', "table name 'te.st' is invalid"),
    ("/kv/test/" + "k" * 129, '{"op": "set", "change": 1}', "129 characters"),
    ("/kv/test/k", '{"op": "fly", "change": 1}', "op 'fly' does not apply to LWW tables"),
    ("/kv/test/k", '{"op": "add", "change": {"item": 1, "key": "x"}}', "does not apply to LWW tables"),
    ("/kv/test/k", '{"op": "set"}', "op 'set' needs a 'change'"),
    ("/kv/test/k", '{"change": 1}', "needs an 'op'"),
    ("/kv/test/k", '{"op": 3, "change": 1}', "op"),
    ("/kv/test/k", "not json", ""),
    ("/kv/test/k", None, "body"),
    ("/kv/_config/t2", '{"op": "set", "change": "LWW"}', 'must be an object like {"crdt": "LWW"}'),
    ("/kv/_config/t2", '{"op": "set", "change": {"crdt": "BTREE"}}', "unknown crdt type 'BTREE'"),
    ("/kv/_config/t2", '{"op": "set", "change": {"kind": "LWW"}}', "must be an object like"),
    ("/kv/_config/t2", '{"op": "add", "change": {"crdt": "LWW"}}', "takes only op 'set'"),
    ("/kv/_config/_config", '{"op": "set", "change": {"crdt": "LWW"}}', "built in"),
    ("/kv/new/k", '{"op": "jump", "change": 1}', "unknown op 'jump'"),
    ("/kv/new/k", '{"op": "increment", "change": "2"}', "must be a number"),
]


@pytest.mark.parametrize(("path", "body", "message"), BAD_POSTS)
def test_bad_writes_are_400_and_append_nothing(kv: Kv, path: str, body: str | None, message: str) -> None:
    kv.ok("_config", "test", "set", {"crdt": "LWW"})
    before = kv.entry_count()
    response = kv.http.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert message in error_message(response)
    assert kv.entry_count() == before


@pytest.mark.parametrize("path", ["/kv/a%20b", "/kv/a%20b/k", "/kv/t/k%2Fx", "/kv/" + "t" * 129])
def test_bad_names_in_reads_are_400(kv: Kv, path: str) -> None:
    response = kv.get(path)
    assert response.status_code in (400, 404), response.text
    if response.status_code == 400:
        assert "invalid" in error_message(response)


def test_writes_behind_an_entry_waiting_for_a_dependency_are_503_and_append_nothing(kv: Kv) -> None:
    """One client append depending on an id that is not here holds up this node's later entries: a KV
    write would never be seen, so it is refused (after waiting a moment for the dependency), saying
    why, and `/status` names the blocking entry."""
    kv.ok("_config", "t", "set", {"crdt": "LWW"})
    missing = "00000000-0000-4000-8000-000000000001"
    appended = kv.core.post("/log", params={"dependency": missing}, json="orphan")
    assert appended.status_code == 201, appended.text
    blocked = kv.core.get("/status").json()["blocked"]
    assert blocked["id"] == appended.json()["id"] and blocked["waits_for"] == [missing]
    before = kv.entry_count()
    response = kv.post("t", "k", "set", 1)
    assert response.status_code == 503, response.text
    assert f"depends on {missing}, not delivered here yet" in error_message(response)
    assert kv.entry_count() == before
    assert kv.get("/kv/t/k").status_code == 404


def test_every_table_type(kv: Kv) -> None:
    for name, crdt in [("s", "ORSET"), ("g", "GSET"), ("n", "PNCOUNTER"), ("m", "MVREGISTER")]:
        kv.ok("_config", name, "set", {"crdt": crdt})
    kv.ok("s", "k", "create", {})
    assert kv.value("s", "k") == []
    kv.ok("s", "gone", "remove", {"item": "x", "key": "a"})  # takes nothing away: makes no key
    missing = kv.get("/kv/s/gone")
    assert missing.status_code == 404 and error_message(missing) == "No such key 'gone'"
    assert kv.get("/kv/s").json() == ["k"]
    kv.ok("s", "k", "add", {"item": "x", "key": "a", "metadata": {"by": "me"}})
    kv.ok("s", "k", "add", {"item": {"y": 1}, "key": "b"})
    assert kv.value("s", "k") == [
        {"item": "x", "key": "a", "metadata": {"by": "me"}},
        {"item": {"y": 1}, "key": "b", "metadata": None},
    ]
    kv.ok("s", "k", "remove", {"item": "x", "key": "a"})
    kv.ok("s", "k", "add", {"item": {"y": 1}, "key": "b", "metadata": 2})
    assert kv.value("s", "k") == [{"item": {"y": 1}, "key": "b", "metadata": 2}]
    kv.ok("s", "k", "add", {"item": "x", "key": "a"})  # added again after its removal
    assert len(kv.value("s", "k")) == 2

    kv.ok("g", "k", "add", {"item": 1, "key": "a", "metadata": "m"})
    assert kv.value("g", "k") == [{"item": 1, "key": "a", "metadata": "m"}]
    assert kv.post("g", "k", "remove", {"item": 1, "key": "a"}).status_code == 400

    kv.ok("n", "k", "increment", 10)
    kv.ok("n", "k", "decrement", 2.5)
    kv.ok("n", "k", "increment", 0)
    assert kv.value("n", "k") == 7.5
    kv.ok("n", "k", "decrement", -1)  # a negative amount counts the other way
    assert kv.value("n", "k") == 8.5
    assert kv.post("n", "k", "decrement", "1").status_code == 400
    kv.ok("s", "k", "add", {"item": 2.0, "key": "f"})  # numbers travel as doubles: 2.0 is 2
    kv.ok("s", "k", "remove", {"item": 2.0, "key": "f"})
    assert len(kv.value("s", "k")) == 2

    kv.ok("m", "k", "set", "one")
    kv.ok("m", "k", "set", {"two": 2})
    assert kv.value("m", "k") == [{"two": 2}]
    assert kv.tables() == ["g", "m", "n", "s"]


# -- three nodes -------------------------------------------------------------------------------------


def in_parallel(*calls: Callable[[], None]) -> None:
    """Run the calls at the same time (one thread each); re-raise the first failure."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(calls))

    def run(call: Callable[[], None]) -> None:
        try:
            start.wait()
            call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def everywhere(nodes: list[Kv], table: str, key: str, expected: JSON) -> None:
    wait_for_sync(
        lambda: all(n.value_or_none(table, key) == expected for n in nodes),
        message=lambda: (
            f"{table}/{key} = {expected!r} everywhere: {[n.value_or_none(table, key) for n in nodes]}"
        ),
    )


def logged(node: Kv, urls: list[str]) -> bool:
    return all(node.core.get(u).status_code == 200 for u in urls)


def table_everywhere(nodes: list[Kv], table: str) -> None:
    wait_for_sync(lambda: all(table in n.tables() for n in nodes), message=f"table {table} everywhere")


def test_concurrent_lww_sets_converge_on_the_highest_stamp(three: list[Kv]) -> None:
    three[0].ok("_config", "reg", "set", {"crdt": "LWW"})
    table_everywhere(three, "reg")
    for round_ in range(3):
        ids: dict[str, JSON] = {}

        def setter(node: Kv, value: JSON, written: dict[str, JSON] = ids) -> Callable[[], None]:
            def call() -> None:
                written[node.ok("reg", "k", "set", value)["id"]] = value

            return call

        in_parallel(*(setter(node, {"node": i, "round": round_}) for i, node in enumerate(three)))
        urls = [f"/log/{entry_id}" for entry_id in ids]
        wait_for_sync(functools.partial(logged, three[0], urls), message="the three entries")
        entries = [three[0].core.get(u).json() for u in urls]
        winner = max(entries, key=lambda e: (e["when"]["wall_ms"], e["when"]["logical"], e["owner"], e["id"]))
        everywhere(three, "reg", "k", ids[winner["id"]])


def test_concurrent_add_and_remove_of_an_or_set_element_keep_the_add(three: list[Kv]) -> None:
    a, b, c = three
    a.ok("_config", "set", "set", {"crdt": "ORSET"})
    a.ok("set", "k", "add", {"item": "x", "key": "e", "metadata": 1})
    everywhere(three, "set", "k", [{"item": "x", "key": "e", "metadata": 1}])
    # Cut b off from both others (removal is mutual), so b's remove and a's add are concurrent.
    for other in (a, c):
        assert b.core.request("DELETE", "/nodes", json={"url": other.node.url}).status_code == 204
    wait_for_sync(lambda: b.core.get("/nodes").json() == [], message="b isolated")
    removed = b.ok("set", "k", "remove", {"item": "x", "key": "e"})
    assert b.value("set", "k") == []
    added = a.ok("set", "k", "add", {"item": "x", "key": "e", "metadata": 2})
    for other in (a, c):
        assert b.core.post("/nodes", json={"url": other.node.url}).status_code == 204
    everywhere(three, "set", "k", [{"item": "x", "key": "e", "metadata": 2}])
    remove_entry = a.core.get(f"/log/{removed['id']}").json()
    add_entry = a.core.get(f"/log/{added['id']}").json()
    assert added["id"] not in remove_entry["dependencies"]  # the remove had not seen the new add
    assert removed["id"] not in add_entry["dependencies"]


def test_counters_sum_exactly_across_nodes(three: list[Kv]) -> None:
    three[1].ok("_config", "count", "set", {"crdt": "PNCOUNTER"})
    table_everywhere(three, "count")

    def worker(node: Kv, i: int) -> Callable[[], None]:
        def call() -> None:
            for j in range(30):
                node.ok("count", "k", "increment", i + j)
                if j % 3 == 0:
                    node.ok("count", "k", "decrement", 1)

        return call

    in_parallel(*(worker(node, i) for i, node in enumerate(three)))
    expected = sum(i + j for i in range(3) for j in range(30)) - 3 * 10
    everywhere(three, "count", "k", expected)


def test_a_table_made_on_one_node_takes_writes_on_another(three: list[Kv]) -> None:
    a, b, c = three
    # Written before any node knows the table: accepted, and kept until the table exists.
    assert b.ok("made", "early", "add", {"item": 1, "key": "e"})["pending"] is True
    a.ok("_config", "made", "set", {"crdt": "GSET"})
    table_everywhere(three, "made")
    written = c.ok("made", "k", "add", {"item": "y", "key": "e", "metadata": "from c"})
    assert written["pending"] is False
    entry = c.core.get(f"/log/{written['id']}").json()
    [config_id] = entry["dependencies"]  # the table's config entry
    config = c.core.get(f"/log/{config_id}").json()["data"]
    assert (config["table"], config["key"], config["change"]["value"]) == (
        "_config",
        "made",
        {"crdt": "GSET"},
    )
    everywhere(three, "made", "k", [{"item": "y", "key": "e", "metadata": "from c"}])
    everywhere(three, "made", "early", [{"item": 1, "key": "e", "metadata": None}])


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_restart_neither_loses_nor_double_applies(
    three: list[Kv], node_process: NodeProcesses, how: str
) -> None:
    a, b, _ = three
    a.ok("_config", "cnt", "set", {"crdt": "PNCOUNTER"})
    table_everywhere(three, "cnt")
    for node in three:
        for _ in range(10):
            node.ok("cnt", "k", "increment", 1)
    everywhere(three, "cnt", "k", 30)
    b.ok("cnt", "k", "increment", 5)
    if how == "stop":
        b.node.stop()
    else:
        b.node.kill()
    a.ok("cnt", "k", "increment", 100)  # while b is down
    node_process.start(b.node)
    assert b.value("cnt", "k") in (35, 135)  # its own writes are there at once
    everywhere(three, "cnt", "k", 135)
    b.ok("cnt", "k", "decrement", 35)
    everywhere(three, "cnt", "k", 100)
