"""Find a model's safetensors shards (local folder or Hub repo) and index them without reading weights.

For a Hub repo, the commit is pinned once and only the small files are fetched the normal way (config,
generation config, index, all by commit hash). Shards already in the Hub cache are read in place, with no copy.
Shards that are not cached are not downloaded: their own resolve answers (or one metadata call) describe them,
`hub` reads their safetensors headers with one range request each now and their weights when the forward pass
needs them, and puts the completed files into the Hub cache.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as LateError
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import HfApi, ResolvedRevision, constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.constants import CONFIG_NAME
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

from .errors import CheckpointError, StreamConfigError
from .hub import HubRepo, HubSource, ShardNotInRepoError, describe_remote_files, recorded_bytes, schedule
from .hub import _hf_compat as compat
from .hub.remote import RemoteFile, list_remote_files, locate_remote_files, prepare_clients
from .index import CheckpointIndex, TensorEntry, read_shard_header
from .sources import ByteSource, LocalFileSource

if TYPE_CHECKING:
    from .units import Unit

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
_OTHER_FORMATS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")
logger = logging.getLogger(__name__)
# How long a load waits for the folder listing once the index is read (they normally come together): a listing that
# is slower (huggingface_hub retrying a 5xx) is left behind for a paths-info call.
LISTING_GRACE_S = 1.0
# How many shards are described by their own resolve answers, sent at once (`open_hub_repo`); a listing describes
# the others in the same round trip (a model of 160 shards would otherwise send 160 requests at once).
LOCATE_AT_ONCE = 16
# The name of `_in_background`'s threads (tests wait for them before they point huggingface_hub elsewhere).
METADATA_THREAD = "hf_ws-meta"
_DOWNLOAD_OPTIONS = (
    ("cache_dir", None),
    ("force_download", False),
    ("proxies", None),
    ("local_files_only", False),
    ("token", None),
    ("revision", "main"),
    ("subfolder", ""),
)
# Checkpoints being opened ahead of their load (`open_hub_repo_ahead`), by `_ahead_key`.
_ahead: dict[tuple, Future] = {}
_ahead_lock = threading.Lock()
# The GIL switch interval while loads opened ahead run (`_prompt_threads`), and how many do.
PROMPT_SWITCH_INTERVAL_S = 0.0005
_prompting = [0, 0.0]  # loads running, the interval they found
NEEDS_SAFETENSORS = (
    "Streaming needs safetensors weights, but {where} only has {found}. Convert it once with "
    "`hf-weightstream convert {where} OUT_DIR` (or `hf_weightstream.convert.to_safetensors(...)` in Python), which "
    "loads it with the class its config.json names, so a causal LM keeps its lm_head, and writes safetensors; then "
    "stream OUT_DIR. (`AutoModel.from_pretrained(...)` would load the base model only and drop the head.)"
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

    def plan_fetches(self, units: list[Unit]) -> None:
        """Give a Hub source the order the forward pass reads in, so idle connections fetch ahead in that order.

        An embedding table that is only looked up row by row (``unit.gather``) is not in that order: the forward
        pass reads its rows, and the rest of the table is left to the background filler.
        """
        if isinstance(self.source, HubSource):
            reads = [(r.shard, r.offset, r.length) for unit in units if not unit.gather for r in unit.ranges]
            self.source.expect_reads(reads)


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


def download_kwargs_of(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the options of ``from_pretrained`` that say where and how files are downloaded, with their defaults."""
    return {name: kwargs.pop(name, default) for name, default in _DOWNLOAD_OPTIONS}


