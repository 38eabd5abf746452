"""The type servicers take a call's context as."""

from __future__ import annotations

from typing import Any

import grpc

#: The context of any call, whatever its request and response types.
Ctx = grpc.aio.ServicerContext[Any, Any]
