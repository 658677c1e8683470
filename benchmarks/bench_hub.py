"""Cold start from today's Hub: time to first token streamed vs downloaded first, against a latency-modelled Hub.

What it answers: with an empty cache, how soon does the first token come when weights stream in (fetched by range
requests in execution order while earlier blocks compute) compared with downloading everything first; how close
to the link's limit is that; how many calls to the Hub's rate-limited ``/resolve/`` route does a model cost; does
streaming fetch each byte once, hold its memory budget, and lose nothing to a ``kill -9``?

Setup, all local and reproducible:

* The random ~608 MB fp32 Llama of ``bench_core`` (hidden 1024, 10 layers, vocab 32000, 4 shards), written once
  into ``benchmarks/work/``, served by the project's local Hub (``hf_weightstream.testing.hub_server``) in this
  process, playing today's Hub: Xet-style 302s to a signed bridge URL on another host. The link model: every answer
  waits ``--latency`` seconds (time to first byte), each connection is capped at ``--connection-bandwidth`` and all
  together at ``--bandwidth`` (defaults 0.2 s, 20 MB/s, 100 MB/s: a CDN far enough away that one connection gets a
  fifth of the link, so parallel requests are needed, and each request pays a round trip).
* Every contender runs in its own fresh subprocess with its own empty Hub cache, so the download, the peak RSS
  (``VmHWM``) and the server's request log are that contender's alone.
* (a) "download then load": the fairest download we have: hf_weightstream's own downloader fetching every shard
  over ``max_connections`` connections (``wait_until_cached`` with no forward pass), then a plain
  ``from_pretrained`` from the cache, then the first token. Its download time is the reference for the link
  (``last_weight_byte_s``: from the moment the TTFTs count from, the load's start after the config is read, to
  its last weight byte in the server's log), its ``generate`` time with every weight in memory the reference for
  compute. (huggingface_hub itself downloads Xet files with hf_xet, which this local Hub cannot serve: see its
  docstring.)
* (b) stream with ``complete_download=False`` and (b-default) with the background filler, on a batch of
  ``--batch`` prompts of ``--prompt-len`` tokens (8 x 512: compute comparable to the download on a 2-core CPU).
* (c) stream one 32-token prompt (compute small) with the default filler: its first token is compared with the
  download time of the bytes its first forward pass reads (the engine's ``bytes_read``) at the link rate (a)
  measured; the filler must only use the gaps. Its peak RSS is the memory check against the budget (the big
  batch's activations are several times the budget, which bounds weights).
* (d) ``kill -9`` a streaming run when half the model is on disk, then resume it to a complete cache: bytes over
  the network in total against the model size.
* (reference) the local-folder stream alone, and beside a second process that downloads the model from the same
  Hub meanwhile (huggingface_hub's own download, every shard at once): on a small machine the download's CPU
  (receiving, writing, the local Hub's own sending) slows the forward pass that runs beside it, for any streamer.
  The report's floors use both: the forward pass as fast as it runs alone, and as fast as it runs beside a download.
* Resolve calls: (b)'s ``/resolve/`` requests for the weights (the index and the shards; transformers' own
  config files cost two more each, as for any load) and in total.
* This machine is shared and has 2 cores: the contenders run in ``--repeat`` rounds (each once per round, so that
  the machine's drift favours none) and each keeps its run with the shortest TTFT; every run's TTFT is shown.

``--tls``: the bridge over HTTPS, as the real one is (a self-signed certificate the contenders trust through
``SSL_CERT_FILE``): the CPU that encrypting and decrypting take from the forward pass on a small machine.

``--sweep``: the measurements the request sizes and connection count of ``hf_weightstream.hub.schedule`` were
chosen from: throughput of back-to-back range requests of each size over each number of connections, against the
same link model.

Run from the repository root: ``python -m benchmarks.bench_hub`` (``--quick`` for the 127 MB model).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_core import (
    FULL,
    QUICK,
    code_state,
    ensure_model,
    git,
    own_cpu_seconds,
    shard_files,
    tensor_bytes,
    wait_for_quiet,
)

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "work" / "hub"
RESULTS = REPO / "benchmarks" / "results"
REPO_ID = "bench/llama"
RESULT_TAG = "BENCH_HUB_RESULT "
SEED = 0
KILL_AT = 0.5  # (d) is killed once this share of the model is on disk

CONTENDERS = {
    "baseline": "runtime baseline (imports, config, prompt, the model's modules on the meta device; no weights)",
    "a": "(a) download every shard (max_connections), then from_pretrained, then compute",
    "b": "(b) stream, complete_download=False",
    "b_default": "(b-default) stream, complete_download=True",
    "c": "(c) stream, one 32-token prompt (compute small), complete_download=True",
    "local": "(reference) stream from the local folder, same budget",
    "local_dl": "(reference) the same while another process downloads the model from the same Hub",
    "local_small": "(reference) one 32-token prompt from the local folder",
}
SMALL_JOB = {"batch": 1, "prompt_len": 32}
TARGETS = {
    "ttft_c_vs_needed_download": 1.10,
    "ttft_b_vs_max_download_compute": 1.15,
    "ttft_b_vs_a": 0.70,
    "resolve_calls_vs_shards_plus_3": 1.0,
    "network_bytes_b_vs_model": 1.02,
    "kill_resume_bytes_vs_model": 1.10,
    "rss_c_over_baseline_vs_budget": 1.15,
}
SWEEP_SIZES_MIB = (2, 4, 8, 16, 32, 64)
SWEEP_CONNECTIONS = (4, 8, 12, 16)
SWEEP_BYTES_PER_CELL = 320 << 20


# --------------------------------------------------------------------------------------------- worker side
def _status(field: str) -> int:
    """A memory figure of this process image from /proc/self/status, in bytes. ``VmHWM`` is the peak RSS
    (``ru_maxrss`` would carry the parent's high-water mark across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's live threads, by thread name less its number ("hf_weightstream_io_3" ->
    "hf_weightstream_io"): what the link's threads cost beside the compute (threads already ended are not here)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for thread in threading.enumerate():
        try:
            with open(f"/proc/self/task/{thread.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, TypeError):
            continue
        name = re.sub(r"[_-]?\d+(_\d+)?$", "", thread.name) or thread.name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return {name: round(seconds, 2) for name, seconds in sorted(out.items(), key=lambda kv: -kv[1])}


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    if job["contender"] == "sweep":
        return run_sweep_worker(job)
    if job["contender"] == "downloader":
        return run_downloader(job)
    from hf_weightstream.hub import schedule

    for name, value in job.get("schedule", {}).items():  # --schedule: try other request sizes
        setattr(schedule, name, int(value))
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    import hf_weightstream

    torch.manual_seed(SEED)
    config = transformers.AutoConfig.from_pretrained(REPO_ID)
    shape = (job["batch"], job["prompt_len"])
    prompt = torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(SEED))
    mask = torch.ones_like(prompt)
    result: dict[str, Any] = {"contender": job["contender"], "torch_threads": torch.get_num_threads()}
    if job["contender"] == "baseline":  # what every contender holds before a weight: the model code and its modules
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(config)
        result["peak_rss"] = _status("VmHWM")
        return result

    def streamed(where: str, complete: bool) -> Any:
        stream_config = hf_weightstream.StreamConfig(budget=job["budget"], complete_download=complete)
        return AutoModelForCausalLM.from_pretrained(where, device_map="stream", stream_config=stream_config)

    start, cpu_start = time.perf_counter(), own_cpu_seconds()
    # The server logs its requests on the same clock (CLOCK_MONOTONIC is system-wide): its times are taken from here,
    # the moment every TTFT counts from, not from the worker's first request (the config, read before this).
    result["start_monotonic"] = time.monotonic()
    contender = job["contender"]
    if contender == "a":
        hf_weightstream.wait_until_cached(streamed(REPO_ID, True))  # every shard, no forward pass
        result["download_s"] = time.perf_counter() - start
        result["download_cpu_s"] = own_cpu_seconds() - cpu_start
        model = AutoModelForCausalLM.from_pretrained(REPO_ID)
        result["rss_after_load"] = _status("VmRSS")
        result["peak_rss_load"] = _status("VmHWM")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM: from here on it is the peak of the forward pass
    elif contender in ("kill_first", "kill_resume"):
        model = streamed(REPO_ID, True)
    else:
        model = streamed(job["folder"] if contender.startswith("local") else REPO_ID, contender != "b")
    loaded = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=mask, max_new_tokens=1, do_sample=False)
    first = time.perf_counter()
    result.update(
        load_s=loaded - start,
        generate_s=first - loaded,
        ttft_s=first - start,
        first_tokens=out[:, -1].tolist(),
        peak_rss=max(_status("VmHWM"), result.get("peak_rss_load", 0)),
        cpu_s=own_cpu_seconds() - cpu_start,
        thread_cpu_s=_thread_cpu(),
    )
    if contender == "a":
        result["compute_rss"] = _status("VmHWM") - result["rss_after_load"]  # what the forward pass itself holds
        result["load_s"] -= result["download_s"]
    else:
        stats = hf_weightstream.stats(model)
        result["engine"] = {k: stats[k] for k in ("stall_seconds", "bytes_read", "peak_resident_bytes", "hits")}
        # When the first unit began computing, and the bytes of the units read before it: what the link had to bring
        # before any compute could start.
        engine = model._hf_weightstream
        events = list(engine.events)
        computes = [t0 for kind, _, t0, _, _ in events if kind == "compute"]
        result["engine"]["first_compute_s"] = min(computes) - start if computes else None
        if computes:
            sizes = {unit.name: sum(r.length for r in unit.ranges) for unit in engine.units}
            before = {
                name.split(" (")[0] for kind, name, _, end, _ in events if kind == "read" and end <= min(computes)
            }
            result["engine"]["front_bytes"] = sum(sizes.get(name, 0) for name in before)  # "x (rows)": x's rows
            # The bytes the pass needed, each once: a unit the budget evicted and read again comes from the partial
            # file, not the link. Rows reads ("x (rows)") count what they read.
            whole = [name for kind, name, _, _, _ in events if kind == "read" and not name.endswith(" (rows)")]
            rows = stats["bytes_read"] - sum(sizes.get(name, 0) for name in whole)
            result["engine"]["distinct_bytes_read"] = sum(sizes.get(name, 0) for name in set(whole)) + max(0, rows)
    if contender in ("b_default", "kill_first", "kill_resume"):
        print("BENCH_HUB_FIRST_TOKEN", flush=True)
        cached = hf_weightstream.wait_until_cached(model)
        result["cached_s"] = time.perf_counter() - start
        result["verified_shards"] = sum(c.verified for c in cached.values())
    return result


