"""``hf-weightstream cache``: which shards of a Hub repo are in the local Hub cache, complete or partial.

For a Hub repo: each safetensors shard the cached index lists is complete (a normal Hub cache entry), partial (a
range record kept by lazy Hub streaming under ``.weightstream/partial``) or missing; interrupted plain downloads
(``blobs/*.incomplete``) are counted. For a local folder, whether every shard its index lists is present.
``--prune`` removes partial shards whose content the revision no longer has, which huggingface_hub's cache
tools do not see.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ._common import UsageError, check_repo_id, format_bytes, table

NAME = "cache"
ORDER = 50
HELP = "which shards of a Hub repo are in the local Hub cache"
DESCRIPTION = """\
For a Hub repo id, list its safetensors shards in the local Hub cache as complete or missing,
interrupted downloads, and partial shards kept by hf_weightstream. For a local folder, check
that every shard its index lists is present. --prune removes partial shards whose
content the revision no longer has (huggingface_hub's cache tools do not see them)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="repo id (org/name) or folder")
    parser.add_argument("--cache-dir", help="Hub cache folder (default: HF_HUB_CACHE)")
    parser.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    parser.add_argument(
        "--prune",
        action="store_true",
        help="remove partial shards whose content no file of the revision has (asks the Hub) and leftovers of "
        "complete ones (hf cache prune and delete_revisions do not see them); shards another process is fetching "
        "now are kept",
    )


def _cached_file(repo_id: str, filename: str, cache_dir: str, revision: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    return Path(found) if isinstance(found, str) else None


def _shard_names(index_file: Path) -> list[str]:
    try:
        return sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{index_file}: not a valid safetensors index ({err!r}).") from None


@dataclass
class PartialShard:
    """A shard that lazy Hub streaming has fetched part of: its record in ``.weightstream/partial``."""

    filename: str
    commit: str
    held: int
    size: int


def partial_shards(repo_dir: Path) -> list[PartialShard]:
    """The records of partly fetched shards in a repo's Hub cache folder (``<etag>.ranges.json`` files)."""
    from ..hub import PARTIAL_FOLDER

    found = []
    for path in sorted((repo_dir / PARTIAL_FOLDER).glob("*.ranges.json")):
        try:
            record = json.loads(path.read_text())
            held = sum(int(end) - int(start) for start, end in record["ranges"])
            found.append(PartialShard(record["filename"], record["commit"], held, int(record["size"])))
        except (OSError, ValueError, KeyError, TypeError):
            print(f"  unreadable partial record {path.name}: skipped", file=sys.stderr)
    return found


def _commit_of(repo_dir: Path, revision: str) -> str:
    """The commit a branch or tag points to in the cache (``refs/<revision>``), or ``revision`` itself."""
    ref = repo_dir / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else revision


def run(args: argparse.Namespace) -> int:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    from ..hub import PARTIAL_FOLDER

    folder = Path(args.model).expanduser()
    if folder.is_dir():
        _local_folder_shards(folder)
        return 0
    repo_id = check_repo_id(args.model)
    cache_dir = str(Path(args.cache_dir).expanduser()) if args.cache_dir else constants.HF_HUB_CACHE
    repo_dir = Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")
    if not repo_dir.is_dir():
        print(f"{repo_id} is not in the Hub cache at {cache_dir}: nothing downloaded yet.")
        return 0
    commit = _commit_of(repo_dir, args.revision)
    print(f"{repo_id} in {repo_dir} (revision {args.revision}, commit {commit[:12]}):")
    index_file = _cached_file(repo_id, "model.safetensors.index.json", cache_dir, args.revision)
    if index_file is not None:
        names = _shard_names(index_file)
    elif _cached_file(repo_id, "model.safetensors", cache_dir, args.revision) is not None:
        names = ["model.safetensors"]
    else:
        names = []
        print("  no weight index cached: cannot tell which shards this revision has.")
    partial = partial_shards(repo_dir)
    here = {p.filename: p for p in partial if p.commit == commit}
    counts: collections.Counter[str] = collections.Counter()
    rows = []
    for shard in names:
        path = _cached_file(repo_id, shard, cache_dir, args.revision)
        if path is not None:
            state, detail = "complete", format_bytes(path.stat().st_size)
        elif shard in here:
            got = here[shard]
            state, detail = "partial", f"{format_bytes(got.held)} of {format_bytes(got.size)}"
        else:
            state, detail = "missing", ""
        counts[state] += 1
        rows.append(("  " + shard, state, detail))
    if rows:
        print(table(rows, align="llr"))
        print(
            f"{counts['complete']} of {len(names)} shard(s) complete, {counts['partial']} partial, "
            f"{counts['missing']} missing."
        )
    interrupted = sorted((repo_dir / "blobs").glob("*.incomplete"))
    if interrupted:
        size = sum(p.stat().st_size for p in interrupted)
        print(f"Interrupted plain downloads (blobs/*.incomplete): {len(interrupted)}, {format_bytes(size)}.")
    others = [p for p in partial if p.commit != commit or p.filename not in names]
    if not partial:
        print(f"Partial shards ({PARTIAL_FOLDER}): none found.")
    for other in others:
        where = (
            "not in this revision's index (a variant or subfolder?)"
            if other.commit == commit
            else f"recorded at commit {other.commit[:12]}"
        )
        print(f"Partial shard {where}: {other.filename}, {format_bytes(other.held)} of {format_bytes(other.size)}.")
    if args.prune:
        _prune(repo_id, repo_dir, args.revision, commit, partial)
    return 0


def _prune(repo_id: str, repo_dir: Path, revision: str, commit: str, partial: list[PartialShard]) -> None:
    """Remove the partial shards no streaming of ``revision`` can use, and leftovers of complete shards.

    Partial files are named by the content's sha256 and labelled with the commit that wrote them, but a later commit
    that changed only a README has the same shard files: a partial is of no use only when no file of ``revision``
    has its content. The Hub says which content the revision's files have (``get_paths_info``, one call); offline,
    partials of other commits are kept. huggingface_hub's cache tools know nothing of ``.weightstream``: this is
    how they are reclaimed.
    """
    from ..hub.partial import remove_partials

    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise UsageError(
            f"--prune: the cache does not say which commit {revision!r} is (no refs/{revision}), so it cannot tell "
            "which partial shards are of another revision. Pass --revision with a branch the cache knows, or a "
            "commit hash."
        )
    others = sorted({shard.filename for shard in partial if shard.commit != commit})
    contents = _contents_at(repo_id, commit, others) if others else {}

    def unwanted(record: dict) -> bool:
        if not record:  # unreadable: a streaming run would start that shard afresh anyway
            return True
        if record.get("commit") == commit or contents is None:
            return False
        return contents.get(record.get("filename")) != record.get("etag")

    removed = remove_partials(repo_dir, unwanted)
    freed = sum(int(start_end[1]) - int(start_end[0]) for record in removed for start_end in record.get("ranges", []))
    for record in removed:
        print(f"Removed partial shard {record.get('filename', record['etag'])} ({record.get('commit', '?')[:12]}).")
    print(f"Pruned {len(removed)} partial shard(s), {format_bytes(freed)} on disk.")


def _contents_at(repo_id: str, commit: str, filenames: list[str]) -> dict[str, str] | None:
    """The sha256 each of ``filenames`` has at ``commit`` (absent: not there, or not in LFS), or None when the Hub
    cannot be asked."""
    from huggingface_hub import HfApi

    try:
        infos = HfApi().get_paths_info(repo_id, filenames, revision=commit)
    except Exception as err:  # offline, unreachable, no access: whatever it is, keeping everything is safe
        print(
            f"Cannot ask the Hub which files commit {commit[:12]} has ({type(err).__name__}): partial shards of "
            "other commits are kept (they may hold the same content); only leftovers of complete shards go."
        )
        return None
    return {info.path: info.lfs.sha256 for info in infos if getattr(info, "lfs", None) is not None}


def _local_folder_shards(folder: Path) -> None:
    """A local folder has no cache: say so, and whether every shard its index lists is there."""
    print(f"{folder} is a local folder, not a Hub repo: it is read in place, nothing is cached.")
    index_file = folder / "model.safetensors.index.json"
    names = _shard_names(index_file) if index_file.is_file() else sorted(p.name for p in folder.glob("*.safetensors"))
    missing = [n for n in names if not (folder / n).is_file()]
    if not names:
        print("It holds no safetensors weights, which streaming needs.")
    else:
        print(f"{len(names) - len(missing)} of {len(names)} safetensors shard(s) present.")
    for name in missing:
        print(f"  missing: {name}")
