"""A local, Hugging-Face-Hub-compatible HTTP server for tests, benchmarks, demos and offline work.

Why it exists: streaming weights lazily is all about *how* bytes arrive (range requests, redirects, signed URLs
that expire, retries, a slow or distant link), and the real Hub can be neither reached from CI nor made to
misbehave on purpose. This server speaks enough of the Hub protocol for the real ``huggingface_hub`` client (2.x,
HTTP client ``httpx2``) and ``transformers`` to work against it unchanged, and it adds what the real Hub cannot
give us: a latency and bandwidth model, deterministic fault injection and a request log.

Stdlib only, on purpose: it shares no code with the client it imitates, so a client quirk cannot hide a server
bug. (Importing it through the package still runs ``hf_weightstream/__init__.py``, which imports transformers and
huggingface_hub; those read ``HF_ENDPOINT`` at import time, so a client in the same process must be pointed at
:attr:`HubServer.url` with ``endpoint=`` or by patching ``huggingface_hub.constants``; see ``tests/hubtools.py``.)

Two ways to serve LFS files (``mode``), as read from ``huggingface_hub`` 2.4 and ``docs/hub-today.md``:

- ``"xet"``, today's Hub. ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` answers **302**, and the 302 itself
  carries ``X-Repo-Commit``, ``X-Linked-Etag`` (the sha256), ``X-Linked-Size``, ``X-Xet-Hash`` and
  ``Link: <.../api/models/{repo}/xet-read-token/{commit}>; rel="xet-auth"``. ``Location`` is a signed URL on a
  second host name and port, the "bridge" (``http://localhost:PORT/xet-bridge-us/<repo>/<xet hash>?Expires=...
  &Signature=...``), which serves byte ranges and answers 403 once ``url_ttl`` seconds have passed (or when the
  signature is wrong). Its errors, injected faults included, are S3-style XML documents sent chunked, as S3 and
  CloudFront send theirs. With ``tls=True`` the bridge speaks HTTPS, as the real one does, with a self-signed
  certificate for ``localhost`` made by the ``openssl`` command: clients trust it with ``SSL_CERT_FILE`` set to
  :attr:`HubServer.ca_file`. (The Hub itself stays plain HTTP: huggingface_hub's client is the only one to call it.)
  The ``xet-auth`` route answers a token and a CAS URL, but this server has no Xet CAS:
  ``hf_xet`` cannot download from it, so plain ``huggingface_hub`` downloads need ``HF_HUB_DISABLE_XET=1``, with
  which huggingface_hub follows ``Location`` over HTTP as it does when hf_xet is not installed.
- ``"mirror"`` (default): ``/resolve/`` serves the bytes itself, with ``X-Linked-Etag``/``X-Linked-Size`` for LFS
  files and no Xet headers, like a mirror that does not redirect. Every range request is then a resolve call.
  ``content_range=False`` drops ``Content-Range`` from 206 answers, as some proxies do.

Plain (non-LFS) files are always served by ``/resolve/`` itself, with their git sha1 as ``ETag``.

The link model: ``latency`` seconds before every answer (time to first byte), ``connection_bandwidth``
bytes/second per connection and ``bandwidth`` bytes/second for all bodies together. Faults (:class:`Fault`)
fire on matching requests: an error status (e.g. a 403 on a valid range), a cut or reset connection, a delay, or
a stall in the middle of a body. :meth:`HubServer.resolve_calls` counts ``/resolve/`` requests (the Hub's
rate-limited bucket).

Other routes the client needs: ``GET /api/models/{repo}[/revision/{rev}]`` (``id``, ``sha``, ``siblings``; with
``?blobs=true`` also sizes and ``lfs``), ``GET /api/models/{repo}/tree/{rev}[/{path}]``, ``POST
/api/models/{repo}/paths-info/{rev}`` (form-encoded ``paths``; ``xetHash`` in xet mode). Errors carry the
``X-Error-Code`` huggingface_hub maps to its exceptions (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``, ``GatedRepo``). Served folders are immutable commits; bytes are read from disk at request
time. Left out: other repo types, private repos, branches other than ``main``, tree pagination. Anything else
gets a plain 404 (e.g. the client's best-effort ``GET /api/agent-harnesses``).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import fnmatch
import hashlib
import hmac
import json
import math
import os
import shutil
import socket
import socketserver
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .hub_repo import HttpError, ServedFile, ServedRepo

__all__ = ["Fault", "HubServer", "RequestRecord"]

MODES = ("mirror", "xet")
_LOOPBACK = "127.0.0.1"
_BRIDGE_HOST = "localhost"  # another host name than the Hub's: clients must treat it as a foreign origin
_CHUNK = 256 * 1024  # body chunk without a bandwidth cap
_PACED_CHUNK = 4 << 20  # at most, under a cap: each chunk is ~50 ms of its bandwidth
_IDLE_TIMEOUT_S = 30.0  # an idle keep-alive connection is closed after this
_MAX_REQUESTS_PER_CONNECTION = 1000  # bounds each connection's request loop
_MAX_REQUEST_BODY = 1024 * 1024  # paths-info bodies are tiny; refuse anything large
_STOP_JOIN_TIMEOUT_S = 2.0
_BRIDGE_PREFIX = "xet-bridge-us"
_CAS_PREFIX = "xet-cas-unavailable"
_TOKEN_TTL_S = 3600


# --------------------------------------------------------------------------------------------------
# Public records: request log and faults
# --------------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One request as the server saw it.

    The record is appended *before* the response headers go out and ``bytes_sent`` grows before each
    body chunk is written, so once a client has received a response its record is already complete:
    tests can assert on the log right after a client call returns, without sleeping.
    """

    time: float  # time.monotonic() when the request arrived
    method: str
    path: str  # decoded URL path, without the query
    query: str
    origin: str  # "hub" (API and /resolve/) or "bridge" (the redirect target)
    range: str | None  # the Range header as sent
    authorization: bool  # whether an Authorization header was sent
    status: int | None = None  # None: the connection was reset without a response
    file: str | None = None  # the repo file a /resolve/ or bridge response is about
    bytes_sent: int = 0  # response body bytes handed to the socket
    fault: str | None = None  # which injected fault(s) fired, e.g. "status=503"
    end: float | None = None  # time.monotonic() when the response was done (None while in flight)
    peer: str = ""  # the client's address and port: requests with the same peer came over one connection

    @property
    def is_resolve(self) -> bool:
        """A call to ``/{repo}/resolve/...``: what the Hub's Resolvers rate limit counts."""
        return self.origin == "hub" and "/resolve/" in self.path