def run_downloader(job: dict[str, Any]) -> dict[str, Any]:
    """Every shard with huggingface_hub's own download, all at once (its plain HTTP path: the local Hub has no Xet
    storage), into a cache of its own: the CPU a download takes, for the "local_dl" reference to compute beside."""
    import concurrent.futures

    from huggingface_hub import hf_hub_download

    start, cpu_start = time.perf_counter(), own_cpu_seconds()
    names = job["shards"]
    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(lambda name: hf_hub_download(REPO_ID, name, cache_dir=job["cache"]), names))
    return {
        "contender": "downloader",
        "download_s": time.perf_counter() - start,
        "cpu_s": own_cpu_seconds() - cpu_start,
    }


def run_sweep_worker(job: dict[str, Any]) -> dict[str, Any]:
    """Back-to-back range requests of one shard over N connections: MB/s for each (request size, N)."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    location = get_hf_file_metadata(hf_hub_url(REPO_ID, job["shard"])).location
    size = job["shard_size"]
    cells = []
    for connections in job["connections"]:
        for mib in job["sizes_mib"]:
            request = mib << 20
            count = max(3 * connections, job["bytes_per_cell"] // request)
            lock = threading.Lock()
            next_index = [0]
            received = [0]
            drained: list[tuple[float, int]] = []  # (time, bytes received) when the first connection ran dry

            def work(client: httpx2.Client, request: int = request, count: int = count, lock=lock, nxt=next_index,
                     got=received, drained=drained) -> None:  # fmt: skip
                while True:
                    with lock:
                        if nxt[0] >= count:
                            if not drained:
                                drained.append((time.perf_counter(), got[0]))
                            return
                        i = nxt[0]
                        nxt[0] += 1
                    start = (i * request) % max(1, size - request)
                    headers = {"Range": f"bytes={start}-{start + request - 1}", "Accept-Encoding": "identity"}
                    with client.stream("GET", location, headers=headers, timeout=60) as response:
                        for piece in response.iter_raw():
                            with lock:
                                got[0] += len(piece)

            with httpx2.Client(limits=httpx2.Limits(max_connections=connections)) as client:
                threads = [threading.Thread(target=work, args=(client,)) for _ in range(connections)]
                began = time.perf_counter()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                elapsed = time.perf_counter() - began
            # Steady state: while every connection had work (the tail, with some connections idle, is left out).
            steady = drained[0][1] / (drained[0][0] - began)
            cells.append({"connections": connections, "request_mib": mib, "mb_per_s": steady / 1e6,
                          "overall_mb_per_s": received[0] / elapsed / 1e6})  # fmt: skip
            print(f"  {connections:2d} connections x {mib:2d} MiB requests: {cells[-1]['mb_per_s']:6.1f} MB/s",
                  file=sys.stderr, flush=True)  # fmt: skip
    return {"contender": "sweep", "cells": cells}


# --------------------------------------------------------------------------------------------- parent side
def _env(server: Any, cache: Path) -> dict[str, str]:
    trust = {"SSL_CERT_FILE": str(server.ca_file)} if server.ca_file is not None else {}
    return dict(
        os.environ,
        **trust,
        HF_ENDPOINT=server.url,
        HF_HUB_CACHE=str(cache),
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TRANSFORMERS_VERBOSITY="error",
        PYTHONPATH=str(REPO),
    )


def _command(job: dict[str, Any]) -> list[str]:
    return [sys.executable, "-m", "benchmarks.bench_hub", "--worker", json.dumps(job)]


def _parse(contender: str, proc_returncode: int, stdout: str, stderr: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_TAG)]
    if not lines:
        tail = " | ".join((stderr or stdout).strip().splitlines()[-6:])
        return {"contender": contender, "error": f"exit {proc_returncode}: {tail}"}
    return json.loads(lines[-1][len(RESULT_TAG) :])


def _network(server: Any, since: float | None = None) -> dict[str, Any]:
    """What the server saw: weight bytes and requests, resolve calls, and when the weights came: the download window
    and, given the worker's ``since`` (its ``start_monotonic``), the first weight request and the last weight byte
    counted from the moment its TTFT counts from."""
    log = server.log
    weights = [r for r in log if r.file and r.file.endswith(".safetensors") and r.method == "GET"]
    out: dict[str, Any] = {
        "network_bytes": sum(r.bytes_sent for r in weights),
        "weight_requests": len([r for r in weights if r.status == 206]),
        "resolve_calls": sum(1 for r in log if r.is_resolve),
        "resolve_calls_weights": sum(
            1 for r in log if r.is_resolve and (r.path.endswith(".safetensors") or r.path.endswith(".index.json"))
        ),
    }
    if weights:
        first_weight = min(r.time for r in weights)
        last_byte = max(r.end or r.time for r in weights)
        out["download_window_s"] = last_byte - first_weight
        if since is not None:
            out["first_weight_request_s"] = first_weight - since  # the round trips of the load before it
            out["last_weight_byte_s"] = last_byte - since
    return out


def run_contender(job: dict[str, Any], server: Any, cache: Path, timeout_s: float) -> dict[str, Any]:
    """One contender in a fresh interpreter with an empty cache; adds what the server saw."""
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    result = run_contender_keep_cache(job, server, cache, timeout_s)
    shutil.rmtree(cache, ignore_errors=True)
    return result


def _on_disk(storage: Path, model_bytes: int) -> int:
    """Bytes of the model in a repo's cache folder: committed blobs plus what partial files' records name (a
    shard caught between the move of its file into ``blobs/`` and the removal of its record counts once)."""
    blobs = {p.name: p for p in (storage / "blobs").glob("*") if len(p.name) == 64}
    held = sum(p.stat().st_size for p in blobs.values() if p.exists())
    for record in (storage / ".weightstream" / "partial").glob("*.ranges.json"):
        if record.name.removesuffix(".ranges.json") in blobs:
            continue
        try:
            held += sum(e - s for s, e in json.loads(record.read_text())["ranges"])
        except (OSError, ValueError, KeyError):
            continue
    return min(held, model_bytes)


def run_kill_resume(job: dict[str, Any], server: Any, cache: Path, model_bytes: int, timeout_s: float) -> dict:
    """(d): stream with the filler, ``kill -9`` once ``KILL_AT`` of the model is on disk, resume to the end."""
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    server.clear_log()
    storage = cache / ("models--" + REPO_ID.replace("/", "--"))
    proc = subprocess.Popen(
        _command({**job, "contender": "kill_first"}),
        cwd=REPO,
        env=_env(server, cache),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout_s
    while _on_disk(storage, model_bytes) < KILL_AT * model_bytes:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            return {"contender": "kill", "error": "the first run ended before it could be killed"}
        time.sleep(0.02)
    killed_at = _on_disk(storage, model_bytes)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    server.wait_idle()
    first = _network(server)
    resumed = run_contender_keep_cache({**job, "contender": "kill_resume"}, server, cache, timeout_s)
    total = first["network_bytes"] + resumed.get("network_bytes", 0)
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "contender": "kill",
        "killed_with_bytes_on_disk": killed_at,
        "first_run_network_bytes": first["network_bytes"],
        "resumed": resumed,
        "network_bytes": total,
    }


def run_contender_keep_cache(job: dict[str, Any], server: Any, cache: Path, timeout_s: float) -> dict[str, Any]:
    """One contender in a fresh interpreter on the cache as it is; adds what the server saw. "local_dl" runs beside
    a second process that downloads the model from the server meanwhile (`run_downloader`)."""
    server.clear_log()
    downloader = None
    if job["contender"] == "local_dl":
        side = cache.parent / f"{cache.name}-downloader"
        shutil.rmtree(side, ignore_errors=True)
        shards = [p.name for p in shard_files(Path(job["folder"]))]
        downloader = subprocess.Popen(
            _command({"contender": "downloader", "shards": shards, "cache": str(side)}),
            cwd=REPO,
            env=dict(_env(server, side), HF_HUB_DISABLE_XET="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    # This process only waits meanwhile: its CPU is the local Hub's, which a real Hub would not take from the
    # machine (a contender's forward pass runs beside it on the same 2 cores).
    server_cpu_start = own_cpu_seconds()
    try:
        proc = subprocess.run(
            _command(job), cwd=REPO, env=_env(server, cache), capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"contender": job["contender"], "error": f"timed out after {timeout_s:.0f} s"}
    finally:
        if downloader is not None:
            out, err = downloader.communicate(timeout=timeout_s)
            shutil.rmtree(side, ignore_errors=True)
    server.wait_idle()
    parsed = _parse(job["contender"], proc.returncode, proc.stdout, proc.stderr)
    parsed["server_cpu_s"] = own_cpu_seconds() - server_cpu_start
    if downloader is not None:
        parsed["downloader"] = _parse("downloader", downloader.returncode, out, err)
    return {**parsed, **_network(server, parsed.get("start_monotonic"))}


def _ratio(name: str, value: float | None, target: float, detail: str) -> dict[str, Any]:
    ok = None if value is None else value <= target
    return {"name": name, "value": value, "target": target, "ok": ok, "detail": detail}


def compute_ratios(
    rows: dict[str, dict[str, Any]], model_bytes: int, shards: int, budget: int, link: dict[str, float]
) -> list[dict[str, Any]]:
    a, b, c, base = (rows.get(k, {}) for k in ("a", "b", "c", "baseline"))
    kill, local_small = rows.get("kill", {}), rows.get("local_small", {})
    out = []
    # From (a)'s request log, on the clock of the TTFTs (from the load's start): the link rate its downloader
    # reached, the round trips before its first weight request (revision, index, listing: what any cold load pays
    # first) and when its last weight byte came (the cold download).
    rate = model_bytes / a["download_window_s"] if "download_window_s" in a else None
    if "ttft_s" in c and rate and "engine" in c and "first_weight_request_s" in a:
        # Runs before distinct_bytes_read counted a unit read twice (evicted, then read again from disk) twice.
        needed = c["engine"].get("distinct_bytes_read", c["engine"]["bytes_read"])
        floor = a["first_weight_request_s"] + needed / rate
        out.append(
            _ratio(
                "(c) TTFT / download time of the bytes its forward reads"
                + ("" if "distinct_bytes_read" in c["engine"] else " (an older run: a unit read twice counts twice)"),
                c["ttft_s"] / floor,
                TARGETS["ttft_c_vs_needed_download"],
                f"{c['ttft_s']:.2f} s vs {a['first_weight_request_s']:.2f} s of round trips before the first weight "
                f"request + {needed / 1e6:.0f} MB at the {rate / 1e6:.1f} MB/s (a) reached = {floor:.2f} s",
            )
        )
    # The defaults' row first (the headline), then the same checks with complete_download=False.
    for key, label in (("b_default", "(b-default, the defaults)"), ("b", "(b, complete_download=False)")):
        streamed = rows.get(key, {})
        if "ttft_s" not in a or "ttft_s" not in streamed or "last_weight_byte_s" not in a:
            continue
        download, compute = a["last_weight_byte_s"], a["generate_s"]
        floor, why = _streaming_floor(a, streamed, rows.get("local", {}), rate)
        shared = _shared_floor(a, streamed, rows.get("local_dl", {}), rate)
        beside = "" if shared is None else f"; with a download's CPU beside the compute (local_dl) {shared:.2f} s"
        out.append(
            _ratio(
                f"{label} TTFT / max(download, compute)",
                streamed["ttft_s"] / max(download, compute),
                TARGETS["ttft_b_vs_max_download_compute"],
                f"{streamed['ttft_s']:.2f} s vs max({download:.2f} s download, {compute:.2f} s compute)"
                + ("" if floor is None else f"; {why}: {floor / max(download, compute):.2f}x")
                + ("" if shared is None else f"{beside}: {shared / max(download, compute):.2f}x"),
            )
        )
        out.append(
            _ratio(
                f"{label} TTFT / (a) download-then-load TTFT",
                streamed["ttft_s"] / a["ttft_s"],
                TARGETS["ttft_b_vs_a"],
                f"{streamed['ttft_s']:.2f} s vs {a['ttft_s']:.2f} s"
                + ("" if floor is None else f"; the floor: {floor / a['ttft_s']:.2f}x")
                + ("" if shared is None else f"{beside}: {shared / a['ttft_s']:.2f}x"),
            )
        )
    if "resolve_calls_weights" in b:
        out.append(
            _ratio(
                "(b) resolve calls for the weights / (shards + 3)",
                b["resolve_calls_weights"] / (shards + 3),
                TARGETS["resolve_calls_vs_shards_plus_3"],
                f"{b['resolve_calls_weights']} for {shards} shards and the index; {b['resolve_calls']} in all "
                "(transformers' config.json and generation_config.json cost 2 each: HEAD + GET)",
            )
        )
    if "network_bytes" in b:
        out.append(
            _ratio(
                "(b) bytes over the network / model size",
                b["network_bytes"] / model_bytes,
                TARGETS["network_bytes_b_vs_model"],
                f"{b['network_bytes']:,} B for a {model_bytes:,} B model ({b['weight_requests']} range requests)",
            )
        )
    if "network_bytes" in kill and "error" not in kill.get("resumed", {}):
        out.append(
            _ratio(
                "(d) bytes over the network, killed run + resumed run / model size",
                kill["network_bytes"] / model_bytes,
                TARGETS["kill_resume_bytes_vs_model"],
                f"killed with {kill['killed_with_bytes_on_disk'] / 1e6:.0f} MB on disk after "
                f"{kill['first_run_network_bytes'] / 1e6:.0f} MB fetched; the resumed run fetched "
                f"{kill['resumed'].get('network_bytes', 0) / 1e6:.0f} MB and verified "
                f"{kill['resumed'].get('verified_shards')} shards",
            )
        )
    if "peak_rss" in c and "peak_rss" in base:
        over = c["peak_rss"] - base["peak_rss"]
        detail = f"{over / 1e6:.0f} MB over a {base['peak_rss'] / 1e6:.0f} MB baseline, budget {budget / 1e6:.0f} MB"
        if "peak_rss" in local_small:
            detail += f"; the same from the local folder: {(local_small['peak_rss'] - base['peak_rss']) / budget:.2f}"
        out.append(_ratio("(c) (peak RSS - baseline) / budget", over / budget, TARGETS["rss_c_over_baseline_vs_budget"],
                          detail))  # fmt: skip
    return out


def _front_s(a: dict[str, Any], b: dict[str, Any], rate: float | None) -> float | None:
    """When (b)'s first block could compute at the earliest: no block computes before the load's first weight
    request, then the bytes (b) read before its first block computed (the embedding table and that block) at the
    link rate (a) reached."""
    front = b.get("engine", {}).get("front_bytes")
    if not front or not rate or "first_weight_request_s" not in a:
        return None
    return a["first_weight_request_s"] + front / rate


def _streamed_compute_s(row: dict[str, Any]) -> float | None:
    """A local-folder row's forward pass: from its first unit computed to its first token."""
    started = row.get("engine", {}).get("first_compute_s")
    return None if started is None else row["ttft_s"] - started


