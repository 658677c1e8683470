"""Turn a checkpoint streaming cannot read (``pytorch_model.bin``, TF, Flax) into safetensors, once.

The pitfall this avoids: ``AutoModel.from_pretrained(path).save_pretrained(out)`` loads the *base* model, so a
causal LM loses its ``lm_head`` (and a seq2seq model its head) on the way. `to_safetensors` loads the class the
checkpoint's own ``config.json`` names in ``architectures`` (``LlamaForCausalLM``...), which has every weight
the checkpoint has, and writes it with transformers' ``save_pretrained``; tokenizer, processor and generation
files are copied along. The result lands in a temporary folder first and is moved into place when complete.

This is a normal, whole-model load: it needs the model to fit in memory once (transformers maps ``.bin``
files, so that is mostly page cache). From then on the folder streams.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import transformers
from huggingface_hub import snapshot_download

from .config import parse_size
from .errors import CheckpointError, StreamConfigError

# Files that are weights in some format: everything else in a model folder (tokenizer, processor, generation
# config, chat template, README) is copied as it is.
_WEIGHT_SUFFIXES = (".bin", ".safetensors", ".h5", ".msgpack", ".pt", ".pth", ".ckpt", ".gguf", ".index.json")


def model_class_for(config: Any, model_class: str | type | None = None) -> type:
    """The class to load with: ``model_class`` if given, else the first of ``config.architectures``."""
    if isinstance(model_class, type):
        return model_class
    name = model_class or next(iter(getattr(config, "architectures", None) or []), None)
    if name is None:
        raise StreamConfigError(
            "config.json names no architecture, so the model class cannot be chosen for you: pass "
            "model_class='LlamaForCausalLM' (or --model-class), the class whose weights the checkpoint holds."
        )
    cls = getattr(transformers, name, None)
    if cls is None:
        raise StreamConfigError(f"transformers has no class {name!r} (from config.json architectures).")
    return cls


def _local_files(source: str, **download_kwargs: Any) -> Path:
    if os.path.isdir(source):
        return Path(source)
    return Path(snapshot_download(source, ignore_patterns=[f"*{s}" for s in _WEIGHT_SUFFIXES], **download_kwargs))


def to_safetensors(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    model_class: str | type | None = None,
    dtype: Any = "auto",
    max_shard_size: int | str = "5GB",
    **load_kwargs: Any,
) -> Path:
    """Load ``source`` (a folder or Hub repo) normally with the right class and save it as safetensors in ``out_dir``.

    Returns ``out_dir``. ``dtype`` is passed to ``from_pretrained`` (``"auto"`` keeps the checkpoint's).
    """
    source, target = str(source), Path(out_dir)
    shard_bytes = parse_size(max_shard_size, what="max_shard_size")  # before the load: the budget's units, MiB too
    if target.exists() and any(target.iterdir()):
        raise StreamConfigError(f"{target} exists and is not empty: choose a new folder for the converted model.")
    config = transformers.AutoConfig.from_pretrained(source, **load_kwargs)
    cls = model_class_for(config, model_class)
    try:
        model = cls.from_pretrained(source, dtype=dtype, **load_kwargs)
    except OSError as err:
        raise CheckpointError(f"Could not load {source} with {cls.__name__} to convert it: {err}") from err
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.hf_weightstream-{uuid.uuid4().hex[:8]}.tmp"
    try:
        model.save_pretrained(staging, max_shard_size=shard_bytes)
        hub = {k: load_kwargs[k] for k in ("revision", "token", "cache_dir") if k in load_kwargs}
        for path in _local_files(source, **hub).iterdir():
            if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and not (staging / path.name).exists():
                shutil.copy2(path, staging / path.name)
        if target.exists():
            target.rmdir()  # empty, checked above
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
