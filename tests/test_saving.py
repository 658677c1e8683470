"""A streamed model saves and hands out its weights like a normal one, one unit at a time."""

from __future__ import annotations

import collections
import json
import pickle

import pytest
import torch
from tiny import auto_class

import hf_weightstream
from hf_weightstream import StreamConfig, StreamConfigError, saving
from hf_weightstream.placeholders import is_placeholder


def _streamed(folder, kind, budget_fraction=0.4, **kwargs):
    cls = auto_class(kind)
    probe = cls.from_pretrained(folder, device_map="stream", **kwargs)
    engine = probe._hf_weightstream
    budget = max(int(engine.model_bytes * budget_fraction), engine.minimum_budget())
    return cls.from_pretrained(folder, device_map="stream", stream_config=StreamConfig(budget=budget), **kwargs)


def _assert_same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("kind", ["llama_tied", "qwen3_moe128", "gpt2", "bert"])
def test_save_pretrained_streams_into_shards_that_load_normally(checkpoints, tmp_path, kind):
    folder = checkpoints(kind)
    streamed = _streamed(folder, kind)
    out = tmp_path / "saved"
    streamed.save_pretrained(out, max_shard_size="30KB")
    stats = hf_weightstream.stats(streamed)
    assert stats["peak_resident_bytes"] <= stats["budget_bytes"] < stats["model_bytes"]
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == {p.name for p in shards}
    plain = auto_class(kind).from_pretrained(folder)
    plain.save_pretrained(tmp_path / "plain", max_shard_size="30KB")
    expected = json.loads((tmp_path / "plain" / "model.safetensors.index.json").read_text())["metadata"]
    assert index["metadata"] == expected, "total_parameters and total_size, as transformers writes them"
    assert json.loads((out / "config.json").read_text())["architectures"] == [type(streamed).__name__]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "saved"], "no temporary folder is left behind"
    cls = auto_class(kind)
    _assert_same_weights(cls.from_pretrained(folder), cls.from_pretrained(out))
    if kind == "qwen3_moe128":  # experts are written back in the checkpoint's per-expert layout
        assert "model.layers.0.mlp.experts.127.down_proj.weight" in index["weight_map"]


def test_dtype_cast_and_reshard_of_a_streamed_model(checkpoints, tmp_path):
    folder = checkpoints("llama")
    streamed = _streamed(folder, "llama")
    streamed.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert sorted(p.name for p in (tmp_path / "bf16").glob("*.safetensors")) == ["model.safetensors"]
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    cls = auto_class("llama")
    _assert_same_weights(cls.from_pretrained(folder, dtype=torch.bfloat16), cls.from_pretrained(tmp_path / "bf16"))


def test_a_failed_save_leaves_nothing_half_written(checkpoints, tmp_path, monkeypatch):
    streamed = _streamed(checkpoints("llama"), "llama")
    streamed.save_pretrained(tmp_path / "out", max_shard_size="30KB")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    calls = []

    def failing(path, *args):
        calls.append(path)
        if len(calls) >= 3:
            raise OSError("disk full")
        return write(path, *args)

    write = saving._write_shard
    monkeypatch.setattr(saving, "_write_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        streamed.save_pretrained(tmp_path / "out", max_shard_size="20KB")
    with pytest.raises(OSError, match="disk full"):
        streamed.save_pretrained(tmp_path / "new")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before, "the earlier save is intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "no partial folder, no temporary folder"


def test_saving_over_an_earlier_save_replaces_its_shards(checkpoints, tmp_path):
    streamed = _streamed(checkpoints("llama"), "llama")
    out = tmp_path / "out"
    streamed.save_pretrained(out, max_shard_size="20KB")
    (out / "tokenizer.json").write_text("{}")  # files that are not weights stay
    streamed.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ]
    cls = auto_class("llama")
    _assert_same_weights(cls.from_pretrained(checkpoints("llama")), cls.from_pretrained(out))


def test_save_options_that_cannot_apply_are_refused(checkpoints, tmp_path):
    streamed = _streamed(checkpoints("llama"), "llama")
    with pytest.raises(StreamConfigError, match=r"state_dict=\.\.\.\) is not supported"):
        streamed.save_pretrained(tmp_path / "a", state_dict={})
    with pytest.raises(StreamConfigError, match=r"push_to_hub=True\) is not supported.*hf upload"):
        streamed.save_pretrained(tmp_path / "a", push_to_hub=True)
    with pytest.raises(StreamConfigError, match="safetensors only"):
        streamed.save_pretrained(tmp_path / "a", safe_serialization=False)
    assert not (tmp_path / "a").exists()


def test_state_dict_hands_out_real_tensors_one_unit_at_a_time(checkpoints):
    folder = checkpoints("qwen3_moe")
    reference = auto_class("qwen3_moe").from_pretrained(folder).state_dict()
    streamed = _streamed(folder, "qwen3_moe")
    state = streamed.state_dict()
    assert list(state) == list(reference) and len(state) == len(reference)
    for name, tensor in state.items():
        assert not is_placeholder(tensor) and tensor.device.type == "cpu"
        assert torch.equal(tensor, reference[name]), name
    experts = "model.layers.1.mlp.experts.gate_up_proj"  # per-expert units, read back into the full parameter
    assert torch.equal(state[experts], reference[experts])
    stats = hf_weightstream.stats(streamed)
    assert stats["peak_resident_bytes"] <= stats["budget_bytes"]
    copied = pickle.loads(pickle.dumps(state))  # torch.save: the values, not a handle on the model
    assert type(copied) is collections.OrderedDict, "as a plain state_dict(), which weights_only loads take"
    assert torch.equal(copied["lm_head.weight"], reference["lm_head.weight"])
    assert streamed.state_dict(keep_vars=True)["lm_head.weight"] is streamed.lm_head.weight  # torch's, for internals
    with pytest.raises(KeyError):
        state["nope"]
