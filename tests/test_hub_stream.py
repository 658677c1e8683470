"""Lazy Hub streaming against the local Hub server and the real huggingface_hub client: no mocks.

Every test reads the server's request log: which byte ranges were fetched, when, by whom, with which headers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hubtools import (
    finish_stream_worker,
    hf_hub_endpoint,
    hub_server,
    make_tiny_llama,
    start_stream_worker,
)
from huggingface_hub import constants, hf_hub_download, scan_cache_dir
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from transformers import AutoModelForCausalLM

from hf_weightstream import CheckpointError, StreamConfig, StreamingRuntimeError, hub_stream
from hf_weightstream.hub_stream import RangeFetchError, RetryPolicy, wait_until_cached
from hf_weightstream.testing.hub_server import Fault, HubServer, RequestRecord

REPO = "org/tiny"
PROMPT = [1, 5, 9, 13, 17, 21]
NEW_TOKENS = 4
# About 13.6 MB in 2 MB shards: big enough for a bandwidth cap to make a download last a few seconds.
BIG = {"max_shard_size": "2MB", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
       "vocab_size": 2048}  # fmt: skip


# -- fixtures and helpers ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~105 KB tiny Llama in 3 shards."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("big"), **BIG)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoff waits of tens of milliseconds instead of seconds, so fault tests stay quick."""
    monkeypatch.setattr(hub_stream, "RETRY", RetryPolicy(attempts=4, http_retries=3, base_wait=0.05, max_wait=0.2))


_opened: list[hub_stream.HubSource] = []


@pytest.fixture(autouse=True)
def close_sources() -> Iterator[None]:
    """Stop each test's models' connections when it ends (as a process exit would), before its server stops."""
    yield
    while _opened:
        _opened.pop().close()


@contextlib.contextmanager
def served(folder: Path, cache: Path, **server_kwargs) -> Iterator[HubServer]:
    with hub_server({REPO: folder}, **server_kwargs) as server, hf_hub_endpoint(server.url, cache):
        yield server


def stream(repo: str = REPO, **config) -> AutoModelForCausalLM:
    token = config.pop("token", None)
    model = AutoModelForCausalLM.from_pretrained(
        repo, device_map="stream", stream_config=StreamConfig(**config), token=token
    )
    _opened.append(source_of(model))
    return model


def reference_tokens(folder: Path) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return generate(model)


def generate(model) -> list[int]:
    return model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False)[0].tolist()


def shard_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))}


def header_ends(folder: Path) -> dict[str, int]:
    """Where the weight bytes start in each shard (8-byte length + JSON header)."""
    ends = {}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            ends[path.name] = 8 + struct.unpack("<Q", f.read(8))[0]
    return ends


def fetched(server: HubServer) -> list[tuple[str, int, int]]:
    """(file, start, end) of the bytes each ranged answer delivered, in the order the requests arrived."""
    return fetched_from(sorted(server.log, key=lambda r: r.time))


def fetched_from(log: list[RequestRecord]) -> list[tuple[str, int, int]]:
    """Answers to requests the client had given up on (a delay fault past its timeout) are left out: their bytes
    went to a closed socket."""
    out = []
    for r in log:
        if r.method == "GET" and r.status == 206 and r.file and not (r.fault or "").startswith("delay"):
            start = int(r.range.removeprefix("bytes=").split("-")[0])
            out.append((Path(r.file).name, start, start + r.bytes_sent))
    return out


class StopForward(Exception):
    """Raised from a forward pre-hook to end a forward pass part-way (a process that stops early)."""


def forward_until(model, layer: int) -> None:
    """Run a forward pass that stops before ``layer``: only the units before it are read."""

    def stop(*_args) -> None:
        raise StopForward

    handle = model.model.layers[layer].register_forward_pre_hook(stop)
    try:
        with pytest.raises(StopForward), torch.no_grad():
            model(torch.tensor([PROMPT]))
    finally:
        handle.remove()


def assert_each_byte_once(ranges: list[tuple[str, int, int]], sizes: dict[str, int]) -> None:
    """No byte delivered twice, and every byte of every shard delivered."""
    by_file: dict[str, list[tuple[int, int]]] = {}
    for name, start, end in ranges:
        by_file.setdefault(name, []).append((start, end))
    assert set(by_file) == set(sizes)
    for name, spans in by_file.items():
        spans.sort()
        position = 0
        for start, end in spans:
            assert start == position, f"{name}: gap or overlap at byte {position} (next fetch starts at {start})"
            position = end
        assert position == sizes[name], f"{name}: fetched up to {position} of {sizes[name]}"


