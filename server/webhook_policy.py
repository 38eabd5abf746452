"""Webhook SSRF protection (`WebhookPolicy`): allow all targets, deny private ones, or admit an
allowlist. A URL is checked when it is registered; delivery (`potboiler.server.webhook_http`'s
`GuardedTransport`) applies the same policy on every attempt, and with deny-private resolves the
target's name once and connects to the very address that was checked."""

from __future__ import annotations

import enum
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from potboiler.server.config_files import SecurityConfigError
from potboiler.server.errors import InvalidArgument
from potboiler.server.urls import host_port, url_host, webhook_url

# The name of the module these were split from: log lines and filters on them stay as they were.
log = logging.getLogger("potboiler.server.security")


class PolicyMode(enum.Enum):
    """Which webhook targets a node may POST to."""

    #: Any http(s) URL (the default: a receiver on the same machine is the common case in development).
    ALLOW_ALL = "allow-all"
    #: Only targets whose every address is public: no private, loopback, link-local, multicast,
    #: reserved or unspecified address, IPv4 or IPv6 (IPv4-mapped and other embeddings included).
    DENY_PRIVATE = "deny-private"
    #: Only the host[:port] targets listed with --webhook-allow.
    ALLOWLIST = "allowlist"


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def forbidden_reason(address: IPAddress) -> str | None:
    """Why deny-private refuses `address`, or None if it is a public address."""
    if isinstance(address, ipaddress.IPv6Address) and (inner := _embedded_ipv4(address)) is not None:
        reason = forbidden_reason(inner)
        return f"{reason} (embedded in {address})" if reason else None
    for flag, what in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
        ("is_site_local", "site-local"),  # fec0::/10: deprecated, and neither private nor reserved
    ):
        if getattr(address, flag, False):  # (is_site_local is IPv6 only)
            return f"{address} is a {what} address"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return f"{address} is a shared (carrier-grade NAT) address"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


@dataclass(frozen=True)
class AllowedTarget:
    """One --webhook-allow entry: a host (name or IP, lower case), and a port or None for any."""

    host: str
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> AllowedTarget:
        """`host`, `host:port`, `[v6]` or `[v6]:port`."""
        text = text.strip()
        try:
            parts = urlsplit(f"http://{text}")
            port = parts.port
        except ValueError:
            raise SecurityConfigError(f"--webhook-allow {text!r} is not HOST[:PORT]") from None
        host = (parts.hostname or "").lower()
        if (
            not host
            or any(c.isspace() or not c.isprintable() for c in text)
            or parts.path
            or parts.query
            or parts.username
            or port == 0
        ):
            raise SecurityConfigError(f"--webhook-allow {text!r} is not HOST[:PORT]")
        return cls(ascii_host(host), port)

    def admits(self, host: str, port: int) -> bool:
        """Whether a URL's host and (effective) port match this entry (an international name in
        either form: as written, or as the punycode deliveries connect to)."""
        return ascii_host(host) == self.host and (self.port is None or self.port == port)

    def __str__(self) -> str:
        host = url_host(self.host)
        return host if self.port is None else f"{host}:{self.port}"


def ascii_host(host: str) -> str:
    """A host name in the ASCII form (IDNA, lower case) deliveries use (httpx's URL parsing)."""
    if host.isascii():
        return host.lower()
    import httpx  # here, not at the top: only international names need it

    try:
        return httpx.URL(f"http://{host}/").raw_host.decode("ascii")
    except httpx.InvalidURL:
        return host.lower()  # not a name httpx takes: no delivery goes there


#: Resolves a host name and port to IP address strings.
Resolver = Callable[[str, int], list[str]]


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for `host` (TCP)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class WebhookPolicy:
    """The webhook target policy of a node. `check_url` runs at registration (a refusal is a
    400); delivery applies `refusal` on every attempt (`potboiler.server.webhook_http`'s
    `GuardedTransport`: a refusal is a failed attempt, retried with backoff)."""

    mode: PolicyMode = PolicyMode.ALLOW_ALL
    allow: tuple[AllowedTarget, ...] = ()
    #: Seams for tests: how names are resolved, and why an address is refused (deny-private).
    resolver: Resolver = field(default=system_resolver, compare=False)
    address_check: Callable[[IPAddress], str | None] = field(default=forbidden_reason, compare=False)

    def __post_init__(self) -> None:
        if self.mode is PolicyMode.ALLOWLIST and not self.allow:
            raise SecurityConfigError("--webhook-policy allowlist needs at least one --webhook-allow")
        if self.mode is not PolicyMode.ALLOWLIST and self.allow:
            raise SecurityConfigError("--webhook-allow is only used with --webhook-policy allowlist")

    def refusal(self, host: str, port: int, addresses: Sequence[str] | None = None) -> str | None:
        """Why the policy refuses `host:port` (resolving it with `addresses` given, else by the
        resolver, for deny-private); None if it admits it."""
        if self.mode is PolicyMode.ALLOW_ALL:
            return None
        if self.mode is PolicyMode.ALLOWLIST:
            if any(a.admits(host, port) for a in self.allow):
                return None
            listed = ", ".join(str(a) for a in self.allow)
            return f"{host}:{port} is not in the webhook allowlist ({listed})"
        if addresses is None:
            try:  # an address itself (with a zone, `fe80::1%lo`, the resolver would fail on it)
                ipaddress.ip_address(host.split("%", 1)[0])
                addresses = [host]
            except ValueError:
                addresses = self.resolver(host, port)
        if not addresses:
            return f"{host} resolves to no address"
        for text in addresses:
            reason = self.address_check(ipaddress.ip_address(text.split("%", 1)[0]))
            if reason is None:
                continue
            if host == text:
                return f"webhook policy deny-private: {reason}"
            # Which address a name has is for the node's log, not for whoever may register webhooks
            # (they would map internal names to internal addresses).
            log.info("webhook policy deny-private: %s resolves to %s: %s", host, text, reason)
            return f"webhook policy deny-private: {host} resolves to an address that is not public"
        return None

    def check_url(self, url: str) -> None:
        """At registration: InvalidArgument (400) with the reason if the policy refuses `url`.
        With deny-private, a name that does not resolve now is accepted (it is checked again at
        every delivery attempt)."""
        webhook_url(url)
        host, port = host_port(url)
        try:
            reason = self.refusal(host, port)
        except UnicodeError:
            raise InvalidArgument(f"url {url!r} has an invalid host name") from None
        except OSError:
            return
        if reason is not None:
            raise InvalidArgument(f"url {url!r} is refused: {reason}")
