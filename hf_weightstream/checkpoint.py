"""Find a model's safetensors shards (local folder or Hub repo) and index them without reading weights.

For a Hub repo, the commit is pinned once and only the small files are fetched the normal way (config,
generation config, index). Shards already in the Hub cache are read in place, with no copy. Shards that are
not cached are handled by `hub_stream` when lazy Hub streaming is available; otherwise they are downloaded
with ``hf_hub_download`` so the model still works.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from .errors import CheckpointError
from .index import CheckpointIndex, read_shard_header
from .sources import ByteSource, LocalFileSource

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_OTHER_FORMATS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
NEEDS_SAFETENSORS = (
    "Streaming needs safetensors weights, but {where} only has {found}. Convert it once with "
    "`AutoModel.from_pretrained(path).save_pretrained(out_dir)` (which writes safetensors) and stream from out_dir."
)


def _variant_name(name: str, variant: str | None) -> str:
    if not variant:
        return name
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{variant}.{ext}"


@dataclass
class Checkpoint:
    """The resolved weights of one model: its index and the source that serves its bytes."""

    index: CheckpointIndex
    source: ByteSource
    location: str
    repo_id: str | None = None
    commit: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def open_local_folder(folder: Path, variant: str | None) -> Checkpoint:
    """Index the safetensors shards of a folder written by ``save_pretrained``."""
    index_file = folder / _variant_name(SAFE_INDEX, variant)
    single = folder / _variant_name(SAFE_WEIGHTS, variant)
    if index_file.is_file():
        shards = sorted(set(_read_weight_map(index_file).values()))
    elif single.is_file():
        shards = [single.name]
    else:
        others = [name for name in _OTHER_FORMATS if (folder / name).exists()]
        if others:
            raise CheckpointError(NEEDS_SAFETENSORS.format(where=str(folder), found=", ".join(others)))
        raise CheckpointError(
            f"No {single.name} or {index_file.name} in {folder}: this folder holds no safetensors model weights."
        )
    paths = {}
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            raise CheckpointError(
                f"Shard {shard} is listed in {index_file.name} but missing from {folder}. Copy or download the "
                "complete model folder again."
            )
        paths[shard] = path
    return _index_local(paths, str(folder))


def open_hub_repo(repo_id: str, download_kwargs: dict[str, Any], variant: str | None) -> Checkpoint:
    """Index a Hub repo's shards; shards missing from the cache are downloaded (see module docstring)."""
    index_name = _variant_name(SAFE_INDEX, variant)
    single_name = _variant_name(SAFE_WEIGHTS, variant)
    try:
        index_path = hf_hub_download(repo_id, index_name, **download_kwargs)
        shards = sorted(set(_read_weight_map(Path(index_path)).values()))
    except EntryNotFoundError:
        shards = [single_name]
    except LocalEntryNotFoundError:
        shards = [single_name]
    paths: dict[str, Path] = {}
    for shard in shards:
        try:
            paths[shard] = Path(hf_hub_download(repo_id, shard, **download_kwargs))
        except EntryNotFoundError:
            if shard == single_name:
                raise CheckpointError(_no_safetensors_message(repo_id, download_kwargs)) from None
            raise CheckpointError(
                f"Shard {shard} of {repo_id} is listed in its index but not in the repo."
            ) from None
        except LocalEntryNotFoundError:
            raise CheckpointError(
                f"Shard {shard} of {repo_id} is not in the local Hub cache and downloads are off "
                "(HF_HUB_OFFLINE=1 or local_files_only=True). Run once with network access, or `hf download "
                f"{repo_id}`."
            ) from None
    return _index_local(paths, repo_id)


def _no_safetensors_message(repo_id: str, download_kwargs: dict[str, Any]) -> str:
    found = []
    for name in _OTHER_FORMATS:
        try:
            hf_hub_download(repo_id, name, **download_kwargs)
            found.append(name)
        except (EntryNotFoundError, LocalEntryNotFoundError):
            continue
    if found:
        return NEEDS_SAFETENSORS.format(where=repo_id, found=", ".join(found))
    return f"{repo_id} has no {SAFE_WEIGHTS} or {SAFE_INDEX}: no safetensors weights to stream."


def _read_weight_map(index_file: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_file}: not a valid safetensors index ({err!r}).") from None
    return weight_map


def _index_local(paths: dict[str, Path], location: str) -> Checkpoint:
    source = LocalFileSource(paths)
    entries = []
    sizes = {}
    for shard, path in paths.items():
        sizes[shard] = os.path.getsize(path)
        entries.extend(
            read_shard_header(
                shard, sizes[shard], lambda offset, length, s=shard: source.read(s, offset, length)
            ).values()
        )
    return Checkpoint(CheckpointIndex(entries, sizes), source, location)
