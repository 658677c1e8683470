"""Pre-quantized checkpoints: which formats stream, and checking their tensors before any weight is read.

The largest open models ship quantized (DeepSeek-V3 and Kimi-K2 in block-wise FP8, gpt-oss in MXFP4, Qwen3 and
GLM in FP8 as well as bf16), and reading the quantized bytes halves or quarters what a token costs. Streaming
does not dequantize anything itself: transformers' quantizer (made by ``get_hf_quantizer`` exactly as
``from_pretrained`` makes it) replaces modules on the meta skeleton and puts its load operations into the
converters that `units` already run per unit. So where this machine has no kernel for the format (a CPU),
each unit is read quantized and dequantized by transformers' own ``Fp8Dequantize`` / ``Mxfp4Dequantize`` in the
reader thread; where transformers keeps the weights quantized on the device, they stay resident quantized.

compressed-tensors checkpoints are read the way transformers reads them with ``dequantize=True`` (per module, at
load), since its default of decompressing the whole model at the first forward cannot stream; the outputs are the
same. Formats stream only where a test shows them bit-identical to transformers' own load; others are refused with
the list of those that stream. A checkpoint is also checked from its headers alone, so a missing scale or a
scale grid that does not fit its weight fails at ``from_pretrained``, naming the tensor, before anything is read
(or downloaded).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from . import _transformers_compat as compat
from .errors import CheckpointError, StreamConfigError
from .index import CheckpointIndex

# quant_method -> what it is, for messages; each is tested against transformers' own load in test_quantized.py.
STREAMED_FORMATS = {
    "fp8": "fine-grained FP8 (DeepSeek-V3, Qwen3-FP8: e4m3 weights with block-wise weight_scale_inv)",
    "mxfp4": "MXFP4 (gpt-oss: *_blocks and *_scales experts)",
    "compressed-tensors": "compressed-tensors (e.g. INT4 pack-quantized W4A16; needs `pip install compressed-tensors`)",
}


# The dtypes of FP8 weights (their scales may be 1-byte floats too: ue8m0 exponents, float8_e8m0fnu).
FP8_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _formats() -> str:
    return "; ".join(f"{method!r}: {what}" for method, what in STREAMED_FORMATS.items())


def _method(quantization_config: Any) -> str | None:
    if quantization_config is None:
        return None
    if isinstance(quantization_config, dict):
        return quantization_config.get("quant_method")
    method = getattr(quantization_config, "quant_method", None)
    return getattr(method, "value", method)


def checkpoint_quantization(config: Any) -> Any:
    """The checkpoint's own ``quantization_config`` (on the config or its text config), or None."""
    found = getattr(config, "quantization_config", None)
    if found is None and hasattr(config, "get_text_config"):
        found = getattr(config.get_text_config(decoder=True), "quantization_config", None)
    return found


def prepare(config: Any, requested: Any, name: str) -> Any:
    """transformers' quantizer for a pre-quantized checkpoint, or None; a clear error for what cannot stream."""
    stored = checkpoint_quantization(config)
    if stored is None:
        if requested is not None:
            raise StreamConfigError(
                f"quantization_config={type(requested).__name__}(...) asks transformers to quantize {name} while it "
                "loads, which needs every weight in memory first and cannot stream. Streaming reads checkpoints "
                f"that are already quantized, in these formats: {_formats()}. Load without device_map='stream' to "
                "quantize, save_pretrained() the result if it is one of those formats, and stream that."
            )
        return None
    method = _method(stored)
    if method not in STREAMED_FORMATS or not compat.AutoHfQuantizer.supports_quant_method(stored):
        raise CheckpointError(
            f"{name} is a pre-quantized checkpoint with quant_method={method!r} (quantization_config in its "
            f"config.json), which streaming does not read. Formats that stream: {_formats()}. Load it without "
            "device_map='stream', or stream an unquantized or supported version of the model."
        )
    if method == "compressed-tensors":
        requested = _dequantizing(requested)
    return compat.make_quantizer(config, requested)


def _dequantizing(requested: Any) -> Any:
    """compressed-tensors' default load keeps modules compressed and decompresses the whole model in a hook at the
    first forward, which cannot stream; its ``dequantize=True`` load (the same values: tested) dequantizes per
    module with a load operation, which streams per unit like the other formats."""
    from transformers import CompressedTensorsConfig

    if requested is None:
        return CompressedTensorsConfig(dequantize=True)
    merged = copy.copy(requested)
    merged.dequantize = True
    return merged


def describe(hf_quantizer: Any) -> dict[str, Any]:
    """What ``stats()`` and ``inspect`` say about the format (empty for an unquantized model)."""
    if hf_quantizer is None:
        return {}
    quantization = hf_quantizer.quantization_config
    dequantized = bool(getattr(quantization, "dequantize", False))
    return {
        "method": _method(quantization),
        "resident_form": "dequantized at load" if dequantized else "quantized",
    }


