"""The node's unary calls for Envoy's REST listeners, over HTTP/1.1 on a unix socket (the wire
format is potboiler.server.grpc_http1's).

A REST request reaches the node as a unary gRPC call that Envoy's transcoder made of it. Through
grpc.aio each such call costs the node about 300 µs of CPU before any servicer code runs (HTTP/2
framing, HPACK, the call object, the completion queue), more than the work of an append. Envoy can
carry the same call over HTTP/1.1 instead: the request is the gRPC-framed message in a chunked body,
and the answer is a chunked body whose trailers hold `grpc-status` (or, for an error, a trailers-only
answer: `grpc-status` and `grpc-message` in the headers), which Envoy's codec passes to the
transcoder as an HTTP/2 server's trailers. Parsing that here costs a few µs.

The calls run the very handlers the gRPC server serves (registered through
`potboiler.server.decoding.GuardedServer`), behind the same interceptor (tokens), with a context
that offers what our servicers use of grpc.aio's. The socket is an abstract unix socket (no file
for a temp-file cleaner to remove after days of uptime) that only the node's own user may connect
to (its peer credentials are checked), and every call on it counts as one through the gateway: a
peer's privileges need the direct gRPC port. Streaming RPCs are not served here (REST has none).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NoReturn, TypeAlias, cast

import grpc

from potboiler.server.grpc_context import Handler
from potboiler.server.grpc_http1 import (
    MAX_HEAD_BYTES,
    BadRequest,
    Metadata,
    Request,
    RequestParser,
    answer,
    status_answer,
    unframe,
)

log = logging.getLogger(__name__)

Lookup: TypeAlias = "Callable[[grpc.HandlerCallDetails], Handler | None]"


class _CallDetails(grpc.HandlerCallDetails):
    """What grpc hands an interceptor and a generic handler about a call."""

    def __init__(self, method: str, invocation_metadata: Metadata) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


class BridgeContext:
    """The part of `grpc.aio.ServicerContext` our servicers, interceptor and guards use, for a call
    on the bridge. `abort` raises grpc.aio's own AbortError, so code that lets it pass still does."""

    __slots__ = ("_metadata", "code", "details", "trailing_metadata")

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = metadata
        self.code = grpc.StatusCode.OK
        self.details = ""
        self.trailing_metadata: Sequence[tuple[str, str | bytes]] = ()

    def invocation_metadata(self) -> Metadata:
        return self._metadata

    def set_trailing_metadata(self, trailing_metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self.trailing_metadata = tuple(trailing_metadata)

    async def abort(
        self,
        code: grpc.StatusCode,
        details: str = "",
        trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
    ) -> NoReturn:
        if code == grpc.StatusCode.OK:  # as grpc.aio: aborting with OK is a server error
            code, details = grpc.StatusCode.UNKNOWN, "abort() called with OK"
        self.code, self.details = code, details
        if trailing_metadata:
            self.trailing_metadata = tuple(trailing_metadata)
        raise grpc.aio.AbortError()

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def time_remaining(self) -> float | None:
        """None: Envoy sends REST calls without a gRPC deadline (the route's timeout is its own)."""
        return None

    def auth_context(self) -> dict[str, list[bytes]]:
        """No transport security: a unix socket (a peer's certificate never shows here)."""
        return {}

    def peer_identities(self) -> None:
        return None

    def peer(self) -> str:
        return "unix:envoy"


#: How long a stopping bridge goes on reading and starting calls before it refuses new ones.
STOP_SETTLE_S = 0.05


class RestBridge:
    """Serves unary calls over HTTP/1.1 on a unix socket, for the node's Envoy (see the module)."""

    def __init__(
        self,
        lookup: Lookup,
        interceptor: grpc.aio.ServerInterceptor | None = None,
        *,
        max_body: int,
    ) -> None:
        self._lookup = lookup
        self._interceptor = interceptor
        self.max_body = max_body
        self._server: asyncio.AbstractServer | None = None
        self._address: str | None = None
        self._connections: set[_Connection] = set()
        #: Set by `stop`: requests that arrive from then on are answered UNAVAILABLE.
        self.stopping = False

    async def listen(self, address: str) -> None:
        """Serve on the abstract unix socket `address` (`@name`), unless serving there already:
        called before each start of Envoy. Only processes of this user may call (checked by the
        peer's credentials: an abstract socket has no file, so no file mode, and nothing a
        temp-file cleaner can remove)."""
        if self._address == address and self._server is not None:
            return
        await self._close_server()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(abstract(address))
            loop = asyncio.get_running_loop()
            self._server = await loop.create_unix_server(lambda: _Connection(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._address = address

    async def stop(self, grace: float) -> None:
        """After a moment (STOP_SETTLE_S) in which what was already sent is still taken, take no
        more connections or calls (one that arrives is answered UNAVAILABLE); let the calls running
        finish for up to `grace` seconds, then cancel them, wait (as long again at most) until they
        have ended, and close every connection."""
        # A request Envoy sent before the stop began may wait unread in its connection's socket,
        # on a connection perhaps not even accepted yet: read for a moment more, and its call runs
        # on like the others (else it would be cut, and its client get a 503 for a call sent in
        # time). It takes the loop a few turns to accept a connection and read it.
        await asyncio.sleep(STOP_SETTLE_S)
        self._stop_listening()
        self.stopping = True
        for connection in list(self._connections):
            connection.close_if_idle()
        if calls := self._calls():
            await asyncio.wait(calls, timeout=grace)
        for connection in list(self._connections):
            connection.close()  # cancels its call, if any is still running
        if calls := self._calls():
            await asyncio.wait(calls, timeout=grace)
        await self._close_server()

    def _calls(self) -> list[asyncio.Task[bytes]]:
        """The calls not answered yet: running, or ended with their answer still to be written (a
        connection's `call` is cleared once its answer is written)."""
        return [c.call for c in self._connections if c.call is not None]

    def opened(self, connection: _Connection) -> None:
        self._connections.add(connection)

    def closed(self, connection: _Connection) -> None:
        self._connections.discard(connection)

    def _stop_listening(self) -> None:
        """Take no more connections."""
        if self._server is not None:
            self._server.close()
        self._address = None

    async def _close_server(self) -> None:
        self._stop_listening()
        if self._server is not None:
            # Since Python 3.12.1 this waits for every connection to close: stop closes them first.
            await self._server.wait_closed()
            self._server = None

    async def handler(self, method: str, metadata: Metadata) -> Handler | None:
        """The handler serving `method`, behind the interceptor."""
        details = _CallDetails(method, metadata)
        if self._interceptor is None:
            return self._lookup(details)
        return await self._interceptor.intercept_service(self._found, details)

    async def _found(self, details: grpc.HandlerCallDetails) -> Handler | None:
        """The interceptor's continuation: the handler registered for the call."""
        return self._lookup(details)

    async def call(self, request: Request) -> bytes:
        """Run one call; its HTTP/1.1 answer."""
        context = BridgeContext(request.metadata)
        payload = b""
        try:
            handler = await self.handler(request.method, request.metadata)
            if handler is None or handler.unary_unary is None:
                return status_answer(grpc.StatusCode.UNIMPLEMENTED, "Method not found!", ())
            try:
                message = unframe(request.body)
            except ValueError as error:
                return status_answer(grpc.StatusCode.INTERNAL, str(error), ())
            parse = handler.request_deserializer
            behavior: Callable[[Any, BridgeContext], Awaitable[Any]] = handler.unary_unary  # type: ignore[assignment]
            response = await behavior(parse(message) if parse is not None else message, context)
            serialize = handler.response_serializer
            payload = serialize(response) if serialize is not None else response
        except grpc.aio.AbortError:
            if context.code == grpc.StatusCode.OK:  # not the context's abort: grpc.aio's UNKNOWN too
                context.code, context.details = grpc.StatusCode.UNKNOWN, "the call was aborted"
        except Exception as error:  # as grpc.aio: a servicer's bug is the call's UNKNOWN, logged
            log.exception("the call %s failed", request.method)
            return status_answer(grpc.StatusCode.UNKNOWN, f"Unexpected {type(error)}: {error}", ())
        try:
            if context.code == grpc.StatusCode.OK:
                return answer(payload, context.trailing_metadata)
            return status_answer(context.code, context.details, context.trailing_metadata)
        except ValueError as error:  # metadata HTTP cannot carry: as grpc, the call fails
            log.error("the call %s set metadata that cannot be sent: %s", request.method, error)
            return status_answer(grpc.StatusCode.INTERNAL, "the answer's metadata is not valid", ())


def abstract(address: str) -> str:
    """The socket address of the abstract unix socket `address` (`@name`, as Envoy spells it)."""
    if not address.startswith("@") or len(address) > 107:
        raise ValueError(f"not an abstract unix socket address: {address!r}")
    return "\0" + address[1:]


def _peer_uid(transport: asyncio.BaseTransport) -> int | None:
    """The user id of the process at the other end of a unix socket connection (SO_PEERCRED)."""
    sock = transport.get_extra_info("socket")
    try:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    except (AttributeError, OSError):
        return None
    return int(uid)


class _Connection(asyncio.Protocol):
    """One of Envoy's connections: requests answered one at a time, in order. A connection that
    closes cancels its call, as a gRPC client's cancellation would."""

    def __init__(self, bridge: RestBridge) -> None:
        self._bridge = bridge
        self._parser = RequestParser(bridge.max_body)
        self._transport: asyncio.Transport | None = None
        #: The call running, if any; requests that arrive meanwhile wait in the parser.
        self.call: asyncio.Task[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not its subclasses
        self._bridge.opened(self)
        if (uid := _peer_uid(transport)) != os.getuid():
            log.warning("refused a connection to the REST bridge from user %s", uid)
            self.close()

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        if self.call is None:
            self._next()
        elif self._parser.buffered > self._bridge.max_body + MAX_HEAD_BYTES:
            log.warning("closing a gateway connection: it sent too much while a call ran")
            self.close()

    def _next(self) -> None:
        try:
            request = self._parser.next()
        except BadRequest as error:
            log.warning("closing a gateway connection: %s", error)
            self._end(status_answer(error.code, str(error), ()))
            return
        if request is None:
            return
        if self._bridge.stopping:
            self._end(status_answer(grpc.StatusCode.UNAVAILABLE, "the node is stopping", ()))
            return
        self.call = call = asyncio.get_running_loop().create_task(self._bridge.call(request))
        call.add_done_callback(self._answered)

    def _answered(self, call: asyncio.Task[bytes]) -> None:
        self.call = None
        if self._transport is None:
            return
        if call.cancelled():  # without the connection closing (that cancelled it): no answer
            self.close()
            return
        self._transport.write(call.result())
        self._next()
        if self._bridge.stopping:
            self.close()  # what came after the call was answered UNAVAILABLE

    def _end(self, last: bytes) -> None:
        if self._transport is not None:
            self._transport.write(last)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._bridge.closed(self)
        if self.call is not None:
            self.call.cancel()

    def close_if_idle(self) -> None:
        if self.call is None:
            self.close()

    def close(self) -> None:
        """Close the connection and cancel its call, if one is running."""
        if self.call is not None:
            self.call.cancel()
        if self._transport is not None:
            self._transport.close()
