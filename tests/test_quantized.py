"""Pre-quantized checkpoints stream their quantized bytes and compute what transformers' own load computes."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from equivalence import assert_units_match_plain_load
from moe_zoo import save as save_moe
from safetensors import safe_open
from tiny import BUILDERS as tiny_builders
from tiny import save as save_tiny
from tiny import tokenizer
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, CompressedTensorsConfig, FineGrainedFP8Config
from workloads import PROMPT, assert_same_outputs, workload

import hf_weightstream
from hf_weightstream import CheckpointError, StreamConfigError
from hf_weightstream.testing.checkpoints import to_fp8, to_mxfp4, write_compressed_tensors_w4a16


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """``quantized(kind)`` -> folder of a tiny checkpoint written to the format's layout, built on first use."""
    root = tmp_path_factory.mktemp("quantized")
    made = {}

    def build(kind):
        folder = root / kind
        if kind == "fp8_dense":  # linear weights span 3 x 2 grids of 128 x 128 blocks
            return to_fp8(save_tiny("qwen3_dense_fp8_shapes", folder, max_shard_size="400KB"))
        if kind == "fp8_dense_skip":  # layer 1's MLP left in full precision and named in modules_to_not_convert
            to_fp8(
                save_tiny("qwen3_dense_fp8_shapes", folder, max_shard_size="400KB"), skip=re.compile(r"layers\.1\.mlp")
            )
            config = json.loads((folder / "config.json").read_text())
            config["quantization_config"]["modules_to_not_convert"] = ["model.layers.1.mlp", "lm_head"]
            (folder / "config.json").write_text(json.dumps(config))
            return folder
        if kind == "fp8_moe":  # Qwen3-MoE FP8: per-expert e4m3 tensors, 16 experts of 128 x 256 blocks
            return to_fp8(save_tiny("qwen3_moe_fp8_shapes", folder, max_shard_size="400KB"), max_shard_bytes=2_000_000)
        if kind == "mxfp4":  # gpt-oss: MXFP4 experts, 32 experts, 2 blocks of 32 values per row
            save_moe("gpt_oss", folder, hidden_size=64, intermediate_size=64, num_local_experts=32)
            return to_mxfp4(folder)
        if kind == "ct_w4a16":  # compressed-tensors INT4, groups of 128, written by the compressed-tensors package
            pytest.importorskip("compressed_tensors")
            torch.manual_seed(0)
            write_compressed_tensors_w4a16(tiny_builders["qwen3_dense_fp8_shapes"](), folder)
            tokenizer().save_pretrained(folder)
            return folder
        raise KeyError(kind)

    def get(kind):
        if kind not in made:
            made[kind] = build(kind)
        return made[kind]

    return get


def test_fp8_fixture_is_a_real_checkpoint(quantized):
    """transformers itself loads it and dequantizes each weight as q * scale_inv, block by block."""
    folder = quantized("fp8_dense")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    weight = model.model.layers[0].mlp.up_proj.weight  # [384, 256]: a 3 x 2 grid of 128 x 128 blocks
    key = "model.layers.0.mlp.up_proj.weight"
    shard = next(p for p in folder.glob("*.safetensors") if key in safe_open(p, "pt").keys())  # noqa: SIM118
    with safe_open(shard, "pt") as f:
        q, scale = f.get_tensor(key), f.get_tensor(key + "_scale_inv")
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 2)
    expected = (q.float().view(3, 128, 2, 128) * scale[:, None, :, None]).view(384, 256)
    assert torch.equal(weight, expected)


def test_mxfp4_fixture_is_a_real_checkpoint(quantized):
    folder = quantized("mxfp4")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with safe_open(next(folder.glob("*.safetensors")), "pt") as f:
        names = set(f.keys())
    assert any(name.endswith("gate_up_proj_blocks") for name in names) or len(list(folder.glob("*.safetensors"))) > 1
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (32, 64, 128)
    assert model.model.layers[0].mlp.experts.gate_up_proj.abs().sum() > 0


METHOD = {
    "fp8_dense": "fp8",
    "fp8_dense_skip": "fp8",
    "fp8_moe": "fp8",
    "mxfp4": "mxfp4",
    "ct_w4a16": "compressed-tensors",
}


@pytest.mark.parametrize("kind", list(METHOD))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_streams_identical_to_transformers_own_load(quantized, kind, dtype):
    folder = quantized(kind)
    # compressed-tensors: transformers' dequantize=True load, the one that can stream (its default decompresses the
    # whole model at the first forward, and in bf16 its own two modes differ from each other by ~1e-2)
    extra = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if kind == "ct_w4a16" else {}
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
    streamed = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="stream")
    engine = streamed._hf_weightstream
    engine.pool.budget = max(engine.minimum_budget(), int(engine.model_bytes * 0.45))
    expected, got = workload(reference), workload(streamed)
    assert_same_outputs(expected, got, kind)
    assert_units_match_plain_load(streamed, reference)
    stats = hf_weightstream.stats(streamed)
    assert stats["quantization"] == {"method": METHOD[kind], "resident_form": "dequantized at load"}
    assert stats["peak_resident_bytes"] <= stats["budget_bytes"] and stats["evictions"] > 0
    # the config says what a plain dequantizing load's says (it drops quantization_config)
    assert hasattr(streamed.config, "quantization_config") == hasattr(reference.config, "quantization_config")


