"""A streamed model gives bit-for-bit the outputs of a normal ``from_pretrained`` load, whatever the budget."""

from __future__ import annotations

import pytest
import tiny
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, BertConfig, BertForMaskedLM, pipeline

import hf_weightstream
from hf_weightstream import StreamConfig

DECODERS = ["llama", "llama_tied", "qwen2_tied", "gpt2", "qwen3_moe"]
PROMPT = torch.tensor([[1, 7, 8, 9, 10, 11, 12]])


def _load_pair(folder, budget_fraction: float = 0.4, **config):
    ref = AutoModelForCausalLM.from_pretrained(folder)
    streamed = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", stream_config=StreamConfig(**config))
    engine = streamed._hf_weightstream
    total = sum(u.resident_bytes for u in engine.units)
    engine.pool.budget = max(int(total * budget_fraction), engine.minimum_budget())
    assert engine.pool.budget < total
    return ref, streamed


@pytest.mark.parametrize("kind", DECODERS)
def test_greedy_and_logits_identical(checkpoints, kind):
    ref, streamed = _load_pair(checkpoints(kind))
    with torch.no_grad():
        assert torch.equal(ref(PROMPT).logits, streamed(PROMPT).logits)
    expected = ref.generate(PROMPT, max_new_tokens=8, do_sample=False)
    got = streamed.generate(PROMPT, max_new_tokens=8, do_sample=False)
    assert torch.equal(expected, got)
    stats = hf_weightstream.stats(streamed)
    assert stats["peak_resident_bytes"] <= stats["budget_bytes"]
    assert stats["evictions"] > 0, "the budget is below the model size, so units must have been evicted"


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_seeded_sampling_identical(checkpoints, kind):
    ref, streamed = _load_pair(checkpoints(kind))
    torch.manual_seed(123)
    expected = ref.generate(PROMPT, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(123)
    got = streamed.generate(PROMPT, max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9)
    assert torch.equal(expected, got)


@pytest.mark.parametrize("kind", ["llama_tied", "qwen3_moe"])
def test_beam_search_identical(checkpoints, kind):
    ref, streamed = _load_pair(checkpoints(kind))
    expected = ref.generate(PROMPT, max_new_tokens=6, num_beams=3, do_sample=False)
    got = streamed.generate(PROMPT, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(expected, got)


def test_batched_left_padded_identical(checkpoints):
    folder = checkpoints("llama")
    tok = AutoTokenizer.from_pretrained(folder)
    batch = tok(["the cat sat on the mat", "a dog ran"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0, "left padding expected"
    ref, streamed = _load_pair(folder)
    expected = ref.generate(**batch, max_new_tokens=6, do_sample=False)
    got = streamed.generate(**batch.to(streamed.device), max_new_tokens=6, do_sample=False)
    assert torch.equal(expected, got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, "auto"])
def test_dtypes_follow_transformers(checkpoints, dtype):
    folder = checkpoints("llama")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    streamed = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", dtype=dtype)
    assert streamed.dtype == ref.dtype
    for (name, a), (_, b) in zip(ref.named_buffers(), streamed.named_buffers(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(ref(PROMPT).logits, streamed(PROMPT).logits)


def test_text_generation_pipeline(checkpoints):
    folder = checkpoints("llama_tied")
    expected = pipeline("text-generation", model=str(folder))("the cat sat", max_new_tokens=5, do_sample=False)
    pipe = pipeline("text-generation", model=str(folder), device_map="stream")
    assert hasattr(pipe.model, "_hf_weightstream")
    assert pipe("the cat sat", max_new_tokens=5, do_sample=False) == expected
    # A pipeline's own keyword arguments go to the pipeline: streaming options go in model_kwargs, as documented.
    pipe = pipeline("text-generation", model=str(folder), model_kwargs={"stream_config": {"budget": "300KB"}})
    assert hf_weightstream.stats(pipe.model)["budget_bytes"] == 300_000
    assert pipe("the cat sat", max_new_tokens=5, do_sample=False) == expected


def test_feature_extraction_pipeline_encoder(checkpoints):
    folder = checkpoints("bert")
    expected = pipeline("feature-extraction", model=str(folder))("the big red tree")
    pipe = pipeline("feature-extraction", model=str(folder), device_map="stream")
    assert pipe("the big red tree") == expected
    ref = AutoModel.from_pretrained(folder)
    streamed = AutoModel.from_pretrained(folder, streaming=True)
    with torch.no_grad():
        assert torch.equal(ref(PROMPT).pooler_output, streamed(PROMPT).pooler_output)


def _bert_mlm(folder):
    """A masked-LM checkpoint, which has no pooler: BertModel (what feature extraction loads) lacks two weights."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=tiny.VOCAB)  # fmt: skip
    BertForMaskedLM(config).save_pretrained(folder, max_shard_size="40KB")
    tiny.tokenizer().save_pretrained(folder)
    return folder


def test_a_pipeline_loads_the_class_a_plain_pipeline_loads_when_weights_are_missing(tmp_path):
    """A streamed load refused weights the checkpoint lacks, and pipelines try the next class on an error: a
    feature-extraction pipeline silently became the masked-LM model and returned vocabulary logits as features.
    Missing weights are now initialized as transformers initializes them, with its load report."""
    folder = _bert_mlm(tmp_path / "mlm")
    expected = pipeline("feature-extraction", model=str(folder))
    pipe = pipeline("feature-extraction", model=str(folder), device_map="stream")
    assert type(pipe.model) is type(expected.model) and type(pipe.model).__name__ == "BertModel"
    text = "the big red tree"
    assert torch.equal(pipe(text, return_tensors=True), expected(text, return_tensors=True))
    _, plain_info = AutoModel.from_pretrained(folder, output_loading_info=True)
    _, info = AutoModel.from_pretrained(folder, device_map="stream", output_loading_info=True)
    assert info == plain_info and info["missing_keys"] == {"pooler.dense.weight", "pooler.dense.bias"}


def test_missing_weights_are_initialized_as_a_normal_load_initializes_them(tmp_path, caplog):
    folder = _bert_mlm(tmp_path / "mlm")
    torch.manual_seed(1)
    ref = AutoModel.from_pretrained(folder)
    torch.manual_seed(1)
    with caplog.at_level("WARNING", logger="transformers.modeling_utils"):
        streamed = AutoModel.from_pretrained(folder, device_map="stream", max_memory={"cpu": "300KB"})
    assert "MISSING" in caplog.text and "pooler.dense.weight" in caplog.text, "transformers' load report"
    assert torch.equal(streamed.pooler.dense.weight, ref.pooler.dense.weight), "same init, same random draws"
    with torch.no_grad():
        for _ in range(2):
            out, expected = streamed(PROMPT), ref(PROMPT)
            assert torch.equal(out.last_hidden_state, expected.last_hidden_state)
            assert torch.equal(out.pooler_output, expected.pooler_output)
    assert hf_weightstream.stats(streamed)["evictions"] > 0
