"""What users reach for besides forward and generate: weights read outside a forward, refusals that say what to
do, streaming=False, .bin checkpoints, and encoder-decoder generation."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
import zoo
from transformers import AutoModelForCausalLM, AutoTokenizer, RwkvConfig, RwkvForCausalLM

import hf_weightstream
from hf_weightstream import (
    CheckpointError,
    StreamConfig,
    StreamConfigError,
    StreamingRuntimeError,
    StreamingUnsupportedError,
)
from hf_weightstream.cli import main as cli_main
from hf_weightstream.convert import to_safetensors
from hf_weightstream.placeholders import StreamedTensor, is_placeholder

PROMPT = torch.tensor([[1, 7, 8, 9, 10, 11, 12]])


def test_a_weight_read_outside_its_forward_is_served_under_the_budget(checkpoints):
    folder = checkpoints("llama")
    reference = AutoModelForCausalLM.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", max_memory={"cpu": "400KB"})
    head = model.lm_head.weight
    assert isinstance(head, StreamedTensor) and isinstance(head, torch.nn.Parameter)
    assert (head.shape, head.dtype, head.device.type) == (reference.lm_head.weight.shape, torch.float32, "cpu")
    assert "not resident" in repr(head), "repr reads nothing"
    assert hf_weightstream.stats(model)["bytes_read"] == 0, "metadata costs no read"
    hidden = torch.randn(3, reference.config.hidden_size)
    with torch.no_grad():  # what a parent module computing with a child's weight does (FSMT, ProphetNet heads)
        assert torch.equal(F.linear(hidden, head), F.linear(hidden, reference.lm_head.weight))
        assert torch.equal(model.model.embed_tokens.weight.sum(), reference.model.embed_tokens.weight.sum())
    embed = next(u for u in model._hf_weightstream.units if u.name == "model.embed_tokens")
    assert not embed.gather, "a table read whole outside its lookups is streamed whole from then on"
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, reference(PROMPT).logits)
    stats = hf_weightstream.stats(model)
    assert stats["peak_resident_bytes"] <= stats["budget_bytes"]


def test_a_loop_reading_each_weight_yields_a_tied_weight_once(checkpoints):
    """Reading values in a ``named_parameters()`` loop makes units resident and evicts others: the tied head was
    yielded again after the embedding, as another object (the resident weight or the placeholder)."""
    folder = checkpoints("qwen2_tied")
    reference = AutoModelForCausalLM.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", max_memory={"cpu": "400KB"})
    expected = {name: weight.double().sum() for name, weight in reference.named_parameters()}
    for step in range(3):  # before any forward, after one, and with every weight released
        seen = {name: weight.double().sum() for name, weight in model.named_parameters()}
        assert list(seen) == list(expected) and all(torch.equal(seen[n], expected[n]) for n in expected)
        assert sum(w.numel() for w in model.parameters()) == sum(w.numel() for w in reference.parameters())
        with torch.no_grad():
            model(PROMPT)
        if step == 1:
            hf_weightstream.release(model)
    assert hf_weightstream.stats(model)["evictions"] > 0
    head = torch.randn_like(reference.lm_head.weight)
    model.lm_head.weight = torch.nn.Parameter(head.clone())  # untied by the user: both are the model's now
    reference.lm_head.weight = torch.nn.Parameter(head.clone())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert torch.equal(dict(model.named_parameters())["lm_head.weight"], head)


def test_torch_compile_runs_a_streamed_model_eagerly_and_right(checkpoints):
    """Compiling traced the forward with fake tensors, which cannot follow weights made resident during the call:
    it crashed, seeing a weight viewed from a byte buffer with the wrong shape. On a GPU, generate() with a static
    cache compiles the forward by itself."""
    from transformers import CompileConfig

    folder = checkpoints("llama")
    reference = AutoModelForCausalLM.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", max_memory={"cpu": "300KB"})
    with torch.no_grad():
        expected = reference(PROMPT).logits
        with pytest.warns(UserWarning, match="torch.compile has no effect on a streamed model"):
            assert torch.equal(torch.compile(model, backend="aot_eager")(PROMPT).logits, expected)
        forward = model.forward
        model.forward = torch.compile(forward, backend="aot_eager")  # what transformers' docs show
        for _ in range(2):
            assert torch.equal(model(PROMPT).logits, expected)
        model.forward = forward
    auto = CompileConfig(backend="aot_eager")
    auto._compile_all_devices = True  # generate() compiles by itself on a GPU: here on the CPU too
    static = dict(max_new_tokens=4, do_sample=False, cache_implementation="static")
    assert torch.equal(model.generate(PROMPT, compile_config=auto, **static), reference.generate(PROMPT, **static))
    assert hf_weightstream.stats(model)["evictions"] > 0


@pytest.mark.parametrize("kind", ["llama", "qwen2_tied"])
def test_requires_grad_set_by_the_user_is_kept_through_evictions(checkpoints, kind):
    """Reinstalled weights got the flag of the load back: model.requires_grad_(False) was undone by one call."""
    folder = checkpoints(kind)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", max_memory={"cpu": "400KB"})
    with torch.no_grad():
        model(PROMPT)  # some units resident, some not: the flag is set on both kinds of tensor
    model.requires_grad_(False)
    for step in range(3):
        with torch.no_grad():
            model(PROMPT)
        if step == 1:
            hf_weightstream.release(model)
        assert model.num_parameters(only_trainable=True) == 0
    assert hf_weightstream.stats(model)["evictions"] > 0
    model.model.norm.requires_grad_(True)
    with torch.no_grad():
        model(PROMPT)
        model(PROMPT)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.norm.weight"]


def test_numpy_and_tolist_of_a_weight_give_its_values(checkpoints):
    """torch's own refuse tensor subclasses (".numpy() is not supported for tensor subclasses")."""
    import numpy as np

    folder = checkpoints("llama")
    plain = AutoModelForCausalLM.from_pretrained(folder).lm_head.weight.detach()
    head = AutoModelForCausalLM.from_pretrained(folder, device_map="stream").lm_head.weight
    assert is_placeholder(head)
    assert np.array_equal(head.detach().numpy(), plain.numpy())
    assert np.array_equal(np.asarray(head.detach()), plain.numpy())
    assert head.detach().tolist() == plain.tolist()


