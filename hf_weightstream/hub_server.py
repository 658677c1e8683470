"""A local, Hugging-Face-Hub-compatible HTTP server for tests, demos and offline work.

Why it exists: streaming weights lazily is all about *how* bytes arrive (range requests, redirects,
retries, a slow link), and the real Hub can be neither reached from CI nor made to misbehave on
purpose. This server speaks just enough of the Hub protocol for the real ``huggingface_hub`` client
(2.x, HTTP client ``httpx2``) and ``transformers`` to work against it unchanged, and it adds what the
real Hub cannot give us: a shared bandwidth cap, deterministic fault injection and a request log.

Stdlib only, on purpose: it shares no code with the client it imitates, so a client quirk cannot hide
a server bug. (Importing it through the package still runs ``hf_weightstream/__init__.py``, which
imports transformers and huggingface_hub; those read ``HF_ENDPOINT`` at import time, so a client in
the same process must be pointed at :attr:`HubServer.url` with ``endpoint=`` or by patching
``huggingface_hub.constants``; see ``tests/hubtools.py``.)

What the client needs (read from ``huggingface_hub`` 2.4, see docs/ecosystem-notes.md):

- ``GET /api/models/{repo}[/revision/{rev}]`` (``repo_info``/``model_info``, ``snapshot_download``):
  ``id``, ``sha``, ``siblings``; with ``?blobs=true`` also ``size``, ``blobId``, ``lfs``.
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``list_repo_tree``, ``list_repo_files``,
  ``snapshot_download``): ``{type, oid, size, path, lfs{oid, size, pointerSize}}``, no ``xetHash``
  (a ``xetHash`` would send the client to a Xet CAS server we do not have).
- ``POST /api/models/{repo}/paths-info/{rev}`` (``get_paths_info``): form-encoded ``paths``.
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` (``hf_hub_download``, ``get_hf_file_metadata``,
  ``file_exists``, safetensors header reads): ``X-Repo-Commit`` and ``ETag`` always, LFS files also
  ``X-Linked-Etag``/``X-Linked-Size`` (the only place the size survives a redirect), ``Range``.
- Errors are mapped to exceptions from the ``X-Error-Code`` header (``RepoNotFound``,
  ``RevisionNotFound``, ``EntryNotFound``, ``GatedRepo``), not from the status code.

Served folders are treated as immutable commits: hashes are computed once by :meth:`HubServer.add_repo`
(and cached per file path, size and mtime), bytes are read from disk at request time.

Left out on purpose: other repo types, private repos, branches other than ``main``, tree pagination
(one page holds everything), Xet. Anything else gets a plain 404, e.g. the client's best-effort
``GET /api/agent-harnesses`` (a 404 there also keeps it from writing its cache file under HF_HOME).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
import json
import os
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["Fault", "HubServer", "RequestRecord"]

#: Suffixes the Hub's default ``.gitattributes`` stores with git-LFS (the subset model repos use).
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".msgpack", ".h5")
#: Bigger files must be LFS on the Hub whatever their name.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

_LOOPBACK = "127.0.0.1"
_CHUNK = 256 * 1024  # body chunk without a bandwidth cap
_HASH_CHUNK = 1024 * 1024
_IDLE_TIMEOUT_S = 30.0  # an idle keep-alive connection is closed after this
_MAX_REQUESTS_PER_CONNECTION = 1000  # bounds each connection's request loop
_MAX_REQUEST_BODY = 1024 * 1024  # paths-info bodies are tiny; refuse anything large
_STOP_JOIN_TIMEOUT_S = 2.0
_LAST_MODIFIED = "2024-01-01T00:00:00.000Z"  # fixed: the repo metadata stays deterministic
_SKIPPED_DIRS = {".git", ".cache"}  # git internals and `local_dir` download metadata are not repo files


# --------------------------------------------------------------------------------------------------
# Repository model
# --------------------------------------------------------------------------------------------------

_digest_cache: dict[tuple[str, int, int, str], str] = {}
_digest_cache_lock = threading.Lock()


def _file_digest(path: Path, size: int, algo: str) -> str:
    """sha256 of a file, or its git blob sha1 (``algo="git"``), cached by (path, size, mtime).

    Tests serve the same tiny model from many servers and demos serve GB-sized shards: hashing once per
    process keeps ``add_repo`` cheap after the first time.
    """
    stat = path.stat()
    key = (str(path.resolve()), size, stat.st_mtime_ns, algo)
    with _digest_cache_lock:
        cached = _digest_cache.get(key)
    if cached is not None:
        return cached
    hasher = hashlib.sha256() if algo == "sha256" else hashlib.sha1(b"blob %d\0" % size)
    with path.open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            hasher.update(chunk)
    digest = hasher.hexdigest()
    with _digest_cache_lock:
        _digest_cache[key] = digest
    return digest


def _git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class _RepoFile:
    """One file of a served repo; ``etag`` is what the Hub would report for it."""

    path: str
    disk: Path
    size: int
    blob_oid: str  # git oid: of the content, or of the LFS pointer file for LFS files
    sha256: str | None = None  # LFS files only
    pointer_size: int | None = None  # LFS files only

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None

    @property
    def etag(self) -> str:
        return self.sha256 if self.sha256 is not None else self.blob_oid

    def tree_item(self) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "oid": self.blob_oid, "size": self.size, "path": self.path}
        if self.sha256 is not None:
            item["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return item

    def sibling(self, blobs: bool) -> dict[str, Any]:
        sibling: dict[str, Any] = {"rfilename": self.path}
        if blobs:
            sibling.update(size=self.size, blobId=self.blob_oid)
            if self.sha256 is not None:
                sibling["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return sibling


def _scan_file(path: str, disk: Path) -> _RepoFile:
    size = disk.stat().st_size
    if not (path.endswith(LFS_SUFFIXES) or size > LFS_SIZE_THRESHOLD):
        return _RepoFile(path=path, disk=disk, size=size, blob_oid=_file_digest(disk, size, "git"))
    sha256 = _file_digest(disk, size, "sha256")
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    return _RepoFile(
        path=path,
        disk=disk,
        size=size,
        blob_oid=_git_blob_oid(pointer),
        sha256=sha256,
        pointer_size=len(pointer),
    )


def _listing_oid(kind: str, files: dict[str, _RepoFile], prefix: str) -> str:
    """A deterministic git-like oid over the paths and content hashes of the files under ``prefix``."""
    listing = "".join(f"{p}\0{f.etag}\n" for p, f in sorted(files.items()) if p.startswith(prefix))
    return hashlib.sha1(f"{kind}\0{listing}".encode()).hexdigest()


@dataclass(frozen=True)
class _Repo:
    """An immutable snapshot of a folder, served as one commit of a model repo."""

    repo_id: str
    sha: str
    files: dict[str, _RepoFile]
    dirs: dict[str, str]  # directory path -> deterministic tree oid
    gated: bool

    @classmethod
    def scan(cls, repo_id: str, folder: Path, gated: bool) -> _Repo:
        files: dict[str, _RepoFile] = {}
        for root, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS)
            for name in sorted(filenames):
                disk = Path(root, name)
                if disk.is_file():  # follows symlinks: HF cache snapshots are symlinks into blobs/
                    rel = disk.relative_to(folder).as_posix()
                    files[rel] = _scan_file(rel, disk)
        dir_paths: set[str] = set()
        for path in files:
            dir_paths.update(p.as_posix() for p in PurePosixPath(path).parents if p.as_posix() != ".")
        dirs = {d: _listing_oid("tree", files, f"{d}/") for d in sorted(dir_paths)}
        sha = _listing_oid("commit", files, "")
        return cls(repo_id=repo_id, sha=sha, files=files, dirs=dirs, gated=gated)

    def resolve(self, revision: str) -> str:
        if revision in ("main", "refs/heads/main", self.sha):
            return self.sha
        raise _HttpError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def tree(self, folder: str, recursive: bool) -> list[dict[str, Any]]:
        if folder and folder not in self.dirs:
            raise _HttpError(404, "EntryNotFound", f"{folder} does not exist on branch main", self.sha)
        prefix = f"{folder}/" if folder else ""

        def wanted(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

        items = [self._dir_item(d) for d in self.dirs if wanted(d)]
        items += [f.tree_item() for p, f in self.files.items() if wanted(p)]
        return items

    def paths_info(self, paths: list[str]) -> list[dict[str, Any]]:
        items = []
        for path in (p.strip("/") for p in paths):
            if path in self.files:
                items.append(self.files[path].tree_item())
            elif path in self.dirs:
                items.append(self._dir_item(path))
        return items

    def info(self, blobs: bool) -> dict[str, Any]:
        return {
            "_id": self.sha[:24],
            "id": self.repo_id,
            "modelId": self.repo_id,
            "sha": self.sha,
            "private": False,
            "gated": "auto" if self.gated else False,
            "disabled": False,
            "lastModified": _LAST_MODIFIED,
            "createdAt": _LAST_MODIFIED,
            "tags": [],
            "downloads": 0,
            "likes": 0,
            "siblings": [f.sibling(blobs) for _, f in sorted(self.files.items())],
        }

    def _dir_item(self, path: str) -> dict[str, Any]:
        return {"type": "directory", "oid": self.dirs[path], "size": 0, "path": path}


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
    origin: str  # "hub" (API and /resolve/) or "cdn" (the redirect target)
    range: str | None  # the Range header as sent
    authorization: bool  # whether an Authorization header was sent
    status: int | None = None  # None: the connection was reset without a response
    file: str | None = None  # the repo file a /resolve/ or CDN response is about
    bytes_sent: int = 0  # response body bytes handed to the socket
    fault: str | None = None  # which injected fault(s) fired, e.g. "status=503"
    end: float | None = None  # time.monotonic() when the response was done (None while in flight)


@dataclass
class Fault:
    """A deterministic misbehaviour, fired by the first ``times`` requests that match it.

    Exactly one action per fault: ``status`` (answer with that status, plus ``Retry-After`` when
    ``retry_after`` is set), ``truncate_after`` (send that many body bytes, then close the connection),
    ``reset`` (close the socket without any response) or ``delay`` (wait that many seconds, then answer
    normally). Matching: ``path`` is an :mod:`fnmatch` glob against the decoded URL path (``*`` spans
    ``/``; CDN paths look like ``/cdn/<sha256>/<file name>``, so ``"*.safetensors"`` matches both
    origins), ``method``/``origin`` restrict when set, ``ranged_only`` requires a ``Range`` header.

    A truncate fault is only taken by a response that has a body (never by a ``HEAD``, a redirect or
    an empty file), so ``Fault(path="*.safetensors", truncate_after=100)`` truncates the download and
    not the metadata call before it. Delay faults stack with the other kinds on one request; among
    status/reset faults the first added wins. ``fired`` counts how often the fault fired.
    """

    path: str = "*"
    method: str | None = None
    origin: str | None = None
    ranged_only: bool = False
    status: int | None = None
    retry_after: int | None = None
    truncate_after: int | None = None
    reset: bool = False
    delay: float | None = None
    times: int | None = 1  # None: never spent
    fired: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        actions = (self.status, self.truncate_after, self.reset or None, self.delay)
        if sum(a is not None for a in actions) != 1:
            raise ValueError("a Fault needs exactly one of status, truncate_after, reset, delay")
        if self.retry_after is not None and self.status is None:
            raise ValueError("retry_after only goes with a status fault")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be >= 1 (or None for a fault that never runs out)")
        if self.origin not in (None, "hub", "cdn"):
            raise ValueError("origin must be None, 'hub' or 'cdn'")

    @property
    def spent(self) -> bool:
        return self.times is not None and self.fired >= self.times

    def describe(self) -> str:
        if self.status is not None:
            return f"status={self.status}"
        if self.truncate_after is not None:
            return f"truncate_after={self.truncate_after}"
        return "reset" if self.reset else f"delay={self.delay}"

    def _matches(self, method: str, path: str, origin: str, ranged: bool) -> bool:
        return (
            not self.spent
            and (self.method is None or self.method.upper() == method)
            and (self.origin is None or self.origin == origin)
            and (ranged or not self.ranged_only)
            and fnmatch.fnmatchcase(path, self.path)
        )


# --------------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------------


class _HttpError(Exception):
    """An error answer. ``code`` goes into ``X-Error-Code``: huggingface_hub maps that to its exceptions."""

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit

    def response(self) -> _Response:
        headers = {"X-Error-Message": self.message}
        if self.code is not None:
            headers["X-Error-Code"] = self.code
        if self.commit is not None:  # lets the client cache the file's absence (.no_exist/<commit>/...)
            headers["X-Repo-Commit"] = self.commit
        return _Response.json(self.status, {"error": self.message}, headers)


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

    @classmethod
    def json(cls, status: int, payload: Any, headers: dict[str, str] | None = None) -> _Response:
        body = json.dumps(payload).encode()
        return cls(status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})}, body)

    @property
    def length(self) -> int:
        return self.body.length if isinstance(self.body, _FileSlice) else len(self.body)


class _TokenBucket:
    """Shared pacing for all response bodies: the aggregate rate stays under ``rate`` bytes/second.

    A virtual clock advances by ``n / rate`` per reservation; idle time earns back at most
    ``burst_s`` seconds of credit, which makes this a token bucket of ``rate * burst_s`` bytes.
    """

    def __init__(self, rate: float, burst_s: float = 0.05) -> None:
        if rate <= 0:
            raise ValueError("bandwidth must be > 0 bytes/second")
        self.rate = rate
        self.burst_s = burst_s
        self.chunk = int(min(_CHUNK, max(1024, rate * burst_s)))  # ~50 ms per chunk: smooth pacing
        self._next = 0.0
        self._lock = threading.Lock()

    def reserve(self, n: int) -> float:
        """Book ``n`` bytes; returns how long to wait before sending them."""
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now - self.burst_s) + n / self.rate
            return self._next - now


class _OriginServer(ThreadingHTTPServer):
    """One listening socket ("hub" or "cdn") of a :class:`HubServer`."""

    daemon_threads = True
    block_on_close = False  # HubServer.stop() joins handler threads itself, with a deadline
    request_queue_size = 128  # snapshot_download opens 8+ connections at once

    def __init__(self, hub: HubServer, origin: str, port: int) -> None:
        self.hub = hub
        self.origin = origin
        super().__init__((_LOOPBACK, port), _Handler)

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
        )
        with hub._in_flight():
            body = self._read_request_body()
            delay, action = hub._take_request_faults(ctx)
            stopped = bool(delay) and hub._stop_event.wait(delay)
            if stopped or (action is not None and action.reset):
                hub._finish(hub._log(ctx, status=None, file=None))
                self._reset_connection()
                return
            try:
                if action is not None:
                    response = _fault_response(action)
                elif body is None:
                    response = _HttpError(400, None, "unsupported request body").response()
                    self.close_connection = True  # the unread body would be taken for the next request
                else:
                    response = self._route(split.path, split.query, body)
            except _HttpError as error:
                response = error.response()
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
        if self.server.origin == "cdn":
            return self._route_cdn(segments)
        params = {k.lower(): v[-1].lower() for k, v in parse_qs(query).items()}
        if segments[:2] == ["api", "models"]:
            return self._route_api(segments[2:], params, body)
        if self.command in ("GET", "HEAD") and "resolve" in segments[1:3]:
            candidates = ["/".join(segments[:2])] if segments[2:3] == ["resolve"] else []
            candidates += segments[:1] if segments[1] == "resolve" else []
            repo = self.server.hub._repo(candidates)
            rest = segments[len(repo.repo_id.split("/")) :]  # ["resolve", revision, *path]
            if len(rest) >= 3:
                return self._resolve(repo, rest[1], "/".join(rest[2:]))
        raise _HttpError(404, None, "Not Found")

    def _route_api(self, segments: list[str], params: dict[str, str], body: bytes) -> _Response:
        repo = self.server.hub._repo(["/".join(segments[:2]), segments[0] if segments else ""])
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
                return _Response.json(200, repo.tree(folder, params.get("recursive") in truthy))
        if self.command == "POST" and rest[:1] == ["paths-info"] and len(rest) == 2:
            repo.resolve(rest[1])
            return _Response.json(200, repo.paths_info(self._posted_paths(body)))
        raise _HttpError(404, None, "Not Found")

    def _posted_paths(self, body: bytes) -> list[str]:
        """``paths`` of a paths-info call: form-encoded (what huggingface_hub sends) or JSON."""
        text = body.decode("utf-8", "replace")
        if "json" in (self.headers.get("Content-Type") or ""):
            paths = json.loads(text or "{}").get("paths", [])
            return [paths] if isinstance(paths, str) else list(paths)
        return parse_qs(text, keep_blank_values=True).get("paths", [])

    def _resolve(self, repo: _Repo, revision: str, path: str) -> _Response:
        if repo.gated:
            self._check_gate(repo)
        commit = repo.resolve(revision)
        entry = repo.files.get(path)
        if entry is None:
            raise _HttpError(404, "EntryNotFound", f"Entry not found: {path}", commit)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{entry.etag}"'}
        if entry.is_lfs:
            headers.update({"X-Linked-Etag": f'"{entry.etag}"', "X-Linked-Size": str(entry.size)})
        cdn_url = self.server.hub._cdn_base
        if entry.is_lfs and cdn_url is not None:
            # Like the real Hub: an absolute redirect to another origin. huggingface_hub's HEAD does not
            # follow it (metadata comes from this response, `location` is the CDN URL) and it drops the
            # Authorization header for the download; httpx drops it when a GET follows the redirect.
            location = f"{cdn_url}/cdn/{entry.sha256}/{quote(Path(path).name)}"
            return _Response(302, {**headers, "Location": location}, file=path)
        return self._file_response(entry, headers)

    def _check_gate(self, repo: _Repo) -> None:
        auth = self.headers.get("Authorization")
        if auth is None:
            raise _HttpError(401, "GatedRepo", f"Access to {repo.repo_id} is restricted. Please log in.")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _HttpError(403, "GatedRepo", f"Access to {repo.repo_id} is restricted. Use a bearer token.")

    def _route_cdn(self, segments: list[str]) -> _Response:
        is_cdn_path = len(segments) == 3 and segments[0] == "cdn"
        entry = self.server.hub._cdn_entry(segments[1]) if is_cdn_path else None
        if entry is None or self.command not in ("GET", "HEAD"):
            raise _HttpError(404, None, "NoSuchKey")
        return self._file_response(entry, {"ETag": f'"{entry.etag}"'})

    def _file_response(self, entry: _RepoFile, headers: dict[str, str]) -> _Response:
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        try:
            byte_range = _parse_range(self.headers.get("Range"), entry.size)
        except _RangeNotSatisfiable:
            headers["Content-Range"] = f"bytes */{entry.size}"
            return _Response(416, headers, file=entry.path)
        if byte_range is None:
            return _Response(200, headers, _FileSlice(entry.disk, 0, entry.size), entry.path)
        first, last = byte_range
        headers["Content-Range"] = f"bytes {first}-{last}/{entry.size}"
        return _Response(206, headers, _FileSlice(entry.disk, first, last - first + 1), entry.path)

    # -- response writing -------------------------------------------------------------------------

    def _send(self, ctx: _RequestContext, response: _Response, head_only: bool) -> None:
        hub = self.server.hub
        length = response.length
        limit = hub._take_truncate_fault(ctx) if not head_only and length > 0 else None
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        if self._served >= _MAX_REQUESTS_PER_CONNECTION or limit is not None:
            self.send_header("Connection", "close")
        record = hub._log(ctx, status=response.status, file=response.file)
        try:
            self.end_headers()
            count = length if limit is None else min(limit, length)
            if not head_only and self._write_body(record, response.body, count) < length:
                self.close_connection = True  # cut short (fault, stop, or the file shrank): client sees EOF
        finally:
            hub._finish(record)

    def _write_body(self, record: RequestRecord, body: bytes | _FileSlice, count: int) -> int:
        """Write up to ``count`` body bytes, paced by the bandwidth cap; returns how many were written."""
        hub = self.server.hub
        written = 0
        for chunk in _body_chunks(body, count, hub._chunk_size()):
            wait = hub._reserve(len(chunk))
            if wait > 0 and hub._stop_event.wait(wait):
                break
            hub._count(record, len(chunk))  # counted first: the log is complete once the client has it
            try:
                self.wfile.write(chunk)
            except OSError:
                hub._count(record, -len(chunk))
                raise
            written += len(chunk)
        return written

    def _reset_connection(self) -> None:
        """Abort with a TCP RST and no response, like a crashed proxy."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()


