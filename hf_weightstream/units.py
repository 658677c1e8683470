"""Streaming units: the groups of tensors that are read, made resident and evicted together.

A unit is a decoder block (found from ``_no_split_modules``) or, for tensors outside any block, the module that
holds them (embeddings, final norm, head). Units that share a tensor (tied embeddings) or a weight converter
(fused MoE experts) are merged, so a tied weight is read once and stays one object. Each unit knows the byte
ranges it needs, coalesced so that a block usually costs a single read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._transformers_compat import ConversionGroup, KeyPlan, expected_targets
from .errors import CheckpointError, StreamingRuntimeError
from .index import CheckpointIndex, TensorEntry


@dataclass
class Slot:
    """One place in the model where a tensor is attached (a tied tensor has several)."""

    module: nn.Module
    attr: str
    is_param: bool
    placeholder: torch.Tensor  # the meta tensor put back on eviction

    @property
    def store(self) -> dict[str, Any]:
        """The module's dict this slot lives in (``_parameters`` or ``_buffers``)."""
        return self.module._parameters if self.is_param else self.module._buffers


@dataclass
class TensorSpec:
    """A parameter or persistent buffer the unit installs, and where its bytes come from."""

    name: str
    aliases: list[str]  # every state-dict name of this tensor (several when tied)
    slots: list[Slot]
    shape: tuple[int, ...]
    dtype: torch.dtype  # target dtype on the execution device
    source: TensorEntry | None  # None when a converter group produces it
    requires_grad: bool | None = None  # the flag a normal load ends with (the skeleton's); None: floating point


@dataclass
class ReadRange:
    """A contiguous byte range of one shard, placed at ``buffer_offset`` when the unit is read into one buffer."""

    shard: str
    offset: int
    length: int
    buffer_offset: int


@dataclass(eq=False)
class Holding:
    """Bytes charged to the pool for something that is not a unit (a call's gathered rows or stacked experts, a
    router copy). ``transient`` holdings are given back when the call that made them ends."""

    name: str
    engine: Any = None
    held_bytes: int = 0
    transient: bool = True
    owner: int = 0  # the thread whose call holds it (waiting on oneself can free nothing)


@dataclass(eq=False)
class GatheredRows(Holding):
    """Embedding rows installed for one forward; charged to the pool apart from the unit's own bytes."""

    installed: bool = False
    padding_idx: int | None = None  # the module's own, while the few rows are installed


@dataclass(eq=False)
class Unit:
    """A streaming unit and its residency state (guarded by the owning pool's lock)."""

    name: str
    modules: list[nn.Module]
    specs: list[TensorSpec]
    groups: list[ConversionGroup]
    entries: dict[str, TensorEntry]  # checkpoint key -> entry, for everything the unit reads
    module_names: list[str] = field(default_factory=list)
    enclosing: list[Unit] = field(default_factory=list)  # units whose modules contain this one's (pinned meanwhile)
    ranges: list[ReadRange] = field(default_factory=list)
    raw_bytes: int = 0
    out_bytes: int = 0
    views_only: bool = True  # tensors are dtype-matching views of the bytes read (no cast, no converter)
    resident_bytes: int = 0  # held while resident (0 for a gathered table: it never loads whole)
    charge_bytes: int = 0  # held at the peak of loading: raw bytes plus cast/converted tensors
    # An embedding entry module can look up rows instead of loading the table (see engine.gather). ``gather``:
    # the table is only ever looked up (untied), so the unit never loads whole and is never scheduled.
    gather_from: nn.Module | None = None
    gather: bool = False
    rows: GatheredRows | None = None
    # One expert of an MoE experts module (see experts.py): its tensors are [1, ...] slices, stacked per call.
    expert: Any = None  # the ExpertLayer
    expert_id: int = -1
    # --- runtime state, owned by WeightPool ---
    state: str = "absent"  # absent | loading | resident
    pins: int = 0
    pin_threads: dict[int, int] = field(default_factory=dict)
    loader: int = 0  # the thread that reserved a demand read it has not handed to a reader yet
    tensors: dict[str, torch.Tensor] | None = None
    # Each tensor's version counter when it was read: torch cannot make a tensor read-only, so a write into a
    # resident weight (through the module or a reference kept from an earlier forward) is found by its version.
    versions: dict[str, int | None] = field(default_factory=dict)  # None: read under inference_mode, no counter
    chunks: list[torch.Tensor] | None = None  # the bytes of each range, kept alive while tensors view them
    held_bytes: int = 0  # bytes charged to the budget while loading/resident
    installed: bool = False
    last_used: int = 0
    prefetched: bool = False  # loaded ahead and not yet used
    error: BaseException | None = None
    engine: Any = None

    def locate(self, entry: TensorEntry) -> tuple[int, int]:
        """(index of the range holding ``entry``, offset of the entry inside that range)."""
        for i, rng in enumerate(self.ranges):
            if rng.shard == entry.shard and rng.offset <= entry.offset < rng.offset + rng.length:
                return i, entry.offset - rng.offset
        raise AssertionError(f"{entry.key} is outside the ranges of unit {self.name}")


