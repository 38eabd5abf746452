"""URL validation: webhook targets (`http_url`) and node root URLs (`node_url`, normalised)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from potboiler.server.errors import InvalidArgument
from potboiler.server.ports import GRPC_PORT_OFFSET
from potboiler.server.urls import (
    MAX_URL_LENGTH,
    http_url,
    lower_case_origin,
    node_url,
    redacted,
    webhook_url,
)

GOOD = [
    "http://example.com",
    "https://example.com/",
    "http://example.com:8080/hook?x=1&y=2#frag",
    "HTTP://EXAMPLE.COM/Path",
    "http://127.0.0.1:1/",
    "http://[::1]:9000/hook",
    "http://user:secret@example.com/hook",
    "http://localhost:65535",
    "https://a.b.c.d.example/" + "p" * 100,
]

BAD = [
    "",
    "example.com",
    "//example.com/hook",
    "ftp://example.com/",
    "file:///etc/passwd",
    "mailto:someone@example.com",
    "javascript:alert(1)",
    "http://",
    "http:///path",
    "http://:80/",
    "http://exa mple.com/",
    " http://example.com/",
    "http://example.com/\n",
    "http://example.com/\t",
    "http://example.com/\x00",
    "http://example.com/\x7f",
    "http://example.com:0/",
    "http://example.com:65536/",
    "http://example.com:-1/",
    "http://example.com:port/",
    "http://[::1/",
]


@pytest.mark.parametrize("url", GOOD)
def test_http_url_accepts_absolute_http_urls_unchanged(url: str) -> None:
    assert http_url(url) == url


@pytest.mark.parametrize("url", BAD)
def test_http_url_rejects(url: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        http_url(url)
    assert str(info.value)


def test_http_url_length_limit() -> None:
    prefix = "http://example.com/"
    at_limit = prefix + "x" * (MAX_URL_LENGTH - len(prefix))
    assert http_url(at_limit) == at_limit
    with pytest.raises(InvalidArgument, match=str(MAX_URL_LENGTH)):
        http_url(at_limit + "x")


def test_http_url_messages_name_the_field_and_the_value() -> None:
    with pytest.raises(InvalidArgument, match="webhook"):
        http_url("", "webhook")
    with pytest.raises(InvalidArgument, match="'ftp://x/'"):
        http_url("ftp://x/")
    with pytest.raises(InvalidArgument, match="node url 'nope'"):
        node_url("nope")


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("http://example.com", "http://example.com:80"),
        ("http://example.com/", "http://example.com:80"),
        ("http://example.com:80", "http://example.com:80"),
        ("https://example.com", "https://example.com:443"),
        ("https://example.com:8443/", "https://example.com:8443"),
        ("HTTP://Example.COM:8000", "http://example.com:8000"),
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://[::1]:8000/", "http://[::1]:8000"),
        ("http://[::1]", "http://[::1]:80"),
        ("http://[2001:DB8::1]:8000", "http://[2001:db8::1]:8000"),
        ("http://example.com:/", "http://example.com:80"),
    ],
)
def test_node_url_normalises(url: str, normal: str) -> None:
    assert node_url(url) == normal
    assert node_url(normal) == normal


@pytest.mark.parametrize(
    "url",
    [
        *BAD,
        "http://example.com:8000/path",
        "http://example.com:8000/a/",
        "http://example.com:8000/?q=1",
        "http://example.com:8000#frag",
        "http://user@example.com:8000",
        "http://user:pw@example.com:8000",
        "http://example.com:65526",  # its gRPC port, B+10, would be past 65535
    ],
)
def test_node_url_rejects(url: str) -> None:
    with pytest.raises(InvalidArgument):
        node_url(url)


def test_node_url_rejects_userinfo_without_a_user_name() -> None:
    with pytest.raises(InvalidArgument):
        node_url("http://:secret@example.com:8000")


hosts = st.one_of(
    st.from_regex(r"[a-zA-Z][a-zA-Z0-9-]{0,20}(\.[a-zA-Z][a-zA-Z0-9-]{0,20}){0,3}", fullmatch=True),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))),
)


@settings(max_examples=50)
@given(
    scheme=st.sampled_from(["http", "https", "HTTP", "Https"]),
    host=hosts,
    port=st.one_of(st.none(), st.integers(1, 65535 - GRPC_PORT_OFFSET)),
    slash=st.booleans(),
)
def test_node_url_normal_form(scheme: str, host: str, port: int | None, slash: bool) -> None:
    url = f"{scheme}://{host}{'' if port is None else f':{port}'}{'/' if slash else ''}"
    default = 443 if scheme.lower() == "https" else 80
    normal = node_url(url)
    assert normal == f"{scheme.lower()}://{host.lower()}:{port or default}"
    assert node_url(normal) == normal
    assert http_url(normal) == normal


@pytest.mark.parametrize("url", ["http://\u2603.com/hook", "http://xn--/hook", "http://xn--a.com/"])
def test_webhook_url_also_needs_a_host_name_httpx_takes(url: str) -> None:
    """A webhook URL must be one the delivering client can use: a host name that is not valid
    IDNA passes `http_url` (node URLs never reach httpx) but not `webhook_url` (an A-label is
    checked only when a request is built, which `webhook_url` does)."""
    assert http_url(url) == url
    with pytest.raises(InvalidArgument, match="not a usable URL"):
        webhook_url(url)
    assert webhook_url("http://example.com/hook") == "http://example.com/hook"


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("https://user:s3cr:et@example.com:8443/hook?q=1", "https://user:***@example.com:8443/hook?q=1"),
        ("http://user:@example.com/h", "http://user:***@example.com/h"),
        ("http://user@example.com/h", "http://user@example.com/h"),
        ("http://example.com/h", "http://example.com/h"),
    ],
)
def test_redacted_hides_a_password(url: str, logged: str) -> None:
    assert redacted(url) == logged


@pytest.mark.parametrize(
    ("url", "normalised"),
    [
        ("HTTP://Example.COM/Path?Q=1#F", "http://example.com/Path?Q=1#F"),
        ("http://User:PassWord@Host.test:8080/x", "http://User:PassWord@host.test:8080/x"),
        ("http://h/x?", "http://h/x?"),  # an empty query is kept: the receiver sees /x?
        ("http://h#", "http://h#"),
        ("http://[FE80::1%25Eth0]:80/x", "http://[fe80::1%25Eth0]:80/x"),  # interface names keep their case
        ("https://[::FFFF:10.0.0.1]/", "https://[::ffff:10.0.0.1]/"),
    ],
)
def test_a_webhook_url_is_kept_with_its_scheme_and_host_in_lower_case(url: str, normalised: str) -> None:
    assert lower_case_origin(url) == normalised
