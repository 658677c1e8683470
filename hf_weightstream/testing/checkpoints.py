"""Pre-quantized checkpoints written to each format's published layout, for tests and benchmarks.

transformers cannot quantize to these formats on a CPU, so the fixtures quantize a tiny random model's saved
tensors themselves and rewrite its shards:

* fine-grained FP8 (DeepSeek-V3 / Qwen3-FP8): every linear weight of the decoder blocks is ``float8_e4m3fn``
  ``[out, in]`` with a float32 ``weight_scale_inv`` grid ``[ceil(out/128), ceil(in/128)]``, one scale per
  128x128 block (``w ~= q * scale_inv``); config.json carries
  ``{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}``.

* MXFP4 (gpt-oss): each experts projection ``[E, in, out]`` is stored transposed as ``*_blocks`` uint8
  ``[E, out, in/32, 16]`` (32 e2m1 values per block, two per byte, low nibble first) and ``*_scales`` uint8
  ``[E, out, in/32]`` (a power-of-two exponent per block, biased by 127); biases and every other tensor stay
  bf16; config.json carries ``{"quant_method": "mxfp4", "modules_to_not_convert": [...]}`` as gpt-oss does.

* compressed-tensors INT4 W4A16 ``pack-quantized`` (the Kimi-K2-Thinking format), written by the
  ``compressed-tensors`` package itself (group-wise symmetric scales from each group's range, eight 4-bit values
  packed per int32 ``weight_packed``, ``weight_scale``, ``weight_shape``; ``lm_head`` ignored).

The tests check that transformers' own ``from_pretrained`` loads each one, so what these write are real
checkpoints.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_BLOCK = 128
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
# Linear weights inside the decoder blocks, dense or per expert (routers, norms, embeddings and head stay as they are).
FP8_LINEAR = re.compile(r"\.layers\.\d+\..*_proj\.weight$")


def quantize_fp8_blockwise(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale_inv)`` with ``q * scale_inv`` close to ``weight``, one scale per ``block x block`` tile."""
    rows, cols = weight.shape
    grid_r, grid_c = math.ceil(rows / block), math.ceil(cols / block)
    padded = torch.zeros(grid_r * block, grid_c * block, dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    tiles = padded.view(grid_r, block, grid_c, block)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_MAX
    q = (tiles / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(grid_r * block, grid_c * block)[:rows, :cols].contiguous(), scale_inv.contiguous()


FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
MXFP4_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks, scales)`` of an experts weight ``[E, in, out]``, in gpt-oss' layout (see the module docstring)."""
    rows = weight.float().transpose(1, 2).contiguous()  # [E, out, in]
    experts, out, width = rows.shape
    groups = rows.view(experts, out, width // 32, 32)
    amax = groups.abs().amax(dim=-1).clamp(min=1e-30)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    nibbles = (scaled[..., None] - FP4_VALUES).abs().argmin(dim=-1).to(torch.uint8)  # nearest e2m1 value
    packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return packed.contiguous(), (exponent + 127).to(torch.uint8).contiguous()


def to_mxfp4(folder: Path, max_shard_bytes: int = 400_000) -> Path:
    """Rewrite a saved gpt-oss checkpoint in ``folder`` with MXFP4 experts, in place."""
    tensors = _read_all(folder)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if MXFP4_EXPERTS.search(key):
            out[key + "_blocks"], out[key + "_scales"] = quantize_mxfp4(tensor)
        else:
            out[key] = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
    write_shards(folder, out, max_shard_bytes)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    config_path.write_text(json.dumps(config, indent=2))
    return folder


def _read_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    index = folder / "model.safetensors.index.json"
    if index.exists():
        index.unlink()
    return tensors


def write_shards(folder: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    """Save ``tensors`` as ``model-0000i-of-0000n.safetensors`` plus an index, as ``save_pretrained`` does."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def to_fp8(folder: Path, max_shard_bytes: int = 400_000, skip: re.Pattern | None = None) -> Path:
    """Rewrite a saved bf16/fp32 checkpoint in ``folder`` as a fine-grained FP8 checkpoint, in place."""
    tensors = _read_all(folder)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if FP8_LINEAR.search(key) and tensor.dim() == 2 and not (skip and skip.search(key)):
            out[key], out[key + "_scale_inv"] = quantize_fp8_blockwise(tensor)
        else:
            out[key] = tensor
    write_shards(folder, out, max_shard_bytes)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
    }
    config_path.write_text(json.dumps(config, indent=2))
    return folder


def write_compressed_tensors_w4a16(model, folder: Path, max_shard_size: str = "400KB") -> Path:
    """Save ``model`` as a compressed-tensors W4A16 (group 128) pack-quantized checkpoint."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from compressed_tensors.quantization.utils import calculate_qparams

    scheme = preset_name_to_scheme("W4A16", ["Linear"])
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"], quantization_status="frozen")
    apply_quantization_config(model, config)
    for module in model.modules():
        args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
        if args is None:
            continue
        weight = module.weight.detach()
        groups = weight.view(weight.shape[0], weight.shape[1] // args.group_size, args.group_size)
        scale, _zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        module.weight_scale.data.copy_(scale.to(module.weight_scale.dtype))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    compressor.update_config(folder)
    return folder
