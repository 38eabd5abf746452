"""One table from domain errors to gRPC status codes, and the decorators servicers use with it."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NoReturn, TypeVar

import grpc

from potboiler.server.errors import (
    MAX_MESSAGE_BYTES,
    AlreadyExists,
    Conflict,
    Contended,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PotboilerError,
    Removed,
    TooLarge,
    Unavailable,
)
from potboiler.server.grpc_context import Ctx
from potboiler.server.rest import HTTP_CODE_HEADER

STATUS: dict[type[PotboilerError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    Conflict: grpc.StatusCode.FAILED_PRECONDITION,
    Removed: grpc.StatusCode.PERMISSION_DENIED,
    # ABORTED (a concurrency conflict), which Envoy's transcoder answers as HTTP 409.
    Contended: grpc.StatusCode.ABORTED,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Self = TypeVar("Self")


def status_of(error: PotboilerError) -> grpc.StatusCode:
    """The gRPC status of a domain error (its nearest mapped base class)."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INVALID_ARGUMENT


#: REST statuses that differ from Envoy's mapping of the gRPC code (RESOURCE_EXHAUSTED would be 429).
HTTP_OVERRIDE: dict[type[PotboilerError], str] = {TooLarge: "413"}
#: The HTTP status Envoy's gRPC-JSON transcoder answers for each gRPC code of STATUS.
HTTP_OF_CODE: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAVAILABLE: 503,
}


def http_status_of(error: PotboilerError) -> int:
    """The HTTP status REST answers a domain error with, for a servicer that writes the error's body
    itself (a browser page) instead of ending the call with it."""
    http = HTTP_OVERRIDE.get(type(error))
    return int(http) if http is not None else HTTP_OF_CODE[status_of(error)]


async def abort(context: Ctx, error: PotboilerError) -> NoReturn:
    """End the call with the error's status and message."""
    http = HTTP_OVERRIDE.get(type(error))
    # Set, not passed to abort(), which would keep metadata set earlier (say, a 201 before a
    # failure) when given none.
    context.set_trailing_metadata(((HTTP_CODE_HEADER, http),) if http is not None else ())
    message = str(error)
    encoded = message.encode()
    if len(encoded) > MAX_MESSAGE_BYTES:  # a safety net: messages show values with `quoted`
        message = encoded[: MAX_MESSAGE_BYTES - 3].decode(errors="ignore") + "..."
    await context.abort(status_of(error), message)
    raise AssertionError("unreachable")  # context.abort raises


def unary(
    method: Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    """Map domain errors raised by a unary (or client-streaming) RPC to their status."""

    @functools.wraps(method)
    async def wrapper(self: Self, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            return await method(self, request, context)
        except PotboilerError as error:
            await abort(context, error)

    return wrapper


def streaming(
    method: Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]],
) -> Callable[[Self, Req, grpc.aio.ServicerContext[Req, Resp]], AsyncIterator[Resp]]:
    """Map domain errors raised by a server-streaming RPC to their status."""

    @functools.wraps(method)
    async def wrapper(
        self: Self, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> AsyncIterator[Resp]:
        try:
            async for item in method(self, request, context):
                yield item
        except PotboilerError as error:
            await abort(context, error)

    return wrapper


#: What grpc.aio logs, at ERROR with a traceback, when a message of a server stream cannot be sent
#: because its client cancelled it or went away.
_CLIENT_GONE = "ExecuteBatchError raised in core by servicer method"


class ClientGoneFilter(logging.Filter):
    """Keeps grpc.aio's report of a stream whose client went away (an ordinary end of a
    subscription: a client that read what it wanted and left) at DEBUG, in one line: at ERROR, with
    a traceback, it hid real errors in the node's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(_CLIENT_GONE):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.exc_info, record.exc_text = None, None
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def quiet_client_gone() -> None:
    """Install `ClientGoneFilter` on grpc's logger (once)."""
    logger = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, ClientGoneFilter) for f in logger.filters):
        logger.addFilter(ClientGoneFilter())
