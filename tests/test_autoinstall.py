"""``import hf_weightstream`` is cheap, and still enough for ``from_pretrained(..., device_map="stream")``.

Each import order runs in a fresh interpreter: in this one transformers' model code was imported long ago.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import PreTrainedModel

import hf_weightstream
from hf_weightstream import _autoinstall

ROOT = Path(__file__).resolve().parent.parent

LOAD = """
import sys
{imports}
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="stream")
assert hf_weightstream.stats(model)["bytes_read"] == 0 and model.device.type == "cpu"
print("streamed")
"""


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)


def test_import_loads_neither_torch_nor_transformers() -> None:
    result = _python(
        "import sys, hf_weightstream\n"
        "print(sorted(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))\n"
        "print(hf_weightstream.StreamConfig(budget='1MB').budget_bytes, 'torch' in sys.modules)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "1000000 False"]  # StreamConfig needs no torch either


@pytest.mark.parametrize(
    "imports",
    [
        # our own module imports transformers' model code: the install must not re-enter it half-imported
        "import hf_weightstream\nfrom hf_weightstream.engine import StreamEngine",
        pytest.param("import hf_weightstream", marks=pytest.mark.slow),  # transformers imports it, lazily
        # model code imported directly, not through transformers' lazy module:
        pytest.param("import hf_weightstream\nimport transformers.models.llama.modeling_llama", marks=pytest.mark.slow),
    ],
)  # (transformers first, then hf_weightstream, is how every other test module imports them)
def test_streaming_works_whatever_the_import_order(imports: str, checkpoints) -> None:
    result = _python(LOAD.format(imports=imports), str(checkpoints("llama")))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "streamed"


PIPELINE = """
import sys
import hf_weightstream
from transformers import pipeline
pipe = pipeline("text-generation", model=sys.argv[1], streaming=True)
assert hf_weightstream.stats(pipe.model)["bytes_read"] == 0
pipe = pipeline("text-generation", model=sys.argv[1], stream_config={"budget": "300KB"}, model_kwargs={"dtype": "auto"})
assert hf_weightstream.stats(pipe.model)["budget_bytes"] == 300_000
print(pipe("the cat", max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith("the cat"))
"""


def test_pipeline_streaming_options_reach_the_load(checkpoints) -> None:
    """pipeline() hands keywords it does not know to generate(): the model loaded whole, then its first call failed
    with "model_kwargs are not used by the model: ['streaming']"."""
    result = _python(PIPELINE, str(checkpoints("llama_tied")))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
    from transformers.pipelines import pipeline

    assert pipeline.__module__ == "transformers.pipelines" and getattr(pipeline, "_hf_weightstream", False)
    with pytest.raises(hf_weightstream.StreamConfigError, match="streaming= was given both"):
        pipeline(
            "text-generation", model=str(checkpoints("llama_tied")), streaming=True, model_kwargs={"streaming": True}
        )


def test_trigger_is_where_transformers_defines_its_models() -> None:
    """Fails loudly if transformers moves PreTrainedModel: the integration would then install too late."""
    assert PreTrainedModel.__module__ == _autoinstall.TRIGGER
    assert getattr(PreTrainedModel.from_pretrained, "_hf_weightstream", False)
    assert not any(isinstance(f, _autoinstall._InstallAfterImport) for f in sys.meta_path)  # it removed itself


def test_the_stand_in_installs_on_the_first_call_and_hands_it_on(checkpoints) -> None:
    """What the finder puts in place when transformers' model code loads after ``import hf_weightstream``."""
    import transformers.modeling_utils as modeling_utils
    from transformers import AutoModelForCausalLM

    installed = PreTrainedModel.__dict__["from_pretrained"]
    calls = []
    plain = classmethod(lambda cls, *args, **kwargs: calls.append(cls) or "loaded")
    PreTrainedModel.from_pretrained = plain  # as before any install
    try:
        _autoinstall._install_on_first_call(modeling_utils)
        stand_in = PreTrainedModel.__dict__["from_pretrained"]
        assert stand_in is not plain
        from hf_weightstream import integration

        install = integration.install
        integration.install = lambda: setattr(PreTrainedModel, "from_pretrained", installed)  # type: ignore[attr-defined]
        try:
            model = AutoModelForCausalLM.from_pretrained(checkpoints("llama"), device_map="stream")
        finally:
            integration.install = install
        assert PreTrainedModel.__dict__["from_pretrained"] is installed  # the stand-in went after one call
        assert hasattr(model, "_hf_weightstream") and calls == []
    finally:
        PreTrainedModel.from_pretrained = installed


def test_auto_classes_are_where_transformers_defines_them_and_wrapped() -> None:
    """Fails loudly if transformers moves its auto classes: a streamed Hub load would lose its head start."""
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto import auto_factory

    assert AutoModelForCausalLM.__module__ == _autoinstall.AUTO_TRIGGER and issubclass(
        AutoModelForCausalLM, auto_factory._BaseAutoModelClass
    )
    for cls in (AutoModel, AutoModelForCausalLM, auto_factory._BaseAutoModelClass):
        assert getattr(cls.from_pretrained, "_hf_weightstream", False), cls


AHEAD = """
import json, sys, time
import hf_weightstream
from transformers import AutoModelForCausalLM
from transformers.models.auto import auto_factory

assert "transformers.modeling_utils" not in sys.modules  # the auto class imports the model's code below
marks = {}
find_model_class = auto_factory._get_model_class

def timed(*args, **kwargs):  # the first call imports the model's code
    marks.setdefault("model_code_from", time.monotonic())
    try:
        return find_model_class(*args, **kwargs)
    finally:
        marks.setdefault("model_code_to", time.monotonic())

auto_factory._get_model_class = timed
config = {"complete_download": False}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], device_map="stream", stream_config=config)
assert hf_weightstream.stats(model)["bytes_read"] == 0
print(json.dumps(marks))
"""


def test_a_streamed_auto_load_asks_the_hub_while_transformers_imports_the_model_code(
    checkpoints, tmp_path: Path
) -> None:
    from hubtools import REPO, hub_server, stream_env

    with hub_server({REPO: checkpoints("llama")}, mode="xet") as server:
        env = stream_env(server.url, tmp_path / "cache")
        result = subprocess.run(
            [sys.executable, "-c", AHEAD, REPO], capture_output=True, text=True, env=env, timeout=300
        )
        assert result.returncode == 0, result.stderr
        marks = json.loads(result.stdout.strip().splitlines()[-1])
        log = server.log
    index = [r.time for r in log if r.file == "model.safetensors.index.json"]
    assert marks["model_code_to"] - marks["model_code_from"] > 0.3  # a fresh interpreter's import takes seconds
    # (the headers follow a few round trips later: on a fast machine the import may be over by then)
    assert index and min(index) < marks["model_code_to"], "the index was asked for during the import"
    assert len([r for r in log if r.path.startswith("/api/models/") and "/tree/" not in r.path]) == 1


def test_public_names_load_on_first_use() -> None:
    from hf_weightstream.config import StreamConfig
    from hf_weightstream.residency import WeightPool

    assert hf_weightstream.StreamConfig is StreamConfig and hf_weightstream.WeightPool is WeightPool
    assert set(hf_weightstream.__all__) <= set(dir(hf_weightstream))
    with pytest.raises(AttributeError, match="no attribute 'StreamConfg'"):
        hf_weightstream.StreamConfg  # noqa: B018
