"""The HTTP side of webhook delivery: `post` sends one entry through the delivery transport, which
resolves each receiver's host in the lookup threads (`potboiler.server.lookups`), applies the node's
webhook policy (`potboiler.server.webhook_policy.WebhookPolicy`) on every attempt, and sends the request on
a connection of `potboiler.server.webhook_transport`.

Straight to the transport, not through an httpx client: the client's own work (building the request
from the URL text, auth, redirects, cookies, hooks) cost more CPU than the transport's. What it did
that a delivery needs is done here: the timeouts, basic auth from the URL's user info; what it must
not do is left out by construction (no redirect is followed, no proxy from the environment is used).

Apart from the policy so that a node imports httpx only once it delivers (about 80 ms of start-up)."""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable, Mapping

import httpx

from potboiler.server.lookups import Lookups
from potboiler.server.urls import host_port
from potboiler.server.webhook_policy import PolicyMode, WebhookPolicy
from potboiler.server.webhook_transport import H11Transport


class BlockedTarget(httpx.ConnectError):
    """The webhook policy refused the target (counts as a failed delivery attempt)."""


#: Connect timeout of a webhook POST, seconds.
CONNECT_TIMEOUT = 5.0
#: Read (and write) timeout of a webhook POST: longest silence, seconds.
READ_TIMEOUT = 10.0


#: The timeouts of each request (the `timeout` extension of httpx transports), seconds.
TIMEOUTS = {"connect": CONNECT_TIMEOUT, "read": READ_TIMEOUT, "write": READ_TIMEOUT, "pool": READ_TIMEOUT}
USER_AGENT = "potboiler-webhook"


def delivery_transport(policy: WebhookPolicy) -> httpx.AsyncBaseTransport:
    """The transport deliveries go through: the policy applied to every request."""
    return GuardedTransport(policy)


async def post(
    transport: httpx.AsyncBaseTransport,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    max_answer_bytes: int,
) -> int:
    """POST `body` (JSON) to `url` with `headers` besides those every delivery has; the answer's
    status, having read at most `max_answer_bytes` of it (a connection left with more unread is
    closed). httpx's transport errors (httpx.TransportError), as the transport raises them."""
    target, fixed = _target(url)
    request = httpx.Request(
        "POST", target, content=body, headers={**fixed, **headers}, extensions={"timeout": TIMEOUTS}
    )
    response = await transport.handle_async_request(request)
    try:
        received = 0
        async for chunk in response.stream:  # type: ignore[union-attr]
            received += len(chunk)
            if received >= max_answer_bytes:
                break
        return response.status_code
    finally:
        await response.aclose()


@functools.lru_cache(maxsize=1024)
def _target(url: str) -> tuple[httpx.URL, dict[str, str]]:
    """`url` parsed, and the headers every delivery to it has: basic auth from its user info, if any
    (the user and password percent-decoded, as an HTTP client takes them from a URL)."""
    parsed = httpx.URL(url)
    headers = {"content-type": "application/json", "user-agent": USER_AGENT}
    if parsed.userinfo:
        pair = f"{parsed.username}:{parsed.password}".encode()
        headers["authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    return parsed, headers


class GuardedTransport(httpx.AsyncBaseTransport):
    """Applies a webhook policy to every request. The host is resolved ONCE, in the lookup threads
    (with deny-private, every address is checked), and the connection goes to its addresses by IP
    in turn until one connects, with the Host header and TLS SNI (and certificate check) still
    naming the host: no second lookup can swap in another address (DNS rebinding), and no lookup
    runs in the event loop's default thread pool."""

    def __init__(
        self,
        policy: WebhookPolicy,
        make_inner: Callable[[], httpx.AsyncBaseTransport] = H11Transport,
    ) -> None:
        self._policy = policy
        self._lookups = Lookups(policy.resolver)
        self._make_inner = make_inner
        # One inner transport (connection pool) per scheme and host name: pools are keyed by the
        # address connected to, and a TLS connection verified for one name must not carry
        # requests for another name at the same address.
        self._inners: dict[tuple[str, str, int], httpx.AsyncBaseTransport] = {}

    def _inner(self, request: httpx.Request) -> httpx.AsyncBaseTransport:
        host, port = host_port(str(request.url))
        key = (request.url.scheme, host, port)
        if (inner := self._inners.get(key)) is None:
            inner = self._inners[key] = self._make_inner()
        return inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host, port = host_port(str(request.url))
        if self._policy.mode is not PolicyMode.DENY_PRIVATE:
            reason = self._policy.refusal(host, port)
            if reason is not None:
                raise BlockedTarget(reason, request=request)
        try:
            addresses = await self._lookups.resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise httpx.ConnectError(f"cannot resolve {host}: {exc}", request=request) from None
        if not addresses:
            raise httpx.ConnectError(f"{host} resolves to no address", request=request)
        if self._policy.mode is PolicyMode.DENY_PRIVATE:
            reason = self._policy.refusal(host, port, addresses)
            if reason is not None:
                raise BlockedTarget(reason, request=request)
        inner = self._inner(request)
        url, extensions = request.url, request.extensions
        for i, address in enumerate(addresses):  # an IPv6 address keeps its scope (%eth0), if any
            if address != host:
                request.url = url.copy_with(host=address)
                if url.scheme == "https":
                    request.extensions = {**extensions, "sni_hostname": host}
            try:
                return await inner.handle_async_request(request)
            except (httpx.ConnectError, httpx.ConnectTimeout):  # nothing sent: the next address
                if i == len(addresses) - 1:
                    raise
        raise AssertionError("unreachable: the last address's error is raised")

    async def aclose(self) -> None:
        inners, self._inners = list(self._inners.values()), {}
        for inner in inners:
            await inner.aclose()