def test_writing_into_a_streamed_weight_is_refused(checkpoints):
    model = AutoModelForCausalLM.from_pretrained(checkpoints("llama"), device_map="stream")
    with torch.no_grad(), pytest.raises(StreamingRuntimeError, match="lm_head.weight, a streamed weight.*read-only"):
        model.lm_head.weight.mul_(2)
    with torch.no_grad(), pytest.raises(StreamingRuntimeError, match="read-only"):
        model.model.norm.weight.copy_(torch.zeros(model.config.hidden_size))
    assert is_placeholder(model.lm_head.weight) and model._hf_weightstream.units[0].pins == 0


def test_a_write_into_a_resident_weight_stops_the_next_call_and_is_dropped(checkpoints):
    """torch cannot make the tensor a resident unit installed read-only: the write lands, and is found by the
    tensor's version before any output is computed with it."""
    folder = checkpoints("llama")
    reference = AutoModelForCausalLM.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream")  # the default budget: all stays
    with torch.no_grad():
        expected = reference(PROMPT).logits
        assert torch.equal(model(PROMPT).logits, expected)
        kept = model.lm_head.weight
        assert not is_placeholder(kept), "resident after the forward: the module holds the real tensor"
        kept.zero_()  # through a reference kept from the forward, as through the module
        with pytest.raises(StreamingRuntimeError, match=r"lm_head.weight of 'lm_head' changed in place.*read-only"):
            model(PROMPT)
        assert is_placeholder(model.lm_head.weight), "the changed values were dropped"
        assert torch.equal(model(PROMPT).logits, expected), "the next call reads the checkpoint's values again"
    assert all(unit.pins == 0 for unit in model._hf_weightstream.units)