def open_hub_repo_ahead(name: Any, kwargs: dict[str, Any]) -> Callable[[], None] | None:
    """Start indexing the Hub repo a streamed ``from_pretrained(name, **kwargs)`` will read, in the background.

    An auto class's ``from_pretrained`` imports the model's code before it calls the model class's own, and the
    first load of a process spends seconds there (``transformers.modeling_utils`` alone takes about 2 s), while our
    round trips to the Hub (index and listing, resolves, headers) would only start after it. Started here, they run
    meanwhile; `open_hub_repo` of the same thread, with the same options, takes the result.

    The revision is resolved here, once, as the auto class would do first (transformers' ``resolve_revision``), and
    ``kwargs["revision"]`` becomes the result: the auto class then resolves nothing, and the config, the index and
    the shards all come from that commit. Returns the function to call when the load is over, which closes a
    checkpoint nobody took; None when nothing was started (not streaming, a local folder, offline, a revision that
    did not resolve, or options the load itself will reject).
    """
    from transformers.utils import GENERATION_CONFIG_NAME

    from .config import stream_request

    rest = dict(kwargs)
    try:
        config = stream_request(rest)
    except StreamConfigError:
        return None  # the load reports it
    name = str(name)
    if config is None or os.path.isdir(name) or rest.get("gguf_file") or rest.get("use_safetensors") is False:
        return None
    download_kwargs = download_kwargs_of(rest)
    if download_kwargs["local_files_only"] or constants.is_offline_mode():
        return None
    prepare_clients()  # while the revision resolves
    revision, files = _resolve_with_files(name, kwargs.get("revision"), download_kwargs)
    if not isinstance(revision, ResolvedRevision):
        return None  # unknown repo, no network...: the load's own calls report it
    kwargs["revision"] = download_kwargs["revision"] = revision
    also = () if rest.get("generation_config") is not None else (GENERATION_CONFIG_NAME,)
    options = (rest.get("variant"), config.max_connections, config.complete_download)
    key = _ahead_key(name, download_kwargs, options)
    variant, max_connections, complete_download = options
    abandoned = threading.Event()
    future = _in_background(
        open_hub_repo,
        name,
        download_kwargs,
        variant,
        max_connections=max_connections,
        complete_download=complete_download,
        also_download=also,
        abandoned=abandoned,
        files=files,
    )
    with _ahead_lock:
        _ahead[key] = future
    done_prompting = _prompt_threads()

    def discard() -> None:
        done_prompting()
        with _ahead_lock:
            if _ahead.get(key) is not future:
                return  # taken
            del _ahead[key]
        # The load is over (it failed, or opened the repo itself): no further request of ours, beyond those in
        # flight. A request left running after a failed load is one more that can fail under the user's next calls
        # (huggingface_hub closes its shared client on a connect error), and the head start's megabytes are waste.
        abandoned.set()
        future.add_done_callback(_close_checkpoint)

    return discard


def _resolve_with_files(
    repo_id: str, revision: str | None, download_kwargs: dict[str, Any]
) -> tuple[str | None, list[str] | None]:
    """transformers' ``resolve_revision``, and the names of the files at the commit it resolves to.

    The call that resolves a branch (``GET /api/models/<repo>/revision/<branch>``, as ``HfApi.resolve_revision``
    sends it) also lists the repo's files: with their names, the shards' own resolve answers can be asked for at
    once, a round trip before the folder listing would have come (`open_hub_repo`). Its ``refs/<branch>`` is
    recorded as huggingface_hub records it, and its failures end as transformers' do: the revision as it was
    when the Hub answered with an error (the load's own calls report it), the commit the cache recorded when the
    Hub did not answer.
    """
    from transformers.utils.hub import resolve_revision

    token, cache_dir = download_kwargs["token"], download_kwargs["cache_dir"]
    if revision is not None and (isinstance(revision, ResolvedRevision) or compat.is_commit_hash(revision)):
        return resolve_revision(repo_id, revision, token=token, cache_dir=cache_dir), None  # no request
    try:
        info = HfApi(token=token).model_info(repo_id, revision=revision)
    except HfHubHTTPError as err:
        if err.response is not None and err.response.status_code < 500:  # not found, gated...: the load says it
            return revision, None
        info = None
    except Exception as err:  # noqa: BLE001 - no answer: as transformers, the commit the cache recorded, if any
        logger.debug("Could not resolve %s of %s (%r)", revision, repo_id, err)
        info = None
    if info is None or info.sha is None:
        return resolve_revision(repo_id, revision, token=token, cache_dir=cache_dir, local_files_only=True), None
    folder = Path(cache_dir or constants.HF_HUB_CACHE).expanduser().resolve() / compat.repo_folder(repo_id)
    try:
        compat.record_ref(folder, revision or constants.DEFAULT_REVISION, info.sha)
    except OSError as err:  # a read-only cache: as huggingface_hub, resolved all the same
        logger.debug("Could not record the commit of %s: %r", repo_id, err)
    files = [sibling.rfilename for sibling in info.siblings or ()]
    return ResolvedRevision(info.sha, initial=revision, repo_id=repo_id), files


