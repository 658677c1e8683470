"""The decode loop the memory-limited benchmarks time: a prefill, then one-token greedy steps, each measured.

Shared by ``bench_moe`` and ``bench_quantized`` so that every row of every table is timed the same way. A step
records its wall time, the CPU other processes took meanwhile (the machine is shared: a busy neighbour slows a
2-core run a lot, and such steps are flagged), and what the streaming engine read.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from benchmarks.bench_core import own_cpu_seconds, system_busy_seconds, wait_for_quiet
from benchmarks.memlimit import run_limited

PROMPT_LEN = 32
SEED = 0


def greedy_steps(
    model: Any,
    tokens: int,
    cap_s: float,
    before_step: Callable[[], Any] | None = None,
    after_step: Callable[[Any, dict[str, float]], None] | None = None,
    teacher_forced: bool = False,
) -> dict[str, Any]:
    """Prefill a seeded random prompt, then decode ``tokens`` greedy steps (stopping after ``cap_s``).

    ``before_step()`` runs before each step untimed and its value goes to ``after_step(value, step)``, which adds
    fields to the step's record (what the step read, what it needed...). ``teacher_forced``: each step is fed
    the next token of a seeded random sequence instead of its own argmax (still recorded), since a random model's
    greedy output soon repeats one token, and would route every step of an MoE alike.
    """
    import torch
    from transformers import DynamicCache

    engine = model.__dict__.get("_hf_weightstream")
    generator = torch.Generator().manual_seed(SEED)
    input_ids = torch.randint(0, model.config.vocab_size, (1, PROMPT_LEN), generator=generator)
    forced = torch.randint(0, model.config.vocab_size, (tokens, 1, 1), generator=generator)
    steps: list[dict[str, float]] = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, past_key_values=DynamicCache(config=model.config), use_cache=True)
        prefill_s = time.perf_counter() - t0
        token = out.logits[:, -1, :].argmax(-1, keepdim=True)
        generated = [int(token)]
        started = time.perf_counter()
        for i in range(tokens):
            if time.perf_counter() - started > cap_s:
                break
            if teacher_forced:
                token = forced[i]
            state = before_step() if before_step else None
            read_before = engine.stats()["bytes_read"] if engine is not None else 0
            busy, cpu = system_busy_seconds(), own_cpu_seconds()
            t0 = time.perf_counter()
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            token = out.logits[:, -1, :].argmax(-1, keepdim=True)
            seconds = time.perf_counter() - t0
            step = {
                "s": seconds,
                "foreign_cores": max(0.0, (system_busy_seconds() - busy) - (own_cpu_seconds() - cpu)) / seconds,
                "bytes_read": (engine.stats()["bytes_read"] - read_before) if engine is not None else None,
            }
            if after_step:
                after_step(state, step)
            steps.append(step)
            generated.append(int(token))
    return {"prefill_s": prefill_s, "steps": steps, "tokens": generated}


def summarize(row: dict[str, Any], max_foreign_cores: float) -> None:
    """Median ms/token and bytes read per token over the steps after the first; flag contended rows."""
    steps = row.get("steps") or []
    if row.get("error") or not steps:
        return
    measured = steps[1:] or steps
    row["median_ms"] = statistics.median(s["s"] for s in measured) * 1e3
    if measured[0]["bytes_read"] is not None:  # a streamed row: what the engine read
        row["bytes_per_token"] = statistics.median(s["bytes_read"] for s in measured)
    row["contended"] = 2 * sum(s["foreign_cores"] > max_foreign_cores for s in measured) > len(measured)


def fmt(value: Any, spec: str) -> str:
    """A table cell: the value formatted, or a dash when it was not measured."""
    return "—" if value is None else format(value, spec)


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def add_row_arguments(parser: argparse.ArgumentParser, decode_cap_s: float, row_timeout_s: float) -> None:
    """The options every memory-limited benchmark takes for how its rows run."""
    parser.add_argument("--decode-cap-s", type=float, default=decode_cap_s, help="stop a row's decoding after this")
    parser.add_argument("--row-timeout-s", type=float, default=row_timeout_s)
    parser.add_argument("--quiet-wait-s", type=float, default=60, help="wait up to this long for idle CPUs per row")
    parser.add_argument("--max-foreign-cores", type=float, default=0.3)
    parser.add_argument("--out", help="results file stem (default <benchmark>_<date>)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)


def run_row(
    module: str, job: dict[str, Any], limit: int | None, files: list[Path], args: argparse.Namespace
) -> dict[str, Any]:
    """Run ``python -m module --worker JOB`` in a fresh process under ``limit`` with ``files`` cold; its row.

    The worker's result is merged into the row, with how the run went (the cgroup used, killed, errors, the
    cgroup's peak) and, for decoding rows, the median ms/token and bytes read per token.
    """
    foreign_before = wait_for_quiet(args.quiet_wait_s)
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    env["PYTHONPATH"] = job["code"]
    command = [sys.executable, "-m", module, "--worker", json.dumps(job)]
    run = run_limited(command, limit, files, cwd=job["code"], env=env, timeout_s=args.row_timeout_s)
    row = {
        "method": run.method,
        "killed": run.killed,
        "error": run.error(),
        "cgroup_peak_bytes": run.peak_bytes,
        "limit_hits": run.limit_hits,
        "foreign_cores_before": foreign_before,
        **(run.result or {}),
    }
    summarize(row, args.max_foreign_cores)
    return row


def run_facts(command: str) -> dict[str, Any]:
    """Date, command, machine and library versions, for a results file."""
    return {
        "date": dt.date.today().isoformat(),
        "command": command,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Linux {platform.release()}",
        "versions": {p: version(p) for p in ("torch", "transformers")},
    }


def write_results(stem: str, data: dict[str, Any], markdown: str) -> None:
    """``benchmarks/results/<stem>.json`` and ``.md``; the table is printed too."""
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{stem}.json").write_text(json.dumps(data, indent=1))
    (results / f"{stem}.md").write_text(markdown)
    print(markdown)
