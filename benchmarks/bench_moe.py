"""Mixture of experts under a memory limit: routed experts read per expert, against whole layers.

What it answers: for an MoE model larger than the memory it runs in, what does reading only the routed experts
(one unit per expert, an expert cache, speculative prefetch) buy over streaming whole layers at the same budget,
and how close does it come to reading only what a token needs?

* A random Qwen3-MoE-style model in bfloat16 (hidden 1024, 8 layers, 64 experts of width 512, 4 routed per
  token, vocab 32000, 200 MB shards: about 1.7 GB) is written once into ``benchmarks/work/``, in two variants:
  its random routers (near-uniform routing: every expert about equally likely) and a skewed copy whose routers
  favour 8 experts of each layer (their router rows scaled by 3, as trained routers favour a few experts).
* Every row runs in a fresh process inside a fresh cgroup limited to 1.2 GB (below the model; the page cache
  counts), after the model's files were dropped from the page cache (``benchmarks/memlimit.py``).
* Rows: transformers' own load; streaming whole layers (``StreamConfig(experts="whole")``) at the budget;
  streaming routed experts (the default) at the same budget, with the random and with the skewed routers.
* Decoding: a 32-token prefill, then ``--tokens`` one-token steps, each timed; ms/token is the median of the
  steps after the first. Each step is fed the next token of a seeded random sequence (its argmax is still
  recorded and compared): a random model's own greedy output soon repeats one token, and would route every
  step alike, which is not what a real text does to a router.
* What a step needed to read: the dense units the plan streams (every token reads them again), plus the
  experts the step's calls routed to that were not resident when the step began (routing recorded by a forward
  pre-hook on each experts module). ``bytes read / needed`` shows what speculation and layout cost on top.
* The budget is 30% of the model (60% in ``--quick``, where a whole layer needs more than 30% while it loads).

Run from the repository root: ``python -m benchmarks.bench_moe`` (``--quick`` for a smoke run).
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
from benchmarks.memlimit import NO_CGROUP, drop_from_page_cache, report


@dataclass(frozen=True)
class MoeSpec:
    name: str
    hidden_size: int
    num_hidden_layers: int
    num_experts: int
    moe_intermediate_size: int
    num_experts_per_tok: int
    vocab_size: int
    max_shard_size: str
    hot_experts: int = 8  # the skewed variant's favoured experts per layer
    hot_scale: float = 3.0


SPEC = MoeSpec("qwen3moe-1.7g", 1024, 8, 64, 512, 4, 32000, "200MB")
QUICK_SPEC = MoeSpec("qwen3moe-110m", 256, 4, 32, 256, 4, 8000, "30MB")
LIMIT, QUICK_LIMIT = 1_200_000_000, 700_000_000
# 30% of the model; a whole layer (a contender) must fit while it loads: its raw and fused experts at once.
BUDGET_FRACTION, QUICK_BUDGET_FRACTION = 0.30, 0.60
CONTENDERS = {
    "transformers": "transformers load (fuses experts in memory)",
    "whole": "hf_weightstream, whole layers (experts='whole')",
    "routed": "hf_weightstream, routed experts (default), random router",
    "routed_skewed": "hf_weightstream, routed experts (default), skewed router",
}
TARGETS = {"bytes_vs_needed": 1.25, "routed_vs_whole": 0.3}


def ensure_models(spec: MoeSpec) -> dict[str, Path]:
    """Write the random model and its skewed-router copy once; later runs measure the very same bytes."""
    folders = {"random": WORK / spec.name, "skewed": WORK / f"{spec.name}-skewed"}
    marker = json.dumps(asdict(spec))
    if all(
        (f / "bench_spec.json").is_file() and (f / "bench_spec.json").read_text() == marker for f in folders.values()
    ):
        return folders
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    print(f"Generating {spec.name} (once) ...", flush=True)
    config = Qwen3MoeConfig(
        hidden_size=spec.hidden_size,
        intermediate_size=2 * spec.hidden_size,
        moe_intermediate_size=spec.moe_intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.hidden_size // 64,
        num_key_value_heads=max(1, spec.hidden_size // 256),
        head_dim=64,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.num_experts_per_tok,
        vocab_size=spec.vocab_size,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        dtype="bfloat16",
    )
    torch.manual_seed(SEED)
    with torch.device("cpu"):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
    model.save_pretrained(folders["random"], max_shard_size=spec.max_shard_size)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight[: spec.hot_experts] *= spec.hot_scale
    model.save_pretrained(folders["skewed"], max_shard_size=spec.max_shard_size)
    for folder in folders.values():
        (folder / "bench_spec.json").write_text(marker)
    return folders


# --------------------------------------------------------------------------------------------- worker side
def _load(job: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    import hf_weightstream

    if job["contender"] == "transformers":
        return AutoModelForCausalLM.from_pretrained(job["folder"])
    experts = "whole" if job["contender"] == "whole" else "routed"
    config = hf_weightstream.StreamConfig(budget=job["budget"], experts=experts)
    return AutoModelForCausalLM.from_pretrained(job["folder"], device_map="stream", stream_config=config)


def _streamed_dense_bytes(engine: Any) -> int:
    """Dense bytes a token must read: every use of a scheduled unit the plan does not keep resident."""
    return sum(u.raw_bytes for u in engine.schedule if u.name not in engine.keep_resident and not u.gather)


def _needed_bytes(engine: Any, resident_before: set[int], routed: dict[str, set[int]]) -> int:
    """What a step had to read: the dense units the plan streams, and the routed experts not resident when the
    step began (an expert a prediction read during the step counts: the router did pick it)."""
    needed = _streamed_dense_bytes(engine)
    for layer in engine.expert_layers:
        for e in routed.get(layer.name, ()):
            unit = layer.units[e]
            if id(unit) not in resident_before:
                needed += unit.raw_bytes
    return needed  # (an untied embedding's looked-up rows, a few KB a token, are left out)


def decode(model: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Greedy steps, each with what it read and what it needed to read (see the module docstring)."""
    engine = model.__dict__.get("_hf_weightstream")
    routed: dict[str, set[int]] = {}
    hooks = []
    if engine is None:
        return greedy_steps(model, job["tokens"], job["decode_cap_s"], teacher_forced=True)
    for layer in engine.expert_layers:

        def record(module: Any, args: tuple, name: str = layer.name, experts: int = layer.num_experts) -> None:
            ids = args[1]
            routed.setdefault(name, set()).update(ids[ids < experts].unique().tolist())

        hooks.append(layer.module.register_forward_pre_hook(record))

    def before_step() -> set[int]:
        routed.clear()
        with engine.pool.cond:
            return {id(u) for u in engine.units if u.state == "resident"}

    def after_step(resident: set[int], step: dict[str, float]) -> None:
        step["needed_bytes"] = _needed_bytes(engine, resident, routed)
        step["routed_experts"] = sum(len(v) for v in routed.values())

    try:
        return greedy_steps(model, job["tokens"], job["decode_cap_s"], before_step, after_step, teacher_forced=True)
    finally:
        for hook in hooks:
            hook.remove()


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    if job["contender"] == "floor":
        return parallel_read(shard_files(Path(job["folder"])))
    import hf_weightstream

    t0 = time.perf_counter()
    model = _load(job)
    result: dict[str, Any] = {"load_s": time.perf_counter() - t0}
    result.update(decode(model, job))
    if "_hf_weightstream" in model.__dict__:
        stats = hf_weightstream.stats(model)
        result["engine"] = {k: v for k, v in stats.items() if k != "experts"}
        result["per_layer"] = stats.get("experts", {})
    result["peak_rss"] = peak_rss()
    return result


