"""A node's security, all optional and off by default (see the README, "Running it safely").

- mTLS between nodes (`TlsFiles`): the node's direct gRPC server requires a client certificate
  signed by the cluster CA, and replication dials peers with the node's certificate.
- Client authentication (`TokenStore`, `AuthInterceptor`): bearer tokens, stored as SHA-256 hashes
  with a role (`read`, `write` or `admin`), checked by a gRPC server interceptor on every call, so REST
  through Envoy (which forwards the Authorization header as metadata) and direct gRPC are covered
  alike. Health checks stay open. Streaming calls are checked again whenever the tokens change, and
  ended once their token no longer allows them.
- Webhook SSRF protection (`WebhookPolicy`, `GuardedTransport`): allow all targets, deny private
  ones, or admit an allowlist; with deny-private the target's name is resolved once and the
  connection goes to the very address that was checked.

Configuration errors (a missing certificate, a malformed token file) raise `SecurityConfigError`.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import inspect
import ipaddress
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit

import grpc

from potboiler.server.errors import InvalidArgument
from potboiler.server.grpc_context import Ctx
from potboiler.server.urls import host_port, url_host, webhook_url

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)


class SecurityConfigError(ValueError):
    """A security setting cannot be used (missing or malformed file, bad flag value)."""


# -- TLS material --------------------------------------------------------------------------


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise SecurityConfigError(f"the {what} {path} is not a PEM file")
    return data


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of a node's mTLS identity: the cluster CA, the node's certificate (chain) and
    its private key. The certificate must name the host of the node's URL (a DNS or IP SAN),
    since peers dial that host and check the name."""

    ca: Path
    cert: Path
    key: Path

    def __post_init__(self) -> None:
        for path, what in ((self.ca, "CA certificate"), (self.cert, "certificate"), (self.key, "key")):
            _read_pem(path, what)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials of the node's gRPC server: its certificate, and client certificates
        required and verified against the cluster CA."""
        return grpc.ssl_server_credentials(
            [(_read_pem(self.key, "key"), _read_pem(self.cert, "certificate"))],
            root_certificates=_read_pem(self.ca, "CA certificate"),
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials to dial a peer: trust the cluster CA, present the node's certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca, "CA certificate"),
            private_key=_read_pem(self.key, "key"),
            certificate_chain=_read_pem(self.cert, "certificate"),
        )

    def resolved(self) -> TlsFiles:
        """The same files as absolute paths (Envoy runs in another directory)."""
        return TlsFiles(self.ca.resolve(), self.cert.resolve(), self.key.resolve())


@dataclass(frozen=True)
class RestTlsFiles:
    """Certificate (chain) and key with which Envoy serves the REST ports over HTTPS."""

    cert: Path
    key: Path

    def __post_init__(self) -> None:
        _read_pem(self.cert, "REST certificate")
        _read_pem(self.key, "REST key")

    def resolved(self) -> RestTlsFiles:
        """The same files as absolute paths."""
        return RestTlsFiles(self.cert.resolve(), self.key.resolve())


# -- tokens --------------------------------------------------------------------------------


#: What tells one version of a file from the next: a digest of its bytes (see `file_version`).
FileVersion: TypeAlias = bytes


def file_version(path: Path) -> FileVersion | None:
    """The version of the (small) file at `path`, None while it cannot be read: the SHA-256 of its
    bytes, so that any change of what it says is a new version (a rewrite in place of the same size
    within one tick of the file system's clock too), and a rewrite of the same bytes is not."""
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None


def read_versioned(path: Path, what: str) -> tuple[str, FileVersion]:
    """The text of the `what` (a tokens file, say) at `path` and its version, from one read: whoever
    watches the file from this version on sees every change made after what was read.
    SecurityConfigError if it cannot be read as text."""
    try:
        data = path.read_bytes()
        return data.decode(), hashlib.sha256(data).digest()
    except (OSError, UnicodeDecodeError) as exc:
        raise SecurityConfigError(f"cannot read the {what} {path}: {exc}") from None


class Role(enum.Enum):
    """What a token may do: `read` calls only read RPCs; `write` also appends, writes KV and
    Pigtail and registers webhooks; `admin` also changes the cluster (adds and removes members) and
    replicates (a peer token, without mTLS, must be an admin token)."""

    READ = "read"
    WRITE = "write"
    ADMIN = "admin"

    def allows(self, need: Role) -> bool:
        """Whether a token of this role may call an RPC that needs `need`."""
        return _RANK[self] >= _RANK[need]


_RANK = {Role.READ: 0, Role.WRITE: 1, Role.ADMIN: 2}


#: Longest bearer token accepted (longer ones are refused unhashed).
MAX_TOKEN_LENGTH = 4096


def hash_token(token: str) -> str:
    """The stored form of a token: the hex SHA-256 of its UTF-8 bytes. Tokens are random secrets
    (`potboiler hash-token` makes 32 random bytes), so a fast hash is enough: there is nothing to
    guess from it."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_line(token: str, role: Role) -> str:
    """One line of a tokens file for `token`."""
    return f"{hash_token(token)} {role.value}"


class TokenStore:
    """Hashed tokens with their roles, as read from a tokens file.

    The file has one token per line, `<sha256 hex of the token> <read|write|admin> [label]`; blank lines
    and lines starting with `#` are ignored. A presented token is hashed and compared with EVERY
    stored hash using `hmac.compare_digest` (constant time, no early exit), so neither the timing of
    one comparison nor the number of comparisons tells how close a guess was or which entry it hit.
    """

    def __init__(self, entries: Iterable[tuple[str, Role]]) -> None:
        self._entries: list[tuple[bytes, Role]] = []
        #: The tokens file they were read from, if any (see `reload`), and the version read.
        self.path: Path | None = None
        self.version: FileVersion | None = None
        for digest, role in entries:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                # Not shown: it may be a token itself, written where its hash belongs.
                raise SecurityConfigError(
                    "the first field is not a SHA-256 hex digest (a token itself? store the line "
                    "`potboiler hash-token` prints for it)"
                )
            self._entries.append((digest.lower().encode(), role))

    @classmethod
    def parse(cls, text: str, source: str = "tokens file") -> TokenStore:
        """Tokens from the text of a tokens file."""
        entries = []
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            if len(fields) < 2:
                raise SecurityConfigError(f"{source}:{number}: expected '<sha256 hex> <read|write|admin>'")
            try:
                role = Role(fields[1].lower())
            except ValueError:
                raise SecurityConfigError(  # the field not shown: it may be a secret
                    f"{source}:{number}: the second field is not a role ('read', 'write' or 'admin')"
                ) from None
            try:
                cls([(fields[0], role)])
            except SecurityConfigError as exc:
                raise SecurityConfigError(f"{source}:{number}: {exc}") from None
            entries.append((fields[0], role))
        if not entries:
            raise SecurityConfigError(f"{source} holds no tokens (every call would be refused)")
        return cls(entries)

    @classmethod
    def load(cls, path: Path) -> TokenStore:
        """Tokens from a tokens file."""
        text, version = read_versioned(path, "tokens file")
        tokens = cls.parse(text, str(path))
        tokens.path, tokens.version = path, version
        return tokens

    def reload(self) -> int:
        """Read the tokens file again and take its tokens in place of these, all at once (calls
        checked from then on see only the new ones); returns how many. SecurityConfigError, keeping
        these, if the file cannot be read or is not a valid tokens file."""
        if self.path is None:
            raise SecurityConfigError("these tokens were not read from a file")
        loaded = TokenStore.load(self.path)
        self._entries, self.version = loaded._entries, loaded.version
        return len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def role_of(self, token: str) -> Role | None:
        """The role of `token`, or None if it is not one of the stored tokens."""
        if len(token) > MAX_TOKEN_LENGTH:
            return None
        presented = hash_token(token).encode()
        found: Role | None = None
        for digest, role in self._entries:
            # Every entry is compared, matched or not: the time taken does not depend on which one.
            if hmac.compare_digest(presented, digest) and (found is None or role.allows(found)):
                found = role
        return found


# -- the auth interceptor ------------------------------------------------------------------

#: Header Envoy sets (overwriting any a client sent) on every request it forwards. A call that
#: has it came through the gateway, so the gateway's TLS client certificate does not make it a peer.
GATEWAY_HEADER = "x-potboiler-gateway"
#: Calls open to anyone, whatever the settings.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
#: Read-only services beside ours.
READ_PREFIXES = ("/grpc.reflection.",)
#: The node-to-node RPC: a verified peer certificate authenticates it.
PEER_METHODS = frozenset({"/potboiler.v1.ReplicationService/Replicate"})
#: Verbs of read RPCs (after an optional `Rest` prefix, as in `RestGetTask`).
READ_VERBS = ("Get", "List", "Subscribe")
#: Reads that show secrets: webhook URLs may carry theirs (a token in the path or query), which
#: whoever may register webhooks knows anyway, but a read token must not learn.
WRITE_READS = frozenset({"/potboiler.v1.WebhooksService/ListWebhooks"})
#: The services of the cluster itself (membership, replication): whoever may call their RPCs that
#: are not reads can make nodes send their peer token (and every entry) to a server of theirs, so
#: those need an admin token, including any such RPC added later.
ADMIN_SERVICES = ("/potboiler.v1.NodesService/", "/potboiler.v1.ReplicationService/")


def required_role(method: str) -> Role | None:
    """The role a call of `method` (`/package.Service/Method`) needs; None if it is open.
    Anything not recognisably a read is a write, or in the cluster's own services an admin call
    (fail closed)."""
    if method.startswith(OPEN_PREFIXES):
        return None
    if method.startswith(READ_PREFIXES):
        return Role.READ
    name = method.rsplit("/", 1)[-1]
    name = name.removeprefix("Rest")
    if name.startswith(READ_VERBS) and method not in PEER_METHODS and method not in WRITE_READS:
        return Role.READ
    return Role.ADMIN if method.startswith(ADMIN_SERVICES) else Role.WRITE


_A = {Role.READ: "a", Role.WRITE: "a", Role.ADMIN: "an"}


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` metadata entry, if any."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return None


def _via_gateway(metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
    return any(key.lower() == GATEWAY_HEADER for key, _ in metadata or ())


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Behavior = Callable[..., Any]


def _with_behavior(handler: Handler, behavior: Behavior) -> Handler:
    """A handler of the same kind and (de)serializers as `handler`, running `behavior`."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _original(handler: Handler) -> Behavior:
    behavior = (
        handler.stream_stream
        or handler.stream_unary
        or handler.unary_stream
        or handler.unary_unary
    )  # fmt: skip
    assert behavior is not None
    return behavior


def _refuse(handler: Handler, code: grpc.StatusCode, details: str) -> Handler:
    async def refuse(request: Any, context: Ctx) -> None:
        await context.abort(code, details)

    return _with_behavior(handler, refuse)


def _role_refusal(method: str, need: Role, role: Role) -> tuple[grpc.StatusCode, str] | None:
    """Why a token of `role` may not call `method`, which needs `need` (None if it may)."""
    if role.allows(need):
        return None
    if method in PEER_METHODS:
        # Not PERMISSION_DENIED: to a dialing peer that means "you were removed".
        return grpc.StatusCode.UNAUTHENTICATED, "replication needs an admin token"
    return (
        grpc.StatusCode.PERMISSION_DENIED,
        f"{method.rsplit('/', 1)[-1]} needs {_A[need]} {need.value} token; this one is {_A[role]} "
        f"{role.value} token",
    )


def _running_refusal(role: Role | None, method: str, need: Role) -> tuple[grpc.StatusCode, str] | None:
    """Why a call of `method` running on a token whose role is now `role` (None: revoked) is
    refused (None if it is not)."""
    if role is None:
        return grpc.StatusCode.UNAUTHENTICATED, "the token of this call was revoked"
    return _role_refusal(method, need, role)


@dataclass(eq=False)
class _Stream:
    """A streaming call running on a token."""

    token: str
    method: str
    need: Role
    context: Ctx
    task: asyncio.Task[Any]


def _peer_certificate_verified(context: Ctx) -> bool:
    auth = context.auth_context()
    return auth.get("transport_security_type") == [b"ssl"] and bool(context.peer_identities())


def _require_peer_certificate(handler: Handler) -> Handler:
    """Run `handler` only if the connection presented a client certificate that TLS verified (the
    server requires one signed by the cluster CA, so this is belt and braces)."""
    original = _original(handler)
    denied = "replication needs a client certificate from the cluster CA"
    if inspect.isasyncgenfunction(original):

        async def stream(request: Any, context: Ctx) -> AsyncIterator[Any]:
            if not _peer_certificate_verified(context):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, denied)
            async for item in original(request, context):
                yield item

        return _with_behavior(handler, stream)

    async def call(request: Any, context: Ctx) -> Any:
        if not _peer_certificate_verified(context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, denied)
        result = original(request, context)
        return await result if inspect.isawaitable(result) else result

    return _with_behavior(handler, call)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call of a node's gRPC server.

    - Health checks (`grpc.health.v1.Health`) are always open.
    - With `tokens`: every other call needs `authorization: Bearer <token>` with a known token
      (else UNAUTHENTICATED, REST 401); read RPCs (Get*, List*, Subscribe*, reflection) need any
      token, the cluster's own (ADMIN_SERVICES: adding and removing members, replicating) an
      `admin` token, every other RPC a `write` or `admin` token (else PERMISSION_DENIED, REST 403).
    - With `peer_certificates` (mTLS on): ReplicationService/Replicate called directly (not
      through the gateway) is authenticated by the peer's verified certificate, no token needed;
      through the gateway it needs an admin token, and is refused outright when there are no tokens.
    """

    def __init__(self, tokens: TokenStore | None, *, peer_certificates: bool) -> None:
        self._tokens = tokens
        self._peer_certificates = peer_certificates
        #: The streaming calls (subscriptions, append streams, replication) running on a token.
        self._streams: set[_Stream] = set()
        #: The tasks ending streams whose token changed (see end_revoked).
        self._ending: set[asyncio.Task[None]] = set()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        need = required_role(method)
        if need is None:
            return handler
        metadata: Any = handler_call_details.invocation_metadata
        if method in PEER_METHODS and self._peer_certificates:
            if not _via_gateway(metadata):
                return _require_peer_certificate(handler)
            if self._tokens is None:
                return _refuse(
                    handler,
                    grpc.StatusCode.UNAUTHENTICATED,
                    "replication is for cluster peers on the direct gRPC port",
                )
        if self._tokens is None:
            return handler
        token = bearer_token(metadata)
        if token is None:
            return _refuse(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "this node requires a token: send 'authorization: Bearer <token>'",
            )
        role = self._tokens.role_of(token)
        if role is None:
            return _refuse(handler, grpc.StatusCode.UNAUTHENTICATED, "the token is not valid")
        refusal = _role_refusal(method, need, role)
        if refusal is not None:
            return _refuse(handler, *refusal)
        if handler.request_streaming or handler.response_streaming:
            return self._tracked(handler, token, method, need)
        return handler

    def _tracked(self, handler: Handler, token: str, method: str, need: Role) -> Handler:
        """`handler`, kept among the streams running on `token` while it runs (see `end_revoked`)."""
        original = _original(handler)
        streams = self._streams

        async def track(context: Ctx) -> _Stream:
            # The token is checked again as the handler starts: grpc.aio may have waited for the
            # request message since the headers were checked, and the tokens may have changed
            # meanwhile (after the change, end_revoked did not see this call yet). No await between
            # the check and the add: a change of the tokens cannot fall between them.
            refusal = self._refusal(token, method, need)
            if refusal is not None:
                await context.abort(*refusal)
            task = asyncio.current_task()
            assert task is not None  # grpc.aio runs each call in a task
            stream = _Stream(token, method, need, context, task)
            streams.add(stream)
            return stream

        if inspect.isasyncgenfunction(original):

            async def stream(request: Any, context: Ctx) -> AsyncIterator[Any]:
                running = await track(context)
                try:
                    async for item in original(request, context):
                        yield item
                finally:
                    streams.discard(running)

            return _with_behavior(handler, stream)

        # grpc.aio takes a streaming handler as an async generator or a coroutine (context.write).
        assert inspect.iscoroutinefunction(original), f"{method}: a streaming handler must be async"

        async def call(request: Any, context: Ctx) -> Any:
            running = await track(context)
            try:
                return await original(request, context)
            finally:
                streams.discard(running)

        return _with_behavior(handler, call)

    def _refusal(self, token: str, method: str, need: Role) -> tuple[grpc.StatusCode, str] | None:
        """Why a call of `method` with `token` is refused by the tokens now in use (None if it is
        not), as a call running on a token that changed is told."""
        assert self._tokens is not None
        return _running_refusal(self._tokens.role_of(token), method, need)

    def end_revoked(self) -> int:
        """End every streaming call whose token no longer allows it, as a new call with that token
        would be refused (UNAUTHENTICATED, or PERMISSION_DENIED for a role that no longer
        suffices); for after the tokens changed. Returns how many are being ended: each is ended
        in a task of its own, so that a caller that does not read holds up no other."""
        if self._tokens is None:
            return 0
        ended = 0
        # Many streams run on one token, and a lookup hashes it and compares it with every stored one.
        roles = {token: self._tokens.role_of(token) for token in {s.token for s in self._streams}}
        for stream in list(self._streams):
            refusal = _running_refusal(roles[stream.token], stream.method, stream.need)
            if refusal is None:
                continue
            self._streams.discard(stream)
            ending = asyncio.create_task(_end_stream(stream, refusal), name=f"ending {stream.method}")
            self._ending.add(ending)
            ending.add_done_callback(self._ending.discard)
            ended += 1
        return ended

    async def close(self) -> None:
        """Wait for the streams being ended (for a node that stops)."""
        await asyncio.gather(*self._ending)


#: How long a stream ended for its token is given to take its status before its handler is stopped
#: anyway: the status waits behind any data the caller has not read yet.
END_STREAM_TIMEOUT = 5.0


async def _end_stream(stream: _Stream, refusal: tuple[grpc.StatusCode, str]) -> None:
    """Send a stream's caller `refusal` as its status and stop the stream's handler."""
    try:
        async with asyncio.timeout(END_STREAM_TIMEOUT):
            await stream.context.abort(*refusal)
    except grpc.aio.AbortError:
        pass  # the status was sent: abort says so by raising this in whoever called it
    except grpc.aio.UsageError:
        return  # the handler is aborting the call itself: let it finish
    except TimeoutError:
        log.warning("%s: its caller did not take the status in time; its handler is stopped", stream.method)
    except Exception as exc:  # grpc raises its own internal error for a call that has ended already
        log.info("%s had ended before it could be told its token changed: %r", stream.method, exc)
    stream.task.cancel()


# -- webhook SSRF policy -------------------------------------------------------------------


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
    400); `client()` makes the HTTP client used for delivery, whose transport applies the same
    policy on every attempt (a refusal is a failed attempt, retried with backoff)."""

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

    def transport(self) -> httpx.AsyncBaseTransport:
        """The delivery transport (see `potboiler.server.webhook_http.delivery_transport`)."""
        from potboiler.server.webhook_http import delivery_transport  # httpx is imported only when needed

        return delivery_transport(self)


