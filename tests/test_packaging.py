"""What a package index and a new user see: the license, the wheel's contents and metadata, the changelog, and
scripts that explain themselves."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import hf_weightstream

ROOT = Path(__file__).resolve().parent.parent
# sha256 of the Apache License 2.0 text as the Apache Software Foundation publishes it (LICENSE-2.0.txt).
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"


def test_license_file_is_the_apache_2_text() -> None:
    assert hashlib.sha256((ROOT / "LICENSE").read_bytes()).hexdigest() == APACHE_2_SHA256


def test_pyproject_declares_the_license_as_an_spdx_expression() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"  # the TOML-table form is deprecated
    assert project["license-files"] == ["LICENSE"]
    assert "Typing :: Typed" in project["classifiers"]


def test_changelog_has_a_section_for_this_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert changelog.startswith("# Changelog")
    assert f"\n## {hf_weightstream.__version__}\n" in changelog


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The wheel built from a copy of the sources (the build writes next to them), and the build's log."""
    pytest.importorskip("setuptools")
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "hf_weightstream", source / "hf_weightstream", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-v", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (built,) = out.glob("hf_weightstream-*.whl")
    return built, result.stdout + result.stderr


def test_wheel_builds_without_deprecation_warnings(wheel: tuple[Path, str]) -> None:
    _, log = wheel
    assert "deprecat" not in log.lower(), [line for line in log.splitlines() if "eprecat" in line]


def test_wheel_ships_license_type_marker_and_every_subcommand(wheel: tuple[Path, str]) -> None:
    built, _ = wheel
    assert built.name.startswith(f"hf_weightstream-{hf_weightstream.__version__}-")
    with zipfile.ZipFile(built) as archive:
        names = set(archive.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        fields = archive.read(metadata).decode()
    assert "hf_weightstream/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in fields and "Provides-Extra: demo" in fields
    subcommands = {p.name for p in (ROOT / "hf_weightstream" / "cli").glob("*.py")}
    assert {f"hf_weightstream/cli/{name}" for name in subcommands} <= names


def test_gpu_check_script_explains_itself_and_fails_plainly_without_a_gpu(tmp_path: Path) -> None:
    script = ROOT / "scripts" / "gpu_check.sh"
    bash = shutil.which("bash")
    assert bash
    shown = subprocess.run([bash, script, "--help"], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0
    assert "NVIDIA GPU" in shown.stdout and "Usage" in shown.stdout and "OUT=" in shown.stdout
    # A PATH without nvidia-smi (an empty folder) stands for a machine without a GPU.
    env = {**os.environ, "PATH": str(tmp_path)}
    missing = subprocess.run([bash, script], capture_output=True, text=True, timeout=30, env=env)
    assert missing.returncode == 1 and "no NVIDIA GPU here" in missing.stderr
    wrong = subprocess.run([bash, script, "--gpu"], capture_output=True, text=True, timeout=30, env=env)
    assert wrong.returncode == 2 and "unknown argument" in wrong.stderr
