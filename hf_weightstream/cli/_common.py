"""Helpers the subcommands share: argument types, model resolution and loading, answers and the figures reported
on them (``generate --stats-json`` writes them, ``demo`` reads them back), plain-text output.

Importing this module must stay cheap (no torch, no transformers at module level): ``hf-weightstream --help``
imports every subcommand module, and each of them imports this one. Functions that need torch or transformers
import them inside.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import parse_size
from ..errors import StreamConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..config import StreamConfig

PROG = "hf-weightstream"
DEMO_ALIAS = "demo"
DTYPES = ("auto", "float32", "bfloat16", "float16")


class UsageError(Exception):
    """Bad input found by the command line itself (a path that does not exist, an empty prompt...): exit 2."""


# ------------------------------------------------------------------------------------------------ formatting
def format_bytes(n: float) -> str:
    """Decimal units, like the budgets users type ("150MB")."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def format_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def table(rows: list[tuple[str, ...]], header: tuple[str, ...] | None = None, align: str = "") -> str:
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


# ------------------------------------------------------------------------------------------------- answers
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

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Answer:
        """The answer in a ``generate --stats-json`` record."""
        return cls(*(record[name] for name in ANSWER_FIELDS))


ANSWER_FIELDS = ("new_token_ids", "text", "total_seconds", "first_token_seconds", "ms_per_token")


@dataclass
class Overlap:
    """How much of the time spent reading weights ran while the model computed (from the engine's event log).

    Both figures are wall-clock time: intervals of several reader threads that run at once count once.
    """

    read_seconds: float  # time during which at least one read ran
    overlapped_seconds: float  # ... and a module computed at the same time

    @property
    def fraction(self) -> float | None:
        return self.overlapped_seconds / self.read_seconds if self.read_seconds else None

    @classmethod
    def of_events(cls, events: list[tuple[str, str, float, float, str]]) -> Overlap:
        """``events`` as ``engine.events`` logs them: ``(kind, unit, start, end, thread)``, kind read/compute."""
        reads = _union([(start, end) for kind, _, start, end, _ in events if kind == "read"])
        computes = _union([(start, end) for kind, _, start, end, _ in events if kind == "compute"])
        overlapped = 0.0
        j = 0
        for start, end in reads:  # both lists are sorted and disjoint: one merge pass
            while j < len(computes) and computes[j][1] <= start:
                j += 1
            k = j
            while k < len(computes) and computes[k][0] < end:
                overlapped += min(end, computes[k][1]) - max(start, computes[k][0])
                k += 1
        return cls(sum(end - start for start, end in reads), overlapped)


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def overlap_line(overlap: Overlap) -> str:
    if overlap.fraction is None:
        return "no weights were read (all resident)"
    return (
        f"reading weights took {format_seconds(overlap.read_seconds)}; {overlap.fraction:.0%} of it "
        "ran while the model computed"
    )


def stream_report(stats: dict[str, Any], answer: Answer, rss: int | None, overlap: Overlap | None) -> str:
    """A few lines on where time and bytes went, for stderr after a streamed answer."""
    per_token = f"{answer.ms_per_token:.0f} ms/token after the first" if answer.ms_per_token else "one token"
    lines = [
        f"{answer.tokens} tokens in {answer.total_seconds:.2f} s: "
        f"first token {format_seconds(answer.first_token_seconds)}, {per_token}",
        f"read {format_bytes(stats['bytes_read'])} of weights in {stats['reads']} reads "
        f"({format_bytes(stats['read_bandwidth_bytes_per_s'])}/s, io {stats['io']}); hits {stats['hits']} "
        f"({stats['prefetch_hits']} read ahead in time), misses {stats['misses']}, late prefetches "
        f"{stats['late_prefetches']}, evictions {stats['evictions']}",
        f"peak resident {format_bytes(stats['peak_resident_bytes'])} of a "
        f"{format_bytes(stats['budget_bytes'])} budget ({format_bytes(stats['model_bytes'])} model, "
        f"{stats['kept_resident_units']} of {stats['units']} units kept resident)",
        f"waited {format_seconds(stats['stall_seconds'])} for weights; "
        f"peak RSS of the process {format_bytes(rss) if rss else 'n/a'}",
    ]
    if overlap is not None:
        planned = stats.get("predicted_overlap")
        plan = "" if planned is None else f" (read-ahead depth {stats['depth']}; the plan predicted {planned:.0%})"
        lines.append(overlap_line(overlap) + plan)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- arguments
