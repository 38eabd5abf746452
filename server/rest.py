"""How servicers shape REST answers through Envoy.

gRPC has no 201 or 204, so a servicer sends initial metadata `x-http-code` (and `location`); the
Lua filter in gateway/envoy.yaml turns it into the HTTP status and header and empties 204 bodies.
Plain gRPC clients see only harmless metadata.
"""

from __future__ import annotations

from typing import Any

import grpc

HTTP_CODE_HEADER = "x-http-code"


async def created(context: grpc.aio.ServicerContext[Any, Any], location: str) -> None:
    """Answer REST with 201 Created and a Location header."""
    await context.send_initial_metadata(((HTTP_CODE_HEADER, "201"), ("location", location)))


async def no_content(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """Answer REST with 204 No Content."""
    await context.send_initial_metadata(((HTTP_CODE_HEADER, "204"),))
