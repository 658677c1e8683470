"""FP8 against bf16 under a memory limit: what reading quantized bytes buys, and what dequantizing costs.

* A random dense Qwen3-style decoder in bfloat16 (hidden 2048, 12 layers, MLP 5632, vocab 32000, untied head:
  about 1.35 GB) is written once into ``benchmarks/work/``, and a copy with every linear weight of its blocks in
  fine-grained FP8 (e4m3 weights, one float32 ``weight_scale_inv`` per 128x128 block: the DeepSeek-V3 / Qwen3-FP8
  layout, written by ``hf_weightstream.testing.checkpoints``; embeddings and head stay bf16).
* Each row runs in a fresh process inside a fresh cgroup limited to 1 GB (below the bf16 model; the page cache
  counts), its files dropped from the page cache first (``benchmarks/memlimit.py``). Both models stream at the
  same budget (30% of the bf16 model, defaults otherwise) and hold the same bf16 weights once resident: on a CPU
  an FP8 unit is dequantized right after its read, in the reader thread.
* The I/O floor of each model is its bytes read per token over the cold parallel-read bandwidth of its files,
  measured under the same limit in the same run.
* Dequantization alone: in a fresh process, the FP8 units one token streams are read once into memory, then
  materialized (transformers' ``Fp8Dequantize`` and the cast) again and again; the median sum per token is the
  time dequantizing takes when no read waits on the disk.

Goals: bytes read per token, FP8 <= 0.55x bf16; FP8 ms/token <= 1.15x max(FP8 I/O floor, dequantization alone).

Run from the repository root: ``python -m benchmarks.bench_quantized`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import decoding
from benchmarks.bench_core import WORK, shard_files, snapshot_code
from benchmarks.bench_memory import parallel_read
from benchmarks.decoding import PROMPT_LEN, SEED, fmt, greedy_steps, peak_rss
from benchmarks.memlimit import NO_CGROUP, report


@dataclass(frozen=True)
class DenseSpec:
    name: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    vocab_size: int
    max_shard_size: str


SPEC = DenseSpec("qwen3-1.35g-bf16", 2048, 12, 5632, 32000, "200MB")
QUICK_SPEC = DenseSpec("qwen3-90m-bf16", 512, 6, 1408, 8000, "30MB")
LIMIT, QUICK_LIMIT = 1_000_000_000, 600_000_000
BUDGET_FRACTION = 0.30
TARGETS = {"fp8_bytes_vs_bf16": 0.55, "fp8_vs_bound": 1.15}
ROWS = {
    "floor_bf16": "cold parallel read of the bf16 files",
    "floor_fp8": "cold parallel read of the FP8 files",
    "bf16": "hf_weightstream, bf16 checkpoint, budget 30%",
    "fp8": "hf_weightstream, FP8 checkpoint, budget 30%",
    "dequant": "FP8 dequantization alone (no I/O)",
}


def ensure_models(spec: DenseSpec) -> dict[str, Path]:
    folders = {"bf16": WORK / spec.name, "fp8": WORK / spec.name.replace("bf16", "fp8")}
    marker = json.dumps(asdict(spec))
    if all(
        (f / "bench_spec.json").is_file() and (f / "bench_spec.json").read_text() == marker for f in folders.values()
    ):
        return folders
    import shutil

    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from hf_weightstream.testing.checkpoints import to_fp8

    print(f"Generating {spec.name} and its FP8 copy (once) ...", flush=True)
    config = Qwen3Config(
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.hidden_size // 128,
        num_key_value_heads=max(1, spec.hidden_size // 512),
        head_dim=128,
        vocab_size=spec.vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        dtype="bfloat16",
    )
    torch.manual_seed(SEED)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(folders["bf16"], max_shard_size=spec.max_shard_size)
    shutil.rmtree(folders["fp8"], ignore_errors=True)
    shutil.copytree(folders["bf16"], folders["fp8"])
    to_fp8(folders["fp8"], max_shard_bytes=200_000_000)
    for folder in folders.values():
        (folder / "bench_spec.json").write_text(marker)
    return folders


# --------------------------------------------------------------------------------------------- worker side
def _streamed(folder: str, budget: int) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    import hf_weightstream

    config = hf_weightstream.StreamConfig(budget=budget)
    return AutoModelForCausalLM.from_pretrained(folder, device_map="stream", dtype=torch.bfloat16, stream_config=config)


def dequantize_alone(job: dict[str, Any]) -> dict[str, Any]:
    """Seconds to materialize the FP8 units one token streams, their bytes already in memory."""
    import torch

    model = _streamed(job["folder"], job["budget"])
    engine = model._hf_weightstream
    with torch.inference_mode():
        model(input_ids=torch.zeros(1, PROMPT_LEN, dtype=torch.long))  # learn the schedule and the plan
    streamed = [u for u in dict.fromkeys(engine.schedule) if u.name not in engine.keep_resident and not u.gather]
    raw = {}
    for unit in streamed:
        buffer = torch.empty(unit.raw_bytes, dtype=torch.uint8)
        raw[unit.name] = engine._read(unit, buffer)  # once, outside the timing
    samples = []
    for _ in range(job["repeats"]):
        t0 = time.perf_counter()
        for unit in streamed:
            engine._materialize(unit, raw[unit.name])
        samples.append(time.perf_counter() - t0)
    return {
        "seconds_per_token": statistics.median(samples),
        "units": len(streamed),
        "raw_bytes": sum(u.raw_bytes for u in streamed),
    }


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    kind = job["row"]
    if kind.startswith("floor"):
        return parallel_read(shard_files(Path(job["folder"])))
    if kind == "dequant":
        return dequantize_alone(job)
    import hf_weightstream

    t0 = time.perf_counter()
    model = _streamed(job["folder"], job["budget"])
    result: dict[str, Any] = {"load_s": time.perf_counter() - t0}
    result.update(greedy_steps(model, job["tokens"], job["decode_cap_s"]))
    result["engine"] = hf_weightstream.stats(model)
    result["peak_rss"] = peak_rss()
    return result


# --------------------------------------------------------------------------------------------- parent side
def run_row(row_name: str, job: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    job = dict(job, row=row_name, folder=job["folders"]["bf16" if row_name.endswith("bf16") else "fp8"])
    limit = None if row_name == "dequant" else job["limit"]
    files = shard_files(Path(job["folder"]))
    row = {"row": row_name, **decoding.run_row("benchmarks.bench_quantized", job, limit, files, args)}
    if row["error"]:
        print(f"  {ROWS[row_name]:<50} {row['error']}", flush=True)
    elif row_name.startswith("floor"):
        print(f"  {ROWS[row_name]:<50} {row['bytes_per_s'] / 1e9:.2f} GB/s", flush=True)
    elif row_name == "dequant":
        print(f"  {ROWS[row_name]:<50} {row['seconds_per_token'] * 1e3:.0f} ms/token", flush=True)
    else:
        print(f"  {ROWS[row_name]:<50} {row['median_ms']:.0f} ms/token", flush=True)
    return row


def goals(rows: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, float | None]]:
    bf16, fp8, dequant = rows.get("bf16", {}), rows.get("fp8", {}), rows.get("dequant", {})
    derived: dict[str, float | None] = {}
    for name in ("bf16", "fp8"):
        per_token, bandwidth = (
            rows.get(name, {}).get("bytes_per_token"),
            rows.get(f"floor_{name}", {}).get("bytes_per_s"),
        )
        derived[f"floor_{name}_ms"] = per_token / bandwidth * 1e3 if per_token and bandwidth else None
    derived["dequant_ms"] = dequant.get("seconds_per_token") and dequant["seconds_per_token"] * 1e3
    bound = max((v for v in (derived["floor_fp8_ms"], derived["dequant_ms"]) if v is not None), default=None)
    derived["fp8_bound_ms"] = bound
    byte_ratio = (
        fp8.get("bytes_per_token") / bf16["bytes_per_token"]
        if fp8.get("bytes_per_token") and bf16.get("bytes_per_token")
        else None
    )
    speed = fp8.get("median_ms") / bound if fp8.get("median_ms") and bound else None
    out = [
        {"metric": "FP8 / bf16, bytes read per token", "value": byte_ratio, "target": TARGETS["fp8_bytes_vs_bf16"]},
        {
            "metric": "FP8 ms/token / max(FP8 I/O floor, dequantization alone)",
            "value": speed,
            "target": TARGETS["fp8_vs_bound"],
        },
        {
            "metric": "FP8 / bf16, ms per token",
            "value": fp8.get("median_ms") and bf16.get("median_ms") and fp8["median_ms"] / bf16["median_ms"],
            "target": None,
        },
    ]
    for goal in out:
        goal["met"] = None if goal["value"] is None or goal["target"] is None else goal["value"] <= goal["target"]
    return out, derived


def render(data: dict[str, Any]) -> str:
    s, d = data["settings"], data["derived"]
    rows = {r["row"]: r for r in data["rows"]}
    lines = [
        f"# FP8 against bf16 under a memory limit — {s['date']}",
        "",
        f"Command: `{s['command']}`",
        "",
        f"Model: random dense Qwen3-style, hidden {s['model']['hidden_size']}, {s['model']['num_hidden_layers']} "
        f"layers, MLP {s['model']['intermediate_size']}, vocab {s['model']['vocab_size']}: "
        f"{s['bf16_bytes'] / 1e9:.2f} GB in bf16, {s['fp8_bytes'] / 1e9:.2f} GB with FP8 blocks. Limit "
        f"{s['limit'] / 1e9:.2f} GB ({s['method']}); budget {s['budget'] / 1e6:.0f} MB for both; {s['tokens']} greedy "
        f"decode steps after a {PROMPT_LEN}-token prefill, ms/token = median of the steps after the first.",
        "",
        f"Machine: {s['machine']}; torch {s['versions']['torch']}, transformers {s['versions']['transformers']}; "
        f"code {s['code']['git_head']}.",
        "",
        "| row | ms/token | MB read/token | I/O floor ms/token | cold read GB/s | cgroup peak MB | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in ("bf16", "fp8"):
        r = rows.get(name, {})
        notes = [r["error"]] if r.get("error") else []
        if r.get("contended"):
            notes.append("measured while other processes took CPU")
        lines.append(
            f"| {ROWS[name]} | {fmt(r.get('median_ms'), '.0f')} | "
            f"{fmt(r.get('bytes_per_token') and r['bytes_per_token'] / 1e6, '.0f')} | "
            f"{fmt(d.get(f'floor_{name}_ms'), '.0f')} | "
            f"{fmt(rows.get(f'floor_{name}', {}).get('bytes_per_s', 0) / 1e9, '.2f')} | "
            f"{fmt(r.get('cgroup_peak_bytes') and r['cgroup_peak_bytes'] / 1e6, '.0f')} | {'; '.join(notes)} |"
        )
    dq = rows.get("dequant", {})
    lines += [
        "",
        f"Dequantization alone: {fmt(d.get('dequant_ms'), '.0f')} ms for the {dq.get('units', '—')} FP8 units a "
        f"token streams ({fmt(dq.get('raw_bytes') and dq['raw_bytes'] / 1e6, '.0f')} MB read, materialized in bf16).",
        "",
        "| goal | value | target | met |",
        "|---|---:|---:|---|",
    ]
    for goal in data["goals"]:
        met = "—" if goal["met"] is None else "yes" if goal["met"] else "**no**"
        lines.append(f"| {goal['metric']} | {fmt(goal['value'], '.2f')} | {fmt(goal['target'], '.2f')} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~90 MB model and a 600 MB limit: a smoke run")
    parser.add_argument("--tokens", type=int, help="decode steps per row (default 12, --quick 4)")
    decoding.add_row_arguments(parser, decode_cap_s=600, row_timeout_s=1800)
    args = parser.parse_args(argv)
    if args.worker:
        report(run_worker(json.loads(args.worker)))
        return 0
    spec = QUICK_SPEC if args.quick else SPEC
    folders = ensure_models(spec)
    sizes = {name: sum(p.stat().st_size for p in shard_files(folder)) for name, folder in folders.items()}
    code, code_info = snapshot_code()
    job = {
        "folders": {k: str(v) for k, v in folders.items()},
        "budget": int(BUDGET_FRACTION * sizes["bf16"]),
        "limit": QUICK_LIMIT if args.quick else LIMIT,
        "tokens": args.tokens or (4 if args.quick else 12),
        "decode_cap_s": args.decode_cap_s,
        "repeats": 3 if args.quick else 5,
        "code": str(code),
    }
    print(
        f"{spec.name}: bf16 {sizes['bf16'] / 1e9:.2f} GB, FP8 {sizes['fp8'] / 1e9:.2f} GB, limit "
        f"{job['limit'] / 1e9:.2f} GB, budget {job['budget'] / 1e6:.0f} MB"
    )
    rows = [run_row(name, job, args) for name in ("floor_bf16", "floor_fp8", "bf16", "fp8", "dequant")]
    by_name = {r["row"]: r for r in rows}
    data: dict[str, Any] = {
        "settings": {
            **decoding.run_facts(
                "python -m benchmarks.bench_quantized" + "".join(" " + a for a in (argv or sys.argv[1:]))
            ),
            "model": asdict(spec),
            "bf16_bytes": sizes["bf16"],
            "fp8_bytes": sizes["fp8"],
            "limit": job["limit"],
            "method": next((r["method"] for r in rows if r["row"] != "dequant"), NO_CGROUP),
            "budget": job["budget"],
            "tokens": job["tokens"],
            "code": code_info,
        },
        "rows": rows,
    }
    data["goals"], data["derived"] = goals(by_name)
    stem = args.out or f"quantized_{'quick_' if args.quick else ''}{data['settings']['date']}"
    decoding.write_results(stem, data, render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