def _streaming_floor(
    a: dict[str, Any], b: dict[str, Any], local: dict[str, Any], rate: float | None
) -> tuple[float | None, str]:
    """A lower bound on (b)'s TTFT for any streamer on this link and machine, from this run's own measurements:
    `_front_s`, then the forward pass, at the faster of (a)'s compute with every weight in memory and the local
    folder's streamed forward pass (no link to share)."""
    front_s = _front_s(a, b, rate)
    if front_s is None:
        return None, ""
    compute = min(c for c in (a["generate_s"], _streamed_compute_s(local)) if c is not None)
    floor = front_s + compute
    return floor, (
        f"floor for any streamer {floor:.2f} s ({a['first_weight_request_s']:.2f} s to the first weight request + "
        f"{b['engine']['front_bytes'] / 1e6:.0f} MB before the first block at {rate / 1e6:.1f} MB/s + {compute:.2f} s "
        "of compute)"
    )


def _shared_floor(a: dict[str, Any], b: dict[str, Any], local_dl: dict[str, Any], rate: float | None) -> float | None:
    """`_streaming_floor` with the forward pass as fast as the local folder streams it while another process
    downloads the model from the same Hub: what the download's own CPU costs a forward pass on this machine, which a
    streamer downloading as it computes pays too."""
    front_s, compute = _front_s(a, b, rate), _streamed_compute_s(local_dl)
    return None if front_s is None or compute is None else front_s + compute