def _prompt_threads() -> Callable[[], None]:
    """Shorten the GIL switch interval until the returned function is called (once per load; the last load to end
    puts back the interval the first one found).

    While our threads do a load's round trips, the load's own thread imports the model's code and builds its
    modules: seconds of Python that holds the GIL. Each of our steps between two blocking calls (a response parsed,
    the next request sent, a file opened) first waits for the GIL, up to the switch interval (5 ms by default), and
    the path from the commit to the first weight byte has dozens of them: measured on bench_hub's load, the header
    requests went out 0.15-0.3 s after the folder listing came, against 0.07 s with the load's thread idle. The
    cost on the other side is a GIL hand-over every half millisecond, a few microseconds each.
    """
    with _ahead_lock:
        if not _prompting[0]:
            _prompting[1] = sys.getswitchinterval()
            sys.setswitchinterval(min(_prompting[1], PROMPT_SWITCH_INTERVAL_S))
        _prompting[0] += 1
    ended = threading.Event()

    def done() -> None:
        with _ahead_lock:
            if ended.is_set():
                return
            ended.set()
            _prompting[0] -= 1
            if not _prompting[0]:
                sys.setswitchinterval(_prompting[1])

    return done


def _ahead_key(repo_id: str, download_kwargs: dict[str, Any], options: tuple) -> tuple:
    """What makes a checkpoint opened ahead the one a load asks for: the thread, the repo and every option."""
    values = tuple(str(download_kwargs.get(name) or "") for name, _ in _DOWNLOAD_OPTIONS if name != "revision")
    revision = str(download_kwargs.get("revision") or constants.DEFAULT_REVISION)  # a ResolvedRevision: the asked
    return (threading.get_ident(), repo_id, revision, values, options)


def _take_ahead(repo_id: str, download_kwargs: dict[str, Any], options: tuple) -> Checkpoint | None:
    """The checkpoint `open_hub_repo_ahead` opened for this load, if it did and it pinned the commit asked for."""
    with _ahead_lock:
        future = _ahead.pop(_ahead_key(repo_id, download_kwargs, options), None)
    if future is None:
        return None
    try:
        checkpoint = future.result()
    except Exception as err:  # noqa: BLE001 - opened again by the caller, which reports its own errors
        logger.debug("Opening %s ahead failed (%r); opening it again", repo_id, err)
        return None
    if checkpoint.commit != HubRepo.pin(repo_id, download_kwargs).commit:  # the branch moved in between
        checkpoint.source.close()
        return None
    return checkpoint


def _close_checkpoint(opened: Future) -> None:
    if opened.exception() is None:
        opened.result().source.close()


class _Abandoned(Exception):
    """A checkpoint opened ahead stopped at its next step: its load is over and did not take it."""


def _go_on(abandoned: threading.Event) -> None:
    if abandoned.is_set():
        raise _Abandoned


