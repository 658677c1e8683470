"""Lazy Hub streaming against the local Hub server (today's Hub: Xet-style redirects to a bridge) and the real
huggingface_hub client: no mocks.

Every test reads the server's request log: which byte ranges were fetched, when, by whom, with which headers.
Faults of today's Hub (expiring URLs, 403s, stalls, mirrors) are in test_hub_today.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hubtools import (
    NEW_TOKENS,
    PROMPT,
    REPO,
    TEST_PROBE_BYTES,
    _opened,
    assert_cache_verified,
    assert_each_byte_once,
    fetched,
    fetched_from,
    finish_stream_worker,
    forward_until,
    generate,
    hf_hub_endpoint,
    hub_server,
    make_tiny_llama,
    recorded_ranges,
    reference_tokens,
    repo_cache,
    served,
    shard_sizes,
    source_of,
    start_stream_worker,
    stream,
    streaming_defaults,
    units_of,
    wait_for_metadata_threads,
)
from huggingface_hub import ResolvedRevision, constants, hf_hub_download, scan_cache_dir
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from tiny import save as save_tiny
from transformers import AutoModelForCausalLM

import hf_weightstream
from hf_weightstream import BudgetError, CheckpointError, StreamConfig, checkpoint, hub, wait_until_cached
from hf_weightstream.checkpoint import SAFE_INDEX
from hf_weightstream.index import TensorEntry
from hf_weightstream.log import io_path
from hf_weightstream.testing.hub_repo import xet_hash_stand_in
from hf_weightstream.testing.hub_server import Fault, HubServer, RequestRecord

# About 13.6 MB in 2 MB shards: big enough for a bandwidth cap to make a download last a few seconds.
BIG = {"max_shard_size": "2MB", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
       "vocab_size": 2048}  # fmt: skip

streaming = pytest.fixture(autouse=True)(streaming_defaults)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ~105 KB tiny Llama in 3 shards."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("big"), **BIG)


def merged(ranges: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """(name, start, end) ranges, sorted, with touching or overlapping ones joined."""
    out: list[tuple[str, int, int]] = []
    for name, start, end in sorted(ranges):
        if out and out[-1][0] == name and start <= out[-1][2]:
            out[-1] = (name, out[-1][1], max(out[-1][2], end))
        else:
            out.append((name, start, end))
    return out


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- loading: round trips, then the order of fetches --------------------------------------------------------------


def test_load_costs_one_metadata_call_and_one_request_per_header_then_weights_in_execution_order(
    tiny: Path, tmp_path: Path, capsys
) -> None:
    expected = reference_tokens(tiny)
    sizes = shard_sizes(tiny)
    with served(tiny, tmp_path) as server:
        model = stream(complete_download=False, max_connections=1, budget=60_000)
        log = server.log

        # Revision resolved once, by the call that names the files (no listing): one resolve call per shard (a HEAD
        # answered 302 to the bridge, which says what the file is), then its header probe from the bridge.
        api = [r.path for r in log if r.path.startswith("/api/")]
        assert api == [f"/api/models/{REPO}"]
        shard_requests = [r for r in log if r.file and r.file.endswith(".safetensors")]
        assert sorted((r.origin, r.method, r.status, r.file) for r in shard_requests) == sorted(
            [("hub", "HEAD", 302, name) for name in sizes] + [("bridge", "GET", 206, name) for name in sizes]
        )
        loaded = fetched(server)
        assert sorted(loaded) == sorted((name, 0, min(size, TEST_PROBE_BYTES)) for name, size in sizes.items())
        assert not any(len(p.name) == 64 for p in (repo_cache(tmp_path) / "blobs").iterdir()), "no shard in blobs/"

        assert generate(model) == expected
        planned_units = [u for u in units_of(model) if not u.gather]  # a gathered table is read row by row
        spans = [(r.shard, r.offset, r.offset + r.length, i) for i, u in enumerate(planned_units) for r in u.ranges]
        weights = [(name, s, e) for name, s, e in fetched(server)[len(loaded) :]]
        order = [next((i for shard, a, b, i in spans if shard == name and a <= s < b), -1) for name, s, _ in weights]
        planned = [i for i in order if i >= 0]
        assert planned == sorted(planned), "with one connection, bytes arrive in the order the forward pass reads"
        assert_each_byte_once(fetched(server), sizes, complete=False)  # the embedding table: only rows looked up
        assert server.resolve_calls(".safetensors") == len(sizes), "later requests go straight to the bridge"

        assert {k: v.verified for k, v in wait_until_cached(model).items()} == dict.fromkeys(sizes, True)
        assert_each_byte_once(fetched(server), sizes)
        before = len(server.log)
        assert generate(model) == expected  # budget below the model: re-reads come from disk, not the network
        assert len(server.log) == before
    if not are_progress_bars_disabled("hf_weightstream"):
        assert "Streaming org/tiny" in capsys.readouterr().err


def _ahead(kwargs: dict) -> tuple:
    """Open REPO ahead with ``from_pretrained`` kwargs; (discard, the checkpoint's future)."""
    discard = checkpoint.open_hub_repo_ahead(REPO, kwargs)
    assert discard is not None
    (future,) = [f for key, f in checkpoint._ahead.items() if key[0] == threading.get_ident()]
    return discard, future


def _open_as_the_load(kwargs: dict, **options) -> Any:
    """What load_streamed does with the kwargs the auto class hands on."""
    return checkpoint.open_hub_repo(
        REPO, checkpoint.download_kwargs_of(dict(kwargs)), None, **{"max_connections": 12, **options}
    )


def test_a_repo_opened_ahead_is_taken_by_the_load_and_its_revision_resolved_once(tiny: Path, tmp_path: Path) -> None:
    with served(tiny, tmp_path) as server:
        commit = server.add_repo(REPO, tiny)
        kwargs = {"device_map": "stream", "stream_config": StreamConfig(complete_download=False)}
        discard, future = _ahead(kwargs)
        assert isinstance(kwargs["revision"], ResolvedRevision) and kwargs["revision"].resolved == commit
        opened = _open_as_the_load(kwargs, complete_download=False)
        discard()  # taken: nothing to close
        assert opened is future.result() and opened.commit == commit
        _opened.append(opened.source)
        api = [r.path for r in server.log if r.path.startswith("/api/")]
        assert api == [f"/api/models/{REPO}"], "the revision resolved once, by the call that named the shards"
        assert (repo_cache(tmp_path) / "refs" / "main").read_text() == commit, "recorded as huggingface_hub does"
        assert [r.method for r in server.log if r.file == SAFE_INDEX] == ["HEAD", "GET"]
        assert server.resolve_calls(".safetensors") == len(shard_sizes(tiny))
        assert opened.source._finalizer.alive


def test_a_load_that_fails_leaves_no_request_of_ours_behind(tiny: Path, tmp_path: Path) -> None:
    """The auto class's load fails (here: its config.json) while the repo is being opened ahead for it: the
    requests in flight end, and nothing after them goes out (no shard header, no head start). Left running, they
    would be waste, and requests that can fail under the user's next calls (huggingface_hub closes its shared
    client on a connect error)."""
    with served(tiny, tmp_path) as server:
        server.add_fault(Fault(file=SAFE_INDEX, delay=0.5, times=None))  # in flight when the load fails
        server.add_fault(Fault(file="*.safetensors", method="HEAD", delay=0.5, times=None))  # the shards' too
        server.add_fault(Fault(file="config.json", status=404, times=None))
        with pytest.raises(OSError):
            AutoModelForCausalLM.from_pretrained(REPO, device_map="stream")
        wait_for_metadata_threads()
        assert any(r.file == SAFE_INDEX for r in server.log), "the repo was being opened ahead"
        assert [r.method for r in server.log if r.file and r.file.endswith(".safetensors")] == ["HEAD"] * 3


def test_the_shards_own_resolve_answers_describe_them_while_the_index_is_on_its_way(tiny: Path, tmp_path: Path) -> None:
    """The call that resolves the branch names the repo's files: each shard's resolve answer (a 302 with its
    sha256, size, Xet hash and signed URL) is asked for at once, and the headers come from the bridge before the
    index does; no folder listing, and one resolve call per shard, as before."""
    sizes = shard_sizes(tiny)
    with served(tiny, tmp_path) as server:
        server.add_fault(Fault(file=SAFE_INDEX, method="GET", delay=1.0, times=None))
        model = stream()
        log = server.log
        index_came = max(r.end for r in log if r.file == SAFE_INDEX and r.method == "GET")
        headers = {r.file: r for r in log if r.origin == "bridge" and r.range and r.range.startswith("bytes=0-")}
        assert set(headers) == set(sizes) and all(r.time < index_came for r in headers.values())
        assert not [r for r in log if "/tree/" in r.path], "no folder listing"
        resolves = sorted((r.file, r.method) for r in log if r.is_resolve and (r.file or "").endswith(".safetensors"))
        assert resolves == [(name, "HEAD") for name in sorted(sizes)]
        assert generate(model) == reference_tokens(tiny)
        assert {k: v.verified for k, v in wait_until_cached(model, timeout=30).items()} == dict.fromkeys(sizes, True)
    assert_cache_verified(tmp_path, tiny)


def test_past_the_first_shards_the_listing_describes_the_others_in_the_same_round_trip(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(checkpoint, "LOCATE_AT_ONCE", 1)
    sizes = shard_sizes(tiny)
    first = min(sizes)
    with served(tiny, tmp_path, latency=0.2) as server:
        model = stream()
        log = server.log
        heads = [r for r in log if r.method == "HEAD" and r.file and r.file.endswith(".safetensors")]
        (listing,) = [r for r in log if "/tree/" in r.path]
        assert [r.file for r in heads] == [first] and abs(listing.time - heads[0].time) < 0.15, "sent together"
        assert generate(model) == reference_tokens(tiny)
        wait_until_cached(model, timeout=30)
        assert server.resolve_calls(".safetensors") == len(sizes), "the others: their first range's redirect"
        assert_each_byte_once(fetched(server), sizes)


@pytest.mark.parametrize("answer", ["error", "reset"])
def test_a_shard_its_resolve_answer_does_not_describe_is_described_by_the_listing(
    tiny: Path, tmp_path: Path, answer: str
) -> None:
    sizes = shard_sizes(tiny)
    odd = sorted(sizes)[1]
    with served(tiny, tmp_path) as server:
        if answer == "error":
            server.add_fault(Fault(file=odd, method="HEAD", status=500, times=None))
        else:
            server.add_fault(Fault(file=odd, method="HEAD", reset=True, times=None))
        model = stream()
        assert [r.path for r in server.log if "/tree/" in r.path], "the listing describes it"
        assert generate(model) == reference_tokens(tiny)
        wait_until_cached(model, timeout=30)
        assert_each_byte_once(fetched(server), sizes)
    assert_cache_verified(tmp_path, tiny)


def test_the_revision_is_resolved_as_transformers_would_when_the_hub_errs(tiny: Path, tmp_path: Path) -> None:
    """The call that resolves the revision and names the files ends as transformers' ``resolve_revision`` does: the
    commit (recorded in refs/ as huggingface_hub records it) and the names; when the Hub is down, the commit the
    cache recorded and no names; when the Hub refuses (an unknown revision), the revision as asked, for the load's
    own calls to report."""
    options = {"token": None, "cache_dir": None}
    with served(tiny, tmp_path) as server:
        commit = server.add_repo(REPO, tiny)
        revision, files = checkpoint._resolve_with_files(REPO, None, options)
        assert isinstance(revision, ResolvedRevision) and revision.resolved == commit
        assert sorted(files) == sorted(p.name for p in tiny.iterdir())
        assert (repo_cache(tmp_path) / "refs" / "main").read_text() == commit
        server.add_fault(Fault(path=f"/api/models/{REPO}*", status=503, times=None))
        revision, files = checkpoint._resolve_with_files(REPO, None, options)
        assert isinstance(revision, ResolvedRevision) and revision.resolved == commit and files is None
        server.clear_faults()
        assert checkpoint._resolve_with_files(REPO, "no-such-branch", options) == ("no-such-branch", None)


def test_the_gil_changes_hands_often_while_a_repo_is_opened_ahead_and_the_interval_is_put_back(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    """Our threads' round trips run while the load's thread imports and builds (Python holding the GIL): a short
    switch interval lets each of their steps go on at once, and the user's own interval comes back when the load
    ends, also when it fails."""
    from hf_weightstream import integration

    seen = []
    open_hub_repo = integration.open_hub_repo

    def taken(*args, **kwargs):
        seen.append(sys.getswitchinterval())
        return open_hub_repo(*args, **kwargs)

    monkeypatch.setattr(integration, "open_hub_repo", taken)
    users = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    try:
        with served(tiny, tmp_path) as server:
            server.add_repo(REPO, tiny)
            server.add_repo("org/other", tiny)
            AutoModelForCausalLM.from_pretrained(REPO, device_map="stream")
            assert seen == [checkpoint.PROMPT_SWITCH_INTERVAL_S]
            assert sys.getswitchinterval() == pytest.approx(0.004)
            server.add_fault(Fault(file="config.json", status=404, times=None))
            with pytest.raises(OSError):
                AutoModelForCausalLM.from_pretrained("org/other", device_map="stream")
            wait_for_metadata_threads()
            assert sys.getswitchinterval() == pytest.approx(0.004)
    finally:
        sys.setswitchinterval(users)


@pytest.mark.parametrize("change", ["options", "branch moved", "not loaded"])
def test_a_repo_opened_ahead_that_the_load_does_not_take_is_closed(
    tiny: Path, big: Path, tmp_path: Path, change: str
) -> None:
    with served(tiny, tmp_path) as server:
        kwargs = {"device_map": "stream", "stream_config": {"complete_download": False}}
        discard, future = _ahead(kwargs)
        ahead = future.result()
        if change == "options":
            opened = _open_as_the_load(kwargs, complete_download=True)
        elif change == "branch moved":  # main moved after the auto class resolved it: the load's own resolution
            moved = ResolvedRevision(server.add_repo(REPO, big), initial=None, repo_id=REPO)
            opened = _open_as_the_load({**kwargs, "revision": moved}, complete_download=False)
            assert opened.commit == moved.resolved != ahead.commit
            assert not ahead.source._finalizer.alive
        else:
            opened = None
        discard()
        assert not ahead.source._finalizer.alive
        if opened is not None:
            _opened.append(opened.source)
            assert opened is not ahead and opened.source._finalizer.alive


def test_nothing_is_opened_ahead_where_the_load_would_not_stream_from_the_hub(tiny: Path, tmp_path: Path) -> None:
    stream_kwargs = {"device_map": "stream"}
    with served(tiny, tmp_path) as server:
        cases = [
            (REPO, {}),  # not streaming
            (REPO, {"streaming": True, "device_map": "auto"}),  # rejected by the load, which says why
            (str(tiny), stream_kwargs),  # a local folder
            (REPO, {**stream_kwargs, "local_files_only": True}),
            ("org/missing", stream_kwargs),  # the load reports the missing repo
        ]
        for name, kwargs in cases:
            assert checkpoint.open_hub_repo_ahead(name, dict(kwargs)) is None, (name, kwargs)
        assert not checkpoint._ahead
        assert not [r for r in server.log if r.file], "no file requested"


@pytest.mark.parametrize("complete_download", [False, True])
def test_the_first_bytes_in_file_order_are_fetched_once_the_headers_are_known_and_nothing_else_before_a_read(
    tiny: Path, tmp_path: Path, monkeypatch, complete_download: bool
) -> None:
    head = 30_000  # of a ~105 KB model
    monkeypatch.setattr(hub.schedule, "HEAD_START_BYTES", head)
    with served(tiny, tmp_path) as server:
        opened = checkpoint.open_hub_repo(
            REPO, checkpoint.download_kwargs_of({}), None, max_connections=4, complete_download=complete_download
        )  # as from_pretrained does before it builds the model (whose read order would replace the head start)
        _opened.append(opened.source)
        head_reads = checkpoint._file_order_head(opened.index.entries.values(), head)
        assert sum(n for _, _, n in head_reads) == head
        wanted = [(n, max(o, TEST_PROBE_BYTES), o + k) for n, o, k in head_reads if o + k > TEST_PROBE_BYTES]
        deadline = time.monotonic() + 10
        while True:
            beyond_probes = [(n, max(s, TEST_PROBE_BYTES), e) for n, s, e in fetched(server) if e > TEST_PROBE_BYTES]
            if merged(beyond_probes) == merged(wanted):
                break
            assert time.monotonic() < deadline, f"the head start did not come: {merged(beyond_probes)}"
            time.sleep(0.02)
        time.sleep(0.2)  # and nothing more comes: the fill waits for the first read
        server.wait_idle()
        assert merged([(n, max(s, TEST_PROBE_BYTES), e) for n, s, e in fetched(server) if e > TEST_PROBE_BYTES]) == (
            merged(wanted)
        )


def test_the_first_shards_head_start_does_not_wait_for_the_other_shards_headers(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    """The part of the first shard's head start that needs its parsed header (past the file's first
    ``HEAD_START_BYTES``, which go out with the header request) goes out when that header is parsed: a slow header
    of another shard, or the index, must not hold it."""
    head = 30_000
    monkeypatch.setattr(hub.schedule, "HEAD_START_BYTES", head)
    shards = sorted(p.name for p in tiny.glob("*.safetensors"))

    def of(server: HubServer, shard: str) -> list[RequestRecord]:
        return [r for r in server.log if r.origin == "bridge" and r.range and r.file and Path(r.file).name == shard]

    with served(tiny, tmp_path) as server:
        slow = server.add_fault(Fault(file=f"*{shards[-1]}", origin="bridge", ranged_only=True, delay=1.0))
        opening = threading.Thread(
            target=lambda: _opened.append(
                checkpoint.open_hub_repo(REPO, checkpoint.download_kwargs_of({}), None, max_connections=4).source
            )
        )
        opening.start()
        deadline = time.monotonic() + 0.8  # before the slow header is answered

        def parsed_part() -> list[float]:  # requests reaching past the file's first `head` bytes
            return [r.time for r in of(server, shards[0]) if int(r.range.split("-")[1]) >= head]

        while not parsed_part():
            assert time.monotonic() < deadline, "the first shard's head start waited for the other headers"
            time.sleep(0.01)
        opening.join(timeout=10)
        assert not opening.is_alive()
        assert slow.fired
        slow_header = next(r for r in of(server, shards[-1]) if r.range.startswith("bytes=0-"))
        assert min(parsed_part()) < slow_header.end, "it went out before the slow header was answered"


def test_the_first_shards_first_bytes_go_out_with_its_header_request_not_after_its_answer(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    """Once the resolve of the first shard's header probe has said where the file is, the bytes after the probe
    (its first tensors) are requested at once: not after the probe's answer has arrived and been parsed."""
    monkeypatch.setattr(hub.schedule, "HEAD_START_BYTES", 30_000)
    first = min(p.name for p in tiny.glob("*.safetensors"))
    with served(tiny, tmp_path) as server:
        server.add_fault(Fault(file=f"*{first}", origin="bridge", ranged_only=True, delay=1.0))  # every answer late
        opened = checkpoint.open_hub_repo(REPO, checkpoint.download_kwargs_of({}), None, max_connections=4)
        _opened.append(opened.source)  # its headers are parsed: the probe's answer came, a second after its request
        # A request is logged when its (late) answer starts, with the time it arrived: the head start's, sent just
        # after the probe, may be logged just after the probe's answer was parsed.
        deadline = time.monotonic() + 5
        while True:
            bridge = [r for r in server.log if r.origin == "bridge" and r.file and Path(r.file).name == first]
            after = [r.time for r in bridge if r.range and not r.range.startswith("bytes=0-")]
            if after or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        probe = next(r for r in bridge if r.range and r.range.startswith("bytes=0-"))
        assert after, "nothing was requested after the probe"
        assert min(after) - probe.time < 0.5, "the first bytes after the probe waited for the probe's answer"


@pytest.mark.parametrize("config_cached", [True, False])
def test_the_head_start_fetches_the_first_block_before_the_embedding_table(
    tiny: Path, tmp_path: Path, monkeypatch, config_cached: bool
) -> None:
    """A short prompt reads a few rows of the table but all of the first block; a long one needs both before that
    block computes. The config's vocab_size says which tensor is the table; without a cached config (transformers
    fetches it first), file order."""
    first = min(p.name for p in tiny.glob("*.safetensors"))
    monkeypatch.setattr(hub.schedule, "HEAD_START_BYTES", (tiny / first).stat().st_size)
    monkeypatch.setattr(hub.schedule, "BLIND_HEAD_START_BYTES", 0)  # what the header orders, not what precedes it
    with served(tiny, tmp_path) as server:
        if config_cached:
            hf_hub_download(REPO, "config.json")
        opened = checkpoint.open_hub_repo(REPO, checkpoint.download_kwargs_of({}), None, max_connections=1)
        _opened.append(opened.source)
        entries = opened.index.entries
        table, block = entries["model.embed_tokens.weight"], entries["model.layers.0.mlp.gate_proj.weight"]
        assert table.shard == block.shard == first and table.offset < block.offset, "file order: the table first"
        deadline = time.monotonic() + 10
        while not (starts := [s for n, s, _ in fetched(server) if n == first and s >= TEST_PROBE_BYTES]):
            assert time.monotonic() < deadline, "no head start"
            time.sleep(0.01)
    expected = min(e.offset for e in entries.values() if e.key.startswith("model.layers.0.") and e.shard == first)
    assert starts[0] == (expected if config_cached else TEST_PROBE_BYTES)


def test_the_head_start_holds_adjacent_tensors_in_one_read_and_the_table_after_the_next_block() -> None:
    def entry(key: str, offset: int, nbytes: int, shape: tuple[int, ...], shard: str = "a") -> TensorEntry:
        return TensorEntry(key, shard, offset, nbytes, torch.float32, shape)

    entries = [
        entry("lm_head.weight", 0, 400, (100, 1)),
        entry("model.embed_tokens.weight", 400, 400, (100, 1)),
        entry("model.layers.0.mlp.weight", 800, 40, (10, 1)),
        entry("model.layers.0.norm.weight", 840, 4, (1,)),
        entry("model.layers.1.mlp.weight", 844, 40, (10, 1)),
        entry("model.layers.1.mlp.weight", 0, 40, (10, 1), shard="b"),
    ]
    head = checkpoint._file_order_head
    assert head(entries, 10_000) == [("a", 0, 884), ("b", 0, 40)], "file order, adjacent tensors in one read"
    assert head(entries, 10_000, frozenset({100})) == [("a", 800, 44), ("a", 0, 800), ("a", 844, 40), ("b", 0, 40)]
    assert head(entries, 100, frozenset({100})) == [("a", 800, 44), ("a", 0, 56)], "cut at the limit"
    assert head(entries[1:2] + entries[3:4], 10_000, frozenset({100})) == [("a", 840, 4), ("a", 400, 400)]


def test_connections_reading_ahead_survive_the_read_order_being_replaced() -> None:
    """The engine's order replaces the head start's while idle connections walk it (it killed a fetch thread)."""

    class NothingToClaim:  # every range already claimed: next_job walks the whole order each time
        remote = type("Remote", (), {"shard": "s"})()

        def claim_next(self, start: int, end: int, limit: int) -> None:
            return None

    background = hub.schedule.Background({"s": NothingToClaim()}, fill=False, connections=1)
    background.active = True
    long, short = [("s", i, 1) for i in range(5000)], [("s", 0, 1)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def connection() -> None:
        try:
            while not stop.is_set():
                background.next_job(forward_active=False)
        except BaseException as err:  # noqa: BLE001 - the failure this test looks for
            errors.append(err)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        thread = threading.Thread(target=connection, daemon=True)
        thread.start()
        for i in range(400):
            background.expect_reads(long if i % 2 else short)
        stop.set()
        thread.join(10)
    finally:
        sys.setswitchinterval(interval)
    assert not errors


def test_the_next_read_is_read_ahead_in_one_wave_and_the_reads_after_in_large_requests() -> None:
    """The forward pass waits for its next read next: it goes out one piece per connection, like a demand read."""
    MiB = 1 << 20

    class Shard:  # hands out claims as ShardStream.claim_next does, in order
        remote = type("Remote", (), {"shard": "s"})()
        claimed = 0

        def claim_next(self, start: int, end: int, limit: int) -> hub.stream.Claim | None:
            start = max(start, self.claimed)
            if start >= end:
                return None
            self.claimed = min(end, start + limit)
            return hub.stream.Claim(start, self.claimed)

    background = hub.schedule.Background({"s": Shard()}, fill=False, connections=4)
    background.expect_reads([("s", 0, 40 * MiB), ("s", 40 * MiB, 40 * MiB), ("s", 80 * MiB, 40 * MiB)])
    background.note_read("s", 0)  # the forward pass reads the first range: the second is next
    sizes = []
    while (job := background.next_job(forward_active=True)) is not None:
        sizes.append((job.claim.start // MiB, (job.claim.end - job.claim.start) // MiB))
    chunk = hub.schedule.READAHEAD_CHUNK_BYTES // MiB
    assert sizes[:4] == [(40, 10), (50, 10), (60, 10), (70, 10)], "four connections, one wave"
    assert sizes[4:] == [(80 + i * chunk, chunk) for i in range(40 // chunk)]


def test_the_head_start_goes_on_in_its_order_until_the_first_read() -> None:
    """The model is built (and its read order handed over) before the prompt is known: until the first read, idle
    connections go on with the head start (the first block, then the table a long prompt looks up whole), its first
    read cut for half the connections so that its pieces do not all end with those sent before the header."""
    MiB = 1 << 20

    class Shard:  # hands out claims as ShardStream.claim_next does, in order
        remote = type("Remote", (), {"shard": "s"})()

        def __init__(self) -> None:
            self.claimed: list[tuple[int, int]] = []

        def claim_next(self, start: int, end: int, limit: int) -> hub.stream.Claim | None:
            for s, e in self.claimed:
                if s <= start < e:
                    start = e
            if start >= end:
                return None
            self.claimed.append((start, min(end, start + limit)))
            return hub.stream.Claim(start, min(end, start + limit))

    background = hub.schedule.Background({"s": Shard()}, fill=False, connections=4)
    background.start_ahead([("s", 100 * MiB, 12 * MiB), ("s", 0, 16 * MiB)])  # the block, then the table
    background.expect_reads([("s", 100 * MiB, 40 * MiB), ("s", 140 * MiB, 40 * MiB)])  # the engine's: no table
    jobs = [background.next_job(forward_active=False) for _ in range(4)]
    assert [(j.claim.start // MiB, (j.claim.end - j.claim.start) // MiB) for j in jobs] == [
        (100, 6),
        (106, 6),
        (0, 8),
        (8, 8),
    ], "the head start's order, its first read in two pieces (half of four connections), then the table"
    assert all(j.guess for j in jobs)
    assert background.next_job(forward_active=False) is None, "the head start ends where it ends"
    background.note_read("s", 100 * MiB)
    job = background.next_job(forward_active=False)
    assert (job.claim.start // MiB, job.guess) == (140, False), "from the first read on, the engine's order"
    whole = hub.schedule.Background({"s": Shard()}, fill=False, connections=4)
    whole.start_ahead([("s", 200 * MiB, 128 * MiB)])  # no table known: the first 128 MiB in file order, one read
    chunk = hub.schedule.READAHEAD_CHUNK_BYTES
    sizes = {whole.next_job(forward_active=False).claim.end - 200 * MiB - k * chunk for k in range(4)}
    assert sizes == {chunk}, "readahead-sized pieces for every connection, not two of 64 MiB"


def test_the_head_starts_fetches_do_not_yield_to_a_read() -> None:
    """They hold what the first read and the one after it need; a stopped request loses the bytes in its socket."""
    scheduler = hub.schedule.FetchScheduler(2, lambda forward_active: None)
    stream = object()
    guess = hub.schedule.Job(stream, hub.stream.Claim(0, 10), hub.schedule.READAHEAD, guess=True)
    later = hub.schedule.Job(stream, hub.stream.Claim(10, 20), hub.schedule.READAHEAD)
    scheduler._running.update({guess, later})
    scheduler._queue.extend(hub.schedule.Job(stream, hub.stream.Claim(s, s + 1)) for s in (30, 40))
    scheduler._make_room()
    assert (guess.yield_requested, later.yield_requested) == (False, True)


def test_a_model_with_a_head_start_streams_the_same_tokens(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(hub.schedule, "HEAD_START_BYTES", 30_000)
    expected = reference_tokens(tiny)
    with served(tiny, tmp_path) as server:
        model = stream(complete_download=False, budget=60_000)
        assert generate(model) == expected
        server.wait_idle()
        assert_each_byte_once(fetched(server), shard_sizes(tiny), complete=False)


def test_a_header_is_one_request_with_the_probe_huggingface_hub_uses(big: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(hub.source, "HEADER_PROBE_BYTES", 100_001)  # the default, as parse_safetensors_... reads
    sizes = shard_sizes(big)
    with served(big, tmp_path) as server:
        stream(complete_download=False)
        loaded = fetched(server)
    assert sorted(loaded) == sorted((name, 0, 100_001) for name in sizes)


@pytest.mark.parametrize("connections", [12, 3])
def test_large_reads_are_split_over_several_connections(
    tiny: Path, tmp_path: Path, monkeypatch, connections: int
) -> None:
    monkeypatch.setattr(hub.schedule, "MIN_DEMAND_PIECE_BYTES", 4096)
    monkeypatch.setattr(hub.schedule, "READAHEAD_BYTES", 0)  # only what the forward pass reads
    with served(tiny, tmp_path, bandwidth=400_000) as server:
        model = stream(complete_download=False, max_connections=connections)
        server.clear_log()
        (rng,) = next(u for u in units_of(model) if u.name == "model.layers.1").ranges
        with torch.no_grad():
            model(torch.tensor([PROMPT]))
        server.wait_idle()
        log = [r for r in server.log if r.method == "GET"]
    end = rng.offset + rng.length
    pieces = sorted((s, e) for name, s, e in fetched_from(log) if name == rng.shard and rng.offset <= s < end)
    assert [p[0] for p in pieces[1:]] == [p[1] for p in pieces[:-1]], "contiguous pieces of one read"
    assert max(e - s for s, e in pieces) - min(e - s for s, e in pieces) < len(pieces), "equal pieces end together"
    if rng.length <= connections * 4096:  # pieces of MIN_DEMAND_PIECE_BYTES
        assert len(pieces) == -(-rng.length // 4096)
    else:  # more than a piece per connection: one piece per connection, all in flight at once
        assert len(pieces) == connections
    overlapping = max(sum(1 for o in log if o.time <= r.time < o.end) for r in log)
    assert 2 <= overlapping <= connections, "several requests at once, never more than max_connections"


def test_a_read_the_forward_pass_waits_for_makes_background_fetches_yield(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(hub.remote, "BODY_CHUNK_BYTES", 2048)  # a background fetch looks up every 2 KB
    sizes = shard_sizes(tiny)
    last = list(sizes)[-1]
    with served(tiny, tmp_path, bandwidth=20_000) as server:  # a slow link: one fill request takes seconds
        source = source_of(stream(max_connections=1))
        filler = threading.Thread(target=source.wait_until_cached, kwargs={"timeout": 60}, daemon=True)
        filler.start()  # the filler takes the one connection, in file order: the last shard comes last
        deadline = time.monotonic() + 10

        def long_request_running() -> bool:  # one that takes a second or more at this speed
            spans = [r.range.removeprefix("bytes=").split("-") for r in server.log if r.status == 206 and not r.end]
            return any(int(b) - int(a) >= 20_000 for a, b in spans)

        while not long_request_running():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)
        out = bytearray(1024)
        start = time.monotonic()
        source.read_into(last, sizes[last] - len(out), memoryview(out))
        waited = time.monotonic() - start
        log = server.log
        filler.join(60)
    assert bytes(out) == (tiny / last).read_bytes()[-len(out) :]
    assert waited < 1.0, f"the read waited {waited:.2f} s behind the filler"
    cut = [
        r
        for r in log
        if r.status == 206
        and r.fault is None
        and r.time < start
        and r.bytes_sent < int(r.range.split("-")[1]) + 1 - int(r.range.removeprefix("bytes=").split("-")[0])
    ]
    assert cut, "the background request running when the read came stopped early (its bytes were kept)"
    # What the server had sent into the socket of the request that yielded, and was not read, is sent again.
    assert server.bytes_sent(".safetensors") <= sum(sizes.values()) + 16_384


def _slow_background_requests(monkeypatch) -> None:
    """Background requests of 16 KB that look up every 2 KB whether to yield: a second each at 16 KB/s."""
    monkeypatch.setattr(hub.remote, "BODY_CHUNK_BYTES", 2048)
    for name in ("READAHEAD_CHUNK_BYTES", "FILL_CHUNK_BYTES", "MIN_FILL_BYTES"):
        monkeypatch.setattr(hub.schedule, name, 16_384)


def _background_request_under_way(
    server: HubServer, sent_under: int, size: int | None = 16_384
) -> tuple[RequestRecord, int, int]:
    """A background request of ``size`` bytes (None: at least 4 KB) that has sent under ``sent_under`` bytes, and
    its first and last byte."""
    deadline = time.monotonic() + 10
    while True:
        for r in server.log:
            if r.status == 206 and not r.end and r.range:
                first, last = (int(x) for x in r.range.removeprefix("bytes=").split("-"))
                length = last - first + 1
                if (length == size or (size is None and length >= 4096)) and r.bytes_sent < sent_under:
                    return r, first, last
        assert time.monotonic() < deadline, "no background request under way"
        time.sleep(0.002)


def test_a_background_fetch_of_bytes_a_read_waits_for_does_not_yield_to_that_read(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    """The head start holds the embedding when the first read comes: yielding would put its rest behind the read's
    other pieces."""
    _slow_background_requests(monkeypatch)
    with served(tiny, tmp_path, bandwidth=16_000) as server:
        source = source_of(stream(max_connections=1))
        filler = threading.Thread(target=source.wait_until_cached, kwargs={"timeout": 120}, daemon=True)
        filler.start()
        fill, first, last = _background_request_under_way(server, sent_under=8192)  # under half its bytes
        out = bytearray(4096)  # the last 2 KB of that request's range and 2 KB after it: a new demand piece
        source.read_into(fill.file, last + 1 - 2048, memoryview(out))
        log = server.log
        filler.join(120)
    assert bytes(out) == (tiny / fill.file).read_bytes()[last + 1 - 2048 : last + 1 + 2048]
    same = next(r for r in log if r.time == fill.time and r.range == fill.range)
    assert same.bytes_sent == last + 1 - first, "the background request the read waited for ran to its end"
    again = [r for r in log if r.file == fill.file and r.range and r.time > fill.time
             and first < int(r.range.removeprefix("bytes=").split("-")[0]) <= last]  # fmt: skip
    assert not again, "no byte of that range was asked for again"


def test_a_read_of_a_few_bytes_far_into_a_background_fetch_has_it_yield_rather_than_waiting_for_it(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    """A short prompt's embedding rows lie deep inside the head start's pieces: the read fetches them itself, and the
    background fetch stops at its next body chunk, instead of the read waiting for the piece to get there."""
    _slow_background_requests(monkeypatch)
    monkeypatch.setattr(hub.stream, "CUT_AHEAD_BYTES", 4096)  # a round trip's worth of this slow link
    with served(tiny, tmp_path, bandwidth=16_000) as server:
        source = source_of(stream(max_connections=2))
        filler = threading.Thread(target=source.wait_until_cached, kwargs={"timeout": 120}, daemon=True)
        filler.start()
        fill, first, last = _background_request_under_way(server, sent_under=4096)  # under a quarter of its bytes
        out = bytearray(1024)  # 1 KB, 2 KB before the end of that request's range
        began = time.monotonic()
        source.read_into(fill.file, last + 1 - 2048, memoryview(out))
        took = time.monotonic() - began
        log = server.log
        filler.join(120)
    assert bytes(out) == (tiny / fill.file).read_bytes()[last + 1 - 2048 : last + 1 - 1024]
    same = next(r for r in log if r.time == fill.time and r.range == fill.range)
    assert same.bytes_sent < last + 1 - first, "the background request was cut short"
    own = [r for r in log if r.file == fill.file and r.range and r.time > fill.time
           and int(r.range.removeprefix("bytes=").split("-")[0]) == last + 1 - 2048]  # fmt: skip
    assert own, "the read asked for its own bytes"
    # The rest of that request (over 12 KB, on a 16 KB/s link shared by two connections) would take over 1.5 s.
    assert took < 1.0, f"the read waited {took:.2f} s, as for the rest of the background request"


@pytest.mark.parametrize("lookup", ["one row", "rows across it"])
def test_a_lookup_stops_the_head_starts_fetches_of_the_table_it_needs_little_of(
    tiny: Path, tmp_path: Path, monkeypatch, lookup: str
) -> None:
    """The head start fetches the embedding table before the prompt is known. A short prompt's lookup needs a few
    rows: a head-start request holding little of them stops at its next body chunk, even one whose first bytes the
    lookup waits for, and the rows come in a request of their own. A long prompt's rows fill the request: it runs
    to its end."""
    monkeypatch.setattr(hub.remote, "BODY_CHUNK_BYTES", 256)
    monkeypatch.setattr(hub.schedule, "MIN_DEMAND_PIECE_BYTES", 1024)  # the 16 KB table: a request per connection
    monkeypatch.setattr(hub.stream, "CUT_AHEAD_BYTES", 2048)  # a round trip's worth of this slow link
    with served(tiny, tmp_path, bandwidth=4_000) as server:  # two connections: 2 KB/s each, seconds a request
        model = stream(complete_download=False, max_connections=2)
        (table,) = next(u for u in units_of(model) if u.name == "model.embed_tokens").ranges
        source = source_of(model)
        source.start_ahead([(table.shard, table.offset, table.length)])  # before any read, as at load time
        guess, first, last = _background_request_under_way(server, sent_under=1024, size=None)
        model._hf_weightstream.checkpoint.plan_fetches(units_of(model))  # the model is built: its read order
        rows = [first + 2048] if lookup == "one row" else [first + 128 * k for k in range((last - first) // 128)]
        outs = [memoryview(bytearray(128)) for _ in rows]
        began = time.monotonic()
        source.read_many(table.shard, list(zip(rows, outs, strict=True)), (table.offset, table.offset + table.length))
        took = time.monotonic() - began
        log = server.log
    data = (tiny / table.shard).read_bytes()
    assert [bytes(out) for out in outs] == [data[row : row + 128] for row in rows]
    same = next(r for r in log if r.time == guess.time and r.range == guess.range)
    if lookup == "rows across it":
        assert same.bytes_sent == last + 1 - first, "a request the lookup needs most of runs to its end"
        return
    assert same.bytes_sent < last + 1 - first, "the head start's request stopped"
    own = [r for r in log if r.time > guess.time and r.range == f"bytes={rows[0]}-{rows[0] + 127}"]
    assert own, "the lookup asked for its row itself"
    # The rest of that request (6 KB or more at 2 KB/s) would take 3 s; a lookup behind new background requests
    # on the connections the stopped ones freed took 1.8 s.
    assert took < 1.5, f"the lookup waited {took:.2f} s, as for the rest of the head start's request"


def test_demand_reads_are_served_in_the_order_they_began() -> None:
    """A read that claims again what a stopped fetch left (the rows an embedding lookup waits for) goes before the
    reads that came after it (the next block, prefetched), not behind them."""
    started: list[str] = []
    release = threading.Event()

    class Fake:
        def __init__(self, name: str) -> None:
            self.name = name

        def fetch(self, claim: Any, out: Any, should_yield: Any) -> None:
            started.append(self.name)
            release.wait(10)

        def release(self, claim: Any) -> None:
            pass

    def job(name: str, since: float) -> hub.schedule.Job:
        return hub.schedule.Job(Fake(name), hub.stream.Claim(0, 1), awaited=True, since=since)  # type: ignore[arg-type]

    scheduler = hub.schedule.FetchScheduler(1, lambda forward_active: None)
    try:
        busy = job("busy", 0.0)
        scheduler.submit([busy])
        deadline = time.monotonic() + 10
        while started != ["busy"]:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        later, again = job("next block", 2.0), job("rows of the first read", 1.0)
        scheduler.submit([later])
        scheduler.submit([again])
        release.set()
        for j in (busy, later, again):
            assert j.finished.wait(10)
    finally:
        scheduler.stop(timeout=5)
    assert started == ["busy", "rows of the first read", "next block"]


def test_complete_shards_are_verified_between_forward_passes_not_during_one(tiny: Path, tmp_path: Path) -> None:
    """Hashing a shard is CPU work a forward pass on a small machine would lose, and nothing needs the commit before
    the pass ends: shards complete during a pass are verified after it."""
    with served(tiny, tmp_path):
        source = source_of(stream(complete_download=True))
        streams = list(source._session.streams.values())
        source.forward_began()  # as the engine does when a forward pass starts
        source.read_into(streams[0].remote.shard, 0, memoryview(bytearray(16)))  # its first read starts the fill
        deadline = time.monotonic() + 30
        while not all(s.present.covers(0, s.size) and not s.unrecorded for s in streams):
            assert time.monotonic() < deadline, "the fill did not complete the shards"
            time.sleep(0.02)
        time.sleep(0.5)  # time the committer would have taken
        assert all(s.committed is None for s in streams), "a shard was hashed while the forward pass computed"
        source.forward_ended()
        while not all(s.committed is not None for s in streams):
            assert time.monotonic() < deadline, "the shards were not verified once the pass ended"
            time.sleep(0.02)
        assert all(s.verified == s.remote.sha256 for s in streams)


def test_the_engine_tells_its_hub_source_when_each_forward_pass_begins_and_ends(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(hub.HubSource, "forward_began", lambda self: calls.append("began"))
    monkeypatch.setattr(hub.HubSource, "forward_ended", lambda self: calls.append("ended"))
    with served(tiny, tmp_path):
        assert generate(stream(complete_download=False)) == reference_tokens(tiny)
    assert calls == ["began", "ended"] * NEW_TOKENS  # one forward pass per generated token


def test_embedding_rows_of_one_lookup_are_fetched_in_one_request(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(hub.schedule, "READAHEAD_BYTES", 0)  # only what the forward pass reads
    with served(tiny, tmp_path) as server:
        model = stream(complete_download=False)
        (table,) = next(u for u in units_of(model) if u.name == "model.embed_tokens").ranges
        server.clear_log()
        forward_until(model, layer=0)  # reads the embedding rows only
        rows = [(s, e) for name, s, e in fetched(server) if name == table.shard and s < table.offset + table.length]
    row_bytes = table.length // 128
    first, last = table.offset + min(PROMPT) * row_bytes, table.offset + (max(PROMPT) + 1) * row_bytes
    first = max(first, TEST_PROBE_BYTES)  # the rows before were fetched with the header
    assert rows == [(first, last)], "one request covering the looked-up rows, not one per row nor the whole table"


def test_ranges_read_at_once_are_cut_into_no_more_pieces_than_connections() -> None:
    """One piece size for all (their total over the connections) would cut each range up to a piece more: 9 pieces
    for 8 connections here, the last a round trip later."""
    unit = hub.schedule.MIN_DEMAND_PIECE_BYTES
    sizes = [10 * unit, unit, unit // 2]
    pieces = hub.schedule.wave_pieces(sizes, 8)
    assert [-(-size // piece) for size, piece in zip(sizes, pieces, strict=True)] == [6, 1, 1]
    assert hub.schedule.wave_pieces([100 * unit], 12) == [hub.schedule.wave_piece(100 * unit, 12)]


def test_a_lookup_with_more_rows_than_connections_fetches_them_in_one_wave(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    """Rows too far apart to share a request, and more of them than connections, would take a second round trip:
    the closest are merged (within a size limit) so that every request goes out at once."""
    monkeypatch.setattr(hub.schedule, "READAHEAD_BYTES", 0)  # only what is read
    monkeypatch.setattr(hub.source, "ROW_GAP_BYTES", 0)
    monkeypatch.setattr(hub.source, "ROW_WAVE_SPAN_BYTES", 1024 + 128)  # two rows 1 KiB apart, not three
    with served(tiny, tmp_path) as server:
        model = stream(complete_download=False, max_connections=3)
        (table,) = next(u for u in units_of(model) if u.name == "model.embed_tokens").ranges
        rows = [table.offset + k * 1024 for k in range(4, 10)]  # past the header probe's bytes
        assert rows[0] >= TEST_PROBE_BYTES and rows[-1] + 128 <= table.offset + table.length
        server.clear_log()
        reads = [(row, memoryview(bytearray(128))) for row in rows]
        source_of(model).read_many(table.shard, reads, (table.offset, table.offset + table.length))
        got = sorted((s, e) for name, s, e in fetched(server) if name == table.shard)
    assert got == [(rows[i], rows[i + 1] + 128) for i in (0, 2, 4)], "three requests of two rows each"


def test_cached_shards_are_read_in_place(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    shards = list(shard_sizes(tiny))
    with served(tiny, tmp_path) as server:
        with monkeypatch.context() as plain:
            plain.setattr(constants, "HF_HUB_DISABLE_XET", True)  # the local Hub has no Xet CAS: HTTP download
            hf_hub_download(REPO, shards[1])
        server.clear_log()
        model = stream(complete_download=False)
        assert generate(model) == reference_tokens(tiny)
        touched = {Path(r.file).name for r in server.log if r.file and r.file.endswith(".safetensors")}
    assert touched == {shards[0], shards[2]}, "no request for a shard that is already in the cache"
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
        assert {k: v.sha256 for k, v in cached.items()} == {name: sha256_of(tiny / name) for name in shard_sizes(tiny)}
        assert all(v.verified and v.blob.parent.name == "blobs" for v in cached.values())
        assert all(v.blob == repo_cache(tmp_path) / "blobs" / v.sha256 for v in cached.values())
        assert_cache_verified(tmp_path, tiny)
        assert (tmp_path / "CACHEDIR.TAG").is_file()
        assert not scan_cache_dir(tmp_path).warnings
        partial = repo_cache(tmp_path) / ".weightstream" / "partial"
        for name, size in shard_sizes(tiny).items():  # the source is still open: it must hold no range now
            assert not hub.partial.RangeLocks(partial / f"{sha256_of(tiny / name)}.claims").busy(0, size)

        server.clear_log()
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        plain = AutoModelForCausalLM.from_pretrained(REPO)
        assert server.log == [], "an offline plain load must not send a single request"
    local = AutoModelForCausalLM.from_pretrained(tiny)
    for (name, a), (_, b) in zip(plain.state_dict().items(), local.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_committed_blobs_go_to_the_shared_store_and_another_repo_links_them_without_fetching(
    tiny: Path, tmp_path: Path
) -> None:
    sizes = shard_sizes(tiny)
    with HubServer(mode="xet") as server, hf_hub_endpoint(server.url, tmp_path):
        server.add_repo(REPO, tiny)
        server.add_repo("org/copy", tiny)  # another repo with the same files (a fine-tune's base, a mirror...)
        first = wait_until_cached(stream(), timeout=30)
        for name, shard in first.items():
            store = tmp_path / "blobs" / xet_hash_stand_in(shard.sha256)[:2] / xet_hash_stand_in(shard.sha256)
            assert shard.blob.is_symlink() and shard.blob.resolve() == store, "the repo blob links into the store"
            assert store.read_bytes() == (tiny / name).read_bytes()
        server.clear_log()
        copy = stream("org/copy")
        assert generate(copy) == reference_tokens(tiny)
        second = wait_until_cached(copy, timeout=30)
        log = server.log
    # What the resolve answers say (sha256, Xet hash), as huggingface_hub's own HEAD before it links from the store
    assert [r.method for r in log if r.file and r.file.endswith(".safetensors")] == ["HEAD"] * len(sizes)
    assert source_of(copy).streamed_shards == []
    assert {k: v.sha256 for k, v in second.items()} == {k: sha256_of(tiny / k) for k in sizes}
    assert_cache_verified(tmp_path, tiny, "org/copy")
    report = scan_cache_dir(tmp_path)
    assert not report.warnings and {r.repo_id for r in report.repos} == {REPO, "org/copy"}


def test_without_the_shared_store_blobs_stay_in_the_repo(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_SHARED_BLOBS", True)
    with served(tiny, tmp_path):
        cached = wait_until_cached(stream(), timeout=30)
    assert all(not c.blob.is_symlink() and c.blob.is_file() for c in cached.values())
    assert not (tmp_path / "blobs").exists()
    assert_cache_verified(tmp_path, tiny)


def test_without_symlinks_a_shard_another_source_committed_is_read_from_the_snapshot_not_fetched_again(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    """HF_HUB_DISABLE_SYMLINKS (or a file system without symlinks): huggingface_hub moves a new blob into the snapshot
    and leaves no ``blobs/<sha256>``. A source whose partial file another source (or process) committed meanwhile
    follows it there instead of starting the shard over, and leaves no second copy in ``blobs/``."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_SYMLINKS", True)
    with served(tiny, tmp_path) as server:
        first = stream(complete_download=False)  # the headers only
        second = stream()
        assert generate(second) == reference_tokens(tiny)
        wait_until_cached(second, timeout=30)  # commits every shard: moved into the snapshot
        server.clear_log()
        assert generate(first) == reference_tokens(tiny)
        cached = wait_until_cached(first, timeout=30)
        assert fetched(server) == [], "shards in the cache are fetched again"
    storage = repo_cache(tmp_path)
    assert [p.name for p in (storage / "blobs").iterdir() if len(p.name) == 64] == [], "a second copy in blobs/"
    for shard, entry in cached.items():
        assert not entry.path.is_symlink() and entry.path.read_bytes() == (tiny / shard).read_bytes()


def test_force_download_streams_every_byte_again_and_replaces_the_blobs(tiny: Path, tmp_path: Path) -> None:
    with served(tiny, tmp_path) as server:
        wait_until_cached(stream(), timeout=30)
        server.clear_log()
        model = AutoModelForCausalLM.from_pretrained(REPO, device_map="stream", force_download=True)
        assert source_of(model).streamed_shards == list(shard_sizes(tiny)), "cached shards are not used"
        assert generate(model) == reference_tokens(tiny)
        assert all(c.verified for c in wait_until_cached(model, timeout=30).values())
        source_of(model).close()
        assert_each_byte_once(fetched(server), shard_sizes(tiny))
    assert_cache_verified(tmp_path, tiny)


def test_a_second_process_fetches_only_what_is_missing(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(hub.schedule, "READAHEAD_BYTES", 0)  # run 1 fetches exactly what its forward reads
    with served(tiny, tmp_path) as server:
        model = stream(complete_download=False)
        forward_until(model, layer=1)
        source_of(model).close()  # what a process does when it ends: record what it fetched
        first = fetched(server)
        assert 0 < sum(e - s for _, s, e in first) < sum(shard_sizes(tiny).values())

        server.clear_log()
        worker = start_stream_worker(server.url, tmp_path, REPO, PROMPT, new_tokens=NEW_TOKENS)
        result = finish_stream_worker(worker)
        second = fetched(server)
    assert result["tokens"] == reference_tokens(tiny)
    assert_each_byte_once(first + second, shard_sizes(tiny))
    assert_cache_verified(tmp_path, tiny)


def test_a_corrupt_partial_file_is_discarded_with_a_warning_and_fetched_again(
    tiny: Path, tmp_path: Path, monkeypatch, caplog
) -> None:
    monkeypatch.setattr(hub.schedule, "READAHEAD_BYTES", 0)
    with served(tiny, tmp_path) as server:
        model = stream(complete_download=False)
        layer = next(u for u in units_of(model) if u.name == "model.layers.0")
        forward_until(model, layer=1)  # fetches the embedding rows and layer 0
        source_of(model).close()
        rng = max(layer.ranges, key=lambda r: r.length)
        part = repo_cache(tmp_path) / ".weightstream" / "partial" / f"{sha256_of(tiny / rng.shard)}.part"
        with part.open("r+b") as f:  # a bit flips on disk inside a recorded range
            f.seek(rng.offset + 10)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        server.clear_log()

        with caplog.at_level(logging.WARNING, logger="hf_weightstream"):
            cached = wait_until_cached(stream(), timeout=30)
        refetched = sum(e - s for name, s, e in fetched(server) if name == rng.shard)
    assert "sha256" in caplog.text and "fetching the file again" in caplog.text
    assert refetched >= shard_sizes(tiny)[rng.shard], "the whole file is fetched again after a mismatch"
    assert all(v.verified for v in cached.values())
    assert_cache_verified(tmp_path, tiny)


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
    assert "bytes fetched so far" in message  # the header probes are in the partial files


@pytest.mark.parametrize(
    "repo, kwargs, hub_error",
    [
        ("org/missing", {}, RepositoryNotFoundError),
        (REPO, {"revision": "nope"}, RevisionNotFoundError),
        ("org/gated", {}, GatedRepoError),
    ],
)
def test_hub_errors_are_the_ones_a_plain_load_raises(tiny: Path, tmp_path: Path, repo, kwargs, hub_error) -> None:
    with HubServer(mode="xet") as server, hf_hub_endpoint(server.url, tmp_path):
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
    package = Path(hub.__file__).parent
    ours = {str(p) for p in package.glob("*.py")} | {str(package.parent / "checkpoint.py")}
    assert not ours & set(frames), "the error comes from the Hub client, not from our internals"


def test_gated_repo_with_token_streams_from_the_bridge_without_the_token(tiny: Path, tmp_path: Path) -> None:
    with HubServer(mode="xet") as server, hf_hub_endpoint(server.url, tmp_path):
        server.add_repo(REPO, tiny, gated=True)
        model = stream(complete_download=False, token="hf_test")
        assert generate(model) == reference_tokens(tiny)
        log = server.log
    ranged = [r for r in log if r.range is not None and r.status == 206]
    assert ranged and all(r.origin == "bridge" and not r.authorization for r in ranged)
    assert all(r.authorization for r in log if r.origin == "hub" and r.path.startswith(f"/{REPO}/resolve/"))
    assert not any(r.origin == "bridge" and r.authorization for r in log)


def test_progress_bar_respects_hf_hub_disable_progress_bars(tiny: Path, tmp_path: Path, capsys) -> None:
    disable_progress_bars()
    try:
        with served(tiny, tmp_path):
            generate(stream())
    finally:
        enable_progress_bars()
    assert "Streaming org/tiny" not in capsys.readouterr().err


# -- other processes ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not hub.partial.RangeLocks.enabled, reason="byte-range locks between processes: Linux only")
def test_range_locks_see_exactly_the_ranges_another_holder_has(tmp_path: Path) -> None:
    mine, theirs = hub.partial.RangeLocks(tmp_path / "x.claims"), hub.partial.RangeLocks(tmp_path / "x.claims")
    try:
        assert theirs.acquire(10, 20) and theirs.acquire(30, 40) and theirs.acquire(40, 45)
        assert list(mine.busy(0, 100)) == [(10, 20), (30, 45)]
        assert list(mine.busy(15, 35)) == [(15, 20), (30, 35)] and not mine.busy(20, 30)
        assert not mine.acquire(0, 100) and mine.acquire(20, 30) and mine.acquire(0, 10)
        assert list(theirs.busy(0, 100)) == [(0, 10), (20, 30)]
        theirs.release(30, 45)
        assert list(mine.busy(0, 100)) == [(10, 20)]
        theirs.close()  # as when a process dies: the kernel drops its locks
        assert not mine.busy(0, 100)
    finally:
        mine.close()


def test_a_range_another_process_holds_is_waited_for_then_fetched_if_it_records_nothing(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(hub.stream, "FOREIGN_PATIENCE_S", 0.5)
    monkeypatch.setattr(hub.schedule, "READAHEAD_BYTES", 0)
    with served(tiny, tmp_path) as server:
        model = stream(complete_download=False)
        rng = max(next(u for u in units_of(model) if u.name == "model.layers.0").ranges, key=lambda r: r.length)
        claims = repo_cache(tmp_path) / ".weightstream" / "partial" / f"{sha256_of(tiny / rng.shard)}.claims"
        other = hub.partial.RangeLocks(claims)  # another descriptor: to our source, another process
        assert other.acquire(rng.offset, rng.offset + rng.length)
        assert not other.busy(rng.offset, rng.offset + rng.length), "its own locks never block a process"
        start = time.monotonic()
        forward_until(model, layer=1)
        waited = time.monotonic() - start
        other.close()
        got = [(s, e) for name, s, e in fetched(server) if name == rng.shard and s < rng.offset + rng.length]
    assert waited >= 0.5, "the read waited for the other process first"
    assert any(s <= rng.offset < e for s, e in got), "then fetched the range itself"


def test_the_filler_takes_over_a_range_another_process_holds_and_records_nothing(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    """A process suspended (SIGSTOP) with ranges locked: wait_until_cached used to wait for it forever."""
    monkeypatch.setattr(hub.stream, "FOREIGN_PATIENCE_S", 0.5)
    shard = max(shard_sizes(tiny), key=shard_sizes(tiny).get)
    claims = repo_cache(tmp_path) / ".weightstream" / "partial" / f"{sha256_of(tiny / shard)}.claims"
    claims.parent.mkdir(parents=True)
    other = hub.partial.RangeLocks(claims)  # another descriptor: to our source, another process
    # The whole file, before the load starts anything (a head start of ours would hold part of it), never recorded.
    assert other.acquire(0, shard_sizes(tiny)[shard])
    with served(tiny, tmp_path) as server:
        try:
            model = stream(complete_download=False)  # its header read takes over the header's bytes only
            cached = wait_until_cached(model, timeout=30)
        finally:
            other.close()
        got = sum(e - s for name, s, e in fetched(server) if name == shard)
    assert sha256_of(cached[shard].blob) == sha256_of(tiny / shard)
    assert got >= shard_sizes(tiny)[shard], "every byte fetched by this process, once it stopped waiting"


def test_a_load_refused_after_the_headers_stops_the_download_it_began(big: Path, tmp_path: Path, monkeypatch) -> None:
    """The head start goes out with the headers, before the load knows it will refuse the model (a budget below a
    unit, an architecture it cannot stream): a refused load went on downloading, in a notebook until the kernel
    ended, for a model nobody holds."""
    monkeypatch.setattr(hub.schedule, "HEAD_START_BYTES", 128 << 20)
    total = sum(shard_sizes(big).values())
    with served(big, tmp_path, connection_bandwidth=400_000) as server:
        with pytest.raises(BudgetError, match="smaller than unit"):
            stream(budget=10_000)
        assert server.wait_idle(timeout=10), "every fetch stopped"
        sent = server.bytes_sent(".safetensors")
        time.sleep(0.5)
        assert server.bytes_sent(".safetensors") == sent and sent < total / 2
        assert not [t.name for t in threading.enumerate() if t.name.startswith("hf_weightstream-fetch")]


def _wait_until_sent(server: HubServer, size: int, timeout: float = 30) -> None:
    """Until the server has sent ``size`` bytes of shards (the head start's slow fetches, still running then)."""
    deadline = time.monotonic() + timeout
    while server.bytes_sent(".safetensors") < size and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("connection_bandwidth", [400_000, 100_000])
def test_a_slow_fetch_records_its_bytes_as_it_goes_not_only_every_few_mib(
    big: Path, tmp_path: Path, monkeypatch, connection_bandwidth: int
) -> None:
    """On a slow link a connection takes seconds to reach RECORD_EVERY_BYTES; what it wrote must be recorded
    within about RECORD_EVERY_SECONDS all the same, or a kill -9 loses it (12 connections: up to 24 MiB). Below
    ~0.5 MB/s a connection also took seconds to gather the BODY_CHUNK_BYTES it hands on to be written: 12 of them
    held 3 MiB that nothing could record."""
    monkeypatch.setattr(hub.schedule, "HEAD_START_BYTES", 128 << 20)  # fetches of MiBs right after the load
    storage = repo_cache(tmp_path)
    with served(big, tmp_path, connection_bandwidth=connection_bandwidth) as server:
        model = stream(complete_download=True)
        _wait_until_sent(server, 5_000_000)
        time.sleep(0.2)  # the recorder's period
        sent = server.bytes_sent(".safetensors")
        in_flight = [r.bytes_sent for r in server.log if r.end is None and r.bytes_sent > 0]
        recorded = sum(e - s for spans in recorded_ranges(storage).values() for s, e in spans)
        source_of(model).close()
    assert len(in_flight) >= 4 and max(in_flight) < hub.stream.RECORD_EVERY_BYTES, "slow fetches still running"
    assert recorded >= 0.6 * sent, f"{recorded:,} of {sent:,} bytes received are recorded"


def _another_process(shard_stream: Any) -> hub.partial.PartialFile:
    """The partial file of ``shard_stream`` opened anew: to our source, another process's (locks and records)."""
    partial = shard_stream.partial
    other = hub.partial.PartialFile(partial.folder, partial.etag, partial.size, {})
    other.open(None)
    return other


def test_a_repo_already_in_the_cache_takes_the_read_paths_of_local_files(tiny: Path, tmp_path: Path) -> None:
    """io= was ignored for every model loaded by repo id, also with all its files in the cache: a container whose
    limit is below the model got page-cache mappings instead of the reads io='auto' chooses there."""
    with served(tiny, tmp_path):
        wait_until_cached(stream(), timeout=30)
        model = stream(io="direct", budget="200KB")
        expected = reference_tokens(tiny)
        assert generate(model) == expected
        stats = hf_weightstream.stats(model)
        assert stats["io"] == "direct" and stats["io_reason"] == "io='direct' asked for"
        assert io_path(model._hf_weightstream).startswith("local safetensors files; ")  # not "the Hub"


def test_an_moe_without_complete_download_fetches_the_experts_it_routes_to(tmp_path: Path) -> None:
    """Every expert was in the readahead order: one short forward of a 128-expert model fetched the whole
    checkpoint, where complete_download=False promises only what the model reads (the routed experts)."""
    folder = save_tiny("qwen3_moe128", tmp_path / "moe", max_shard_size="200KB")
    total = sum(shard_sizes(folder).values())
    with served(folder, tmp_path / "cache") as server:
        model = stream(complete_download=False)
        with torch.no_grad():
            model(torch.tensor([[1, 5, 9]]))
        time.sleep(0.5)  # readahead past the forward would still be going
        assert server.wait_idle(timeout=10)
        sent = server.bytes_sent(".safetensors")
        read = hf_weightstream.stats(model)["bytes_read"]
    assert read < total / 3, "the forward reads a part of the experts"
    assert sent < read + total / 10, f"{sent:,} bytes fetched for {read:,} read of {total:,}"


def test_closing_a_source_mid_download_keeps_the_bytes_it_received(big: Path, tmp_path: Path, monkeypatch) -> None:
    """Each connection gathers up to BODY_CHUNK_BYTES before writing them: a close (``del model``) dropped what was
    gathered, up to 3 MiB with 12 connections, which the next run fetched again."""
    monkeypatch.setattr(hub.schedule, "HEAD_START_BYTES", 128 << 20)
    storage = repo_cache(tmp_path)
    with served(big, tmp_path, connection_bandwidth=400_000) as server:
        model = stream(complete_download=True)
        _wait_until_sent(server, 4_000_000)
        source_of(model).close()
        assert server.wait_idle(timeout=10)
        sent = server.bytes_sent(".safetensors")
    recorded = sum(e - s for spans in recorded_ranges(storage).values() for s, e in spans)
    assert recorded >= sent - 12 * 64 * 1024, f"{recorded:,} of {sent:,} bytes sent are kept"


def test_patience_with_another_process_is_measured_by_its_progress_not_ours(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    """Measured by all the bytes of the shard, our own fetches of its other ranges kept renewing the patience with
    a suspended process's ranges: it was waited for as long as this process had anything else of that shard to
    fetch (118 s in a helper's audit instead of 60)."""
    monkeypatch.setattr(hub.stream, "FOREIGN_PATIENCE_S", 0.2)
    with served(tiny, tmp_path):
        model = stream(complete_download=False)
        shard_stream = next(iter(source_of(model)._session.streams.values()))
        other = _another_process(shard_stream)
        end = shard_stream.size
        assert other.claims.acquire(end - 100, end)
        got = shard_stream.claim_missing(end - 100, end, lambda s, e: [(s, e)])
        assert got.foreign and not got.mine and not shard_stream.others_stalled()  # starts counting
        for step in range(3):  # our own fetches land meanwhile
            time.sleep(0.1)
            with shard_stream._lock:
                shard_stream.present.add(end - 200 - 10 * step, end - 190 - 10 * step)
        assert shard_stream.others_stalled(), "our own progress does not renew the patience"
        other.write(end - 400, b"x" * 10, other.generation)  # the other process records something
        other.sync_and_record(hub.ranges.RangeSet([(end - 400, end - 390)]), other.generation)
        shard_stream.refresh()
        assert not shard_stream.others_stalled(), "theirs does"
        other.close()


def test_reads_and_the_filler_share_one_patience_with_another_process(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    """The filler started its own clock when it first met a range a suspended process held, so
    wait_until_cached took up to twice the patience after a read had already waited one (88 s instead of 60 in a
    helper's audit). A holder that lets go of a range without recording it (it died) restarts the clock: the next
    process to hold ranges gets a whole patience."""
    monkeypatch.setattr(hub.stream, "FOREIGN_PATIENCE_S", 0.3)
    with served(tiny, tmp_path):
        model = stream(complete_download=False)
        shard_stream = next(iter(source_of(model)._session.streams.values()))
        first, second = _another_process(shard_stream), _another_process(shard_stream)
        end = shard_stream.size
        assert first.claims.acquire(end - 100, end)
        assert shard_stream.claim_missing(end - 100, end, lambda s, e: [(s, e)]).foreign  # a read waits
        time.sleep(0.4)
        claim = shard_stream.claim_next(end - 100, end, 1 << 20)  # the filler meets the range after one patience
        assert claim is not None and (claim.start, claim.end) == (end - 100, end), "taken over at once"
        shard_stream.release(claim)

        first.close()  # it dies: the kernel drops its locks
        assert second.claims.acquire(end - 300, end - 200)  # a new process starts fetching
        got = shard_stream.claim_missing(end - 100, end, lambda s, e: [(s, e)])
        assert got.mine and not got.foreign and not shard_stream.others_stalled()
        assert shard_stream.claim_next(end - 300, end - 200, 1 << 20) is None, "the new process is waited for"
        time.sleep(0.4)
        assert shard_stream.claim_next(end - 300, end - 200, 1 << 20) is not None, "until it records nothing"
        second.close()


def test_a_record_left_half_written_by_a_killed_run_is_swept(tiny: Path, tmp_path: Path) -> None:
    """A kill -9 while a range record was being written left its temporary file in the cache for good."""
    shard = min(shard_sizes(tiny))
    folder = repo_cache(tmp_path) / ".weightstream" / "partial"
    folder.mkdir(parents=True)
    left = folder / f"{sha256_of(tiny / shard)}.ranges.json.b2c3403b.tmp"
    left.write_text('{"ranges": [[0, ')
    with served(tiny, tmp_path):
        model = stream(complete_download=False)
        assert not left.exists()
        assert generate(model) == reference_tokens(tiny)


@pytest.mark.slow
def test_kill_9_mid_download_then_the_next_run_resumes(big: Path, tmp_path: Path) -> None:
    sizes = shard_sizes(big)
    total = sum(sizes.values())
    storage = repo_cache(tmp_path)
    digests = {name: sha256_of(big / name) for name in sizes}

    def committed() -> set[str]:
        return {name for name, digest in digests.items() if (storage / "blobs" / digest).exists()}

    def saved() -> int:
        recorded = sum(e - s for v in recorded_ranges(storage).values() for s, e in v)
        return recorded + sum(sizes[name] for name in committed())

    with hub_server({REPO: big}, mode="xet", bandwidth=3_000_000) as server:
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
                assert sha256_of(blob) == blob.name

        def part(name: str) -> Path:
            return storage / ".weightstream" / "partial" / f"{digests[name]}.part"

        done = committed()
        recorded = {k: v for k, v in recorded_ranges(storage).items() if k not in done}  # killed mid-commit
        # Killed between the verified move out of the partial file and the repo's link to the shared blob store:
        # the content is complete in the store, and the next run must link it, not fetch it again.
        done |= {name for name in recorded if not part(name).exists()}
        recorded = {k: v for k, v in recorded.items() if k not in done}
        assert len(done) < len(sizes), "the kill must land mid-download"
        for name, spans in recorded.items():  # the record never names a byte that is not on disk
            data = (big / name).read_bytes()
            with part(name).open("rb") as f:
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


@pytest.mark.slow
def test_two_processes_streaming_at_once_share_in_flight_ranges_and_end_with_one_verified_blob(
    big: Path, tmp_path: Path
) -> None:
    expected = AutoModelForCausalLM.from_pretrained(big).generate(torch.tensor([PROMPT]), max_new_tokens=2)
    with hub_server({REPO: big}, mode="xet", bandwidth=4_000_000) as server:
        procs = [start_stream_worker(server.url, tmp_path, REPO, PROMPT, new_tokens=2) for _ in range(2)]
        results = [finish_stream_worker(p) for p in procs]
        both = fetched(server)
    digests = {name: sha256_of(big / name) for name in shard_sizes(big)}
    for result in results:
        assert result["tokens"] == expected[0].tolist()
        assert result["cached"] == digests
    # Each byte crossed the network once: what one process was fetching, the other waited for.
    assert_each_byte_once(both, shard_sizes(big))
    assert_cache_verified(tmp_path, big)
    assert len([b for b in (repo_cache(tmp_path) / "blobs").iterdir() if len(b.name) == 64]) == len(digests)


def test_a_cold_load_asks_for_the_metadata_and_the_generation_config_while_the_index_downloads(
    tiny: Path, tmp_path: Path
) -> None:
    # Every answer waits 0.2 s: a request sent only after another's answer shows as a later start.
    with served(tiny, tmp_path, latency=0.2) as server:
        model = stream(complete_download=False)
        log = sorted(server.log, key=lambda r: r.time)
        assert generate(model) == reference_tokens(tiny)
    index = [r for r in log if r.path.endswith(SAFE_INDEX)]
    listing = [r for r in log if "/tree/" in r.path]
    generation = [r for r in log if r.path.endswith("generation_config.json")]
    headers = [r for r in log if r.file and r.file.endswith(".safetensors")]
    located = [r for r in headers if r.method == "HEAD"]
    assert not listing and not [r for r in log if "/paths-info/" in r.path], "the shards' resolve answers say it all"
    assert max(r.time for r in located) < min(r.end for r in index), "they went out with the index, not after it"
    assert max(r.time for r in generation) < max(r.end for r in headers), "generation config: not after the load"


def test_without_a_generation_config_a_load_makes_no_more_requests_for_it(tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny, folder)
    (folder / "generation_config.json").unlink()
    with served(folder, tmp_path / "cache") as server:
        model = stream(complete_download=False)
        asked = [(r.method, r.status) for r in server.log if r.path.endswith("generation_config.json")]
        assert generate(model) == reference_tokens(folder)
    assert asked == [("HEAD", 404)], "one HEAD, whose answer huggingface_hub records for transformers' own call"


def api_route(record: RequestRecord) -> str:
    """``tree``, ``paths-info``... of an ``/api/models/{repo}/...`` request ("" for the repo's info)."""
    return record.path.removeprefix(f"/api/models/{REPO}").strip("/").split("/")[0]


@pytest.mark.parametrize("status", [403, 500], ids=["refused", "retried"])
def test_a_failed_or_late_folder_listing_falls_back_to_paths_info(tiny: Path, tmp_path: Path, status: int) -> None:
    with served(tiny, tmp_path) as server:
        server.add_fault(Fault(file="*.safetensors", method="HEAD", status=500, times=None))  # the listing is asked
        server.add_fault(Fault(path="*/tree/*", status=status, times=None))  # huggingface_hub retries a 500 for 23 s
        start = time.monotonic()
        model = stream(complete_download=False)
        assert time.monotonic() - start < 10, "the load did not wait for the listing's retries"
        api = [api_route(r) for r in server.log if r.path.startswith("/api/") and r.status == 200]
        assert generate(model) == reference_tokens(tiny)
    assert api[-1] == "paths-info"


def test_shards_the_index_names_outside_the_listed_folder_are_described_by_paths_info(tmp_path: Path) -> None:
    folder = make_tiny_llama(tmp_path / "model")
    index = json.loads((folder / SAFE_INDEX).read_text())
    (folder / "weights").mkdir()
    for name in set(index["weight_map"].values()):
        (folder / name).rename(folder / "weights" / name)
    index["weight_map"] = {key: f"weights/{name}" for key, name in index["weight_map"].items()}
    (folder / SAFE_INDEX).write_text(json.dumps(index))
    with served(folder, tmp_path / "cache") as server:
        model = stream(complete_download=False)
        api = [api_route(r) for r in server.log if r.path.startswith("/api/")]
        assert generate(model) == reference_tokens(folder)
    assert api[-2:] == ["tree", "paths-info"]


@pytest.mark.parametrize("shard_size", ["50KB", "10MB"], ids=["sharded", "single-file"])
def test_the_headers_of_the_files_the_listing_shows_are_fetched_before_the_index_answers(
    tmp_path: Path, shard_size: str
) -> None:
    folder = make_tiny_llama(tmp_path / "model", max_shard_size=shard_size)
    # 0.5 s per answer: a margin for a busy machine between the listing's answer and the probes it starts.
    with served(folder, tmp_path / "cache", latency=0.5) as server:
        model = stream(complete_download=False)
        log = server.log
        assert generate(model) == reference_tokens(folder)
    index = [r for r in log if r.path.endswith(SAFE_INDEX)]  # HEAD + GET, or a HEAD answered 404
    probes = [r for r in log if r.file and r.file.endswith(".safetensors") and r.origin == "hub"]
    assert len(probes) == len(shard_sizes(folder)) == (1 if shard_size == "10MB" else 3)
    assert not [r for r in log if "/paths-info/" in r.path], "described by the listing"
    if shard_size == "50KB":  # (a missing index is one round trip, as long as the listing's)
        assert max(r.time for r in probes) < max(r.end for r in index), "header probes did not wait for the index"


def test_files_the_index_does_not_name_are_not_taken_for_its_shards(tmp_path: Path) -> None:
    folder = make_tiny_llama(tmp_path / "model")
    index = json.loads((folder / SAFE_INDEX).read_text())
    renamed = {name: f"part-{i}.safetensors" for i, name in enumerate(sorted(set(index["weight_map"].values())))}
    for old, new in renamed.items():
        (folder / old).rename(folder / new)
    index["weight_map"] = {key: renamed[name] for key, name in index["weight_map"].items()}
    (folder / SAFE_INDEX).write_text(json.dumps(index))
    shutil.copy(folder / "part-0.safetensors", folder / "model-00001-of-00001.safetensors")  # looks like the shards
    with served(folder, tmp_path / "cache"):
        model = stream(complete_download=False)
        assert generate(model) == reference_tokens(folder)
        assert set(source_of(model).streamed_shards) == set(renamed.values())


def test_a_connection_outlives_a_failure_to_pick_background_work() -> None:
    """Picking background work re-opens a partial file another process discarded, which fails on a full disk: the
    connection must stay (there is one per model connection and none is started again), or the reads that come
    after it are never served."""
    calls = []

    def background(forward_active: bool) -> None:
        calls.append(forward_active)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")

    class Fake:
        def fetch(self, claim: Any, out: Any, should_yield: Any) -> None:
            pass

        def release(self, claim: Any) -> None:
            pass

    scheduler = hub.schedule.FetchScheduler(1, background)
    try:
        scheduler.poke()  # the idle connection asks for background work, which fails
        deadline = time.monotonic() + 10
        while not calls:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        read = hub.schedule.Job(Fake(), hub.stream.Claim(0, 1), awaited=True)  # type: ignore[arg-type]
        scheduler.submit([read])
        assert read.finished.wait(10), "the read was never served: its connection died"
    finally:
        scheduler.stop(timeout=5)


def test_a_full_disk_is_named_with_the_cache_folder_and_the_fix(tmp_path):
    """On a real full disk (a 64 KiB tmpfs; needs root), a write of fetched bytes fails with what to do, not a bare
    OSError, and what the record holds stays on disk."""
    from hf_weightstream.hub.partial import PartialFile
    from hf_weightstream.hub.ranges import RangeSet

    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        partial = PartialFile(small / "partial", "ab" * 32, 1 << 20, {"filename": "model.safetensors"})
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(hub.partial.compat, "check_disk_space", lambda *args: None)  # warns only; we want the write
            partial.open(None)
        partial.write(0, b"x" * 4096, partial.generation)
        partial.sync_and_record(RangeSet([(0, 4096)]), partial.generation)
        with pytest.raises(CheckpointError, match=r"No space left .*model.safetensors .*partial.*HF_HUB_CACHE"):
            partial.write(4096, b"y" * (512 << 10), partial.generation)
        assert json.loads(partial.record_path.read_text())["ranges"] == [[0, 4096]]
        partial.close()
        # A new partial file (another shard, or one another process discarded) needs room for its record too.
        other = PartialFile(small / "partial", "cd" * 32, 1 << 20, {"filename": "model-00002-of-00002.safetensors"})
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(hub.partial.compat, "check_disk_space", lambda *args: None)
            full = r"No space left .*model-00002-of-00002.safetensors .*HF_HUB_CACHE"
            with pytest.raises(CheckpointError, match=full):
                other.open(None)
        other.close()
    finally:
        subprocess.run(["umount", "--lazy", str(small)], check=False)  # even with a descriptor still open
