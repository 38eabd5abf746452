"""Which answers are serialized with sorted map keys: those of the RPCs Envoy prints as JSON."""

from __future__ import annotations

import importlib
import pkgutil

import grpc
import pytest
from google.api import annotations_pb2
from google.protobuf import struct_pb2

# Imported for the descriptors they register.
import potboiler.v1
import potboiler.v1.core_rest_pb2
import potboiler.v1.log_pb2
from potboiler.server.decoding import GuardedServer, guard, transcoded
from potboiler.server.rest_routes import descriptor_set


@pytest.mark.parametrize(
    ("method", "rest"),
    [
        ("/potboiler.v1.CoreRestService/GetLogEntry", True),
        ("/potboiler.v1.CoreRestService/PostLogEntry", True),
        ("/potboiler.v1.LogService/SubscribeEntries", False),
        ("/potboiler.v1.LogService/AppendEntryStream", False),
        ("/grpc.health.v1.Health/Check", False),
        ("/no.Such/Method", False),
    ],
)
def test_only_rpcs_with_a_rest_binding_are_transcoded(method: str, rest: bool) -> None:
    assert transcoded(method) is rest


def test_every_rpc_of_the_api_is_transcoded_exactly_when_it_has_a_rest_binding() -> None:
    # From the descriptor set Envoy reads (every service, KV's and Pigtail's too), each service's
    # module imported as the node does before it serves a call.
    for module in pkgutil.iter_modules(potboiler.v1.__path__):
        if module.name.endswith("_pb2"):
            importlib.import_module(f"potboiler.v1.{module.name}")
    for file in descriptor_set().file:
        for service in file.service:
            for method in service.method:
                bound = method.options.HasExtension(annotations_pb2.http)
                assert transcoded(f"/{file.package}.{service.name}/{method.name}") is bound, method.name


def handler_serializing_as(method: str) -> grpc.RpcMethodHandler:  # type: ignore[type-arg]
    async def answer(request: object, context: object) -> struct_pb2.Struct:
        return struct_pb2.Struct()

    plain = grpc.unary_unary_rpc_method_handler(
        answer, struct_pb2.Struct.FromString, struct_pb2.Struct.SerializeToString
    )
    return guard(plain, method)


def test_rest_answers_print_their_keys_sorted() -> None:
    value = struct_pb2.Struct()
    for key in ["zeta", "alpha", "mu", "beta", "omega", "kappa"]:
        value.fields[key].number_value = 1
    serialize = handler_serializing_as("/potboiler.v1.CoreRestService/GetLogEntry").response_serializer
    assert serialize is not None
    assert serialize(value) == value.SerializeToString(deterministic=True)
    # Any other RPC's answers are serialized as grpc would (no sorting on the hot paths), and one a
    # servicer gives serialized already (SubscribeEntries's) is sent as it is.
    other = handler_serializing_as("/potboiler.v1.LogService/GetEntry").response_serializer
    assert other is not None
    assert other(value) == value.SerializeToString()
    assert other(b"\x0a\x00") == b"\x0a\x00"


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def test_method_handler_finds_the_guarded_handler_the_server_would_serve() -> None:
    server = GuardedServer(grpc.aio.server())  # never started

    async def echo(request: bytes, context: object) -> bytes:
        return request

    def service(name: str) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(name, {"Echo": grpc.unary_unary_rpc_method_handler(echo)})

    server.add_generic_rpc_handlers([service("a.A")])
    first = server.method_handler(_Details("/a.A/Echo"))
    assert first is not None and first.unary_unary is not echo  # guarded
    assert server.method_handler(_Details("/a.A/Echo")) is first
    assert server.method_handler(_Details("/b.B/Echo")) is None
    server.add_generic_rpc_handlers([service("b.B")])  # registered later: found too
    assert server.method_handler(_Details("/b.B/Echo")) is not None
