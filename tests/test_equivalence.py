"""No silent differences: each tensor a streamed model installs is the plain load's, and known traps stay fixed."""

from __future__ import annotations

import warnings

import pytest
import torch
from equivalence import assert_units_match_plain_load
from tiny import auto_class

import hf_weightstream
from hf_weightstream import StreamConfig, StreamingRuntimeError

PROMPT = torch.tensor([[1, 7, 8, 9, 10, 11, 12]])
FIXTURES = ["llama", "llama_tied", "qwen2_tied", "gpt2", "qwen3_moe", "qwen3_moe128", "mamba", "falcon_mamba", "bert"]


def _pair(folder, kind, stream_config=None, **kwargs):
    cls = auto_class(kind)
    reference = cls.from_pretrained(folder, **kwargs)
    return reference, cls.from_pretrained(folder, device_map="stream", stream_config=stream_config, **kwargs)


@pytest.mark.parametrize("kind", FIXTURES)
def test_every_unit_matches_the_plain_load(checkpoints, kind):
    reference, streamed = _pair(checkpoints(kind), kind)
    checked = assert_units_match_plain_load(streamed, reference)
    assert checked == len(reference.state_dict())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_unit_matches_the_plain_load_after_a_dtype_cast(checkpoints, dtype):
    reference, streamed = _pair(checkpoints("qwen3_moe128"), "qwen3_moe128", dtype=dtype)
    assert_units_match_plain_load(streamed, reference)


def test_guard_catches_a_permuted_expert(checkpoints):
    """The guard itself must fail on the very bug it exists for (experts stacked in string order)."""
    reference, streamed = _pair(checkpoints("qwen3_moe128"), "qwen3_moe128")
    experts = reference.model.layers[0].mlp.experts
    with torch.no_grad():
        experts.gate_up_proj[[2, 10]] = experts.gate_up_proj[[10, 2]].clone()
    with pytest.raises(AssertionError, match=r"layers\.0\.mlp\.experts\.gate_up_proj: values differ"):
        assert_units_match_plain_load(streamed, reference)


@pytest.mark.parametrize("kind", ["qwen3_moe128", "mamba", "falcon_mamba"])
def test_outputs_identical_under_a_small_budget(checkpoints, kind):
    """128 experts (ids past 10 and 100); Mamba's kernels that depend on ``requires_grad``."""
    folder = checkpoints(kind)
    reference, streamed = _pair(folder, kind, stream_config=StreamConfig(policy="lru"))
    engine = streamed._hf_weightstream
    engine.pool.budget = max(engine.minimum_budget(), int(engine.model_bytes * 0.4))
    with torch.no_grad():
        assert torch.equal(reference(PROMPT).logits, streamed(PROMPT).logits)
    expected = reference.generate(PROMPT, max_new_tokens=6, do_sample=False)
    assert torch.equal(expected, streamed.generate(PROMPT, max_new_tokens=6, do_sample=False))
    assert hf_weightstream.stats(streamed)["evictions"] > 0


def test_forward_with_gradients_enabled_runs_as_inference_and_says_so(checkpoints):
    reference, streamed = _pair(checkpoints("llama"), "llama")
    with pytest.warns(UserWarning, match="streamed models are for inference"):
        out = streamed(PROMPT).logits
    assert torch.is_grad_enabled(), "the caller's grad mode is restored after the forward"
    assert out.grad_fn is not None and not out.grad_fn.next_functions[0][0].next_functions, (
        "no autograd graph holds streamed weights past their eviction: only the marker that explains backward"
    )
    assert torch.equal(out, reference(PROMPT).logits.detach())
    with pytest.raises(StreamingRuntimeError, match="backward.. through a streamed model is not possible"):
        torch.nn.functional.cross_entropy(out[0], PROMPT[0]).backward()
    hidden = streamed(PROMPT, output_hidden_states=True).hidden_states  # nested outputs too, not torch's "does not
    with pytest.raises(StreamingRuntimeError, match="backward.. through a streamed model is not possible"):
        hidden[-1].sum().backward()  # require grad"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per model, not every forward
        streamed(PROMPT)
