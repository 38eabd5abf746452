"""A webhook receiver for tests: an HTTP server in a thread, on 127.0.0.1 and a port the OS picks,
that records every POST and answers as the test chooses.

- `Receiver()`: answers 200 with an empty body unless told otherwise: `receiver.answer = lambda path:
  Answer(...)` decides every answer (a status, headers, a body, one without end, or a slow one), and
  `receiver.fail(path)` makes the answers on one path 500 until `receiver.fail(path, False)`.
- `receiver.received(path)`: the requests so far (`Received`: path, headers, body, the status answered,
  when it came); `receiver.accepted(path)` / `accepted_ids(path)`: the JSON bodies answered 2xx, and
  their entries' ids, in arrival order.
- The `receiver` fixture (tests/conftest.py) makes one and closes it at teardown.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Answer:
    """How the receiver answers one request: status, headers and body, after `delay` seconds (a slow
    receiver); `endless` streams a body without end until the client hangs up."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    endless: bool = False
    delay: float = 0.0


@dataclass(frozen=True)
class Received:
    """One request the receiver got (header names in lower case), and the status it answered."""

    path: str
    headers: dict[str, str]
    body: bytes
    status: int
    #: When it arrived (time.monotonic()).
    at: float

    @property
    def host(self) -> str:
        """The Host header ("" without one)."""
        return self.headers.get("host", "")

    @property
    def authorization(self) -> str:
        """The Authorization header ("" without one)."""
        return self.headers.get("authorization", "")

    @property
    def content_type(self) -> str:
        """The Content-Type header ("" without one)."""
        return self.headers.get("content-type", "")

    def json(self) -> Any:
        """The body, parsed as JSON."""
        return json.loads(self.body)


class Receiver:
    """An HTTP server on 127.0.0.1, on a port the OS picks; `answer(path)` decides each answer."""

    def __init__(self, answer: Callable[[str], Answer] = lambda path: Answer()) -> None:
        self.answer = answer
        #: Bytes of `endless` bodies written so far.
        self.bytes_sent = 0
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._failing: set[str] = set()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                at = time.monotonic()
                answer = receiver._answer(self.path)
                headers = {key.lower(): value for key, value in self.headers.items()}
                with receiver._lock:
                    receiver._received.append(Received(self.path, headers, body, answer.status, at))
                if answer.delay:
                    time.sleep(answer.delay)
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

    def _answer(self, path: str) -> Answer:
        with self._lock:
            failing = path in self._failing
        return Answer(500) if failing else self.answer(path)

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._server.server_address[1])

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        """A URL of this receiver."""
        return f"http://{host}:{self.port}{path}"

    def fail(self, path: str, failing: bool = True) -> None:
        """Answer 500 to POSTs on `path` (or stop doing so), whatever `answer` says."""
        with self._lock:
            (self._failing.add if failing else self._failing.discard)(path)

    def received(self, path: str | None = None) -> list[Received]:
        """The requests received so far (on `path`, if given), in arrival order."""
        with self._lock:
            return [r for r in self._received if path is None or r.path == path]

    def accepted(self, path: str | None = None) -> list[Any]:
        """The JSON bodies answered 2xx (on `path`, if given), in arrival order."""
        return [r.json() for r in self.received(path) if 200 <= r.status < 300]

    def accepted_ids(self, path: str | None = None) -> list[str]:
        """The ids of the entries in `accepted(path)`."""
        return [body["id"] for body in self.accepted(path)]

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
