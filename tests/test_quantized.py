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
from hf_weightstream import CheckpointError, StreamConfigError, StreamingRuntimeError
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


def _fp8_qwen3(folder, **shape):
    """A one-layer dense Qwen3 (2 heads, 1 key/value head) of the given sizes, in fine-grained FP8."""
    torch.manual_seed(0)
    tiny_builders["qwen3_dense_fp8_shapes"](layers=1, heads=2, kv_heads=1, **shape).save_pretrained(folder)
    return to_fp8(folder)


def _fp8_with_partial_blocks(folder):
    """Dense Qwen3 whose MLP weights are 576 x 200 / 200 x 576: partial 128 x 128 blocks, ceil-divided scale grids
    (DeepSeek-V3's kv_a_proj_with_mqa is 576 rows)."""
    return _fp8_qwen3(folder, hidden=200, intermediate=576, head_dim=128)


def test_fp8_partial_blocks_are_refused_at_load_naming_the_tensor(tmp_path):
    """transformers' CPU dequantizer cannot dequantize a partial last block (it raises, or uses a wrong block): the
    streamed load says so before anything is read, naming the weight."""
    folder = _fp8_with_partial_blocks(tmp_path / "partial")
    with pytest.raises(CheckpointError, match=r"FP8 weight 'model\.layers\.0\.mlp\.\w+_proj\.weight' .* partial"):
        AutoModelForCausalLM.from_pretrained(folder, device_map="stream")


def test_a_conversion_transformers_refuses_says_why(tmp_path):
    """Without a block size in the config the grid is not checked from the headers; transformers' dequantizer then
    refuses the weight when it is read, and the error says what it said (not an empty message)."""
    folder = _fp8_with_partial_blocks(tmp_path / "partial")
    _edit_config(folder, weight_block_size=None)
    streamed = AutoModelForCausalLM.from_pretrained(folder, device_map="stream")
    with pytest.raises(StreamingRuntimeError, match=r"not divisible by scale grid \(5, 2\)"), torch.no_grad():
        streamed(PROMPT)


def test_fp8_scales_transformers_would_ignore_are_refused(quantized, tmp_path):
    """Fused FP8 experts (``experts.gate_up_proj`` [E, 2I, H] e4m3 with ``gate_up_proj_scale_inv``): no converter of
    transformers' dequantizing load reads those scales, so a plain load casts the raw e4m3 values and reports the
    scales as unexpected. Streaming refuses instead of computing the same wrong outputs."""
    from safetensors.torch import load_file

    from hf_weightstream.testing.checkpoints import quantize_fp8_blockwise, write_shards

    folder = _copy(quantized("fp8_moe"), tmp_path)
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
        shard.unlink()
    experts = sorted({int(k.split(".")[5]) for k in tensors if ".mlp.experts." in k})
    for layer in sorted({int(k.split(".")[2]) for k in tensors if ".mlp.experts." in k}):
        prefix = f"model.layers.{layer}.mlp.experts"

        for name, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
            stacked = []
            for e in experts:
                dense = []
                for part in parts:
                    q = tensors.pop(f"{prefix}.{e}.{part}.weight").float()
                    s = tensors.pop(f"{prefix}.{e}.{part}.weight_scale_inv")
                    dense.append(q * s.repeat_interleave(128, 0).repeat_interleave(128, 1))  # whole 128 x 128 blocks
                stacked.append(torch.cat(dense))
            pairs = [quantize_fp8_blockwise(w) for w in stacked]
            tensors[f"{prefix}.{name}"] = torch.stack([q for q, _ in pairs])
            tensors[f"{prefix}.{name}_scale_inv"] = torch.stack([s for _, s in pairs])
    write_shards(folder, tensors, 2_000_000)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # loads, scales unused
    raw = tensors["model.layers.0.mlp.experts.down_proj"].float()
    assert torch.equal(reference.model.layers[0].mlp.experts.down_proj, raw)
    with pytest.raises(CheckpointError, match=r"scale 'model\.layers\.\d\.mlp\.experts\.\w+_scale_inv' of FP8 weight"):
        AutoModelForCausalLM.from_pretrained(folder, device_map="stream")


def test_fp8_with_ue8m0_scales_streams_identical(quantized, tmp_path):
    """DeepSeek-V4-style FP8 (scale_fmt "ue8m0"): the block scales are 1-byte float8_e8m0fnu powers of two
    (safetensors F8_E8M0), which transformers loads; streaming reads them too and computes the same."""
    from safetensors.torch import load_file, save_file

    folder = _copy(quantized("fp8_dense"), tmp_path)
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        for key in [k for k in tensors if k.endswith("_scale_inv")]:
            tensors[key] = torch.exp2(torch.ceil(torch.log2(tensors[key]))).to(torch.float8_e8m0fnu)
        save_file(tensors, shard, metadata={"format": "pt"})
    _edit_config(folder, scale_fmt="ue8m0")
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    streamed = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="stream")
    with torch.no_grad():
        assert torch.equal(reference(PROMPT).logits, streamed(PROMPT).logits)


def test_fp8_weights_smaller_than_a_block_stream_as_transformers_loads_them(tmp_path):
    """A dimension smaller than one block (hidden 64 with 128 x 128 blocks: a scale grid of 1 there) is one whole
    block to transformers' CPU dequantizer, which computes it exactly: it streams, it is not refused as partial."""
    # up/gate [256, 64]: a 2 x 1 grid; down [64, 256]: 1 x 2
    folder = _fp8_qwen3(tmp_path / "small", hidden=64, intermediate=256, head_dim=32)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    streamed = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(reference(PROMPT).logits, streamed(PROMPT).logits)
