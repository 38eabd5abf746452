"""gRPC over HTTP/1.1 (the REST bridge's wire format): requests as Envoy sends them, answers as Envoy reads them."""

from __future__ import annotations

import base64

import grpc
import pytest

from potboiler.server.auth import GATEWAY_HEADER
from potboiler.server.grpc_http1 import (
    BadRequest,
    Request,
    RequestParser,
    answer,
    grpc_message,
    status_answer,
    unframe,
)


def framed(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


def chunked(body: bytes, sizes: tuple[int, ...] = (3, 7)) -> bytes:
    """`body` in chunks of the given sizes (the rest in one), with a chunk extension on the first."""
    out, at = b"", 0
    for i, size in enumerate((*sizes, len(body))):
        piece = body[at : at + size]
        if not piece:
            break
        out += b"%x%s\r\n%s\r\n" % (len(piece), b";ext=1" if i == 0 else b"", piece)
        at += len(piece)
    return out + b"0\r\n\r\n"


def request_bytes(body: bytes, *, headers: bytes = b"", chunks: bool = True) -> bytes:
    sized = b"transfer-encoding: chunked\r\n" if chunks else b"content-length: %d\r\n" % len(body)
    return (
        b"POST /potboiler.v1.CoreRestService/PostLogEntry HTTP/1.1\r\n"
        b"host: localhost:8000\r\ncontent-type: application/grpc\r\nte: trailers\r\n"
        b"x-envoy-original-path: /log?dependency=x\r\n"
        + headers
        + sized
        + b"\r\n"
        + (chunked(body) if chunks else body)
    )


def test_a_chunked_request_split_anywhere_parses_the_same() -> None:
    body = framed(b"hello, bridge")
    raw = request_bytes(body, headers=b"authorization: Bearer t0k\r\n")
    for cut in range(len(raw) + 1):
        parser = RequestParser(max_body=1 << 20)
        parser.feed(raw[:cut])
        got = parser.next()
        if cut < len(raw):
            assert got is None, cut
            parser.feed(raw[cut:])
            got = parser.next()
        assert got == Request(
            "/potboiler.v1.CoreRestService/PostLogEntry",
            (
                ("x-envoy-original-path", "/log?dependency=x"),
                ("authorization", "Bearer t0k"),
                (GATEWAY_HEADER, "1"),
            ),
            body,
        ), cut
        assert parser.next() is None


def test_requests_sent_back_to_back_come_out_one_at_a_time() -> None:
    parser = RequestParser(max_body=1 << 20)
    first, second = framed(b"one"), framed(b"two")
    parser.feed(request_bytes(first) + request_bytes(second, chunks=False) + b"POST /x HTT")
    got = [parser.next(), parser.next(), parser.next()]
    assert [r.body if r else None for r in got] == [first, second, None]


def test_metadata_is_what_grpc_would_show() -> None:
    """Hop-by-hop and gRPC's own headers are not metadata; `-bin` values are decoded; the gateway
    header is the bridge's own, whatever a request carried."""
    parser = RequestParser(max_body=1 << 20)
    binary = base64.b64encode(b"\x00\xff").rstrip(b"=")
    parser.feed(
        request_bytes(
            framed(b""),
            headers=b"grpc-timeout: 5S\r\nconnection: keep-alive\r\nX-Trace-Bin: "
            + binary
            + b"\r\n"
            + GATEWAY_HEADER.encode()
            + b": 0\r\n",
        )
    )
    got = parser.next()
    assert got is not None
    assert got.metadata == (
        ("x-envoy-original-path", "/log?dependency=x"),
        ("x-trace-bin", b"\x00\xff"),
        (GATEWAY_HEADER, "1"),
    )


@pytest.mark.parametrize(
    "raw",
    [
        b"PUT /a/B HTTP/1.1\r\n\r\n",
        b"GET /ready HTTP/1.1\r\n\r\n",
        b"POST /a/B HTTP/1.0\r\n\r\n",
        b"POST /a/B HTTP/1.1\r\nno colon here\r\n\r\n",
        b"POST /a/B HTTP/1.1\r\ntransfer-encoding: gzip\r\n\r\n",
        b"POST /a/B HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"POST /a/B HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcXY",
        b"POST /a/B HTTP/1.1\r\ncontent-length: -5\r\n\r\n",
    ],
)
def test_what_envoy_never_sends_is_refused(raw: bytes) -> None:
    parser = RequestParser(max_body=1 << 20)
    parser.feed(raw)
    with pytest.raises(BadRequest):
        parser.next()


def test_a_body_over_the_limit_is_refused_before_it_all_arrives() -> None:
    parser = RequestParser(max_body=100)
    parser.feed(b"POST /a/B HTTP/1.1\r\ncontent-length: 101\r\n\r\n")
    with pytest.raises(BadRequest, match="larger"):
        parser.next()
    parser = RequestParser(max_body=100)
    parser.feed(b"POST /a/B HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n64\r\n" + b"x" * 100 + b"\r\n1\r\n")
    with pytest.raises(BadRequest, match="larger"):
        parser.next()


def test_a_head_without_end_is_refused_past_its_limit() -> None:
    parser = RequestParser(max_body=100)
    parser.feed(b"POST /a/B HTTP/1.1\r\nx: " + b"y" * 300_000)
    with pytest.raises(BadRequest, match="too long"):
        parser.next()


def test_unframe_takes_exactly_one_uncompressed_message() -> None:
    assert unframe(framed(b"abc")) == b"abc"
    assert unframe(framed(b"")) == b""
    for bad in [b"", b"\x00\x00", b"\x01" + framed(b"abc")[1:], framed(b"abc") + b"x", framed(b"abc")[:-1]]:
        with pytest.raises(ValueError):
            unframe(bad)


def test_grpc_message_is_percent_encoded_utf8() -> None:
    assert grpc_message("plain text: ok") == b"plain text: ok"
    assert grpc_message("50% — ünïcode\r\n") == b"50%25 %E2%80%94 %C3%BCn%C3%AFcode%0D%0A"


def test_an_answer_is_one_framed_chunk_then_its_trailers() -> None:
    raw = answer(b"payload", [("x-http-code", "201"), ("location", "/log/1"), ("blob-bin", b"\x01")])
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert head.split(b"\r\n") == [
        b"HTTP/1.1 200 OK",
        b"content-type: application/grpc",
        b"transfer-encoding: chunked",
    ]
    size, _, rest = rest.partition(b"\r\n")
    assert int(size, 16) == 12 and rest[:12] == framed(b"payload")
    assert (
        rest[12:]
        == b"\r\n0\r\ngrpc-status: 0\r\nx-http-code: 201\r\nlocation: /log/1\r\nblob-bin: AQ==\r\n\r\n"
    )


def test_an_error_is_a_trailers_only_answer() -> None:
    raw = status_answer(grpc.StatusCode.NOT_FOUND, "no entry 5%", [("x-http-code", "404")])
    assert raw == (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-status: 5\r\n"
        b"grpc-message: no entry 5%25\r\nx-http-code: 404\r\ncontent-length: 0\r\n\r\n"
    )


@pytest.mark.parametrize(
    "metadata",
    [
        ("location", "/log/1\r\nset-cookie: x"),
        ("location", "/log/\x00"),
        ("location", "/kv/é"),
        ("Bad Key", "1"),
    ],
)
def test_metadata_http_cannot_carry_is_never_written(metadata: tuple[str, str]) -> None:
    with pytest.raises(ValueError, match="not valid gRPC metadata"):
        answer(b"", [metadata])
    with pytest.raises(ValueError, match="not valid gRPC metadata"):
        status_answer(grpc.StatusCode.NOT_FOUND, "x", [metadata])


def test_metadata_values_are_utf8_where_they_can_be() -> None:
    parser = RequestParser(max_body=1 << 20)
    parser.feed(request_bytes(framed(b""), headers="x-name: é\r\nx-raw: ".encode() + b"\xe9\r\n"))
    got = parser.next()
    assert got is not None and ("x-name", "é") in got.metadata and ("x-raw", "é") in got.metadata


def test_a_big_body_in_many_reads_and_chunks_comes_out_whole() -> None:
    body = framed(bytes(range(256)) * 4096)  # 1 MiB
    raw = (
        request_bytes(body, chunks=False)
        .replace(b"content-length: %d\r\n\r\n" % len(body), b"transfer-encoding: chunked\r\n\r\n")
        .removesuffix(body)
    )
    raw += b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 4096]), body[i : i + 4096]) for i in range(0, len(body), 4096)
    )
    raw += b"0\r\n\r\n"
    parser = RequestParser(max_body=2 << 20)
    got = None
    for i in range(0, len(raw), 1000):
        parser.feed(raw[i : i + 1000])
        got = parser.next() or got
    assert got is not None and got.body == body
