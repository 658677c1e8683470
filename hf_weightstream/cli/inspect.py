"""``hf-weightstream inspect``: plan a budget without running the model (or, with ``--run N``, by running it).

The model is loaded the streaming way (config and safetensors headers only), so this is instant whatever its
size; what it prints is worked out once into a `Plan` and then shown in sections. The plan is the engine's
planner (`planner.py`) fed with a timed read of the shards and no compute times; ``--run N`` streams N tokens
for real under the budget and shows the engine's own plan, made from measured times, predicted against
measured. To show something new, add a function to one list: `HEADER` for a fact about the whole model (e.g. a
quantization format), `UNIT_NOTES` for a remark on some units (e.g. per-expert units), `UNIT_SIZE` for how a
kind of unit is sized and planned.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import (
    add_model_options,
    format_bytes,
    load_streamed,
    non_negative_int_arg,
    resolve_model,
    size_arg,
    stream_config,
    table,
)

if TYPE_CHECKING:
    from ..engine import StreamEngine
    from ..units import Unit
    from ._read_speed import ReadSample

NAME = "inspect"
ORDER = 30
HELP = "plan a budget without running the model: units, what stays resident, predicted speed"
DESCRIPTION = """\
Load MODEL the streaming way (config and safetensors headers only: no weights are read from a
local folder), list its streaming units in execution order with their sizes and whether each
would stay resident or stream under --budget, then time a read of the shard files to predict
the reading time per token. With --run N it also streams N tokens for real under the budget and
shows the engine's own plan (chosen from measured read and compute times), predicted against
measured time per token and overlap of reads with compute."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="folder, repo id or 'demo'")
    parser.add_argument(
        "--budget", type=size_arg("budget"), metavar="SIZE", required=True, help="bytes of weights held at once"
    )
    parser.add_argument(
        "--run",
        type=non_negative_int_arg,
        metavar="N",
        default=0,
        dest="run_tokens",  # args.run is the subcommand's entry point
        help="also stream N decode steps for real: the engine's plan, predicted against measured",
    )
    add_model_options(parser)


@dataclass
class Plan:
    """What ``inspect`` shows about MODEL under a budget, worked out once."""

    model_id: str
    model: Any
    engine: StreamEngine
    budget: int
    lookahead: int
    order: list[Unit]  # module order, taken for execution order; a unit used twice (tied) appears twice
    kept: set[str] = field(default_factory=set)  # unit names planned resident
    sample: ReadSample | None = None  # a timed read of the shards (None: they stream from the Hub)
    estimate: Any = None  # planner.Plan from the sample, without compute times
    run: dict[str, Any] | None = None  # with --run: the engine's stats and time per token

    @property
    def units(self) -> list[Unit]:
        return self.engine.units

    def uses(self, unit: Unit) -> int:
        return sum(u is unit for u in self.order)

    @property
    def scheduled(self) -> list[Unit]:
        """Units in the schedule: an embedding gathered row by row holds nothing between forwards."""
        return [u for u in self.order if not u.gather]

    @property
    def streamed(self) -> list[Unit]:
        return [u for u in dict.fromkeys(self.scheduled) if u.name not in self.kept]


def execution_order(model: Any, units: list[Unit]) -> list[Unit]:
    """Units in module order, which is the order a decoder runs them in; a tied unit appears at each use."""
    owner = {id(module): unit for unit in units for module in unit.modules}
    order: list[Unit] = []
    for module in model.modules():
        unit = owner.get(id(module))
        if unit is not None and (not order or order[-1] is not unit):
            order.append(unit)
    return order


