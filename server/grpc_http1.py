"""gRPC over HTTP/1.1 as Envoy speaks it to the node's REST bridge (potboiler.server.rest_bridge).

Requests: `POST /package.Service/Method HTTP/1.1` with the gRPC-framed message in a body sized by
content-length or chunked, headers as metadata. Answers: a chunked body holding the framed answer,
then trailers with `grpc-status: 0` and the call's trailing metadata; or, for an error, a
trailers-only answer (`grpc-status`, `grpc-message`, metadata, no body). Envoy's HTTP/1.1 codec,
with trailers enabled, hands those to its filters as an HTTP/2 server's answer.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import NamedTuple

import grpc

from potboiler.server.auth import GATEWAY_HEADER

#: Metadata: (key, value) pairs, a value str, or bytes for a `-bin` key (as grpc.aio gives them).
Metadata = tuple[tuple[str, str | bytes], ...]
#: Longest request head (request line and headers) taken; Envoy's own limit is 60 KiB.
MAX_HEAD_BYTES = 256 * 1024
#: Headers that are HTTP/1.1's or gRPC's own, not metadata a servicer sees (as with grpc.aio).
_NOT_METADATA = frozenset(
    {
        "host",
        "content-type",
        "content-length",
        "transfer-encoding",
        "connection",
        "te",
        "keep-alive",
        "grpc-timeout",
        "grpc-encoding",
        "grpc-accept-encoding",
        "grpc-message-type",
    }
)
_ANSWER_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\n"


def grpc_message(details: str) -> bytes:
    """`details` as a grpc-message header value: UTF-8, percent-encoded outside printable ASCII
    (and `%` itself), as the gRPC HTTP/2 protocol spells it."""
    out = bytearray()
    for byte in details.encode("utf-8", "replace"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


#: What gRPC allows in metadata: keys of lower-case letters, digits and `-_.`; values of printable
#: ASCII (binary values, `-bin` keys, go base64-encoded).
_METADATA_KEY = re.compile(rb"[0-9a-z_.-]+")
_METADATA_VALUE = re.compile(rb"[\x20-\x7e]*")


def _metadata_lines(metadata: Sequence[tuple[str, str | bytes]]) -> bytes:
    """`metadata` as header lines; ValueError for metadata gRPC would refuse to send too (it could
    not pass as an HTTP header, or could add header lines of its own)."""
    out = bytearray()
    for key, value in metadata:
        raw_key = key.encode("utf-8")
        raw = base64.b64encode(value) if isinstance(value, bytes) else value.encode("utf-8")
        if not _METADATA_KEY.fullmatch(raw_key) or not _METADATA_VALUE.fullmatch(raw):
            raise ValueError(f"metadata {key!r}: {value!r} is not valid gRPC metadata")
        out += raw_key + b": " + raw + b"\r\n"
    return bytes(out)


def answer(payload: bytes, trailing: Sequence[tuple[str, str | bytes]]) -> bytes:
    """The HTTP/1.1 answer of a call that returned `payload` (the serialized message): one chunk
    with its gRPC frame, then the trailers."""
    frame_length = 5 + len(payload)
    return b"".join(
        (
            _ANSWER_HEAD,
            b"transfer-encoding: chunked\r\n\r\n",
            b"%x\r\n\x00" % frame_length,
            len(payload).to_bytes(4, "big"),
            payload,
            b"\r\n0\r\ngrpc-status: 0\r\n",
            _metadata_lines(trailing),
            b"\r\n",
        )
    )


def status_answer(code: grpc.StatusCode, details: str, trailing: Sequence[tuple[str, str | bytes]]) -> bytes:
    """The trailers-only HTTP/1.1 answer of a call that ended with `code` (not OK)."""
    return b"".join(
        (
            _ANSWER_HEAD,
            b"grpc-status: %d\r\n" % code.value[0],
            b"grpc-message: " + grpc_message(details) + b"\r\n" if details else b"",
            _metadata_lines(trailing),
            b"content-length: 0\r\n\r\n",
        )
    )


class BadRequest(Exception):
    """The bytes on a connection are not the HTTP/1.1 Envoy sends, or the request is too large:
    answered with `code` (INTERNAL, or RESOURCE_EXHAUSTED for sizes, as grpc does), then the
    connection is closed."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> None:
        super().__init__(message)
        self.code = code


class Request(NamedTuple):
    """One call as it arrived: its gRPC method path, metadata and body (the gRPC frames)."""

    method: str
    metadata: Metadata
    body: bytes


_TOO_LARGE = grpc.StatusCode.RESOURCE_EXHAUSTED


