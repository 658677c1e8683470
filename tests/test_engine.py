"""Behaviour of the streaming engine: lazy loading, prefetch order, the budget, policies, model semantics."""

from __future__ import annotations

import os
import threading
import time
import traceback
import warnings

import pytest
import torch
from accelerate.hooks import ModelHook
from transformers import AutoModelForCausalLM

import hf_weightstream
from hf_weightstream import BudgetError, CheckpointError, StreamConfig
from hf_weightstream.hooks import StreamHook
from hf_weightstream.placeholders import is_placeholder
from hf_weightstream.sources import LocalFileSource

PROMPT = torch.tensor([[1, 7, 8, 9, 10, 11, 12]])


def stream(folder, **config):
    return AutoModelForCausalLM.from_pretrained(folder, device_map="stream", stream_config=StreamConfig(**config))


def sizes(model):
    units = model._hf_weightstream.units
    return sum(u.resident_bytes for u in units), max(u.charge_bytes for u in units)


class RecordingSource(LocalFileSource):
    """A real file source that also records every byte range it serves."""

    def __init__(self, inner: LocalFileSource):
        super().__init__(inner.paths)
        self.calls: list[tuple[str, int, int]] = []

    def read_into(self, shard, offset, out):
        self.calls.append((shard, offset, len(out)))
        super().read_into(shard, offset, out)

    def map(self, shard, offset, length):
        self.calls.append((shard, offset, length))
        return super().map(shard, offset, length)


def test_from_pretrained_reads_headers_only(checkpoints, monkeypatch):
    calls: list[tuple[LocalFileSource, str, int, int]] = []  # every source's: an earlier test's reader may still run
    original_read, original_map = LocalFileSource.read_into, LocalFileSource.map

    def recording_read(self, shard, offset, out):
        calls.append((self, shard, offset, len(out)))
        return original_read(self, shard, offset, out)

    def recording_map(self, shard, offset, length):
        calls.append((self, shard, offset, length))
        return original_map(self, shard, offset, length)

    monkeypatch.setattr(LocalFileSource, "read_into", recording_read)
    monkeypatch.setattr(LocalFileSource, "map", recording_map)
    model = stream(checkpoints("llama"))
    checkpoint = model._hf_weightstream.checkpoint
    reads = [(shard, offset, length) for source, shard, offset, length in calls if source is checkpoint.source]
    index = checkpoint.index
    data_start = {}
    for entry in index.entries.values():
        data_start[entry.shard] = min(entry.offset, data_start.get(entry.shard, entry.offset))
    assert reads, "headers are read through the source"
    assert all(offset + length <= data_start[shard] for shard, offset, length in reads), "a weight byte was read"
    stats = hf_weightstream.stats(model)
    assert stats["bytes_read"] == 0 and stats["resident_bytes"] == 0
    assert all(is_placeholder(p) for p in model.parameters()), "no weight is resident"
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"  # non-persistent buffers are real
    assert not model.training


def test_each_unit_has_an_accelerate_hook(checkpoints):
    model = stream(checkpoints("llama"))
    for unit in model._hf_weightstream.units:
        for module in unit.modules:
            assert isinstance(module._hf_hook, ModelHook) and isinstance(module._hf_hook, StreamHook)
    names = {u.name for u in model._hf_weightstream.units}
    assert {"model.layers.0", "model.layers.3", "model.norm", "model.embed_tokens", "lm_head"} <= names