def _resized(model, tokens):
    """``resize_token_embeddings`` with the new rows set to fixed values (mean resizing draws random ones)."""
    model.resize_token_embeddings(tokens, mean_resizing=False)
    with torch.no_grad():
        for weight in {id(w): w for w in (model.get_input_embeddings().weight, model.lm_head.weight)}.values():
            weight[-(tokens - weight.shape[0] + 12) :] = torch.linspace(-1, 1, weight.shape[1])
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2_tied"])
def test_resized_embeddings_stay_the_users_under_eviction_and_are_saved(checkpoints, tmp_path, kind):
    """resize_token_embeddings sets ``weight.data`` on the embedding and the head: those tensors are the user's
    from then on, never put back to the checkpoint's by an eviction, and save_pretrained writes them."""
    folder = checkpoints(kind)
    reference = _resized(AutoModelForCausalLM.from_pretrained(folder), 140)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", max_memory={"cpu": "400KB"})
    with torch.no_grad():
        model(PROMPT)  # the embedding and the head are resident when resized: .data is set on their real tensors
    _resized(model, 140)
    ids = torch.tensor([[1, 139, 7, 130, 9]])
    with torch.no_grad():
        for _ in range(3):  # a budget smaller than the model: every unit is evicted between calls
            assert torch.equal(model(ids).logits, reference(ids).logits)
    assert hf_weightstream.stats(model)["evictions"] > 0
    assert torch.equal(
        model.generate(ids, max_new_tokens=4, do_sample=False),
        reference.generate(ids, max_new_tokens=4, do_sample=False),
    )
    model.save_pretrained(tmp_path / "saved")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for name, tensor in reference.state_dict().items():
        assert torch.equal(saved.state_dict()[name], tensor), name


def test_a_weight_replaced_while_not_resident_is_kept(checkpoints):
    folder = checkpoints("llama")
    reference = AutoModelForCausalLM.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", max_memory={"cpu": "400KB"})
    head = torch.randn_like(reference.lm_head.weight)
    norm = torch.rand_like(reference.model.norm.weight)
    model.lm_head.weight = torch.nn.Parameter(head.clone())  # assigned over the placeholder
    placeholder = model.model.norm.weight
    placeholder.data = norm.clone()  # .data set on the placeholder itself
    reference.lm_head.weight = torch.nn.Parameter(head.clone())
    reference.model.norm.weight.data = norm.clone()
    assert torch.equal(placeholder.sum(), norm.sum()), "the handle the user set reads the user's tensor"
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(PROMPT).logits, reference(PROMPT).logits)
    replaced = torch.rand_like(reference.model.layers[1].mlp.up_proj.weight)
    model.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(replaced.clone())  # then cast before any forward
    reference.model.layers[1].mlp.up_proj.weight = torch.nn.Parameter(replaced.clone())
    model.to(torch.bfloat16)
    reference.to(torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.bfloat16
    assert not is_placeholder(model.model.layers[1].mlp.up_proj.weight)
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, reference(PROMPT).logits)


def test_a_parent_modules_to_and_half_retarget_the_model_instead_of_reading_it(checkpoints):
    """A SentenceTransformer or a PeftModel holds the model as a child: their ``.to()``/``.half()`` reach it through
    ``nn.Module._apply``, not through its own ``.to()``. A move to where it already is raised a TypeError
    (``SentenceTransformer(..., model_kwargs={"streaming": True})`` failed so); a cast read every weight and kept
    it in memory, outside the budget."""
    folder = checkpoints("llama")
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", max_memory={"cpu": "400KB"})
    parent = torch.nn.Sequential(model)
    assert parent.to("cpu") is parent and parent.cpu() is parent
    parent.half()
    assert model.dtype == torch.float16
    assert all(is_placeholder(weight) for weight in model.parameters()), "no weight was read and kept"
    assert hf_weightstream.stats(model)["bytes_read"] == 0
    with torch.no_grad():
        half = AutoModelForCausalLM.from_pretrained(folder).half()  # as the model's own .half() computes
        assert torch.equal(model(PROMPT).logits, half(PROMPT).logits)
        parent.to(torch.float32)  # lossless, as the model's own .half().float() is: weights are read again
        assert torch.equal(model(PROMPT).logits, AutoModelForCausalLM.from_pretrained(folder)(PROMPT).logits)
    stats = hf_weightstream.stats(model)
    assert stats["peak_resident_bytes"] <= stats["budget_bytes"]


