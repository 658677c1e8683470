"""``hf-weightstream convert``: a ``.bin`` (or TF/Flax) checkpoint to safetensors, once, every weight kept.

A thin layer over `hf_weightstream.convert.to_safetensors`, which loads the model normally with the class its
``config.json`` names (so a causal LM keeps its ``lm_head``, which ``AutoModel`` would drop) and saves it as
safetensors with its tokenizer and generation files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import UsageError, check_repo_id, size_arg

NAME = "convert"
ORDER = 70
HELP = "convert a .bin (or TF/Flax) checkpoint to safetensors, keeping every weight"
DESCRIPTION = """\
Load MODEL normally with the class its config.json names (so a causal LM keeps its lm_head) and
save it as safetensors in OUT, with its tokenizer and generation files. Needed once for checkpoints
that have no safetensors weights; OUT then streams. The model must fit in memory for this step."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="folder or Hub repo id")
    parser.add_argument("out", metavar="OUT", help="new folder for the safetensors model")
    parser.add_argument("--model-class", help="class to load with (default: the one config.json names)")
    parser.add_argument("--dtype", default="auto", help="dtype to save in, e.g. bfloat16 (default: as stored)")
    parser.add_argument(
        "--max-shard-size",
        type=size_arg("max_shard_size"),
        metavar="SIZE",
        default="5GB",
        help="largest shard file (default: 5GB)",
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from ..convert import to_safetensors

    dtype = args.dtype if args.dtype == "auto" else getattr(torch, args.dtype, None)
    if not (dtype == "auto" or isinstance(dtype, torch.dtype)):
        raise UsageError(f"--dtype {args.dtype!r} is not a torch dtype (e.g. bfloat16, float16, float32).")
    model = args.model if Path(args.model).expanduser().is_dir() else check_repo_id(args.model)
    out = to_safetensors(model, args.out, model_class=args.model_class, dtype=dtype, max_shard_size=args.max_shard_size)
    print(f"Wrote {out}: stream it with from_pretrained({str(out)!r}, device_map='stream').")
    return 0