@dataclass
class Fault:
    """A deterministic misbehaviour, fired by matching requests.

    Exactly one action per fault: ``status`` (answer with that status, plus ``Retry-After`` when ``retry_after``
    is set), ``truncate_after`` (send that many body bytes, then close the connection), ``reset`` (close the
    socket without any response), ``delay`` (wait that many seconds, then answer normally) or ``stall`` (send
    ``stall_after`` body bytes, go silent for ``stall`` seconds, then send the rest). Matching: ``path`` is an
    :mod:`fnmatch` glob against the decoded URL path (``*`` spans ``/``; bridge paths look like
    ``/xet-bridge-us/<repo>/<xet hash>``, with the file name in the record's ``file``, so ``file`` globs the repo
    file on both origins), ``method``/``origin`` restrict when set, ``ranged_only`` requires a ``Range`` header.

    ``times`` bounds how often it fires (None: never spent); ``every=N`` fires on every N-th matching request
    only, for an "occasional" fault. Truncate and stall faults are only taken by a response that has a body
    (never by a ``HEAD``, a redirect or an empty file). Delay faults stack with the other kinds on one request;
    among status/reset faults the first added wins. ``fired`` counts how often the fault fired.
    """

    path: str = "*"
    file: str | None = None
    method: str | None = None
    origin: str | None = None
    ranged_only: bool = False
    status: int | None = None
    retry_after: int | None = None
    truncate_after: int | None = None
    reset: bool = False
    delay: float | None = None
    stall: float | None = None
    stall_after: int = 0
    times: int | None = 1  # None: never spent
    every: int = 1
    fired: int = field(default=0, init=False)
    seen: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        actions = (self.status, self.truncate_after, self.reset or None, self.delay, self.stall)
        if sum(a is not None for a in actions) != 1:
            raise ValueError("a Fault needs exactly one of status, truncate_after, reset, delay, stall")
        if self.retry_after is not None and self.status is None:
            raise ValueError("retry_after only goes with a status fault")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be >= 1 (or None for a fault that never runs out)")
        if self.every < 1:
            raise ValueError("every must be >= 1")
        if self.origin not in (None, "hub", "bridge"):
            raise ValueError("origin must be None, 'hub' or 'bridge'")

    @property
    def spent(self) -> bool:
        return self.times is not None and self.fired >= self.times

    @property
    def needs_body(self) -> bool:
        return self.truncate_after is not None or self.stall is not None

    def describe(self) -> str:
        if self.status is not None:
            return f"status={self.status}"
        if self.truncate_after is not None:
            return f"truncate_after={self.truncate_after}"
        if self.stall is not None:
            return f"stall={self.stall}@{self.stall_after}"
        return "reset" if self.reset else f"delay={self.delay}"

    def _take(self, ctx: _RequestContext) -> bool:
        """Whether this fault fires for ``ctx`` (counts the match); call with the server lock held."""
        matches = (
            not self.spent
            and (self.method is None or self.method.upper() == ctx.method)
            and (self.origin is None or self.origin == ctx.origin)
            and (ctx.range is not None or not self.ranged_only)
            and fnmatch.fnmatchcase(ctx.path, self.path)
            and (self.file is None or (ctx.file is not None and fnmatch.fnmatchcase(ctx.file, self.file)))
        )
        if not matches:
            return False
        self.seen += 1
        if self.seen % self.every:
            return False
        self.fired += 1
        ctx.faults.append(self.describe())
        return True