def open_hub_repo(
    repo_id: str,
    download_kwargs: dict[str, Any],
    variant: str | None,
    *,
    max_connections: int,
    complete_download: bool = True,
    also_download: tuple[str, ...] = (),
    abandoned: threading.Event | None = None,
    files: list[str] | None = None,
) -> Checkpoint:
    """Index a Hub repo's shards: cached ones are read in place, the others streamed (see module docstring).

    Every request after the commit is pinned costs a round trip, so what does not depend on an earlier answer goes
    out at once. On a cold cache, the listing of the weights' folder (sizes and sha256 of the shards) goes out with
    the index download; when it shows the files ``save_pretrained`` writes (``model-00001-of-0000N.safetensors``,
    all N of them, or a lone ``model.safetensors`` and no index), their headers are fetched at once too, and used
    if the index names exactly those files. ``also_download`` (small files the caller reads next, such as
    ``generation_config.json``) is downloaded alongside all of it, into the cache, so that the caller's own call
    finds it there; a failure of those is left for the caller's call to report. Once ``abandoned`` is set, each
    step raises instead of sending its requests (`open_hub_repo_ahead`).

    ``files``, the names of the repo's files at the pinned commit (from the call that resolved it), make the
    listing needless where they show ``save_pretrained``'s files: the shards' own resolve answers describe them
    (`locate_remote_files`), a round trip earlier, and the listing is only asked for the shards they do not.
    """
    download_kwargs = {k: v for k, v in download_kwargs.items() if k != "proxies" or v is not None}
    ahead = _take_ahead(repo_id, download_kwargs, (variant, max_connections, complete_download))
    if ahead is not None:
        return ahead
    abandoned = abandoned or threading.Event()  # never set: the load's own call
    _go_on(abandoned)
    index_name = _variant_name(SAFE_INDEX, variant)
    single_name = _variant_name(SAFE_WEIGHTS, variant)
    repo = HubRepo.pin(repo_id, download_kwargs)  # once: the index and the shards come from one commit
    pinned = {**download_kwargs, "revision": repo.resolved_revision}
    index_cached = try_to_load_from_cache(
        repo_id, repo.path_in_repo(index_name), cache_dir=repo.cache_dir, revision=repo.commit
    )
    online = not repo.offline
    extras = [
        _in_background(_download_quietly, repo_id, name, pinned, abandoned)
        for name in also_download
        if online and not repo.force_download
    ]

    def open_shards(
        shards: list[str], listed: dict[str, Any] | None, located: dict[str, RemoteFile] | None = None
    ) -> Checkpoint:
        return _open_shards(
            repo,
            shards,
            listed,
            pinned,
            (index_name, single_name),
            max_connections,
            complete_download,
            abandoned,
            located or {},
        )

    def locate_and_open(guess: list[str]) -> Checkpoint:
        uncached = [shard for shard in guess if repo.force_download or _cached_path(repo, shard) is None]
        first = uncached[:LOCATE_AT_ONCE]  # the forward pass starts with the first shards; the listing says the rest
        rest = _in_background(list_remote_files, repo) if len(first) < len(uncached) else None
        located = locate_remote_files(repo, first)
        _go_on(abandoned)
        listed = None
        if any(shard not in located for shard in uncached):
            try:
                listed = rest.result() if rest is not None else list_remote_files(repo)
            except Exception as err:  # noqa: BLE001 - only a shortcut: paths-info describes them instead
                logger.debug("Listing the weights' folder failed (%r); asking paths-info instead", err)
        return open_shards(guess, listed, located)

    def list_and_guess() -> tuple[dict[str, Any], list[str] | None, Future | None]:
        listed = list_remote_files(repo)
        _go_on(abandoned)
        guess = _guess_shards(repo, listed, index_name, single_name)
        return listed, guess, None if guess is None else _in_background(open_shards, guess, listed)

    # A cold cache (index state unknown) will need the shards' metadata: ask for it now, not after the index; where
    # the files' names show the shards, from their own resolve answers, else from the folder listing.
    cold = online and (index_cached is None or repo.force_download)
    guess = _guess_shards(repo, files, index_name, single_name) if cold and files is not None else None
    listing: Future | None = None
    if guess is not None:
        listing = Future()
        listing.set_result((None, guess, _in_background(locate_and_open, guess)))
    elif cold:
        listing = _in_background(list_and_guess)
    try:
        index_path = hf_hub_download(repo_id, index_name, **pinned)
        shards = sorted(set(_read_weight_map(Path(index_path)).values()))
    except EntryNotFoundError:  # not in the repo, or (offline) not in the cache
        shards = [single_name]
    except BaseException:
        _discard_guess(listing)
        raise
    try:
        _go_on(abandoned)
    except _Abandoned:
        _discard_guess(listing)
        raise
    listed, guess, opened = _listed(listing)
    checkpoint = None
    if opened is not None and guess == shards:
        try:
            checkpoint = opened.result()
        except Exception as err:  # noqa: BLE001 - opened again below, which reports its own errors
            logger.debug("Opening the shards the listing showed failed (%r); opening them again", err)
    elif opened is not None:
        _discard_guess(listing)
    if checkpoint is None:
        checkpoint = open_shards(shards, listed)
    if isinstance(checkpoint.source, HubSource):  # the first shard's part began when its header came
        try:
            _go_on(abandoned)
        except _Abandoned:
            checkpoint.source.close()
            raise
        head = _file_order_head(checkpoint.index.entries.values(), schedule.HEAD_START_BYTES, _vocab_sizes(repo))
        checkpoint.source.start_ahead(head)
    for extra in extras:
        extra.result()
    return checkpoint


