"""Lazy Hub streaming: a model's weight bytes arrive by HTTP range requests, in the order its forward pass reads them.

Why: ``from_pretrained`` downloads every shard before it builds the model, so the first token of a cold start waits
for ``download + load + compute``. Here ``from_pretrained`` fetches only configs, the index and each shard's
safetensors header; the bytes of each block are fetched when the engine reads them (and, on idle connections, the
bytes it will read next), so downloading overlaps computing and the first token waits for about
``max(download, compute)``.

Bytes fetched are never thrown away. They go into a sparse partial file inside the repo's Hub cache folder, with a
record of the ranges it holds; a later run, or a second process, reads what is there and fetches only the rest.
When a shard is complete (the forward pass read it all, or the background filler fetched the rest), its sha256 is
checked against the LFS etag and it is moved into ``blobs/<etag>`` with its ``snapshots/<commit>/`` symlink, exactly
where ``hf_hub_download`` would have put it, so a later plain ``from_pretrained`` (even offline) finds it.

One job per class:

- `RangeSet`: which byte ranges of a file we hold.
- `HubRepo`, `RemoteFile`: what we fetch from (a repo pinned at one commit; one file of it and its URL).
- `RangeFetcher`: one byte range over HTTP, every answer checked (206 + the Content-Range we asked for + the
  length), retried with huggingface_hub's backoff, resumed after a cut.
- `PartialFile`: the partial file and its record on disk, crash-safe and shared between processes.
- `ShardStream`: one remote shard: which bytes are present or being fetched, and its way into the cache.
- `Recorder`: makes fetched bytes durable (fsync, then record) and commits complete shards.
- `FetchScheduler`, `Background`: the connections of one model; demand reads first, then readahead in execution
  order, then the filler.
- `ByteProgress`: the per-model tqdm bar.
- `HubSource`: the `ByteSource` the engine reads from; cached shards are read in place like `LocalFileSource`.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx2
import torch
from huggingface_hub import HfApi, ResolvedRevision, constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError
from huggingface_hub.utils import WeakFileLock, build_hf_headers, hf_raise_for_status, http_stream_backoff
from huggingface_hub.utils import tqdm as hf_tqdm

# Private helpers of huggingface_hub 2.4 (file_download.py), used so the cache entries we write are exactly the ones
# hf_hub_download writes (permissions, relative symlinks or copies where symlinks are unsupported, atomic refs).
from huggingface_hub.file_download import (  # isort: skip
    REGEX_COMMIT_HASH,
    _cache_commit_hash_for_specific_revision,
    _check_disk_space,
    _chmod_and_move,
    _create_symlink,
    repo_folder_name,
)

from .engine import StreamEngine
from .errors import CheckpointError, StreamingRuntimeError
from .sources import LocalFileSource, map_range

logger = logging.getLogger(__name__)

SUBRANGE_BYTES = 8 << 20  # a read larger than this is fetched as parallel sub-ranges of about this size
FILL_CHUNK_BYTES = 4 << 20  # one background-filler request: small, so a demand read never waits long behind it
READAHEAD_BYTES = 1 << 30  # how far ahead of the forward pass (in its read order) idle connections fetch to disk
BODY_CHUNK_BYTES = 256 << 10  # response bytes handed to the partial file at a time (small: each thread allocates it)
HASH_CHUNK_BYTES = 8 << 20
PARTIAL_FOLDER = Path(".weightstream") / "partial"
MAX_MISMATCHES = 2  # complete files whose sha256 did not match before we stop refetching one
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard one range is tried before the error reaches the user.

    ``http_retries`` go to huggingface_hub's ``http_stream_backoff`` (429 with Retry-After, 5xx, connection errors
    before the answer); ``attempts`` bound the resumes after a cut body or a stall (a try that made progress does not
    count). Waits double from ``base_wait`` up to ``max_wait`` seconds.
    """

    attempts: int = 5
    http_retries: int = 5
    base_wait: float = 1.0
    max_wait: float = 8.0


RETRY = RetryPolicy()


class RangeFetchError(CheckpointError):
    """A byte range of a Hub file could not be fetched; what was fetched before is kept for the next run."""


class ShardNotInRepoError(CheckpointError):
    """A weight file the checkpoint names is not in the repo at the pinned commit."""

    def __init__(self, shard: str, message: str) -> None:
        super().__init__(message)
        self.shard = shard


class _Cancelled(Exception):
    """The source was closed while a fetch was running."""


class _Superseded(Exception):
    """The partial file was committed or discarded by another process (or thread) meanwhile."""


class _Interrupted(Exception):
    """A response body stopped early (cut, reset, stall); the bytes before are good."""