def test_a_submodules_own_cast_or_move_is_refused_and_leaves_the_model_working(checkpoints):
    """``model.model.half()`` ran torch's own cast: it read the resident units' weights and kept them, cast, outside
    the budget, while the other units were still read in float32, and the next forward failed on mixed dtypes."""
    folder = checkpoints("llama")
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream", max_memory={"cpu": "400KB"})
    with torch.no_grad():
        before = model(PROMPT).logits
    for part, cast in [
        (model.model, lambda m: m.half()),
        (model.lm_head, lambda m: m.to(torch.float64)),
        (model.model.layers[0].mlp, lambda m: m.bfloat16()),
    ]:
        with pytest.raises(StreamingRuntimeError, match=r"Moving or casting .* alone .*model\.half\(\)"):
            cast(part)
    assert model.model.to("cpu") is model.model and model.lm_head.float() is model.lm_head, "changes nothing: fine"
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, before)
    stats = hf_weightstream.stats(model)
    assert stats["peak_resident_bytes"] <= stats["budget_bytes"]
    model.model.rotary_emb.half()  # real buffers only: torch's own, as on a plain model
    assert model.model.rotary_emb.inv_freq.dtype == torch.float16


def test_copying_or_pickling_a_streamed_model_is_refused_with_what_to_do(checkpoints, tmp_path):
    import copy
    import pickle

    folder = checkpoints("llama")
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="stream")
    for attempt in (copy.deepcopy, copy.copy, pickle.dumps, lambda m: torch.save(m, tmp_path / "model.pt")):
        with pytest.raises(StreamingRuntimeError, match="ForCausalLM cannot be copied, pickled or shared.*device_map"):
            attempt(model)
    with pytest.raises(StreamingRuntimeError, match=r"Weight lm_head.weight cannot be copied.*detach\(\).clone"):
        copy.deepcopy(model.lm_head.weight)
    with pytest.raises(StreamingRuntimeError, match="cannot be copied, pickled or shared"):
        model.share_memory()  # torch's own share_memory_ crashed the process (SIGSEGV) on a placeholder
    with pytest.raises(StreamingRuntimeError, match="cannot be copied, pickled or shared"):
        pickle.dumps(model.model.layers[0])
    experts = AutoModelForCausalLM.from_pretrained(checkpoints("qwen3_moe"), device_map="stream")
    with pytest.raises(StreamingRuntimeError, match="cannot be copied, pickled or shared"):
        copy.deepcopy(experts.model.layers[0].mlp.experts)
    torch.save(model.state_dict(), tmp_path / "weights.pt")  # what to do instead: the values, loadable safely
    loaded = torch.load(tmp_path / "weights.pt", weights_only=True)
    reference = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    assert list(loaded) == list(reference) and all(torch.equal(loaded[k], reference[k]) for k in reference)
    with torch.no_grad():
        assert torch.equal(model(PROMPT).logits, AutoModelForCausalLM.from_pretrained(folder)(PROMPT).logits)


def test_rwkv_is_refused_at_load_time_with_what_to_do(tmp_path):
    torch.manual_seed(0)
    config = RwkvConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, attention_hidden_size=32,
                        intermediate_size=64, rescale_every=2)  # fmt: skip
    RwkvForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(StreamingUnsupportedError, match=r"divides some of its weights in place.*rescale_every=0"):
        RwkvForCausalLM.from_pretrained(tmp_path, device_map="stream")
    # The suggested fix works, and matches a normal load with the same option.
    streamed = RwkvForCausalLM.from_pretrained(tmp_path, device_map="stream", rescale_every=0)
    reference = RwkvForCausalLM.from_pretrained(tmp_path, rescale_every=0)
    with torch.no_grad():
        assert torch.equal(streamed(PROMPT % 64).logits, reference(PROMPT % 64).logits)