def _file_order_head(
    entries: Iterable[TensorEntry], limit: int, vocab_sizes: frozenset[int] = frozenset()
) -> list[tuple[str, int, int]]:
    """The first ``limit`` bytes of the tensors in file order (shards by name, then offset): save_pretrained
    writes them in the model's module order, so the forward pass reads most of them first. Adjacent tensors are
    one read (a few large requests).

    A lookup table (a 2-D tensor with a row per token of one of ``vocab_sizes``) goes after the block that follows
    it (``model.layers.0.``): a long prompt needs the table and that block before the block computes, in either
    order, and a short one reads a few rows of the table but all of the block. bench_hub's 32-token prompt had
    40-55 MB of its 131 MB table fetched before its lookup, and its first block after it.
    """
    order: list[TensorEntry] = []
    tables: list[TensorEntry] = []  # waiting for the end of the block after them
    block = None
    for entry in sorted(entries, key=lambda e: (e.shard, e.offset)):
        if not entry.nbytes:
            continue
        if len(entry.shape) == 2 and entry.shape[0] in vocab_sizes:
            tables.append(entry)
            continue
        if tables:
            here = _block_of(entry.key)
            if block is None:
                block = here
            elif here != block:
                order += tables
                tables, block = [], None
        order.append(entry)
    order += tables
    head: list[tuple[str, int, int]] = []
    total = 0
    for entry in order:
        if total >= limit:
            break
        length = min(entry.nbytes, limit - total)
        if head and head[-1][0] == entry.shard and head[-1][1] + head[-1][2] == entry.offset:
            head[-1] = (entry.shard, head[-1][1], head[-1][2] + length)
        else:
            head.append((entry.shard, entry.offset, length))
        total += length
    return head


def _block_of(key: str) -> str:
    """The numbered module a tensor belongs to (``model.layers.0`` of ``model.layers.0.mlp.up_proj.weight``), or
    the tensor itself."""
    parts = key.split(".")
    numbered = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    return key if numbered is None else ".".join(parts[: numbered + 1])


def _vocab_sizes(repo: HubRepo) -> frozenset[int]:
    """The ``vocab_size`` values of the repo's config.json (nested ones too: a multimodal model's text config), if
    it is in the cache: transformers fetches it first thing in from_pretrained, alongside our index and headers.
    No request of our own: without it, the head start keeps file order."""
    path = try_to_load_from_cache(
        repo.repo_id, repo.path_in_repo(CONFIG_NAME), cache_dir=repo.cache_dir, revision=repo.commit
    )
    if not isinstance(path, str):
        return frozenset()
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return frozenset()
    sizes: set[int] = set()
    nodes = [config]
    while nodes:
        node = nodes.pop()
        if isinstance(node, dict):
            size = node.get("vocab_size")
            if isinstance(size, int) and not isinstance(size, bool) and size > 0:
                sizes.add(size)
            nodes += node.values()
    return frozenset(sizes)


