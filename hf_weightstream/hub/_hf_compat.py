"""Every private huggingface_hub API the hub package uses, and nothing else (checked by
``tests/test_hub_private_apis.py``, which fails loudly, naming the helper, when one of them changes).

Why private helpers at all: a shard we stream must end up in the Hub cache exactly as ``hf_hub_download`` would
leave it (same permissions, relative symlinks or copies where symlinks are unsupported, ``refs/``, the
``CACHEDIR.TAG``, Xet blobs in the shared blob store), so that huggingface_hub, transformers and ``hf cache`` tools
treat it as their own. Writing that layout by hand would drift from huggingface_hub the day it changes; calling
the helpers huggingface_hub uses itself keeps one source of truth. The one HTTP helper gives our range requests
their own client built the way the user configured huggingface_hub's (``set_client_factory``: proxies,
certificates), because huggingface_hub closes its shared client on a connect error, under the feet of our other
connections; and whether the user configured it at all (``direct_http`` reads range bodies without httpx2 only
where that changes nothing).

Written against huggingface_hub 2.4. Older 2.x releases without the shared blob store leave it unused.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import _local_folder, file_download
from huggingface_hub.utils import _http

try:
    _shared_blobs: Any = importlib.import_module("huggingface_hub.utils._shared_blobs")
except ImportError:  # huggingface_hub < 2.4: no shared blob store
    _shared_blobs = None


def is_commit_hash(revision: str) -> bool:
    return file_download.REGEX_COMMIT_HASH.fullmatch(revision) is not None


def repo_folder(repo_id: str) -> str:
    """``models--org--name``: the folder of a model repo in the Hub cache."""
    return file_download.repo_folder_name(repo_id=repo_id, repo_type="model")


def record_ref(storage_folder: Path, revision: str, commit: str) -> None:
    """Write ``refs/<revision>`` when ``revision`` is a branch or tag (a no-op for a commit hash)."""
    file_download._cache_commit_hash_for_specific_revision(str(storage_folder), revision, commit)


def check_disk_space(size: int, folder: Path) -> None:
    """Warn (huggingface_hub's warning) when ``folder`` has less than ``size`` bytes free."""
    file_download._check_disk_space(size, folder)


def move_into_cache(src: Path, dst: Path) -> None:
    """Move a complete file to ``blobs/<etag>`` with the permissions huggingface_hub gives its blobs."""
    file_download._chmod_and_move(src, dst)


def link_pointer(blob: Path, pointer: Path, new_blob: bool) -> None:
    """``snapshots/<commit>/<file>`` -> ``blobs/<etag>``: a relative symlink, or a move/copy without symlinks."""
    file_download._create_symlink(str(blob), str(pointer), new_blob=new_blob)


def tag_cache_dir(cache_dir: Path) -> None:
    """``CACHEDIR.TAG`` at the cache root, so backup tools skip it."""
    _local_folder._create_cachedir_tag(cache_dir)


def shared_store_usable(cache_dir: Path) -> bool:
    """Whether Xet blobs go to the shared store (not with ``HF_HUB_DISABLE_SHARED_BLOBS``, ``HF_HUB_DISABLE_XET``
    or a file system without symlinks), as ``hf_hub_download`` decides it."""
    return (
        _shared_blobs is not None
        and _shared_blobs.shared_blobs_enabled()
        and file_download.are_symlinks_supported(str(cache_dir))
    )


def link_from_shared_store(blob: Path, xet_hash: str, cache_dir: Path, size: int) -> bool:
    """Make ``blobs/<etag>`` a symlink to the shared store entry of ``xet_hash`` if there is a usable one."""
    return bool(
        _shared_blobs.try_link_from_shared_store(
            blob_path=str(blob), xet_hash=xet_hash, cache_dir=cache_dir, expected_size=size
        )
    )


def publish_to_shared_store(blob: Path, xet_hash: str, cache_dir: Path, size: int, replace: bool) -> bool:
    """Move a fresh blob into the shared store and leave a symlink in its place; False if it stays local."""
    return bool(
        _shared_blobs.publish_blob_to_shared_store(
            blob_path=str(blob), xet_hash=xet_hash, cache_dir=cache_dir, expected_size=size, replace_existing=replace
        )
    )


def shared_store_path(cache_dir: Path, xet_hash: str) -> Path:
    """Where the shared store keeps the content of ``xet_hash``."""
    return Path(_shared_blobs.shared_blob_path(cache_dir, xet_hash))


def default_http_client_factory() -> bool:
    """Whether huggingface_hub builds its clients with its own default factory (nobody called
    ``set_client_factory`` to configure proxies, certificates or transports in code)."""
    return _http._GLOBAL_CLIENT_FACTORY is _http.default_client_factory


def http_client_factory() -> Callable[[], httpx2.Client]:
    """The factory huggingface_hub's shared client comes from (``set_client_factory`` replaces it)."""
    return _http._GLOBAL_CLIENT_FACTORY
