"""Mixture-of-experts layers that read only the experts the router picks.

transformers 5 gives every modern MoE the same seam: the MoE block calls an experts module (a class decorated with
``@use_experts_implementation``, holding 3-D parameters such as ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]``) as ``experts(hidden_states, top_k_index, top_k_weights)``, and the eager, ``batched_mm``
and ``grouped_mm`` implementations index those parameters by the routed ids only. So an experts module computes
exactly the same thing when it is given, for one call, only the experts that call uses:

* parameters ``index_select(0, used)`` (biases and per-expert scales too), stacked in ascending id order (the
  eager loop adds experts in id order, so the order is part of the bits);
* routed ids renumbered into ``0..len(used)-1`` in the same order, ids ``>= E`` (expert-parallel sentinels,
  identity experts) moved to stay above the compact range;
* ``num_experts = len(used)`` (``grouped_mm`` sizes its histogram by it, eager its one-hot).

Each expert of each layer is therefore its own residency unit, read with its own coalesced range(s) from the
original checkpoint: per-expert tensors (``experts.{e}.gate_proj.weight``, run through transformers' converter for
that one expert) or a dim-0 slice of a fused ``[E, ...]`` tensor. The block unit no longer carries the experts.
`ExpertsHook` acquires the routed experts of each call (a decode token reads k of E experts, not E), stacks
them, and restores everything after the call, also when it raises.

Experts stay resident as a cache under the pool's budget; the engine ranks them by expected distance to their
next use from a decayed routing frequency, which keeps hot experts of skewed routers where LRU would cycle them
out. Routers are tiny: each layer keeps a copy of its router, and the layer before applies it to its own hidden
state to predict the next layer's experts, which are read while this layer and the next attention compute. A
wrong guess costs a read, never a wrong output.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from accelerate.hooks import ModelHook
from torch import nn

from ._transformers_compat import ConversionGroup, expected_targets
from .errors import not_copyable
from .index import TensorEntry
from .units import Holding, TensorSpec, Unit, _plan_reads, measure

if TYPE_CHECKING:
    from .engine import StreamEngine
    from .index import CheckpointIndex
    from .units import SpecTable

# Implementations known to index expert parameters by routed id only; others (GPU kernels) stream whole.
COMPACT_IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm", None)
_TOP_K_NAMES = ("num_experts_per_tok", "num_experts_per_token", "experts_per_token", "moe_topk", "top_k")
FREQUENCY_DECAY = 0.95  # per call of the layer: about twenty tokens of memory
# A predicted expert is read ahead only where predictions of its rank have come true this often: a wrong guess
# costs its bytes, and at 0.8 what speculation wastes stays under a quarter of what it reads usefully.
PREFETCH_PRECISION = 0.8
RANK_DECAY = 0.98  # per call: how fast a layer's prediction record forgets


@dataclass
class Shrinkability:
    """Whether an experts-like module reads only routed experts, and why not (shown by ``inspect``)."""

    name: str
    cls: str
    per_expert: bool
    reason: str


@dataclass(eq=False)
class ExpertLayer:
    """One experts module split into per-expert units, and what its calls have learned."""

    name: str
    module: nn.Module
    num_experts: int
    params: list[str]  # attribute names of the per-expert parameters, [E, ...] each
    full_names: dict[str, str]  # attribute -> state-dict name
    placeholders: dict[str, torch.Tensor]
    stored: dict[str, TensorEntry]  # attribute -> its fused [E, ...] checkpoint tensor, where it is read as is
    units: list[Unit]
    ids_position: int  # routed ids: positional index in forward(...) (after self)
    ids_name: str
    top_k: int | None
    router: nn.Module | None
    block: Unit | None = None  # the unit whose forward runs this module (its place in the schedule)
    next: ExpertLayer | None = None  # the MoE layer that runs after this one (learned on the first pass)
    # --- learned at run time (guarded by the pool's lock where shared with readers) ---
    frequency: torch.Tensor | None = None  # decayed probability that a call routes to each expert
    router_copy: tuple[torch.Tensor, torch.Tensor | None] | None = None
    router_holding: Holding | None = None
    predicted: frozenset[int] = frozenset()  # experts read ahead for the next call (expected to be needed)
    prediction: torch.Tensor | None = None  # [tokens, k]: the router copy's ranked guesses for the next call
    rank_tries: torch.Tensor | None = None  # per rank of a guess: decayed guesses, and how many came true
    rank_hits: torch.Tensor | None = None
    stack: Holding | None = None
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def expert_bytes(self) -> int:
        return max((u.resident_bytes for u in self.units), default=0)

    @property
    def router_bytes(self) -> int:
        """What the router copy will hold (its weight and a bias), known before it is ever read."""
        weight = getattr(self.router, "weight", None)
        if weight is None:
            return 0
        return weight.numel() * weight.element_size() + self.num_experts * weight.element_size()


def _is_experts_module(module: nn.Module) -> bool:
    """The ``@use_experts_implementation`` contract: its attributes and a dispatching forward."""
    return (
        isinstance(getattr(module, "num_experts", None), int)
        and all(hasattr(module, attr) for attr in ("has_gate", "is_transposed", "_is_expert_parallel"))
        and hasattr(type(module).forward, "__wrapped__")
    )


def _routed_ids_argument(module: nn.Module) -> tuple[int, str]:
    """Position and name of the routed-ids argument (``top_k_index``, gpt-oss' ``router_indices``...)."""
    parameters = list(inspect.signature(inspect.unwrap(type(module).forward)).parameters)[1:]  # drop self
    if len(parameters) < 3:
        raise ValueError(f"{type(module).__name__}.forward takes {parameters}, not (hidden, ids, weights)")
    return 1, parameters[1]


def _router_of(parent: nn.Module, experts: nn.Module, num_experts: int) -> nn.Module | None:
    """The sibling module that scores experts: a ``[E, hidden]`` weight (Linear or a TopK router)."""
    for child in parent.children():
        weight = getattr(child, "weight", None)
        scores_experts = isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == num_experts
        if child is not experts and scores_experts:
            return child
    return None


def _top_k(router: nn.Module | None, parent: nn.Module, config: Any) -> int | None:
    for owner in (router, parent):
        value = getattr(owner, "top_k", None)
        if isinstance(value, int) and value > 0:
            return value
    for attr in _TOP_K_NAMES:
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def survey(model: nn.Module) -> list[Shrinkability]:
    """Every experts-like module: which read per expert, and which stream whole and why (for ``inspect``)."""
    implementation = getattr(model.config, "_experts_implementation", None)
    out = []
    for name, module in model.named_modules():
        if _is_experts_module(module):
            if implementation not in COMPACT_IMPLEMENTATIONS:
                reason = f"experts_implementation={implementation!r} replaces the forward with a kernel"
                out.append(Shrinkability(name, type(module).__name__, False, reason))
            else:
                out.append(Shrinkability(name, type(module).__name__, True, "reads only the routed experts"))
        elif type(module).__name__.endswith("Experts") and any(p.dim() == 3 for p in module.parameters(False)):
            reason = "its forward runs every expert densely (not an @use_experts_implementation module)"
            out.append(Shrinkability(name, type(module).__name__, False, reason))
    return out


def _slice_entry(entry: TensorEntry, expert: int, num_experts: int) -> TensorEntry:
    """Expert ``expert`` of a fused ``[E, ...]`` checkpoint tensor: a contiguous dim-0 slice."""
    stride = entry.nbytes // num_experts
    return TensorEntry(
        f"{entry.key}#expert{expert}",
        entry.shard,
        entry.offset + expert * stride,
        stride,
        entry.dtype,
        (1, *entry.shape[1:]),
    )


def _split_group(
    group: ConversionGroup, index: CheckpointIndex, num_experts: int
) -> list[tuple[list[tuple[str, str]], dict[str, TensorEntry]]] | None:
    """Per expert: the converter's sources and their entries, or None when the sources are not per expert."""
    by_pattern: dict[str, list[str]] = {}
    for key, pattern in group.sources:  # already in transformers' natural key order
        by_pattern.setdefault(pattern, []).append(key)
    per_expert: list[tuple[list[tuple[str, str]], dict[str, TensorEntry]]] = [([], {}) for _ in range(num_experts)]
    for pattern, keys in by_pattern.items():
        if len(keys) == num_experts:  # experts.{e}.gate_proj.weight ...: list position is the expert id
            for e, key in enumerate(keys):
                per_expert[e][0].append((key, pattern))
                per_expert[e][1][key] = index.entries[key]
        elif len(keys) == 1 and index.entries[keys[0]].shape[:1] == (num_experts,):
            for e in range(num_experts):  # a fused [E, ...] source (gpt-oss blocks and scales)
                sliced = _slice_entry(index.entries[keys[0]], e, num_experts)
                per_expert[e][0].append((sliced.key, pattern))
                per_expert[e][1][sliced.key] = sliced
        else:
            return None
    return per_expert


def build_expert_layers(
    model: nn.Module, table: SpecTable, index: CheckpointIndex, coalesce_gap: int
) -> list[ExpertLayer]:
    """Split every experts module that follows the contract into per-expert units."""
    implementation = getattr(model.config, "_experts_implementation", None)
    if implementation not in COMPACT_IMPLEMENTATIONS:
        return []
    layers = []
    for name, module in model.named_modules():
        if not _is_experts_module(module):
            continue
        layer = _build_layer(model, name, module, table, index, coalesce_gap)
        if layer is not None:
            layers.append(layer)
    return layers


def _build_layer(
    model: nn.Module, name: str, module: nn.Module, table: SpecTable, index: CheckpointIndex, coalesce_gap: int
) -> ExpertLayer | None:
    num_experts = module.num_experts
    params = [attr for attr, p in module._parameters.items() if p is not None and p.shape[:1] == (num_experts,)]
    full_names = {attr: f"{name}.{attr}" for attr in params}
    if not params or any(full not in table.specs for full in full_names.values()):
        return None
    if any(len(table.specs[full].aliases) > 1 for full in full_names.values()):
        return None  # tied expert weights: leave them to the block
    try:
        ids_position, ids_name = _routed_ids_argument(module)
    except (TypeError, ValueError):
        return None
    sources: dict[str, Any] = {}  # attr -> per-expert (sources, entries) or sliced entries
    for attr, full in full_names.items():
        spec = table.specs[full]
        if spec.source is not None:
            sources[attr] = [_slice_entry(spec.source, e, num_experts) for e in range(num_experts)]
            continue
        group = table.group_of_target[full]
        if any(target not in full_names.values() for target in expected_targets(group, model)):
            return None  # the converter also produces tensors outside this module
        split = _split_group(group, index, num_experts)
        if split is None:
            return None
        sources[attr] = (group, split)

    units = []
    for e in range(num_experts):
        specs, groups, entries = [], {}, {}
        for attr, full in full_names.items():
            spec = table.specs[full]
            source = sources[attr]
            if isinstance(source, list):
                entries[source[e].key] = source[e]
                specs.append(TensorSpec(full, [full], [], (1, *spec.shape[1:]), spec.dtype, source[e]))
                continue
            group, split = source
            if id(group) not in groups:
                keys, group_entries = split[e]
                sliced = {target: (1, *table.specs[target].shape[1:]) for target in expected_targets(group, model)}
                groups[id(group)] = ConversionGroup(
                    group.first_target, group.template, list(keys), group.quantizer, sliced
                )
                entries.update(group_entries)
            specs.append(TensorSpec(full, [full], [], (1, *spec.shape[1:]), spec.dtype, None))
        unit = Unit(name=f"{name}[{e}]", modules=[], specs=specs, groups=list(groups.values()), entries=entries)
        unit.expert_id = e
        _plan_reads(unit, coalesce_gap)
        measure(unit)
        units.append(unit)

    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    router = _router_of(parent, module, num_experts)
    layer = ExpertLayer(
        name=name,
        module=module,
        num_experts=num_experts,
        params=params,
        full_names=full_names,
        placeholders={attr: module._parameters[attr] for attr in params},
        stored={attr: table.specs[full].source for attr, full in full_names.items() if table.specs[full].source},
        units=units,
        ids_position=ids_position,
        ids_name=ids_name,
        top_k=_top_k(router, parent, model.config),
        router=router,
    )
    for unit in units:
        unit.expert = layer
    layer.frequency = torch.full((num_experts,), (layer.top_k or 1) / num_experts, dtype=torch.float64)
    layer.rank_tries = torch.zeros(layer.top_k or 1, dtype=torch.float64)
    layer.rank_hits = torch.zeros(layer.top_k or 1, dtype=torch.float64)
    layer.counters = dict.fromkeys(COUNTERS, 0)
    return layer


# Per layer: calls; routed experts found resident, read, or still being read ahead; router-copy guesses and how
# many came true (per token and rank); experts read ahead on a guess, and how many the call then used; experts
# the calls routed to while a prediction existed (what prefetch recall is out of).
COUNTERS = ("calls", "hits", "misses", "late", "guesses", "guesses_right", "prefetched", "prefetched_used", "routed")


def stack_buffer(layer: ExpertLayer, attr: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    """An empty stack for ``attr``, at the address alignment the plain load's parameter has.

    A plain load keeps a fused ``[E, ...]`` checkpoint tensor read as is where the file maps it, so its address
    modulo 64 is its file offset's, and CPU kernels (``grouped_mm``, some matmuls) take other paths, with other
    roundings, for other alignments. Converted or cast parameters are fresh allocations (64-byte aligned), as
    an empty tensor is.
    """
    entry = layer.stored.get(attr)
    misalign = entry.offset % 64 if entry is not None and entry.dtype == dtype and device.type == "cpu" else 0
    if not misalign:
        return torch.empty(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = torch.empty(nbytes + 64, dtype=torch.uint8)
    start = (misalign - raw.data_ptr()) % 64
    return raw[start : start + nbytes].view(dtype).view(shape)


def held_out_names(layers: list[ExpertLayer]) -> set[str]:
    return {full for layer in layers for full in layer.full_names.values()}


def assemble(layer: ExpertLayer, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The full ``[E, ...]`` parameters ``names`` (state-dict names; all by default) of an experts module, for a
    read outside its calls: one expert unit resident at a time under the budget, copied into new tensors."""
    engine = layer.units[0].engine
    names = list(layer.full_names.values()) if names is None else names
    out: dict[str, torch.Tensor] = {}
    for unit in layer.units:
        engine.acquire_many([unit], layer)  # experts have no module slots: read, not installed
        try:
            for full in names:
                part = unit.tensors[full]
                if full not in out:
                    out[full] = torch.empty((layer.num_experts, *part.shape[1:]), dtype=part.dtype, device=part.device)
                out[full][unit.expert_id] = part[0]
        finally:
            engine.release_many([unit])
    return out


# ---------------------------------------------------------------------------------------------------- the call
def _routed_ids(layer: ExpertLayer, args: tuple, kwargs: dict) -> torch.Tensor:
    if layer.ids_name in kwargs:
        return kwargs[layer.ids_name]
    return args[layer.ids_position]


def _with_ids(layer: ExpertLayer, args: tuple, kwargs: dict, ids: torch.Tensor) -> tuple[tuple, dict]:
    if layer.ids_name in kwargs:
        return args, {**kwargs, layer.ids_name: ids}
    args = list(args)
    args[layer.ids_position] = ids
    return tuple(args), kwargs


def renumber(ids: torch.Tensor, used: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routed ids mapped into ``0..len(used)-1`` in ascending order; ids >= E stay above the compact range."""
    lookup = torch.full((num_experts,), -1, dtype=ids.dtype, device=ids.device)
    lookup[used.to(ids.device)] = torch.arange(used.numel(), dtype=ids.dtype, device=ids.device)
    routed = ids < num_experts
    compact = lookup[ids.clamp(max=num_experts - 1)]
    return torch.where(routed, compact, ids - num_experts + used.numel())


def predict(layer: ExpertLayer, hidden_states: torch.Tensor) -> torch.Tensor | None:
    """Ranked guesses ``[tokens, k]`` of the experts ``layer`` will route ``hidden_states`` to: the top-k of its
    router copy's logits (None before the router was first seen)."""
    if layer.router_copy is None or layer.top_k is None:
        return None
    weight, bias = layer.router_copy
    flat = hidden_states.detach().reshape(-1, hidden_states.shape[-1])
    if flat.shape[-1] != weight.shape[1]:
        return None
    logits = F.linear(flat.to(weight.device, weight.dtype), weight)
    if bias is not None:
        logits = logits + bias
    return logits.topk(min(layer.top_k, layer.num_experts), dim=-1).indices.cpu()


def score_prediction(layer: ExpertLayer, ids: torch.Tensor) -> None:
    """How the guesses made for this call fared, by rank, against each token's own routing ``ids`` [T, k]."""
    guesses = layer.prediction
    layer.prediction = None
    ids = ids.detach().reshape(-1, ids.shape[-1]).cpu()
    if guesses is None or guesses.shape[0] != ids.shape[0]:
        return
    right = (guesses.unsqueeze(-1) == ids.unsqueeze(1)).any(-1)  # [T, k]: guess (t, r) is among t's experts
    ranks = min(right.shape[1], layer.rank_tries.numel())
    layer.rank_tries.mul_(RANK_DECAY)[:ranks] += right.shape[0]
    layer.rank_hits.mul_(RANK_DECAY)[:ranks] += right[:, :ranks].sum(0).double()
    layer.counters["guesses"] += right.numel()
    layer.counters["guesses_right"] += int(right.sum())


def worth_reading(layer: ExpertLayer, guesses: torch.Tensor) -> list[int]:
    """Guessed experts whose rank has come true often enough to be read ahead (Laplace-smoothed)."""
    trusted = (layer.rank_hits + 1) / (layer.rank_tries + 2) >= PREFETCH_PRECISION
    ranks = [r for r in range(min(guesses.shape[1], trusted.numel())) if trusted[r]]
    return sorted(set(guesses[:, ranks].reshape(-1).tolist())) if ranks else []


def capture_router(layer: ExpertLayer) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """A private copy of the router's scores (it is resident while its block runs), for predictions later."""
    router = layer.router
    if router is None or getattr(router, "weight", None) is None or router.weight.device.type == "meta":
        return None
    weight = router.weight.detach().clone()
    bias = None
    for name in ("bias", "e_score_correction_bias"):
        extra = getattr(router, name, None)
        if isinstance(extra, torch.Tensor) and extra.shape == (layer.num_experts,) and extra.device.type != "meta":
            bias = extra.detach().clone().to(weight.dtype) if bias is None else bias + extra.detach().to(weight.dtype)
    return weight, bias


class ExpertsHook(ModelHook):
    """Gives an experts module, for one call, only the experts its routed ids use."""

    def __init__(self, engine: StreamEngine, layer: ExpertLayer):
        self.engine = engine
        self.layer = layer

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        layer = self.layer
        ids = _routed_ids(layer, args, kwargs)
        hidden_states = args[0] if args else next(iter(kwargs.values()))
        used = torch.unique(ids.detach().reshape(-1).cpu())
        used = used[used < layer.num_experts]
        if used.numel() == 0:  # only sentinels: any one expert keeps the shapes valid
            used = torch.zeros(1, dtype=used.dtype)
        stacks = self.engine.run_experts(layer, used, hidden_states, ids)
        for attr, tensor in stacks.items():
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        module.num_experts = used.numel()
        return _with_ids(layer, args, kwargs, renumber(ids, used, layer.num_experts))

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self.engine.end_experts(self.layer)
        return output

    def __repr__(self) -> str:
        return f"ExpertsHook(layer={self.layer.name!r}, experts={self.layer.num_experts})"

    def __deepcopy__(self, memo: dict) -> ExpertsHook:
        raise not_copyable(f"The experts module {self.layer.name!r}")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise not_copyable(f"The experts module {self.layer.name!r}")
