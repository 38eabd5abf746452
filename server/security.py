"""A node's security settings together (`SecurityConfig`), all optional and off by default (see the
README, "Running it safely"):

- mTLS between nodes and HTTPS on the REST ports (`potboiler.server.tls`);
- client authentication: bearer tokens with roles (`potboiler.server.tokens`), checked on every call
  by a server interceptor (`potboiler.server.auth`);
- webhook SSRF protection (`potboiler.server.webhook_policy`).

Configuration errors (a missing certificate, a malformed token file) raise `SecurityConfigError`
(`potboiler.server.config_files`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from potboiler.server.auth import AuthInterceptor
from potboiler.server.tls import RestTlsFiles, TlsFiles
from potboiler.server.tokens import PeerToken, Role, TokenStore
from potboiler.server.webhook_policy import WebhookPolicy


@dataclass(frozen=True)
class SecurityConfig:
    """A node's security settings (all off by default)."""

    #: mTLS between nodes (the direct gRPC port, replication, Envoy's upstream).
    tls: TlsFiles | None = None
    #: Bearer tokens every call needs (health checks excepted).
    tokens: TokenStore | None = None
    #: Token sent when dialing peers (needed when they check tokens and mTLS is off).
    peer_token: PeerToken | None = None
    #: HTTPS on the REST ports (Envoy terminates TLS).
    rest_tls: RestTlsFiles | None = None
    webhook_policy: WebhookPolicy = field(default_factory=WebhookPolicy)

    def auth_interceptor(self) -> AuthInterceptor | None:
        """The server interceptor these settings need (None when auth and mTLS are off)."""
        if self.tokens is None and self.tls is None:
            return None
        return AuthInterceptor(self.tokens, peer_certificates=self.tls is not None)

    def warnings(self) -> list[str]:
        """What in these settings will not work as an operator likely means it."""
        if self.tokens is not None and self.tls is None and self.peer_token is None:
            return [
                "auth tokens are on, but neither mTLS (--tls-*) nor a peer token (--peer-token-file) "
                "is: peers checking tokens refuse this node's replication streams (UNAUTHENTICATED)"
            ]
        if self.tokens is None or self.peer_token is None or self.tls is not None:
            return []
        role = self.tokens.role_of(self.peer_token.token)
        if role is None:
            return [
                "the peer token is not in this node's tokens file: peers with the same file refuse "
                "its replication streams (replicating needs an admin token)"
            ]
        if not role.allows(Role.ADMIN):
            return [
                f"the peer token is a {role.value} token in this node's tokens file: peers with the "
                "same file refuse its replication streams (replicating needs an admin token)"
            ]
        return []

    def peer_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata of the calls dialed to peers."""
        return (("authorization", f"Bearer {self.peer_token.token}"),) if self.peer_token else ()

    def peer_channel(self, target: str, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
        """A channel to a peer's direct gRPC port: mTLS when configured, else plaintext."""
        if self.tls is not None:
            return grpc.aio.secure_channel(target, self.tls.channel_credentials(), options=options)
        return grpc.aio.insecure_channel(target, options=options)
