"""Pre-quantized checkpoints (config.json with a ``quantization_config``)."""

from __future__ import annotations

import shutil

import pytest
import torch
from quantized import to_fp8
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_weightstream import CheckpointError


@pytest.fixture(scope="module")
def fp8_dense(checkpoints, tmp_path_factory):
    folder = shutil.copytree(checkpoints("qwen3_dense_fp8_shapes"), tmp_path_factory.mktemp("fp8") / "dense")
    return to_fp8(folder)


def test_fp8_fixture_is_a_real_checkpoint(fp8_dense):
    """transformers itself loads it and dequantizes each weight as q * scale_inv, block by block."""
    model = AutoModelForCausalLM.from_pretrained(fp8_dense, dtype=torch.float32)
    weight = model.model.layers[0].mlp.up_proj.weight  # [384, 256]: a 3 x 2 grid of 128 x 128 blocks
    key = "model.layers.0.mlp.up_proj.weight"
    shard = next(p for p in fp8_dense.glob("*.safetensors") if key in safe_open(p, "pt").keys())  # noqa: SIM118 - safe_open is no dict
    with safe_open(shard, "pt") as f:
        q, scale = f.get_tensor(key), f.get_tensor(key + "_scale_inv")
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 2)
    expected = (q.float().view(3, 128, 2, 128) * scale[:, None, :, None]).view(384, 256)
    assert torch.equal(weight, expected)


def test_prequantized_checkpoint_is_refused_not_computed_wrong(fp8_dense):
    with pytest.raises(CheckpointError, match="pre-quantized checkpoint .*quant_method='fp8'"):
        AutoModelForCausalLM.from_pretrained(fp8_dense, device_map="stream")
