"""Potboiler's domain errors, in one tree. Servicers map each class to one gRPC status code
(`potboiler.server.grpc_errors`); nothing recognises an error by its message."""

from __future__ import annotations

import copy
from typing import Self

#: Characters of a client's value an error message shows: gRPC clients refuse a status message of
#: 16 KiB or more (they would see a metadata error instead of the cause), and a long value says
#: nothing more.
SHOWN_CHARACTERS = 60
#: The most UTF-8 bytes of an error message sent, whatever it holds (see `grpc_errors.abort`): gRPC
#: percent-encodes every byte outside printable ASCII, so it is at most three times as long on the
#: wire, under the 8 KiB past which clients start to refuse metadata.
MAX_MESSAGE_BYTES = 2000


def quoted(value: str) -> str:
    """A client's value for an error message: its repr, cut short (saying how long it is) past
    SHOWN_CHARACTERS."""
    if len(value) <= SHOWN_CHARACTERS:
        return repr(value)
    return f"{value[: SHOWN_CHARACTERS - 3] + '...'!r} ({len(value)} characters)"


class PotboilerError(Exception):
    """Base of every error a client can cause; the message says what was wrong."""

    def prefixed(self, prefix: str) -> Self:
        """The same error (class and attributes) with `prefix` before its message."""
        error = copy.copy(self)
        error.args = (f"{prefix}{self}",)
        return error


class InvalidArgument(PotboilerError):
    """The request is malformed: a bad UUID, URL, name, op or JSON body."""


class TooDeep(InvalidArgument):
    """JSON data nests arrays and objects deeper than the log takes (services that wrap a client's
    value in an event say so in their own words)."""


class NotFound(PotboilerError):
    """The thing named does not exist."""


class AlreadyExists(PotboilerError):
    """The thing to create exists already."""


class Conflict(PotboilerError):
    """The request does not fit the current state: a resume from a position whose entry is another
    (`after_id`), a second node with one id, a webhook into its own cluster (REST 400)."""


class Contended(Conflict):
    """The request collides with another client's hold on the same thing, or with work already
    finished (a task claimed by another worker, dead-lettered, or done): REST 409."""


class Removed(PotboilerError):
    """A peer removed by this node's operator tried to replicate."""


class OutOfRange(PotboilerError):
    """A position beyond what there is (a subscription from a position the node has not reached)."""


class TooLarge(PotboilerError):
    """The request exceeds a documented size or count limit."""


class Unavailable(PotboilerError):
    """The node cannot take the request now, but will (retry): REST 503."""