def repo_cache(cache: Path) -> Path:
    return cache / "models--org--tiny"


def assert_cache_verified(cache: Path, folder: Path) -> None:
    """Every shard is in blobs/ under its sha256, linked from the snapshot; no partial file is left."""
    storage = repo_cache(cache)
    commit = (storage / "refs" / "main").read_text()
    for name in shard_sizes(folder):
        data = (folder / name).read_bytes()
        pointer = storage / "snapshots" / commit / name
        assert pointer.is_symlink() and pointer.resolve().name == hashlib.sha256(data).hexdigest()
        assert pointer.read_bytes() == data
    for blob in (storage / "blobs").iterdir():
        if len(blob.name) == 64:
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"corrupt blob {blob.name}"
    partial = storage / ".weightstream" / "partial"
    assert not list(partial.glob("*.part")) and not list(partial.glob("*.ranges.json"))


def units_of(model) -> list:
    return model._hf_weightstream.units


def source_of(model) -> hub_stream.HubSource:
    return model._hf_weightstream.checkpoint.source


# -- loading and the order of fetches ----------------------------------------------------------------------------


def test_load_fetches_only_headers_then_weights_in_execution_order(tiny: Path, tmp_path: Path, capsys) -> None:
    expected = reference_tokens(tiny)
    ends, sizes = header_ends(tiny), shard_sizes(tiny)
    with served(tiny, tmp_path) as server:
        model = stream(complete_download=False, max_connections=1, budget=60_000)

        loaded = fetched(server)
        assert loaded and all(end <= ends[name] for name, _, end in loaded), "a weight byte was fetched at load"
        assert sum(end - start for _, start, end in loaded) == sum(ends.values())
        assert not any(len(p.name) == 64 for p in (repo_cache(tmp_path) / "blobs").iterdir()), "no shard in blobs/"

        assert generate(model) == expected
        spans = [(r.shard, r.offset, r.offset + r.length, i) for i, u in enumerate(units_of(model)) for r in u.ranges]
        weights = fetched(server)[len(loaded) :]
        order = [next(i for shard, s, e, i in spans if shard == name and s <= start < e) for name, start, _ in weights]
        assert order == sorted(order), "with one connection, bytes arrive in the order the forward pass reads them"
        assert_each_byte_once(fetched(server), sizes)

        # Every byte was read, so every shard was completed and committed, although complete_download=False.
        before = len(server.log)
        assert {k: v.verified for k, v in wait_until_cached(model).items()} == dict.fromkeys(sizes, True)
        assert generate(model) == expected  # budget below the model: re-reads come from disk, not the network
        assert len(server.log) == before
    if not are_progress_bars_disabled("hf_weightstream"):
        assert "Streaming org/tiny" in capsys.readouterr().err


