"""Start-up time of the command line: ``hf-weightstream --help`` and ``--version``, each in a fresh process.

What it answers: do help and version answer at once, now that neither imports torch nor transformers? Each
command runs ``--runs`` times in a fresh interpreter, round-robin with the others so a busy neighbour on a shared
machine slows all of them alike; the report gives the median and the fastest run of each. For scale the same run
times an empty interpreter, ``import torch``, ``import transformers`` with its model code (what
``import hf_weightstream`` cost before), and, with ``--baseline REF``, ``--help`` of the package as it is at the
git revision REF (extracted with ``git archive`` into a temporary folder).

    python -m benchmarks.bench_cli_help                    # 10 runs, baseline: main
    python -m benchmarks.bench_cli_help --runs 3 --baseline ''
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def commands(baseline_root: Path | None) -> dict[str, tuple[list[str], Path]]:
    """Label -> (argv, folder holding the package to run)."""
    python = sys.executable
    out = {
        "python -c pass (empty interpreter)": ([python, "-c", "pass"], REPO),
        "hf-weightstream --help": ([python, "-m", "hf_weightstream", "--help"], REPO),
        "hf-weightstream --version": ([python, "-m", "hf_weightstream", "--version"], REPO),
        "hf-weightstream generate --help": ([python, "-m", "hf_weightstream", "generate", "--help"], REPO),
        "import torch": ([python, "-c", "import torch"], REPO),
        "import transformers.modeling_utils": ([python, "-c", "import transformers.modeling_utils"], REPO),
    }
    if baseline_root is not None:
        out["hf-weightstream --help at the baseline revision"] = (
            [python, "-m", "hf_weightstream", "--help"],
            baseline_root,
        )
    return out


def extract(ref: str, into: Path) -> Path:
    """The package as it is at git revision ``ref``, in ``into``."""
    archive = subprocess.run(["git", "archive", ref, "hf_weightstream"], cwd=REPO, capture_output=True, check=True)
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def time_once(argv: list[str], root: Path) -> float:
    """Run in ``root`` with only ``root`` on PYTHONPATH: ``-m`` imports from the working directory first."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=root, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of each command (default 10)")
    parser.add_argument("--baseline", default="main", help="git revision to compare --help with ('' for none)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the .md and .json reports")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-cli-help-") as scratch:
        baseline = extract(args.baseline, Path(scratch)) if args.baseline else None
        todo = commands(baseline)
        for argv_, root in todo.values():  # warm the page cache and the bytecode caches once
            time_once(argv_, root)
        times: dict[str, list[float]] = {label: [] for label in todo}
        for _ in range(args.runs):
            for label, (argv_, root) in todo.items():
                times[label].append(time_once(argv_, root))

    rows = {label: {"median_s": statistics.median(t), "min_s": min(t), "runs": t} for label, t in times.items()}
    help_median = rows["hf-weightstream --help"]["median_s"]
    date = datetime.date.today().isoformat()
    command = "python -m benchmarks.bench_cli_help" + "".join(
        f" {flag} {value}" for flag, value in (("--runs", args.runs), ("--baseline", repr(args.baseline))) if value
    )
    record = {
        "date": date,
        "command": command,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_after": os.getloadavg(),
        "baseline": args.baseline,
        "results": rows,
    }
    lines = [
        f"# Command-line start-up, {date}",
        "",
        f"Command: `{command}`. Python {record['python']}, {record['machine']}; every figure is the wall time of one "
        f"fresh process, {args.runs} runs each, round-robin. Load average at the end: "
        f"{', '.join(f'{x:.2f}' for x in record['load_average_after'])} (the machine is shared).",
        "",
        "| command | median s | fastest s | median / `--help` |",
        "|---|---:|---:|---:|",
    ]
    for label, row in rows.items():
        lines.append(f"| {label} | {row['median_s']:.3f} | {row['min_s']:.3f} | {row['median_s'] / help_median:.1f}x |")
    if baseline is not None:
        before = rows["hf-weightstream --help at the baseline revision"]["median_s"]
        lines += ["", f"`--help` now takes **{help_median / before:.2f}x** the time it took at `{args.baseline}`."]
    report = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"cli_help_{date}.md").write_text(report)
    (args.out / f"cli_help_{date}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
