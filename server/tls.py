"""TLS material: a node's mTLS identity between nodes (`TlsFiles`): the node's direct gRPC server
requires a client certificate signed by the cluster CA, and replication dials peers with the node's
certificate; the certificate Envoy serves the REST ports with (`RestTlsFiles`); and the CA a CLI
command trusts (`tls_context_for`). A file that cannot be read or is not PEM raises
`SecurityConfigError`."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from potboiler.server.config_files import SecurityConfigError


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise SecurityConfigError(f"the {what} {path} is not a PEM file")
    return data


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files of a node's mTLS identity: the cluster CA, the node's certificate (chain) and
    its private key. The certificate must name the host of the node's URL (a DNS or IP SAN),
    since peers dial that host and check the name."""

    ca: Path
    cert: Path
    key: Path

    def __post_init__(self) -> None:
        for path, what in ((self.ca, "CA certificate"), (self.cert, "certificate"), (self.key, "key")):
            _read_pem(path, what)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials of the node's gRPC server: its certificate, and client certificates
        required and verified against the cluster CA."""
        return grpc.ssl_server_credentials(
            [(_read_pem(self.key, "key"), _read_pem(self.cert, "certificate"))],
            root_certificates=_read_pem(self.ca, "CA certificate"),
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials to dial a peer: trust the cluster CA, present the node's certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read_pem(self.ca, "CA certificate"),
            private_key=_read_pem(self.key, "key"),
            certificate_chain=_read_pem(self.cert, "certificate"),
        )

    def resolved(self) -> TlsFiles:
        """The same files as absolute paths (Envoy runs in another directory)."""
        return TlsFiles(self.ca.resolve(), self.cert.resolve(), self.key.resolve())


@dataclass(frozen=True)
class RestTlsFiles:
    """Certificate (chain) and key with which Envoy serves the REST ports over HTTPS."""

    cert: Path
    key: Path

    def __post_init__(self) -> None:
        _read_pem(self.cert, "REST certificate")
        _read_pem(self.key, "REST key")

    def resolved(self) -> RestTlsFiles:
        """The same files as absolute paths."""
        return RestTlsFiles(self.cert.resolve(), self.key.resolve())


def tls_context_for(ca: Path | None) -> ssl.SSLContext | bool:
    """An httpx `verify` value: the given CA, else the system's."""
    return ssl.create_default_context(cafile=str(ca)) if ca is not None else True
