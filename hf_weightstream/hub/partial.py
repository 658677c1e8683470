"""Partial files: the bytes of a shard fetched so far, the record of which ranges they are, and the ranges other
processes are fetching right now.

A shard being streamed lives in ``<repo cache>/.weightstream/partial/`` (never in ``blobs/``, which only ever
holds complete, verified files):

- ``<etag>.part``: a sparse file the size of the shard; fetched bytes are written at their offsets.
- ``<etag>.ranges.json``: the ranges of ``.part`` that are on disk, replaced atomically.
- ``<etag>.lock``: ``flock``-ed around every write, record update, commit and discard.
- ``<etag>.claims``: byte-range locks (Linux open-file-description locks) on the ranges a process is fetching, held
  until those bytes are recorded. A second process streaming the same shard waits for them instead of fetching
  them again, and the kernel drops the locks of a process that dies, so a ``kill -9`` leaves nothing to clean up.

Crash safety: bytes are written and fsync'ed BEFORE the record naming them is replaced (temporary file, fsync,
``os.replace``), so after a ``kill -9`` or a power loss the record never names a byte that is not on disk; an
interrupted write only costs refetching bytes the record does not name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import struct
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from . import _hf_compat as compat
from .ranges import RangeSet

PARTIAL_FOLDER = Path(".weightstream") / "partial"
HASH_CHUNK_BYTES = 8 << 20


class Superseded(Exception):
    """The partial file was committed or discarded by another process (or thread) meanwhile."""


def pread_into(fd: int, offset: int, out: memoryview, name: str) -> None:
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


# struct flock on Linux (x86-64, arm64): short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
_FLOCK = "hhqqi4x"
_OFD = sys.platform.startswith("linux") and hasattr(fcntl, "F_OFD_SETLK") and struct.calcsize(_FLOCK) == 32


class RangeLocks:
    """Byte-range locks on ``<etag>.claims``, shared between processes: who is fetching which range now.

    Open-file-description locks: owned by our one descriptor, so they never conflict with each other within this
    process (threads coordinate through in-memory claims) and do conflict with any other descriptor, so two
    sources of one shard in one process coordinate like two processes. Elsewhere than Linux this is a no-op:
    processes then share only what is recorded.
    """

    enabled = _OFD

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = -1
        self._lock = threading.Lock()

    def _descriptor(self) -> int:
        if self._fd < 0:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        return self._fd

    def _fcntl(self, command: int, kind: int, start: int, end: int) -> tuple[int, int, int]:
        data = struct.pack(_FLOCK, kind, os.SEEK_SET, start, end - start, 0)
        answer = fcntl.fcntl(self._descriptor(), command, data)
        kind, _whence, at, length, _pid = struct.unpack(_FLOCK, answer)
        return kind, at, length

    def acquire(self, start: int, end: int) -> bool:
        """Lock ``[start, end)`` unless another process holds part of it."""
        if not self.enabled or start >= end:
            return True
        with self._lock:
            try:
                self._fcntl(fcntl.F_OFD_SETLK, fcntl.F_WRLCK, start, end)
            except OSError as err:
                if err.errno in (errno.EAGAIN, errno.EACCES):
                    return False
                raise
            return True

    def release(self, start: int, end: int) -> None:
        if not self.enabled or start >= end:
            return
        with self._lock:
            if self._fd >= 0:
                self._fcntl(fcntl.F_OFD_SETLK, fcntl.F_UNLCK, start, end)

    def busy(self, start: int, end: int) -> RangeSet:
        """The parts of ``[start, end)`` other processes have locked."""
        out = RangeSet()
        if not self.enabled or start >= end:
            return out
        with self._lock:
            pending = [(start, end)]
            while pending:
                s, e = pending.pop()
                if s >= e:  # (a zero length would ask about everything up to the end of the file)
                    continue
                kind, at, length = self._fcntl(fcntl.F_OFD_GETLK, fcntl.F_WRLCK, s, e)
                if kind == fcntl.F_UNLCK:
                    continue
                lock_start = min(e, max(s, at))
                lock_end = e if length == 0 else max(lock_start, min(e, at + length))
                out.add(lock_start, lock_end)
                pending += [(s, lock_start), (lock_end, e)]  # GETLK names one conflicting lock, not the first
            return out

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)  # drops every lock we hold
                self._fd = -1


class PartialFile:
    """A sparse file holding some ranges of a remote file, its record, and the locks around them (module
    docstring).

    Writes, record updates, commit and discard all happen under one file lock (reentrant within a thread,
    exclusive between threads and processes); the record is re-read and merged under it, and each write first
    checks that the path still names the file we hold open, so nothing is ever written into a file another
    process has committed.
    """

    def __init__(self, folder: Path, etag: str, size: int, label: dict[str, Any]) -> None:
        self.etag = etag
        self.size = size
        self.folder = folder
        self.data_path = folder / f"{etag}.part"
        self.record_path = folder / f"{etag}.ranges.json"
        self._lock = _FileLock(folder / f"{etag}.lock")
        self.claims = RangeLocks(folder / f"{etag}.claims")
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
        with self.locked(), self._disk_full_explained():  # a new record is written: it needs room too
            if blob is not None and blob.exists():
                self.discard()  # what a run killed between committing and removing its record left behind
                return None
            recorded = self._load_record() if self.data_path.exists() else None
            fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT, 0o644)
            if os.fstat(fd).st_size != self.size:
                os.ftruncate(fd, self.size)  # sparse: holes take no disk space
                recorded = None
            if recorded is None:
                recorded = RangeSet()
                self._write_record(recorded)
                compat.check_disk_space(self.size, self.folder)
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
        with self.locked(), self._disk_full_explained():
            if generation != self.generation or not self.is_current():
                raise Superseded
            _pwrite_all(self.fd, offset, data)

    @contextlib.contextmanager
    def _disk_full_explained(self) -> Any:
        """A full disk (or quota) named with the folder and what to do, instead of a bare ``OSError``."""
        try:
            yield
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            name = self._label.get("filename", self.data_path.name)
            raise CheckpointError(
                f"No space left on the disk of the Hub cache to store {self.size:,} bytes of {name} ({self.folder}): "
                f"{err.strerror}. Free space there, or point HF_HUB_CACHE at a disk with room for the model. What was "
                "fetched so far is kept in the cache and a later run resumes from it."
            ) from err

    def sync_and_record(self, new: RangeSet, generation: int) -> RangeSet | None:
        """fsync the data, then add ``new`` (written to ``generation``) to the record; the merged record, or None if
        the file was replaced meanwhile."""
        with self._disk_full_explained():  # delayed allocation: a full disk can show only at fsync
            os.fsync(self.fd)
        with self.locked(), self._disk_full_explained():
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
            pread_into(self.fd, offset, view[:n], str(self.data_path))
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
        self.claims.close()
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


def sweep_committed(storage_folder: Path) -> None:
    """Remove the partial files of shards that are in ``blobs/`` (a run killed between moving a verified file into
    the cache and removing its record leaves the record behind)."""
    remove_partials(storage_folder)


def remove_partials(
    storage_folder: Path, unwanted: Callable[[dict[str, Any]], bool] | None = None
) -> list[dict[str, Any]]:
    """Remove the partial files of shards already in ``blobs/`` and those whose record ``unwanted`` rejects (an
    unreadable record is passed as ``{}``), except any another process is fetching right now (it holds claims on
    them); the records of what was removed. Without ``unwanted`` (each load's sweep) only the names are looked at
    until one is in ``blobs/``.

    Records left half-written by a killed process go too. Each is removed under its file lock, as
    `PartialFile.discard` does, so a process streaming it meanwhile sees it superseded and starts a new one. The
    tiny ``.lock`` and ``.claims`` files stay, as huggingface_hub's lock files do: unlinking a lock file another
    process may be about to take is a race.
    """
    folder = storage_folder / PARTIAL_FOLDER
    for tmp in sorted(folder.glob("*.ranges.json.*.tmp")) if folder.is_dir() else ():
        # A record being written when its process was killed: records are written under the file lock, so one
        # found with the lock held is nobody's.
        lock = _FileLock(folder / f"{tmp.name.partition('.ranges.json.')[0]}.lock")
        try:
            with lock:
                tmp.unlink(missing_ok=True)
        finally:
            lock.close()
    removed = []
    for path in sorted(folder.glob("*.ranges.json")) if folder.is_dir() else ():
        etag = path.name.removesuffix(".ranges.json")
        committed = (storage_folder / "blobs" / etag).exists()
        if not committed and unwanted is None:
            continue
        try:
            record = json.loads(path.read_text())
            size = int(record["size"])
        except (OSError, ValueError, KeyError, TypeError):
            record, size = {}, 0
        if not committed and not unwanted(record):
            continue
        claims = RangeLocks(folder / f"{etag}.claims")
        lock = _FileLock(folder / f"{etag}.lock")
        try:
            with lock:
                if size and claims.busy(0, size):
                    continue
                (folder / f"{etag}.part").unlink(missing_ok=True)
                path.unlink(missing_ok=True)
                removed.append({**record, "etag": etag})
        finally:
            claims.close()
            lock.close()
    return removed


def recorded_bytes(storage_folder: Path, filename: str, commit: str) -> int | None:
    """Bytes of ``filename`` (path in the repo) at ``commit`` held by a partial file of an earlier run (found
    without the network), or None."""
    folder = storage_folder / PARTIAL_FOLDER
    for path in folder.glob("*.ranges.json") if folder.is_dir() else ():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            record = json.loads(path.read_text())
            if record.get("filename") == filename and record.get("commit") == commit:
                return sum(int(e) - int(s) for s, e in record["ranges"])
    return None
