"""``hf-weightstream bench``: run the benchmark suite (``benchmarks/bench_core.py``) of a source checkout.

The suite is not part of the installed package (it writes a 600 MB model and results next to itself), so the
command looks for the checkout: the working directory or one of its parents, then the folder the package was
imported from (an editable install). It runs ``python -m benchmarks.bench_core`` there with this Python, so it
measures the checkout's own code; options it does not know go to the suite.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from ._common import UsageError

NAME = "bench"
ORDER = 60
HELP = "run the benchmark suite (benchmarks/bench_core.py of a clone)"
DESCRIPTION = """\
Run benchmarks/bench_core.py, the benchmark suite, with this Python, from the clone of the
repository that holds the working directory, or else the clone this package is installed from
(an editable install); the suite is not in the installed package. It says which clone it runs.
Options not listed here go to the suite: see python -m benchmarks.bench_core --help in a clone."""
PASSES_UNKNOWN_OPTIONS = True  # they go to the suite
SUITE = Path("benchmarks") / "bench_core.py"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a short run, for a quick check")


def find_checkout(start: Path) -> Path | None:
    """The source checkout holding ``start`` (or the one the package was imported from), if any."""
    package_root = Path(__file__).resolve().parents[2]
    for folder in [start, *start.parents, package_root]:
        if (folder / SUITE).is_file() and (folder / "hf_weightstream").is_dir():
            return folder
    return None


def run(args: argparse.Namespace) -> int:
    checkout = find_checkout(Path.cwd().resolve())
    if checkout is None:
        raise UsageError(
            f"The benchmark suite ({SUITE}) ships with the source repository, not with the installed package, "
            "and neither this folder nor its parents are a clone of it. Run this command inside a clone."
        )
    print(f"Running {checkout / SUITE} (results in {checkout / 'benchmarks' / 'results'})", file=sys.stderr)
    quick = ["--quick"] if args.quick else []
    return subprocess.call([sys.executable, "-m", "benchmarks.bench_core", *quick, *args.extra], cwd=checkout)
