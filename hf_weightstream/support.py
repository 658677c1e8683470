"""The models that cannot stream, refused at load time with the reason and what to do instead.

Streaming serves every weight read-only from the checkpoint (see `placeholders`). A model whose own inference
code writes into its weights cannot be served that way: the write would be lost at the next eviction, or,
worse, apply twice. Every other architecture transformers ships streams (``tests/test_zoo.py`` builds them
all); the few exceptions are listed here, each with a test, so that they fail before any weight is read rather
than in the middle of a forward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import StreamingUnsupportedError


def _rwkv_rescales_in_place(model: Any) -> str | None:
    rescale_every = getattr(model.config, "rescale_every", 0)
    if type(model).__name__.startswith("Rwkv") and rescale_every and rescale_every > 0:
        return (
            f"RWKV divides some of its weights in place at the first inference forward (config.rescale_every="
            f"{rescale_every}, an fp16 overflow guard), and streamed weights are read-only. Load it with "
            "from_pretrained(..., device_map='stream', rescale_every=0) (the same model without the in-place "
            "rescaling), or without device_map='stream'."
        )
    return None


_RULES: list[Callable[[Any], str | None]] = [_rwkv_rescales_in_place]


def check_supported(model: Any) -> None:
    """Raise `StreamingUnsupportedError` if ``model`` (the meta skeleton) cannot be streamed."""
    for rule in _RULES:
        reason = rule(model)
        if reason:
            raise StreamingUnsupportedError(f"{type(model).__name__} cannot be streamed: {reason}")