class PeerToken:
    """The token a node presents when dialing peers, and the file it was read from, if any."""

    def __init__(self, token: str, path: Path | None = None, version: FileVersion | None = None) -> None:
        #: The file it was read from, if any, and the version read.
        self.path = path
        self.version = version
        self.token = self._checked(token)

    @classmethod
    def load(cls, path: Path) -> PeerToken:
        """The token of a peer token file (its text, stripped)."""
        text, version = read_versioned(path, "peer token file")
        if not (token := text.strip()):
            raise SecurityConfigError(f"the peer token file {path} is empty")
        return cls(token, path, version)

    def reload(self) -> None:
        """Read the file again and take its token (for the calls dialed from now on).
        SecurityConfigError, keeping this token, if it cannot be read or holds none."""
        if self.path is None:
            raise SecurityConfigError("the peer token was not read from a file")
        loaded = PeerToken.load(self.path)
        self.token, self.version = loaded.token, loaded.version

    def _checked(self, token: str) -> str:
        # It travels as a header value: a space, a line break or a non-ASCII character would make
        # grpc drop the header and leave the dialed call hanging.
        if not _TOKEN_TEXT.fullmatch(token):
            source = f"the peer token file {self.path}" if self.path else "the peer token"
            raise SecurityConfigError(
                f"{source} holds more than one token, or characters a token cannot have "
                "(only printable ASCII without spaces)"
            )
        return token