def test_streaming_false_loads_normally(checkpoints):
    folder = checkpoints("llama")
    model = AutoModelForCausalLM.from_pretrained(folder, streaming=False, stream_config=StreamConfig(budget="1MB"))
    assert "_hf_weightstream" not in model.__dict__ and model.lm_head.weight.device.type == "cpu"
    assert not is_placeholder(model.lm_head.weight)
    with pytest.raises(StreamConfigError, match="streaming=False contradicts device_map='stream'"):
        AutoModelForCausalLM.from_pretrained(folder, streaming=False, device_map="stream")


def test_a_bin_checkpoint_converts_with_its_head_and_then_streams(checkpoints, tmp_path, capsys):
    source = tmp_path / "bin"
    model = AutoModelForCausalLM.from_pretrained(checkpoints("llama"))
    source.mkdir()
    model.config.save_pretrained(source)
    torch.save(model.state_dict(), source / "pytorch_model.bin")  # what older Hub repos have
    AutoTokenizer.from_pretrained(checkpoints("llama")).save_pretrained(source)
    with pytest.raises(CheckpointError, match=r"only has pytorch_model.bin.*hf-weightstream convert .* lm_head"):
        AutoModelForCausalLM.from_pretrained(source, device_map="stream")
    assert cli_main(["convert", str(source), str(tmp_path / "converted"), "--max-shard-size", "40KiB"]) == 0
    assert "Wrote" in capsys.readouterr().out
    converted = tmp_path / "converted"
    assert (converted / "tokenizer.json").is_file() and not list(converted.glob("*.bin"))
    streamed = AutoModelForCausalLM.from_pretrained(converted, device_map="stream")
    with torch.no_grad():
        assert torch.equal(streamed(PROMPT).logits, model(PROMPT).logits), "lm_head was kept"
    assert cli_main(["convert", str(source), str(converted)]) == 2, "refuses to write into a non-empty folder"


def test_convert_without_an_architecture_asks_for_the_class(checkpoints, tmp_path):
    source = shutil.copytree(checkpoints("bert"), tmp_path / "bert")
    config = (source / "config.json").read_text().replace('"architectures"', '"_architectures"')
    (source / "config.json").write_text(config)
    with pytest.raises(StreamConfigError, match="model_class='LlamaForCausalLM'"):
        to_safetensors(source, tmp_path / "out")


def _t5(tmp_path):
    arch = next(a for a in zoo.architectures() if a.id == "seq2seq_lm:t5")
    zoo.build_and_save(arch, tmp_path / "t5")
    return arch.model_class, tmp_path / "t5"


def test_encoder_decoder_schedule_is_the_encoder_once_then_the_decoder_cycle(tmp_path):
    cls, folder = _t5(tmp_path)
    reference = cls.from_pretrained(folder)
    probe = cls.from_pretrained(folder, device_map="stream")
    # Room for the planner to read ahead: below that, it keeps what fits and reads a tiny model's rest on demand.
    budget = max(probe._hf_weightstream.model_bytes * 8 // 10, probe._hf_weightstream.minimum_budget())
    model = cls.from_pretrained(folder, device_map="stream", stream_config=StreamConfig(budget=budget))
    engine = model._hf_weightstream
    inputs = {k: v for k, v in zoo.model_inputs(reference).items() if not k.startswith("decoder_")}
    loads: list[tuple[str, bool]] = []  # (unit, prefetched) in the order reads start
    start_load = engine._start_load

    def recording(unit, prefetch):
        started = start_load(unit, prefetch)
        if started:
            loads.append((unit.name, prefetch))
        return started

    engine._start_load = recording
    for _ in range(2):
        loads.clear()
        expected = reference.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), expected)
    names = [u.name for u in engine.schedule]
    prefix, cycle = names[: engine._cycle_start], names[engine._cycle_start :]
    assert any(n.startswith("encoder.") for n in prefix) and not any(n.startswith("encoder.") for n in cycle)
    assert any(n.startswith("decoder.block") for n in cycle)

    # Second generate: after the first encoder block, every read (the encoder's later units, then across the
    # boundary the decoder units the encoder's pass evicted) was started ahead, while the units before it computed.
    assert loads[0] == ("encoder.block.0", False), loads
    assert any(name.startswith("decoder.") for name, _ in loads), loads
    assert all(prefetched for _, prefetched in loads[1:]), loads