def make_plan(model_id: str, budget: int, lookahead: int, dtype: str) -> Plan:
    from ..planner import DEFAULT_BANDWIDTH, Timing, plan
    from ..sources import local_files
    from ._read_speed import measure_read_bandwidth

    # Nothing is read here, so the engine's own check (budget >= largest unit) must not stop us from showing
    # the units: load with an unlimited budget, then plan with the requested one. Planning must not start a
    # background download of a Hub repo either.
    config = stream_config(budget=2**62, lookahead=lookahead, complete_download=False)
    model = load_streamed(model_id, config, dtype)
    engine = model._hf_weightstream
    result = Plan(model_id, model, engine, budget, lookahead, execution_order(model, engine.units))
    local = local_files(engine.checkpoint.source)
    shards = [Path(p) for p in local.paths.values()] if local is not None else []
    result.sample = measure_read_bandwidth(shards) if shards else None
    bandwidth = result.sample.bandwidth if result.sample and result.sample.bandwidth else DEFAULT_BANDWIDTH
    result.estimate = plan(result.scheduled, budget, lookahead, Timing(bandwidth))
    result.kept = set(result.estimate.keep)
    return result


def run_streamed(plan: Plan, tokens: int, dtype: str) -> None:
    """Stream ``tokens`` decode steps for real under the budget; the engine's plan replaces the estimate."""
    import torch
    from transformers import DynamicCache

    config = stream_config(budget=plan.budget, lookahead=plan.lookahead, complete_download=False)
    model = load_streamed(plan.model_id, config, dtype)
    engine = model._hf_weightstream
    ids = torch.arange(min(model.config.get_text_config().vocab_size, 8)).unsqueeze(0)
    with torch.inference_mode():
        if model.config.is_encoder_decoder:
            # generate() runs the encoder once and keeps both caches: the timed run's per-token time includes
            # one encoder pass spread over its tokens.
            model.generate(ids, max_new_tokens=1, do_sample=False)  # traces the schedule
            engine.reset_stats()
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        else:
            # transformers renamed past_key_values to cache (5.x); pass the cache object under the name forward takes.
            name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
            kv = {name: DynamicCache(config=model.config), "use_cache": True}
            out = model(input_ids=ids, **kv)  # traces the schedule; the first plan is made at its end
            engine.reset_stats()
            start = time.perf_counter()
            for _ in range(tokens):
                out = model(input_ids=out.logits[:, -1:].argmax(-1), **kv)
        seconds = (time.perf_counter() - start) / tokens
    plan.kept = set(engine.keep_resident)
    plan.run = {"stats": engine.stats(), "seconds_per_token": seconds, "tokens": tokens}


# ------------------------------------------------------------------------------------------------ sections
def _model_line(plan: Plan) -> str:
    engine = plan.engine
    return (
        f"{plan.model_id}: {type(plan.model).__name__}, {len(plan.units)} units, {format_bytes(engine.model_bytes)} "
        f"of weights in {len(engine.checkpoint.index.shard_sizes)} shard file(s); budget {format_bytes(plan.budget)}, "
        f"lookahead {plan.lookahead}"
    )


def _io_line(plan: Plan) -> str:
    from ..limits import memory_limits
    from ..log import io_path
    from ..sources import choose_reader, local_files

    engine = plan.engine
    if engine.copy_to_device or local_files(engine.source) is None:
        return f"I/O: {io_path(engine)}"
    reader, reason = choose_reader(
        engine.source,
        "auto",
        device=engine.device,
        budget=plan.budget,
        model_bytes=engine.model_bytes,
        limits=memory_limits(engine.device),
    )
    if getattr(reader, "trial", None) is not None:
        how = "read into reused page-aligned buffers, O_DIRECT or buffered as the first reads measure faster"
    else:
        how = {
            "direct": "read with O_DIRECT into reused page-aligned buffers",
            "buffered": "read into reused page-aligned buffers, dropped from the page cache",
            "mmap": "each unit's byte range mapped",
        }.get(reader.io, reader.io)
    return f"I/O under this budget: local safetensors files; {how} ({reason})"


def _format_line(plan: Plan) -> str | None:
    """A quantized checkpoint: its format, and what is read against what is resident."""
    engine = plan.engine
    if not engine.quantization:
        return None
    on_disk = sum(u.raw_bytes for u in engine.units)
    return (
        f"Checkpoint: {engine.quantization['method']}, {engine.quantization['resident_form']} on {engine.device}: "
        f"{format_bytes(on_disk)} read to hold {format_bytes(engine.model_bytes)} resident"
    )


