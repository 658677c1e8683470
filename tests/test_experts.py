"""MoE layers read only the experts the router picks, and compute bit for bit what a plain load computes."""

from __future__ import annotations

import re

import pytest
import torch
from equivalence import assert_units_match_plain_load
from moe_zoo import EXPERTS, FAMILIES, TOP_K, max_routed, save
from tiny import llama4_text_config
from transformers import AutoModelForCausalLM, Llama4ForCausalLM
from workloads import BATCH, MASK, PROMPT, assert_same_outputs, workload

import hf_weightstream
from hf_weightstream import BudgetError, StreamConfig, StreamingRuntimeError
from hf_weightstream.experts import renumber, survey
from hf_weightstream.placeholders import is_placeholder


@pytest.fixture(scope="session")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    made = {}

    def get(family):
        if family not in made:
            made[family] = save(family, root / family)
        return made[family]

    return get


def _streamed_under_small_budget(folder, reference, **kwargs):
    """Streamed with a budget just large enough for the busiest experts call, and below one layer's experts."""
    streamed = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", **kwargs)
    engine = streamed._hf_weightstream
    routed = max_routed(reference, lambda: workload(reference))
    engine.pool.budget = max(engine.experts_call_bytes(layer, routed) for layer in engine.expert_layers)
    one_layer = sum(u.resident_bytes for u in engine.expert_layers[0].units)
    assert routed < EXPERTS and engine.pool.budget < one_layer, "the budget must be smaller than one layer's experts"
    return streamed


FAST = [(family, "grouped_mm", torch.float32) for family in FAMILIES] + [
    ("qwen3_moe", "eager", torch.bfloat16),
    ("gpt_oss", "batched_mm", torch.bfloat16),
    ("deepseek_v3", "eager", torch.float32),
]
FULL = [
    (family, impl, dtype)
    for family in FAMILIES
    for impl in ("eager", "batched_mm", "grouped_mm")
    for dtype in (torch.float32, torch.bfloat16)
    if (family, impl, dtype) not in FAST
]


def _check_family(moe, family, impl, dtype):
    folder = moe(family)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, experts_implementation=impl)
    streamed = _streamed_under_small_budget(folder, reference, dtype=dtype, experts_implementation=impl)
    expected, got = workload(reference), workload(streamed)
    assert_same_outputs(expected, got, f"{family} {impl} {dtype}")
    engine = streamed._hf_weightstream
    stats = hf_weightstream.stats(streamed)
    assert stats["expert_layers"] == 2 and len(engine.expert_layers[0].units) == EXPERTS
    assert stats["peak_resident_bytes"] <= stats["budget_bytes"]
    assert stats["expert_misses"] > 0 and stats["evictions"] > 0
    assert_units_match_plain_load(streamed, reference)


@pytest.mark.parametrize(("family", "impl", "dtype"), FAST, ids=lambda v: str(v).removeprefix("torch."))
def test_routed_experts_identical(moe, family, impl, dtype):
    _check_family(moe, family, impl, dtype)


@pytest.mark.slow
@pytest.mark.parametrize(("family", "impl", "dtype"), FULL, ids=lambda v: str(v).removeprefix("torch."))
def test_routed_experts_identical_every_implementation(moe, family, impl, dtype):
    _check_family(moe, family, impl, dtype)


def test_blocks_no_longer_carry_experts(moe):
    streamed = AutoModelForCausalLM.from_pretrained(moe("qwen3_moe"), device_map="stream")
    engine = streamed._hf_weightstream
    block = next(u for u in engine.units if u.name == "model.layers.0")
    assert not any("experts" in spec.name for spec in block.specs)
    expert = engine.expert_layers[0].units[100]
    assert expert.name == "model.layers.0.mlp.experts[100]"
    # gate+up+down of one expert, run through transformers' converter for that expert alone: no byte of another
    assert {s.shape for s in expert.specs} == {(1, 32, 32), (1, 32, 16)}
    assert expert.raw_bytes == sum(r.length for r in expert.ranges) == 3 * 16 * 32 * 4


def test_fused_checkpoint_experts_are_dim0_slices(moe):
    """gpt-oss ships [E, ...] tensors: one expert is a contiguous slice of each, biases included."""
    streamed = AutoModelForCausalLM.from_pretrained(moe("gpt_oss"), device_map="stream")
    layer = streamed._hf_weightstream.expert_layers[0]
    assert sorted(layer.params) == ["down_proj", "down_proj_bias", "gate_up_proj", "gate_up_proj_bias"]
    unit = layer.units[7]
    entry = next(e for e in unit.entries.values() if e.key.startswith("model.layers.0.mlp.experts.gate_up_proj#"))
    assert entry.shape[0] == 1 and entry.nbytes * EXPERTS == 32 * 32 * 4 * EXPERTS