def render_markdown(report: dict[str, Any]) -> str:
    setup = report["setup"]
    link = setup["link"]
    lines = [
        f"# Hub cold start: time to first token ({report['date']})",
        "",
        f"Command: `{setup['command']}`",
        "",
        f"Model: {setup['model']} ({setup['model_bytes'] / 1e6:.0f} MB in {setup['shards']} shards), served by the "
        f"local Hub in xet mode (302 to a signed bridge URL{' over HTTPS' if link.get('tls') else ''}): "
        f"{link['latency'] * 1000:.0f} ms to first byte, "
        f"{link['connection_bandwidth'] / 1e6:.0f} MB/s per connection, {link['bandwidth'] / 1e6:.0f} MB/s in all; "
        f"{setup['batch']} prompts of {setup['prompt_len']} tokens for (a), (b); best of {setup['repeat']} "
        f"interleaved rounds; streaming budget {setup['budget'] / 1e6:.0f} MB. Machine: {setup['machine']}. Code: git "
        f"{setup['git_head']}{' + uncommitted changes' if setup['uncommitted'] else ''}.",
        "",
        "| contender | load s | generate s | TTFT s | peak RSS MB | network MB | range requests | resolve calls "
        "| notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    if "rendered_again" in report:
        again = report["rendered_again"]
        lines[4:4] = [
            f"The checks below were recomputed from this run's rows on {again['date']} by the bench of "
            f"{again['by']} (`python -m benchmarks.bench_hub --render <this run's JSON>`).",
            "",
        ]
    for key, label in CONTENDERS.items():
        r = report["rows"].get(key, {})
        if "error" in r:
            lines.append(f"| {label} | | | | | | | | {r['error']} |")
            continue

        def cell(name: str, scale: float = 1.0, fmt: str = ".2f", row: dict[str, Any] = r) -> str:
            return "" if row.get(name) is None else format(row[name] / scale, fmt)

        notes = []
        if key == "a" and "last_weight_byte_s" in r:
            notes.append(
                f"last weight byte at {r['last_weight_byte_s']:.2f} s (first weight request at "
                f"{r['first_weight_request_s']:.2f} s); the forward pass holds {r['compute_rss'] / 1e6:.0f} MB"
            )
        if "cached_s" in r:
            notes.append(f"all {r['verified_shards']} shards verified in the cache after {r['cached_s']:.2f} s")
        if "engine" in r:
            notes.append(f"stall {r['engine']['stall_seconds']:.2f} s, read {r['engine']['bytes_read'] / 1e6:.0f} MB")
            if r["engine"].get("first_compute_s") is not None:
                notes.append(f"first unit computed from {r['engine']['first_compute_s']:.2f} s")
        if "cpu_s" in r:
            link = {k: v for k, v in r.get("thread_cpu_s", {}).items() if k != "MainThread" and v >= 0.05}
            download = f", {r['download_cpu_s']:.2f} by its download" if "download_cpu_s" in r else ""
            notes.append(
                f"CPU {r['cpu_s']:.2f} s from start to first token{download}"
                + (" (threads: " + ", ".join(f"{k} {v:.2f}" for k, v in link.items()) + ")" if link else "")
            )
        if r.get("network_bytes") and "server_cpu_s" in r:
            notes.append(f"the local Hub's CPU {r['server_cpu_s']:.2f} s")
        if "downloader" in r:
            side = r["downloader"]
            notes.append(
                side["error"]
                if "error" in side
                else f"the other process downloaded the model in {side['download_s']:.2f} s"
                + (f" with {side['cpu_s']:.2f} CPU s" if "cpu_s" in side else "")
            )
        if (
            "first_tokens" in r
            and key in ("b", "b_default", "local", "local_dl")
            and "first_tokens" in report["rows"].get("a", {})
        ):
            same = r["first_tokens"] == report["rows"]["a"]["first_tokens"]
            notes.append("same first tokens as (a)" if same else "FIRST TOKENS DIFFER FROM (a)")
        runs = [t for t in r.get("ttft_runs") or [] if t is not None]
        if len(runs) > 1:
            notes.append("TTFT of the runs " + ", ".join(f"{t:.2f}" for t in runs) + " s")
        resolves = "" if "resolve_calls" not in r else f"{r['resolve_calls_weights']} ({r['resolve_calls']} in all)"
        lines.append(
            f"| {label} | {cell('load_s')} | {cell('generate_s')} | {cell('ttft_s')} | {cell('peak_rss', 1e6, '.0f')} "
            f"| {cell('network_bytes', 1e6, '.1f')} | {cell('weight_requests', 1, '.0f')} | {resolves} | "
            f"{'; '.join(notes)} |"
        )
    lines += ["", "| check | value | target | met | detail |", "| --- | --- | --- | --- | --- |"]
    for ratio in report["ratios"]:
        met = {True: "yes", False: "NO", None: "n/a"}[ratio["ok"]]
        value = "" if ratio["value"] is None else f"{ratio['value']:.2f}"
        lines.append(f"| {ratio['name']} | {value} | ≤ {ratio['target']} | {met} | {ratio['detail']} |")
    lines += ["", "Raw rows: the JSON file next to this one.", ""]
    return "\n".join(lines)


def render_sweep(report: dict[str, Any]) -> str:
    setup, cells = report["setup"], report["cells"]
    link = setup["link"]
    sizes = sorted({c["request_mib"] for c in cells})
    lines = [
        f"# Hub request sizes and connections ({report['date']})",
        "",
        f"Command: `{setup['command']}`",
        "",
        f"Back-to-back range requests of one {setup['model']} shard from the local Hub's bridge: "
        f"{link['latency'] * 1000:.0f} ms to first byte, {link['connection_bandwidth'] / 1e6:.0f} MB/s per "
        f"connection, {link['bandwidth'] / 1e6:.0f} MB/s in all. MB/s received while every connection had work "
        "(share of the link in brackets). "
        f"Machine: {setup['machine']}.",
        "",
        "| connections | " + " | ".join(f"{s} MiB" for s in sizes) + " |",
        "| --- | " + " | ".join("---" for _ in sizes) + " |",
    ]
    for connections in sorted({c["connections"] for c in cells}):
        row = {c["request_mib"]: c["mb_per_s"] for c in cells if c["connections"] == connections}
        values = [f"{row[s]:.0f} ({row[s] * 1e6 / link['bandwidth']:.0%})" for s in sizes]
        lines.append(f"| {connections} | " + " | ".join(values) + " |")
    lines += ["", "Raw cells: the JSON file next to this one.", ""]
    return "\n".join(lines)


def _setup(args: argparse.Namespace, argv: list[str] | None, spec: Any, folder: Path) -> dict[str, Any]:
    return {
        "command": " ".join(["python -m benchmarks.bench_hub", *(sys.argv[1:] if argv is None else argv)]),
        "model": spec.name,
        "model_bytes": sum(p.stat().st_size for p in shard_files(folder)),
        "shards": len(shard_files(folder)),
        "link": {
            "bandwidth": args.bandwidth,
            "connection_bandwidth": args.connection_bandwidth,
            "latency": args.latency,
            "tls": args.tls,
        },
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        **code_state(),
    }


def _render_again(path: Path) -> int:
    """The checks of a saved run recomputed from its rows with this version's ``compute_ratios`` (a check added
    after the run), its report rewritten, saying so."""
    report = json.loads(path.read_text())
    setup = report["setup"]
    link = setup["link"]
    report["ratios"] = compute_ratios(report["rows"], setup["model_bytes"], setup["shards"], setup["budget"], link)
    head = git("rev-parse", "--short", "HEAD")
    report["rendered_again"] = {"by": f"git {head}", "date": dt.date.today().isoformat()}
    path.write_text(json.dumps(report, indent=1))
    markdown = render_markdown(report)
    path.with_suffix(".md").write_text(markdown)
    print(markdown)
    return 0 if all(r["ok"] is not False for r in report["ratios"]) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="the 127 MB model (a smoke run)")
    parser.add_argument("--sweep", action="store_true", help="measure request sizes x connections instead")
    parser.add_argument("--bandwidth", type=float, default=100e6, help="bytes/s of the whole link (100 MB/s)")
    parser.add_argument("--connection-bandwidth", type=float, default=20e6, help="bytes/s per connection (20 MB/s)")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds to first byte of every answer (0.2)")
    parser.add_argument("--tls", action="store_true", help="the bridge over HTTPS, as the real one (needs openssl)")
    parser.add_argument("--prompt-len", type=int, default=512, help="tokens per prompt of (a), (b) (default 512)")
    parser.add_argument("--batch", type=int, default=8, help="prompts in the batch of (a), (b) (default 8)")
    parser.add_argument("--budget-fraction", type=float, default=0.5, help="streaming budget / model size")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of runs; each contender's fastest is kept")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per contender run")
    parser.add_argument(
        "--schedule",
        default="{}",
        help="JSON overrides of hf_weightstream.hub.schedule sizes, e.g. '{\"READAHEAD_CHUNK_BYTES\": 16777216}'",
    )
    parser.add_argument("--only", help="comma-separated contenders to run (default: all)")
    parser.add_argument("--out", help="results file stem, a name in benchmarks/results/ or a path (default hub_<date>)")
    parser.add_argument(
        "--render", metavar="JSON", help="recompute the checks of a saved run's rows and rewrite its report (no run)"
    )
    args = parser.parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return 0
    if args.render:
        return _render_again(Path(args.render))

    from hf_weightstream.testing.hub_server import HubServer

    spec = QUICK if args.quick else FULL
    folder = ensure_model(spec)
    setup = _setup(args, argv, spec, folder)
    model_bytes, shards = setup["model_bytes"], setup["shards"]
    budget = int(args.budget_fraction * tensor_bytes(shard_files(folder)))
    date = dt.date.today().isoformat()
    RESULTS.mkdir(parents=True, exist_ok=True)
    link = {"bandwidth": args.bandwidth, "connection_bandwidth": args.connection_bandwidth, "latency": args.latency}
    with HubServer(mode="xet", tls=args.tls, **link) as server:
        server.add_repo(REPO_ID, folder)
        if args.sweep:
            shard = shard_files(folder)[0]
            job = {"contender": "sweep", "shard": shard.name, "shard_size": shard.stat().st_size,
                   "sizes_mib": SWEEP_SIZES_MIB, "connections": SWEEP_CONNECTIONS,
                   "bytes_per_cell": SWEEP_BYTES_PER_CELL}  # fmt: skip
            wait_for_quiet(60)
            result = run_contender(job, server, WORK / "cache-sweep", args.timeout * 4)
            if "error" in result:
                print(result["error"], file=sys.stderr)
                return 1
            report = {"date": date, "setup": setup, "cells": result["cells"]}
            stem = RESULTS / f"hub_sweep_{date}"
            stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
            stem.with_suffix(".md").write_text(render_sweep(report))
            print(render_sweep(report))
            return 0

        job = {"prompt_len": args.prompt_len, "batch": args.batch, "budget": budget, "folder": str(folder),
               "schedule": json.loads(args.schedule)}  # fmt: skip
        wanted = args.only.split(",") if args.only else None
        chosen = [(c, label) for c, label in [*CONTENDERS.items(), ("kill", "(d) kill -9 at half, then resume")]
                  if wanted is None or c in wanted]  # fmt: skip
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c, _ in chosen}
        # Rounds: every contender once per round, so that the machine's speed, which drifts by tens of percent
        # from one minute to the next here, favours none of the rows a ratio compares.
        for round_ in range(args.repeat):
            for contender, label in chosen:
                if round_ and contender in ("baseline", "kill"):
                    continue
                load = wait_for_quiet(60)
                print(f"{label}, round {round_ + 1} ... (other processes used {load:.2f} cores)", flush=True)
                overrides = SMALL_JOB if contender in ("c", "local_small", "kill") else {}
                if contender == "kill":
                    run = run_kill_resume({**job, **overrides}, server, WORK / "cache-kill", model_bytes, args.timeout)
                else:
                    run = run_contender(
                        {**job, **overrides, "contender": contender}, server, WORK / f"cache-{contender}", args.timeout
                    )
                run["background_cores_before"] = load
                runs[contender].append(run)
                print(f"  {json.dumps(run)}", flush=True)
        rows: dict[str, dict[str, Any]] = {}
        for contender, _ in chosen:
            row = min(runs[contender], key=lambda r: r.get("ttft_s", float("inf")))
            row["ttft_runs"] = [r.get("ttft_s") for r in runs[contender]]
            rows[contender] = row
    setup.update(
        prompt_len=args.prompt_len, batch=args.batch, repeat=args.repeat, budget=budget, schedule=job["schedule"]
    )
    report = {
        "date": date,
        "setup": setup,
        "rows": rows,
        "ratios": compute_ratios(rows, model_bytes, shards, budget, link),
    }
    stem = RESULTS / (args.out or f"hub{'_quick' if args.quick else ''}_{date}")
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(render_markdown(report))
    print(render_markdown(report))
    return 0 if all(r["ok"] is not False for r in report["ratios"]) else 1


if __name__ == "__main__":
    sys.exit(main())
