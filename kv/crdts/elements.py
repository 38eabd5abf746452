"""Elements, as the OR-Set and the G-Set hold them: the identity of an element and the parsing of the
``{"item", "key", "metadata"}`` of the changes and payloads that add one (and of a ``create``).

Element identity in the OR-Set and the G-Set is ``(item, key)``, items compared by canonical JSON
(:func:`~potboiler.kv.crdts.checks.canonical_json`, so ``1``, ``1.0`` and ``true`` are different items).
When an element has several live (concurrent) adds, its metadata is the one of the add with the highest
``(stamp, tag)``."""

from __future__ import annotations

from potboiler.kv.crdts.checks import _check_json, _no_unknown_fields, _obj, _show, _str_field, canonical_json
from potboiler.kv.crdts.errors import InvalidOperation
from potboiler.kv.crdts.types import CrdtType
from potboiler.server.jsonvalue import JSON


def _element_id(item: JSON, key: str) -> str:
    return canonical_json([key, item])


def _element(body: JSON, what: str, allowed: tuple[str, ...]) -> tuple[JSON, str, JSON]:
    """Parse ``{"item": …, "key": "…", "metadata": …}`` (metadata optional, defaults to null)."""
    d = _obj(body, what)
    _no_unknown_fields(d, allowed, what)
    if "item" not in d:
        raise InvalidOperation(f"{what} needs an 'item'")
    item = _check_json(d["item"], f"{what} 'item'")
    key = _str_field(d, "key", what)
    metadata = _check_json(d.get("metadata"), f"{what} 'metadata'")
    return item, key, metadata


def _create_change(crdt: CrdtType, change: JSON) -> None:
    if change is not None and change != {}:
        raise InvalidOperation(f"{crdt.label} 'create' change must be {{}}, got {_show(change)}")