# ------------------------------------------------------------------------------------------------ ranges
class RangeSet:
    """Disjoint, sorted half-open byte ranges ``[start, end)``; touching ranges are merged."""

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._ranges: list[tuple[int, int]] = []
        for start, end in ranges:
            self.add(start, end)

    def add(self, start: int, end: int) -> None:
        if start >= end:
            return
        kept = []
        for s, e in self._ranges:
            if e < start or s > end:
                kept.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        kept.append((start, end))
        kept.sort()
        self._ranges = kept

    def update(self, other: Iterable[tuple[int, int]]) -> None:
        for start, end in other:
            self.add(start, end)

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of ``[start, end)`` not covered."""
        out = []
        pos = start
        for s, e in self._ranges:
            if e <= pos:
                continue
            if s >= end:
                break
            if s > pos:
                out.append((pos, s))
            pos = e
            if pos >= end:
                break
        if pos < end:
            out.append((pos, end))
        return out

    def covers(self, start: int, end: int) -> bool:
        return not self.gaps(start, end)

    @property
    def total(self) -> int:
        return sum(e - s for s, e in self._ranges)

    def copy(self) -> RangeSet:
        clone = RangeSet()
        clone._ranges = list(self._ranges)
        return clone

    def as_list(self) -> list[list[int]]:
        return [[s, e] for s, e in self._ranges]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(list(self._ranges))

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def __repr__(self) -> str:
        return f"RangeSet({self._ranges})"


def _even_pieces(start: int, end: int, limit: int) -> list[tuple[int, int]]:
    """Split ``[start, end)`` into equal pieces of at most ``limit`` bytes (equal, so parallel pieces end together)."""
    count = max(1, -(-(end - start) // limit))
    step = -(-(end - start) // count)
    return [(s, min(s + step, end)) for s in range(start, end, step)]


def _join(threads: list[threading.Thread], timeout: float) -> bool:
    """Join ``threads`` within ``timeout`` seconds in all; True if they all ended. Skips the calling thread: a
    finalizer runs on whichever thread triggered the garbage collection, possibly one of ours."""
    deadline = time.monotonic() + timeout
    me = threading.current_thread()
    for thread in threads:
        if thread is not me:
            thread.join(max(0.0, deadline - time.monotonic()))
    return not any(t.is_alive() and t is not me for t in threads)


def _pread_into(fd: int, offset: int, out: memoryview, name: str) -> None:
    done = 0
    while done < len(out):
        n = os.preadv(fd, [out[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{name}: unexpected end of file at byte {offset + done}.")
        done += n


def _pwrite_all(fd: int, offset: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


# ------------------------------------------------------------------------------------------------ what we fetch
@dataclass(frozen=True)
class HubRepo:
    """A model repo pinned at one commit, and the Hub cache its files go to."""

    repo_id: str
    revision: str  # what the user asked for, e.g. "main": written to refs/ like hf_hub_download does
    commit: str
    cache_dir: Path
    token: str | bool | None
    subfolder: str
    offline: bool
    force_download: bool

    @classmethod
    def pin(cls, repo_id: str, download_kwargs: dict[str, Any]) -> HubRepo:
        """Resolve the revision to a commit once (transformers usually did already: a ``ResolvedRevision``)."""
        revision = download_kwargs.get("revision") or constants.DEFAULT_REVISION
        token = download_kwargs.get("token")
        cache_dir = Path(download_kwargs.get("cache_dir") or constants.HF_HUB_CACHE).expanduser().resolve()
        offline = bool(download_kwargs.get("local_files_only")) or constants.is_offline_mode()
        if isinstance(revision, ResolvedRevision):
            commit = revision.resolved
        elif REGEX_COMMIT_HASH.fullmatch(revision):
            commit = revision
        else:
            commit = (
                HfApi(token=token)
                .resolve_revision(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline)
                .resolved
            )
        return cls(
            repo_id=repo_id,
            revision=str(revision),
            commit=commit,
            cache_dir=cache_dir,
            token=token,
            subfolder=download_kwargs.get("subfolder") or "",
            offline=offline,
            force_download=bool(download_kwargs.get("force_download")),
        )

    @property
    def storage_folder(self) -> Path:
        return self.cache_dir / repo_folder_name(repo_id=self.repo_id, repo_type="model")

    def path_in_repo(self, shard: str) -> str:
        return f"{self.subfolder}/{shard}" if self.subfolder else shard

    def pointer_path(self, shard: str) -> Path:
        return self.storage_folder / "snapshots" / self.commit / self.path_in_repo(shard)

    def blob_path(self, etag: str) -> Path:
        return self.storage_folder / "blobs" / etag

    def hf_lock_path(self, etag: str) -> Path:
        """The lock huggingface_hub takes around writing ``blobs/<etag>`` (``<cache>/.locks/<repo_folder>/``)."""
        return self.cache_dir / ".locks" / self.storage_folder.name / f"{etag}.lock"

    def link_snapshot(self, shard: str, etag: str, new_blob: bool) -> Path:
        """Point ``snapshots/<commit>/<file>`` at the blob and record ``refs/<revision>``, as hf_hub_download does."""
        pointer = self.pointer_path(shard)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        lock = self.hf_lock_path(etag)
        lock.parent.mkdir(parents=True, exist_ok=True)
        with WeakFileLock(lock):
            if not pointer.exists():
                _create_symlink(str(self.blob_path(etag)), str(pointer), new_blob=new_blob)
        _cache_commit_hash_for_specific_revision(str(self.storage_folder), self.revision, self.commit)
        return pointer


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


@dataclass(eq=False)
class RemoteFile:
    """One shard of a pinned repo: its LFS etag (= sha256), size, and where range requests go."""

    repo: HubRepo
    shard: str  # name in the checkpoint index
    etag: str
    size: int
    url: str  # /resolve/<commit>/<path>
    location: str  # the CDN URL after a redirect, else ``url``
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._set_headers()

    def _set_headers(self) -> None:
        headers = build_hf_headers(token=self.repo.token)
        if _origin(self.location) != _origin(self.url):
            headers.pop("authorization", None)  # a token never leaves the Hub for a CDN
        headers["Accept-Encoding"] = "identity"  # byte offsets are offsets of the file, not of a gzip stream
        self.headers = headers

    @classmethod
    def resolve(cls, repo: HubRepo, shard: str) -> RemoteFile:
        """HEAD the file (huggingface_hub's ``get_hf_file_metadata``: etag, size, commit, CDN location)."""
        url = hf_hub_url(repo.repo_id, repo.path_in_repo(shard), revision=repo.commit)
        try:
            meta = get_hf_file_metadata(url, token=repo.token, retry_on_errors=True)
        except RemoteEntryNotFoundError as err:
            raise ShardNotInRepoError(shard, str(err)) from err
        if meta.etag is None or meta.size is None:
            raise CheckpointError(
                f"The Hub did not report the ETag and size of {repo.path_in_repo(shard)} in {repo.repo_id}; "
                "check HF_ENDPOINT and your proxy."
            )
        return cls(repo, shard, meta.etag, meta.size, url, meta.location)

    def refresh_location(self) -> None:
        """Ask the Hub for a fresh CDN URL (signed CDN URLs expire during long runs)."""
        self.location = get_hf_file_metadata(self.url, token=self.repo.token, retry_on_errors=True).location
        self._set_headers()

    def describe(self, start: int | None = None, end: int | None = None) -> str:
        where = f"{self.repo.path_in_repo(self.shard)} of {self.repo.repo_id}@{self.repo.commit[:8]}"
        return where if start is None else f"bytes {start}-{end - 1} of {where}"


# ------------------------------------------------------------------------------------------------ HTTP
class RangeFetcher:
    """Fetches one byte range over HTTP with huggingface_hub's session, headers and backoff.

    Every answer is checked before a byte is used: status 206, a Content-Range equal to the range asked for (and the
    file size the Hub reported), a body of exactly that length. Anything else is an error, never silently wrong
    bytes. A body cut short, reset or stalled past ``HF_HUB_DOWNLOAD_TIMEOUT`` is resumed from the last byte
    received, after a backoff wait.
    """

    def __init__(self, on_bytes: Callable[[int], None], cancelled: threading.Event) -> None:
        self._on_bytes = on_bytes
        self._cancelled = cancelled

    def fetch(self, remote: RemoteFile, start: int, end: int, sink: Callable[[int, bytes], None]) -> None:
        """Call ``sink(offset, chunk)`` for consecutive chunks covering ``[start, end)``."""
        policy = RETRY
        position = start
        failures = 0
        wait = policy.base_wait
        refreshed = False

        def consume(offset: int, chunk: bytes) -> None:
            nonlocal position
            sink(offset, chunk)
            position = offset + len(chunk)
            self._on_bytes(len(chunk))

        while position < end:
            before = position
            try:
                self._request(remote, position, end, consume, policy)
                return
            except _Interrupted as cut:
                error: BaseException = cut.__cause__ or cut
            except HfHubHTTPError as err:
                status = err.response.status_code
                if status == 403 and not refreshed and remote.location != remote.url:
                    refreshed = True  # most likely an expired signed CDN URL
                    remote.refresh_location()
                    continue
                if status in _RETRY_STATUS:  # http_stream_backoff already waited and retried
                    raise self._gave_up(remote, position, end, err) from err
                raise  # 401/403/404...: huggingface_hub's own error (GatedRepoError, RepositoryNotFoundError...)
            except httpx2.TransportError as err:  # could not even get an answer, after http_stream_backoff's retries
                raise self._gave_up(remote, position, end, err) from err
            if position > before:
                failures, wait = 0, policy.base_wait
            failures += 1
            if failures >= policy.attempts:
                raise self._gave_up(remote, position, end, error) from error
            logger.info("Resuming %s after %r", remote.describe(position, end), error)
            if self._cancelled.wait(wait):
                raise _Cancelled
            wait = min(policy.max_wait, wait * 2)

    def _request(
        self,
        remote: RemoteFile,
        start: int,
        end: int,
        consume: Callable[[int, bytes], None],
        policy: RetryPolicy,
    ) -> None:
        headers = {**remote.headers, "Range": f"bytes={start}-{end - 1}"}
        timeout = httpx2.Timeout(constants.HF_HUB_DOWNLOAD_TIMEOUT)  # read at call time: tests and users can lower it
        with http_stream_backoff(
            "GET",
            remote.location,
            headers=headers,
            timeout=timeout,
            max_retries=policy.http_retries,
            base_wait_time=policy.base_wait,
            max_wait_time=policy.max_wait,
        ) as response:
            # Errors raised in here must not be httpx's own: http_stream_backoff would catch them at its yield.
            position = start
            try:
                hf_raise_for_status(response)
                _check_range_answer(response, remote, start, end)
                for chunk in response.iter_raw(BODY_CHUNK_BYTES):  # no decoding: checked to be identity
                    if self._cancelled.is_set():
                        raise _Cancelled
                    if position + len(chunk) > end:
                        raise RangeFetchError(
                            f"The server sent more than the {end - start} bytes asked for "
                            f"({remote.describe(start, end)})."
                        )
                    consume(position, chunk)
                    position += len(chunk)
            except httpx2.TransportError as err:
                raise _Interrupted from err
            if position < end:
                raise _Interrupted from ConnectionError(f"body ended at byte {position}, expected {end}")

    @staticmethod
    def _gave_up(remote: RemoteFile, start: int, end: int, error: BaseException) -> RangeFetchError:
        return RangeFetchError(
            f"Could not fetch {remote.describe(start, end)} from the Hub ({type(error).__name__}: {error}). The bytes "
            "fetched so far are kept in the Hub cache: run again to resume from there."
        )


def _check_range_answer(response: httpx2.Response, remote: RemoteFile, start: int, end: int) -> None:
    got = response.headers.get("Content-Range")
    match = _CONTENT_RANGE.match(got or "")
    if response.status_code != 206 or match is None or tuple(map(int, match.groups())) != (start, end - 1, remote.size):
        raise RangeFetchError(
            f"Asked the server for {remote.describe(start, end)} (file size {remote.size}) and got HTTP "
            f"{response.status_code} with Content-Range {got!r}: refusing bytes that may not be the ones asked for."
        )
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise RangeFetchError(
            f"The server compressed {remote.describe(start, end)} (Content-Encoding: {encoding}) although identity "
            "was asked for: byte offsets would not be file offsets."
        )
    length = response.headers.get("Content-Length")
    if length is not None and length != str(end - start):
        raise RangeFetchError(
            f"Asked for {end - start} bytes ({remote.describe(start, end)}) and the server announced {length}."
        )


# ------------------------------------------------------------------------------------------------ disk
class _FileLock:
    """Exclusive between threads (an RLock) and processes (``flock`` on a descriptor kept open); reentrant within a
    thread. Taken for every body chunk written, so it must be cheap: ``filelock`` costs ~180 µs an acquisition and
    polls when contended; this is two syscalls and blocks."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd = -1

    def __enter__(self) -> None:
        self._thread_lock.acquire()
        try:
            if self._depth == 0:
                if self._fd < 0:
                    self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._depth += 1
        except BaseException:
            self._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def close(self) -> None:
        with self._thread_lock:
            if self._fd >= 0:
                os.close(self._fd)  # also drops the flock
                self._fd = -1


class PartialFile:
    """A sparse file holding some ranges of a remote file, plus a record of which ranges are on disk.

    Lives in ``<repo cache>/.weightstream/partial/<etag>.part`` (never in ``blobs/``, which only ever holds
    complete, verified files) with ``<etag>.ranges.json`` next to it.

    Crash safety: bytes are written and fsync'ed BEFORE the record naming them is replaced (temporary file, fsync,
    ``os.replace``), so after a ``kill -9`` or a power loss the record never names a byte that is not on disk; an
    interrupted write only costs refetching bytes the record does not name. Sharing: writes, record updates, commit
    and discard all happen under one file lock per partial file (reentrant within a thread, exclusive between
    threads and processes), the record is re-read and merged under it, and each write first checks that the path
    still names the file we hold open, so nothing is ever written into a file another process has committed.
    """

    def __init__(self, folder: Path, etag: str, size: int, label: dict[str, Any]) -> None:
        self.etag = etag
        self.size = size
        self.folder = folder
        self.data_path = folder / f"{etag}.part"
        self.record_path = folder / f"{etag}.ranges.json"
        self._lock = _FileLock(folder / f"{etag}.lock")
        self._label = label
        self.fd = -1
        self.generation = 0  # bumped whenever we switch to another file (new partial, or the committed blob)
        self._inode: int | None = None
        self._stamp: tuple[int, int, int] | None = None
        self._retired: list[int] = []  # old descriptors stay open: a reader may still be using one

    def locked(self) -> _FileLock:
        """Exclusive between threads and processes, reentrant within a thread."""
        return self._lock

    def open(self, blob: Path | None) -> RangeSet | None:
        """Open or create the partial file; the ranges on disk, or None if ``blob`` is already in the cache."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self.locked():
            if blob is not None and blob.exists():
                return None
            recorded = self._load_record() if self.data_path.exists() else None
            fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
            if os.fstat(fd).st_size != self.size:
                os.ftruncate(fd, self.size)  # sparse: holes take no disk space
                recorded = None
            if recorded is None:
                recorded = RangeSet()
                self._write_record(recorded)
                _check_disk_space(self.size, self.folder)
            self.adopt(fd)
            self._stamp = self._record_stamp()
            return recorded

    def adopt(self, fd: int) -> None:
        """Read and write ``fd`` from now on (the previous descriptor is kept open until `close`)."""
        if self.fd >= 0:
            self._retired.append(self.fd)
        self.fd = fd
        self._inode = os.fstat(fd).st_ino
        self.generation += 1

    def is_current(self) -> bool:
        try:
            return os.stat(self.data_path).st_ino == self._inode
        except FileNotFoundError:
            return False

    def write(self, offset: int, data: bytes, generation: int) -> None:
        with self.locked():
            if generation != self.generation or not self.is_current():
                raise _Superseded
            _pwrite_all(self.fd, offset, data)

    def sync_and_record(self, new: RangeSet, generation: int) -> RangeSet | None:
        """fsync the data, then add ``new`` (written to ``generation``) to the record; the merged record, or None if
        the file was replaced meanwhile."""
        os.fsync(self.fd)
        with self.locked():
            if generation != self.generation or not self.is_current():
                return None
            merged = self._load_record() or RangeSet()
            merged.update(new)
            self._write_record(merged)
            self._stamp = self._record_stamp()
            return merged

    def refresh(self) -> tuple[bool, RangeSet | None]:
        """(changed, record) if another process changed the record since we last looked: cheap ``stat`` otherwise."""
        stamp = self._record_stamp()
        if stamp == self._stamp:
            return False, None
        self._stamp = stamp
        return True, self._load_record()

    def sha256(self) -> str:
        digest = hashlib.sha256()
        buffer = bytearray(HASH_CHUNK_BYTES)
        view = memoryview(buffer)
        for offset in range(0, self.size, HASH_CHUNK_BYTES):
            n = min(HASH_CHUNK_BYTES, self.size - offset)
            _pread_into(self.fd, offset, view[:n], str(self.data_path))
            digest.update(view[:n])
        return digest.hexdigest()

    def discard(self) -> None:
        with self.locked():
            self.data_path.unlink(missing_ok=True)
            self.record_path.unlink(missing_ok=True)

    def close(self) -> None:
        for fd in [*self._retired, self.fd]:
            if fd >= 0:
                os.close(fd)
        self._retired, self.fd = [], -1
        self._lock.close()

    def _record_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.record_path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _load_record(self) -> RangeSet | None:
        try:
            record = json.loads(self.record_path.read_text())
            if record["etag"] != self.etag or record["size"] != self.size:
                return None
            return RangeSet((int(s), int(e)) for s, e in record["ranges"] if 0 <= int(s) < int(e) <= self.size)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_record(self, ranges: RangeSet) -> None:
        record = {**self._label, "etag": self.etag, "size": self.size, "ranges": ranges.as_list()}
        tmp = self.record_path.with_name(f"{self.record_path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.record_path)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power loss
        finally:
            os.close(dir_fd)


def recorded_bytes(repo: HubRepo, shard: str) -> int | None:
    """Bytes of ``shard`` held by a partial file of an earlier run (found without the network), or None."""
    folder = repo.storage_folder / PARTIAL_FOLDER
    name = repo.path_in_repo(shard)
    for path in folder.glob("*.ranges.json") if folder.is_dir() else ():
        try:
            record = json.loads(path.read_text())
            if record.get("filename") == name and record.get("commit") == repo.commit:
                return sum(int(e) - int(s) for s, e in record["ranges"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


# ------------------------------------------------------------------------------------------------ one shard
@dataclass(eq=False)
class _Claim:
    """A byte range one fetch has taken on; others needing it wait for ``done`` instead of fetching it again."""

    start: int
    end: int
    done: threading.Event = field(default_factory=threading.Event)


class ShardStream:
    """One remote shard: which of its bytes are present or in flight, fetching claimed ranges, and its commit.

    ``present`` is what this process may read from the partial file: what the record names (ours or another
    process's) plus what we wrote and have not recorded yet. Ranges being fetched are claimed, so a byte is fetched
    once even when a demand read, the readahead and the filler want it at the same time.
    """

    def __init__(
        self, remote: RemoteFile, partial: PartialFile, recorded: RangeSet, fetcher: RangeFetcher, on_change: Callable
    ) -> None:
        self.remote = remote
        self.partial = partial
        self._fetcher = fetcher
        self._on_change = on_change
        self._lock = threading.Lock()
        self.present = recorded.copy()
        self.unrecorded = RangeSet()
        self._claims: list[_Claim] = []
        self.committed: Path | None = None
        self.verified: str | None = None  # the sha256 we checked when we committed it
        self.failure: BaseException | None = None  # why the background stopped fetching this shard
        self._mismatches = 0

    @property
    def size(self) -> int:
        return self.remote.size

    def missing_bytes(self) -> int:
        with self._lock:
            return 0 if self.committed else self.size - self.present.total

    # -- claims ---------------------------------------------------------------------------------------
    def claim_missing(self, start: int, end: int, limit: int) -> tuple[list[_Claim], list[threading.Event], int]:
        """Claim what nobody holds or fetches in ``[start, end)`` (pieces of at most ``limit`` bytes).

        Returns the new claims, the events of claims others hold on the rest, and the descriptor holding the present
        bytes (it stays valid even if the partial file is replaced later).
        """
        self.refresh()
        with self._lock:
            if self.committed is not None:
                return [], [], self.partial.fd
            mine: list[_Claim] = []
            waits: list[threading.Event] = []
            for gap_start, gap_end in self.present.gaps(start, end):
                busy = [c for c in self._claims if c.start < gap_end and gap_start < c.end]
                waits.extend(c.done for c in busy)
                for s, e in RangeSet((c.start, c.end) for c in busy).gaps(gap_start, gap_end):
                    for piece_start, piece_end in _even_pieces(s, e, limit):
                        mine.append(_Claim(piece_start, piece_end))
            self._claims.extend(mine)
            return mine, waits, self.partial.fd

    def claim_next(self, start: int, end: int, limit: int) -> _Claim | None:
        """Claim the first byte range of ``[start, end)`` nobody holds or fetches (background work)."""
        self.refresh()
        with self._lock:
            if self.committed is not None or self.failure is not None:
                return None
            taken = self.present.copy()
            taken.update((c.start, c.end) for c in self._claims)
            gaps = taken.gaps(start, end)
            if not gaps:
                return None
            claim = _Claim(gaps[0][0], min(gaps[0][1], gaps[0][0] + limit))
            self._claims.append(claim)
            return claim

    def release(self, claim: _Claim) -> None:
        """Give back a claim that was never fetched."""
        self._settle(claim, claim.start, self.partial.generation)

    def _settle(self, claim: _Claim, upto: int, generation: int) -> None:
        with self._lock:
            self._claims.remove(claim)
            if upto > claim.start and generation == self.partial.generation and self.committed is None:
                self.present.add(claim.start, upto)
                self.unrecorded.add(claim.start, upto)
        claim.done.set()
        self._on_change()

    # -- fetching -------------------------------------------------------------------------------------
    def fetch(self, claim: _Claim, out: memoryview | None) -> None:
        """Fetch a claimed range into the partial file and, for a demand read, into ``out`` (its buffer)."""
        generation = self.partial.generation
        written = claim.start
        superseded = False

        def sink(offset: int, chunk: bytes) -> None:
            nonlocal written, superseded
            if out is not None:
                out[offset - claim.start : offset - claim.start + len(chunk)] = chunk
            if superseded:
                return
            try:
                self.partial.write(offset, chunk, generation)
            except _Superseded:
                superseded = True
                if out is None:
                    raise
            else:
                written = offset + len(chunk)

        try:
            self._fetcher.fetch(self.remote, claim.start, claim.end, sink)
        finally:
            self._settle(claim, written, generation)
            if superseded:
                self.reconcile()

    # -- other processes --------------------------------------------------------------------------------
    def refresh(self) -> None:
        """Take in ranges another process recorded (a ``stat`` when nothing changed)."""
        if self.committed is not None:
            return
        changed, record = self.partial.refresh()
        if not changed:
            return
        if record is None:
            self.reconcile()  # committed or discarded elsewhere
            return
        with self._lock:
            self.present.update(record)

    def reconcile(self) -> None:
        """Our partial file was committed or discarded by someone else: follow it."""
        blob = self.remote.repo.blob_path(self.remote.etag)
        with self.partial.locked():
            if self.committed is not None or self.partial.is_current():
                return
            if blob.exists():
                self.partial.adopt(os.open(blob, os.O_RDONLY))
                with self._lock:
                    self._mark_committed(blob)
                self.remote.repo.link_snapshot(self.remote.shard, self.remote.etag, new_blob=False)
            else:
                recorded = self.partial.open(blob) or RangeSet()
                with self._lock:
                    self.present, self.unrecorded = recorded, RangeSet()
        self._on_change()

    # -- durability and commit ----------------------------------------------------------------------------
    def take_unrecorded(self) -> tuple[RangeSet, int]:
        """Ranges written but not yet recorded, and the partial file generation they were written to."""
        with self._lock:
            pending, self.unrecorded = self.unrecorded, RangeSet()
            return pending, self.partial.generation

    def retry_after_failure(self) -> None:
        """Let the background try again after a network or disk failure (not after repeated sha256 mismatches)."""
        with self._lock:
            if self._mismatches < MAX_MISMATCHES:
                self.failure = None

    def apply_record(self, record: RangeSet) -> None:
        with self._lock:
            self.present.update(record)

    def ready_to_commit(self) -> bool:
        with self._lock:
            return (
                self.committed is None
                and self.failure is None
                and not self.unrecorded
                and self.present.covers(0, self.size)
            )

    def commit(self) -> None:
        """Verify the complete partial file (sha256 == LFS etag) and move it into ``blobs/``; discard it if not."""
        remote, repo = self.remote, self.remote.repo
        blob = repo.blob_path(remote.etag)
        with self.partial.locked():
            if not self.partial.is_current():
                self.reconcile()
                return
            if blob.exists() and not repo.force_download:  # completed meanwhile (hf_hub_download, another process)
                self.partial.discard()
                new_blob = False
            else:
                digest = self.partial.sha256()
                if digest != remote.etag:
                    self._mismatch(digest, blob)
                    return
                blob.parent.mkdir(parents=True, exist_ok=True)
                lock = repo.hf_lock_path(remote.etag)
                lock.parent.mkdir(parents=True, exist_ok=True)
                with WeakFileLock(lock):
                    new_blob = repo.force_download or not blob.exists()
                    if new_blob:
                        _chmod_and_move(self.partial.data_path, blob)  # replaces the blob for force_download
                    else:
                        self.partial.data_path.unlink()
                self.partial.record_path.unlink(missing_ok=True)
                self.verified = digest
            with self._lock:
                self._mark_committed(blob)
        repo.link_snapshot(remote.shard, remote.etag, new_blob=new_blob)
        logger.info("%s is complete and verified: committed to %s", remote.describe(), blob)
        self._on_change()

    def _mark_committed(self, blob: Path) -> None:
        self.committed = blob
        self.present = RangeSet([(0, self.size)])
        self.unrecorded = RangeSet()

    def _mismatch(self, digest: str, blob: Path) -> None:
        self._mismatches += 1
        logger.warning(
            "%s: the downloaded file has sha256 %s but the Hub says %s. Discarding the %d bytes fetched and "
            "fetching the file again.",
            self.remote.describe(),
            digest,
            self.remote.etag,
            self.size,
        )
        self.partial.discard()
        recorded = self.partial.open(blob) or RangeSet()
        with self._lock:
            self.present, self.unrecorded = recorded, RangeSet()
            if self._mismatches >= MAX_MISMATCHES:
                self.failure = CheckpointError(
                    f"{self.remote.describe()} did not match its sha256 {self._mismatches} times in a row: the "
                    "server or the network corrupts it. Nothing was written to the cache."
                )


# ------------------------------------------------------------------------------------------------ threads
class Recorder:
    """Makes fetched bytes durable and commits complete shards, off the connections' threads.

    Group commit: one fsync and one record update cover every range that landed since the last one, so many
    parallel fetches cost one fsync instead of one each.
    """

    def __init__(self, streams: dict[str, ShardStream], on_commit: Callable[[], None]) -> None:
        self._streams = streams
        self._on_commit = on_commit
        self._wake = threading.Event()
        self._stopped = False
        self._flush_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def poke(self) -> None:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None and not self._stopped:
                    self._thread = threading.Thread(target=self._run, name="hf_weightstream-recorder", daemon=True)
                    self._thread.start()
        self._wake.set()

    def stop(self) -> None:
        """Record everything fetched so far (no commit: exiting stays quick; the next run commits)."""
        self._stopped = True
        self._wake.set()
        if self._thread is None or _join([self._thread], timeout=10):
            self.flush(commit=False)

    def _run(self) -> None:
        with contextlib.suppress(AttributeError, OSError):  # Linux: a nice value per thread; elsewhere no-op
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)  # hashing never slows the forward pass
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()
            if not self._stopped:
                try:
                    self.flush(commit=True)
                except Exception:  # noqa: BLE001 - keep recording the other shards; say what happened
                    logger.exception("hf_weightstream: recording fetched bytes failed")

    def flush(self, commit: bool) -> None:
        with self._flush_lock:
            for stream in list(self._streams.values()):
                try:
                    pending, generation = stream.take_unrecorded()
                    if pending:
                        record = stream.partial.sync_and_record(pending, generation)
                        if record is None:
                            stream.reconcile()
                        else:
                            stream.apply_record(record)
                    if commit and stream.ready_to_commit():
                        stream.commit()
                        self._on_commit()
                except OSError as err:  # disk full, permissions: the bytes stay usable in this process
                    logger.warning("Could not save the fetched bytes of %s: %s", stream.remote.describe(), err)
                    stream.failure = err
                    self._on_commit()


@dataclass(eq=False)
class _Job:
    """One HTTP range to fetch for a claim; ``out`` is the reader's buffer for a demand read.

    ``awaited`` jobs hand their error to the reader waiting for them; the others (background work, the rest of a
    planned range) report it themselves.
    """

    stream: ShardStream
    claim: _Claim
    out: memoryview | None = None
    awaited: bool = False
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            self.stream.fetch(self.claim, self.out)
        except BaseException as err:  # noqa: BLE001 - handed to the reader, or logged for background work
            self.error = err
        finally:
            self.finished.set()


class FetchScheduler:
    """The HTTP connections of one model: ``connections`` threads, demand jobs first, in the order they came.

    The engine asks for units in execution order, so first come is what the forward pass needs first. When no demand
    job is queued, an idle connection asks ``background(demand_running)`` for work; jobs from there are claimed
    when they start, never queued, so a demand read never waits behind queued low-priority work.
    """

    def __init__(self, connections: int, background: Callable[[bool], _Job | None]) -> None:
        self._connections = connections
        self._background = background
        self._cond = threading.Condition(threading.RLock())
        self._queue: collections.deque[_Job] = collections.deque()
        self._demand_running = 0
        self._threads: list[threading.Thread] = []
        self._stopped = False

    @property
    def lock(self) -> threading.Condition:
        """Held by a worker while it picks its next job (reentrant)."""
        return self._cond

    def submit(self, jobs: list[_Job]) -> None:
        with self._cond:
            if self._stopped:
                for job in jobs:
                    job.stream.release(job.claim)
                raise StreamingRuntimeError("This model's Hub source was closed; load the model again.")
            self._queue.extend(jobs)
            self._start_threads()
            self._cond.notify_all()

    def poke(self) -> None:
        with self._cond:
            self._start_threads()
            self._cond.notify_all()

    def stop(self, timeout: float) -> bool:
        """Fail queued jobs, let running ones end (they stop within one body chunk); True if all threads ended."""
        with self._cond:
            self._stopped = True
            queued, self._queue = list(self._queue), collections.deque()
            self._cond.notify_all()
        for job in queued:
            job.error = StreamingRuntimeError("This model's Hub source was closed while the read waited.")
            job.stream.release(job.claim)
            job.finished.set()
        return _join(self._threads, timeout)

    def _start_threads(self) -> None:
        while len(self._threads) < self._connections and not self._stopped:
            thread = threading.Thread(
                target=self._work, name=f"hf_weightstream-fetch-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    if self._queue:
                        job, demand = self._queue.popleft(), True
                        self._demand_running += 1
                        break
                    job, demand = self._background(self._demand_running > 0), False
                    if job is not None:
                        break
                    self._cond.wait(timeout=1.0)
            try:
                job.run()
                if not job.awaited and job.error is not None:
                    _background_failed(job)
            finally:
                if demand:
                    with self._cond:
                        self._demand_running -= 1
                        self._cond.notify_all()


def _background_failed(job: _Job) -> None:
    if isinstance(job.error, (_Cancelled, _Superseded)):
        return
    stream = job.stream
    if stream.failure is None:
        logger.warning(
            "Background download of %s stopped: %s. Reads of this model still fetch what they need; a later run "
            "(or wait_until_cached) resumes the download.",
            stream.remote.describe(),
            job.error,
        )
    stream.failure = job.error


class Background:
    """What idle connections fetch while the forward pass is not waiting.

    First the readahead: the byte ranges the forward pass will read next, in its read order (the units' order,
    handed over by `HubSource.expect_reads`), up to ``READAHEAD_BYTES`` past the last range it read. These go to the
    partial file, not to memory, so the weight budget is untouched, and the first pass (which traces the schedule
    and has no prefetch of its own) still overlaps downloading with computing. Then, with ``fill``, the rest of
    each shard in file order, in small chunks and only while no demand fetch runs at all, so that the file can be
    completed and committed to the cache. Nothing starts before the engine's first read: ``from_pretrained``
    returns with only the headers fetched.
    """

    def __init__(self, streams: dict[str, ShardStream], fill: bool) -> None:
        self.streams = streams
        self.fill = fill
        self.active = False
        self._order: list[tuple[ShardStream, int, int]] = []
        self._planned: dict[str, list[tuple[int, int, int]]] = {}  # shard -> sorted (start, end, position)
        self._position = -1

    def expect_reads(self, reads: list[tuple[str, int, int]]) -> None:
        self._order = [(self.streams[s], o, o + n) for s, o, n in reads if s in self.streams]
        planned: dict[str, list[tuple[int, int, int]]] = {}
        for position, (stream, start, end) in enumerate(self._order):
            planned.setdefault(stream.remote.shard, []).append((start, end, position))
        self._planned = {shard: sorted(spans) for shard, spans in planned.items()}

    def planned_range(self, shard: str, offset: int) -> tuple[int, int, int] | None:
        """The planned read (start, end, position) holding byte ``offset`` of ``shard``, if any."""
        spans = self._planned.get(shard, [])
        i = bisect.bisect_right(spans, (offset, float("inf"), 0)) - 1
        return spans[i] if i >= 0 and spans[i][0] <= offset < spans[i][1] else None

    def note_read(self, shard: str, offset: int) -> None:
        self.active = True
        planned = self.planned_range(shard, offset)
        if planned is not None:
            self._position = planned[2]

    def next_job(self, demand_running: bool) -> _Job | None:
        if not self.active:
            return None
        count = len(self._order)
        if count and self._position >= 0:
            ahead = 0
            for step in range(1, count + 1):
                if ahead >= READAHEAD_BYTES:
                    break
                stream, start, end = self._order[(self._position + step) % count]
                claim = stream.claim_next(start, end, SUBRANGE_BYTES)
                if claim is not None:
                    return _Job(stream, claim)
                ahead += end - start
        if self.fill and not demand_running:
            for stream in self.streams.values():
                claim = stream.claim_next(0, stream.size, FILL_CHUNK_BYTES)
                if claim is not None:
                    return _Job(stream, claim)
        return None


class ByteProgress:
    """One tqdm bar per model for the weight bytes fetched over the network.

    huggingface_hub's tqdm, so ``HF_HUB_DISABLE_PROGRESS_BARS`` turns it off. It appears with the first weight
    byte (header reads at load time are not shown) and closes when every shard is in the cache.
    """

    def __init__(self, desc: str) -> None:
        self._desc = desc
        self._lock = threading.Lock()
        self._bar: hf_tqdm | None = None
        self.total = 0
        self.armed = False

    def update(self, n: int) -> None:
        with self._lock:
            if not self.armed:
                return
            if self._bar is None:
                self._bar = hf_tqdm(
                    total=self.total or None,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=self._desc,
                    name="hf_weightstream",
                )
            self._bar.update(n)

    def close(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
            self.armed = False


@dataclass(frozen=True)
class CachedShard:
    """A shard in the standard Hub cache: its snapshot path, the blob behind it, and its sha256.

    ``verified`` is True when this process checked the sha256 before committing it; shards that were already in the
    cache at load time were not re-hashed (their blob is named by the etag hf_hub_download checked the size of).
    """

    path: Path
    blob: Path
    sha256: str
    verified: bool


class _Session:
    """Everything a HubSource's threads use. Threads hold this, never the HubSource, so dropping a model lets it be
    garbage collected, and its finalizer stops them."""

    def __init__(self, label: str, connections: int, fill: bool) -> None:
        self.cancelled = threading.Event()
        self.progress = ByteProgress(f"Streaming {label}")
        self.fetcher = RangeFetcher(self.progress.update, self.cancelled)
        self.streams: dict[str, ShardStream] = {}
        self.background = Background(self.streams, fill)
        self.scheduler = FetchScheduler(connections, self.background.next_job)
        self.recorder = Recorder(self.streams, self._state_changed)
        self.state = threading.Condition()
        self._closed = False

    def stream_changed(self) -> None:
        self.recorder.poke()
        self.scheduler.poke()

    def _state_changed(self) -> None:
        with self.state:
            self.state.notify_all()
        if all(s.committed is not None for s in self.streams.values()):
            self.progress.close()

    def ensure(
        self, stream: ShardStream, offset: int, end: int, out: memoryview | None, engine_read: bool
    ) -> tuple[int, RangeSet]:
        """A demand read: make ``[offset, end)`` present, fetching what is missing in parallel pieces.

        Bytes fetched here also go straight into ``out`` when given. Returns the descriptor that holds the bytes and
        the parts of ``out`` already filled. An ``engine_read`` (not a header read) moves the readahead to this
        range after its own fetches are queued, so they go out first; and when it reads only part of a planned
        range (an embedding's rows), the whole range is fetched in parallel pieces behind it: the engine reads rows
        one by one, and one round trip per row would cost far more than the rest of the range.
        """
        filled = RangeSet()
        planned = self.background.planned_range(stream.remote.shard, offset) if engine_read else None
        while True:
            # Under the workers' lock: no idle connection may see a range claimed here before its job is queued
            # (it would skip it and fetch something later in the order first).
            with self.scheduler.lock:
                claims, waits, fd = stream.claim_missing(offset, end, SUBRANGE_BYTES)
                jobs = [
                    _Job(stream, c, None if out is None else out[c.start - offset : c.end - offset], awaited=True)
                    for c in claims
                ]
                rest: list[_Job] = []
                if planned is not None and (claims or waits) and (planned[0], planned[1]) != (offset, end):
                    more, _, _ = stream.claim_missing(planned[0], planned[1], SUBRANGE_BYTES)
                    rest = [_Job(stream, c) for c in more]
                planned = None
                if jobs or rest:
                    self.scheduler.submit(jobs + rest)
                if engine_read:
                    engine_read = False
                    if not self.background.active:
                        self.progress.total = sum(s.missing_bytes() for s in self.streams.values())
                        self.progress.armed = True
                    self.background.note_read(stream.remote.shard, offset)
                    self.scheduler.poke()
            if not claims and not waits:
                return fd, filled
            for job in jobs:
                job.finished.wait()
            for event in waits:
                event.wait()
            errors = [job.error for job in jobs if job.error is not None and not isinstance(job.error, _Superseded)]
            if errors:
                raise errors[0]
            if out is not None:
                filled.update((job.claim.start, job.claim.end) for job in jobs if job.error is None)

    def read_into(self, stream: ShardStream, offset: int, out: memoryview, engine_read: bool) -> None:
        end = offset + len(out)
        fd, filled = self.ensure(stream, offset, end, out, engine_read)
        for start, stop in filled.gaps(offset, end):
            _pread_into(fd, start, out[start - offset : stop - offset], str(stream.partial.data_path))

    def map(self, stream: ShardStream, offset: int, length: int) -> torch.Tensor:
        # The descriptor we hold: the partial file may be renamed into blobs/ meanwhile.
        fd, _ = self.ensure(stream, offset, offset + length, None, engine_read=True)
        return map_range(fd, offset, length, str(stream.partial.data_path))

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.cancelled.set()
        clean = self.scheduler.stop(timeout=5.0)
        self.recorder.stop()
        self.progress.close()
        if clean:  # a thread still running might write through a descriptor: leave them open then
            for stream in self.streams.values():
                stream.partial.close()


# ------------------------------------------------------------------------------------------------ the source
class HubSource:
    """The `ByteSource` of a model from a Hub repo: cached shards are read in place, the others are streamed.

    Cached shards keep `LocalFileSource` semantics (positional reads from the blob, no HTTP). The other shards are
    served by `ShardStream`s over ``max_connections`` parallel range requests. ``complete_download`` starts the
    background filler (with the engine's first read) that completes and commits each shard.
    """

    def __init__(
        self,
        repo: HubRepo,
        local: dict[str, Path],
        remote: dict[str, RemoteFile],
        *,
        max_connections: int,
        complete_download: bool,
    ) -> None:
        self.repo = repo
        self.local_paths = dict(local)
        self._session = session = _Session(repo.repo_id, max_connections, complete_download)
        self.shard_sizes: dict[str, int] = {}
        self._finalizer = weakref.finalize(self, session.shutdown)
        try:
            for shard, remote_file in remote.items():
                stream = self._open_stream(remote_file)
                if stream is None:
                    self.local_paths[shard] = repo.pointer_path(shard)
                else:
                    session.streams[shard] = stream
                    self.shard_sizes[shard] = remote_file.size
        except BaseException:
            self.close()
            raise
        self._local = LocalFileSource(self.local_paths)
        for shard, path in self.local_paths.items():
            self.shard_sizes[shard] = os.path.getsize(path)

    def _open_stream(self, remote: RemoteFile) -> ShardStream | None:
        """A stream for ``remote``, or None once it is in the cache (a complete partial file is committed now)."""
        repo = remote.repo
        label = {"repo_id": repo.repo_id, "filename": repo.path_in_repo(remote.shard), "commit": repo.commit}
        partial = PartialFile(repo.storage_folder / PARTIAL_FOLDER, remote.etag, remote.size, label)
        blob = repo.blob_path(remote.etag)
        if repo.force_download:  # fetch every byte again, then replace the blob
            partial.discard()
        recorded = partial.open(None if repo.force_download else blob)
        if recorded is None:
            repo.link_snapshot(remote.shard, remote.etag, new_blob=False)
            return None
        stream = ShardStream(remote, partial, recorded, self._session.fetcher, self._session.stream_changed)
        if recorded.covers(0, remote.size):  # a run that ended between its last record and the commit
            stream.commit()
            if stream.committed is not None:
                partial.close()
                return None
        return stream

    @property
    def streamed_shards(self) -> list[str]:
        return list(self._session.streams)

    def read_into(self, shard: str, offset: int, out: memoryview) -> None:
        stream = self._session.streams.get(shard)
        if stream is None:
            self._local.read_into(shard, offset, out)
            return
        self._session.read_into(stream, offset, out, engine_read=True)

    def map(self, shard: str, offset: int, length: int) -> torch.Tensor:
        """A uint8 tensor viewing the bytes in place (CPU execution, see `LocalFileSource.map`): a cached shard's
        blob, or a streamed shard's partial file once the range is on disk."""
        stream = self._session.streams.get(shard)
        if stream is None:
            return self._local.map(shard, offset, length)
        return self._session.map(stream, offset, length)

    def read(self, shard: str, offset: int, length: int) -> bytes:
        """Bytes of a shard; used for headers, before the engine's first read starts any background work."""
        out = bytearray(length)
        stream = self._session.streams.get(shard)
        if stream is None:
            self._local.read_into(shard, offset, memoryview(out))
        else:
            self._session.read_into(stream, offset, memoryview(out), engine_read=False)
        return bytes(out)

    def expect_reads(self, reads: list[tuple[str, int, int]]) -> None:
        """The (shard, offset, length) reads of one forward pass, in execution order: the readahead order."""
        self._session.background.expect_reads(reads)

    def wait_until_cached(self, timeout: float | None = None) -> dict[str, CachedShard]:
        """Fetch the rest of every shard now (even with ``complete_download=False``) and wait for all commits."""
        session = self._session
        deadline = None if timeout is None else time.monotonic() + timeout
        for stream in session.streams.values():
            stream.retry_after_failure()
        session.background.fill = True
        session.background.active = True
        session.progress.armed = True
        session.stream_changed()
        with session.state:
            while True:
                pending = [s for s in session.streams.values() if s.committed is None]
                if not pending:
                    break
                failed = [s for s in pending if s.failure is not None]
                if failed:
                    raise CheckpointError(
                        f"Could not complete {failed[0].remote.describe()}: {failed[0].failure}"
                    ) from failed[0].failure
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    missing = sum(s.missing_bytes() for s in pending)
                    raise TimeoutError(
                        f"{len(pending)} shard(s) of {self.repo.repo_id} are not in the cache yet ({missing:,} bytes "
                        "to go); the download goes on in the background."
                    )
                session.state.wait(1.0 if remaining is None else min(1.0, remaining))
        result = {}
        for shard, path in self.local_paths.items():
            blob = path.resolve()
            result[shard] = CachedShard(path, blob, blob.name, verified=False)
        for shard, stream in session.streams.items():
            pointer = self.repo.pointer_path(shard)
            result[shard] = CachedShard(pointer, pointer.resolve(), stream.remote.etag, stream.verified is not None)
        return result

    def close(self) -> None:
        """Stop fetching (what was fetched is recorded for the next run) and close the files."""
        self._finalizer()
        if hasattr(self, "_local"):
            self._local.close()


def open_remote_shards(repo: HubRepo, shards: list[str], connections: int) -> dict[str, RemoteFile | None]:
    """HEAD every shard in parallel; None for a file that is not in LFS (no sha256 to verify: download it)."""
    with ThreadPoolExecutor(max_workers=max(1, min(connections, len(shards))), thread_name_prefix="hf_ws-head") as ex:
        metas = list(ex.map(lambda shard: RemoteFile.resolve(repo, shard), shards))
    return {m.shard: (m if _SHA256.fullmatch(m.etag) else None) for m in metas}


def wait_until_cached(model_or_source: Any, timeout: float | None = None) -> dict[str, CachedShard]:
    """Block until every shard of a model streamed from the Hub is complete, verified and in the Hub cache.

    Fetches what is missing now (also with ``complete_download=False``), then returns ``{shard: CachedShard}`` with
    the snapshot path, blob path and sha256 of every shard. For scripts that must leave a complete cache behind, and
    for tests. Raises ``TimeoutError`` after ``timeout`` seconds (the download continues in the background).
    """
    source = model_or_source
    if not isinstance(source, HubSource):
        from .integration import engine_of  # imported here: integration imports this module through checkpoint

        engine = source if isinstance(source, StreamEngine) else engine_of(source)
        checkpoint = getattr(engine, "checkpoint", None)  # set by from_pretrained; engine.source may be wrapped
        source = checkpoint.source if checkpoint is not None else engine.source
    if not isinstance(source, HubSource):
        raise StreamingRuntimeError(
            "This model was not streamed from the Hub (it was loaded from a local folder): nothing to wait for."
        )
    return source.wait_until_cached(timeout)
