"""Streaming against the Hub as it behaves today: signed bridge URLs that expire, 403s on valid ranges, bodies
that stall, servers that fail for a while, mirrors that do not redirect, and bytes that must match the sha256 the
Hub announced. The local Hub server plays each of them (hf_weightstream.testing.hub_server); the client is the
real one."""

from __future__ import annotations

import hashlib
import shutil
import time
import warnings
from pathlib import Path

import pytest
from hubtools import (
    assert_cache_verified,
    assert_each_byte_once,
    fetched,
    generate,
    make_tiny_llama,
    reference_tokens,
    repo_cache,
    served,
    shard_sizes,
    stream,
    streaming_defaults,
    units_of,
)
from huggingface_hub import constants

from hf_weightstream import CheckpointError, StreamingRuntimeError, hub, wait_until_cached
from hf_weightstream.hub import RangeFetchError
from hf_weightstream.integration import engine_of
from hf_weightstream.testing.hub_repo import xet_hash_stand_in
from hf_weightstream.testing.hub_server import Fault

streaming = pytest.fixture(autouse=True)(streaming_defaults)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def many_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small pieces, so each shard is fetched by several requests at once."""
    monkeypatch.setattr(hub.schedule, "MIN_DEMAND_PIECE_BYTES", 2048)
    monkeypatch.setattr(hub.schedule, "READAHEAD_CHUNK_BYTES", 2048)


def per_file(log, pick) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in log:
        if r.file and r.file.endswith(".safetensors") and pick(r):
            counts[r.file] = counts.get(r.file, 0) + 1
    return counts


# -- signed URLs ------------------------------------------------------------------------------------------------


def test_an_url_past_its_expiry_is_refreshed_before_use_once_per_file(
    tiny: Path, tmp_path: Path, many_requests
) -> None:
    with served(tiny, tmp_path, url_ttl=1.0) as server:
        model = stream(complete_download=False, max_connections=4)
        time.sleep(2.1)  # every bridge URL the header probes got has expired
        server.url_ttl = 3600.0
        server.clear_log()
        assert generate(model) == reference_tokens(tiny)
        log = server.log
    assert not [r for r in log if r.status == 403], "an URL known to have expired is not even tried"
    assert set(per_file(log, lambda r: r.is_resolve).values()) == {1}, "one refresh per file, for all threads"


def test_a_403_from_an_expired_url_refreshes_it_once_for_all_threads(
    tiny: Path, tmp_path: Path, many_requests, monkeypatch
) -> None:
    monkeypatch.setattr(hub.remote, "expires_at", lambda url: None)  # expiry unknown: only a 403 tells
    with served(tiny, tmp_path, url_ttl=1.0, latency=0.05) as server:
        model = stream(complete_download=False, max_connections=4)
        time.sleep(2.1)
        server.url_ttl = 3600.0
        server.clear_log()
        assert generate(model) == reference_tokens(tiny)
        log = server.log
    denied = per_file(log, lambda r: r.status == 403)
    refreshed = per_file(log, lambda r: r.is_resolve)
    assert set(refreshed.values()) == {1} and set(refreshed) == set(denied)
    assert sum(denied.values()) > len(denied), "several threads found an URL expired; one refresh served them all"
    assert_each_byte_once(fetched(server), shard_sizes(tiny), complete=False)


def test_an_occasional_403_on_a_valid_url_is_retried_without_a_refresh(tiny: Path, tmp_path: Path) -> None:
    with served(tiny, tmp_path) as server:
        model = stream(max_connections=2)
        forbidden = server.add_fault(Fault(origin="bridge", ranged_only=True, status=403, every=2, times=None))
        assert generate(model) == reference_tokens(tiny)
        wait_until_cached(model, timeout=30)
        assert forbidden.fired >= 2
        assert server.resolve_calls(".safetensors") == len(shard_sizes(tiny)), "no refresh for a valid URL"
        assert_each_byte_once(fetched(server), shard_sizes(tiny))
    assert_cache_verified(tmp_path, tiny)


def test_a_storage_that_keeps_refusing_valid_ranges_is_reported_clearly(tiny: Path, tmp_path: Path) -> None:
    with served(tiny, tmp_path) as server:
        model = stream(complete_download=False)
        server.add_fault(Fault(origin="bridge", ranged_only=True, status=403, times=None))
        with pytest.raises((StreamingRuntimeError, RangeFetchError)) as caught:
            generate(model)
        resolves = server.resolve_calls(".safetensors")
    error = caught.value if isinstance(caught.value, RangeFetchError) else caught.value.__cause__
    message = str(error)
    assert isinstance(error, RangeFetchError) and "403 Forbidden" in message and "had not expired" in message
    assert ".safetensors of org/tiny@" in message and "try again later" in message
    assert resolves == len(shard_sizes(tiny)), "a refused valid URL is not refreshed over and over"


# -- broken bodies and busy servers -----------------------------------------------------------------------------


def test_stalled_bodies_are_resumed_from_the_last_byte(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.5)  # a stall longer than this is a cut
    with served(tiny, tmp_path) as server:
        model = stream(max_connections=2)
        stall = server.add_fault(Fault(origin="bridge", ranged_only=True, stall=3.0, stall_after=700, times=2))
        assert generate(model) == reference_tokens(tiny)
        wait_until_cached(model, timeout=30)
        assert stall.fired == 2
        assert_each_byte_once(fetched(server), shard_sizes(tiny))
    assert_cache_verified(tmp_path, tiny)


def test_server_faults_are_retried_and_no_byte_is_fetched_twice(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 0.5)  # a delay longer than this is retried
    with served(tiny, tmp_path) as server:
        model = stream(complete_download=False, max_connections=2)
        faults = [
            server.add_fault(Fault(file="*.safetensors", ranged_only=True, **action))
            for action in (
                {"status": 503},
                {"status": 429, "retry_after": 0},
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
        server.add_fault(Fault(file="*.safetensors", ranged_only=True, status=503, times=None))
        with pytest.raises((StreamingRuntimeError, RangeFetchError)) as caught:
            generate(model)
    error = caught.value if isinstance(caught.value, RangeFetchError) else caught.value.__cause__
    assert isinstance(error, RangeFetchError)
    message = str(error)
    assert ".safetensors of org/tiny@" in message and "bytes " in message
    assert "503" in message and "run again to resume" in message


# -- mirrors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content_range", [True, False])
def test_a_mirror_that_does_not_redirect_is_streamed_from_and_every_request_is_a_resolve_call(
    tiny: Path, tmp_path: Path, content_range: bool
) -> None:
    with served(tiny, tmp_path, mode="mirror", content_range=content_range) as server:
        model = stream()
        assert generate(model) == reference_tokens(tiny)
        cached = wait_until_cached(model, timeout=30)
        ranged = [r for r in server.log if r.file and r.file.endswith(".safetensors") and r.range]
        assert_each_byte_once(fetched(server), shard_sizes(tiny))
    assert all(c.verified for c in cached.values())
    # and one HEAD per shard before them, whose answer (X-Linked-Etag, X-Linked-Size) describes it
    assert all(r.is_resolve for r in ranged)
    assert server.resolve_calls(".safetensors") == len(ranged) + len(shard_sizes(tiny))
    assert_cache_verified(tmp_path, tiny)


# -- integrity --------------------------------------------------------------------------------------------------


def test_outputs_computed_from_bytes_that_then_fail_their_sha256_are_reported_at_the_next_call(
    tiny: Path, tmp_path: Path
) -> None:
    """Bytes are checked when their file is complete, after the passes that read them: the pass after a mismatch
    says so (once) instead of the wrong outputs going unnoticed, and later passes read the re-fetched bytes."""
    folder = tmp_path / "repo"
    shutil.copytree(tiny, folder)
    expected = reference_tokens(tiny)
    with served(folder, tmp_path / "cache"):
        model = stream(complete_download=False)
        layer = next(u for u in units_of(model) if u.name == "model.layers.0")
        rng = max(layer.ranges, key=lambda r: r.length)
        good = (folder / rng.shard).read_bytes()
        bad = bytearray(good)
        middle = rng.offset + rng.length // 2
        bad[middle : middle + 64] = b"\x7f" * 64  # weights of layer 0 become huge, under the announced sha256
        (folder / rng.shard).write_bytes(bytes(bad))
        assert generate(model) != expected, "computed with the corrupted weight"
        (folder / rng.shard).write_bytes(good)  # the corruption was transient: the file is fetched again whole
        cached = wait_until_cached(model, timeout=30)
        mismatch = rf"{rng.shard}.* did not match its sha256.*may be wrong"
        with warnings.catch_warnings(record=True) as caught, pytest.raises(CheckpointError, match=mismatch):
            warnings.simplefilter("always")
            generate(model)
        assert not [str(w.message) for w in caught if "always_call" in str(w.message)], "the session ended once"
        assert generate(model) == expected, "said once; the weights were dropped and are read again, checked"
        assert engine_of(model)._depth == 0, "and the passes after it are whole sessions"
    assert cached[rng.shard].verified and not any(u.state == "resident" and u.pins for u in units_of(model))
    assert_cache_verified(tmp_path / "cache", tiny)


def test_bytes_that_do_not_match_the_announced_sha256_never_reach_the_cache(tiny: Path, tmp_path: Path) -> None:
    folder = tmp_path / "repo"
    shutil.copytree(tiny, folder)
    with served(folder, tmp_path / "cache") as server:
        victim = next(iter(shard_sizes(folder)))
        announced = hashlib.sha256((folder / victim).read_bytes()).hexdigest()
        data = bytearray((folder / victim).read_bytes())
        data[-1] ^= 0xFF  # the server now serves other bytes under the sha256 it announced (X-Linked-Etag)
        (folder / victim).write_bytes(bytes(data))
        model = stream()
        with pytest.raises(CheckpointError) as caught:
            wait_until_cached(model, timeout=30)
        sent = server.bytes_sent(victim)
    assert "did not match its sha256 2 times" in str(caught.value) and victim in str(caught.value)
    assert sent >= 2 * len(data), "fetched again after the first mismatch"
    assert not (repo_cache(tmp_path / "cache") / "blobs" / announced).exists()
    store = tmp_path / "cache" / "blobs" / xet_hash_stand_in(announced)[:2] / xet_hash_stand_in(announced)
    assert not store.exists(), "nor the shared store"