def test_prefetch_of_next_unit_starts_during_current_forward(checkpoints):
    """Deterministic: layer k's forward blocks until the source has started reading layer k+1."""
    model = stream(checkpoints("llama"), lookahead=1, num_workers=1)
    engine = model._hf_weightstream
    model(PROMPT)  # trace the execution order
    hf_weightstream.release(model)
    started: dict[str, threading.Event] = {u.name: threading.Event() for u in engine.units}
    by_range = {(r.shard, r.offset): u.name for u in engine.units for r in u.ranges}

    class Signalling(RecordingSource):
        def map(self, shard, offset, length):
            name = by_range.get((shard, offset))
            if name:
                started[name].set()
            return super().map(shard, offset, length)

    engine.reader.source = Signalling(engine.reader.source)
    order = [u.name for u in engine.schedule]
    waited: list[str] = []

    def block_until_next_read(module, args):  # runs inside the layer's forward, after its pre_forward
        name = f"model.layers.{module.layer_idx}"
        nxt = order[(order.index(name) + 1) % len(order)]
        assert started[nxt].wait(timeout=10), f"read of {nxt} did not start during {name}'s forward"
        waited.append(name)

    handles = [model.model.layers[i].self_attn.register_forward_pre_hook(block_until_next_read) for i in range(4)]
    try:
        with torch.no_grad():
            model(PROMPT)
    finally:
        for handle in handles:
            handle.remove()
    assert waited == [f"model.layers.{i}" for i in range(4)]


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_budget_is_never_exceeded(checkpoints, fraction):
    model = stream(checkpoints("llama"), lookahead=2)
    total, biggest = sizes(model)
    budget = max(int(total * fraction), biggest)
    model = stream(checkpoints("llama"), lookahead=2, budget=budget)
    model.generate(PROMPT, max_new_tokens=6, do_sample=False)
    stats = hf_weightstream.stats(model)
    assert 0 < stats["peak_resident_bytes"] <= budget


def test_budget_below_largest_unit_is_a_clear_error(checkpoints):
    model = stream(checkpoints("llama"))
    _total, biggest = sizes(model)
    with pytest.raises(BudgetError, match=rf"smaller than unit '.+'.*at least {biggest:,} bytes"):
        stream(checkpoints("llama"), budget=biggest - 1)


def test_max_memory_sets_the_budget(checkpoints):
    model = AutoModelForCausalLM.from_pretrained(checkpoints("llama"), device_map="stream", max_memory={"cpu": "1MB"})
    assert hf_weightstream.stats(model)["budget_bytes"] == 1_000_000
    with pytest.raises(hf_weightstream.StreamConfigError, match="no entry for the execution device"):
        AutoModelForCausalLM.from_pretrained(checkpoints("llama"), device_map="stream", max_memory={0: "1MB"})


def test_schedule_policy_hits_where_lru_never_does(checkpoints):
    """Cyclic access with a budget below the model: LRU always evicts the unit needed next."""
    total, biggest = sizes(stream(checkpoints("llama")))
    budget = max(int(total * 0.6), biggest)
    rates = {}
    for policy in ("lru", "schedule"):
        model = stream(checkpoints("llama"), policy=policy, lookahead=0, budget=budget)
        model(PROMPT)  # the first pass traces the schedule, the second loads the kept set
        model(PROMPT)
        hf_weightstream.reset_stats(model)
        for _ in range(5):
            model(PROMPT)
        stats = hf_weightstream.stats(model)
        rates[policy] = stats["hit_rate"]
        kept, per_pass = stats["kept_resident_units"], stats["schedule_length"]
    assert rates["lru"] == 0.0
    assert kept > 0
    assert rates["schedule"] == pytest.approx(kept / per_pass)  # the kept units always hit, the others never