_TOKEN_TEXT = re.compile(r"[\x21-\x7e]+")


def tls_context_for(ca: Path | None) -> ssl.SSLContext | bool:
    """An httpx `verify` value: the given CA, else the system's."""
    return ssl.create_default_context(cafile=str(ca)) if ca is not None else True


# -- everything together -------------------------------------------------------------------


@dataclass(frozen=True)
class SecurityConfig:
    """A node's security settings (all off by default)."""

    #: mTLS between nodes (the direct gRPC port, replication, Envoy's upstream).
    tls: TlsFiles | None = None
    #: Bearer tokens every call needs (health checks excepted).
    tokens: TokenStore | None = None
    #: Token sent when dialing peers (needed when they check tokens and mTLS is off).
    peer_token: PeerToken | None = None
    #: HTTPS on the REST ports (Envoy terminates TLS).
    rest_tls: RestTlsFiles | None = None
    webhook_policy: WebhookPolicy = field(default_factory=WebhookPolicy)

    def auth_interceptor(self) -> AuthInterceptor | None:
        """The server interceptor these settings need (None when auth and mTLS are off)."""
        if self.tokens is None and self.tls is None:
            return None
        return AuthInterceptor(self.tokens, peer_certificates=self.tls is not None)

    def warnings(self) -> list[str]:
        """What in these settings will not work as an operator likely means it."""
        if self.tokens is not None and self.tls is None and self.peer_token is None:
            return [
                "auth tokens are on, but neither mTLS (--tls-*) nor a peer token (--peer-token-file) "
                "is: peers checking tokens refuse this node's replication streams (UNAUTHENTICATED)"
            ]
        if self.tokens is None or self.peer_token is None or self.tls is not None:
            return []
        role = self.tokens.role_of(self.peer_token.token)
        if role is None:
            return [
                "the peer token is not in this node's tokens file: peers with the same file refuse "
                "its replication streams (replicating needs an admin token)"
            ]
        if not role.allows(Role.ADMIN):
            return [
                f"the peer token is a {role.value} token in this node's tokens file: peers with the "
                "same file refuse its replication streams (replicating needs an admin token)"
            ]
        return []

    def peer_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata of the calls dialed to peers."""
        return (("authorization", f"Bearer {self.peer_token.token}"),) if self.peer_token else ()

    def peer_channel(self, target: str, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
        """A channel to a peer's direct gRPC port: mTLS when configured, else plaintext."""
        if self.tls is not None:
            return grpc.aio.secure_channel(target, self.tls.channel_credentials(), options=options)
        return grpc.aio.insecure_channel(target, options=options)