def _experts_lines(plan: Plan) -> str | None:
    """MoE layers: which read per routed expert (and their cost per token), which stream whole and why."""
    from ..experts import survey

    engine = plan.engine
    lines = []
    if engine.expert_layers:
        first = engine.expert_layers[0]
        routed = first.top_k or "k"
        per_token = sum(min(layer.top_k or 1, layer.num_experts) * layer.expert_bytes for layer in engine.expert_layers)
        lines.append(
            f"Experts: {len(engine.expert_layers)} MoE layers read per routed expert ({first.num_experts} experts of "
            f"{format_bytes(first.expert_bytes)}, {routed} routed per token): a decode step reads at most "
            f"{format_bytes(per_token)} of experts, less what the expert cache holds. A call needs its routed "
            f"experts at once: a prompt routed to every expert needs a budget of "
            f"{format_bytes(engine.minimum_budget())}."
        )
    split = {layer.name for layer in engine.expert_layers}
    for found in survey(plan.model):
        if found.name not in split:
            lines.append(f"Experts: {found.name} ({found.cls}) streams whole with its block: {found.reason}")
    return "\n".join(lines) or None


HEADER: list[Callable[[Plan], str | None]] = [_model_line, _io_line, _format_line, _experts_lines]


def _shared_with(plan: Plan, unit: Unit) -> str | None:
    names = {id(module): name for name, module in plan.model.named_modules()}
    shared = [names[id(m)] for m in unit.modules if names[id(m)] != unit.name]
    return f"with {', '.join(shared)} (shared weights)" if shared else None


def _runs_per_token(plan: Plan, unit: Unit) -> str | None:
    uses = plan.uses(unit)
    return f"runs {uses}x per token" if uses > 1 else None


def _rows_only(plan: Plan, unit: Unit) -> str | None:
    return "reads only the rows each forward looks up" if unit.gather else None


def _holds_experts(plan: Plan, unit: Unit) -> str | None:
    inside = [layer for layer in plan.engine.expert_layers if layer.block is unit]
    if not inside:
        return None
    return f"+ {sum(layer.num_experts for layer in inside)} experts read per routed expert"


def _read_vs_resident(plan: Plan, unit: Unit) -> str | None:
    """Bytes on disk against resident bytes where they differ (a quantized checkpoint, a dtype cast)."""
    if unit.gather or unit.raw_bytes == unit.resident_bytes:
        return None
    return f"reads {format_bytes(unit.raw_bytes)}"


UNIT_NOTES: list[Callable[[Plan, Unit], str | None]] = [
    _shared_with,
    _runs_per_token,
    _rows_only,
    _holds_experts,
    _read_vs_resident,
]


def _unit_plan(plan: Plan, unit: Unit) -> tuple[str, int]:
    """(what happens to the unit, the bytes shown for it)."""
    if unit.gather:
        return "rows", unit.raw_bytes
    return ("resident" if unit.name in plan.kept else "stream"), unit.resident_bytes


UNIT_SIZE: Callable[[Plan, Unit], tuple[str, int]] = _unit_plan


def unit_table(plan: Plan) -> str:
    rows = []
    for i, unit in enumerate(dict.fromkeys(plan.order), 1):
        what, size = UNIT_SIZE(plan, unit)
        notes = [note for note in (f(plan, unit) for f in UNIT_NOTES) if note]
        rows.append((str(i), unit.name, format_bytes(size), what, "; ".join(notes)))
    return table(rows, header=("#", "unit (execution order)", "size", "plan", ""), align="rlrll")


