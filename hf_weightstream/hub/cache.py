"""Verifying complete shards and putting them into the Hub cache exactly as ``hf_hub_download`` would.

A complete partial file is hashed; only a file whose sha256 equals the LFS oid the Hub reported is moved to
``blobs/<sha256>`` (under huggingface_hub's own lock, ``<cache>/.locks/<repo>/<sha256>.lock``), then
``snapshots/<commit>/<file>`` points at it and ``refs/<revision>`` names the commit. For a Xet-backed file the
blob is published to huggingface_hub's shared blob store (``<cache>/blobs/<2 hex>/<xet hash>``, the repo's
``blobs/<sha256>`` becoming a symlink into it) unless ``HF_HUB_DISABLE_SHARED_BLOBS`` or ``HF_HUB_DISABLE_XET`` is
set; and a shard whose content is already in the store (from another repo) is linked from there instead of being
fetched. huggingface_hub itself publishes only what hf_xet verified; we publish what matched the sha256 the Hub
paired with that Xet hash, which proves the same content. Resolving a snapshot path all the way down then lands
on a Xet-hash name, so `cached_shard` reports the sha256 from the repo's own ``blobs/`` entry, one hop.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.utils import WeakFileLock

from . import _hf_compat as compat
from .partial import HASH_CHUNK_BYTES, PartialFile
from .remote import HubRepo, RemoteFile

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedShard:
    """A shard in the standard Hub cache: its snapshot path, the repo's blob behind it, and its sha256.

    ``verified`` is True when this process checked the sha256 before committing it; shards that were already in the
    cache at load time were not re-hashed (their blob is named by the sha256 hf_hub_download checked).
    """

    path: Path
    blob: Path
    sha256: str
    verified: bool


class ChecksumMismatch(Exception):
    def __init__(self, digest: str) -> None:
        super().__init__(digest)
        self.digest = digest


def link_snapshot(repo: HubRepo, shard: str, sha256: str, new_blob: bool) -> Path:
    """Point ``snapshots/<commit>/<file>`` at ``blobs/<sha256>`` and record ``refs/<revision>``."""
    pointer = repo.pointer_path(shard)
    pointer.parent.mkdir(parents=True, exist_ok=True)
    lock = repo.hf_lock_path(sha256)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if not pointer.exists():
            compat.link_pointer(repo.blob_path(sha256), pointer, new_blob=new_blob)
    compat.record_ref(repo.storage_folder, repo.revision, repo.commit)
    return pointer


def committed_file(remote: RemoteFile) -> Path | None:
    """The complete, verified file of ``remote`` if someone put it in the cache: ``blobs/<sha256>``, or, where the
    cache has no symlinks (``HF_HUB_DISABLE_SYMLINKS``, a file system without them), the snapshot file itself, which
    huggingface_hub moves a new blob to (leaving no ``blobs/<sha256>``)."""
    repo = remote.repo
    blob = repo.blob_path(remote.sha256)
    if blob.exists():
        return blob
    pointer = repo.pointer_path(remote.shard)
    if not pointer.is_symlink() and pointer.is_file() and pointer.stat().st_size == remote.size:
        return pointer
    return None


def link_from_shared_store(remote: RemoteFile) -> bool:
    """Make the shard cached without fetching it when its content is in the shared blob store (another repo put it
    there); True if it is in the cache now."""
    repo = remote.repo
    if remote.xet_hash is None or repo.force_download or not compat.shared_store_usable(repo.cache_dir):
        return False
    blob = repo.blob_path(remote.sha256)
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock = repo.hf_lock_path(remote.sha256)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        linked = blob.exists() or compat.link_from_shared_store(blob, remote.xet_hash, repo.cache_dir, remote.size)
    if linked:
        link_snapshot(repo, remote.shard, remote.sha256, new_blob=False)
        logger.info("%s: linked from the shared blob store, nothing to fetch", remote.describe())
    return linked


def install(partial: PartialFile, remote: RemoteFile) -> str | None:
    """Verify the complete ``partial`` file and move it into the cache, publishing it to the shared store.

    Call with the partial file's lock held. Returns the sha256 checked, or None when the blob was in the cache
    already (``hf_hub_download`` or another process completed it meanwhile: the partial file is discarded). Raises
    `ChecksumMismatch` (nothing is written to the cache) when the bytes are not the file's.
    """
    repo = remote.repo
    blob = repo.blob_path(remote.sha256)
    if not repo.force_download and committed_file(remote) is not None:
        partial.discard()
        link_snapshot(repo, remote.shard, remote.sha256, new_blob=False)
        return None
    digest = partial.sha256()
    if digest != remote.sha256:
        raise ChecksumMismatch(digest)
    blob.parent.mkdir(parents=True, exist_ok=True)
    compat.tag_cache_dir(repo.cache_dir)
    lock = repo.hf_lock_path(remote.sha256)
    lock.parent.mkdir(parents=True, exist_ok=True)
    shared = False
    with WeakFileLock(lock):
        if repo.force_download or not blob.exists():
            if blob.is_symlink():  # force_download: never write through a link into the shared store
                blob.unlink()
            compat.move_into_cache(partial.data_path, blob)
            if remote.xet_hash is not None and compat.shared_store_usable(repo.cache_dir):
                shared = compat.publish_to_shared_store(
                    blob, remote.xet_hash, repo.cache_dir, remote.size, replace=repo.force_download
                )
            new_blob = not shared
        else:
            partial.data_path.unlink()
            new_blob = False
    partial.record_path.unlink(missing_ok=True)
    link_snapshot(repo, remote.shard, remote.sha256, new_blob=new_blob)
    return digest


def cached_shard(pointer: Path, sha256: str | None = None, verified: bool = False) -> CachedShard:
    """What `wait_until_cached` reports for a shard in the cache.

    The blob is the repo's own ``blobs/<sha256>``, one hop from the snapshot link (as huggingface_hub's cache
    scanner reads it); following every link would end in the shared store, at a Xet-hash name. Without symlinks
    (a copy) and without a known ``sha256``, the file is hashed.
    """
    if pointer.is_symlink():
        blob = Path(os.path.normpath(pointer.parent / os.readlink(pointer)))
        return CachedShard(pointer, blob, sha256 or blob.name, verified)
    if sha256 is None:
        digest = hashlib.sha256()
        with pointer.open("rb") as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
        sha256 = digest.hexdigest()
    return CachedShard(pointer, pointer, sha256, verified)