def _block_classes(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    return names


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class SpecTable:
    """Every tensor the model needs, with where it comes from: read by key, or produced by a converter group."""

    specs: dict[str, TensorSpec]  # by the state-dict name that is read (the first alias of a tied tensor)
    group_of_target: dict[str, ConversionGroup]


def collect_specs(
    model: nn.Module,
    index: CheckpointIndex,
    plan: KeyPlan,
    dtype_of: dict[str, torch.dtype],
    computed: set[str] | frozenset[str] = frozenset(),
) -> SpecTable:
    """Pair every parameter and persistent buffer with its checkpoint source; ``dtype_of``: target dtypes.

    ``computed`` names the weights transformers computes on load instead of reading them
    (`_transformers_compat.computed_keys`): they stay real, as transformers made them.
    """
    state = model.state_dict(keep_vars=True)
    # Aliases: names that are the same tensor object (tied weights).
    by_identity: dict[int, list[str]] = {}
    for name, tensor in state.items():
        by_identity.setdefault(id(tensor), []).append(name)

    group_of_target: dict[str, ConversionGroup] = {}
    for group in plan.groups:
        for target in expected_targets(group, model):
            group_of_target[target] = group

    specs: dict[str, TensorSpec] = {}
    missing: list[str] = []
    for names in by_identity.values():
        source_name = next((n for n in names if n in plan.renamed or n in group_of_target), None)
        if source_name is None:
            if not computed.issuperset(names):  # computed ones stay real, as transformers made them
                missing.append(names[0])
            continue
        slots = []
        for name in names:
            module = model.get_submodule(_parent(name))
            attr = name.rpartition(".")[2]
            slots.append(Slot(module, attr, attr in module._parameters, state[name]))
        placeholder = state[source_name]
        entry = index.entries[plan.renamed[source_name]] if source_name in plan.renamed else None
        if entry is not None:
            _check_compatible(source_name, entry, placeholder)
        specs[source_name] = TensorSpec(
            source_name,
            names,
            slots,
            tuple(placeholder.shape),
            dtype_of.get(source_name, placeholder.dtype),
            entry,
            placeholder.requires_grad if slots[0].is_param else False,
        )
    if missing:
        shown = ", ".join(sorted(missing)[:8]) + (" ..." if len(missing) > 8 else "")
        raise StreamingRuntimeError(
            f"No checkpoint tensor and no initialized value for {len(missing)} weight(s): {shown}. This is a bug of "
            "hf_weightstream's key planning; please report it with the model's config."
        )
    return SpecTable(specs, group_of_target)


def build_units(
    model: nn.Module,
    index: CheckpointIndex,
    table: SpecTable,
    coalesce_gap: int,
    hold_out: frozenset[str] | set[str] = frozenset(),
) -> list[Unit]:
    """Split the model into units and work out what each one reads.

    ``hold_out`` names tensors that get units of their own elsewhere (per-expert units, see ``experts.py``).
    """
    blocks = _block_classes(model)
    block_names = [name for name, module in model.named_modules() if name and type(module).__name__ in blocks]
    outer_blocks = [n for n in block_names if not any(n.startswith(b + ".") for b in block_names if b != n)]

    def unit_of(tensor_name: str) -> str:
        for block in outer_blocks:
            if tensor_name.startswith(block + "."):
                return block
        return _parent(tensor_name)

    specs = {name: spec for name, spec in table.specs.items() if name not in hold_out}
    group_of_target = table.group_of_target
    uf = _UnionFind()
    for spec in specs.values():
        for alias in spec.aliases:  # tied weights share one unit
            uf.union(unit_of(spec.aliases[0]), unit_of(alias))
    for group in {id(g): g for g in group_of_target.values()}.values():
        targets = [t for t in expected_targets(group, model) if t in specs]
        for target in targets[1:]:
            uf.union(unit_of(targets[0]), unit_of(target))

    members: dict[str, list[TensorSpec]] = {}
    for spec in specs.values():
        members.setdefault(uf.find(unit_of(spec.name)), []).append(spec)
    units = []
    for root, unit_specs in members.items():
        module_names = sorted({unit_of(alias) for spec in unit_specs for alias in spec.aliases})
        groups = list({id(g): g for s in unit_specs if (g := group_of_target.get(s.name)) is not None}.values())
        entries = {s.source.key: s.source for s in unit_specs if s.source is not None}
        for group in groups:
            for key, _pattern in group.sources:
                entries[key] = index.entries[key]
        unit = Unit(
            name=root,
            modules=[model.get_submodule(n) for n in module_names],
            specs=unit_specs,
            groups=groups,
            entries=entries,
            module_names=module_names,
        )
        _plan_reads(unit, coalesce_gap)
        unit.gather_from = _embedding_entry(unit)
        if unit.gather_from is not None:
            unit.gather = len(unit.specs[0].slots) == 1  # a tied table is also the head's full matrix
            unit.rows = GatheredRows(f"{root} (rows)")
        measure(unit)
        units.append(unit)
    for unit in units:
        unit.enclosing = [
            other
            for other in units
            if other is not unit
            and any(m.startswith(f"{o}.") or not o for m in unit.module_names for o in other.module_names)
        ]
    return units


def _embedding_entry(unit: Unit) -> nn.Module | None:
    """The embedding module of a unit whose lookups need only the rows of the ids, not the (often huge) table."""
    if len(unit.specs) != 1 or unit.groups:
        return None
    spec = unit.specs[0]
    if spec.source is None or len(spec.shape) != 2:
        return None
    for slot in spec.slots:
        module = slot.module
        # Only a plain lookup can be served from a few rows: max_norm renormalises the looked-up rows of the full
        # table in place, and subclasses with a forward of their own (learned positions that take a shape or a
        # past length, scaled or offset lookups: OPT, BART, Whisper...) may index or read the table their way.
        if (
            isinstance(module, nn.Embedding)
            and type(module).forward is nn.Embedding.forward
            and module.max_norm is None
            and slot.attr == "weight"
        ):
            return module
    return None


def measure(unit: Unit) -> None:
    """Work out what the unit holds, from its specs' (current) dtypes; called again when they change."""
    unit.out_bytes = sum(_nbytes(s.shape, s.dtype) for s in unit.specs)
    unit.views_only = not unit.groups and all(s.source.dtype == s.dtype for s in unit.specs)
    if unit.gather:
        unit.resident_bytes = unit.charge_bytes = 0
    else:
        unit.resident_bytes = full_bytes(unit)
        unit.charge_bytes = unit.raw_bytes + (0 if unit.views_only else unit.out_bytes) + _working_bytes(unit)


# transformers' dequantizers compute in float32: the stored values, then their product with the scales, both as
# large as the output in float32, exist next to it while one tensor converts (Fp8Dequantize._dequantize_one).
DEQUANTIZE_WORKING_FLOAT32_COPIES = 2


def _working_bytes(unit: Unit) -> int:
    """Memory a unit's converters take while they run, beyond its raw and output bytes.

    Groups convert one at a time, so the largest counts. Only dequantizers are charged: a model's own converters
    (concatenating, transposing) produce their output and little else. Not charging this once let four readers
    dequantizing at once take a container past its limit.
    """
    specs = {spec.name: spec for spec in unit.specs}
    most = 0
    for group in unit.groups:
        target = specs.get(group.first_target)
        if target is None or all(
            group.input_dtype(unit.entries[key].dtype, target.dtype) is not None for key, _ in group.sources
        ):
            continue  # no dequantizer: its inputs are cast, then converted as they are
        numel = _nbytes(target.shape, torch.uint8)
        most = max(most, DEQUANTIZE_WORKING_FLOAT32_COPIES * 4 * numel)
    return most


def full_bytes(unit: Unit) -> int:
    """The unit's weights when fully resident, gathered tables included (what ``model_bytes`` reports)."""
    return unit.raw_bytes if unit.views_only else unit.out_bytes


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return numel * dtype.itemsize


def _check_compatible(name: str, entry: TensorEntry, placeholder: torch.Tensor) -> None:
    if tuple(placeholder.shape) != entry.shape:
        raise CheckpointError(
            f"{entry.shard}: tensor {entry.key!r} has shape {list(entry.shape)} but the model built from its "
            f"config expects {list(placeholder.shape)} for {name}. The checkpoint and config.json disagree."
        )
    if entry.dtype.is_floating_point != placeholder.dtype.is_floating_point:
        raise CheckpointError(
            f"{entry.shard}: tensor {entry.key!r} is stored as {entry.dtype} but {name} is a "
            f"{placeholder.dtype} parameter; casting would change its meaning. The checkpoint does not match "
            "the model (is it quantized in a format streaming does not read? It reads unquantized, fine-grained "
            "FP8, MXFP4 and compressed-tensors safetensors checkpoints)."
        )


def _plan_reads(unit: Unit, coalesce_gap: int) -> None:
    """Merge the unit's tensors into as few contiguous reads as possible.

    Bytes between two tensors are read (and charged) only when the gap is small next to what the unit needs: a
    gap is worth reading to save a read call, never worth doubling a small unit (one expert's tensors of an FP8
    or MXFP4 checkpoint lie in separate regions of the file).
    """
    ordered = sorted(unit.entries.values(), key=lambda e: (e.shard, e.offset))
    gap = min(coalesce_gap, max(4096, sum(e.nbytes for e in ordered) // 8))
    ranges: list[ReadRange] = []
    for entry in ordered:
        last = ranges[-1] if ranges else None
        if last and last.shard == entry.shard and entry.offset - (last.offset + last.length) <= gap:
            last.length = max(last.length, entry.offset + entry.nbytes - last.offset)
        else:
            ranges.append(ReadRange(entry.shard, entry.offset, entry.nbytes, 0))
    position = 0
    for rng in ranges:
        rng.buffer_offset = position
        position += rng.length
    unit.ranges = ranges
    unit.raw_bytes = position
