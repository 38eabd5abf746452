"""Batches of entries as they travel between nodes and to consumers, read in bulk: parsed in one
go, their one owner, and the newest of each owner."""

from __future__ import annotations

from collections.abc import Sequence

from google.protobuf.message import DecodeError

from potboiler.v1.entry_pb2 import Entry
from potboiler.v1.replication_pb2 import EntryBatch, EntryBatchShape, ParsedEntryBatch


def parse_entry_batch(serialized: bytes) -> list[Entry]:
    """The entries of a serialized `EntryBatch` (entries serialized), parsed in one go as its twin
    `ParsedEntryBatch`: about 40% cheaper than parsing each entry on its own. DecodeError if one is
    not a serialized Entry."""
    return list(ParsedEntryBatch.FromString(serialized).entries)


def parse_entries(blobs: Sequence[bytes]) -> list[Entry]:
    """The serialized entries `blobs`, parsed in one go (see `parse_entry_batch`)."""
    return parse_entry_batch(EntryBatch(entries=blobs).SerializeToString())


def run_owner(blobs: Sequence[bytes]) -> str | None:
    """The owner of the serialized entries `blobs` if they all have that one owner and none of them
    names a next or dependencies (a plain stretch of one chain, as a peer sends it), else None.
    Read in one parse of the entries' shapes (the rest of each left unread), and checked with one
    comparison of bytes: the shapes, serialized, are one entry's owner over and over."""
    if not blobs:
        return None
    try:
        shape = EntryBatchShape.FromString(EntryBatch(entries=blobs).SerializeToString())
    except DecodeError:
        return None
    shape.DiscardUnknownFields()  # type: ignore[attr-defined]  # missing from types-protobuf's Message
    owner = shape.entries[0].owner
    one = EntryBatchShape(entries=[EntryBatchShape.EntryShape(owner=owner)]).SerializeToString()
    return owner if shape.SerializeToString() == one * len(blobs) else None


def parsed_run_owner(entries: Sequence[Entry]) -> str | None:
    """`run_owner` of entries parsed already, read from them: 0.4 µs per entry in a batch of 4,
    against 0.9 from the shapes of their bytes (a live replication message holds a few)."""
    if not entries:
        return None
    owners = [e.owner for e in entries]
    owner = owners[0]
    if owners.count(owner) != len(owners) or any(e.next or e.dependencies for e in entries):
        return None
    return owner


def newest_of_each_owner(entries: Sequence[Entry]) -> dict[str, Entry]:
    """The last entry of each owner in `entries`: its newest, as each owner's entries come in chain
    order. One owner's entries, as in a catch-up, are told by counting (in C) instead of by a dict
    insertion per entry."""
    owners = [e.owner for e in entries]
    if owners and owners.count(owners[0]) == len(owners):
        return {owners[0]: entries[-1]}
    return dict(zip(owners, entries, strict=True))
