"""Fixtures of the security tests: certificates made with trustme, token files and node processes.

Import the helpers in a test module as `from tests.security.conftest import ...` (this file registers
itself under that name, as tests/conftest.py does).

- `pki`: a cluster CA with a node certificate for 127.0.0.1/localhost, and a second, unrelated CA
  with a certificate of its own (a rogue node), all as PEM files.
- `tokens`: a tokens file with one read, one write and one admin token.
- `nodes`: starts `potboiler node` processes on free ports (a `tests.node_processes.NodeProcesses`);
  every one is stopped at teardown.

The webhook receiver the tests use is tests/webhook_receiver.py's (the `receiver` fixture is in
tests/conftest.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import trustme

from potboiler.server.tokens import Role, token_line
from tests.node_processes import NodeProcesses

sys.modules.setdefault("tests.security.conftest", sys.modules[__name__])


@dataclass(frozen=True)
class Identity:
    """A CA and a certificate it issued, as PEM files."""

    ca: Path
    cert: Path
    key: Path

    def node_args(self) -> list[str]:
        """The mTLS flags of a node using this identity."""
        return ["--tls-ca", str(self.ca), "--tls-cert", str(self.cert), "--tls-key", str(self.key)]

    def rest_args(self) -> list[str]:
        """The HTTPS flags of a node serving REST with this certificate."""
        return ["--rest-tls-cert", str(self.cert), "--rest-tls-key", str(self.key)]

    def channel_credentials(self, client_cert: bool = True) -> grpc.ChannelCredentials:
        """Credentials that trust this CA (and present this certificate, unless client_cert=False)."""
        if not client_cert:
            return grpc.ssl_channel_credentials(self.ca.read_bytes())
        return grpc.ssl_channel_credentials(
            self.ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes()
        )


def make_identity(folder: Path, *names: str) -> Identity:
    """A new CA and a certificate for `names` (host names or IP addresses), written to `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    issued = ca.issue_cert(*names)
    identity = Identity(folder / "ca.pem", folder / "cert.pem", folder / "key.pem")
    ca.cert_pem.write_to_path(str(identity.ca))
    issued.private_key_pem.write_to_path(str(identity.key))
    identity.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    return identity


@dataclass(frozen=True)
class Pki:
    """The cluster's identity, and a rogue one from another CA."""

    cluster: Identity
    rogue: Identity


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """Certificates for 127.0.0.1 and localhost from two unrelated CAs."""
    return Pki(
        make_identity(tmp_path / "pki", "127.0.0.1", "localhost"),
        make_identity(tmp_path / "rogue-pki", "127.0.0.1", "localhost"),
    )


READ_TOKEN = "read-token-0123456789"
WRITE_TOKEN = "write-token-9876543210"
ADMIN_TOKEN = "admin-token-5555555555"


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    """A tokens file with READ_TOKEN (read), WRITE_TOKEN (write) and ADMIN_TOKEN (admin), stored
    hashed."""
    path = tmp_path / "tokens"
    lines = [
        "# role read, then write, then admin",
        token_line(READ_TOKEN, Role.READ),
        token_line(WRITE_TOKEN, Role.WRITE),
        token_line(ADMIN_TOKEN, Role.ADMIN),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[NodeProcesses]:
    """Factory of real node processes (each with its Envoy), all stopped at teardown."""
    with NodeProcesses(tmp_path) as factory:
        yield factory
