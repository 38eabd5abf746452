"""Requests that are not a valid protobuf message get INVALID_ARGUMENT, like every other bad input.

grpc.aio parses each request with its handler's deserializer before any servicer code runs, and
answers UNKNOWN (a server-error status) when that raises: garbage bytes, invalid UTF-8 in a string
field, data nested deeper than protobuf's decoding limit. `GuardedServer` registers every handler
with a deserializer that turns such a failure into an `Undecodable` value instead, and a behaviour
that answers it with INVALID_ARGUMENT (in a request stream, the bad message raises
`UndecodableRequest`, an InvalidArgument, where the servicer reads it).
Handlers are wrapped once, at registration, so a good request pays one isinstance check.

Handlers registered here also serialize the answers of the RPCs that have a REST binding (what Envoy
transcodes to JSON) with each object's keys sorted: a Struct's fields are a protobuf map, written in
no particular order, so the same entry or value printed differently on every node (Envoy prints them
in wire order). Sorting costs about 1 µs per answer. Other answers (gRPC clients read maps as maps)
are serialized as they are, and one a servicer gives as bytes is sent as it is: SubscribeEntries
writes its messages from the entries as stored (`potboiler.server.wire`), which parsing into a
message only for grpc to serialize it again would cost as much again.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import grpc
from google.api import annotations_pb2
from google.protobuf.message import DecodeError, Message

from potboiler.server.errors import InvalidArgument
from potboiler.server.grpc_context import Ctx, Handler
from potboiler.server.grpc_errors import abort
from potboiler.v1 import log_pb2


class Undecodable:
    """A request that failed to parse, with the parser's reason."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _deserializer(parse: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if parse is None:
        return None

    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except (DecodeError, UnicodeDecodeError) as error:
            return Undecodable(str(error) or type(error).__name__)

    return deserialize


class UndecodableRequest(InvalidArgument):
    """A request (or a message of a request stream) is not valid protobuf. In a stream it is raised
    from the request iterator, so the servicer handles it like its own validation errors (e.g.
    acknowledging what came before)."""

    def __init__(self, request: Undecodable) -> None:
        super().__init__(f"the request is not a valid protobuf message: {request.reason}")


async def _refuse(context: Ctx, request: Undecodable) -> None:
    await abort(context, UndecodableRequest(request))


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise UndecodableRequest(request)
        yield request


def _serialize_sorted(response: Message) -> bytes:
    return response.SerializeToString(deterministic=True)