# --------------------------------------------------------------------------------------------- parent side
def run_row(contender: str, job: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    job = dict(job, contender=contender)
    if contender == "routed_skewed":
        job["folder"] = job["skewed_folder"]
    files = shard_files(Path(job["folder"]))
    row = {"contender": contender, **decoding.run_row("benchmarks.bench_moe", job, job["limit"], files, args)}
    if row.get("steps") and "needed_bytes" in row["steps"][0]:
        measured = row["steps"][1:] or row["steps"]
        # Means: a decode step reads a few experts or none, so a median says little about what a token costs.
        row["needed_per_token"] = statistics.mean(s["needed_bytes"] for s in measured)
        row["read_per_token"] = statistics.mean(s["bytes_read"] for s in measured)
        row["read_over_needed"] = sum(s["bytes_read"] for s in measured) / max(
            1, sum(s["needed_bytes"] for s in measured)
        )
    label = CONTENDERS.get(contender, "cold parallel read of the files")
    if row["error"]:
        print(f"  {label:<60} {row['error']}", flush=True)
    elif contender == "floor":
        print(f"  {label:<60} {row['bytes_per_s'] / 1e9:.2f} GB/s", flush=True)
    else:
        print(f"  {label:<60} {row['median_ms']:.0f} ms/token", flush=True)
    return row


def _mb(value: float | None, spec: str = ".1f") -> str:
    return fmt(None if value is None else value / 1e6, spec)


def render(report_data: dict[str, Any]) -> str:
    s = report_data["settings"]
    m = s["model"]
    lines = [
        f"# MoE under a memory limit — {s['date']}",
        "",
        f"Command: `{s['command']}`",
        "",
        f"Model: random Qwen3-MoE-style, bf16, {s['model_bytes'] / 1e9:.2f} GB (hidden {m['hidden_size']}, "
        f"{m['num_hidden_layers']} layers, {m['num_experts']} experts of width {m['moe_intermediate_size']}, "
        f"{m['num_experts_per_tok']} routed per token, vocab {m['vocab_size']}); one expert is "
        f"{s['expert_bytes'] / 1e6:.1f} MB, a layer's experts {s['expert_bytes'] * m['num_experts'] / 1e6:.0f} MB. "
        f"Limit {s['limit'] / 1e9:.2f} GB ({s['method']}), budget {s['budget'] / 1e6:.0f} MB "
        f"({s['budget'] / s['model_bytes']:.0%}). {s['tokens']} greedy decode steps after a {PROMPT_LEN}-token "
        "prefill; "
        "ms/token = median of the steps after the first; steps fed a seeded random token sequence. Random router: "
        "near-uniform routing; skewed router: "
        f"{m['hot_experts']} experts per layer favoured (router rows x{m['hot_scale']}).",
        "",
        f"Machine: {s['machine']}; torch {s['versions']['torch']}, transformers {s['versions']['transformers']}; "
        f"code {s['code']['git_head']}. Cold parallel read of the files under the limit: "
        f"{fmt(report_data['floor'].get('bytes_per_s', 0) / 1e9, '.2f')} GB/s.",
        "",
        "| contender | ms/token | load s | MB read/token (mean) | MB needed/token (mean) | read/needed "
        "| expert hit rate | guess accuracy | prefetch recall | prefetch precision | cgroup peak MB "
        "| tokens = whole layers | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    rows = {r["contender"]: r for r in report_data["rows"]}
    reference = rows.get("whole", {}).get("tokens")
    for r in report_data["rows"]:
        engine = r.get("engine") or {}
        notes = [r["error"]] if r.get("error") else []
        if r.get("contended"):
            notes.append("measured while other processes took CPU")
        same = None
        if r.get("tokens") and reference and r["contender"] != "routed_skewed":
            same = r["tokens"] == reference[: len(r["tokens"])]
        lines.append(
            "| "
            + " | ".join(
                [
                    CONTENDERS[r["contender"]],
                    fmt(r.get("median_ms"), ".0f"),
                    fmt(r.get("load_s"), ".2f"),
                    _mb(r.get("read_per_token", r.get("bytes_per_token"))),
                    _mb(r.get("needed_per_token")),
                    fmt(r.get("read_over_needed"), ".2f"),
                    fmt(engine.get("expert_hit_rate"), ".2f"),
                    fmt(engine.get("prediction_accuracy"), ".2f"),
                    fmt(engine.get("prefetch_recall"), ".2f"),
                    fmt(engine.get("prefetch_precision"), ".2f"),
                    _mb(r.get("cgroup_peak_bytes"), ".0f"),
                    "—" if same is None else "yes" if same else "NO",
                    "; ".join(notes),
                ]
            )
            + " |"
        )
    lines += ["", "| goal | value | target | met |", "|---|---:|---:|---|"]
    for goal in report_data["goals"]:
        met = "—" if goal["met"] is None else "yes" if goal["met"] else "**no**"
        lines.append(f"| {goal['metric']} | {fmt(goal['value'], '.2f')} | {goal['target']} | {met} |")
    return "\n".join(lines) + "\n"


def goals(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for name in ("routed", "routed_skewed"):
        value = rows.get(name, {}).get("read_over_needed")
        target = TARGETS["bytes_vs_needed"]
        out.append(
            {
                "metric": f"{name}: bytes read / needed per decode token",
                "value": value,
                "target": target,
                "met": None if value is None else value <= target,
            }
        )
    whole, routed = rows.get("whole", {}).get("median_ms"), rows.get("routed", {}).get("median_ms")
    value = routed / whole if whole and routed else None
    target = TARGETS["routed_vs_whole"]
    out.append(
        {
            "metric": "routed / whole layers, ms per token (random router)",
            "value": value,
            "target": target,
            "met": None if value is None else value <= target,
        }
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~110 MB model and a 700 MB limit: a smoke run")
    parser.add_argument("--tokens", type=int, help="decode steps per row (default 32, --quick 6)")
    parser.add_argument("--only", help=f"comma-separated contenders among {','.join(CONTENDERS)}")
    decoding.add_row_arguments(parser, decode_cap_s=900, row_timeout_s=2400)
    args = parser.parse_args(argv)
    if args.worker:
        report(run_worker(json.loads(args.worker)))
        return 0
    spec = QUICK_SPEC if args.quick else SPEC
    folders = ensure_models(spec)
    files = shard_files(folders["random"])
    model_bytes = sum(p.stat().st_size for p in files)
    expert_bytes = 3 * spec.moe_intermediate_size * spec.hidden_size * 2
    code, code_info = snapshot_code()
    job = {
        "folder": str(folders["random"]),
        "skewed_folder": str(folders["skewed"]),
        "budget": int((QUICK_BUDGET_FRACTION if args.quick else BUDGET_FRACTION) * model_bytes),
        "limit": QUICK_LIMIT if args.quick else LIMIT,
        "tokens": args.tokens or (6 if args.quick else 32),
        "decode_cap_s": args.decode_cap_s,
        "code": str(code),
    }
    print(
        f"{spec.name}: {model_bytes / 1e9:.2f} GB, limit {job['limit'] / 1e9:.2f} GB, "
        f"budget {job['budget'] / 1e6:.0f} MB"
    )
    floor = run_row("floor", job, args)
    wanted = args.only.split(",") if args.only else list(CONTENDERS)
    rows = [run_row(c, job, args) for c in wanted]
    drop_from_page_cache(files)
    data: dict[str, Any] = {
        "settings": {
            **decoding.run_facts("python -m benchmarks.bench_moe" + "".join(" " + a for a in (argv or sys.argv[1:]))),
            "model": asdict(spec),
            "model_bytes": model_bytes,
            "expert_bytes": expert_bytes,
            "limit": job["limit"],
            "method": next((r["method"] for r in rows), NO_CGROUP),
            "budget": job["budget"],
            "tokens": job["tokens"],
            "code": code_info,
        },
        "floor": floor,
        "rows": rows,
    }
    data["goals"] = goals({r["contender"]: r for r in rows})
    stem = args.out or f"moe_{'quick_' if args.quick else ''}{data['settings']['date']}"
    decoding.write_results(stem, data, render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
