"""Several streamed models under one shared WeightPool (model switching)."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_weightstream
from hf_weightstream import BudgetError, StreamConfig, WeightPool

PROMPT = torch.tensor([[1, 7, 8, 9, 10, 11, 12]])


def reference(folder, tokens=6):
    return AutoModelForCausalLM.from_pretrained(folder).generate(PROMPT, max_new_tokens=tokens, do_sample=False)


def on_pool(folder, pool, **config):
    return AutoModelForCausalLM.from_pretrained(
        folder, device_map="stream", stream_config=StreamConfig(pool=pool, **config)
    )


def model_bytes(model):
    return sum(u.resident_bytes for u in model._hf_weightstream.units)


@pytest.fixture
def two(checkpoints):
    return checkpoints("llama"), checkpoints("gpt2")


def test_two_models_share_one_budget_and_stay_exact(two):
    a_folder, b_folder = two
    expected_a, expected_b = reference(a_folder), reference(b_folder)
    probe_a, probe_b = on_pool(a_folder, WeightPool("1GB")), on_pool(b_folder, WeightPool("1GB"))
    total = model_bytes(probe_a) + model_bytes(probe_b)
    pool = WeightPool(total // 2)
    chat, coder = on_pool(a_folder, pool), on_pool(b_folder, pool)
    for _ in range(2):
        assert torch.equal(chat.generate(PROMPT, max_new_tokens=6, do_sample=False), expected_a)
        assert torch.equal(coder.generate(PROMPT, max_new_tokens=6, do_sample=False), expected_b)
    stats = pool.stats()
    assert stats["peak_resident_bytes"] <= pool.budget
    assert len(stats["models"]) == 2 and stats["evictions"] > 0


def test_switching_back_reuses_what_stayed_resident(two):
    a_folder, b_folder = two
    probe_a, probe_b = on_pool(a_folder, WeightPool("1GB")), on_pool(b_folder, WeightPool("1GB"))
    # Room for all of chat and half of coder: coder's run can only evict part of chat.
    pool = WeightPool(model_bytes(probe_a) + model_bytes(probe_b) // 2)
    chat, coder = on_pool(a_folder, pool), on_pool(b_folder, pool)
    chat(PROMPT)
    chat(PROMPT)
    coder(PROMPT)
    hf_weightstream.reset_stats(chat)
    chat(PROMPT)
    stats = hf_weightstream.stats(chat)
    assert stats["hits"] > 0, "units of chat that coder did not need to evict must be reused"
    assert stats["bytes_read"] < model_bytes(chat)


def test_two_threads_two_models_one_pool(two):
    a_folder, b_folder = two
    expected = {0: reference(a_folder), 1: reference(b_folder)}
    probe = [on_pool(f, WeightPool("1GB")) for f in two]
    biggest = max(u.charge_bytes for m in probe for u in m._hf_weightstream.units)
    pool = WeightPool(int(biggest * 2.5))
    models = [on_pool(f, pool) for f in two]
    results: dict[int, list] = {0: [], 1: []}
    errors = []

    def run(i):
        try:
            for _ in range(3):
                results[i].append(models[i].generate(PROMPT, max_new_tokens=6, do_sample=False))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "deadlock between two models on one pool"
    assert not errors
    for i in (0, 1):
        assert len(results[i]) == 3 and all(torch.equal(r, expected[i]) for r in results[i])
    assert pool.stats()["peak_resident_bytes"] <= pool.budget


def test_budget_for_one_unit_at_a_time_still_progresses(two):
    """The smallest legal budget: threads take turns (one waits for the other) and finish."""
    probe = [on_pool(f, WeightPool("1GB")) for f in two]
    biggest = max(u.charge_bytes for m in probe for u in m._hf_weightstream.units)
    pool = WeightPool(biggest)
    models = [on_pool(f, pool, lookahead=1) for f in two]
    expected = [reference(f, tokens=3) for f in two]
    outcome: dict[int, object] = {}

    def run(i):
        try:
            outcome[i] = models[i].generate(PROMPT, max_new_tokens=3, do_sample=False)
        except BudgetError as err:
            outcome[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    for i in (0, 1):
        if isinstance(outcome[i], BudgetError):
            assert "at least" in str(outcome[i])
        else:
            assert torch.equal(outcome[i], expected[i])
    assert pool.stats()["peak_resident_bytes"] <= pool.budget


def test_release_and_garbage_collection_give_memory_back(two):
    pool = WeightPool("10MB")
    chat, coder = on_pool(two[0], pool), on_pool(two[1], pool)
    chat(PROMPT)
    coder(PROMPT)
    both = pool.stats()["resident_bytes"]
    hf_weightstream.release(coder)
    after_release = pool.stats()["resident_bytes"]
    assert 0 < after_release < both
    assert hf_weightstream.stats(coder)["resident_bytes"] == 0
    del chat
    gc.collect()
    assert pool.stats()["resident_bytes"] == 0
    assert len(pool.stats()["models"]) == 1, "a model that is gone leaves no entry behind"


def test_default_pool(checkpoints):
    pool = WeightPool("5MB")
    hf_weightstream.set_default_pool(pool)
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoints("llama"), streaming=True)
        assert model._hf_weightstream.pool is pool
        explicit = AutoModelForCausalLM.from_pretrained(
            checkpoints("llama"), device_map="stream", max_memory={"cpu": "2MB"}
        )
        assert explicit._hf_weightstream.pool is not pool, "an explicit budget gets its own pool"
    finally:
        hf_weightstream.set_default_pool(None)


def test_one_pool_serves_one_device(checkpoints):
    pool = WeightPool("5MB", device="meta")  # a device other than the model's, on any machine
    with pytest.raises(BudgetError, match="serves meta, but the model runs on cpu. Use one pool per device"):
        on_pool(checkpoints("llama"), pool, device="cpu")
    with pytest.raises(hf_weightstream.StreamConfigError, match="either budget= or pool="):
        StreamConfig(pool=pool, budget="1MB")


def test_a_pool_named_in_a_stream_config_dict_is_the_pool_used(checkpoints):
    """transformers' Auto classes deep-copy from_pretrained's kwargs: the pool must survive it as itself."""
    pool = WeightPool("5MB")
    config = {"pool": pool}
    model = AutoModelForCausalLM.from_pretrained(checkpoints("llama"), device_map="stream", stream_config=config)
    assert model._hf_weightstream.pool is pool


def test_a_model_being_collected_frees_its_bytes_for_a_model_that_waits(two):
    """A collected model leaves the pool's registry (its weakref is cleared) a moment before its finalizer gives its
    bytes back, in whichever thread the collection runs: a model needing room in between saw bytes held that no
    model owned and raised BudgetError instead of waiting for them. The gap is made here as the collector makes it
    (registry first, refund later), without depending on when a collection runs."""
    a_folder, b_folder = two
    expected = reference(b_folder, tokens=3)
    probe = [on_pool(f, WeightPool("1GB")) for f in two]
    biggest = max(u.charge_bytes for m in probe for u in m._hf_weightstream.units)
    pool = WeightPool(int(biggest * 1.5))
    chat, coder = on_pool(a_folder, pool), on_pool(b_folder, pool)
    chat(PROMPT)
    assert pool.held > pool.budget - biggest, "chat holds what coder needs"
    engine = chat._hf_weightstream
    with pool.cond:
        del pool._engines[id(engine)]  # the weakref cleared: the model is no longer in the registry
    refund = threading.Timer(0.5, pool._forget, args=(engine.ledger,))  # the finalizer, a moment later
    refund.start()
    assert torch.equal(coder.generate(PROMPT, max_new_tokens=3, do_sample=False), expected)
    refund.join(30)
    assert pool.stats()["peak_resident_bytes"] <= pool.budget
