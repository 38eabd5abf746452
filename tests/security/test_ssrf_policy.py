"""The webhook SSRF policy on its own: which addresses deny-private refuses, registration checks,
the allowlist, and the guarded transport, which resolves a name once and connects to the very
address it checked (with a fake resolver and a real receiver on loopback)."""

from __future__ import annotations

import base64
import ipaddress
import logging

import httpx
import pytest

from potboiler.server.config_files import SecurityConfigError
from potboiler.server.errors import InvalidArgument
from potboiler.server.webhook_http import (
    CONNECT_TIMEOUT,
    READ_TIMEOUT,
    BlockedTarget,
    GuardedTransport,
    delivery_transport,
    post,
)
from potboiler.server.webhook_policy import (
    AllowedTarget,
    IPAddress,
    PolicyMode,
    WebhookPolicy,
    forbidden_reason,
)
from tests.webhook_receiver import Answer, Receiver


async def deliver(transport: httpx.AsyncBaseTransport, url: str) -> int:
    """POST `{}` to `url` as a delivery does; the status."""
    return await post(transport, url, b"{}", {}, 1 << 16)


FORBIDDEN = [
    "127.0.0.1",
    "127.8.9.10",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "ff02::1",
    "fec0::1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    "::ffff:10.0.0.1",
    "2002:7f00:1::",
    "64:ff9b::a00:1",
]
PUBLIC = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_deny_private_refuses_every_non_public_address(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", PUBLIC)
def test_deny_private_admits_public_addresses(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


def resolver_of(table: dict[str, list[str]]) -> tuple[list[str], WebhookPolicy]:
    """A deny-private policy resolving names from `table` only, and the list of names looked up."""
    looked_up: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        looked_up.append(host)
        if host not in table:
            raise OSError(f"unknown host {host}")
        return table[host]

    return looked_up, WebhookPolicy(PolicyMode.DENY_PRIVATE, resolver=resolve)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/", "127.0.0.1 is a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a link-local address"),
        ("http://[::1]:8080/", "loopback"),
        ("http://[::ffff:127.0.0.1]/", "loopback"),
        ("http://[fe80::1%25lo]/", "fe80::1 is a link-local address"),  # a literal, not resolved
        # A name's addresses are for the node's log, not for whoever registers webhooks.
        ("http://localhost:9000/hook", "localhost resolves to an address that is not public"),
        ("https://mixed.example/", "mixed.example resolves to an address that is not public"),
    ],
)
def test_deny_private_refuses_at_registration(url: str, reason: str) -> None:
    _, policy = resolver_of(
        {
            "127.0.0.1": ["127.0.0.1"],
            "169.254.169.254": ["169.254.169.254"],
            "::1": ["::1"],
            "::ffff:127.0.0.1": ["::ffff:127.0.0.1"],
            "localhost": ["127.0.0.1", "::1"],
            "mixed.example": ["93.184.216.34", "10.0.0.5"],
        }
    )
    with pytest.raises(InvalidArgument, match="refused") as info:
        policy.check_url(url)
    assert reason in str(info.value)


@pytest.mark.parametrize("url", ["http://a..b/", f"http://{'a' * 70}.example/"])
def test_deny_private_refuses_invalid_host_names_at_registration(url: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid host name"):
        WebhookPolicy(PolicyMode.DENY_PRIVATE).check_url(url)


def test_deny_private_admits_public_names_and_unresolvable_ones_at_registration() -> None:
    _, policy = resolver_of({"hooks.example": ["93.184.216.34"]})
    policy.check_url("https://hooks.example/in")
    policy.check_url("http://not-yet.example/in")  # checked again at every delivery


def test_the_system_resolver_finds_localhost_loopback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="potboiler.server.security")
    with pytest.raises(InvalidArgument, match="localhost resolves to an address that is not public"):
        WebhookPolicy(PolicyMode.DENY_PRIVATE).check_url("http://localhost/")
    assert "loopback" in caplog.text  # which address, and why: in the node's log only


def test_allow_all_admits_anything() -> None:
    WebhookPolicy().check_url("http://127.0.0.1/")
    WebhookPolicy().check_url("http://169.254.169.254/")