def _open_shards(
    repo: HubRepo,
    shards: list[str],
    listed: dict[str, Any] | None,
    pinned: dict[str, Any],
    names: tuple[str, str],
    max_connections: int,
    complete_download: bool,
    abandoned: threading.Event,
    located: dict[str, RemoteFile],
) -> Checkpoint:
    """The checkpoint of ``shards``: cached ones read in place, the others described (``located`` already, else
    from ``listed``, else by paths-info), their headers fetched, and streamed. ``names``: the index's and the
    single file's names."""
    _go_on(abandoned)
    repo_id, (index_name, single_name) = repo.repo_id, names
    local: dict[str, Path] = {}
    for shard in shards:
        cached = None if repo.force_download else _cached_path(repo, shard)
        if cached is not None:
            local[shard] = cached
    missing = [shard for shard in shards if shard not in local]
    if missing and repo.offline:
        raise CheckpointError(_offline_message(repo, missing, index_name))
    remote = {shard: located[shard] for shard in missing if shard in located}
    missing = [shard for shard in missing if shard not in remote]
    if missing:
        try:
            resolved = describe_remote_files(repo, missing, listed)
        except ShardNotInRepoError as err:
            shard = err.shard
            if shard == single_name:
                raise CheckpointError(_no_safetensors_message(repo_id, pinned)) from None
            raise CheckpointError(f"Shard {shard} of {repo_id} is listed in its index but not in the repo.") from None
        for shard, remote_file in resolved.items():
            if remote_file is None:  # a small file outside LFS: no sha256 to verify a stream against
                local[shard] = Path(hf_hub_download(repo_id, shard, **pinned))
            else:
                remote[shard] = remote_file
    _go_on(abandoned)
    source = HubSource(repo, local, remote, max_connections=max_connections, complete_download=complete_download)
    first = min(shards)
    if first in remote:  # its first tensors follow its header: they go out with the header's request, not after
        source.start_ahead_once_located(first, upto=min(schedule.HEAD_START_BYTES, schedule.BLIND_HEAD_START_BYTES))

    def head_start(shard: str, entries: list[TensorEntry]) -> None:
        # The head start of the first shard in file order (the embedding, the first blocks) goes out as soon as its
        # header is parsed, not after every header and the index: a round trip or more earlier on the link.
        if shard == first and shard in remote:
            source.start_ahead(_file_order_head(entries, schedule.HEAD_START_BYTES, _vocab_sizes(repo)))

    try:
        return _index(
            source, source.shard_sizes, repo_id, max_connections, head_start, repo_id=repo_id, commit=repo.commit
        )
    except BaseException:
        source.close()
        raise


def _guess_shards(repo: HubRepo, listed: Iterable[str], index_name: str, single_name: str) -> list[str] | None:
    """The weight files the index will name, from the names of the repo's files, when ``save_pretrained``'s
    naming leaves no doubt: every one of ``model-00001-of-0000N.safetensors`` to N (next to the index), or
    ``model.safetensors`` alone (no index). None otherwise."""
    prefix = f"{repo.subfolder}/" if repo.subfolder else ""
    names = {path.removeprefix(prefix) for path in listed if path.startswith(prefix)}
    if index_name not in names:
        return [single_name] if single_name in names else None
    stem = single_name.removesuffix(".safetensors")
    pattern = re.compile(re.escape(stem) + r"-(\d{5})-of-(\d{5})\.safetensors")
    numbered = [(int(m[1]), int(m[2]), name) for name in names if (m := pattern.fullmatch(name))]
    totals = {total for _, total, _ in numbered}
    if len(totals) != 1 or sorted(i for i, _, _ in numbered) != list(range(1, totals.pop() + 1)):
        return None
    return sorted(name for _, _, name in numbered)


def _discard_guess(listing: Future | None) -> None:
    """Close the checkpoint opened from a guess the index did not confirm, once it is open."""

    def discard(listing: Future) -> None:
        if listing.exception() is None and listing.result()[2] is not None:
            listing.result()[2].add_done_callback(_close_checkpoint)

    if listing is not None:
        listing.add_done_callback(discard)