def test_large_reads_are_split_over_several_connections(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(hub_stream, "SUBRANGE_BYTES", 4096)
    with served(tiny, tmp_path, bandwidth=400_000) as server:
        model = stream(complete_download=False, max_connections=3)
        server.clear_log()
        (rng,) = next(u for u in units_of(model) if u.name == "model.layers.1").ranges
        with torch.no_grad():
            model(torch.tensor([PROMPT]))
        server.wait_idle()
        log = [r for r in server.log if r.method == "GET"]
    end = rng.offset + rng.length
    pieces = sorted((s, e) for name, s, e in fetched_from(log) if name == rng.shard and rng.offset <= s < end)
    assert len(pieces) == -(-rng.length // 4096) and all(e - s <= 4096 for s, e in pieces)
    assert [p[0] for p in pieces[1:]] == [p[1] for p in pieces[:-1]], "contiguous pieces of one read"
    overlapping = max(sum(1 for o in log if o.time <= r.time < o.end) for r in log)
    assert 2 <= overlapping <= 3, "several requests at once, never more than max_connections"


def test_cached_shards_are_read_in_place(tiny: Path, tmp_path: Path) -> None:
    shards = list(shard_sizes(tiny))
    with served(tiny, tmp_path) as server:
        hf_hub_download(REPO, shards[1])
        server.clear_log()
        model = stream(complete_download=False)
        assert generate(model) == reference_tokens(tiny)
        touched = {Path(r.file).name for r in server.log if r.file and r.file.endswith(".safetensors")}
    assert touched == {shards[0], shards[2]}, "no HEAD and no GET for a shard that is already in the cache"
    assert source_of(model).streamed_shards == [shards[0], shards[2]]


# -- completing into the standard cache --------------------------------------------------------------------------


def test_complete_download_commits_to_the_cache_and_offline_load_needs_no_request(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    with served(tiny, tmp_path) as server:
        model = stream()  # complete_download=True by default
        assert generate(model) == reference_tokens(tiny)
        cached = wait_until_cached(model, timeout=30)
        assert_each_byte_once(fetched(server), shard_sizes(tiny))
        assert {k: v.sha256 for k, v in cached.items()} == {
            name: hashlib.sha256((tiny / name).read_bytes()).hexdigest() for name in shard_sizes(tiny)
        }
        assert all(v.verified and v.blob.parent.name == "blobs" for v in cached.values())
        assert_cache_verified(tmp_path, tiny)
        assert not scan_cache_dir(tmp_path).warnings

        server.clear_log()
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        plain = AutoModelForCausalLM.from_pretrained(REPO)
        assert server.log == [], "an offline plain load must not send a single request"
    local = AutoModelForCausalLM.from_pretrained(tiny)
    for (name, a), (_, b) in zip(plain.state_dict().items(), local.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_force_download_streams_every_byte_again_and_replaces_the_blobs(tiny: Path, tmp_path: Path) -> None:
    with served(tiny, tmp_path) as server:
        wait_until_cached(stream(), timeout=30)
        server.clear_log()
        model = AutoModelForCausalLM.from_pretrained(REPO, device_map="stream", force_download=True)
        _opened.append(source_of(model))
        assert source_of(model).streamed_shards == list(shard_sizes(tiny)), "cached shards are not used"
        assert generate(model) == reference_tokens(tiny)
        assert all(c.verified for c in wait_until_cached(model, timeout=30).values())
        assert_each_byte_once(fetched(server), shard_sizes(tiny))
    assert_cache_verified(tmp_path, tiny)


def test_a_second_process_fetches_only_what_is_missing(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(hub_stream, "READAHEAD_BYTES", 0)  # run 1 fetches exactly what its forward reads
    with served(tiny, tmp_path) as server:
        model = stream(complete_download=False)
        forward_until(model, layer=1)
        source_of(model).close()  # what a process does when it ends: record what it fetched
        first = fetched(server)
        assert 0 < sum(e - s for _, s, e in first) < sum(shard_sizes(tiny).values())

        server.clear_log()
        result = finish_stream_worker(start_stream_worker(server.url, tmp_path, REPO, PROMPT, new_tokens=NEW_TOKENS))
        second = fetched(server)
    assert result["tokens"] == reference_tokens(tiny)
    assert_each_byte_once(first + second, shard_sizes(tiny))
    assert_cache_verified(tmp_path, tiny)


def test_a_corrupt_partial_file_is_discarded_with_a_warning_and_fetched_again(
    tiny: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(hub_stream, "READAHEAD_BYTES", 0)
    with served(tiny, tmp_path) as server:
        model = stream(complete_download=False)
        (embed,) = next(u for u in units_of(model) if u.name == "model.embed_tokens").ranges
        forward_until(model, layer=0)  # fetches the embedding only
        source_of(model).close()
        digest = hashlib.sha256((tiny / embed.shard).read_bytes()).hexdigest()
        part = repo_cache(tmp_path) / ".weightstream" / "partial" / f"{digest}.part"
        recorded = recorded_ranges(repo_cache(tmp_path))[embed.shard]
        victim = next(max(s, embed.offset) for s, e in recorded if e > embed.offset)  # a recorded weight byte
        with part.open("r+b") as f:  # a bit flips on disk inside a recorded range
            f.seek(victim)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        server.clear_log()

        with caplog.at_level(logging.WARNING, logger="hf_weightstream"):
            cached = wait_until_cached(stream(), timeout=30)
        refetched = sum(e - s for name, s, e in fetched(server) if name == embed.shard)
    assert "sha256" in caplog.text and "fetching the file again" in caplog.text
    assert refetched >= shard_sizes(tiny)[embed.shard], "the whole file is fetched again after a mismatch"
    assert all(v.verified for v in cached.values())
    assert_cache_verified(tmp_path, tiny)


# -- faults ------------------------------------------------------------------------------------------------------


def test_server_faults_are_retried_and_no_byte_is_fetched_twice(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.5)  # a stall longer than this is retried
    with served(tiny, tmp_path) as server:
        model = stream(complete_download=False, max_connections=2)
        faults = [
            server.add_fault(Fault(path="*.safetensors", ranged_only=True, **action))
            for action in (
                {"status": 503},
                {"status": 429},
                {"reset": True},
                {"truncate_after": 1000},
                {"delay": 1.5},
                {"status": 500},
            )
        ]
        assert generate(model) == reference_tokens(tiny)
        wait_until_cached(model, timeout=30)
        assert all(f.fired == 1 for f in faults), [(f.describe(), f.fired) for f in faults]
        assert_each_byte_once(fetched(server), shard_sizes(tiny))
    assert_cache_verified(tmp_path, tiny)


def test_when_retries_run_out_the_error_names_file_and_range(tiny: Path, tmp_path: Path) -> None:
    with served(tiny, tmp_path) as server:
        model = stream(complete_download=False)
        server.add_fault(Fault(path="*.safetensors", ranged_only=True, status=503, times=None))
        with pytest.raises((StreamingRuntimeError, RangeFetchError)) as caught:
            generate(model)
    error = caught.value if isinstance(caught.value, RangeFetchError) else caught.value.__cause__
    assert isinstance(error, RangeFetchError)
    message = str(error)
    assert ".safetensors of org/tiny@" in message and "bytes " in message
    assert "503" in message and "run again to resume" in message


def test_offline_with_missing_bytes_names_the_files(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    with served(tiny, tmp_path) as server:
        source_of(stream(complete_download=False)).close()  # config, index and headers are cached, no weights
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        server.clear_log()
        with pytest.raises(CheckpointError) as caught:
            stream()
        assert server.log == []
    message = str(caught.value)
    assert "HF_HUB_OFFLINE=1" in message and "Run once with network access" in message
    for shard in shard_sizes(tiny):
        assert shard in message
    assert "bytes fetched so far" in message  # the headers are in the partial files


@pytest.mark.parametrize(
    "repo, kwargs, hub_error",
    [
        ("org/missing", {}, RepositoryNotFoundError),
        (REPO, {"revision": "nope"}, RevisionNotFoundError),
        ("org/gated", {}, GatedRepoError),
    ],
)
def test_hub_errors_are_the_ones_a_plain_load_raises(tiny: Path, tmp_path: Path, repo, kwargs, hub_error) -> None:
    with HubServer() as server, hf_hub_endpoint(server.url, tmp_path):
        server.add_repo(REPO, tiny)
        server.add_repo("org/gated", tiny, gated=True)
        with pytest.raises(OSError) as plain:
            AutoModelForCausalLM.from_pretrained(repo, token=False, **kwargs)
        with pytest.raises(type(plain.value)) as streamed:
            AutoModelForCausalLM.from_pretrained(repo, device_map="stream", token=False, **kwargs)
    assert str(streamed.value) == str(plain.value)
    assert isinstance(streamed.value.__cause__, hub_error)
    frames = []
    tb = streamed.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    ours = {str(Path(hub_stream.__file__).with_name(name)) for name in ("hub_stream.py", "checkpoint.py")}
    assert not ours & set(frames), "the error comes from the Hub client, not from our internals"


def test_gated_repo_with_token_streams_from_the_cdn_without_the_token(tiny: Path, tmp_path: Path) -> None:
    with HubServer(mode="xet") as server, hf_hub_endpoint(server.url, tmp_path):
        server.add_repo(REPO, tiny, gated=True)
        model = stream(complete_download=False, token="hf_test")
        refresh = server.add_fault(Fault(origin="bridge", status=403))  # a signed bridge URL that expired
        assert generate(model) == reference_tokens(tiny)
        log = server.log
    ranged = [r for r in log if r.range is not None]
    assert ranged and all(r.origin == "bridge" and not r.authorization for r in ranged)
    assert all(r.authorization for r in log if r.origin == "hub" and r.path.startswith(f"/{REPO}/resolve/"))
    assert not any(r.status == 302 and r.range for r in log), "range requests go straight to the CDN location"
    assert refresh.fired == 1
    assert_each_byte_once(fetched_from(ranged), shard_sizes(tiny))


def test_progress_bar_respects_hf_hub_disable_progress_bars(tiny: Path, tmp_path: Path, capsys) -> None:
    disable_progress_bars()
    try:
        with served(tiny, tmp_path):
            generate(stream())
    finally:
        enable_progress_bars()
    assert "Streaming org/tiny" not in capsys.readouterr().err


# -- other processes ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_mid_download_then_the_next_run_resumes(big: Path, tmp_path: Path) -> None:
    sizes = shard_sizes(big)
    total = sum(sizes.values())
    storage = repo_cache(tmp_path)
    digests = {name: hashlib.sha256((big / name).read_bytes()).hexdigest() for name in sizes}

    def committed() -> set[str]:
        return {name for name, digest in digests.items() if (storage / "blobs" / digest).exists()}

    def saved() -> int:
        recorded = sum(e - s for v in recorded_ranges(storage).values() for s, e in v)
        return recorded + sum(sizes[name] for name in committed())

    with hub_server({REPO: big}, bandwidth=3_000_000) as server:
        proc = start_stream_worker(server.url, tmp_path, REPO, PROMPT, new_tokens=2)
        deadline = time.monotonic() + 60
        while saved() < 0.25 * total:
            assert proc.poll() is None and time.monotonic() < deadline, "the worker ended before it was killed"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        server.wait_idle()

        for blob in (storage / "blobs").iterdir():  # nothing unverified ever reaches blobs/
            if len(blob.name) == 64:
                assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
        done, recorded = committed(), recorded_ranges(storage)
        assert len(done) < len(sizes), "the kill must land mid-download"
        for name, spans in recorded.items():  # the record never names a byte that is not on disk
            data = (big / name).read_bytes()
            with (storage / ".weightstream" / "partial" / f"{digests[name]}.part").open("rb") as f:
                for start, end in spans:
                    f.seek(start)
                    assert f.read(end - start) == data[start:end], f"{name}: recorded bytes {start}-{end} differ"

        server.clear_log()
        server.bandwidth = None
        result = finish_stream_worker(start_stream_worker(server.url, tmp_path, REPO, PROMPT, new_tokens=2))
        resumed = fetched(server)
    assert not {name for name, _, _ in resumed} & done, "a shard committed before the kill is not fetched again"
    for name, start, end in resumed:  # nor is any range the killed run recorded
        assert all(end <= s or start >= e for s, e in recorded.get(name, [])), (name, start, end)
    expected = AutoModelForCausalLM.from_pretrained(big).generate(torch.tensor([PROMPT]), max_new_tokens=2)
    assert result["tokens"] == expected[0].tolist()
    assert_cache_verified(tmp_path, big)


def recorded_ranges(storage: Path) -> dict[str, list[tuple[int, int]]]:
    """What the partial files' records name, per shard (a record is replaced atomically: always whole)."""
    out = {}
    for record in (storage / ".weightstream" / "partial").glob("*.ranges.json"):
        with contextlib.suppress(FileNotFoundError):  # committed meanwhile
            data = json.loads(record.read_text())
            out[Path(data["filename"]).name] = [tuple(r) for r in data["ranges"]]
    return out


@pytest.mark.slow
def test_two_processes_streaming_at_once_end_with_one_verified_blob(big: Path, tmp_path: Path) -> None:
    expected = AutoModelForCausalLM.from_pretrained(big).generate(torch.tensor([PROMPT]), max_new_tokens=2)
    with hub_server({REPO: big}, bandwidth=20_000_000) as server:
        procs = [start_stream_worker(server.url, tmp_path, REPO, PROMPT, new_tokens=2) for _ in range(2)]
        results = [finish_stream_worker(p) for p in procs]
    digests = {name: hashlib.sha256((big / name).read_bytes()).hexdigest() for name in shard_sizes(big)}
    for result in results:
        assert result["tokens"] == expected[0].tolist()
        assert result["cached"] == digests
    assert_cache_verified(tmp_path, big)
    assert len([b for b in (repo_cache(tmp_path) / "blobs").iterdir() if len(b.name) == 64]) == len(digests)