def test_reads_the_quantized_bytes(quantized, checkpoints):
    """FP8 costs about half of bf16 per streamed byte: the e4m3 weights and their scales are what is read."""
    fp8 = AutoModelForCausalLM.from_pretrained(quantized("fp8_dense"), dtype=torch.bfloat16, device_map="stream")
    bf16 = AutoModelForCausalLM.from_pretrained(
        checkpoints("qwen3_dense_fp8_shapes"), dtype=torch.bfloat16, device_map="stream"
    )
    fp8_stats, bf16_stats = hf_weightstream.stats(fp8), hf_weightstream.stats(bf16)
    assert fp8_stats["model_bytes"] == bf16_stats["model_bytes"]  # the same resident bf16 weights
    # the fp32 fixture's linears are 4 bytes a value; as FP8 they are 1 byte and a scale per 16384 values
    linear = sum(
        e.nbytes for k, e in fp8._hf_weightstream.checkpoint.index.entries.items() if k.endswith("_proj.weight")
    )
    assert fp8_stats["checkpoint_bytes"] < bf16_stats["checkpoint_bytes"] - 3 * linear * 0.99
    for model in (fp8, bf16):
        hf_weightstream.reset_stats(model)
        with torch.no_grad():
            model(PROMPT)
    assert hf_weightstream.stats(fp8)["bytes_read"] < 0.55 * hf_weightstream.stats(bf16)["bytes_read"]


def test_budget_charges_raw_dequantized_and_working_bytes_while_loading(quantized):
    streamed = AutoModelForCausalLM.from_pretrained(quantized("fp8_dense"), dtype=torch.bfloat16, device_map="stream")
    block = next(u for u in streamed._hf_weightstream.units if u.name == "model.layers.0")
    # ... and the float32 working copies of its largest dequantized tensor (transformers' dequantizer)
    largest = max(spec.shape[0] * spec.shape[1] for spec in block.specs if spec.name.endswith("proj.weight"))
    assert block.charge_bytes == block.raw_bytes + block.resident_bytes + 2 * 4 * largest
    assert block.raw_bytes < block.resident_bytes  # 1-byte weights read, 2-byte weights resident


def test_weights_an_fp8_checkpoint_stores_unquantized_read_as_a_plain_load(quantized):
    """Embeddings, norms and the head are bf16 in an FP8 checkpoint: read as views, the embedding row by row."""
    streamed = AutoModelForCausalLM.from_pretrained(quantized("fp8_dense"), dtype=torch.float32, device_map="stream")
    units = {u.name: u for u in streamed._hf_weightstream.units}
    assert units["model.embed_tokens"].gather and not units["model.embed_tokens"].groups
    assert not units["model.norm"].groups and not units["lm_head"].groups
    assert all(len(units[f"model.layers.{i}"].groups) == 7 for i in range(2))  # q k v o gate up down: dequantized


def _copy(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / folder.name)


def _edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(changes)
    path.write_text(json.dumps(config))


def test_unknown_quant_method_is_refused_naming_the_formats_that_stream(quantized, tmp_path):
    folder = _copy(quantized("fp8_dense"), tmp_path)
    _edit_config(folder, quant_method="bogus4")
    with pytest.raises(CheckpointError, match=r"quant_method='bogus4'.*Formats that stream: 'fp8'.*'mxfp4'.*'compr"):
        AutoModelForCausalLM.from_pretrained(folder, device_map="stream")


def test_a_format_that_does_not_stream_is_refused(quantized, tmp_path):
    folder = _copy(quantized("fp8_dense"), tmp_path)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    path.write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"quant_method='gptq' \(quantization_config in its config.json\), which streaming does not read",
    ):
        AutoModelForCausalLM.from_pretrained(folder, device_map="stream")


def _rewrite_shard_without(folder, key):
    from safetensors.torch import load_file, save_file

    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        if key in tensors:
            del tensors[key]
            save_file(tensors, shard, metadata={"format": "pt"})
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            del index["weight_map"][key]
            (folder / "model.safetensors.index.json").write_text(json.dumps(index))
            return
    raise KeyError(key)


def test_missing_scale_names_the_tensor(quantized, tmp_path):
    folder = _copy(quantized("fp8_dense"), tmp_path)
    _rewrite_shard_without(folder, "model.layers.1.self_attn.k_proj.weight_scale_inv")
    with pytest.raises(CheckpointError, match=r"FP8 tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' has no scale"):
        AutoModelForCausalLM.from_pretrained(folder, device_map="stream")


def test_scale_grid_that_disagrees_with_the_block_size_names_the_tensor(quantized, tmp_path):
    folder = _copy(quantized("fp8_dense"), tmp_path)
    _edit_config(folder, weight_block_size=[64, 64])
    with pytest.raises(CheckpointError, match=r"needs a \[\d+, \d+\] grid.*quantization_config disagree"):
        AutoModelForCausalLM.from_pretrained(folder, device_map="stream")


def test_missing_mxfp4_scales_name_the_tensor(quantized, tmp_path):
    folder = _copy(quantized("mxfp4"), tmp_path)
    _rewrite_shard_without(folder, "model.layers.0.mlp.experts.down_proj_scales")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.experts\.down_proj_blocks' has no"):
        AutoModelForCausalLM.from_pretrained(folder, device_map="stream")


def test_quantizing_at_load_is_refused_naming_the_formats_that_stream(checkpoints):
    with pytest.raises(
        StreamConfigError, match="cannot stream. Streaming reads checkpoints that are already quantized"
    ):
        AutoModelForCausalLM.from_pretrained(
            checkpoints("llama"), device_map="stream", quantization_config=BitsAndBytesConfig(load_in_8bit=True)
        )


def test_a_users_config_for_a_prequantized_checkpoint_is_merged_as_transformers_does(quantized):
    folder = quantized("fp8_dense")
    config = FineGrainedFP8Config(dequantize=True)
    reference = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    streamed = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", quantization_config=config)
    with torch.no_grad():
        assert torch.equal(reference(PROMPT).logits, streamed(PROMPT).logits)
