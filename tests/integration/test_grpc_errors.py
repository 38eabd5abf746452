"""How domain errors end a call (server/grpc_errors.py), seen by a real gRPC client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from potboiler.server import rest
from potboiler.server.errors import Conflict, Contended, InvalidArgument, NotFound, TooLarge, Unavailable
from potboiler.server.grpc_errors import HTTP_OF_CODE, STATUS, http_status_of, unary

pytestmark = pytest.mark.asyncio


class Servicer:
    @unary
    async def CreateThenFail(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        rest.created(context, "/somewhere")  # as a servicer might, before a later step fails
        raise NotFound("gone meanwhile")

    @unary
    async def TooBig(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        raise TooLarge("too big")

    @unary
    async def LongMessage(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        raise InvalidArgument("bad: " + "\u00e9\U0001f600" * 3000)


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    servicer = Servicer()
    handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name))
        for name in ("CreateThenFail", "TooBig", "LongMessage")
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Errors", handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(None)


async def test_an_error_drops_rest_metadata_set_before_it(channel: grpc.aio.Channel) -> None:
    # Else Envoy's Lua would turn the 404 into a 201 (or a 204 that keeps its body).
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/test.Errors/CreateThenFail"
    )
    call = method(b"")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    metadata = dict(list(error.value.trailing_metadata() or ()))
    assert rest.HTTP_CODE_HEADER not in metadata and "location" not in metadata


async def test_too_large_carries_its_http_status(channel: grpc.aio.Channel) -> None:
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Errors/TooBig")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await method(b"")
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(list(error.value.trailing_metadata() or ()))[rest.HTTP_CODE_HEADER] == "413"


async def test_a_long_message_is_cut_short_to_reach_a_default_client(channel: grpc.aio.Channel) -> None:
    """Clients refuse metadata past 8 KiB, and gRPC sends each byte beyond ASCII as three."""
    method: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/test.Errors/LongMessage")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await method(b"")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.value.details() or ""
    assert details.startswith("bad: \u00e9\U0001f600") and details.endswith("...")
    assert len(details.encode()) <= 2000


async def test_every_domain_error_has_the_http_status_rest_answers_it_with() -> None:
    """For a servicer that writes the error's body itself (the KV browser's pages)."""
    assert set(STATUS.values()) <= set(HTTP_OF_CODE)
    assert http_status_of(InvalidArgument("x")) == 400
    assert http_status_of(NotFound("x")) == 404
    assert http_status_of(Unavailable("x")) == 503
    assert http_status_of(TooLarge("x")) == 413  # not RESOURCE_EXHAUSTED's 429
    assert http_status_of(Contended("x")) == 409 and http_status_of(Conflict("x")) == 400
