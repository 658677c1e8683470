"""``hf-weightstream generate``: answer a prompt (or chat) with a streamed model, tokens on stdout as they come.

``--stats-json`` writes everything the demo compares (answer, timings, peak RSS before and after loading, the
engine's statistics and the read/compute overlap), so the demo runs each contender as a fresh
``generate`` process and reads that record; ``--full-load`` is the normal, non-streamed contender.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import POLICIES
from ._common import (
    Answer,
    Overlap,
    UsageError,
    add_model_options,
    generator_class,
    load_streamed,
    load_tokenizer,
    peak_rss_bytes,
    positive_int_arg,
    resolve_model,
    size_arg,
    stream_config,
    stream_report,
    torch_dtype,
)

NAME = "generate"
ORDER = 20
HELP = "answer a prompt with a streamed model, printing tokens as they come"
DESCRIPTION = """\
Answer PROMPT (or stdin) with MODEL streamed under --budget. Tokens go to stdout as they are
produced; bytes read, hits, stalls and memory go to stderr at the end. The tokenizer's chat
template is applied when it has one. Decoding is greedy unless --sample."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL", help="folder, repo id or 'demo' (default: demo)")
    parser.add_argument("prompt", nargs="?", metavar="PROMPT", help="the prompt (default: read stdin)")
    parser.add_argument(
        "--budget",
        type=size_arg("budget"),
        metavar="SIZE",
        help="bytes of weights held at once (default: from free memory)",
    )
    parser.add_argument("--policy", choices=POLICIES, default="schedule", help="eviction policy (default: schedule)")
    parser.add_argument("--device", help="execution device, e.g. cpu or cuda:0 (default: first GPU, else cpu)")
    add_model_options(parser)
    parser.add_argument(
        "--max-new-tokens", type=positive_int_arg, metavar="N", default=128, help="answer length limit (default: 128)"
    )
    parser.add_argument("--chat", action="store_true", help="interactive chat on stdin (empty line ends)")
    parser.add_argument("--sample", action="store_true", help="sample with the model's generation settings")
    parser.add_argument("--no-chat-template", action="store_true", help="feed the prompt as raw text")
    parser.add_argument("--quiet", action="store_true", help="no statistics on stderr")
    parser.add_argument(
        "--stats-json", metavar="PATH", help="also write the answer, timings and statistics to PATH as JSON"
    )
    parser.add_argument(
        "--full-load",
        action="store_true",
        help="load the whole model normally instead of streaming it (to compare; takes no --budget)",
    )


def run(args: argparse.Namespace) -> int:
    if args.stats_json and args.chat:
        raise UsageError("--stats-json records one answer; it cannot be combined with --chat.")
    if args.stats_json and not Path(args.stats_json).expanduser().parent.is_dir():
        raise UsageError(f"--stats-json {args.stats_json}: its folder does not exist.")
    if args.full_load and args.budget is not None:
        raise UsageError("--full-load loads every weight: it takes no --budget.")
    import hf_weightstream

    from ._generation import chat_loop, encode, run_generate

    model_id = resolve_model(args.model)
    # The baseline is the peak RSS before any weight is read: the interpreter, torch, transformers, the tokenizer
    # and, when streaming, the model's skeleton (its weights stay on the meta device until a forward needs them).
    if args.full_load:
        tokenizer = load_tokenizer(model_id)
        baseline_rss = peak_rss_bytes()
        start = time.perf_counter()
        model = _load_full(model_id, args)
        load_seconds = time.perf_counter() - start
    else:
        config = stream_config(budget=args.budget, policy=args.policy, lookahead=args.lookahead, device=args.device)
        start = time.perf_counter()
        model = load_streamed(model_id, config, args.dtype)  # checks the weights' files before the tokenizer
        load_seconds = time.perf_counter() - start
        tokenizer = load_tokenizer(model_id)
        baseline_rss = peak_rss_bytes()

    def report(answer: Answer) -> None:
        """Figures for this answer alone: counters restart after each (one per turn in a chat)."""
        if args.full_load:
            if not args.quiet:
                print(f"{answer.tokens} tokens in {answer.total_seconds:.2f} s (full load)", file=sys.stderr)
            return
        if not args.quiet:
            overlap = Overlap.of_events(list(model._hf_weightstream.events))
            print(stream_report(hf_weightstream.stats(model), answer, peak_rss_bytes(), overlap), file=sys.stderr)
        hf_weightstream.reset_stats(model)

    if args.chat:
        chat_loop(model, tokenizer, args.max_new_tokens, first=args.prompt, after_turn=report, sample=args.sample)
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
            "pid": os.getpid(),
            "full_load": args.full_load,
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "load_seconds": load_seconds,
            "baseline_rss_bytes": baseline_rss,
            "peak_rss_bytes": peak_rss_bytes(),
            **asdict(answer),
            **_weights_record(model, args.full_load),
        }
        Path(args.stats_json).write_text(json.dumps(record, indent=2) + "\n")
    report(answer)
    return 0


def _load_full(model_id: str, args: argparse.Namespace) -> Any:
    from transformers.utils import logging as hf_logging

    if args.device and args.device != "cpu":
        raise UsageError("--full-load runs on the CPU, as a plain from_pretrained does; it takes no --device.")
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar would land in the middle of the answer
    try:
        return generator_class(model_id).from_pretrained(model_id, dtype=torch_dtype(args.dtype))
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _weights_record(model: Any, full_load: bool) -> dict[str, Any]:
    """What the weights cost: the engine's statistics when streamed, the parameters' size for a full load."""
    if full_load:
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        return {"weights_bytes": weights, "stats": None, "overlap": None}
    import hf_weightstream

    overlap = Overlap.of_events(list(model._hf_weightstream.events))
    return {"weights_bytes": None, "stats": hf_weightstream.stats(model), "overlap": asdict(overlap)}