def validate(index: CheckpointIndex, hf_quantizer: Any) -> None:
    """Check each quantized tensor has its scales and that their shapes fit, from the headers alone."""
    if hf_quantizer is None:
        return
    method = _method(hf_quantizer.quantization_config)
    entries = index.entries
    if method == "fp8":
        block = getattr(hf_quantizer.quantization_config, "weight_block_size", None)
        dequantizing = bool(getattr(hf_quantizer.quantization_config, "dequantize", False))
        for key, entry in entries.items():
            if entry.dtype not in FP8_WEIGHT_DTYPES:  # 1-byte ue8m0 scales (float8_e8m0fnu) are not weights
                continue
            base = key.removesuffix(".weight")
            scale = (
                entries.get(f"{key}_scale_inv") or entries.get(f"{base}.scale") or entries.get(f"{base}.qscale_weight")
            )
            if scale is None:
                raise CheckpointError(
                    f"{entry.shard}: FP8 tensor {key!r} has no scale ({key}_scale_inv) in the checkpoint: without it "
                    "the weights cannot be dequantized. The checkpoint is incomplete; download it again."
                )
            if block and len(entry.shape) >= 2:
                rows, cols = entry.shape[-2:]
                grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
                if tuple(scale.shape[-2:]) != grid:
                    raise CheckpointError(
                        f"{scale.shard}: scale {scale.key!r} has shape {list(scale.shape)} but weight {key!r} "
                        f"{list(entry.shape)} with weight_block_size {list(block)} needs a {list(grid)} grid. The "
                        "checkpoint and its quantization_config disagree."
                    )
                if dequantizing and any(n % b and g > 1 for n, b, g in zip((rows, cols), block, grid, strict=True)):
                    # transformers' Fp8Dequantize derives the block from the scale grid (rows // grid rows): on a
                    # partial last block it raises at the first forward, or silently uses a wrong block size. A
                    # dimension smaller than one block (a grid of 1) is one whole block there: it dequantizes right.
                    raise CheckpointError(
                        f"{entry.shard}: FP8 weight {key!r} {list(entry.shape)} is not a whole number of "
                        f"{list(block)} blocks (its last blocks are partial). transformers' FP8 dequantizer, which "
                        "a load on this machine (no FP8 kernel) runs, cannot dequantize partial blocks: it fails or "
                        "computes wrong values. Load it on a GPU with FP8 support, where it stays quantized, or "
                        "use the unquantized (bf16) version of the model."
                    )
    elif method == "mxfp4":
        for key, entry in entries.items():
            if not key.endswith("_blocks"):
                continue
            scales = entries.get(key.removesuffix("_blocks") + "_scales")
            if scales is None:
                raise CheckpointError(
                    f"{entry.shard}: MXFP4 tensor {key!r} has no {key.removesuffix('_blocks')}_scales in the "
                    "checkpoint. The checkpoint is incomplete; download it again."
                )
            if tuple(scales.shape) != tuple(entry.shape[:-1]):
                raise CheckpointError(
                    f"{scales.shard}: scales {scales.key!r} have shape {list(scales.shape)} but blocks {key!r} "
                    f"{list(entry.shape)} need {list(entry.shape[:-1])} (one scale per 32-value block)."
                )


def check_scales_are_used(index: CheckpointIndex, hf_quantizer: Any, unexpected: list[str]) -> None:
    """An FP8 weight whose scale transformers' loader would leave unused (no converter of this model reads it, e.g.
    fused ``experts.gate_up_proj`` tensors with ``gate_up_proj_scale_inv``) would be loaded as its raw e4m3
    values, scale ignored: plain ``from_pretrained`` reports the scale as unexpected and computes garbage. Refused."""
    if hf_quantizer is None or _method(hf_quantizer.quantization_config) != "fp8":
        return
    entries = index.entries
    unused = set(unexpected)
    for key in unexpected:
        weight = key.removesuffix("_scale_inv")
        entry = entries.get(weight) if weight != key else None
        if entry is not None and entry.dtype in FP8_WEIGHT_DTYPES and weight not in unused:
            raise CheckpointError(
                f"{entries[key].shard}: the scale {key!r} of FP8 weight {weight!r} {list(entry.shape)} is read by no "
                "converter of this model in transformers, which would load the weight's raw FP8 values without "
                "their scale (transformers dequantizes only per-module '*.weight' + '*.weight_scale_inv' pairs, "
                "not fused expert tensors). The outputs would be wrong: load the unquantized version of the "
                "model, or a checkpoint with one tensor per expert."
            )
