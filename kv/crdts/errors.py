"""The one error of the CRDT package: what a client's op, an event's payload or a stored state did wrong."""


class InvalidOperation(ValueError):
    """An op, change, payload or state that does not fit a CRDT; the message says exactly what is wrong."""
