"""The KV browser's HTML rendering (potboiler.kv.browser): escaping, links, values per table type."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from typing import ClassVar

from potboiler.kv import browser
from potboiler.kv.crdts import JSON, CrdtType

EVIL = '<script>alert("x")</script>&'


class Collector(HTMLParser):
    """Collects tags, attributes and text, and checks that the document parses as balanced HTML."""

    VOID: ClassVar[set[str]] = {"meta", "br", "img", "input", "link", "hr"}

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, (tag, self.stack)
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: bytes) -> Collector:
    collector = Collector()
    collector.feed(page.decode())
    collector.close()
    assert collector.stack == []
    return collector


def test_index_lists_tables_with_types_and_links() -> None:
    page = browser.index_page([("alpha", CrdtType.LWW), ("beta-2", CrdtType.ORSET)], "node-1")
    doc = parse(page)
    links = [attrs["href"] for tag, attrs in doc.tags if tag == "a"]
    assert "/tables/alpha" in links and "/tables/beta-2" in links
    text = " ".join(doc.text)
    assert "LWW" in text and "ORSET" in text and "node-1" in text
    assert b"<script" not in page and b"http" not in page  # no scripts, no external assets
    assert page.startswith(b"<!DOCTYPE html>")


def test_index_without_tables_says_how_to_make_one() -> None:
    doc = parse(browser.index_page([], "n"))
    assert "No tables yet" in " ".join(doc.text)


def test_everything_is_escaped() -> None:
    rows: list[tuple[str, JSON]] = [
        ("k", [{"item": EVIL, "key": EVIL, "metadata": {EVIL: EVIL}}]),
    ]
    page = browser.table_page("t", CrdtType.ORSET, rows, after="", next_after=None)
    assert b"<script" not in page
    doc = parse(page)
    assert json.dumps(EVIL) in "".join(doc.text)
    page = browser.index_page([(EVIL, CrdtType.LWW)], EVIL)
    assert b"<script" not in page
    parse(page)
    page = browser.error_page(404, f"No such table '{EVIL}'")
    assert b"<script" not in page
    assert f"No such table '{EVIL}'" in " ".join(parse(page).text)


def cells(page: bytes, css: str) -> list[JSON]:
    """The JSON of every element of class `css` (from its data-json attribute)."""
    doc = parse(page)
    return [
        json.loads(attrs["data-json"] or "")
        for _, attrs in doc.tags
        if attrs.get("class") == css and "data-json" in attrs
    ]


def test_values_of_each_type_are_shown_as_the_rest_api_answers_them() -> None:
    lww: list[tuple[str, JSON]] = [("a", {"x": [1, 2.5, None]}), ("b", "text")]
    page = browser.table_page("t", CrdtType.LWW, lww, after="", next_after=None)
    assert cells(page, "value") == [{"x": [1, 2.5, None]}, "text"]
    assert '{"x":[1,2.5,null]}' in " ".join(parse(page).text)
    written_as: JSON = {"name": "Alice", "age": 30}  # keys in the order a client may have sent them
    page = browser.table_page("users", CrdtType.LWW, [("alice", written_as)], after="", next_after=None)
    assert '{"age":30,"name":"Alice"}' in " ".join(parse(page).text)  # sorted, as REST answers

    elements: JSON = [
        {"item": 1, "key": "e", "metadata": {"m": True}},
        {"item": "y", "key": "f", "metadata": None},
    ]
    page = browser.table_page("s", CrdtType.ORSET, [("k", elements)], after="", next_after=None)
    assert cells(page, "value") == [elements]
    assert cells(page, "item") == [1, "y"]
    assert cells(page, "element-key") == ["e", "f"]
    assert cells(page, "metadata") == [{"m": True}, None]

    page = browser.table_page("c", CrdtType.PNCOUNTER, [("n", 42)], after="", next_after=None)
    assert cells(page, "value") == [42]
    page = browser.table_page("m", CrdtType.MVREGISTER, [("r", ["v2", "v1"])], after="", next_after=None)
    assert cells(page, "value") == [["v2", "v1"]]
    text = " ".join(parse(page).text)
    assert '"v2"' in text and '"v1"' in text


def test_table_page_pages() -> None:
    page = browser.table_page("t", CrdtType.LWW, [("a", 1)], after="", next_after="a")
    links = [attrs["href"] for tag, attrs in parse(page).tags if tag == "a"]
    assert "/tables/t?after=a" in links and "/" in links
    empty = browser.table_page("t", CrdtType.LWW, [], after="z", next_after=None)
    assert re.search(r"No keys\s+after", " ".join(parse(empty).text))


def test_a_page_holds_as_many_keys_as_fit_its_byte_budget() -> None:
    lww = CrdtType.LWW
    rows: list[tuple[str, JSON]] = [(f"k{i}", "x" * 1000) for i in range(5)]
    # A row's bytes: what a second one adds to a page.
    row = len(browser.table_page("t", lww, rows[:2], after="", next_after=None)) - len(
        browser.table_page("t", lww, rows[:1], after="", next_after=None)
    )
    assert browser.page_of(lww, iter(rows), 500, 2 * row + row // 2) == (rows[:2], True)
    assert browser.page_of(lww, iter(rows), 3, 1 << 20) == (rows[:3], True)
    assert browser.page_of(lww, iter(rows), 5, 1 << 20) == (rows, False)
    huge: list[tuple[str, JSON]] = [("big", "x" * 5000), ("next", 1)]
    assert browser.page_of(lww, iter(huge), 500, 2500) == (huge[:1], True)  # at least one key a page
    assert browser.page_of(lww, iter([]), 500, 2500) == ([], False)


def test_a_value_too_large_to_show_is_named_not_shown() -> None:
    """A key's value is not bounded (an OR-Set of large items): one row must not make a page of many
    megabytes (a 4.5 MB set made a 13.5 MB page)."""
    items: JSON = [{"item": "x" * 1000, "key": f"e{i}", "metadata": None} for i in range(400)]
    small: JSON = [{"item": "y", "key": "e", "metadata": None}]
    page = browser.table_page(
        "s", CrdtType.ORSET, [("big", items), ("small", small)], after="", next_after=None
    )
    assert len(page) < 20_000
    assert b"too large to show here" in page and b"&quot;y&quot;" in page  # the small one is shown


def test_the_byte_budget_counts_what_the_page_sends() -> None:
    """Escaped characters and values shown more than once (an OR-Set's items and metadata) count as
    the HTML they become: the page of the rows taken stays within the budget."""
    items: JSON = [{"item": "'" * 1000, "key": "e", "metadata": "&" * 1000}]
    rows: list[tuple[str, JSON]] = [(f"k{i}", items) for i in range(50)]
    budget = 100_000
    taken, more = browser.page_of(CrdtType.ORSET, iter(rows), 500, budget)
    assert more and 1 <= len(taken) < 50
    page = browser.table_page("s", CrdtType.ORSET, taken, after="", next_after=taken[-1][0])
    assert len(page) < budget + 2000  # the rows, and the page around them
