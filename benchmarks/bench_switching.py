"""Model switching benchmark: three models, one memory budget, a fixed random sequence of requests.

Contenders, each in a fresh subprocess so peak RSS is its own:
  (a) all three fully loaded (they fit on this machine), (b) a normal ``from_pretrained`` of the requested model
  at every switch (the previous one dropped), (c) all three streamed on one ``WeightPool`` holding about half of
  their total. A "baseline" subprocess imports everything and builds the inputs but loads no weights.
Reports total time, peak RSS and whether every request's tokens equal (a)'s.

    python -m benchmarks.bench_switching            # ~300 MB models, 30 requests of 8 new tokens
    python -m benchmarks.bench_switching --quick    # small models, for a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(__file__).parent / "work" / "switching"
RESULTS = Path(__file__).parent / "results"


def build_models(hidden: int, layers: int, vocab: int) -> list[Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folders = []
    for seed in range(3):
        folder = WORK / f"llama-{hidden}-{layers}-{vocab}-seed{seed}"
        if not (folder / "config.json").exists():
            torch.manual_seed(seed)
            config = LlamaConfig(
                hidden_size=hidden,
                intermediate_size=int(hidden * 2.75),
                num_hidden_layers=layers,
                num_attention_heads=16,
                num_key_value_heads=8,
                vocab_size=vocab,
            )
            LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="200MB")
        folders.append(folder)
    return folders


def model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def peak_rss() -> int:
    """VmHWM of this process. (ru_maxrss is not used: Linux carries the parent's peak over fork and exec.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(job: dict) -> dict:
    """Runs one contender in this (fresh) process and returns its figures."""
    import torch
    from transformers import AutoModelForCausalLM

    import hf_weightstream

    torch.manual_seed(0)
    folders = [Path(f) for f in job["folders"]]
    prompt = torch.randint(3, 1000, (1, 16))
    requests = job["requests"]
    tokens: list[list[int]] = []
    start = time.perf_counter()
    if job["contender"] == "baseline":
        pass
    elif job["contender"] == "all_loaded":
        models = [AutoModelForCausalLM.from_pretrained(f) for f in folders]
        for i in requests:
            tokens.append(models[i].generate(prompt, max_new_tokens=job["new_tokens"], do_sample=False)[0].tolist())
    elif job["contender"] == "reload":
        current, model = None, None
        for i in requests:
            if i != current:
                del model
                gc.collect()
                model, current = AutoModelForCausalLM.from_pretrained(folders[i]), i
            tokens.append(model.generate(prompt, max_new_tokens=job["new_tokens"], do_sample=False)[0].tolist())
    else:
        pool = hf_weightstream.WeightPool(job["budget"])
        config = hf_weightstream.StreamConfig(pool=pool)
        models = [AutoModelForCausalLM.from_pretrained(f, device_map="stream", stream_config=config) for f in folders]
        for i in requests:
            tokens.append(models[i].generate(prompt, max_new_tokens=job["new_tokens"], do_sample=False)[0].tolist())
        stats = pool.stats()
    seconds = time.perf_counter() - start
    out = {
        "contender": job["contender"],
        "seconds": seconds,
        "peak_rss_bytes": peak_rss(),
        "tokens": tokens,
    }
    if job["contender"] == "shared_pool":
        out["pool"] = {k: stats[k] for k in ("budget_bytes", "peak_resident_bytes", "hits", "misses", "evictions")}
    return out


def run(job: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_switching", "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=Path(__file__).parent.parent,
    )
    if proc.returncode:
        raise RuntimeError(f"{job['contender']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small models and 10 requests")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    hidden, layers, vocab = (256, 4, 8000) if args.quick else (1024, 5, 16000)
    count = 10 if args.quick else args.requests
    folders = build_models(hidden, layers, vocab)
    total = sum(model_bytes(f) for f in folders)
    budget = total // 2
    rng = random.Random(1234)
    requests = [rng.randrange(3) for _ in range(count)]
    base = {"folders": [str(f) for f in folders], "requests": requests, "new_tokens": args.new_tokens}
    rows = {
        name: run({**base, "contender": name, "budget": budget})
        for name in ("baseline", "all_loaded", "reload", "shared_pool")
    }
    baseline = rows["baseline"]["peak_rss_bytes"]
    reference = rows["all_loaded"]["tokens"]
    switches = sum(1 for a, b in zip(requests, requests[1:], strict=False) if a != b) + 1
    lines = [
        f"# Model switching benchmark, {datetime.date.today()}",
        "",
        f"3 random Llama models of {total / 3 / 1e6:.0f} MB fp32 each (hidden {hidden}, {layers} layers, vocab "
        f"{vocab}); {count} requests routed at random (seed 1234, {switches} loads for (b)), {args.new_tokens} "
        f"new greedy tokens each; shared pool budget {budget / 1e6:.0f} MB (half of {total / 1e6:.0f} MB).",
        f"Runtime baseline (imports, no weights): peak RSS {baseline / 1e6:.0f} MB. "
        f"Command: `python -m benchmarks.bench_switching{' --quick' if args.quick else ''}`.",
        "",
        "| contender | total s | peak RSS MB | RSS - baseline MB | tokens = (a) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, label in (
        ("all_loaded", "(a) all loaded"),
        ("reload", "(b) reload at each switch"),
        ("shared_pool", "(c) one shared pool"),
    ):
        row = rows[name]
        same = row["tokens"] == reference
        lines.append(
            f"| {label} | {row['seconds']:.2f} | {row['peak_rss_bytes'] / 1e6:.0f} | "
            f"{(row['peak_rss_bytes'] - baseline) / 1e6:.0f} | {'yes' if same else 'NO'} |"
        )
    c, b = rows["shared_pool"], rows["reload"]
    lines += [
        "",
        f"- (c) / (b) time: **{c['seconds'] / b['seconds']:.2f}x** (target <= 0.5x)",
        f"- (c) peak RSS - baseline = {(c['peak_rss_bytes'] - baseline) / 1e6:.0f} MB vs budget x 1.15 = "
        f"{budget * 1.15 / 1e6:.0f} MB (target: within)",
        f"- pool: {c['pool']}",
        "",
        "Note: transformers 5 maps safetensors lazily, so with the files in the page cache a reload in (b) costs "
        "little more than its first forward; 0.5x (b) is then below the time of (a), where nothing is ever "
        "reloaded.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"switching{'_quick' if args.quick else ''}_{datetime.date.today()}"
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps({k: {**v, "tokens": None} for k, v in rows.items()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
