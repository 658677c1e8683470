"""Stream Hugging Face model weights during inference, under a memory budget.

``import hf_weightstream`` installs the integration; then
``AutoModelForCausalLM.from_pretrained(repo, device_map="stream")`` returns a model whose weights are read just
before each block runs, prefetched in execution order, and evicted under a byte budget.
"""

from __future__ import annotations

from typing import Any

from .config import StreamConfig
from .errors import BudgetError, CheckpointError, StreamConfigError, StreamingRuntimeError
from .hub import CachedShard, HubSource
from .hub import wait_until_cached as _wait_until_cached
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


def wait_until_cached(model: Any, timeout: float | None = None) -> dict[str, CachedShard]:
    """Block until every shard of a model streamed from the Hub is complete, verified and in the Hub cache.

    Fetches what is missing now (also with ``complete_download=False``), then returns ``{shard: CachedShard}`` with
    the snapshot path, the repo's blob and the sha256 of every shard. For scripts that must leave a complete cache
    behind, and for tests. Raises ``TimeoutError`` after ``timeout`` seconds (the download continues in the
    background).
    """
    if isinstance(model, HubSource):
        return model.wait_until_cached(timeout)
    engine = engine_of(model)
    checkpoint = getattr(engine, "checkpoint", None)  # set by from_pretrained; engine.source may be wrapped
    return _wait_until_cached(checkpoint.source if checkpoint is not None else engine.source, timeout)


def release(model: Any) -> None:
    """Drop every resident weight of a streamed model now; its memory goes back to the pool."""
    engine_of(model).release_all()
