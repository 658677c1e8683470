"""Stream Hugging Face model weights during inference, under a memory budget.

``import hf_weightstream`` installs the integration; then
``AutoModelForCausalLM.from_pretrained(repo, device_map="stream")`` returns a model whose weights are read just
before each block runs, prefetched in execution order, and evicted under a byte budget.

Importing the package is cheap: torch and transformers load only when they are needed (the ``hf-weightstream``
command answers ``--help`` without them). The public names below are imported on first use, and the integration
is installed as soon as transformers' model code is imported (see ``_autoinstall``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._autoinstall import install_with_transformers
from .errors import (
    BudgetError,
    CheckpointError,
    StreamConfigError,
    StreamingRuntimeError,
    StreamingUnsupportedError,
)

if TYPE_CHECKING:
    from .config import StreamConfig
    from .hub import wait_until_cached
    from .residency import WeightPool, set_default_pool

__all__ = [
    "BudgetError",
    "CheckpointError",
    "StreamConfig",
    "StreamConfigError",
    "StreamingRuntimeError",
    "StreamingUnsupportedError",
    "WeightPool",
    "release",
    "reset_stats",
    "set_default_pool",
    "stats",
    "wait_until_cached",
]
__version__ = "0.1.0"

# Public names that need torch, and the module each comes from: imported on first access.
_LAZY = {
    "StreamConfig": ".config",
    "WeightPool": ".residency",
    "set_default_pool": ".residency",
    "wait_until_cached": ".hub",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def stats(model: Any) -> dict[str, Any]:
    """Where the time and bytes went for a streamed model: reads, hits, misses, evictions, peaks, stalls."""
    from .integration import engine_of

    return engine_of(model).stats()


def reset_stats(model: Any) -> None:
    """Zero the counters and peaks of a streamed model (e.g. after a warm-up)."""
    from .integration import engine_of

    engine_of(model).reset_stats()


def release(model: Any) -> None:
    """Drop every resident weight of a streamed model that no running call holds, once the reads in flight have
    landed; its memory goes back to the pool."""
    from .integration import engine_of

    engine_of(model).release_all()


install_with_transformers()
