"""The services a full node runs beside the log, by name (also their data folder under --data-dir).

Each module named here has `create(context: NodeContext) -> NodeService`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from potboiler.server.plugin import NodeContext, NodeService

#: name -> module providing `create`.
SERVICES: dict[str, str] = {"kv": "potboiler.kv.service", "pigtail": "potboiler.pigtail.service"}

ServiceFactory = Callable[[NodeContext], NodeService]


def default_services() -> list[tuple[str, ServiceFactory]]:
    """(name, factory) of every service a full node runs."""
    out = []
    for name, module in SERVICES.items():
        factory: ServiceFactory = importlib.import_module(module).create
        out.append((name, factory))
    return out