def test_lookahead_turns_misses_into_prefetches(checkpoints):
    total, biggest = sizes(stream(checkpoints("llama")))
    # "lru" keeps no fixed set, so the whole budget beyond the running unit is room for reading ahead.
    model = stream(checkpoints("llama"), lookahead=2, policy="lru", budget=max(total // 2, 3 * biggest))
    model.generate(PROMPT, max_new_tokens=5, do_sample=False)
    stats = hf_weightstream.stats(model)
    assert stats["prefetches"] > 0
    assert stats["misses"] <= stats["units"], "after the first pass, every unit should come from prefetch"


def test_behaves_like_a_normal_model(checkpoints):
    model = stream(checkpoints("llama"))
    assert model.device == torch.device("cpu")
    assert model.hf_device_map == {"": torch.device("cpu")}
    inputs = {"input_ids": PROMPT, "attention_mask": torch.ones_like(PROMPT)}
    out = model.generate(**{k: v.to(model.device) for k, v in inputs.items()}, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, PROMPT.shape[1] + 3)
    bos_only = model.generate(max_new_tokens=3, do_sample=False)  # no inputs: BOS created on model.device
    assert bos_only[0, 0].item() == model.generation_config.bos_token_id
    assert model.to("cpu") is model and model.cpu() is model
    assert model.to(torch.device("cpu")).device == torch.device("cpu")
    with torch.inference_mode():
        assert model(PROMPT).logits.shape[-1] == 128


def test_to_dtype_recasts_on_next_read(checkpoints):
    folder = checkpoints("llama")
    ref = AutoModelForCausalLM.from_pretrained(folder).to(torch.bfloat16)
    model = stream(folder)
    model(PROMPT)
    model.to(torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(ref(PROMPT).logits, model(PROMPT).logits)


def test_double_casts_the_weights_as_torch_does(checkpoints):
    folder = checkpoints("llama")
    ref = AutoModelForCausalLM.from_pretrained(folder).double()
    model = stream(folder)
    assert model.double() is model and model.dtype == torch.float64
    with torch.no_grad():
        logits = model(PROMPT).logits
        assert logits.dtype == torch.float64 and torch.equal(ref(PROMPT).logits, logits)


def test_a_dtype_round_trip_is_lossless_as_the_weights_are_read_again(checkpoints):
    """Streamed weights are read from the checkpoint at each dtype change, so ``.half().float()`` computes as the
    float load does; the real buffers computed with them (rotary frequencies) are cast from their loaded values
    too, not rounded through float16 (which left outputs matching neither a float nor a round-tripped plain load)."""
    folder = checkpoints("llama")
    plain = AutoModelForCausalLM.from_pretrained(folder)
    model = stream(folder)
    ids = torch.arange(1, 40).unsqueeze(0)  # long enough for rounded rotary frequencies to show
    with torch.no_grad():
        expected_half = plain.half()(ids).logits
        assert torch.equal(model.half()(ids).logits, expected_half), "a single cast is torch's"
        expected = AutoModelForCausalLM.from_pretrained(folder)(ids).logits
        assert torch.equal(model.float()(ids).logits, expected)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_a_refused_dtype_change_leaves_the_model_as_it_was(checkpoints):
    folder = checkpoints("llama")
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(folder)(PROMPT).logits
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", max_memory={"cpu": "300KB"})
    before = hf_weightstream.stats(model)["model_bytes"]
    with pytest.raises(TypeError, match="only accepts floating point or complex dtypes.*int8"):  # as torch says
        model.to(torch.int8)
    with pytest.raises(hf_weightstream.BudgetError, match="smaller than unit"):  # float64 does not fit 300 KB
        model.to(torch.float64)
    assert model.dtype == torch.float32 and hf_weightstream.stats(model)["model_bytes"] == before
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, expected)


def test_ctrl_c_during_a_read_raises_keyboard_interrupt_and_the_model_stays_usable(checkpoints, monkeypatch):
    """A Ctrl-C lands while a weight is read (the slow part of a streamed forward): it must reach the caller as
    itself, not wrapped in a load error that ``except KeyboardInterrupt`` and the shell's exit status miss."""
    folder = checkpoints("llama")
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(folder)(PROMPT).logits
    model = stream(folder, lookahead=0)
    engine = model._hf_weightstream
    read = engine._read_and_materialize

    def interrupted(unit):
        monkeypatch.setattr(engine, "_read_and_materialize", read)  # once
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_read_and_materialize", interrupted)
    with torch.no_grad():
        with pytest.raises(KeyboardInterrupt):
            model(PROMPT)
        assert torch.equal(model(PROMPT).logits, expected)
    assert all(unit.pins == 0 for unit in engine.units)


def test_ctrl_c_inside_a_forward_closes_the_session(checkpoints):
    """torch runs always_call hooks for an Exception only: a Ctrl-C inside a forward left the forward lock held
    (another thread's call then waited forever), the interrupted unit pinned and grad mode off."""

    folder = checkpoints("llama")
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(folder)(PROMPT).logits
    model = stream(folder)
    engine = model._hf_weightstream
    engine.pool.budget = engine.minimum_budget()

    def interrupt(*_args):
        raise KeyboardInterrupt

    handle = model.model.layers[2].mlp.register_forward_hook(interrupt)
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the forward with gradients enabled says it runs without
        model(PROMPT)
    handle.remove()
    assert torch.is_grad_enabled(), "grad mode is the caller's again"
    assert all(unit.pins == 0 for unit in engine.units) and not engine.forward_lock._is_owned()
    got = {}

    def other_thread():
        with torch.no_grad():
            got["logits"] = model(PROMPT).logits

    worker = threading.Thread(target=other_thread, daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "another thread's call does not wait for the interrupted one"
    assert torch.equal(got["logits"], expected)


def test_to_dtype_keeps_a_gathered_table_out_of_the_budget(checkpoints):
    model = stream(checkpoints("llama"))
    before = hf_weightstream.stats(model)["model_bytes"]
    model.to(torch.bfloat16)
    embed = next(u for u in model._hf_weightstream.units if u.gather)
    assert embed.resident_bytes == embed.charge_bytes == 0, "a gathered table never loads whole, in any dtype"
    assert hf_weightstream.stats(model)["model_bytes"] < before  # the cast units are half the size now


def test_cuda_retarget_without_gpu_is_a_clear_error(checkpoints):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    model = stream(checkpoints("llama"))
    for move in (model.cuda, lambda: model.to("cuda:1")):
        with pytest.raises(hf_weightstream.StreamingRuntimeError, match="CUDA is not available"):
            move()
    assert model.device.type == "cpu"
    assert model(PROMPT).logits.device.type == "cpu"


def test_tied_weights_stay_tied_and_are_read_once(checkpoints):
    model = stream(checkpoints("llama_tied"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    seen = {}

    def check(module, args):
        seen["tied"] = model.lm_head.weight is model.model.embed_tokens.weight
        seen["device"] = model.lm_head.weight.device.type

    model.lm_head.register_forward_hook(lambda module, args, output: check(module, args))
    model(PROMPT)
    assert seen == {"tied": True, "device": "cpu"}
    index = model._hf_weightstream.checkpoint.index
    stats = hf_weightstream.stats(model)
    row_bytes = model.config.hidden_size * 4
    # The embedding looked up its rows; the table itself was read once, for the head.
    assert stats["bytes_read"] == index.total_bytes + stats["gathered_rows"] * row_bytes
    model(PROMPT)
    assert hf_weightstream.stats(model)["bytes_read"] == stats["bytes_read"], "resident now: nothing re-read"
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_output_loading_info_returns_tuple(checkpoints):
    model, info = AutoModelForCausalLM.from_pretrained(
        checkpoints("llama"), device_map="stream", output_loading_info=True
    )
    assert hasattr(model, "_hf_weightstream")
    assert set(info) >= {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}
    assert not info["missing_keys"]


def test_streaming_true_and_reimport_are_idempotent(checkpoints):
    import importlib

    importlib.reload(hf_weightstream)
    hf_weightstream.integration.install()
    model = AutoModelForCausalLM.from_pretrained(checkpoints("llama"), streaming=True)
    assert hf_weightstream.stats(model)["budget_bytes"] > 0
    plain = AutoModelForCausalLM.from_pretrained(checkpoints("llama"))
    assert not hasattr(plain, "_hf_weightstream")
    assert plain.device.type == "cpu"


def test_a_forward_that_raises_leaves_the_model_usable(checkpoints):
    model = stream(checkpoints("llama"))
    expected = model(PROMPT).logits
    boom = model.model.layers[2].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError, match="boom"):
        model(PROMPT)
    boom.remove()
    assert all(u.pins == 0 for u in model._hf_weightstream.units)
    assert torch.equal(model(PROMPT).logits, expected)


def test_one_model_from_two_threads_is_serialised_and_correct(checkpoints):
    folder = checkpoints("llama")
    ref = AutoModelForCausalLM.from_pretrained(folder)
    expected = ref.generate(PROMPT, max_new_tokens=6, do_sample=False)
    total, biggest = sizes(stream(folder))
    model = stream(folder, budget=max(total // 2, biggest))
    results, errors = [], []

    def run():
        try:
            for _ in range(2):
                results.append(model.generate(PROMPT, max_new_tokens=6, do_sample=False))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert not errors
    assert len(results) == 4 and all(torch.equal(r, expected) for r in results)


def test_device_copy_path_runs_on_cpu(checkpoints):
    """The accelerator path (host staging buffers, copy, materialise on the device) exercised with CPU tensors."""
    folder = checkpoints("llama")
    expected = AutoModelForCausalLM.from_pretrained(folder).generate(PROMPT, max_new_tokens=5, do_sample=False)
    total, biggest = sizes(stream(folder))
    model = stream(folder, lookahead=2, budget=max(total // 2, 3 * biggest))
    engine = model._hf_weightstream
    engine.copy_to_device = True
    assert torch.equal(model.generate(PROMPT, max_new_tokens=5, do_sample=False), expected)
    stats = hf_weightstream.stats(model)
    assert stats["peak_resident_bytes"] <= stats["budget_bytes"]
    largest_read = max(u.raw_bytes for u in engine.units)
    assert 0 < stats["staging_bytes"] <= (engine.lookahead + 1) * largest_read, "staging is bounded by the window"
    assert all(u.chunks is None for u in engine.units), "device copies keep no host bytes alive"


def test_untied_embedding_reads_only_the_rows_it_looks_up(checkpoints):
    folder = checkpoints("llama")
    ref = AutoModelForCausalLM.from_pretrained(folder)
    model = stream(folder)
    embed = next(u for u in model._hf_weightstream.units if u.name == "model.embed_tokens")
    assert embed.gather and embed not in model._hf_weightstream.schedule
    ids = torch.tensor([[5, 9, 5, 5, 17]])
    for m in (ref, model):  # a pad id beyond the few gathered rows (F.embedding checks padding_idx)
        m.model.embed_tokens.padding_idx = 100
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, model(ids).logits)
    assert hf_weightstream.stats(model)["gathered_rows"] == 3  # unique ids only
    assert embed.held_bytes == 0 and is_placeholder(model.model.embed_tokens.weight)
    assert model.model.embed_tokens.padding_idx == 100
    with pytest.raises(IndexError, match="index out of range in self: ids must be in .* for model.embed_tokens$"):
        model(torch.tensor([[1, 500]]))
    assert embed.held_bytes == 0 and embed.pins == 0 and model.model.embed_tokens.padding_idx == 100
    tied = stream(checkpoints("llama_tied"))
    assert not any(u.gather for u in tied._hf_weightstream.units), "a tied table is the head's matrix too"
    # The tied table's unit is the head's: the error still names the module that looked the ids up.
    with pytest.raises(IndexError, match="for model.embed_tokens$"):
        tied(torch.tensor([[1, 500]]))


def test_shard_truncated_after_loading_is_a_clear_error(checkpoints, tmp_path):
    import shutil

    folder = shutil.copytree(checkpoints("llama"), tmp_path / "llama")
    model = stream(folder)
    for shard in folder.glob("model-*.safetensors"):
        shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises((hf_weightstream.StreamingRuntimeError, CheckpointError), match="shrank after it was indexed"):
        model(PROMPT)


def test_release_waits_for_reads_in_flight_and_leaves_nothing_resident(checkpoints):
    """A forward leaves prefetches for the next pass; release() must not let them land after it."""
    probe = stream(checkpoints("llama"))
    total, biggest = sizes(probe)
    model = stream(checkpoints("llama"), budget=max(total // 2, 3 * biggest), policy="lru", lookahead=2)
    engine = model._hf_weightstream
    with torch.no_grad():
        model(PROMPT)  # learn the schedule

    class Slow(RecordingSource):
        def map(self, shard, offset, length):
            time.sleep(0.2)  # the next pass's reads are still running when release() is called
            return super().map(shard, offset, length)

    engine.reader.source = Slow(engine.reader.source)
    with torch.no_grad():
        model(PROMPT)  # ends by reading ahead for the next pass
    assert any(unit.state == "loading" for unit in engine.units)
    hf_weightstream.release(model)
    assert [unit.name for unit in engine.units if unit.state != "absent"] == []
    assert engine.pool.held == 0


class _Interrupt(BaseException):
    """Stands for a Ctrl-C (pytest itself stops on a real KeyboardInterrupt)."""


def test_an_interrupt_between_two_tensors_of_a_unit_installs_none_of_them(checkpoints, monkeypatch):
    """A weight left in place by a unit that did not finish installing was later taken for one the user put
    there: never streamed again, and held outside the budget, beyond release()."""
    from hf_weightstream import engine as engine_module
    from hf_weightstream.placeholders import is_placeholder

    folder = checkpoints("llama")
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", max_memory={"cpu": "300KB"})
    engine = model._hf_weightstream
    places = {unit.name: sum(len(spec.slots) for spec in unit.specs) for unit in engine.units}
    requires_grad = engine_module._requires_grad
    layer = next(unit for unit in engine.units if unit.name == "model.layers.1")
    second = layer.specs[1].name

    def interrupted_at_the_second(spec, tensor):
        if spec.name == second:
            raise _Interrupt
        return requires_grad(spec, tensor)

    monkeypatch.setattr(engine_module, "_requires_grad", interrupted_at_the_second)
    with pytest.raises(_Interrupt), torch.no_grad():
        model(PROMPT)
    monkeypatch.setattr(engine_module, "_requires_grad", requires_grad)
    with torch.no_grad():
        model(PROMPT)
    hf_weightstream.release(model)
    assert {unit.name: sum(len(spec.slots) for spec in unit.specs) for unit in engine.units} == places, "none adopted"
    for unit in engine.units:
        for spec in unit.specs:
            assert all(is_placeholder(slot.store[slot.attr]) for slot in spec.slots), spec.name
    assert engine.pool.held == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_a_forked_child_is_told_to_load_the_model_itself_instead_of_hanging(checkpoints):
    """The child of a fork (a DataLoader worker, multiprocessing's default on Linux) has none of the threads that
    read: a call there waited forever for a read no thread would do."""
    model = AutoModelForCausalLM.from_pretrained(checkpoints("llama"), device_map="stream", max_memory={"cpu": "300KB"})
    with torch.no_grad():
        expected = model(PROMPT).logits  # the reader threads exist now, and some reads may be in flight
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only what this test needs, then leave without running pytest's teardown
        try:
            with torch.no_grad():
                model(PROMPT)
            said = b"no error"
        except hf_weightstream.StreamingRuntimeError as err:
            said = str(err).encode()
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            said = repr(err).encode()
        os.write(write, said)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as answer:
        said = answer.read().decode()
    os.waitpid(pid, 0)
    assert "this one was forked from it" in said and "'spawn'" in said, said
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, expected), "the parent goes on"


def _next_call(model):
    """The next generate, in a thread, so that one that waits forever fails the test instead of hanging it."""
    got = {}
    worker = threading.Thread(
        target=lambda: got.setdefault("ids", model.generate(PROMPT, max_new_tokens=4, do_sample=False)), daemon=True
    )
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the next call waits forever for a read nobody does"
    return got["ids"]


WINDOWS = {"eviction's refund": "refund", "demand read not started": "_load", "demand read settling": "_loaded"}


@pytest.mark.parametrize("window", list(WINDOWS))
def test_a_ctrl_c_anywhere_in_a_call_leaves_no_bytes_charged_and_no_read_pending(checkpoints, monkeypatch, window):
    """A Ctrl-C is an asynchronous exception: it lands between any two lines of the calling thread. Landing as an
    eviction refunded its bytes left the unit absent but charged (the budget shrank for good: under a tight one
    every later call raised BudgetError); landing before or as the call's own read settled its unit left that unit
    'loading' with no reader, and the next call waited for it forever."""
    folder = checkpoints("llama")
    expected = AutoModelForCausalLM.from_pretrained(folder).generate(PROMPT, max_new_tokens=4, do_sample=False)
    model = stream(folder, lookahead=0)
    engine = model._hf_weightstream
    engine.pool.budget = engine.minimum_budget()
    model.generate(PROMPT, max_new_tokens=2, do_sample=False)  # a full budget: the next call evicts
    caller = threading.get_ident()
    name = WINDOWS[window]
    owner = engine.pool if name == "refund" else engine
    real = getattr(owner, name)

    def interrupted(unit, *args):
        at_eviction = name != "refund" or getattr(unit, "state", None) == "absent"
        if threading.get_ident() == caller and at_eviction:
            monkeypatch.setattr(owner, name, real)  # once
            raise _Interrupt
        return real(unit, *args)

    monkeypatch.setattr(owner, name, interrupted)
    with pytest.raises(_Interrupt), torch.no_grad():
        model.generate(PROMPT, max_new_tokens=4, do_sample=False)
    assert getattr(owner, name) == real, "the interrupt landed"
    assert not [unit.name for unit in engine.units if unit.state == "loading"]
    held = sum(unit.held_bytes for unit in engine.units) + sum(h.held_bytes for h in engine.holdings())
    assert engine.pool.held == held == sum(u.held_bytes for u in engine.units if u.state == "resident")
    assert torch.equal(_next_call(model), expected)
    assert hf_weightstream.stats(model)["peak_resident_bytes"] <= engine.pool.budget


def test_a_ctrl_c_as_a_call_evicts_another_models_unit_leaves_its_bytes_uncharged(checkpoints, monkeypatch):
    """Two models on one pool: a call of one evicts the other's units. A Ctrl-C landing as such an eviction was
    refunding left the other model's unit absent but charged, and the end of the call settled only its own model's
    units: the shared budget shrank for good (until the other model's next call), and a tight one raised
    BudgetError in every later call of either model."""
    folder = checkpoints("llama")
    expected = AutoModelForCausalLM.from_pretrained(folder).generate(PROMPT, max_new_tokens=4, do_sample=False)
    pool = hf_weightstream.WeightPool("1GB")
    first, other = stream(folder, pool=pool, lookahead=0), stream(folder, pool=pool, lookahead=0)
    other.generate(PROMPT, max_new_tokens=2, do_sample=False)  # every unit of the other model resident
    pool.budget = max(pool.held, pool.minimum_budget())  # the first model's call must evict the other's units
    theirs, caller, real = other._hf_weightstream, threading.get_ident(), pool.refund

    def interrupted(unit, nbytes):
        if threading.get_ident() == caller and unit.engine is theirs and unit.state == "absent":
            monkeypatch.setattr(pool, "refund", real)  # once
            raise _Interrupt
        return real(unit, nbytes)

    monkeypatch.setattr(pool, "refund", interrupted)
    with pytest.raises(_Interrupt), torch.no_grad():
        first.generate(PROMPT, max_new_tokens=4, do_sample=False)
    assert pool.refund == real, "the interrupt landed"
    engines = [first._hf_weightstream, theirs]
    resident = sum(u.held_bytes for e in engines for u in e.units if u.state == "resident")
    assert pool.held == resident + sum(h.held_bytes for e in engines for h in e.holdings())
    assert not [u.name for e in engines for u in e.units if u.state == "absent" and u.held_bytes]
    assert torch.equal(_next_call(first), expected)
    assert torch.equal(_next_call(other), expected)


@pytest.mark.parametrize("error", [ValueError, _Interrupt])
def test_a_first_pass_that_raises_midway_is_traced_again(checkpoints, error):
    """The first pass is the slow, cold one, where a Ctrl-C lands (or a bad input raises in a block): the units
    it reached before raising were taken for the whole schedule, for good, and the rest were never read ahead nor
    kept resident (half of every later token's units missed)."""
    folder = checkpoints("llama")
    expected = AutoModelForCausalLM.from_pretrained(folder).generate(PROMPT, max_new_tokens=4, do_sample=False)
    fresh = stream(folder)
    fresh.generate(PROMPT, max_new_tokens=4, do_sample=False)
    model = stream(folder)

    def fail(*_args):
        raise error("in the first pass")

    handle = model.model.layers[1].register_forward_pre_hook(fail)
    with pytest.raises(error), torch.no_grad():
        model(PROMPT)
    handle.remove()
    assert torch.equal(model.generate(PROMPT, max_new_tokens=4, do_sample=False), expected)
    names = [unit.name for unit in model._hf_weightstream.schedule]
    assert names == [unit.name for unit in fresh._hf_weightstream.schedule]
    hf_weightstream.reset_stats(fresh)
    hf_weightstream.reset_stats(model)
    for streamed in (fresh, model):
        streamed.generate(PROMPT, max_new_tokens=4, do_sample=False)
    assert hf_weightstream.stats(model)["misses"] == hf_weightstream.stats(fresh)["misses"]


def test_a_ctrl_c_as_a_prefetch_is_handed_to_the_readers_leaves_no_read_pending(checkpoints, monkeypatch):
    """The calling thread hands each read ahead to the readers (``executor.submit``): a Ctrl-C landing there left
    the unit 'loading' with no reader (and not this thread's own read, so the end of the call did not settle it):
    the next call waited for it forever."""
    folder = checkpoints("llama")
    expected = AutoModelForCausalLM.from_pretrained(folder).generate(PROMPT, max_new_tokens=4, do_sample=False)
    model = stream(folder, lookahead=2, policy="lru")  # reads ahead as configured, whatever the timings
    engine = model._hf_weightstream
    engine.pool.budget = engine.minimum_budget() * 2  # not the whole model: every token reads
    model.generate(PROMPT, max_new_tokens=2, do_sample=False)  # the schedule is learned: the next calls read ahead
    executor, caller = engine.pool.executor, threading.get_ident()
    real = executor.submit

    def interrupted(fn, *args):
        if threading.get_ident() == caller and getattr(fn, "__name__", "") == "_load":
            monkeypatch.setattr(executor, "submit", real)  # once
            raise _Interrupt
        return real(fn, *args)

    monkeypatch.setattr(executor, "submit", interrupted)
    with pytest.raises(_Interrupt), torch.no_grad():
        model.generate(PROMPT, max_new_tokens=4, do_sample=False)
    assert executor.submit == real, "the interrupt landed"
    assert not [unit.name for unit in engine.units if unit.state == "loading"]
    assert engine.pool.held == sum(u.held_bytes for u in engine.units if u.state == "resident")
    assert torch.equal(_next_call(model), expected)


def test_a_ctrl_c_as_the_first_pass_reads_ahead_for_the_next_leaves_no_read_pending(checkpoints, monkeypatch):
    """The first pass ends by reading ahead the units the next pass starts with, after the call's units were
    settled: a Ctrl-C landing as one of those reads was handed to the readers left it 'loading' with no reader, and
    the next call waited for it forever."""
    folder = checkpoints("llama")
    expected = AutoModelForCausalLM.from_pretrained(folder).generate(PROMPT, max_new_tokens=4, do_sample=False)
    model = stream(folder, lookahead=2, policy="lru")
    engine = model._hf_weightstream
    engine.pool.budget = engine.minimum_budget() * 2  # not the whole model: the end of the pass reads ahead
    executor, caller = engine.pool.executor, threading.get_ident()
    real = executor.submit

    def interrupted(fn, *args):
        at_the_end = any(frame.name == "end_forward" for frame in traceback.extract_stack())
        if threading.get_ident() == caller and getattr(fn, "__name__", "") == "_load" and at_the_end:
            monkeypatch.setattr(executor, "submit", real)  # once
            raise _Interrupt
        return real(fn, *args)

    monkeypatch.setattr(executor, "submit", interrupted)
    with pytest.raises(_Interrupt), torch.no_grad():
        model(PROMPT)  # the first pass: traced, then its schedule read ahead
    assert executor.submit == real, "the interrupt landed"
    assert not [unit.name for unit in engine.units if unit.state == "loading"]
    assert engine.pool.held == sum(u.held_bytes for u in engine.units if u.state == "resident")
    assert torch.equal(_next_call(model), expected)