@pytest.mark.parametrize("listed", ["bücher.example", "xn--bcher-kva.example", "BÜCHER.example"])
def test_an_international_name_is_admitted_in_either_form(listed: str) -> None:
    """Registration sees the name as written, delivery the punycode httpx connects to: an entry in
    either form admits both."""
    entry = AllowedTarget.parse(listed)
    for host in ("bücher.example", "xn--bcher-kva.example"):
        assert entry.admits(host, 80)
    assert not entry.admits("bucher.example", 80)
    WebhookPolicy(PolicyMode.ALLOWLIST, (entry,)).check_url("http://bücher.example/hook")


def test_allowlist_admits_exactly_the_listed_hosts_and_ports() -> None:
    policy = WebhookPolicy(
        PolicyMode.ALLOWLIST,
        (
            AllowedTarget.parse("127.0.0.1:9000"),
            AllowedTarget.parse("Hooks.Example"),
            AllowedTarget.parse("[::1]:80"),
        ),
    )
    for ok in (
        "http://127.0.0.1:9000/a",
        "http://hooks.example/x",
        "https://hooks.example:8443/x",
        "http://[::1]/",
    ):
        policy.check_url(ok)
    with pytest.raises(InvalidArgument) as refusal:
        policy.check_url("http://evil.example/")
    assert str(refusal.value).endswith(
        "is refused: evil.example:80 is not in the webhook allowlist (127.0.0.1:9000, hooks.example, [::1]:80)"
    )
    for refused in (
        "http://127.0.0.1:9001/a",
        "http://127.0.0.1/a",
        "http://localhost:9000/a",
        "http://evil.example/",
        "https://[::1]/",
        "http://sub.hooks.example/",
    ):
        with pytest.raises(InvalidArgument, match="not in the webhook allowlist"):
            policy.check_url(refused)


@pytest.mark.parametrize("text", ["", "http://x/", "host:0", "host/path", "a b:1", "[::1"])
def test_a_bad_allowlist_entry_is_refused(text: str) -> None:
    with pytest.raises(SecurityConfigError):
        AllowedTarget.parse(text)


def test_policy_flags_must_fit_together() -> None:
    with pytest.raises(SecurityConfigError, match="at least one"):
        WebhookPolicy(PolicyMode.ALLOWLIST)
    with pytest.raises(SecurityConfigError, match="only used with"):
        WebhookPolicy(PolicyMode.DENY_PRIVATE, (AllowedTarget("x"),))


async def test_delivery_resolves_once_and_connects_to_the_checked_address(receiver: Receiver) -> None:
    """A name no real resolver knows reaches the receiver: the connection went to the address the
    policy's resolver gave and its check saw, with the name kept in the Host header."""
    looked_up: list[str] = []
    checked: list[IPAddress] = []

    def resolve(host: str, port: int) -> list[str]:
        looked_up.append(host)
        return ["127.0.0.1"]

    def check(address: IPAddress) -> str | None:
        checked.append(address)
        return None  # this test's receiver is on loopback: admit it

    policy = WebhookPolicy(PolicyMode.DENY_PRIVATE, resolver=resolve, address_check=check)
    transport = delivery_transport(policy)
    for _ in range(2):
        assert await deliver(transport, f"http://hooks.invalid:{receiver.port}/in") == 200
    await transport.aclose()
    assert looked_up == ["hooks.invalid", "hooks.invalid"]
    assert checked == [ipaddress.ip_address("127.0.0.1")] * 2
    assert [(r.path, r.host) for r in receiver.received()] == [("/in", f"hooks.invalid:{receiver.port}")] * 2


async def test_delivery_to_a_name_that_now_resolves_to_loopback_is_blocked(receiver: Receiver) -> None:
    """DNS rebinding: the name was public when registered, and is loopback when delivering."""
    answers = iter([["93.184.216.34"], ["127.0.0.1"]])
    policy = WebhookPolicy(PolicyMode.DENY_PRIVATE, resolver=lambda host, port: next(answers))
    url = f"http://rebind.example:{receiver.port}/in"
    policy.check_url(url)
    with pytest.raises(BlockedTarget, match=r"rebind\.example resolves to an address that is not public"):
        await deliver(delivery_transport(policy), url)
    assert receiver.received() == []


