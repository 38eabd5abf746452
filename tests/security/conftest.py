"""Fixtures of the security tests: certificates made with trustme, token files, node processes, and
a webhook receiver.

Import the helpers in a test module as `from tests.security.conftest import ...` (this file registers
itself under that name, as tests/conftest.py does).

- `pki`: a cluster CA with a node certificate for 127.0.0.1/localhost, and a second, unrelated CA
  with a certificate of its own (a rogue node), all as PEM files.
- `tokens`: a tokens file with one read, one write and one admin token.
- `nodes`: starts `potboiler node` processes on free ports; every one is stopped at teardown.
- `Receiver`: an HTTP server on 127.0.0.1 (port from the OS) whose answers a test chooses.
"""

from __future__ import annotations

import http.server
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme

from potboiler.server.ports import Ports
from potboiler.server.processes import NodeProcess, find_base_port
from potboiler.server.tokens import Role, token_line

sys.modules.setdefault("tests.security.conftest", sys.modules[__name__])

#: How long a node may take to answer REST after its start (slow, loaded CI machines).
START_TIMEOUT = 60.0
START_ATTEMPTS = 3


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


class Nodes:
    """Starts `potboiler node` processes; `stop_all()` stops them (the fixture does)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[NodeProcess] = []

    def __call__(
        self,
        name: str,
        *,
        peers: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        base_port: int | None = None,
    ) -> NodeProcess:
        """A node with data in root/name, started and ready (moved to fresh ports if its ports
        were taken by another test process meanwhile)."""
        node = NodeProcess(
            self.root / name, base_port or find_base_port(), peers=peers, extra_args=extra_args
        )
        self.started.append(node)
        return self.start(node, may_move=base_port is None)

    def start(self, node: NodeProcess, may_move: bool = False) -> NodeProcess:
        """(Re)start a node and wait until it serves."""
        for attempt in range(START_ATTEMPTS):
            log_size = node.log_file.stat().st_size if node.log_file.exists() else 0
            try:
                node.start(timeout=START_TIMEOUT)
                return node
            except (RuntimeError, TimeoutError):
                node.stop()
                new_log = node.log_file.read_bytes()[log_size:].decode(errors="replace")
                if not may_move or "in use" not in new_log or attempt == START_ATTEMPTS - 1:
                    raise
                node.ports = Ports(find_base_port())
        raise AssertionError("unreachable")

    def stop_all(self) -> list[str]:
        """Stop every node started (SIGTERM, then SIGKILL); returns problems found."""
        problems = []
        for node in reversed(self.started):
            try:
                node.stop()
            except Exception as exc:  # stop the others anyway, then report
                problems.append(f"{node.data_dir}: {exc!r}")
                node.kill()
        return problems


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[Nodes]:
    """Factory of real node processes (each with its Envoy), all stopped at teardown."""
    factory = Nodes(tmp_path)
    try:
        yield factory
    finally:
        problems = factory.stop_all()
        for node in factory.started:
            # Shown only when the test fails, where the logs explain it.
            print(f"--- {node.log_file} (base port {node.ports.base}) ---\n{node.log_tail()}")
        assert not problems, problems


@dataclass
class Answer:
    """How the receiver answers one request: status, headers, and a body (`endless` streams
    without end until the client hangs up)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    endless: bool = False


@dataclass(frozen=True)
class Received:
    """One request the receiver got."""

    path: str
    host: str
    body: bytes
    authorization: str = ""


class Receiver:
    """An HTTP server on 127.0.0.1, on a port the OS picks; `answer(path)` decides each answer."""

    def __init__(self, answer: Callable[[str], Answer] = lambda path: Answer()) -> None:
        self.answer = answer
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self.bytes_sent = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver._lock:
                    receiver._received.append(
                        Received(
                            self.path,
                            self.headers.get("host", ""),
                            body,
                            self.headers.get("authorization", ""),
                        )
                    )
                answer = receiver.answer(self.path)
                self.send_response(answer.status)
                for key, value in answer.headers.items():
                    self.send_header(key, value)
                if answer.endless:
                    self.send_header("content-length", str(1 << 40))
                    self.end_headers()
                    chunk = b"x" * 65536
                    try:
                        while True:
                            self.wfile.write(chunk)
                            with receiver._lock:
                                receiver.bytes_sent += len(chunk)
                    except OSError:
                        self.close_connection = True
                    return
                self.send_header("content-length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="receiver", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._server.server_address[1])

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        """A URL of this receiver."""
        return f"http://{host}:{self.port}{path}"

    def received(self, path: str | None = None) -> list[Received]:
        """The requests received so far (on `path`, if given)."""
        with self._lock:
            return [r for r in self._received if path is None or r.path == path]

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver answering 200 to everything (tests change `receiver.answer`)."""
    r = Receiver()
    try:
        yield r
    finally:
        r.close()
