"""What a streamed model is doing, told through transformers' logging, and shown by ``print(model)``.

The logger is ``transformers.hf_weightstream``, a child of transformers' library logger, so the switches users
already have for transformers work for us: ``transformers.logging.set_verbosity_info()`` (or
``TRANSFORMERS_VERBOSITY=info``) shows the plan when a model loads (units, budget and where it came from, the I/O
path) and again when its first forward pass has traced the execution order (what stays resident, what streams);
``debug`` adds one line per forward pass, that is per generated token (hits, misses, bytes read, time waited).
Our own logger name (``hf_weightstream``) would stay silent under those switches.

The engine and the integration call the three ``log_*`` functions; the sentences are built here only when the
level is enabled, so a quiet model pays one level check per forward pass.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import TYPE_CHECKING, Any

from transformers.utils import logging as hf_logging

from .sources import local_files

if TYPE_CHECKING:
    from torch import nn

    from .config import StreamConfig
    from .engine import StreamEngine
    from .residency import WeightPool

LOGGER_NAME = "transformers.hf_weightstream"
logger = hf_logging.get_logger(LOGGER_NAME)


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def budget_origin(config: StreamConfig, max_memory: Any, default_pool: WeightPool | None) -> str:
    """Where the budget came from, in the order ``from_pretrained`` looks (see docs/api.md)."""
    if config.pool is not None:
        return "the WeightPool given as StreamConfig(pool=...)"
    if config.budget_bytes is not None:
        return "StreamConfig(budget=...)"
    if max_memory:
        return "max_memory"
    if default_pool is not None:
        return "the default pool (set_default_pool)"
    return "the default, from the memory available on the device"


def io_path(engine: StreamEngine) -> str:
    """How weight bytes reach the execution device, in one phrase."""
    if local_files(engine.source) is not None:
        origin = "local safetensors files"
    else:
        origin = "the Hub (HTTP range requests, kept in the Hub cache)"
    if engine.copy_to_device:
        staging = "pinned host staging buffers" if engine.device.type == "cuda" else "host staging buffers"
        how = f"read into {staging}, then copied to {engine.device}"
    elif engine.reader.io in ("direct", "buffered"):
        how = "read into reused page-aligned buffers, several reads in flight, with " + (
            "O_DIRECT" if engine.reader.io == "direct" else "each piece dropped from the page cache once copied"
        )
    elif engine.reader.io == "mmap":
        how = "each unit's byte range mapped in place (mmap) and paged in by a reader thread"
    else:
        how = "read into memory by reader threads"
    reason = f" ({engine.io_reason})" if engine.io_reason and not engine.copy_to_device else ""
    return f"{origin}; {how}{reason}"


def unit_names(names: list[str]) -> str:
    """``model.layers.0, model.layers.1, model.layers.2, lm_head`` -> ``model.layers.0-2, lm_head``."""
    out: list[str] = []
    run: tuple[str, int, int] | None = None  # prefix, first, last
    for name in [*names, ""]:
        match = re.fullmatch(r"(.*\.)(\d+)", name)
        if run and match and match.group(1) == run[0] and int(match.group(2)) == run[2] + 1:
            run = (run[0], run[1], run[2] + 1)
            continue
        if run:
            out.append(f"{run[0]}{run[1]}" + (f"-{run[2]}" if run[2] > run[1] else ""))
            run = None
        if match:
            run = (match.group(1), int(match.group(2)), int(match.group(2)))
        elif name:
            out.append(name)
    return ", ".join(out)


def log_load(model: nn.Module, engine: StreamEngine, origin: str) -> None:
    """At the end of ``from_pretrained``: the model, its units, the budget and its origin, the I/O path.

    Also makes ``print(model)`` say that the model is streamed (first line inside the model's brackets).
    """
    original = model.extra_repr

    def extra_repr() -> str:
        line = (
            f"streamed by hf_weightstream: {len(engine.units)} units, {_mb(engine.model_bytes)} of weights, "
            f"budget {_mb(engine.pool.budget)} on {engine.device}"
        )
        return "\n".join(filter(None, [line, original()]))

    model.extra_repr = extra_repr
    if not logger.isEnabledFor(logging.INFO):
        return
    largest = max(engine.units, key=lambda u: u.charge_bytes)
    logger.info(
        "hf_weightstream: streaming %s (%s) on %s: %d units, %s of weights (largest: %s, %s); budget %s from %s; "
        "policy %s, lookahead %d; I/O: %s. What stays resident is planned after the first forward pass.",
        engine.label,
        type(model).__name__,
        engine.device,
        len(engine.units),
        _mb(engine.model_bytes),
        largest.name,
        _mb(largest.charge_bytes),
        _mb(engine.pool.budget),
        origin,
        engine.policy,
        engine.lookahead,
        io_path(engine),
    )
    logger.debug(
        "hf_weightstream: %s units: %s",
        engine.label,
        "; ".join(f"{u.name} {_mb(u.resident_bytes)}" for u in engine.units),
    )


def log_schedule(engine: StreamEngine) -> None:
    """After the first forward pass traced the execution order: what stays resident and what streams."""
    if not logger.isEnabledFor(logging.INFO):
        return
    unique = list({id(u): u for u in engine.schedule}.values())
    kept = [u for u in unique if u.name in engine.keep_resident]
    streamed = [u for u in unique if u.name not in engine.keep_resident]
    logger.info(
        "hf_weightstream: %s traced %d unit calls per forward pass. Kept resident: %d units, %s (%s). "
        "Streamed each pass: %d units, %s (%s).",
        engine.label,
        len(engine.schedule),
        len(kept),
        _mb(sum(u.resident_bytes for u in kept)),
        unit_names([u.name for u in kept]) or "none",
        len(streamed),
        _mb(sum(u.raw_bytes for u in streamed)),
        unit_names([u.name for u in streamed]) or "none",
    )


def forward_snapshot(engine: StreamEngine) -> tuple[Counter[str], float] | None:
    """The counters at the start of a forward pass, when debug logging will report on it."""
    if not logger.isEnabledFor(logging.DEBUG):
        return None
    return Counter(engine.counters), engine.stall_seconds


def log_forward(engine: StreamEngine, before: tuple[Counter[str], float] | None) -> None:
    """At debug, after each forward pass (a generated token): hits, misses, bytes read, time waited."""
    if before is None or not logger.isEnabledFor(logging.DEBUG):
        return
    counters, stall = before
    delta = engine.counters - counters
    logger.debug(
        "hf_weightstream: %s forward pass: %d hits, %d misses, %d late prefetches, %d evictions; read %s in %d "
        "reads; waited %.1f ms for weights; %s held now",
        engine.label,
        delta["hits"],
        delta["misses"],
        delta["late_prefetches"],
        delta["evictions"],
        _mb(delta["bytes_read"]),
        delta["reads"],
        (engine.stall_seconds - stall) * 1000,
        _mb(engine.pool.held),
    )