def test_decode_reads_only_the_routed_experts(moe):
    folder = moe("qwen3_moe")
    reference = AutoModelForCausalLM.from_pretrained(folder)
    streamed = _streamed_under_small_budget(folder, reference)
    engine = streamed._hf_weightstream
    streamed.generate(PROMPT, max_new_tokens=2, do_sample=False)  # prefill and the schedule
    hf_weightstream.reset_stats(streamed)
    tokens = 6
    streamed.generate(PROMPT, max_new_tokens=tokens, do_sample=False)
    stats = hf_weightstream.stats(streamed)
    expert_bytes = engine.expert_layers[0].expert_bytes
    dense_bytes = sum(u.resident_bytes for u in engine.units if u.expert is None)
    per_token = stats["bytes_read"] / (tokens + 1)  # +1: this generate's prefill of the 7-token prompt
    all_experts = 2 * EXPERTS * expert_bytes
    assert per_token < 0.25 * all_experts, "a decode step must not read whole layers of experts"
    # what the routed experts that were not cached cost, plus the dense units, bounds what was read
    routed_misses = stats["expert_misses"] + stats["expert_late_prefetches"]
    assert stats["bytes_read"] <= 1.25 * (
        (tokens + 1) * dense_bytes + (routed_misses + stats["expert_prefetches"]) * expert_bytes
    )


def test_sentinel_ids_stay_above_the_compact_range():
    used = torch.tensor([3, 10, 100])
    ids = torch.tensor([[100, 3], [128, 10], [129, 3]])  # 128, 129: expert-parallel / identity sentinels
    assert renumber(ids, used, 128).tolist() == [[2, 0], [3, 1], [4, 0]]


def test_experts_are_restored_when_a_forward_raises(moe):
    folder = moe("qwen3_moe")
    reference = AutoModelForCausalLM.from_pretrained(folder)
    streamed = AutoModelForCausalLM.from_pretrained(folder, device_map="stream")
    engine = streamed._hf_weightstream
    experts = engine.expert_layers[1].module
    original = experts._old_forward

    def boom(*args, **kwargs):
        raise RuntimeError("boom inside the experts")

    experts._old_forward = boom
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        streamed(PROMPT)
    experts._old_forward = original
    assert experts.num_experts == EXPERTS and is_placeholder(experts.gate_up_proj)
    assert experts.gate_up_proj.shape[0] == EXPERTS
    assert all(layer.stack.held_bytes == 0 for layer in engine.expert_layers)
    assert all(unit.pins == 0 for unit in engine.units)
    with torch.no_grad():
        assert torch.equal(reference(PROMPT).logits, streamed(PROMPT).logits)


def test_budget_too_small_for_a_call_names_the_layer_and_the_fix(moe):
    folder = moe("qwen3_moe")
    streamed = AutoModelForCausalLM.from_pretrained(folder, device_map="stream")
    engine = streamed._hf_weightstream
    engine.pool.budget = engine.experts_call_bytes(engine.expert_layers[0], 2 * TOP_K)
    routed = r"model\.layers\.0\.mlp\.experts' is routed to \d+ of its 128 experts"
    with pytest.raises(BudgetError, match=routed), torch.no_grad():
        streamed(BATCH, attention_mask=MASK)
    engine.pool.budget = engine.minimum_budget()
    with torch.no_grad():
        streamed(BATCH, attention_mask=MASK)  # the same model works once the budget is raised


def test_budget_below_one_decode_step_is_refused_at_load(moe):
    with pytest.raises(BudgetError, match="cannot run one decode step"):
        AutoModelForCausalLM.from_pretrained(
            moe("qwen3_moe"), device_map="stream", stream_config=StreamConfig(budget=30_000)
        )


def test_the_budget_a_too_small_one_is_told_to_use_runs_the_model(moe):
    """Below the largest unit, the error named that unit's size, and a load with it was refused again, with a
    budget four times larger (the experts of a decode step and the routers' copies): the first error now names the
    budget every forward fits in."""
    folder = moe("qwen3_moe")
    with pytest.raises(BudgetError, match="is smaller than unit") as refused:
        AutoModelForCausalLM.from_pretrained(folder, device_map="stream", stream_config=StreamConfig(budget=1_000))
    told = int(re.search(r"at least ([\d,]+) bytes", str(refused.value)).group(1).replace(",", ""))
    config = StreamConfig(budget=told)
    streamed = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", stream_config=config)
    with torch.no_grad():
        streamed(BATCH, attention_mask=MASK)  # a prompt routed to every expert


def _skewed(moe, tmp_path):
    """qwen3_moe whose routers favour a few experts (real routers are skewed: a few experts take most tokens)."""
    model = AutoModelForCausalLM.from_pretrained(moe("qwen3_moe"))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight[:12] *= 3.0
    model.save_pretrained(tmp_path / "skewed", max_shard_size="200KB")
    return tmp_path / "skewed"