def too_small(plan: Plan) -> str | None:
    largest = max(plan.units, key=lambda u: u.charge_bytes)
    if largest.charge_bytes > plan.budget:
        return (
            f"The budget is too small: unit {largest.name!r} alone needs {largest.charge_bytes:,} bytes "
            f"({format_bytes(largest.charge_bytes)}) while it loads. Use at least that, ideally a few times more."
        )
    for layer in plan.engine.expert_layers:
        need = plan.engine.experts_call_bytes(layer, min(layer.top_k or 1, layer.num_experts))
        if need > plan.budget:
            return (
                f"The budget is too small: one decode step of {layer.name!r} needs {need:,} bytes "
                f"({format_bytes(need)}): its block and its routed experts at once."
            )
    return None


def summary(plan: Plan) -> list[str]:
    kept_bytes = sum(u.resident_bytes for u in plan.units if u.name in plan.kept)
    per_token = sum(u.raw_bytes for u in plan.streamed)
    experts = sum(
        min(layer.top_k or 1, layer.num_experts) * layer.units[0].raw_bytes for layer in plan.engine.expert_layers
    )
    if experts and plan.budget >= plan.engine.model_bytes:  # every expert stays cached once read
        routed = "; each routed expert is read once and stays cached (the budget holds them all)"
    elif experts:
        routed = f", plus up to {format_bytes(experts)} of routed experts the cache does not hold"
    else:
        routed = ""
    lines = [
        f"Kept resident: {len(plan.kept)} units, {format_bytes(kept_bytes)}. Streamed: {len(plan.streamed)} units, "
        f"about {format_bytes(per_token)} read per token{routed}."
    ]
    if plan.run is None:
        lines.append(
            f"This plan is an estimate (read-ahead depth {plan.estimate.depth}) made without compute times and "
            "taking module order for execution order; the engine plans again from what it traces and measures "
            "(--run N shows it)."
        )
    return lines


def reading_time(plan: Plan) -> list[str]:
    from ._read_speed import cache_state

    sample = plan.sample
    if sample is None:
        return ["Read bandwidth: not measured (the shards are not local files: they stream from the Hub)."]
    lines = [
        f"Read bandwidth: {format_bytes(sample.bandwidth)}/s over {format_bytes(sample.nbytes)} of the "
        f"shard files ({cache_state(sample.cached_before)})."
    ]
    per_token = sum(u.raw_bytes for u in plan.streamed)
    if not per_token:
        lines.append("Predicted time per token from reading: none, the whole model stays resident once read.")
    elif sample.bandwidth:
        milliseconds = per_token / sample.bandwidth * 1000
        lines.append(
            f"Predicted time per token from reading alone: about {milliseconds:.0f} ms (compute adds to it "
            "where prefetching cannot hide the reads)."
        )
    return lines


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.0f} ms"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def measured(plan: Plan) -> list[str]:
    """With --run: the engine's read path and plan, predicted against measured."""
    if plan.run is None:
        return []
    stats = plan.run["stats"]
    return [
        f"Streamed {plan.run['tokens']} token(s) for real under the budget; the plan above is the engine's, made "
        f"from measured times: io {stats['io']} ({stats['io_reason']}), read-ahead depth {stats['depth']}.",
        f"Time per token: predicted {_ms(stats['predicted_seconds_per_token'])}, measured "
        f"{_ms(plan.run['seconds_per_token'])}. Reads hidden behind compute: predicted "
        f"{_share(stats['predicted_overlap'])}, measured {_share(stats['measured_overlap'])}. Hits {stats['hits']} "
        f"({stats['prefetch_hits']} read ahead in time), late prefetches {stats['late_prefetches']}, misses "
        f"{stats['misses']}.",
    ]


def run(args: argparse.Namespace) -> int:
    plan = make_plan(resolve_model(args.model), args.budget, args.lookahead, args.dtype)
    problem = too_small(plan)
    if args.run_tokens and not problem:
        run_streamed(plan, args.run_tokens, args.dtype)
    print("\n".join(line for line in (f(plan) for f in HEADER) if line) + "\n")
    print(unit_table(plan))
    if problem:
        print(f"\n{problem}", file=sys.stderr)
        return 2
    print("\n" + "\n".join(summary(plan)))
    print("\n".join(reading_time(plan) + measured(plan)))
    return 0
