"""Libraries people put on top of a transformers model, on a streamed one (peft here; a parent module's ``.to()``,
as sentence-transformers calls it, is in test_model_behaviour): outputs bit for bit those of the same library on a
plain load, under the budget, with the streaming hooks still in place."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import hf_weightstream
from hf_weightstream.hooks import StreamHook

PROMPT = torch.tensor([[1, 7, 8, 9, 10, 11, 12]])
BUDGET = {"cpu": "400KB"}  # below the tiny Llama's 658 KB


@pytest.fixture(scope="module")
def lora(tmp_path_factory, checkpoints):
    """A LoRA adapter of the tiny Llama with random, non-zero weights: (base folder, adapter folder)."""
    peft = pytest.importorskip("peft")
    base = checkpoints("llama")
    folder = tmp_path_factory.mktemp("lora")
    torch.manual_seed(1)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), config).save_pretrained(folder)
    return base, folder


@pytest.mark.parametrize("cls", [AutoModelForCausalLM, LlamaForCausalLM])
def test_from_pretrained_of_an_adapter_folder_streams_its_base_with_the_adapter(lora, cls):
    """transformers loads the base model an adapter folder names, then the adapter. Streamed, the adapter was
    dropped (the auto classes) and the base model's outputs came back as the adapted model's."""
    base, adapter = lora
    plain = cls.from_pretrained(adapter)
    with torch.no_grad():
        expected = plain(PROMPT).logits
        assert not torch.equal(expected, cls.from_pretrained(base)(PROMPT).logits), "the adapter changes outputs"
    model = cls.from_pretrained(adapter, device_map="stream", max_memory=BUDGET)
    assert list(model.peft_config) == ["default"]
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, expected)
    expected_tokens = plain.generate(PROMPT, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(PROMPT, max_new_tokens=5, do_sample=False), expected_tokens)
    stats = hf_weightstream.stats(model)
    assert stats["peak_resident_bytes"] <= stats["budget_bytes"] < stats["model_bytes"]


def _reference(base, adapter):
    from peft import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(PROMPT).logits, model.generate(input_ids=PROMPT, max_new_tokens=5, do_sample=False)


def _assert_streamed_under_budget(model):
    assert any(isinstance(getattr(m, "_hf_hook", None), StreamHook) for m in model.modules()), "hooks removed"
    stats = hf_weightstream.stats(model)
    assert stats["misses"] + stats["hits"] > 0 and stats["peak_resident_bytes"] <= stats["budget_bytes"]


def test_peft_model_from_pretrained_on_a_streamed_base(lora):
    """peft took the streamed model's hf_device_map {"": "cpu"} for accelerate's CPU offload: it removed every
    accelerate hook (the streaming hooks) and dispatched the model again, which raised a TypeError."""
    from peft import PeftModel

    base, adapter = lora
    logits, tokens = _reference(base, adapter)
    streamed = AutoModelForCausalLM.from_pretrained(base, device_map="stream", max_memory=BUDGET)
    model = PeftModel.from_pretrained(streamed, adapter)
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, logits)
    assert torch.equal(model.generate(input_ids=PROMPT, max_new_tokens=5, do_sample=False), tokens)
    _assert_streamed_under_budget(streamed)


def test_auto_peft_model_streams_its_base(lora):
    """AutoPeftModelForCausalLM hands device_map and max_memory to the adapter's load too, where peft dispatched
    the model again and asked for an offload_dir."""
    from peft import AutoPeftModelForCausalLM

    base, adapter = lora
    logits, _ = _reference(base, adapter)
    model = AutoPeftModelForCausalLM.from_pretrained(adapter, device_map="stream", max_memory=BUDGET)
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, logits)
    _assert_streamed_under_budget(model.get_base_model())
