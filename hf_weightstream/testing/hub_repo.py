"""What the local Hub serves: a folder scanned once into an immutable commit of a model repo.

Hashes are what the real Hub reports for each file: the git blob sha1 for plain files, and for LFS files the
sha256 (the LFS oid, reported as ``X-Linked-Etag``) plus the git oid of their pointer file. Xet-backed files also
have a Xet hash; the real one is a Merkle hash over content-defined chunks, computed by Xet's own code, which this
stdlib-only server does not have, so it reports a stand-in: 64 hex digits derived from the sha256. To a client it
is the same kind of opaque content identifier (the key of huggingface_hub's shared blob store).
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

#: Suffixes the Hub's default ``.gitattributes`` stores with git-LFS (the subset model repos use).
LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".msgpack", ".h5")
#: Bigger files must be LFS on the Hub whatever their name.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

_HASH_CHUNK = 1024 * 1024
_LAST_MODIFIED = "2024-01-01T00:00:00.000Z"  # fixed: the repo metadata stays deterministic
_SKIPPED_DIRS = {".git", ".cache"}  # git internals and `local_dir` download metadata are not repo files

_digest_cache: dict[tuple[str, int, int, str], str] = {}
_digest_cache_lock = threading.Lock()


class HttpError(Exception):
    """An error answer. ``code`` goes into ``X-Error-Code``: huggingface_hub maps that to its exceptions."""

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.commit = status, code, message, commit


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


def xet_hash_stand_in(sha256: str) -> str:
    """The Xet hash this server reports for the file with ``sha256`` (see the module docstring)."""
    return hashlib.sha256(b"xet-hash-stand-in\0" + bytes.fromhex(sha256)).hexdigest()


@dataclass(frozen=True)
class ServedFile:
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

    @property
    def xet_hash(self) -> str | None:
        return xet_hash_stand_in(self.sha256) if self.sha256 is not None else None

    def tree_item(self, xet: bool) -> dict[str, Any]:
        item: dict[str, Any] = {"type": "file", "oid": self.blob_oid, "size": self.size, "path": self.path}
        if self.sha256 is not None:
            item["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
            if xet:
                item["xetHash"] = self.xet_hash
        return item

    def sibling(self, blobs: bool) -> dict[str, Any]:
        sibling: dict[str, Any] = {"rfilename": self.path}
        if blobs:
            sibling.update(size=self.size, blobId=self.blob_oid)
            if self.sha256 is not None:
                sibling["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return sibling


def _scan_file(path: str, disk: Path) -> ServedFile:
    size = disk.stat().st_size
    if not (path.endswith(LFS_SUFFIXES) or size > LFS_SIZE_THRESHOLD):
        return ServedFile(path=path, disk=disk, size=size, blob_oid=_file_digest(disk, size, "git"))
    sha256 = _file_digest(disk, size, "sha256")
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    return ServedFile(
        path=path,
        disk=disk,
        size=size,
        blob_oid=_git_blob_oid(pointer),
        sha256=sha256,
        pointer_size=len(pointer),
    )


def _listing_oid(kind: str, files: dict[str, ServedFile], prefix: str) -> str:
    """A deterministic git-like oid over the paths and content hashes of the files under ``prefix``."""
    listing = "".join(f"{p}\0{f.etag}\n" for p, f in sorted(files.items()) if p.startswith(prefix))
    return hashlib.sha1(f"{kind}\0{listing}".encode()).hexdigest()


@dataclass(frozen=True)
class ServedRepo:
    """An immutable snapshot of a folder, served as one commit of a model repo."""

    repo_id: str
    sha: str
    files: dict[str, ServedFile]
    dirs: dict[str, str]  # directory path -> deterministic tree oid
    gated: bool

    @classmethod
    def scan(cls, repo_id: str, folder: Path, gated: bool) -> ServedRepo:
        files: dict[str, ServedFile] = {}
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
        raise HttpError(404, "RevisionNotFound", f"Invalid rev id: {revision}")

    def tree(self, folder: str, recursive: bool, xet: bool) -> list[dict[str, Any]]:
        if folder and folder not in self.dirs:
            raise HttpError(404, "EntryNotFound", f"{folder} does not exist on branch main", self.sha)
        prefix = f"{folder}/" if folder else ""

        def wanted(path: str) -> bool:
            return path.startswith(prefix) and (recursive or "/" not in path[len(prefix) :])

        items = [self._dir_item(d) for d in self.dirs if wanted(d)]
        items += [f.tree_item(xet) for p, f in self.files.items() if wanted(p)]
        return items

    def paths_info(self, paths: list[str], xet: bool) -> list[dict[str, Any]]:
        items = []
        for path in (p.strip("/") for p in paths):
            if path in self.files:
                items.append(self.files[path].tree_item(xet))
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
