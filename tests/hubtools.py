"""Test helpers for anything that needs a Hub: a tiny model on disk, a started HubServer, and a way
to point an already-imported huggingface_hub at it.

Why the last one: huggingface_hub reads ``HF_ENDPOINT`` (and ``HF_HUB_CACHE``) once, at import time,
and pytest imports it long before a test starts a server on a free port. What the client reads at
*call* time instead is:

- ``huggingface_hub.constants.ENDPOINT`` and ``HUGGINGFACE_CO_URL_TEMPLATE`` (``hf_hub_url``,
  ``hf_hub_download``, ``snapshot_download`` and every ``HfApi()`` created afterwards),
- ``huggingface_hub.constants.HF_HUB_CACHE`` (default ``cache_dir``),
- ``huggingface_hub.hf_api.api.endpoint``: the module-level functions (``model_info``,
  ``get_safetensors_metadata``, ...) are methods of one ``HfApi`` built at import,
- ``transformers.utils.hub._hf_api``: transformers caches one ``HfApi`` on first use.

:func:`hf_hub_endpoint` patches exactly those and restores them afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from hf_weightstream.testing.hub_server import HubServer, RequestRecord

#: Small enough to build in milliseconds, big enough for several 50 KB shards.
TINY_LLAMA_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}


def make_tiny_llama(folder: Path | str, *, max_shard_size: str | int = "50KB", **config_overrides: Any) -> Path:
    """Write a randomly initialised tiny Llama with ``save_pretrained`` (sharded safetensors + index).

    The weights come from a fixed seed, so the same overrides give the same files and therefore the
    same commit sha from :meth:`HubServer.add_repo`; the global RNG state is left untouched.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY_LLAMA_CONFIG, **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return Path(folder)


@contextlib.contextmanager
def hub_server(repos: Mapping[str, Path | str] | None = None, **server_kwargs: Any) -> Iterator[HubServer]:
    """A started :class:`HubServer` serving ``repos`` (repo id -> folder); stopped on exit.

    ``server_kwargs`` go to ``HubServer`` (``mode=``, ``bandwidth=``, ``latency=``...). Use it directly or from a
    fixture: ``with hub_server({"org/tiny": folder}) as server: yield server``.
    """
    with HubServer(**server_kwargs) as server:
        for repo_id, folder in (repos or {}).items():
            server.add_repo(repo_id, folder)
        yield server


