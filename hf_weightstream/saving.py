"""``save_pretrained`` and ``state_dict`` of a streamed model: one unit at a time, never the whole model at once.

A streamed model exists to run models bigger than memory, so it must also save them without holding them:
`save_pretrained` plans every shard from shapes and dtypes alone (safetensors headers are known before a byte of
weight is read), then makes each unit resident in turn, the way a forward pass does, and streams its tensors
into the shard files. Peak memory is one unit under the model's budget, whatever the shard size, which is what
makes re-sharding and dtype casts (``model.to(torch.bfloat16).save_pretrained(out)``) of a model bigger than
memory possible.

What is written is what transformers' own ``save_pretrained`` writes: the same names (tied copies and
``_keys_to_ignore_on_save`` left out, weight conversions such as fused MoE experts reverted to the checkpoint
layout), config and generation config with ``dtype`` and ``architectures`` set, sharded the same way. Everything
goes to a temporary folder next to the destination first and is moved into place only once complete, so a
failure or a kill never leaves a half-written model where one is expected.

``model.state_dict()`` returns a `StreamedStateDict`: a read-only mapping whose values are real tensors, each
read (under the budget) when it is looked up. Iterating it visits the model unit by unit.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import _transformers_compat as compat
from .config import parse_size
from .errors import StreamConfigError
from .experts import ExpertLayer, assemble
from .index import DTYPE_NAMES
from .placeholders import serve

if TYPE_CHECKING:
    from .engine import StreamEngine
    from .units import Unit

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"


def _engine(model: Any) -> StreamEngine:
    return model.__dict__["_hf_weightstream"]


def _filled_by(model: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """The module and attribute that state-dict ``name`` is read from in the model as it is now."""
    path, _, attr = name.rpartition(".")
    try:
        return model.get_submodule(path), attr
    except AttributeError:
        return None


def _owners(
    model: nn.Module, engine: StreamEngine, names: set[str] | None = None
) -> dict[str, tuple[Unit | ExpertLayer, str]]:
    """State-dict name -> (the unit or experts layer that streams it, the name it materialises it under), for
    ``names`` (all by default: one lookup asks for its own name only, not the module path of every weight).

    Only names whose module the engine still fills: a module the user swapped in (``resize_token_embeddings``,
    a new head) holds its own real tensors and is saved from them.
    """
    engine.adopt_all_replaced()  # a weight the user replaced while it was resident is theirs now
    out: dict[str, tuple[Unit | ExpertLayer, str]] = {}
    for unit in engine.units:
        if unit.expert is not None:
            continue
        for spec in unit.specs:
            slots = {(id(slot.module), slot.attr) for slot in spec.slots}
            for alias in spec.aliases:
                here = _filled_by(model, alias) if names is None or alias in names else None
                if here is not None and (id(here[0]), here[1]) in slots:
                    out[alias] = (unit, spec.name)
    for layer in engine.expert_layers:
        for attr, full in layer.full_names.items():
            if (names is None or full in names) and _filled_by(model, full) == (layer.module, attr):
                out[full] = (layer, full)
    return out


class _Reading:
    """Makes units resident one at a time for reads outside a forward (one held, the previous one released).

    An experts module split into per-expert units (experts.py) is read expert by expert into its full
    parameters, which are kept until the next name outside that module is asked for.
    """

    def __init__(self, model: nn.Module, names: set[str] | None = None):
        self.model = model
        self.engine = _engine(model)
        self.owners = _owners(model, self.engine, names)
        self.unit: Unit | None = None
        self.layer: ExpertLayer | None = None
        self.assembled: dict[str, torch.Tensor] = {}

    def tensor(self, name: str) -> torch.Tensor:
        owner = self.owners.get(name)
        if owner is None:  # not streamed: a buffer or weight the skeleton holds for real
            return self.model.get_parameter_or_buffer(name).detach()
        source, spec_name = owner
        if isinstance(source, ExpertLayer):
            if source is not self.layer:
                self.close()
                self.layer, self.assembled = source, assemble(source)
            return self.assembled[name]
        if source is not self.unit:
            self.close()
            serve(self.engine, source)
            self.unit = source
        return source.tensors[spec_name].detach()

    def close(self) -> None:
        self.layer, self.assembled = None, {}
        if self.unit is not None:
            self.engine.release(self.unit)
            self.unit = None


class StreamedStateDict(Mapping):
    """``model.state_dict()`` of a streamed model: real tensors, each read from the checkpoint when looked up.

    Looking a tensor up makes its unit resident under the budget (as a forward would) and returns a tensor that
    stays valid after the unit is evicted. Keep only what you need: holding every value holds the whole model.
    """

    def __init__(self, model: nn.Module, keys: list[str]):
        self._model = model
        self._keys = keys
        self._index = set(keys)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._index:
            raise KeyError(name)
        reading = _Reading(self._model, {name})
        try:
            return reading.tensor(name)
        finally:
            reading.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:  # type: ignore[override]
        """Pairs in model order, each unit read once."""
        reading = _Reading(self._model)
        try:
            for name in self._keys:
                yield name, reading.tensor(name)
        finally:
            reading.close()

    def values(self) -> Iterator[torch.Tensor]:  # type: ignore[override]
        return (value for _name, value in self.items())

    def __reduce__(self) -> tuple:
        # torch.save / pickle: the values themselves (as many bytes as the model), not a handle on the model; as
        # the OrderedDict a plain state_dict() is, which torch.load(weights_only=True) accepts.
        return (collections.OrderedDict, (), None, None, self.items())

    def __repr__(self) -> str:
        return f"StreamedStateDict({len(self)} tensors, read on lookup)"


def state_dict(model: nn.Module, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False):
    """``model.state_dict()``: a `StreamedStateDict`; the module objects themselves with ``keep_vars=True``."""
    if args or destination is not None or prefix or keep_vars:
        # The module tensors themselves (placeholders while not resident), as torch gives them: what transformers'
        # and accelerate's internals ask for.
        return nn.Module.state_dict(model, *args, destination=destination, prefix=prefix, keep_vars=keep_vars)
    return StreamedStateDict(model, list(nn.Module.state_dict(model, keep_vars=True)))


# ------------------------------------------------------------------------------------------------ saving
@dataclass
class _Group:
    """The tensors of one unit (or the real, non-streamed ones) as they will be written."""

    names: list[str]  # state-dict names
    unit: Unit | ExpertLayer | None  # None: tensors the skeleton holds for real
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)  # saved name -> spec

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(dtype, shape) for dtype, shape in self.out.values())


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * dtype.itemsize


def _plan_groups(model: nn.Module, engine: StreamEngine) -> list[_Group]:
    tensors = nn.Module.state_dict(model, keep_vars=True)
    for name in model._keys_to_ignore_on_save or ():
        tensors.pop(name, None)
    meta = {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in tensors.items()}
    kept = compat.remove_tied_weights(meta, model)
    owners = _owners(model, engine)
    groups: dict[int, _Group] = {}
    # Model order: an experts module right after the block unit that runs it.
    order = {id(unit): float(i) for i, unit in enumerate(engine.units) if unit.expert is None}
    for layer in engine.expert_layers:
        order[id(layer)] = order.get(id(layer.block), len(order)) + 0.5
    for name in kept:
        owner = owners[name][0] if name in owners else None
        groups.setdefault(id(owner), _Group([], owner)).names.append(name)
    ordered = sorted(groups.values(), key=lambda g: order.get(id(g.unit), float(len(order))))
    for group in ordered:
        reverted = compat.revert_weight_conversion(model, {name: meta[name] for name in group.names})
        group.out = {name: (t.dtype, tuple(t.shape)) for name, t in reverted.items()}
    return ordered


def _pack(groups: list[_Group], max_bytes: int) -> list[list[tuple[_Group, list[str]]]]:
    """Shards as lists of (group, saved names), a unit kept in one shard unless it alone is too big."""
    shards: list[list[tuple[_Group, list[str]]]] = [[]]
    size = 0
    for group in groups:
        pieces = [list(group.out)] if group.nbytes <= max_bytes else [[name] for name in group.out]
        for names in pieces:
            nbytes = sum(_nbytes(*group.out[name]) for name in names)
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append((group, names))
            size += nbytes
    return shards


def _header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        end = offset + _nbytes(dtype, shape)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


def _write_shard(path: Path, model: nn.Module, engine: StreamEngine, pieces: list[tuple[_Group, list[str]]]) -> None:
    entries = [(name, *group.out[name]) for group, names in pieces for name in names]
    reading = _Reading(model)
    with open(path, "wb") as f:
        f.write(_header(entries))
        try:
            for group, names in pieces:
                real = {name: reading.tensor(name) for name in group.names}
                reverted = compat.revert_weight_conversion(model, real)
                for name in names:
                    tensor = reverted[name]
                    if tensor.dtype != group.out[name][0] or tuple(tensor.shape) != group.out[name][1]:
                        raise RuntimeError(
                            f"{name}: planned as {group.out[name]} but materialised as {tensor.dtype} "
                            f"{list(tensor.shape)}"
                        )
                    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                    f.write(memoryview(data.numpy()))
                del real, reverted
                reading.close()
        finally:
            reading.close()
        f.flush()
        os.fsync(f.fileno())


def _weights_name(variant: str | None) -> str:
    return SAFE_WEIGHTS.replace(".safetensors", f".{variant}.safetensors") if variant else SAFE_WEIGHTS


def save_pretrained(
    model: Any,
    save_directory: str | os.PathLike,
    is_main_process: bool = True,
    state_dict: dict | None = None,
    push_to_hub: bool = False,
    max_shard_size: int | str = "50GB",
    variant: str | None = None,
    safe_serialization: bool = True,
    **kwargs: Any,
) -> None:
    """``model.save_pretrained(...)`` for a streamed model (see module docstring); the folder loads normally."""
    if state_dict is not None:
        raise StreamConfigError(
            "save_pretrained(state_dict=...) is not supported for a streamed model: it saves its own weights, read "
            "unit by unit from the checkpoint. Call save_pretrained without state_dict."
        )
    if push_to_hub:
        raise StreamConfigError(
            "save_pretrained(push_to_hub=True) is not supported for a streamed model: save to a folder, then "
            "upload it with `hf upload REPO FOLDER` or huggingface_hub.upload_folder."
        )
    if not safe_serialization:
        raise StreamConfigError("A streamed model saves safetensors only (safe_serialization=True).")
    unsupported = sorted(set(kwargs) - {"token", "save_peft_format", "save_original_format", "distributed_checkpoint"})
    if unsupported or not kwargs.get("save_original_format", True) or kwargs.get("distributed_checkpoint"):
        raise StreamConfigError(
            f"save_pretrained options {unsupported or sorted(kwargs)} are not supported for a streamed model."
        )
    if not is_main_process:
        return
    target = Path(save_directory)
    if target.is_file():
        raise StreamConfigError(f"save_pretrained: {target} is a file, not a folder.")
    engine = _engine(model)
    groups = _plan_groups(model, engine)
    shards = _pack(groups, parse_size(max_shard_size, what="max_shard_size"))
    weights = _weights_name(variant)
    if len(shards) == 1:
        names = [weights]
    else:
        stem = weights.removesuffix(".safetensors")
        names = [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.hf_weightstream-{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    try:
        model.config.dtype = str(model.dtype).split(".")[1]  # as transformers' save_pretrained records them
        model.config.architectures = [type(model).__name__]
        if model.is_remote_code():
            compat.custom_object_save(model, staging, config=model.config)
        model.config.save_pretrained(staging)
        if model.can_generate():
            model.generation_config.save_pretrained(staging)
        weight_map = {}
        for name, pieces in zip(names, shards, strict=True):
            _write_shard(staging / name, model, engine, pieces)
            weight_map.update({saved: name for group, saved_names in pieces for saved in saved_names})
        if len(shards) > 1:
            index_name = SAFE_INDEX.replace(".safetensors", f".{variant}.safetensors") if variant else SAFE_INDEX
            total = sum(group.nbytes for group in groups)
            metadata = {"total_parameters": model.num_parameters(), "total_size": total}  # as transformers writes
            index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
            (staging / index_name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        _commit(staging, target, weights)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _commit(staging: Path, target: Path, weights: str) -> None:
    """Move the complete save into place: the whole folder at once, or file by file into an existing one."""
    if not target.exists():
        os.replace(staging, target)
        return
    stem = weights.removesuffix(".safetensors")
    new = {p.name for p in staging.iterdir()}
    for path in sorted(staging.iterdir(), key=lambda p: p.name.endswith(".json")):  # weights first, then indexes
        os.replace(path, target / path.name)
    for path in target.iterdir():  # weight files of an earlier save that this one does not have
        stale_shard = path.name.startswith(f"{stem}-") and path.name.endswith(".safetensors")
        stale_index = path.name == f"{stem}.safetensors.index.json" or path.name == weights
        if (stale_shard or stale_index) and path.name not in new:
            path.unlink()
