"""How Pigtail events travel in the log.

A Pigtail event is appended as an entry whose data is the JSON object ``{"pigtail": <event>}``, the event
being ``to_json`` of one of the classes of :mod:`potboiler.pigtail.events` (``{"kind": "task_added",
...}``). Entries whose data is anything else are not Pigtail's (KV writes, the users' own entries) and
are ignored; an entry that looks like a Pigtail event but breaks its rules (e.g. one posted by hand to
``POST /log``) is ignored too, with a warning, so no entry can stop a node from applying the log.

An event's stamp, the order every node judges events in, is the entry's hybrid logical clock stamp and
its owner: ``(when.wall_ms, when.logical, owner)``, unique per entry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from google.protobuf.struct_pb2 import Value

from potboiler.pigtail.events import (
    Event,
    InvalidEvent,
    QueueCreated,
    QueueDeleted,
    event_from_json,
    event_queue,
)
from potboiler.pigtail.machine import Stamp
from potboiler.pigtail.validate import is_name, is_task_id
from potboiler.server.jsonvalue import from_value, to_value
from potboiler.v1.entry_pb2 import Entry

log = logging.getLogger(__name__)

#: The one key of a Pigtail entry's data.
TAG = "pigtail"
#: What every Pigtail entry serialized holds (see `potboiler.server.log_delivered.DeliveredBatch.marked`): the key TAG of its
#: data's Struct, as a map entry's key (field 1) is written.
EVENT_MARK = b"\n" + bytes([len(TAG)]) + TAG.encode()


def event_data(event: Event) -> Value:
    """The data of the log entry that carries `event`."""
    return to_value({TAG: event.to_json()})


@dataclass(frozen=True)
class Delivered:
    """A Pigtail event read from the log, with its stamp and its entry's id."""

    event: Event
    stamp: Stamp
    entry_id: str


def stamp_of(entry: Entry) -> Stamp:
    """The stamp events are judged by: the entry's HLC stamp, then its owner."""
    return Stamp(entry.when.wall_ms, entry.when.logical, entry.owner)


def decode(entry: Entry) -> Delivered | None:
    """The Pigtail event an entry carries, or None when it carries none (or a broken one)."""
    # Every entry comes through here, most of them not Pigtail's: as few protobuf accesses as possible
    # (data that is not an object reads as an empty struct).
    fields = entry.data.struct_value.fields
    if len(fields) != 1 or TAG not in fields:
        return None
    raw = from_value(fields[TAG])
    if not isinstance(raw, dict):
        log.warning("ignoring entry %s: its %r is not an object", entry.id, TAG)
        return None
    try:
        event = event_from_json(raw)
    except InvalidEvent as exc:
        log.warning("ignoring entry %s: not a valid Pigtail event: %s", entry.id, exc)
        return None
    if not is_name(event_queue(event)) or not (
        isinstance(event, QueueCreated | QueueDeleted) or is_task_id(event.task_id)
    ):
        log.warning("ignoring entry %s: bad queue name or task id in a Pigtail event", entry.id)
        return None
    return Delivered(event, stamp_of(entry), entry.id)
