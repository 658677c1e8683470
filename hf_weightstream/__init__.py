"""Stream Hugging Face model weights during inference, under a memory budget.

``import hf_weightstream`` installs the integration; then
``AutoModelForCausalLM.from_pretrained(repo, device_map="stream")`` returns a model whose weights are read just
before each block runs, prefetched in execution order, and evicted under a byte budget.
"""

from __future__ import annotations

from typing import Any

from .config import StreamConfig
from .errors import BudgetError, CheckpointError, StreamConfigError, StreamingRuntimeError
from .hub_stream import wait_until_cached
from .integration import engine_of, install
from .residency import WeightPool, set_default_pool

__all__ = [
    "BudgetError",
    "CheckpointError",
    "StreamConfig",
    "StreamConfigError",
    "StreamingRuntimeError",
    "WeightPool",
    "release",
    "reset_stats",
    "set_default_pool",
    "stats",
    "wait_until_cached",
]
__version__ = "0.1.0"

install()


def stats(model: Any) -> dict[str, Any]:
    """Where the time and bytes went for a streamed model: reads, hits, misses, evictions, peaks, stalls."""
    return engine_of(model).stats()


def reset_stats(model: Any) -> None:
    """Zero the counters and peaks of a streamed model (e.g. after a warm-up)."""
    engine_of(model).reset_stats()


def release(model: Any) -> None:
    """Drop every resident weight of a streamed model now; its memory goes back to the pool."""
    engine_of(model).release_all()
