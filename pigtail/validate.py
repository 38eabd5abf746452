"""Checks of what clients send Pigtail; each failure is an InvalidArgument saying what is wrong.

Nothing is appended to the log unless the whole request passes. The limits (also in pigtail.proto):

- queue names: 1 to 128 letters, digits, ``_`` or ``-`` (:mod:`potboiler.server.names`, as KV's);
- ``timeout_ms``: 1 to 86,400,000 (a day); ``max_attempts``: 1 to 1,000 or absent (no limit);
- ``task_name``, ``worker_id``, ``idempotency_key``: 1 to 256 characters, no control characters
  (``worker_id`` may be empty on a done);
- ``info``: any JSON of at most 512 KiB (as compact JSON text), nesting arrays and objects at most
  28 levels deep (the event that carries it nests it two levels deeper, within the log's 30);
- ``not_before_ms``: 0 to a year from now; ``delay_ms``: 0 to a year; never both;
- ``priority``: -1,000,000 to 1,000,000;
- ``wait_ms`` (claim next): 0 to 60,000; ``max_in_flight`` (lease stream): 1 to 1,000 (0 means 1).
"""

from __future__ import annotations

import math
import re

import orjson

from potboiler.pigtail.events import MAX_ATTEMPTS, MAX_PRIORITY, MAX_TIMEOUT_MS, JSONValue
from potboiler.server.entries import MAX_DEPTH
from potboiler.server.errors import InvalidArgument, TooLarge
from potboiler.server.jsonvalue import nesting, scalars
from potboiler.server.names import check_name
from potboiler.server.names import is_name as is_name  # queue names (pigtail.codec checks events' with it)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

MAX_TEXT = 256
MAX_INFO_BYTES = 512 * 1024
#: The event that carries a task's info is an object in an object: two levels of the log's MAX_DEPTH.
MAX_INFO_DEPTH = MAX_DEPTH - 2
MAX_DELAY_MS = 365 * 86_400_000
MAX_WAIT_MS = 60_000
MAX_IN_FLIGHT = 1_000


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def is_task_id(task_id: str) -> bool:
    """Whether `task_id` can be a task id (the service makes UUIDs; events may carry any such name)."""
    return is_name(task_id)


def queue_name(name: str) -> str:
    """A valid queue name, else InvalidArgument."""
    return check_name(name, "queue")


def timeout_ms(value: int) -> int:
    """A valid claim timeout, else InvalidArgument."""
    if not 1 <= value <= MAX_TIMEOUT_MS:
        if value == 0:
            # Absent and 0 are one value in protobuf: the message fits both.
            raise InvalidArgument(
                f"timeout_ms is required and must be 1 to {MAX_TIMEOUT_MS} milliseconds, not 0"
            )
        raise InvalidArgument(f"timeout_ms must be 1 to {MAX_TIMEOUT_MS} milliseconds, not {value}")
    return value


def max_attempts(value: int | None) -> int | None:
    """A valid max_attempts (None: no limit), else InvalidArgument."""
    if value is not None and not 1 <= value <= MAX_ATTEMPTS:
        raise InvalidArgument(
            f"max_attempts must be 1 to {MAX_ATTEMPTS}, or absent for no limit, not {value}"
        )
    return value


def text(value: str, field: str, *, required: bool = True) -> str:
    """A valid short text field (task_name, worker_id, idempotency_key), else InvalidArgument."""
    if not value:
        if required:
            raise InvalidArgument(f"{field} is required (1 to {MAX_TEXT} characters)")
        return value
    if len(value) > MAX_TEXT:
        raise InvalidArgument(f"{field} is {len(value)} characters long; at most {MAX_TEXT} are allowed")
    if _CONTROL.search(value):
        raise InvalidArgument(f"{field} {_shown(value)} contains control characters")
    return value


def info(value: JSONValue) -> JSONValue:
    """A task's info within the size limit (as compact JSON), else TooLarge, and the depth limit, else
    InvalidArgument."""
    dumped = orjson.dumps(value)
    if len(dumped) > MAX_INFO_BYTES:
        raise TooLarge(f"info is {len(dumped)} bytes of JSON; at most {MAX_INFO_BYTES} are allowed")
    if nesting(value, MAX_INFO_DEPTH) > MAX_INFO_DEPTH:
        raise InvalidArgument(f"info nests arrays and objects deeper than {MAX_INFO_DEPTH} levels")
    # orjson writes NaN and infinities as null: only then is there one to look for.
    if b"null" in dumped and any(isinstance(x, float) and not math.isfinite(x) for x in scalars(value)):
        raise InvalidArgument("info must be JSON, which has no NaN or infinite numbers")
    return value


def not_before(not_before_ms: int | None, delay_ms: int | None, now_ms: int) -> int | None:
    """The absolute time a new task becomes claimable (None: at once), from either field."""
    if not_before_ms is not None and delay_ms is not None:
        raise InvalidArgument("give not_before_ms or delay_ms, not both")
    if delay_ms is not None:
        if not 0 <= delay_ms <= MAX_DELAY_MS:
            raise InvalidArgument(f"delay_ms must be 0 to {MAX_DELAY_MS} (a year), not {delay_ms}")
        return now_ms + delay_ms if delay_ms else None
    if not_before_ms is not None:
        if not 0 <= not_before_ms <= now_ms + MAX_DELAY_MS:
            raise InvalidArgument(
                f"not_before_ms must be a time in ms since the Unix epoch, at most a year ahead, "
                f"not {not_before_ms}"
            )
        return not_before_ms
    return None


def priority(value: int) -> int:
    """A valid priority, else InvalidArgument."""
    if not -MAX_PRIORITY <= value <= MAX_PRIORITY:
        raise InvalidArgument(f"priority must be {-MAX_PRIORITY} to {MAX_PRIORITY}, not {value}")
    return value


def wait_ms(value: int) -> int:
    """A valid long-poll wait, else InvalidArgument."""
    if not 0 <= value <= MAX_WAIT_MS:
        raise InvalidArgument(f"wait_ms must be 0 to {MAX_WAIT_MS}, not {value}")
    return value


def in_flight(value: int) -> int:
    """A valid max_in_flight (0 means 1), else InvalidArgument."""
    if value == 0:
        return 1
    if not 1 <= value <= MAX_IN_FLIGHT:
        raise InvalidArgument(f"max_in_flight must be 1 to {MAX_IN_FLIGHT}, not {value}")
    return value
