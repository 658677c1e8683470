"""The scripts in examples/ run as users run them: as a subprocess, on the tiny model each builds by default.

Each takes about 4 s, nearly all of it importing torch and transformers in the new process.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"

# Script -> lines its output must contain: what the example is there to show.
EXPECTED = {
    "generate.py": ["bytes_read:", "peak_resident_bytes:", "hits:", "misses:"],
    "pipeline.py": ["answer:", "bytes of weights"],
    "larger_than_budget.py": ["% of the model", "kept resident:", "hit rate", "<= budget"],
    "model_switching.py": ["model A:", "model B:", "pool.stats():", '"evictions"'],
    "lazy_hub.py": ["serving", "HTTP requests:", "weights read by the engine:"],
}


def test_every_example_is_tested_and_says_what_it_shows() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(EXPECTED)
    for name in scripts:
        docstring = ast.get_docstring(ast.parse((EXAMPLES / name).read_text()))
        assert docstring and f"python examples/{name}" in docstring, name


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(script: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    env.pop("HF_ENDPOINT", None)  # lazy_hub.py sets its own; the others never touch the Hub
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, env=env, timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for expected in EXPECTED[script]:
        assert expected in result.stdout, (expected, result.stdout)
    assert "Traceback" not in result.stderr