# --------------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------------


def _error_response(error: HttpError) -> _Response:
    headers = {"X-Error-Message": error.message}
    if error.code is not None:
        headers["X-Error-Code"] = error.code
    if error.commit is not None:  # lets the client cache the file's absence (.no_exist/<commit>/...)
        headers["X-Repo-Commit"] = error.commit
    return _Response.json(error.status, {"error": error.message}, headers)


def _storage_error(status: int, code: str, message: str) -> _Response:
    """An error of the storage behind the bridge: S3/CloudFront style XML, no Hub headers, sent chunked as S3 sends
    its error documents."""
    body = f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
    return _Response(status, {"Content-Type": "application/xml"}, body.encode(), chunked=True)


class _RangeNotSatisfiable(Exception):
    pass


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The (first, last) byte of a single ``bytes=`` range, or None to serve the whole file.

    Malformed and multi-range headers are ignored, as RFC 9110 allows; a well-formed range that
    misses the file raises :class:`_RangeNotSatisfiable` (416).
    """
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_s, dash, last_s = (s.strip() for s in spec.partition("-"))
    if not dash or not (first_s.isdigit() or first_s == "") or not (last_s.isdigit() or last_s == ""):
        return None
    if not first_s:  # suffix range: the last N bytes
        if not last_s:
            return None
        n = int(last_s)
        if n == 0 or size == 0:
            raise _RangeNotSatisfiable
        return max(0, size - n), size - 1
    first = int(first_s)
    if last_s and int(last_s) < first:
        return None
    if first >= size:
        raise _RangeNotSatisfiable
    return first, min(int(last_s), size - 1) if last_s else size - 1


@dataclass(frozen=True)
class _FileSlice:
    path: Path
    start: int
    length: int


@dataclass
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes | _FileSlice = b""
    file: str | None = None
    chunked: bool = False  # sent with Transfer-Encoding: chunked (an error document of the storage)

    @classmethod
    def json(cls, status: int, payload: Any, headers: dict[str, str] | None = None) -> _Response:
        body = json.dumps(payload).encode()
        return cls(status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, body)

    @property
    def length(self) -> int:
        return self.body.length if isinstance(self.body, _FileSlice) else len(self.body)


class _TokenBucket:
    """Pacing for response bodies: what goes through it stays under ``rate`` bytes/second.

    A virtual clock advances by ``n / rate`` per reservation; idle time earns back at most
    ``burst_s`` seconds of credit, which makes this a token bucket of ``rate * burst_s`` bytes.
    """

    def __init__(self, rate: float, burst_s: float = 0.05) -> None:
        if rate <= 0:
            raise ValueError("bandwidth must be > 0 bytes/second")
        self.rate = rate
        self.burst_s = burst_s
        self.chunk = int(min(_PACED_CHUNK, max(1024, rate * burst_s)))  # ~50 ms per chunk: smooth pacing
        self._next = 0.0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> float:
        """Book ``n`` bytes; returns how long to wait before sending them."""
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now - self.burst_s) + n / self.rate
            return self._next - now


_certificate_lock = threading.Lock()
_certificate: Path | None = None


def _localhost_certificate() -> Path:
    """The folder of a self-signed certificate for ``localhost`` (``cert.pem``, ``key.pem``), made once per process
    with the ``openssl`` command: the standard library cannot make one. One per process, so that a client told to
    trust it (``SSL_CERT_FILE``) trusts every TLS bridge this process starts."""
    global _certificate
    with _certificate_lock:
        if _certificate is None:
            openssl = shutil.which("openssl")
            if openssl is None:
                raise RuntimeError("HubServer(tls=True) makes its certificate with the openssl command: install it")
            folder = Path(tempfile.mkdtemp(prefix="hubserver-tls-"))
            atexit.register(shutil.rmtree, folder, True)
            subprocess.run(
                [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-days", "7", "-subj", f"/CN={_BRIDGE_HOST}", "-addext", f"subjectAltName=DNS:{_BRIDGE_HOST}",
                 "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
                check=True, capture_output=True,
            )  # fmt: skip
            _certificate = folder
        return _certificate


class _OriginServer(ThreadingHTTPServer):
    """One listening socket ("hub" or "bridge") of a :class:`HubServer`."""

    daemon_threads = True
    block_on_close = False  # HubServer.stop() joins handler threads itself, with a deadline
    request_queue_size = 128  # snapshot_download and streaming open 8+ connections at once

    def __init__(self, hub: HubServer, origin: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.hub = hub
        self.origin = origin
        self.tls = tls
        super().__init__((_LOOPBACK, port), _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, address = super().get_request()
        if self.tls is not None:  # the handshake is the handler thread's, not the accepting loop's
            conn = self.tls.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        return conn, address

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that can hang offline.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-body is normal here (faults, cancelled downloads): stay quiet about it.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


@dataclass
class _RequestContext:
    method: str
    path: str
    query: str
    origin: str
    range: str | None
    authorization: str | None
    start: float
    peer: str = ""
    file: str | None = None  # set once routing knows which repo file the request is about
    faults: list[str] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client's connection pool reuses connections
    timeout = _IDLE_TIMEOUT_S
    disable_nagle_algorithm = True  # headers and body go in separate writes; avoid the 40 ms stall
    server: _OriginServer

    def setup(self) -> None:
        super().setup()
        self.server.hub._register_connection(self.connection)
        self._served = 0

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.hub._unregister_connection(self.connection)

    def handle(self) -> None:
        self.close_connection = True
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.do_handshake()
            except OSError:  # the client does not trust the certificate, or went away
                return
        self.handle_one_request()
        while not self.close_connection and self._served < _MAX_REQUESTS_PER_CONNECTION:
            self.handle_one_request()

    def do_GET(self) -> None:
        self._dispatch(head_only=False)

    def do_HEAD(self) -> None:
        self._dispatch(head_only=True)

    def do_POST(self) -> None:
        self._dispatch(head_only=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: the structured request log replaces the stderr access log."""

    # -- request handling -------------------------------------------------------------------------

    def _dispatch(self, head_only: bool) -> None:
        hub = self.server.hub
        self._served += 1
        split = urlsplit(self.path)
        ctx = _RequestContext(
            method=self.command,
            path=unquote(split.path),
            query=split.query,
            origin=self.server.origin,
            range=self.headers.get("Range"),
            authorization=self.headers.get("Authorization"),
            start=time.monotonic(),
            peer="{}:{}".format(*self.client_address[:2]),
        )
        with hub._in_flight():
            body = self._read_request_body()
            try:
                response = self._route(split.path, split.query, body) if body is not None else None
            except HttpError as error:
                response = _error_response(error)
            if response is None:
                response = _error_response(HttpError(400, None, "unsupported request body"))
                self.close_connection = True  # the unread body would be taken for the next request
            ctx.file = response.file
            delay, action = hub._take_request_faults(ctx)
            stopped = hub._stop_event.wait(delay + hub.latency) if delay + hub.latency > 0 else False
            if stopped or (action is not None and action.reset):
                hub._finish(hub._log(ctx, status=None))
                self._reset_connection()
                return
            if action is not None:
                response = _fault_response(action, response.file, ctx.origin)
            try:
                self._send(ctx, response, head_only)
            except OSError:
                self.close_connection = True  # the client went away; nothing left to tell it

    def _read_request_body(self) -> bytes | None:
        """The request body (empty when there is none), or None when it is chunked, huge or malformed."""
        length = self.headers.get("Content-Length") or "0"
        if not length.isdigit() or int(length) > _MAX_REQUEST_BODY or self.headers.get("Transfer-Encoding"):
            return None
        return self.rfile.read(int(length)) if int(length) else b""

    def _route(self, raw_path: str, query: str, body: bytes) -> _Response:
        # Split before unquoting: revisions and tree paths arrive %2F-quoted inside one segment.
        segments = [unquote(s) for s in raw_path.split("/")[1:]]
        if self.server.origin == "bridge":
            return self._route_bridge(segments, query)
        params = {k.lower(): v[-1].lower() for k, v in parse_qs(query).items()}
        if segments[:2] == ["api", "models"]:
            return self._route_api(segments[2:], params, body)
        if segments[:1] == [_CAS_PREFIX]:
            raise HttpError(
                501,
                None,
                "This local Hub has no Xet CAS: hf_xet cannot download from it. Set HF_HUB_DISABLE_XET=1 and "
                "huggingface_hub downloads over HTTP from the redirect target instead.",
            )
        if self.command in ("GET", "HEAD") and "resolve" in segments[1:3]:
            candidates = ["/".join(segments[:2])] if segments[2:3] == ["resolve"] else []
            candidates += segments[:1] if segments[1] == "resolve" else []
            repo = self.server.hub._repo(candidates)
            rest = segments[len(repo.repo_id.split("/")) :]  # ["resolve", revision, *path]
            if len(rest) >= 3:
                return self._resolve(repo, rest[1], "/".join(rest[2:]))
        raise HttpError(404, None, "Not Found")

    def _route_api(self, segments: list[str], params: dict[str, str], body: bytes) -> _Response:
        hub = self.server.hub
        repo = hub._repo(["/".join(segments[:2]), segments[0] if segments else ""])
        rest = segments[len(repo.repo_id.split("/")) :]
        truthy = ("1", "true")
        if self.command in ("GET", "HEAD"):
            if not rest:
                return _Response.json(200, repo.info(params.get("blobs") in truthy))
            if rest[0] == "revision" and len(rest) == 2:
                repo.resolve(rest[1])
                return _Response.json(200, repo.info(params.get("blobs") in truthy))
            if rest[0] == "tree" and len(rest) >= 2:
                repo.resolve(rest[1])
                folder = "/".join(rest[2:]).strip("/")
                return _Response.json(200, repo.tree(folder, params.get("recursive") in truthy, hub.mode == "xet"))
            if rest[0] == "xet-read-token" and len(rest) == 2 and hub.mode == "xet":
                return self._xet_token(repo, rest[1])
        if self.command == "POST" and rest[:1] == ["paths-info"] and len(rest) == 2:
            repo.resolve(rest[1])
            return _Response.json(200, repo.paths_info(self._posted_paths(body), hub.mode == "xet"))
        raise HttpError(404, None, "Not Found")

    def _xet_token(self, repo: ServedRepo, revision: str) -> _Response:
        """The ``rel="xet-auth"`` route: a short-lived token for a Xet CAS (which this server does not have)."""
        if repo.gated:
            self._check_gate(repo)
        repo.resolve(revision)
        expires = int(time.time()) + _TOKEN_TTL_S
        token = hashlib.sha256(os.urandom(16)).hexdigest()
        cas = f"{self.server.hub.url}/{_CAS_PREFIX}"
        headers = {"X-Xet-Cas-Url": cas, "X-Xet-Access-Token": token, "X-Xet-Token-Expiration": str(expires)}
        return _Response.json(200, {"casUrl": cas, "accessToken": token, "exp": expires}, headers)

    def _posted_paths(self, body: bytes) -> list[str]:
        """``paths`` of a paths-info call: form-encoded (what huggingface_hub sends) or JSON."""
        text = body.decode("utf-8", "replace")
        if "json" in (self.headers.get("Content-Type") or ""):
            paths = json.loads(text or "{}").get("paths", [])
            return [paths] if isinstance(paths, str) else list(paths)
        return parse_qs(text, keep_blank_values=True).get("paths", [])

    def _resolve(self, repo: ServedRepo, revision: str, path: str) -> _Response:
        hub = self.server.hub
        if repo.gated:
            self._check_gate(repo)
        commit = repo.resolve(revision)
        entry = repo.files.get(path)
        if entry is None:
            raise HttpError(404, "EntryNotFound", f"Entry not found: {path}", commit)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{entry.etag}"'}
        if entry.is_lfs:
            headers.update({"X-Linked-Etag": f'"{entry.etag}"', "X-Linked-Size": str(entry.size)})
        if entry.is_lfs and hub.mode == "xet":
            # An absolute redirect to another host: huggingface_hub's HEAD does not follow it (the metadata comes
            # from this response, `location` is the bridge URL) and no client may send its token there.
            token_route = f"{hub.url}/api/models/{repo.repo_id}/xet-read-token/{commit}"
            headers.update(
                {
                    "X-Xet-Hash": str(entry.xet_hash),
                    "Link": f'<{token_route}>; rel="xet-auth"',
                    "Location": hub._signed_bridge_url(repo, entry),
                }
            )
            return _Response(302, headers, file=path)
        return self._file_response(entry, headers)

    def _check_gate(self, repo: ServedRepo) -> None:
        auth = self.headers.get("Authorization")
        if auth is None:
            raise HttpError(401, "GatedRepo", f"Access to {repo.repo_id} is restricted. Please log in.")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HttpError(403, "GatedRepo", f"Access to {repo.repo_id} is restricted. Use a bearer token.")

    def _route_bridge(self, segments: list[str], query: str) -> _Response:
        hub = self.server.hub
        entry = hub._bridge_entry(segments[2]) if len(segments) == 3 and segments[0] == _BRIDGE_PREFIX else None
        if entry is None or self.command not in ("GET", "HEAD"):
            return _storage_error(404, "NoSuchKey", "The specified key does not exist.")
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        expires = params.get("Expires", "")
        expected = hub._signature("/" + "/".join(segments), expires)
        if not expires.isdigit() or not hmac.compare_digest(params.get("Signature", ""), expected):
            response = _storage_error(403, "AccessDenied", "Invalid signature")
        elif time.time() >= int(expires):
            response = _storage_error(403, "AccessDenied", "Request has expired")
        else:
            return self._file_response(entry, {"ETag": f'"{entry.xet_hash}"'})
        response.file = entry.path
        return response

    def _file_response(self, entry: ServedFile, headers: dict[str, str]) -> _Response:
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        try:
            byte_range = _parse_range(self.headers.get("Range"), entry.size)
        except _RangeNotSatisfiable:
            headers["Content-Range"] = f"bytes */{entry.size}"
            return _Response(416, headers, file=entry.path)
        if byte_range is None:
            return _Response(200, headers, _FileSlice(entry.disk, 0, entry.size), entry.path)
        first, last = byte_range
        if self.server.hub.content_range:
            headers["Content-Range"] = f"bytes {first}-{last}/{entry.size}"
        return _Response(206, headers, _FileSlice(entry.disk, first, last - first + 1), entry.path)

    # -- response writing -------------------------------------------------------------------------

    def _send(self, ctx: _RequestContext, response: _Response, head_only: bool) -> None:
        hub = self.server.hub
        length = response.length
        chunked = response.chunked and isinstance(response.body, bytes)
        body_fault = hub._take_body_fault(ctx) if not head_only and length > 0 and not chunked else None
        limit = body_fault.truncate_after if body_fault is not None else None
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        if self._served >= _MAX_REQUESTS_PER_CONNECTION or limit is not None:
            self.send_header("Connection", "close")
        record = hub._log(ctx, status=response.status)
        try:
            self.end_headers()
            if head_only:
                return
            if chunked:
                self._write_chunked(record, bytes(response.body))
                return
            count = length if limit is None else min(limit, length)
            stall = (body_fault.stall_after, body_fault.stall) if body_fault and body_fault.stall else None
            if self._write_body(record, response.body, count, stall) < length:
                self.close_connection = True  # cut short (fault, stop, or the file shrank): client sees EOF
        finally:
            hub._finish(record)

    def _write_chunked(self, record: RequestRecord, body: bytes) -> None:
        """``body`` in two chunks, each write its own packet (``TCP_NODELAY``): a client reads sizes, data and line
        ends as they come, not all at once."""
        self.server.hub._count(record, len(body))
        half = len(body) // 2
        for piece in (body[:half], body[half:]):
            if piece:
                self.wfile.write(b"%x\r\n" % len(piece))
                self.wfile.write(piece + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def _write_body(
        self, record: RequestRecord, body: bytes | _FileSlice, count: int, stall: tuple[int, float] | None
    ) -> int:
        """Write up to ``count`` body bytes, paced by both bandwidth caps; returns how many were written.

        A file body goes from the page cache to the socket with ``sendfile`` (not over TLS): the server stands in for
        a remote host, and on a small machine the CPU it spends copying bytes through Python is taken from the client
        it serves (measured with ``benchmarks/bench_hub.py``, where both share 2 cores)."""
        hub = self.server.hub
        total, per_connection = hub._bucket, hub._connection_bucket()
        chunk_size = min(b.chunk if b is not None else _CHUNK for b in (total, per_connection))
        written = 0
        with contextlib.ExitStack() as stack:
            fh = stack.enter_context(body.path.open("rb")) if isinstance(body, _FileSlice) else None
            for start, end in _body_pieces(count, chunk_size, stall[0] if stall else None):
                if stall is not None and written >= stall[0]:
                    if hub._stop_event.wait(stall[1]):
                        break
                    stall = None
                for bucket in (per_connection, total):
                    wait = bucket.reserve(end - start) if bucket is not None else 0.0
                    if wait > 0 and hub._stop_event.wait(wait):
                        return written
                hub._count(record, end - start)  # counted first: the log is complete once the client has it
                try:
                    sent = self._write_piece(body, fh, start, end)
                except OSError:
                    hub._count(record, start - end)
                    raise
                written += sent
                if sent < end - start:  # the file shrank since add_repo(); the caller closes the connection
                    hub._count(record, sent - (end - start))
                    break
        return written

    def _write_piece(self, body: bytes | _FileSlice, fh: BinaryIO | None, start: int, end: int) -> int:
        """Body bytes ``start:end``; returns how many were sent (fewer when a file body ends early)."""
        if fh is None:
            assert isinstance(body, bytes)
            self.wfile.write(memoryview(body)[start:end])
            return end - start
        assert isinstance(body, _FileSlice)
        if not isinstance(self.connection, ssl.SSLSocket):
            return self.connection.sendfile(fh, body.start + start, end - start)
        fh.seek(body.start + start)
        data = fh.read(end - start)
        self.wfile.write(data)
        return len(data)

    def _reset_connection(self) -> None:
        """Abort with a TCP RST and no response, like a crashed proxy."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()


def _fault_response(fault: Fault, file: str | None, origin: str) -> _Response:
    """The fault's status, as the Hub answers it (JSON) or, on the bridge, as its storage does (chunked XML)."""
    assert fault.status is not None
    message = f"injected fault: HTTP {fault.status}"
    if origin == "bridge":
        response = _storage_error(fault.status, "InjectedFault", message)
    else:
        response = _Response.json(fault.status, {"error": message}, {"X-Error-Message": message})
    if fault.retry_after is not None:
        response.headers["Retry-After"] = str(fault.retry_after)
    response.file = file
    return response


def _body_pieces(count: int, chunk_size: int, split_at: int | None) -> Iterator[tuple[int, int]]:
    """(start, end) of each chunk of the first ``count`` body bytes, with one boundary at ``split_at``."""
    bounds = [split_at] if split_at is not None and 0 < split_at < count else []
    position = 0
    while position < count:
        end = min([position + chunk_size, count, *[b for b in bounds if b > position]])
        yield position, end
        position = end


# --------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------


class HubServer:
    """A local Hub: serves folders as model repos over HTTP/1.1 on 127.0.0.1.

    Use it as a context manager (``with HubServer() as hub:``) or call :meth:`start`/:meth:`stop`. Point
    ``huggingface_hub`` at :attr:`url` (``HF_ENDPOINT`` before importing it, or ``endpoint=``). See the module
    docstring for ``mode`` ("mirror" or "xet") and the link model (``latency``, ``connection_bandwidth``,
    ``bandwidth``). ``url_ttl``: seconds a signed bridge URL stays valid (xet mode). ``content_range=False``: 206
    answers without ``Content-Range``. ``tls=True``: the bridge over HTTPS (xet mode; see :attr:`ca_file`).
    ``latency``, the bandwidths and ``url_ttl`` can be changed while serving.
    """

    def __init__(
        self,
        host: str = _LOOPBACK,
        port: int = 0,
        *,
        mode: str = "mirror",
        bandwidth: float | None = None,
        connection_bandwidth: float | None = None,
        latency: float = 0.0,
        url_ttl: float = 3600.0,
        content_range: bool = True,
        tls: bool = False,
    ) -> None:
        if host not in (_LOOPBACK, "localhost"):
            raise ValueError("HubServer only binds 127.0.0.1: it serves test data without any access control")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if latency < 0 or url_ttl <= 0:
            raise ValueError("latency must be >= 0 and url_ttl > 0 seconds")
        self._port = port
        self.mode = mode
        self.latency = latency
        self.url_ttl = url_ttl
        self.content_range = content_range
        if tls and mode != "xet":
            raise ValueError("tls=True serves the bridge over HTTPS: it needs mode='xet'")
        self.tls = tls
        self._bucket = _TokenBucket(bandwidth) if bandwidth is not None else None
        self._connection_rate = connection_bandwidth
        if connection_bandwidth is not None:
            _TokenBucket(connection_bandwidth)  # validates the rate now rather than at the first request
        self._secret = os.urandom(32)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stop_event = threading.Event()
        self._repos: dict[str, ServedRepo] = {}
        self._bridge_index: dict[str, ServedFile] = {}
        self._log_records: list[RequestRecord] = []
        self._faults: list[Fault] = []
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._active = 0
        self._servers: list[_OriginServer] = []
        self._threads: list[threading.Thread] = []

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> HubServer:
        """Bind the socket(s) and serve in background daemon threads; returns self."""
        if self._servers:
            raise RuntimeError("HubServer already started")
        self._stop_event.clear()
        try:
            self._servers.append(_OriginServer(self, "hub", self._port))
            if self.mode == "xet":
                self._servers.append(_OriginServer(self, "bridge", 0, self._tls_context() if self.tls else None))
        except OSError:
            for srv in self._servers:
                srv.server_close()
            self._servers = []
            raise
        for srv in self._servers:
            # A short poll interval makes stop() quick: tests start many servers.
            thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Close the sockets and all connections, and join the threads (bounded: about 2 s at most)."""
        if not self._servers:
            return
        self._stop_event.set()  # wakes handlers sleeping on a delay, a stall or a bandwidth cap
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        with self._lock:
            connections = dict(self._connections)
        for conn in connections:  # wakes handlers blocked reading the next keep-alive request
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + _STOP_JOIN_TIMEOUT_S
        for thread in [*connections.values(), *self._threads]:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._servers, self._threads = [], []

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The Hub endpoint, e.g. ``http://127.0.0.1:PORT`` (what ``HF_ENDPOINT`` should be)."""
        return self._origin_url("hub", _LOOPBACK)

    @property
    def bridge_url(self) -> str | None:
        """The second origin LFS files are redirected to (another host name), or None in mirror mode."""
        return self._origin_url("bridge", _BRIDGE_HOST) if self.mode == "xet" else None

    @property
    def ca_file(self) -> Path | None:
        """With ``tls=True``, the certificate a client must trust to reach the bridge (``SSL_CERT_FILE``)."""
        return _localhost_certificate() / "cert.pem" if self.tls else None

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        folder = _localhost_certificate()
        context.load_cert_chain(folder / "cert.pem", folder / "key.pem")
        return context

    @property
    def bandwidth(self) -> float | None:
        """The cap in bytes/second shared by all response bodies (None: unlimited)."""
        bucket = self._bucket
        return bucket.rate if bucket is not None else None

    @bandwidth.setter
    def bandwidth(self, rate: float | None) -> None:
        self._bucket = _TokenBucket(rate) if rate is not None else None

    @property
    def connection_bandwidth(self) -> float | None:
        """The cap in bytes/second of each response body (None: unlimited)."""
        return self._connection_rate

    @connection_bandwidth.setter
    def connection_bandwidth(self, rate: float | None) -> None:
        if rate is not None:
            _TokenBucket(rate)
        self._connection_rate = rate

    # -- repos ------------------------------------------------------------------------------------

    def add_repo(self, repo_id: str, folder: Path | str, *, gated: bool = False) -> str:
        """Serve ``folder`` (e.g. written by ``save_pretrained``) as model repo ``repo_id``.

        Returns the commit sha: 40 hex digits derived from the file paths and contents only, so the
        same folder gives the same sha in every run (the client's cache is keyed by it). ``main`` and
        the sha resolve. A ``gated`` repo refuses file downloads without a bearer token (401,
        ``GatedRepo``), like a gated repo for a user who has not accepted its terms.
        """
        parts = repo_id.split("/")
        if not 1 <= len(parts) <= 2 or not all(parts) or "--" in repo_id:
            raise ValueError(f"invalid repo id {repo_id!r}: expected 'name' or 'namespace/name'")
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(folder)
        repo = ServedRepo.scan(repo_id, folder, gated)
        with self._lock:
            self._repos[repo_id] = repo
            self._bridge_index.update({str(f.xet_hash): f for f in repo.files.values() if f.is_lfs})
        return repo.sha

    # -- request log ------------------------------------------------------------------------------

    @property
    def log(self) -> list[RequestRecord]:
        """A snapshot (copies) of the request log, oldest first."""
        with self._lock:
            return [dataclasses.replace(r) for r in self._log_records]

    def clear_log(self) -> None:
        with self._lock:
            self._log_records.clear()

    def bytes_sent(self, path_suffix: str | None = None) -> int:
        """Body bytes sent for file downloads (both origins), optionally only for files ending so."""
        with self._lock:
            return sum(
                r.bytes_sent
                for r in self._log_records
                if r.file is not None and (path_suffix is None or r.file.endswith(path_suffix))
            )

    def resolve_calls(self, path_suffix: str | None = None) -> int:
        """``/resolve/`` requests so far (the Hub's Resolvers rate-limit bucket), optionally only for files
        ending with ``path_suffix``."""
        with self._lock:
            return sum(
                1
                for r in self._log_records
                if r.is_resolve and (path_suffix is None or (r.file or r.path).endswith(path_suffix))
            )

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no request is being answered; True if that happened within ``timeout``."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    # -- faults -----------------------------------------------------------------------------------

    def add_fault(self, fault: Fault) -> Fault:
        """Arm ``fault`` (after those already armed); returns it so tests can read ``fault.fired``."""
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    # -- internals used by the handler --------------------------------------------------------------

    def _origin_url(self, origin: str, host: str) -> str:
        for srv in self._servers:
            if srv.origin == origin:
                return f"{'https' if srv.tls else 'http'}://{host}:{srv.server_address[1]}"
        raise RuntimeError("HubServer is not started")

    def _signature(self, path: str, expires: str) -> str:
        return hmac.new(self._secret, f"{path}\n{expires}".encode(), hashlib.sha256).hexdigest()[:40]

    def _signed_bridge_url(self, repo: ServedRepo, entry: ServedFile) -> str:
        """A bridge URL for ``entry`` that stops working ``url_ttl`` seconds from now (whole seconds, rounded up,
        as ``Expires`` is a Unix time)."""
        repo_key = hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24]
        path = f"/{_BRIDGE_PREFIX}/{repo_key}/{entry.xet_hash}"
        expires = str(math.ceil(time.time() + self.url_ttl))
        query = f"Expires={expires}&Signature={self._signature(path, expires)}&Key-Pair-Id=LOCALHUB"
        disposition = quote(f'inline; filename="{Path(entry.path).name}"', safe="")
        return f"{self.bridge_url}{path}?{query}&response-content-disposition={disposition}"

    def _repo(self, candidates: list[str]) -> ServedRepo:
        with self._lock:
            for repo_id in candidates:
                if repo_id in self._repos:
                    return self._repos[repo_id]
        raise HttpError(404, "RepoNotFound", "Repository not found")

    def _bridge_entry(self, xet_hash: str) -> ServedFile | None:
        with self._lock:
            return self._bridge_index.get(xet_hash)

    def _connection_bucket(self) -> _TokenBucket | None:
        rate = self._connection_rate
        return _TokenBucket(rate) if rate is not None else None

    def _register_connection(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections[conn] = threading.current_thread()
        if self._stop_event.is_set():  # accepted while stopping: do not wait for a request
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _unregister_connection(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.pop(conn, None)

    @contextlib.contextmanager
    def _in_flight(self) -> Iterator[None]:
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def _take_request_faults(self, ctx: _RequestContext) -> tuple[float, Fault | None]:
        """Fire the matching delay faults (summed) and the first matching status/reset fault."""
        delay, action = 0.0, None
        with self._lock:
            for fault in self._faults:
                if fault.needs_body or (fault.delay is None and action is not None) or not fault._take(ctx):
                    continue
                if fault.delay is not None:
                    delay += fault.delay
                else:
                    action = fault
        return delay, action

    def _take_body_fault(self, ctx: _RequestContext) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.needs_body and fault._take(ctx):
                    return fault
        return None

    def _log(self, ctx: _RequestContext, status: int | None) -> RequestRecord:
        record = RequestRecord(
            time=ctx.start,
            method=ctx.method,
            path=ctx.path,
            query=ctx.query,
            origin=ctx.origin,
            range=ctx.range,
            authorization=ctx.authorization is not None,
            status=status,
            file=ctx.file,
            fault=", ".join(ctx.faults) or None,
            peer=ctx.peer,
        )
        with self._lock:
            self._log_records.append(record)
        return record

    def _count(self, record: RequestRecord, n: int) -> None:
        with self._lock:
            record.bytes_sent += n

    def _finish(self, record: RequestRecord) -> None:
        with self._lock:
            record.end = time.monotonic()