def size_arg(what: str) -> Callable[[str], int]:
    """The parser of a SIZE argument; its errors name what the size is of (argparse names only the option)."""

    def parse(value: str) -> int:
        try:
            return parse_size(value, what)
        except StreamConfigError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def fraction_arg(value: str) -> float:
    try:
        fraction = float(value)
    except ValueError:
        fraction = 0.0
    if not 0 < fraction <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction of the model size in (0, 1], got {value!r}")
    return fraction


def _int_arg(value: str, low: int, high: int | None, expected: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if number < low or (high is not None and number > high):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {value!r}")
    return number


def positive_int_arg(value: str) -> int:
    return _int_arg(value, 1, None, "a positive integer")


def non_negative_int_arg(value: str) -> int:
    return _int_arg(value, 0, None, "0 or a positive integer")


def port_arg(value: str) -> int:
    return _int_arg(value, 0, 65535, "a TCP port from 0 (any free port) to 65535")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--dtype`` and ``--lookahead``, which every command that loads a streamed model takes."""
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


# ---------------------------------------------------------------------------------------------------- models
def resolve_model(name: str | None) -> str:
    """A local folder or a Hub repo id; ``None`` or ``"demo"`` is the demo model, prepared on first use.

    Checked here because transformers would take a mistyped path for a repo id and try the network.
    """
    if name is None or name == DEMO_ALIAS:
        from ..demo_model import prepare_demo_model

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


def torch_dtype(name: str) -> str | torch.dtype:
    import torch

    return name if name == "auto" else getattr(torch, name)


def generator_class(model_id: str) -> Any:
    """The Auto class that builds a text generator from ``model_id``'s config.

    Sequence-to-sequence where the config names such an architecture or only that kind exists for its type (T5,
    BART: BART also has a decoder-only class, which would drop the encoder), else causal; anything else (an
    encoder, a vision model) is refused with what to do instead of transformers' list of 200 config classes.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL,
    )
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES as SEQ2SEQ,
    )

    config = AutoConfig.from_pretrained(model_id)
    named = set(config.architectures or [])
    if named & set(SEQ2SEQ.values()) or (config.model_type in SEQ2SEQ and config.model_type not in CAUSAL):
        return AutoModelForSeq2SeqLM
    if config.model_type in CAUSAL:
        return AutoModelForCausalLM
    raise UsageError(
        f"{model_id} is a {config.model_type!r} model ({', '.join(sorted(named)) or 'no architecture named'}), "
        "neither a causal nor a sequence-to-sequence language model, and the CLI generates text. Stream it from "
        "Python with its own class: from_pretrained(..., device_map='stream')."
    )


def load_streamed(model_id: str, config: StreamConfig, dtype: str = "auto") -> PreTrainedModel:
    import torch

    if config.device is not None and config.device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {config.device}: this torch build or machine has no CUDA GPU.")
    return generator_class(model_id).from_pretrained(
        model_id, device_map="stream", stream_config=config, dtype=torch_dtype(dtype)
    )


def load_tokenizer(model_id: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError) as err:
        said = " ".join(str(err).split()) or type(err).__name__
        raise UsageError(f"Cannot load a tokenizer for {model_id} (generation needs one): {said}") from None


def stream_config(**fields: Any) -> StreamConfig:
    from ..config import StreamConfig

    return StreamConfig(**fields)
