"""Bad input fails early with an error that names the problem and the fix, and changes no file."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hf_weightstream import CheckpointError, StreamConfig, StreamConfigError, StreamingRuntimeError
from hf_weightstream.config import parse_size


def copy_of(checkpoints, tmp_path, kind="llama"):
    return shutil.copytree(checkpoints(kind), tmp_path / kind)


def shards(folder):
    return sorted(folder.glob("model-*.safetensors"))


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def load(folder, **kwargs):
    return AutoModelForCausalLM.from_pretrained(folder, device_map="stream", **kwargs)


def test_unknown_stream_config_field_suggests_the_right_one():
    with pytest.raises(StreamConfigError, match="Unknown StreamConfig field 'lookahaed'. Did you mean 'lookahead'"):
        StreamConfig(lookahaed=2)


@pytest.mark.parametrize("bad", ["150 parsecs", "-5MB", "", "MB", 0, True, 0.5, 1.5])
def test_bad_budget_strings(bad):
    with pytest.raises(StreamConfigError, match="budget"):
        StreamConfig(budget=bad)


def test_budget_units():
    assert parse_size("150MB") == 150_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5 gb") == 1_500_000_000
    assert parse_size(1234) == 1234


def test_bad_options(checkpoints):
    folder = checkpoints("llama")
    with pytest.raises(StreamConfigError, match="policy"):
        StreamConfig(policy="fifo")
    with pytest.raises(StreamConfigError, match="stream_config must be"):
        load(folder, stream_config=42)
    with pytest.raises(StreamConfigError, match="cannot be combined with streaming"):
        AutoModelForCausalLM.from_pretrained(folder, device_map="auto", streaming=True)
    with pytest.raises(StreamConfigError, match="asks transformers to quantize .* cannot stream"):
        load(folder, quantization_config={"quant_method": "bitsandbytes"})
    with pytest.raises(StreamConfigError, match="Unknown StreamConfig field"):
        load(folder, stream_config={"budjet": "1MB"})
    with pytest.raises(StreamConfigError, match="streaming must be True or False, got 'no'"):
        AutoModelForCausalLM.from_pretrained(folder, streaming="no")
    with pytest.raises(StreamConfigError, match="complete_download must be True or False"):
        StreamConfig(complete_download="no")
    assert StreamConfig(budget=1.5e8).budget_bytes == 150_000_000, "a whole number of bytes as a float is fine"


def test_a_cuda_device_without_cuda_is_refused_with_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    with pytest.raises(StreamConfigError, match="device='cuda'.*CUDA is not available.*device='cpu'"):
        StreamConfig(device="cuda", budget="1GB")


def test_missing_shard_file(checkpoints, tmp_path):
    folder = copy_of(checkpoints, tmp_path)
    victim = shards(folder)[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"Shard {victim.name} is listed in .* but missing"):
        load(folder)


def test_truncated_shard(checkpoints, tmp_path):
    folder = copy_of(checkpoints, tmp_path)
    victim = shards(folder)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    before = digest(folder)
    with pytest.raises(CheckpointError, match=rf"{victim.name}: truncated.*download it again"):
        load(folder)
    assert digest(folder) == before, "the checkpoint must not be modified"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda data: struct.pack("<Q", 10**12) + data[8:], "header length"),
        (lambda data: data[:8] + b"{not json" + data[17:], "corrupt safetensors header"),
        (lambda data: data[:3], "too short"),
    ],
)
def test_corrupt_header(checkpoints, tmp_path, damage, message):
    folder = copy_of(checkpoints, tmp_path)
    victim = shards(folder)[0]
    victim.write_bytes(damage(victim.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        load(folder)


def test_a_checkpoint_lacking_much_of_the_model_is_refused(checkpoints, tmp_path):
    """A normal load would initialize what is missing randomly, in memory; beyond a new head or a pooler that is
    the wrong checkpoint for the class, and the memory streaming is there to spare."""
    folder = tmp_path / "missing"
    model = LlamaForCausalLM.from_pretrained(checkpoints("llama"))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.2.")}
    model.save_pretrained(folder, state_dict=state)
    with pytest.raises(
        CheckpointError, match=r"no tensor for 9 weight\(s\).*model.layers.2.mlp.down_proj.weight.*% of its bytes"
    ):
        load(folder)
    one = tmp_path / "one"  # one weight fewer: initialized, as a normal load does (test_outputs.py)
    lacking = "model.layers.1.mlp.up_proj.weight"
    model.save_pretrained(one, state_dict={k: v for k, v in model.state_dict().items() if k != lacking})
    torch.manual_seed(0)
    expected = LlamaForCausalLM.from_pretrained(one).model.layers[1].mlp.up_proj.weight
    torch.manual_seed(0)
    assert torch.equal(load(one).model.layers[1].mlp.up_proj.weight, expected)


def test_shape_disagreeing_with_config(checkpoints, tmp_path):
    folder = copy_of(checkpoints, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"has shape \[128, 64\] but the model .* expects \[96, 64\]"):
        load(folder)


def test_integer_tensor_where_float_expected(checkpoints, tmp_path):
    folder = tmp_path / "ints"
    model = LlamaForCausalLM.from_pretrained(checkpoints("llama"))
    state = dict(model.state_dict())
    state["model.norm.weight"] = torch.ones(64, dtype=torch.int32)
    model.save_pretrained(folder, state_dict=state)
    with pytest.raises(CheckpointError, match="casting would change its meaning"):
        load(folder)


def test_bin_checkpoint_needs_safetensors(checkpoints, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(checkpoints("llama") / "config.json", folder)
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(
        CheckpointError, match="Streaming needs safetensors.*pytorch_model.bin.*hf-weightstream convert"
    ):
        load(folder)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_memory": "150MB"}, r"max_memory must be a dict keyed by device.*\{'cpu': '150MB'\}"),
        ({"max_memory": {}}, r"max_memory has no entry for the execution device cpu \(keys: \[\]\)"),
        ({"device_map": "Stream"}, r"device_map='Stream' is not a device map: did you mean device_map='stream'"),
        ({"device_map": "streaming"}, r"device_map='streaming' is not a device map"),
        ({"stream_config": {"device": "meta"}}, r"cannot compute on the meta device"),
    ],
)
def test_arguments_a_user_gets_slightly_wrong_are_named_with_the_fix(checkpoints, kwargs, message):
    """A string max_memory failed with a TypeError about 'in <string>', {} was silently ignored, and a misspelled
    device_map got transformers' list of maps without "stream"."""
    arguments = {"device_map": "stream", **kwargs}
    with pytest.raises(StreamConfigError, match=message):
        AutoModelForCausalLM.from_pretrained(checkpoints("llama"), **arguments)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"gguf_file": "model.gguf"}, "streaming needs safetensors"),
        ({"offload_folder": "/tmp/offload"}, "writes no offload copy"),
        ({"use_kernels": True}, "hub kernels"),
        ({"kernels_mode": "inference"}, "hub kernels"),
        ({"tp_plan": "auto"}, "tensor parallelism"),
    ],
)
def test_options_that_cannot_apply_to_a_streamed_model_say_why(checkpoints, kwargs, reason):
    (name,) = kwargs
    with pytest.raises(StreamConfigError, match=rf"{name}= cannot be used with device_map='stream': .*{reason}"):
        LlamaForCausalLM.from_pretrained(checkpoints("llama"), device_map="stream", **kwargs)


def test_options_that_turn_nothing_on_are_accepted(checkpoints):
    """``use_kernels=False`` (transformers 5.25 kernelizes by default where it can, so users turn it off): nothing to
    refuse; it reached the model's constructor and crashed it."""
    model = load(checkpoints("llama"), use_kernels=False, offload_folder=None, kernels_mode=None)
    assert not getattr(model, "use_kernels", False)


def test_moving_a_streamed_model_to_meta_is_refused_and_leaves_it_working(checkpoints):
    model = load(checkpoints("llama"))
    with pytest.raises(StreamingRuntimeError, match="cannot compute on the meta device.*release"):
        model.to("meta")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
