"""Client authentication: a gRPC server interceptor (`AuthInterceptor`) checks the bearer token of
every call against the node's `TokenStore`, so REST through Envoy (which forwards the Authorization
header as metadata) and direct gRPC are covered alike. Health checks stay open. Streaming calls are
checked again whenever the tokens change, and ended once their token no longer allows them. With
mTLS on, a peer's verified certificate authenticates replication."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc

from potboiler.server.grpc_context import Ctx, Handler
from potboiler.server.tokens import Role, TokenStore

# The name of the module these were split from: log lines and filters on them stay as they were.
log = logging.getLogger("potboiler.server.security")


#: Header Envoy sets (overwriting any a client sent) on every request it forwards. A call that
#: has it came through the gateway, so the gateway's TLS client certificate does not make it a peer.
GATEWAY_HEADER = "x-potboiler-gateway"
#: Calls open to anyone, whatever the settings (a health check; not its Watch stream, which stays
#: open as long as the caller likes, holding the node's memory).
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check"})
#: Read-only services beside ours.
READ_PREFIXES = ("/grpc.reflection.", "/grpc.health.v1.Health/")
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
    if method in OPEN_METHODS:
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
                "this node requires a token: send it in the header 'authorization: Bearer TOKEN'",
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
