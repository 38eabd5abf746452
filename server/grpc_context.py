"""The types our server code names grpc's calls and handlers by."""

from __future__ import annotations

from typing import Any, TypeAlias

import grpc

#: The context of any call, whatever its request and response types.
Ctx = grpc.aio.ServicerContext[Any, Any]
#: A method handler, whatever its request and response types (a string: grpc's stubs only).
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