def _in_background(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
    """Run ``function`` in a daemon thread: a call still retrying when the load is done (a listing it gave up
    waiting for) neither holds the load nor the process's exit."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(function(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - handed to whoever asks for the result
            future.set_exception(err)

    threading.Thread(target=run, name=METADATA_THREAD, daemon=True).start()
    return future


def _listed(listing: Future | None) -> tuple[dict[str, Any] | None, list[str] | None, Future | None]:
    """What `list_and_guess` gave if it was asked for and came: the folder listing, the guessed shards and their
    checkpoint being opened; Nones otherwise (the shards are then described by ``get_paths_info``, which reports
    its own errors)."""
    if listing is None:
        return None, None, None
    try:
        return listing.result(timeout=LISTING_GRACE_S)
    except LateError:  # concurrent.futures' own before Python 3.11
        logger.debug("The listing of the weights' folder is late; asking paths-info instead")
        _discard_guess(listing)
    except Exception as err:  # noqa: BLE001 - only a shortcut: the paths-info call that replaces it raises
        logger.debug("Listing the weights' folder failed (%r); asking paths-info instead", err)
    return None, None, None


def _download_quietly(repo_id: str, filename: str, pinned: dict[str, Any], abandoned: threading.Event) -> None:
    """``hf_hub_download`` ahead of the caller's own call for the same file; errors are the caller's to report."""
    if abandoned.is_set():
        return
    try:
        hf_hub_download(repo_id, filename, **pinned)
    except Exception as err:  # noqa: BLE001 - e.g. no generation_config.json: the caller's call handles it
        logger.debug("Fetching %s ahead failed: %r", filename, err)


def _cached_path(repo: HubRepo, shard: str) -> Path | None:
    cached = try_to_load_from_cache(
        repo.repo_id, repo.path_in_repo(shard), cache_dir=repo.cache_dir, revision=repo.commit
    )
    return Path(cached) if isinstance(cached, str) else None


def _offline_message(repo: HubRepo, missing: list[str], index_name: str) -> str:
    details = []
    for shard in missing:
        held = recorded_bytes(repo.storage_folder, repo.path_in_repo(shard), repo.commit)
        details.append(f"{shard} ({held:,} bytes fetched so far)" if held else shard)
    return (
        f"{len(missing)} weight file(s) of {repo.repo_id} are not (completely) in the local Hub cache and downloads "
        f"are off (HF_HUB_OFFLINE=1 or local_files_only=True): {', '.join(details)}. Run once with network access "
        f"(hf_weightstream.wait_until_cached(model) completes the download; a run resumes what an earlier "
        f"one fetched), or `hf download {repo.repo_id}`. If {index_name} itself is missing from the cache, the same "
        "applies to it."
    )


def _no_safetensors_message(repo_id: str, download_kwargs: dict[str, Any]) -> str:
    api = HfApi(token=download_kwargs.get("token"))
    subfolder = download_kwargs.get("subfolder") or ""
    found = [
        name
        for name in _OTHER_FORMATS
        if api.file_exists(
            repo_id, f"{subfolder}/{name}" if subfolder else name, revision=download_kwargs.get("revision")
        )
    ]  # HEAD requests: never download a multi-GB .bin just to name it
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
    return _index(source, {shard: os.path.getsize(path) for shard, path in paths.items()}, location, 1)


def _index(
    source: LocalFileSource | HubSource,
    sizes: dict[str, int],
    location: str,
    parallel: int,
    on_header: Callable[[str, list[TensorEntry]], None] | None = None,
    **fields: Any,
) -> Checkpoint:
    """Parse every shard's header through ``source``; in parallel for remote shards (one round trip each).
    ``on_header(shard, entries)`` is called as each header is parsed."""

    def header(shard: str) -> list[TensorEntry]:
        entries = list(read_shard_header(shard, sizes[shard], lambda o, n: source.read(shard, o, n)).values())
        if on_header is not None:
            on_header(shard, entries)
        return entries

    shards = sorted(sizes)
    if parallel > 1 and len(shards) > 1:
        with ThreadPoolExecutor(max_workers=min(parallel, len(shards)), thread_name_prefix="hf_ws-header") as ex:
            per_shard = list(ex.map(header, shards))
    else:
        per_shard = [header(shard) for shard in shards]
    entries = [entry for found in per_shard for entry in found]
    return Checkpoint(CheckpointIndex(entries, sizes), source, location, **fields)