@contextlib.contextmanager
def hf_hub_endpoint(url: str, cache_dir: Path | str | None = None) -> Iterator[None]:
    """Point the already-imported huggingface_hub (and transformers) at ``url`` within this process.

    Also sets ``HF_ENDPOINT`` (and ``HF_HUB_CACHE`` when ``cache_dir`` is given) in ``os.environ`` for
    subprocesses. Everything is restored on exit. Not thread-safe: it patches module globals.
    """
    from huggingface_hub import constants, hf_api

    url = url.rstrip("/")
    patches: list[tuple[Any, str, Any]] = [
        (constants, "ENDPOINT", url),
        (constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"),
        (hf_api.api, "endpoint", url),
    ]
    env = {"HF_ENDPOINT": url}
    if cache_dir is not None:
        patches.append((constants, "HF_HUB_CACHE", str(cache_dir)))
        env["HF_HUB_CACHE"] = str(cache_dir)
    transformers_hub = sys.modules.get("transformers.utils.hub")
    if transformers_hub is not None:
        patches.append((transformers_hub, "_hf_api", None))  # rebuilt lazily, with the new endpoint

    saved_attrs = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    saved_env = {key: os.environ.get(key) for key in env}
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        os.environ.update(env)
        yield
    finally:
        wait_for_metadata_threads()
        for obj, name, value in saved_attrs:
            setattr(obj, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def wait_for_metadata_threads(timeout: float = 30.0) -> None:
    """Let a load's background metadata calls (``hf_ws-meta`` threads: the head start of a load that failed, a
    listing it stopped waiting for) end before the endpoint is restored. Left running, one would retry against the
    real endpoint (no network here) or a stopped server, and huggingface_hub answers a connect error by closing its
    shared client, under the feet of the next test's requests (``Bad file descriptor``)."""
    from hf_weightstream.checkpoint import METADATA_THREAD

    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name == METADATA_THREAD and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


# -- lazy Hub streaming in this process ------------------------------------------------------------------------

REPO = "org/tiny"
PROMPT = [1, 5, 9, 13, 17, 21]
NEW_TOKENS = 4
TEST_PROBE_BYTES = 2048  # holds every header of the tiny test shards, and not much more: their weights stream
_opened: list[Any] = []


def streaming_defaults(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fixture for streaming test modules (``pytest.fixture(autouse=True)(streaming_defaults)``): backoff waits
    of tens of milliseconds, a header probe sized for the tiny shards, no head start (its 128 MiB would be the
    whole of a tiny model: the tests of what a load and a forward pass fetch would see every byte fetched at load;
    tests of the head start set it), and each test's sources closed when it ends (as a process exit would), before
    its server stops."""
    from hf_weightstream import hub

    quick = hub.RetryPolicy(attempts=4, http_retries=5, forbidden_retries=2, base_wait=0.05, max_wait=0.2)
    monkeypatch.setattr(hub.remote, "RETRY", quick)
    monkeypatch.setattr(hub.source, "HEADER_PROBE_BYTES", TEST_PROBE_BYTES)
    monkeypatch.setattr(hub.schedule, "HEAD_START_BYTES", 0)
    yield
    while _opened:
        _opened.pop().close()


@contextlib.contextmanager
def served(folder: Path, cache: Path, repo_id: str = REPO, **server_kwargs: Any) -> Iterator[HubServer]:
    """A Hub serving ``folder`` as ``repo_id`` (xet mode unless ``mode=`` says otherwise), this process pointed at it
    with ``cache`` as its Hub cache."""
    server_kwargs.setdefault("mode", "xet")
    with hub_server({repo_id: folder}, **server_kwargs) as server, hf_hub_endpoint(server.url, cache):
        yield server


def stream(repo: str = REPO, **config: Any) -> Any:
    """``from_pretrained(repo, device_map="stream")``; ``config`` goes to StreamConfig (``token=`` to the load)."""
    from transformers import AutoModelForCausalLM

    from hf_weightstream import StreamConfig

    token = config.pop("token", None)
    model = AutoModelForCausalLM.from_pretrained(
        repo, device_map="stream", stream_config=StreamConfig(**config), token=token
    )
    _opened.append(source_of(model))
    return model


def source_of(model: Any) -> Any:
    return model._hf_weightstream.checkpoint.source


def units_of(model: Any) -> list:
    return model._hf_weightstream.units


def generate(model: Any, new_tokens: int = NEW_TOKENS) -> list[int]:
    import torch

    return model.generate(torch.tensor([PROMPT]), max_new_tokens=new_tokens, do_sample=False)[0].tolist()


def reference_tokens(folder: Path) -> list[int]:
    from transformers import AutoModelForCausalLM

    return generate(AutoModelForCausalLM.from_pretrained(folder))


class StopForward(Exception):
    """Raised from a forward pre-hook to end a forward pass part-way (a process that stops early)."""


def forward_until(model: Any, layer: int) -> None:
    """Run a forward pass that stops before ``layer``: only the units before it are read."""
    import torch

    def stop(*_args: Any) -> None:
        raise StopForward

    handle = model.model.layers[layer].register_forward_pre_hook(stop)
    try:
        with pytest.raises(StopForward), torch.no_grad():
            model(torch.tensor([PROMPT]))
    finally:
        handle.remove()


# -- lazy Hub streaming: what the server sent, and what the cache holds -------------------------------------------


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
    """Bytes sent after the client gave up on an answer (a delay past its timeout, or after a stall) went to a
    closed socket: they are left out."""
    out = []
    for r in log:
        if r.method == "GET" and r.status == 206 and r.file and r.range and not (r.fault or "").startswith("delay"):
            start = int(r.range.removeprefix("bytes=").split("-")[0])
            sent = r.bytes_sent
            if (r.fault or "").startswith("stall="):
                sent = min(sent, int(r.fault.split("@")[1]))
            out.append((Path(r.file).name, start, start + sent))
    return out


def assert_each_byte_once(ranges: list[tuple[str, int, int]], sizes: dict[str, int], complete: bool = True) -> None:
    """No byte delivered twice, and (``complete``) every byte of every shard delivered."""
    by_file: dict[str, list[tuple[int, int]]] = {}
    for name, start, end in ranges:
        if end > start:
            by_file.setdefault(name, []).append((start, end))
    assert set(by_file) <= set(sizes) and (not complete or set(by_file) == set(sizes))
    for name, spans in by_file.items():
        spans.sort()
        position = 0
        for start, end in spans:
            assert start >= position, f"{name}: bytes {start}-{position - 1} delivered twice"
            assert start == position or not complete, f"{name}: bytes {position}-{start - 1} never delivered"
            position = end
        assert position == sizes[name] or not complete, f"{name}: fetched up to {position} of {sizes[name]}"


def repo_cache(cache: Path, repo_id: str = "org/tiny") -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def assert_cache_verified(cache: Path, folder: Path, repo_id: str = "org/tiny") -> None:
    """Every shard is in the repo's blobs/ under its sha256, linked from the snapshot (one hop, as huggingface_hub
    reads it: the blob itself may link on into the shared store); no partial file is left."""
    storage = repo_cache(cache, repo_id)
    commit = (storage / "refs" / "main").read_text()
    for name in shard_sizes(folder):
        data = (folder / name).read_bytes()
        pointer = storage / "snapshots" / commit / name
        assert pointer.is_symlink() and Path(os.readlink(pointer)).name == hashlib.sha256(data).hexdigest()
        assert pointer.read_bytes() == data
    for blob in (storage / "blobs").iterdir():
        if len(blob.name) == 64:
            assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name, f"corrupt blob {blob.name}"
    partial = storage / ".weightstream" / "partial"
    assert not list(partial.glob("*.part")) and not list(partial.glob("*.ranges.json"))


def recorded_ranges(storage: Path) -> dict[str, list[tuple[int, int]]]:
    """What the partial files' records name, per shard (a record is replaced atomically: always whole)."""
    out = {}
    for record in (storage / ".weightstream" / "partial").glob("*.ranges.json"):
        with contextlib.suppress(FileNotFoundError):  # committed meanwhile
            data = json.loads(record.read_text())
            out[Path(data["filename"]).name] = [tuple(r) for r in data["ranges"]]
    return out


# -- lazy Hub streaming: a second process -------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent


def stream_env(url: str, cache_dir: Path | str, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that talks to the local Hub at ``url`` and caches into ``cache_dir``."""
    env = dict(os.environ)
    env.update(
        HF_ENDPOINT=url,
        HF_HUB_CACHE=str(cache_dir),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(Path(__file__).parent)]),
    )
    env.update(extra)
    return env


def start_stream_worker(
    url: str,
    cache_dir: Path | str,
    repo_id: str,
    prompt: list[int],
    *,
    new_tokens: int = 4,
    complete_download: bool = True,
    wait: bool = True,
) -> subprocess.Popen:
    """Start ``python hubtools.py``: stream ``repo_id``, greedy-generate, optionally ``wait_until_cached``.

    It prints one JSON line: ``{"tokens": [...], "cached": {shard: sha256}}``.
    """
    job = {
        "repo_id": repo_id,
        "prompt": prompt,
        "new_tokens": new_tokens,
        "complete_download": complete_download,
        "wait": wait,
    }
    return subprocess.Popen(
        [sys.executable, str(Path(__file__)), json.dumps(job)],
        env=stream_env(url, cache_dir),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish_stream_worker(proc: subprocess.Popen, timeout: float = 120) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker failed ({proc.returncode}):\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


def _stream_worker(job: dict[str, Any]) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from hf_weightstream import StreamConfig, wait_until_cached

    model = AutoModelForCausalLM.from_pretrained(
        job["repo_id"], device_map="stream", stream_config=StreamConfig(complete_download=job["complete_download"])
    )
    tokens = model.generate(torch.tensor([job["prompt"]]), max_new_tokens=job["new_tokens"], do_sample=False)
    cached = wait_until_cached(model, timeout=120) if job["wait"] else {}
    print(json.dumps({"tokens": tokens[0].tolist(), "cached": {k: v.sha256 for k, v in cached.items()}}), flush=True)


if __name__ == "__main__":
    _stream_worker(json.loads(sys.argv[1]))
