"""The KV browser (port B+2) in a real headless Chromium driven by Playwright: the table list shows every
table with its type, following a link opens the table's page, and every page shows what the REST API
(port B+1) answers. Needs Debian's `chromium` at /usr/bin/chromium (buildscripts/apt-packages.txt)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from potboiler.server.processes import NodeProcess
from tests.node_processes import NodeProcesses

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="the browser test needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium)",
    ),
]

JSON = Any


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def filled_node(node_process: NodeProcesses) -> Iterator[tuple[NodeProcess, httpx.Client]]:
    """A node with a table of every type, holding values that need escaping."""
    node = node_process("browsed")
    with httpx.Client(base_url=node.port_url(node.ports.kv), timeout=30.0) as kv:

        def write(table: str, key: str, op: str, change: JSON) -> None:
            response = kv.post(f"/kv/{table}/{key}", json={"op": op, "change": change})
            assert response.status_code == 200, response.text

        for table, crdt in [
            ("people", "LWW"),
            ("tags", "ORSET"),
            ("seen", "GSET"),
            ("hits", "PNCOUNTER"),
            ("drafts", "MVREGISTER"),
        ]:
            write("_config", table, "set", {"crdt": crdt})
        write("people", "alice", "set", {"name": "Alice <b>bold</b>", "age": 30, "tags": ["a", "b"]})
        write("people", "bob", "set", "plain & simple")
        write("tags", "post-1", "add", {"item": "<i>python</i>", "key": "t1", "metadata": {"by": "alice"}})
        write("tags", "post-1", "add", {"item": 42, "key": "t2", "metadata": None})
        write("tags", "post-2", "create", {})
        write("seen", "ips", "add", {"item": "10.0.0.1", "key": "a", "metadata": {"at": 1}})
        write("hits", "home", "increment", 41)
        write("hits", "home", "increment", 1.5)
        write("hits", "away", "decrement", 2)
        write("drafts", "doc", "set", {"text": "v1"})
        yield node, kv


def data_json(page: Page, selector: str) -> list[JSON]:
    return [
        json.loads(text or "null")
        for text in page.locator(selector).evaluate_all("es => es.map(e => e.dataset.json)")
    ]


def check_table_page(page: Page, kv: httpx.Client, table: str) -> None:
    """The table page shows the table's keys, each with the value REST answers."""
    assert page.locator("#table-name").inner_text() == table
    crdt = kv.get(f"/kv/_config/{table}").json()["crdt"]
    assert page.locator("#table-type").inner_text() == crdt
    keys = kv.get(f"/kv/{table}").json()
    assert page.locator("#keys > tbody > tr").evaluate_all("rows => rows.map(r => r.dataset.key)") == keys
    for key in keys:
        expected = kv.get(f"/kv/{table}/{key}").json()
        row = page.locator(f'#keys > tbody > tr[data-key="{key}"]')
        cell = row.locator("td.value")
        assert json.loads(cell.get_attribute("data-json") or "") == expected
        if crdt in ("ORSET", "GSET"):
            # One visible row per element: item, key and metadata as JSON text.
            shown = [
                [json.loads(t) for t in r.locator("td").all_inner_texts()]
                for r in cell.locator("table.items tbody tr").all()
            ]
            assert shown == [[e["item"], e["key"], e["metadata"]] for e in expected]
        elif crdt == "MVREGISTER" and len(expected) > 1:
            assert [json.loads(t) for t in cell.locator("li").all_inner_texts()] == expected
        else:
            assert json.loads(cell.inner_text()) == expected


def test_browse_tables_and_follow_links(
    browser: Browser, filled_node: tuple[NodeProcess, httpx.Client]
) -> None:
    node, kv = filled_node
    base = node.port_url(node.ports.browser)
    page = browser.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    response = page.goto(base + "/")
    assert response is not None and response.status == 200
    assert page.title() == "Potboiler KV: tables"

    tables = kv.get("/kv").json()
    rows = page.locator("#tables > tbody > tr")
    assert rows.evaluate_all("rows => rows.map(r => r.dataset.table)") == tables
    for table in tables:
        row = page.locator(f'#tables > tbody > tr[data-table="{table}"]')
        assert row.locator("td.type").inner_text() == kv.get(f"/kv/_config/{table}").json()["crdt"]

    for table in tables:
        page.goto(base + "/")
        page.get_by_role("link", name=table, exact=True).click()
        page.wait_for_url(f"{base}/tables/{table}")
        check_table_page(page, kv, table)

    # The path names the table, whatever the query says; other query parameters (link decorations)
    # are ignored on these pages.
    page.goto(f"{base}/tables/people?table=tags&utm_source=mail")
    check_table_page(page, kv, "people")

    # Markup in values is shown as text, never interpreted.
    page.goto(f"{base}/tables/people")
    assert page.locator("#keys b").count() == 0
    assert "Alice <b>bold</b>" in page.locator('#keys tr[data-key="alice"] td.value').inner_text()

    # Back to the list through the page's own link; an unknown table is a 404 page.
    page.get_by_role("link", name="← all tables").click()
    page.wait_for_url(f"{base}/")
    missing = page.goto(f"{base}/tables/nope")
    assert missing is not None and missing.status == 404
    assert "No such table 'nope'" in page.locator("#error").inner_text()
    # So is a path with no page at all (Envoy's own 404, an HTML page too), with its way back.
    for path in ("/nope", "/tables/people/extra", "/%3Cb%3Ex"):
        lost = page.goto(base + path)
        assert lost is not None and lost.status == 404 and "text/html" in lost.headers["content-type"]
        assert page.locator("#error").inner_text() == "404: there is no such page here"
    page.get_by_role("link", name="← all tables").click()
    page.wait_for_url(f"{base}/")

    assert requested and all(url.startswith(base + "/") for url in requested)  # no external assets


def test_the_page_follows_new_writes(browser: Browser, filled_node: tuple[NodeProcess, httpx.Client]) -> None:
    node, kv = filled_node
    base = node.port_url(node.ports.browser)
    page = browser.new_page()
    page.goto(f"{base}/tables/hits")
    check_table_page(page, kv, "hits")
    assert kv.post("/kv/hits/home", json={"op": "decrement", "change": 0.5}).status_code == 200
    assert kv.post("/kv/drafts/doc", json={"op": "set", "change": "v2"}).status_code == 200
    page.reload()
    check_table_page(page, kv, "hits")
    assert json.loads(page.locator('#keys tr[data-key="home"] td.value').inner_text()) == 42
    page.goto(f"{base}/tables/drafts")
    check_table_page(page, kv, "drafts")