def _text(value: bytes) -> str:
    """A header's value as grpc.aio gives it: UTF-8, or Latin-1 where it is not UTF-8."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("latin-1")


class _Head(NamedTuple):
    """A request's head: its method, metadata and how its body is sized."""

    method: str
    metadata: Metadata
    #: The body's length (content-length); None for a chunked body.
    length: int | None


class RequestParser:
    """Reads HTTP/1.1 requests off a byte stream, one at a time (`feed`, then `next` until None).
    Bodies are sized by content-length or chunked; at most `max_body` bytes each. Each byte is
    looked at once: a body that arrives in many reads costs no more than one that arrives whole."""

    def __init__(self, max_body: int) -> None:
        self._buffer = bytearray()
        self._max_body = max_body
        #: The request whose body is arriving, and the chunks of it taken so far.
        self._head: _Head | None = None
        self._pieces: list[bytes] = []
        self._size = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet taken."""
        return len(self._buffer)

    def next(self) -> Request | None:
        """The next whole request, taken off the buffer; None while it has not all arrived.
        BadRequest if it is not a request we take."""
        if self._head is None:
            self._head = self._take_head()
            if self._head is None:
                return None
        head = self._head
        buffer = self._buffer
        if head.length is None:
            if not self._take_chunks():
                return None
            body = b"".join(self._pieces)
            self._pieces, self._size = [], 0
        else:
            if len(buffer) < head.length:
                return None
            body = bytes(buffer[: head.length])
            del buffer[: head.length]
        self._head = None
        return Request(head.method, head.metadata, body)

    def _take_head(self) -> _Head | None:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD_BYTES:
                raise BadRequest("the request head is too long", _TOO_LARGE)
            return None
        lines = bytes(buffer[:end]).split(b"\r\n")
        del buffer[: end + 4]
        parts = lines[0].split(b" ")
        if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
            raise BadRequest(f"not a gRPC request line: {lines[0][:200]!r}")
        metadata: list[tuple[str, str | bytes]] = []
        length: int | None = 0
        for line in lines[1:]:
            name, colon, raw = line.partition(b":")
            if not colon:
                raise BadRequest(f"not a header: {line[:200]!r}")
            key = name.strip().lower().decode("latin-1")
            value = raw.strip()
            if key == "content-length":
                if not value.isdigit():
                    raise BadRequest(f"content-length {value[:100]!r} is not a length")
                length = int(value)
                if length > self._max_body:
                    raise BadRequest(
                        f"the body of {length} bytes is larger than {self._max_body}", _TOO_LARGE
                    )
            elif key == "transfer-encoding":
                if value.lower() != b"chunked":
                    raise BadRequest(f"transfer-encoding {value[:100]!r} is not taken")
                length = None
            elif key.startswith(":") or key in _NOT_METADATA or key == GATEWAY_HEADER:
                continue
            elif key.endswith("-bin"):
                metadata.append((key, base64.b64decode(value + b"==")))
            else:
                metadata.append((key, _text(value)))
        metadata.append((GATEWAY_HEADER, "1"))
        return _Head(parts[1].decode("latin-1"), tuple(metadata), length)

    def _take_chunks(self) -> bool:
        """Take the chunks that have arrived off the buffer; True once the last one has."""
        buffer = self._buffer
        while True:
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise BadRequest("a chunk's size line is too long")
                return False
            try:
                size = int(bytes(buffer[:line_end]).split(b";", 1)[0], 16)
            except ValueError:
                raise BadRequest("a chunk's size is not hexadecimal") from None
            if size == 0:  # the last chunk, then trailers (none expected, any skipped) and a CRLF
                end = buffer.find(b"\r\n\r\n", line_end)
                if end < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise BadRequest("the trailers are too long")
                    return False
                del buffer[: end + 4]
                return True
            if size < 0 or self._size + size > self._max_body:
                raise BadRequest(f"the body is larger than {self._max_body} bytes", _TOO_LARGE)
            start = line_end + 2
            if len(buffer) < start + size + 2:
                return False
            if buffer[start + size : start + size + 2] != b"\r\n":
                raise BadRequest("a chunk does not end where its size says")
            self._pieces.append(bytes(buffer[start : start + size]))
            self._size += size
            del buffer[: start + size + 2]


def unframe(body: bytes) -> bytes:
    """The one message of a unary call's body (gRPC's length-prefixed framing)."""
    if len(body) < 5:
        raise ValueError("the request holds no gRPC message")
    if body[0] != 0:
        raise ValueError("compressed messages are not taken")
    size = int.from_bytes(body[1:5], "big")
    if len(body) != 5 + size:
        raise ValueError("the request is not one gRPC message")
    return body[5:]
