"""WebhooksService: register, deregister and list webhook URLs."""

from __future__ import annotations

from potboiler.server import rest
from potboiler.server.grpc_context import Ctx
from potboiler.server.grpc_errors import unary
from potboiler.server.urls import redacted
from potboiler.server.webhooks import Webhooks
from potboiler.v1 import webhooks_pb2, webhooks_pb2_grpc


class WebhooksServicer(webhooks_pb2_grpc.WebhooksServiceServicer):
    """Thin over `Webhooks`."""

    def __init__(self, webhooks: Webhooks) -> None:
        self._webhooks = webhooks

    @unary
    async def RegisterWebhook(
        self, request: webhooks_pb2.RegisterWebhookRequest, context: Ctx
    ) -> webhooks_pb2.RegisterWebhookResponse:
        await self._webhooks.register(request.url)
        rest.no_content(context)
        return webhooks_pb2.RegisterWebhookResponse()

    @unary
    async def DeregisterWebhook(
        self, request: webhooks_pb2.DeregisterWebhookRequest, context: Ctx
    ) -> webhooks_pb2.DeregisterWebhookResponse:
        self._webhooks.deregister(request.url)
        rest.no_content(context)
        return webhooks_pb2.DeregisterWebhookResponse()

    @unary
    async def ListWebhooks(
        self, request: webhooks_pb2.ListWebhooksRequest, context: Ctx
    ) -> webhooks_pb2.ListWebhooksResponse:
        return webhooks_pb2.ListWebhooksResponse(
            webhooks=[
                webhooks_pb2.Webhook(
                    url=redacted(s.url),
                    delivered_position=s.position,
                    failures=s.failures,
                    last_error=s.last_error,
                    digest=self._webhooks.digest(s.url),
                )
                for s in self._webhooks.states()
            ]
        )
