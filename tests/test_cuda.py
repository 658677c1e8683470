"""The CUDA path on a real GPU: identical outputs, pinned staging, weights within the budget.

Skipped without CUDA; run on a lent GPU machine by scripts/gpu_check.sh.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_weightstream
from hf_weightstream import StreamConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen3_moe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_identical_to_resident_model_on_gpu(checkpoints, kind, dtype):
    folder = checkpoints(kind)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to("cuda")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="stream")
    engine = model._hf_weightstream
    total = sum(u.resident_bytes for u in engine.units)
    engine.pool.budget = max(total // 2, engine.minimum_budget())
    assert model.device.type == "cuda"
    prompt = torch.randint(3, 120, (1, 100), device="cuda")
    with torch.no_grad():
        assert torch.equal(ref(prompt).logits, model(prompt).logits)  # long prefill
    expected = ref.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), expected)
    assert all(b.is_pinned() for bufs in engine._staging.values() for b in bufs)
    assert hf_weightstream.stats(model)["peak_resident_bytes"] <= engine.pool.budget


def test_gpu_memory_for_weights_stays_within_budget(checkpoints):
    folder = checkpoints("llama")
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map="stream", stream_config=StreamConfig(budget="300KB")
    )
    prompt = torch.randint(3, 120, (1, 16), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        model(prompt)
    peak = torch.cuda.max_memory_allocated() - base
    activations = 4 * 16 * 128 * 64 * 8  # generous bound for this tiny model's activations and logits
    assert peak <= 300_000 + activations


def test_routed_experts_on_gpu_identical_to_a_resident_load(tmp_path):
    """MoE experts read per expert and stacked on the GPU, as on the CPU."""
    from moe_zoo import save

    folder = save("qwen3_moe", tmp_path / "moe")
    dtype = torch.bfloat16
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to("cuda")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="stream")
    engine = model._hf_weightstream
    engine.pool.budget = engine.minimum_budget()
    prompt = torch.randint(3, 120, (2, 24), device="cuda")
    with torch.no_grad():
        assert torch.equal(ref(prompt).logits, model(prompt).logits)
    expected = ref.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False), expected)
    assert hf_weightstream.stats(model)["expert_layers"] == 2


def test_fp8_on_gpu_identical_to_transformers_own_load(checkpoints, tmp_path):
    """Where transformers has FP8 kernels (compute capability >= 8.9) the weights stay resident in FP8."""
    import shutil

    from hf_weightstream.testing.checkpoints import to_fp8

    folder = to_fp8(shutil.copytree(checkpoints("qwen3_dense_fp8_shapes"), tmp_path / "fp8"))
    # transformers 5.25 kernelizes a CUDA load by default (Liger's RMSNorm from the Hub); a streamed model runs
    # transformers' own layers, which is what a load without kernels runs.
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda", use_kernels=False)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="stream")
    prompt = torch.randint(3, 120, (1, 16), device="cuda")
    with torch.no_grad():
        assert torch.equal(ref(prompt).logits, model(prompt).logits)
    kept_fp8 = torch.cuda.get_device_capability() >= (8, 9)
    expected_form = "quantized" if kept_fp8 else "dequantized at load"
    assert hf_weightstream.stats(model)["quantization"]["resident_form"] == expected_form