def _fault_response(fault: Fault) -> _Response:
    assert fault.status is not None
    headers = {"X-Error-Message": f"injected fault: HTTP {fault.status}"}
    if fault.retry_after is not None:
        headers["Retry-After"] = str(fault.retry_after)
    return _Response.json(fault.status, {"error": f"injected fault: HTTP {fault.status}"}, headers)


def _body_chunks(body: bytes | _FileSlice, count: int, chunk_size: int) -> Iterator[bytes]:
    """At most ``count`` bytes of the body, in chunks; file bodies are read from disk as they go."""
    if isinstance(body, bytes):
        view = memoryview(body)[:count]
        for offset in range(0, len(view), chunk_size):
            yield bytes(view[offset : offset + chunk_size])
        return
    with body.path.open("rb") as fh:
        fh.seek(body.start)
        remaining = count
        while remaining > 0:
            chunk = fh.read(min(chunk_size, remaining))
            if not chunk:
                return  # the file shrank since add_repo(); the caller closes the connection
            remaining -= len(chunk)
            yield chunk


# --------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------


class HubServer:
    """A local Hub: serves folders as model repos over HTTP/1.1 on 127.0.0.1.

    Use it as a context manager (``with HubServer() as hub:``) or call :meth:`start`/:meth:`stop`.
    Point ``huggingface_hub`` at :attr:`url` (``HF_ENDPOINT`` before importing it, or ``endpoint=``).

    ``bandwidth`` caps the bytes/second of all response bodies together (both origins), to show how
    a cold start behaves on a slow link. ``redirect_lfs`` answers ``/resolve/`` of LFS files with a
    302 to a second origin (:attr:`cdn_url`), like the real Hub's CDN, so the client-side handling of
    redirects (``location``, Authorization stripping) is exercised.
    """

    def __init__(
        self,
        host: str = _LOOPBACK,
        port: int = 0,
        bandwidth: float | None = None,
        redirect_lfs: bool = False,
    ) -> None:
        if host not in (_LOOPBACK, "localhost"):
            raise ValueError("HubServer only binds 127.0.0.1: it serves test data without any access control")
        self._port = port
        self._redirect_lfs = redirect_lfs
        self._bucket = _TokenBucket(bandwidth) if bandwidth is not None else None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stop_event = threading.Event()
        self._repos: dict[str, _Repo] = {}
        self._cdn_index: dict[str, _RepoFile] = {}
        self._log_records: list[RequestRecord] = []
        self._faults: list[Fault] = []
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._active = 0
        self._servers: list[_OriginServer] = []
        self._threads: list[threading.Thread] = []
        self._cdn_base: str | None = None  # set while started with redirect_lfs

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> HubServer:
        """Bind the socket(s) and serve in background daemon threads; returns self."""
        if self._servers:
            raise RuntimeError("HubServer already started")
        self._stop_event.clear()
        try:
            self._servers.append(_OriginServer(self, "hub", self._port))
            if self._redirect_lfs:
                self._servers.append(_OriginServer(self, "cdn", 0))
        except OSError:
            for srv in self._servers:
                srv.server_close()
            self._servers = []
            raise
        self._cdn_base = self.cdn_url
        for srv in self._servers:
            # A short poll interval makes stop() quick: tests start many servers.
            thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Close both sockets and all connections, and join the threads (bounded: about 2 s at most)."""
        if not self._servers:
            return
        self._stop_event.set()  # wakes handlers sleeping on a delay or the bandwidth cap
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
        self._servers, self._threads, self._cdn_base = [], [], None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The Hub endpoint, e.g. ``http://127.0.0.1:PORT`` (what ``HF_ENDPOINT`` should be)."""
        return self._origin_url("hub")

    @property
    def cdn_url(self) -> str | None:
        """The second origin LFS downloads are redirected to, or None without ``redirect_lfs``."""
        return self._origin_url("cdn") if self._redirect_lfs else None

    @property
    def bandwidth(self) -> float | None:
        """The shared cap in bytes/second (None: unlimited); can be changed while serving."""
        bucket = self._bucket
        return bucket.rate if bucket is not None else None

    @bandwidth.setter
    def bandwidth(self, rate: float | None) -> None:
        self._bucket = _TokenBucket(rate) if rate is not None else None

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
        repo = _Repo.scan(repo_id, folder, gated)
        with self._lock:
            self._repos[repo_id] = repo
            self._cdn_index.update({f.sha256: f for f in repo.files.values() if f.sha256 is not None})
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

    def _origin_url(self, origin: str) -> str:
        for srv in self._servers:
            if srv.origin == origin:
                return f"http://{_LOOPBACK}:{srv.server_address[1]}"
        raise RuntimeError("HubServer is not started")

    def _repo(self, candidates: list[str]) -> _Repo:
        with self._lock:
            for repo_id in candidates:
                if repo_id in self._repos:
                    return self._repos[repo_id]
        raise _HttpError(404, "RepoNotFound", "Repository not found")

    def _cdn_entry(self, sha256: str) -> _RepoFile | None:
        with self._lock:
            return self._cdn_index.get(sha256)

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
                if fault.truncate_after is not None or not self._fault_matches(fault, ctx):
                    continue
                if fault.delay is not None:
                    delay += fault.delay
                elif action is None:
                    action = fault
                else:
                    continue
                fault.fired += 1
                ctx.faults.append(fault.describe())
        return delay, action

    def _take_truncate_fault(self, ctx: _RequestContext) -> int | None:
        with self._lock:
            for fault in self._faults:
                if fault.truncate_after is not None and self._fault_matches(fault, ctx):
                    fault.fired += 1
                    ctx.faults.append(fault.describe())
                    return fault.truncate_after
        return None

    @staticmethod
    def _fault_matches(fault: Fault, ctx: _RequestContext) -> bool:
        return fault._matches(ctx.method, ctx.path, ctx.origin, ctx.range is not None)

    def _log(self, ctx: _RequestContext, status: int | None, file: str | None) -> RequestRecord:
        record = RequestRecord(
            time=ctx.start,
            method=ctx.method,
            path=ctx.path,
            query=ctx.query,
            origin=ctx.origin,
            range=ctx.range,
            authorization=ctx.authorization is not None,
            status=status,
            file=file,
            fault=", ".join(ctx.faults) or None,
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

    def _chunk_size(self) -> int:
        bucket = self._bucket
        return bucket.chunk if bucket is not None else _CHUNK

    def _reserve(self, n: int) -> float:
        bucket = self._bucket
        return bucket.reserve(n) if bucket is not None else 0.0