def _serialize_or_pass(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """`serialize`, but an answer given as bytes (serialized already) is sent as it is."""
    if serialize is None:
        return None

    def serialize_or_pass(response: Any) -> bytes:
        return response if type(response) is bytes else serialize(response)

    return serialize_or_pass


@functools.cache
def transcoded(method: str) -> bool:
    """Whether the RPC `method` (`/package.Service/Method`, as grpc names it) has a REST binding: its
    answers are printed as JSON by Envoy."""
    try:
        # The pool every generated module (ours, grpc's health and reflection) registers with.
        found = log_pb2.DESCRIPTOR.pool.FindMethodByName(method.lstrip("/").replace("/", "."))
    except KeyError:  # not one of the API's (or not imported): nothing to go by
        return False
    return bool(found.GetOptions().HasExtension(annotations_pb2.http))


#: Requests read as a twin of their type (the same bytes, some fields kept serialized), which the
#: servicer gets: appends keep each entry's data as the bytes the client sent (see
#: `potboiler.v1.SerializedAppendRequest`).
_READ_AS: dict[str, type[Message]] = {
    "/potboiler.v1.LogService/AppendEntries": log_pb2.SerializedAppendRequest,
    "/potboiler.v1.LogService/AppendEntryStream": log_pb2.SerializedAppendRequest,
}


def _read_as(
    parse: Callable[[bytes], Any] | None, twin: type[Message] | None
) -> Callable[[bytes], Any] | None:
    """`parse`, or, for a request read as `twin`: parse it (which checks every field of it), then
    read it as the twin."""
    if parse is None or twin is None:
        return parse
    read = twin.FromString

    def parse_then_read(raw: bytes) -> Any:
        parse(raw)
        return read(raw)

    return parse_then_read


def guard(handler: Handler, method: str) -> Handler:
    """`handler` (of the RPC `method`, `/package.Service/Method`) with undecodable requests answered
    INVALID_ARGUMENT, and its answers serialized with sorted map keys if the RPC has a REST binding."""
    # The behaviours are coroutine functions (grpc.aio), which grpc's type stubs do not describe.
    parse = _deserializer(_read_as(handler.request_deserializer, _READ_AS.get(method)))
    serialize = _serialize_sorted if transcoded(method) else _serialize_or_pass(handler.response_serializer)
    if handler.unary_unary is not None:
        unary_unary: Any = handler.unary_unary

        async def unary_unary_guarded(request: Any, context: Ctx) -> Any:
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary_guarded, parse, serialize)
    if handler.unary_stream is not None:
        unary_stream: Any = handler.unary_stream
        if not inspect.isasyncgenfunction(unary_stream):  # a coroutine writing with context.write

            async def unary_stream_writer(request: Any, context: Ctx) -> None:
                if isinstance(request, Undecodable):
                    await _refuse(context, request)
                await unary_stream(request, context)

            return grpc.unary_stream_rpc_method_handler(unary_stream_writer, parse, serialize)

        async def unary_stream_guarded(request: Any, context: Ctx) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await _refuse(context, request)
            async for response in unary_stream(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream_guarded, parse, serialize)
    if handler.stream_unary is not None:
        stream_unary: Any = handler.stream_unary

        async def stream_unary_guarded(requests: AsyncIterator[Any], context: Ctx) -> Any:
            try:
                return await stream_unary(_checked(requests), context)
            except UndecodableRequest as error:  # the servicer did not handle it
                await abort(context, error)

        return grpc.stream_unary_rpc_method_handler(stream_unary_guarded, parse, serialize)
    stream_stream: Any = handler.stream_stream
    assert stream_stream is not None, "a handler has one behaviour"
    if not inspect.isasyncgenfunction(stream_stream):  # a coroutine reading and writing via context

        async def stream_stream_writer(requests: AsyncIterator[Any], context: Ctx) -> None:
            try:
                await stream_stream(_checked(requests), context)
            except UndecodableRequest as error:
                await abort(context, error)

        return grpc.stream_stream_rpc_method_handler(stream_stream_writer, parse, serialize)

    async def stream_stream_guarded(requests: AsyncIterator[Any], context: Ctx) -> AsyncIterator[Any]:
        try:
            async for response in stream_stream(_checked(requests), context):
                yield response
        except UndecodableRequest as error:
            await abort(context, error)

    return grpc.stream_stream_rpc_method_handler(stream_stream_guarded, parse, serialize)


class _GuardedGeneric(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler) -> None:
        self._inner = inner
        self._guarded: dict[str, Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method = handler_call_details.method
        if (found := self._guarded.get(method)) is not None:
            return found
        handler = self._inner.service(handler_call_details)
        if handler is None:
            return None
        self._guarded[method] = guarded = guard(handler, method)
        return guarded


class GuardedServer(grpc.aio.Server):
    """A view of `server` for registering servicers (the generated `add_*_to_server` functions):
    handlers registered through it are guarded, and served as generic handlers only; everything else
    is the server's own."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server
        self._generic: list[_GuardedGeneric] = []
        #: method -> its handler, as `method_handler` found it.
        self._found: dict[str, Handler] = {}

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        guarded = [_GuardedGeneric(h) for h in generic_rpc_handlers]
        self._generic += guarded
        self._found.clear()
        self._server.add_generic_rpc_handlers(guarded)

    def method_handler(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        """The guarded handler registered here for the call, as the server would find it (for calls
        that reach the node by another way than grpc's server: potboiler.server.rest_bridge)."""
        method = handler_call_details.method
        if (found := self._found.get(method)) is not None:
            return found
        for generic in self._generic:
            if (found := generic.service(handler_call_details)) is not None:
                self._found[method] = found
                return found
        return None

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Handler]
    ) -> None:
        """Not passed on: the generic handler each `add_*_to_server` also registers serves these
        methods. grpc.aio's server keeps a pending call request per registered method and waits on
        all of them (asyncio.wait) for every call it receives; with a node's 60-odd methods that cost
        about 15% of the node's CPU per unary call."""

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        return self._server.add_secure_port(address, server_credentials)

    async def start(self) -> None:
        await self._server.start()

    async def stop(self, grace: float | None) -> None:
        await self._server.stop(grace)

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return await self._server.wait_for_termination(timeout)
