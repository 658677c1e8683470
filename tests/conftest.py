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
