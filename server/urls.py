"""Validation of the URLs users give: webhook targets and node root URLs."""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlsplit, urlunsplit

from potboiler.server.errors import InvalidArgument, quoted
from potboiler.server.ports import GRPC_PORT_OFFSET

MAX_URL_LENGTH = 2048


def http_url(text: str, what: str = "url") -> str:
    """`text` if it is an absolute http(s) URL with a host; InvalidArgument otherwise."""
    if not text:
        raise InvalidArgument(f"{what} is required")
    if len(text) > MAX_URL_LENGTH:
        raise InvalidArgument(f"{what} is longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise InvalidArgument(f"{what} {quoted(text)} contains whitespace or control characters")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgument(f"{what} {quoted(text)} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidArgument(f"{what} {quoted(text)} is not an http:// or https:// URL")
    if not parts.hostname:
        raise InvalidArgument(f"{what} {quoted(text)} has no host")
    if port == 0:
        raise InvalidArgument(f"{what} {quoted(text)} has port 0")
    return text


def webhook_url(text: str) -> str:
    """`text` with its scheme and host in lower case (`HTTP://Example.COM/x` is
    `http://example.com/x`: one receiver, one webhook), if it is an http(s) URL (see `http_url`)
    that httpx, which delivers to it, takes too (IDNA rules for the host name, for one);
    InvalidArgument otherwise."""
    http_url(text)
    import httpx  # here, not at the top: a node that delivers nowhere starts ~80 ms sooner without it

    try:
        httpx.Request("POST", text)  # as a delivery builds it: the host's IDNA rules apply here
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise InvalidArgument(f"url {quoted(text)} is not a usable URL: {exc}") from None
    return lower_case_origin(text)


def lower_case_origin(url: str) -> str:
    """`url` (an http(s) URL) with its scheme and host in lower case, the rest as it was: user
    info, port, an IPv6 zone id (interface names are case-sensitive), path, query and fragment,
    down to an empty `?`."""
    scheme, sep, rest = url.partition("://")
    end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    netloc, tail = rest[:end], rest[end:]
    user, at, hostport = netloc.rpartition("@")
    if hostport.startswith("["):
        address, bracket, port = hostport[1:].partition("]")
        ip, zone_sep, zone = address.partition("%")
        hostport = "[" + ip.lower() + zone_sep + zone + bracket + port
    else:
        host, colon, port = hostport.partition(":")
        hostport = host.lower() + colon + port
    return scheme.lower() + sep + user + at + hostport + tail


def node_url(text: str) -> str:
    """A node's root URL, normalised to scheme://host:port with no path."""
    http_url(text, "node url")
    parts = urlsplit(text)
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise InvalidArgument(
            f"node url {quoted(text)} must be a root URL like http://host:8000 (no path or query)"
        )
    if (parts.port or 0) > 65535 - GRPC_PORT_OFFSET:
        raise InvalidArgument(
            f"node url {quoted(text)}: a node's port B must leave room for its gRPC port B+{GRPC_PORT_OFFSET}"
        )
    return origin(text)


def redacted(url: str) -> str:
    """`url` with the password of its user info, if any, replaced by `***` (as ListWebhooks shows a
    webhook to those who may list them)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{name}:***@{host}"))


def url_host(host: str) -> str:
    """`host` as it is written in a URL or a host:port address: an IPv6 literal in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def host_port(url: str) -> tuple[str, int]:
    """The host (lower case, an IPv6 literal without brackets) and the port `url` connects to."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def origin(url: str) -> str:
    """`scheme://host:port` of `url`: where it goes, without the user info, path or query that may
    hold its secrets (a token in the query, a path that is itself the key)."""
    host, port = host_port(url)
    return f"{urlsplit(url).scheme}://{url_host(host)}:{port}"


def digest(url: str, key: bytes) -> str:
    """A short stable name for `url` that tells it from any other without showing it: keyed with a
    secret `key` (of the node that shows it), so that whoever sees the name cannot test guesses of
    the URL's secrets against it."""
    return hmac.new(key, url.encode(), hashlib.sha256).hexdigest()[:16]


def shown(url: str, key: bytes) -> str:
    """A webhook URL as logs show it: where it goes and its digest (as ListWebhooks and the metrics
    give it), never its user info, path or query, any of which may be its secret."""
    return f"{origin(url)} ({digest(url, key)})"
