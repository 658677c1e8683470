"""Scale: one budget, one memory limit, models from 0.35 to 5.6 GB.

What it answers: does streaming stay what it promises as the model grows past the memory? ``from_pretrained``
reads headers only, so its time should not grow with the model; peak memory is the budget plus the runtime, so
it should not grow either; and ms/token should grow only with the bytes streamed per token (a straight line
through the I/O floor), not with the model size itself.

* Random-weight float32 Llamas (hidden 1024, vocab 32000, intermediate 2816, 200 MB shards) with 2, 9, 24, 54
  and 114 layers: about 0.35, 0.7, 1.4, 2.8 and 5.6 GB, written once into ``benchmarks/work/``.
* Each size runs ``bench_memory``'s worker (streaming with the budget, defaults otherwise) in a fresh process
  in a fresh cgroup with the limit, its files dropped from the page cache first (``benchmarks/memlimit.py``),
  and a cold parallel read of its files measures the bandwidth for its floor.

Run from the repository root: ``python -m benchmarks.bench_scale`` (``--quick`` for two small sizes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.bench_core import ModelSpec, ensure_model, shard_files, snapshot_code, tensor_bytes, wait_for_quiet
from benchmarks.bench_memory import LIMIT
from benchmarks.memlimit import run_limited

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS = (2, 9, 24, 54, 114)
QUICK_LAYERS = (2, 4)
BUDGET = 400_000_000


def spec_for(layers: int) -> ModelSpec:
    return ModelSpec(f"llama-{layers}l", 1024, layers, 32000, 2816, 16, 8, "200MB")


def run_size(layers: int, args: argparse.Namespace, code: Path) -> dict[str, Any]:
    folder = ensure_model(spec_for(layers))
    shards = shard_files(folder)
    job = {
        "folder": str(folder),
        "shards": [str(p) for p in shards],
        "budget": args.budget,
        "limit": args.limit,
        "tokens": args.tokens,
        "decode_cap_s": args.decode_cap_s,
        "code": str(code),
    }
    env = dict(os.environ, TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PYTHONPATH=str(code))
    row: dict[str, Any] = {"layers": layers, "model_bytes": tensor_bytes(shards)}
    for contender in ("floor", "stream_budget"):
        wait_for_quiet(args.quiet_wait_s)
        command = [
            sys.executable,
            "-m",
            "benchmarks.bench_memory",
            "--worker",
            json.dumps(dict(job, contender=contender)),
        ]
        run = run_limited(command, args.limit, shards, cwd=code, env=env, timeout_s=args.row_timeout_s)
        if run.result is None:
            row["error"] = f"{contender}: {run.error()}"
            break
        if contender == "floor":
            row["bandwidth"] = run.result["bytes_per_s"]
            continue
        result = run.result
        measured = result["steps"][1:] or result["steps"]
        engine = result["engine"]
        row.update(
            method=run.method,
            load_s=result["load_s"],
            reload_s=result["reload_s"],
            peak_rss=result["peak_rss"],
            cgroup_peak=run.peak_bytes,
            ms_per_token=statistics.median(s["s"] for s in measured) * 1e3,
            bytes_per_token=statistics.median(s["engine_bytes_read"] for s in measured),
            foreign_cores=statistics.fmean(s["foreign_cores"] for s in measured),
            io=engine["io"],
            depth=engine["depth"],
            predicted_ms=(engine["predicted_seconds_per_token"] or 0) * 1e3,
            measured_overlap=engine["measured_overlap"],
            killed=run.killed,
        )
        row["floor_ms"] = row["bytes_per_token"] / row["bandwidth"] * 1e3
    label = f"{row['model_bytes'] / 1e9:.2f} GB"
    if "error" in row:
        print(f"  {label}: {row['error']}", flush=True)
    else:
        print(
            f"  {label}: load {row['load_s']:.2f} s (again {row['reload_s']:.3f} s), "
            f"peak RSS {row['peak_rss'] / 1e6:.0f} MB, "
            f"{row['ms_per_token']:.0f} ms/token for {row['bytes_per_token'] / 1e6:.0f} MB/token "
            f"(floor {row['floor_ms']:.0f} ms)",
            flush=True,
        )
    return row


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"# Scale at a fixed budget — {s['date']}",
        "",
        f"Command: `{s['command']}`",
        "",
        f"Budget {s['budget'] / 1e6:.0f} MB, limit {s['limit'] / 1e6:.0f} MB ({s['method']}), {s['tokens']} decode "
        "steps after a 32-token prefill (ms/token: median after the first), files dropped from the page cache before "
        f"each row. Code {s['code']['git_head']} (sha256 {s['code']['hf_weightstream_sha256']}).",
        "",
        "| model | layers | from_pretrained s (1st, 2nd call) | peak RSS MB | cgroup peak MB | MB read/token "
        "| ms/token | I/O floor ms "
        "| ms / floor | predicted ms | overlap | io, depth |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['model_bytes'] / 1e9:.2f} GB | {r['layers']} | {r['error']} |||||||||")
            continue
        overlap = "—" if r["measured_overlap"] is None else f"{r['measured_overlap']:.2f}"
        ratio = f"{r['ms_per_token'] / r['floor_ms']:.2f}" if r["floor_ms"] else "— (all resident)"
        lines.append(
            f"| {r['model_bytes'] / 1e9:.2f} GB | {r['layers']} | {r['load_s']:.2f}, {r['reload_s']:.3f} "
            f"| {r['peak_rss'] / 1e6:.0f} "
            f"| {(r['cgroup_peak'] or 0) / 1e6:.0f} | {r['bytes_per_token'] / 1e6:.0f} | {r['ms_per_token']:.0f} "
            f"| {r['floor_ms']:.0f} | {ratio} "
            f"| {r['predicted_ms']:.0f} | {overlap} | {r['io']}, {r['depth']} |"
        )
    fit = report.get("fit")
    if fit:
        lines += [
            "",
            f"Least-squares line through the rows: ms/token = {fit['intercept_ms']:.0f} ms + "
            f"{fit['ms_per_mb']:.2f} ms per MB streamed (R² {fit['r2']:.3f}).",
        ]
    return "\n".join(lines) + "\n"


def fit_line(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    points = [(r["bytes_per_token"] / 1e6, r["ms_per_token"]) for r in rows if "error" not in r]
    if len(points) < 3:
        return None
    xs, ys = zip(*points, strict=True)
    slope, intercept = statistics.linear_regression(xs, ys)
    mean = statistics.fmean(ys)
    residual = sum((y - (intercept + slope * x)) ** 2 for x, y in points)
    total = sum((y - mean) ** 2 for y in ys) or 1.0
    return {"ms_per_mb": slope, "intercept_ms": intercept, "r2": 1 - residual / total}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "error" not in r]
    gb = [r["model_bytes"] / 1e9 for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    streamed = [r["bytes_per_token"] / 1e6 for r in rows]
    ax.plot(streamed, [r["ms_per_token"] for r in rows], "o-", label="streaming, measured")
    ax.plot(streamed, [r["floor_ms"] for r in rows], "k--", label="I/O floor (bytes / cold read bandwidth)")
    for x, y, g in zip(streamed, [r["ms_per_token"] for r in rows], gb, strict=True):
        ax.annotate(f"{g:.1f} GB", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xlabel("MB read per token")
    ax.set_ylabel("ms per token")
    ax.set_title("ms/token grows with the bytes streamed")
    ax.legend(fontsize=8)
    axes[1].plot(gb, [r["load_s"] for r in rows], "o-", label="1st call (one-time imports)")
    axes[1].plot(gb, [r["reload_s"] for r in rows], "s--", label="2nd call (the loader itself)")
    axes[1].set_ylim(bottom=0)
    axes[1].legend(fontsize=8)
    axes[1].set_xlabel("model size (GB)")
    axes[1].set_ylabel("from_pretrained (s)")
    axes[1].set_title("from_pretrained reads headers only")
    axes[2].plot(gb, [r["peak_rss"] / 1e6 for r in rows], "o-", label="peak RSS")
    axes[2].plot(gb, [(r["cgroup_peak"] or 0) / 1e6 for r in rows], "s--", label="cgroup peak (page cache too)")
    axes[2].axhline(report["settings"]["budget"] / 1e6, color="gray", linestyle=":", label="budget")
    axes[2].set_ylim(bottom=0)
    axes[2].set_xlabel("model size (GB)")
    axes[2].set_ylabel("MB")
    axes[2].set_title(f"memory under a {report['settings']['limit'] / 1e6:.0f} MB limit")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small sizes, 3 tokens: a smoke run")
    parser.add_argument("--tokens", type=int, help="decode steps per size (default 8, --quick 3)")
    parser.add_argument("--budget", type=int, default=BUDGET)
    parser.add_argument("--limit", type=int, default=LIMIT)
    parser.add_argument("--decode-cap-s", type=float, default=600)
    parser.add_argument("--row-timeout-s", type=float, default=1800)
    parser.add_argument("--quiet-wait-s", type=float, default=60)
    parser.add_argument("--out", help="results file stem (default scale_<date>)")
    args = parser.parse_args(argv)
    args.tokens = args.tokens or (3 if args.quick else 8)
    code, code_info = snapshot_code()
    rows = [run_size(layers, args, code) for layers in (QUICK_LAYERS if args.quick else LAYERS)]
    method = next((r["method"] for r in rows if "method" in r), "—")
    report: dict[str, Any] = {
        "settings": {
            "date": dt.date.today().isoformat(),
            "command": "python -m benchmarks.bench_scale" + "".join(" " + a for a in (argv or sys.argv[1:])),
            "budget": args.budget,
            "limit": args.limit,
            "method": method,
            "tokens": args.tokens,
            "models": [asdict(spec_for(layers)) for layers in (QUICK_LAYERS if args.quick else LAYERS)],
            "code": code_info,
        },
        "rows": rows,
    }
    report["fit"] = fit_line(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = args.out or f"scale_{'quick_' if args.quick else ''}{report['settings']['date']}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(report, indent=1))
    markdown = render_markdown(report)
    (RESULTS / f"{stem}.md").write_text(markdown)
    plot(report, RESULTS / f"{stem}.png")
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