async def test_the_allowlist_is_applied_at_delivery_too(receiver: Receiver) -> None:
    policy = WebhookPolicy(PolicyMode.ALLOWLIST, (AllowedTarget("127.0.0.1", receiver.port),))
    transport = delivery_transport(policy)
    assert await deliver(transport, receiver.url("/ok")) == 200
    with pytest.raises(BlockedTarget, match="not in the webhook allowlist"):
        await deliver(transport, receiver.url("/no", host="localhost"))
    await transport.aclose()
    assert [r.path for r in receiver.received()] == ["/ok"]


async def test_a_delivery_follows_no_redirects_ignores_proxies_and_has_timeouts(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9/")
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:9/")
    receiver.answer = lambda path: Answer(302, {"location": "/elsewhere"}) if path == "/in" else Answer()
    transport = delivery_transport(WebhookPolicy())
    assert await deliver(transport, receiver.url("/in")) == 302
    await transport.aclose()
    assert [r.path for r in receiver.received()] == ["/in"]
    seen: list[object] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request.extensions["timeout"])
        return httpx.Response(204)

    assert await deliver(httpx.MockTransport(record), "http://hooks.example/in") == 204
    assert seen == [
        {"connect": CONNECT_TIMEOUT, "read": READ_TIMEOUT, "write": READ_TIMEOUT, "pool": READ_TIMEOUT}
    ]


async def test_a_delivery_to_a_url_with_user_info_sends_it_as_basic_auth(receiver: Receiver) -> None:
    transport = delivery_transport(WebhookPolicy())
    assert await deliver(transport, f"http://us%40er:p%3Ass@127.0.0.1:{receiver.port}/in") == 200
    assert await deliver(transport, receiver.url("/in")) == 200
    await transport.aclose()
    expected = "Basic " + base64.b64encode(b"us@er:p:ss").decode()
    assert [r.authorization for r in receiver.received()] == [expected, ""]


class Addresses(httpx.AsyncBaseTransport):
    """An inner transport that fails to connect to some addresses and answers 200 from the others,
    recording the hosts it was asked to connect to."""

    def __init__(self, dead: dict[str, type[httpx.TransportError]]) -> None:
        self.dead = dead
        self.tried: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.tried.append(request.url.host)
        if (error := self.dead.get(request.url.host)) is not None:
            raise error("no route", request=request)
        return httpx.Response(200)


@pytest.mark.parametrize("mode", [PolicyMode.ALLOW_ALL, PolicyMode.DENY_PRIVATE])
@pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ConnectTimeout])
async def test_a_delivery_tries_each_address_in_turn_until_one_connects(
    mode: PolicyMode, error: type[httpx.TransportError]
) -> None:
    """A dual-stack receiver whose first address is unreachable (refused, or silent until the
    connect timeout) is reached on the next one, by IP, with its name kept for Host."""
    inner = Addresses({"2001:db8::1": error})
    policy = WebhookPolicy(
        mode, resolver=lambda host, port: ["2001:db8::1", "192.0.2.7"], address_check=lambda address: None
    )
    transport = GuardedTransport(policy, make_inner=lambda: inner)
    async with httpx.AsyncClient(transport=transport) as client:
        response = await client.post("http://dual.example/in", content=b"{}")
    assert response.status_code == 200
    assert response.request.headers["host"] == "dual.example"
    assert inner.tried == ["2001:db8::1", "192.0.2.7"]
    inner.dead["192.0.2.7"] = error
    async with httpx.AsyncClient(transport=GuardedTransport(policy, make_inner=lambda: inner)) as client:
        with pytest.raises(error):  # every address failed: the last one's error
            await client.post("http://dual.example/in", content=b"{}")


async def test_a_scoped_ipv6_address_keeps_its_scope() -> None:
    inner = Addresses({})
    policy = WebhookPolicy(resolver=lambda host, port: ["fe80::1%eth0"])
    async with httpx.AsyncClient(transport=GuardedTransport(policy, make_inner=lambda: inner)) as client:
        assert (await client.post("http://printer.local/in", content=b"{}")).status_code == 200
    assert inner.tried == ["fe80::1%eth0"]
