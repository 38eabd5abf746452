"""The KV browser's HTML pages (pure rendering: no I/O).

Plain HTML5 with inline CSS, no scripts and no external assets, so it works without internet. Every
piece of data is HTML-escaped. Values are shown as JSON, exactly as the REST API answers them; each
value cell also carries its JSON in a `data-json` attribute for tools.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape
from urllib.parse import quote

from potboiler.kv.crdts import JSON, CrdtType
from potboiler.server.jsonvalue import json_text

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; padding: 0 1em;
       color: #1d1d1f; background: #fff; }
h1 { font-size: 1.5em; } h1 a { color: inherit; text-decoration: none; }
table { border-collapse: collapse; width: 100%; margin: 1em 0; }
th, td { border: 1px solid #ccd; padding: .35em .6em; text-align: left; vertical-align: top; }
th { background: #eef; }
table.items { margin: 0; } table.items th { background: #f4f4fa; }
code, pre { font-family: ui-monospace, monospace; white-space: pre-wrap; word-break: break-all; margin: 0; }
.type { font-family: ui-monospace, monospace; }
.muted { color: #667; }
nav { margin: 1em 0; }
"""

_TYPE_HELP = {
    CrdtType.LWW: "last-writer-wins register",
    CrdtType.ORSET: "observed-remove set (add wins)",
    CrdtType.GSET: "grow-only set",
    CrdtType.PNCOUNTER: "counter",
    CrdtType.MVREGISTER: "multi-value register",
}


def show_json(value: JSON) -> str:
    """A value as the JSON text shown on the pages: as REST answers it."""
    return json_text(value).decode()


def _json_cell(value: JSON, css: str = "value") -> str:
    text = show_json(value)
    return f'<td class="{css}" data-json="{escape(text)}"><code>{escape(text)}</code></td>'


def _page(title: str, body: str) -> bytes:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n"
        f"<body>\n{body}\n</body></html>\n"
    ).encode()


def table_url(table: str) -> str:
    """The path of a table's page."""
    return f"/tables/{quote(table, safe='')}"


def index_page(tables: Iterable[tuple[str, CrdtType]], node: str) -> bytes:
    """The list of tables with their types, each linking to its page."""
    rows = [
        f'<tr data-table="{escape(name)}"><td><a href="{escape(table_url(name))}">{escape(name)}</a></td>'
        f'<td class="type">{escape(crdt.value)}</td><td class="muted">{escape(_TYPE_HELP[crdt])}</td></tr>'
        for name, crdt in tables
    ]
    if rows:
        listing = (
            '<table id="tables"><thead><tr><th>Table</th><th>Type</th><th>Kind</th></tr></thead>'
            f"<tbody>\n{''.join(rows)}\n</tbody></table>"
        )
    else:
        listing = (
            '<p id="no-tables">No tables yet. Create one with '
            "<code>POST /kv/_config/{name}</code> and the body "
            '<code>{"op": "set", "change": {"crdt": "LWW"}}</code> on the KV port.</p>'
        )
    body = (
        '<h1><a href="/">Potboiler KV</a></h1>'
        f'<p class="muted">Node <code>{escape(node)}</code> &middot; {len(rows)} table(s)</p>\n{listing}'
    )
    return _page("Potboiler KV: tables", body)


def _items_table(elements: JSON) -> str:
    """An OR-Set / G-Set value: one row per element with its key and metadata."""
    if not isinstance(elements, list) or not elements:
        return '<span class="muted">(empty)</span>'
    rows = []
    for element in elements:
        if not isinstance(element, dict):
            continue
        rows.append(
            "<tr>"
            + _json_cell(element.get("item"), "item")
            + _json_cell(element.get("key"), "element-key")
            + _json_cell(element.get("metadata"), "metadata")
            + "</tr>"
        )
    return (
        '<table class="items"><thead><tr><th>Item</th><th>Key</th><th>Metadata</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _value_cell(crdt: CrdtType, value: JSON) -> str:
    if crdt in (CrdtType.ORSET, CrdtType.GSET):
        text = show_json(value)
        return f'<td class="value" data-json="{escape(text)}">{_items_table(value)}</td>'
    if crdt is CrdtType.MVREGISTER and isinstance(value, list) and len(value) > 1:
        text = show_json(value)
        parts = "".join(f"<li><code>{escape(show_json(v))}</code></li>" for v in value)
        return f'<td class="value" data-json="{escape(text)}"><ul>{parts}</ul></td>'
    return _json_cell(value)


def page_of(
    crdt: CrdtType, items: Iterable[tuple[str, JSON]], max_keys: int, max_bytes: int
) -> tuple[list[tuple[str, JSON]], bool]:
    """The first rows of `items` for one page of a table of type `crdt`: at most `max_keys`, and only
    as many as keep the page's rows within `max_bytes` of HTML (but at least one); and whether more
    are left."""
    rows: list[tuple[str, JSON]] = []
    size = 0
    for key, value in items:
        size += len(_row(crdt, key, value).encode())
        if len(rows) == max_keys or (rows and size > max_bytes):
            return rows, True
        rows.append((key, value))
    return rows, False


#: Largest value (as JSON) a table page shows; a key's value is not bounded (an OR-Set can grow and
#: grow), and a page stays within its byte budget only if each row does.
MAX_SHOWN_BYTES = 256 << 10


def _row(crdt: CrdtType, key: str, value: JSON) -> str:
    size = len(show_json(value).encode())
    cell = (
        _value_cell(crdt, value)
        if size <= MAX_SHOWN_BYTES
        else f'<td class="value too-large">{size:,} bytes of JSON: too large to show here '
        "(the KV REST port answers it whole)</td>"
    )
    return f'<tr data-key="{escape(key)}"><td class="key"><code>{escape(key)}</code></td>{cell}</tr>\n'


def table_page(
    table: str, crdt: CrdtType, rows: Sequence[tuple[str, JSON]], *, after: str, next_after: str | None
) -> bytes:
    """One page of a table's keys and values; `next_after` is the key to continue after, if any."""
    header = (
        '<h1><a href="/">Potboiler KV</a> / <span id="table-name">'
        f"{escape(table)}</span></h1>"
        f'<p>Type <span class="type" id="table-type">{escape(crdt.value)}</span> '
        f'<span class="muted">({escape(_TYPE_HELP[crdt])})</span></p>'
        '<nav><a href="/">&larr; all tables</a></nav>'
    )
    if rows:
        body_rows = "".join(_row(crdt, key, value) for key, value in rows)
        listing = (
            '<table id="keys"><thead><tr><th>Key</th><th>Value</th></tr></thead>'
            f"<tbody>\n{body_rows}</tbody></table>"
        )
    else:
        listing = '<p id="no-keys">No keys' + (" after this point." if after else " yet.") + "</p>"
    more = ""
    if next_after is not None:
        href = f"{table_url(table)}?after={quote(next_after, safe='')}"
        more = f'<nav><a id="next-page" href="{escape(href)}">next page &rarr;</a></nav>'
    return _page(f"Potboiler KV: {table}", header + "\n" + listing + more)


def error_page(status: int, message: str) -> bytes:
    """A page saying why there is no page: no such table (404), a bad name (400), not ready (503)."""
    body = (
        '<h1><a href="/">Potboiler KV</a></h1>'
        f'<p id="error">{status}: {escape(message)}</p><nav><a href="/">&larr; all tables</a></nav>'
    )
    return _page(f"Potboiler KV: {status}", body)