def test_frequency_aware_cache_beats_lru_on_skewed_routing(moe, tmp_path):
    folder = _skewed(moe, tmp_path)
    rates = {}
    for policy in ("schedule", "lru"):
        streamed = AutoModelForCausalLM.from_pretrained(
            folder, device_map="stream", stream_config=StreamConfig(policy=policy, lookahead=0)
        )
        engine = streamed._hf_weightstream
        layer = engine.expert_layers[0]
        # room for the blocks, the call and about a fifth of the experts as cache
        engine.pool.budget = engine.minimum_budget() - EXPERTS * layer.expert_bytes * 4 // 5
        streamed.generate(PROMPT, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        rates[policy] = hf_weightstream.stats(streamed)["expert_hit_rate"]
    assert rates["schedule"] > rates["lru"] + 0.1, rates  # measured: 0.46 against 0.22


def _predictable(moe, tmp_path):
    """qwen3_moe whose second layer routes like its first (same router, a residual stream its first layer barely
    changes): the first layer's hidden state, put through the second's router, predicts its experts well."""
    model = AutoModelForCausalLM.from_pretrained(moe("qwen3_moe"))
    first, second = model.model.layers
    with torch.no_grad():
        second.mlp.gate.weight.copy_(first.mlp.gate.weight)
        first.mlp.experts.down_proj.mul_(0.01)
        second.self_attn.o_proj.weight.mul_(0.01)
    model.save_pretrained(tmp_path / "predictable", max_shard_size="200KB")
    return tmp_path / "predictable"


def test_speculative_prefetch_reads_only_guesses_that_come_true(moe, tmp_path):
    folder = _predictable(moe, tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(folder)
    streamed = AutoModelForCausalLM.from_pretrained(folder, device_map="stream")
    engine = streamed._hf_weightstream
    engine.pool.budget = engine.minimum_budget()
    expected = reference.generate(PROMPT, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(expected, streamed.generate(PROMPT, max_new_tokens=12, min_new_tokens=12, do_sample=False))
    stats = hf_weightstream.stats(streamed)
    second = stats["experts"]["model.layers.1.mlp.experts"]
    assert second["calls"] == 12 and second["prediction_accuracy"] > 0.8
    assert stats["expert_prefetches"] > 0 and stats["prefetch_precision"] >= 0.8 and stats["prefetch_recall"] > 0.3
    assert stats["experts"]["model.layers.0.mlp.experts"]["prefetch_recall"] == 0.0, "nothing runs before it"


def test_speculative_prefetch_holds_back_guesses_that_fail(moe):
    """A random model's routers disagree from layer to layer: guesses are scored, and not read ahead."""
    folder = moe("qwen3_moe")
    streamed = AutoModelForCausalLM.from_pretrained(folder, device_map="stream")
    streamed.generate(PROMPT, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    stats = hf_weightstream.stats(streamed)
    accuracy = stats["experts"]["model.layers.1.mlp.experts"]["prediction_accuracy"]
    assert 0.0 < accuracy < 0.8
    issued = stats["expert_prefetches"]
    assert issued <= 0.2 * stats["expert_misses"], "a wrong guess costs its bytes: few are read ahead"


def test_dense_experts_are_surveyed_as_streaming_whole():
    config = llama4_text_config()
    with torch.device("meta"):
        model = Llama4ForCausalLM(config)
    found = {s.cls: s for s in survey(model)}
    assert not found["Llama4TextExperts"].per_expert
    assert "every expert densely" in found["Llama4TextExperts"].reason


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_a_prefill_reads_adjacent_experts_together(moe, family):
    """A long prompt routes to most experts: those whose bytes touch in the file are read as one run."""
    folder = moe(family)
    reference = AutoModelForCausalLM.from_pretrained(folder)
    streamed = AutoModelForCausalLM.from_pretrained(folder, device_map="stream")
    engine = streamed._hf_weightstream
    tokens = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reference(tokens).logits, streamed(tokens).logits)
    stats = hf_weightstream.stats(streamed)
    expert_ranges = sum(len(u.ranges) for layer in engine.expert_layers for u in layer.units if u.tensors is not None)
    assert stats["expert_misses"] > EXPERTS  # most of both layers' experts
    assert stats["reads"] < 0.6 * expert_ranges, "separate reads would be one per range of every expert"
    assert_units_match_plain_load(streamed, reference)


def test_experts_can_stream_whole_with_their_block(moe):
    folder = moe("qwen3_moe")
    reference = AutoModelForCausalLM.from_pretrained(folder)
    whole = AutoModelForCausalLM.from_pretrained(
        folder, device_map="stream", stream_config=StreamConfig(experts="whole")
    )
    assert not whole._hf_weightstream.expert_layers and "expert_layers" not in hf_weightstream.stats(whole)
    with torch.no_grad():
        assert torch.equal(reference(PROMPT).logits, whole(PROMPT).logits)
    with pytest.raises(hf_weightstream.StreamConfigError, match="experts='all'"):
        StreamConfig(experts="all")


def test_a_dtype_retarget_reaches_the_experts(moe):
    folder = moe("qwen3_moe")
    reference = AutoModelForCausalLM.from_pretrained(folder).to(torch.bfloat16)
    streamed = AutoModelForCausalLM.from_pretrained(folder, device_map="stream").to(torch.bfloat16)
    experts = streamed._hf_weightstream.expert_layers[0].module
    assert experts.gate_up_proj.dtype == torch.bfloat16 and streamed.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(reference(PROMPT).logits, streamed(PROMPT).logits)
    assert experts.gate_up_proj.dtype == torch.bfloat16 and is_placeholder(experts.gate_up_proj)
    plain = reference.model.layers[0].mlp.experts
    assert torch.equal(experts.gate_up_proj.detach(), plain.gate_up_proj.detach())


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_fused_expert_parameters_read_outside_a_call_are_the_plain_values(moe, family):
    """Between calls the fused [E, ...] parameters answer with their full values, never a meta tensor."""
    folder = moe(family)
    reference = AutoModelForCausalLM.from_pretrained(folder)
    streamed = AutoModelForCausalLM.from_pretrained(folder, device_map="stream")
    layer = streamed._hf_weightstream.expert_layers[1]
    plain = reference.get_submodule(layer.name)
    for attr in layer.params:
        got, expected = getattr(layer.module, attr), getattr(plain, attr)
        assert got.shape == expected.shape and got.dtype == expected.dtype and got.device.type == "cpu"
        assert got.requires_grad == expected.requires_grad
        assert torch.equal(got.sum(), expected.sum()) and torch.equal(got[3], expected[3])
        assert torch.equal(got.detach().clone(), expected.detach())
        assert "StreamedExperts" in repr(got.detach())
    assert hf_weightstream.stats(streamed)["peak_resident_bytes"] <= hf_weightstream.stats(streamed)["budget_bytes"]
    with pytest.raises(StreamingRuntimeError, match="read-only"), torch.no_grad():
        layer.module.down_proj.mul_(2)
    with torch.no_grad():
        assert torch.equal(reference(PROMPT).logits, streamed(PROMPT).logits)


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_moe"])
def test_every_budget_above_the_busiest_call_runs_it(tmp_path, family):
    """Every budget that fits the busiest experts call runs it. Experts are read in windows sized to what the budget
    leaves: the router copies count, and so does each expert's own charge (the last expert of a fused tensor reads
    more than the others)."""
    experts = {"num_local_experts": 12} if family == "gpt_oss" else {"num_experts": 12}
    folder = save(family, tmp_path / family, **experts)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = reference(BATCH, attention_mask=MASK).logits
    routed = max_routed(reference, lambda: reference(BATCH, attention_mask=MASK))
    streamed = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="stream")
    engine = streamed._hf_weightstream
    low = max(engine.experts_call_bytes(layer, routed) for layer in engine.expert_layers)
    failed = []
    for budget in range(low, 2 * low, max(1, low // 40)):
        streamed = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.bfloat16, device_map="stream", max_memory={"cpu": budget}
        )
        try:
            with torch.no_grad():
                got = streamed(BATCH, attention_mask=MASK).logits
        except Exception as err:  # noqa: BLE001 - collect every budget that fails
            failed.append(f"{budget}: {err}")
            continue
        assert torch.equal(got, expected)
    assert not failed, "\n".join(failed[:5])


@pytest.mark.parametrize("io", ["direct", "buffered"])
def test_recycled_buffers_of_experts_read_together_are_not_kept(moe, io):
    """A buffer an eviction frees is handed to the read it made room for; experts a prefill routes to are read
    together (one mapping per run), without it. It was kept for the expert until a later single read of that very
    expert: memory outside the budget, across calls and past release(model)."""
    folder = moe("qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(
        folder, device_map="stream", stream_config=StreamConfig(budget=664_896, io=io)
    )
    engine = model._hf_weightstream
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(15):
            model(torch.randint(3, 128, (2, 12), generator=generator))
            with engine.pool.cond:
                stranded = [u.name for u in engine.units if id(u) in engine._buffers and u.state != "loading"]
            assert not stranded, f"{len(stranded)} recycled buffers kept for units not being read: {stranded[:3]}"
    hf_weightstream.release(model)
    assert not engine._buffers
    assert hf_weightstream.stats(model)["evictions"] > 0
