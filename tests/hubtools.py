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
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from hf_weightstream.testing.hub_server import HubServer

#: Small enough to build in milliseconds, big enough for several 50 KB shards.
TINY_LLAMA_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}


def make_tiny_llama(
    folder: Path | str, *, max_shard_size: str | int = "50KB", **config_overrides: Any
) -> Path:
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
        for obj, name, value in saved_attrs:
            setattr(obj, name, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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

    from hf_weightstream import StreamConfig
    from hf_weightstream.hub_stream import wait_until_cached

    model = AutoModelForCausalLM.from_pretrained(
        job["repo_id"], device_map="stream", stream_config=StreamConfig(complete_download=job["complete_download"])
    )
    tokens = model.generate(torch.tensor([job["prompt"]]), max_new_tokens=job["new_tokens"], do_sample=False)
    cached = wait_until_cached(model, timeout=120) if job["wait"] else {}
    print(json.dumps({"tokens": tokens[0].tolist(), "cached": {k: v.sha256 for k, v in cached.items()}}), flush=True)


if __name__ == "__main__":
    _stream_worker(json.loads(sys.argv[1]))
