"""``from_pretrained(..., device_map="stream")``: the transformers integration.

transformers has no plugin registry for device-map modes, so importing hf_weightstream wraps
``PreTrainedModel.from_pretrained`` (idempotently: notebooks re-run cells). The Auto classes and pipelines end
there too: they pass ``device_map``, ``streaming`` and ``stream_config`` through as kwargs the config does not
use, and the wrapper takes them out and builds the streamed model instead of loading one.

A streamed model behaves like a normal one: ``model.device`` is the execution device, ``.to()``/``.cuda()``
retarget it instead of moving (absent) weights, ``hf_device_map`` names the execution device (a ``torch.device``) so
pipelines accept it.
"""

from __future__ import annotations

import copy
import functools
import itertools
import os
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_utils import ModuleUtilsMixin
from transformers.utils import GENERATION_CONFIG_NAME
from transformers.utils.hub import resolve_revision

from . import _transformers_compat as compat
from . import log, quantization, saving
from .checkpoint import download_kwargs_of, open_hub_repo, open_local_folder
from .config import META_DEVICE, StreamConfig, parse_size, stream_request
from .engine import StreamEngine
from .errors import BudgetError, CheckpointError, StreamConfigError, StreamingRuntimeError, not_copyable
from .experts import build_expert_layers, held_out_names
from .hooks import attach
from .limits import (
    FREED_AT_ONCE_BYTES,
    MemoryLimits,
    default_budget,
    memory_limits,
    return_freed_memory_promptly,
)
from .placeholders import is_placeholder
from .residency import WeightPool, get_default_pool
from .sources import choose_reader
from .support import check_supported
from .units import Slot, TensorSpec, Unit, build_units, collect_specs, full_bytes

_ATTR = "_hf_weightstream"
_labels = itertools.count(1)

# from_pretrained options that cannot apply to a streamed model, with the reason we give.
_UNSUPPORTED = {
    "gguf_file": "streaming needs safetensors, not GGUF (load it normally once and save_pretrained it)",
    "state_dict": "streaming reads weights from files, not from an in-memory state_dict",
    "tp_plan": "tensor parallelism is not supported with streaming",
    "distributed_config": "distributed loading is not supported with streaming",
    "offload_folder": "streaming reads the original files and writes no offload copy",
    "use_kernels": "hub kernels are not supported with streaming",
    "kernels_mode": "hub kernels are not supported with streaming",
}


def install() -> None:
    """Wrap transformers' loader and the ``device`` property (safe to call any number of times)."""
    if getattr(PreTrainedModel.from_pretrained, "_hf_weightstream", False):
        return
    model_loader = PreTrainedModel.from_pretrained.__func__

    @functools.wraps(model_loader)
    def from_pretrained(cls: type, pretrained_model_name_or_path: Any, *model_args: Any, **kwargs: Any) -> Any:
        config = stream_request(kwargs)
        if config is None:
            return model_loader(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        return load_streamed(cls, pretrained_model_name_or_path, *model_args, stream_config=config, **kwargs)

    from_pretrained._hf_weightstream = True
    PreTrainedModel.from_pretrained = classmethod(from_pretrained)

    device_property = ModuleUtilsMixin.device

    def device(self: Any) -> torch.device:
        engine = self.__dict__.get(_ATTR)
        return engine.device if engine is not None else device_property.fget(self)

    ModuleUtilsMixin.device = property(device, doc=device_property.__doc__)


def engine_of(model: Any) -> StreamEngine:
    """The engine of a streamed model, or a clear error for a normal one."""
    engine = getattr(model, "__dict__", {}).get(_ATTR)
    if engine is None:
        raise StreamingRuntimeError(
            f"{type(model).__name__} is not a streamed model: load it with from_pretrained(..., device_map='stream')."
        )
    return engine


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _budget_from_max_memory(max_memory: dict | None, device: torch.device) -> int | None:
    if max_memory is None:
        return None
    if not isinstance(max_memory, dict):
        raise StreamConfigError(
            f"max_memory must be a dict keyed by device, as transformers takes it, e.g. max_memory={{'cpu': "
            f"{max_memory!r}}}; got {type(max_memory).__name__} {max_memory!r}."
        )
    keys: list[Any] = [str(device), device]
    if device.type == "cuda":
        keys += [device.index, f"cuda:{device.index}"]
    else:
        keys.append("cpu")
    for key in keys:
        if key in max_memory:
            return parse_size(max_memory[key], what=f"max_memory[{key!r}]")
    raise StreamConfigError(
        f"max_memory has no entry for the execution device {device} (keys: {list(max_memory)}); "
        f"add one, e.g. max_memory={{{'cpu' if device.type == 'cpu' else device.index!r}: '2GB'}}."
    )


def load_streamed(
    cls: type[PreTrainedModel],
    pretrained_model_name_or_path: Any,
    *model_args: Any,
    stream_config: StreamConfig,
    **kwargs: Any,
) -> Any:
    """Build ``cls`` on the meta device and attach streaming hooks; reads configs and headers only."""
    for name, reason in _UNSUPPORTED.items():
        if kwargs.pop(name, None):  # one that turns nothing on (use_kernels=False) is dropped, as transformers does
            raise StreamConfigError(f"{name}= cannot be used with device_map='stream': {reason}.")
    if model_args:
        raise StreamConfigError("Positional model arguments are not supported with streaming; pass a config.")
    if pretrained_model_name_or_path is None:
        raise StreamConfigError("Streaming needs a model folder or Hub repo id to read weights from.")
    config = kwargs.pop("config", None)
    output_loading_info = kwargs.pop("output_loading_info", False)
    dtype = kwargs.pop("dtype", None)
    torch_dtype = kwargs.pop("torch_dtype", None)
    dtype = dtype if dtype is not None else torch_dtype
    max_memory = kwargs.pop("max_memory", None)
    quantization_config = kwargs.pop("quantization_config", None)
    key_mapping = kwargs.pop("key_mapping", None)
    generation_config = kwargs.pop("generation_config", None)
    variant = kwargs.pop("variant", None)
    trust_remote_code = kwargs.pop("trust_remote_code", None)
    from_auto = kwargs.pop("_from_auto", False)
    from_pipeline = kwargs.pop("_from_pipeline", None)
    if kwargs.pop("use_safetensors", None) is False:
        raise StreamConfigError("use_safetensors=False cannot be streamed: streaming reads safetensors files.")
    # A PEFT adapter: the auto classes found adapter_config.json and load its base model, naming the adapter in
    # adapter_kwargs["_adapter_model_path"] (a model class given the adapter's folder finds it here). It is loaded
    # on the streamed model as transformers' own from_pretrained loads it; it was dropped, and the base model's
    # outputs came back as the adapted model's.
    adapter_kwargs = dict(kwargs.pop("adapter_kwargs", None) or {})
    adapter_name = kwargs.pop("adapter_name", None) or "default"
    for name in (
        "low_cpu_mem_usage",
        "_fast_init",
        "offload_buffers",
        "ignore_mismatched_sizes",
        "weights_only",
        "disable_mmap",
        "tqdm_class",
        "_commit_hash",
    ):
        kwargs.pop(name, None)
    download_kwargs = download_kwargs_of(kwargs)
    adapter_path = None
    # No round trip to the Hub for it: the auto classes have looked for a Hub repo's adapter_config.json already.
    if "_adapter_model_path" in adapter_kwargs or (
        Path(str(pretrained_model_name_or_path), download_kwargs["subfolder"] or "", "adapter_config.json").is_file()
    ):
        adapter_path, pretrained_model_name_or_path, adapter_kwargs = compat.maybe_load_adapters(
            pretrained_model_name_or_path, download_kwargs, adapter_kwargs
        )
    name = str(pretrained_model_name_or_path)
    local = os.path.isdir(name)
    if not local:
        download_kwargs["revision"] = resolve_revision(
            name,
            download_kwargs["revision"],
            token=download_kwargs["token"],
            local_files_only=download_kwargs["local_files_only"],
            cache_dir=download_kwargs["cache_dir"],
        )

    if not isinstance(config, PreTrainedConfig):
        config, model_kwargs = cls.config_class.from_pretrained(
            config if config is not None else name,
            return_unused_kwargs=True,
            _from_auto=from_auto,
            _from_pipeline=from_pipeline,
            **download_kwargs,
            **kwargs,
        )
    else:
        model_kwargs = kwargs
    if "attn_implementation" in model_kwargs:
        config._attn_implementation = model_kwargs.pop("attn_implementation")
    if "experts_implementation" in model_kwargs:
        config._experts_implementation = model_kwargs.pop("experts_implementation")
    fusion_config = model_kwargs.pop("fusion_config", None)
    if fusion_config is not None:  # runtime fusions (patch embeddings as Linear), as transformers applies them
        config.fusion_config = copy.deepcopy(fusion_config)

    hf_quantizer = quantization.prepare(config, quantization_config, name)  # before any weight file is opened
    if local:
        checkpoint = open_local_folder(Path(name) / download_kwargs["subfolder"], variant)
    else:
        checkpoint = open_hub_repo(
            name,
            download_kwargs,
            variant,
            max_connections=stream_config.max_connections,
            complete_download=stream_config.complete_download,
            # adjust_generation_fn below reads it: fetched with the index and headers, not a round trip after them
            also_download=(GENERATION_CONFIG_NAME,) if generation_config is None and cls.can_generate() else (),
        )

    # A load that fails from here on (a refused architecture, a budget too small...) stops the checkpoint's
    # background work: a Hub repo's head start would otherwise go on downloading for a model nobody holds.
    try:
        quantization.validate(checkpoint.index, hf_quantizer)
        config, dtype = compat.resolve_dtype(dtype, config, checkpoint.index.first_float_dtype(), hf_quantizer)
        config.name_or_path = name
        model = compat.build_skeleton(cls, config, dtype, model_kwargs, hf_quantizer)
        check_supported(model)
        entries = checkpoint.index.entries
        shapes = {key: tuple(entry.shape) for key, entry in entries.items()}
        plan = compat.plan_checkpoint_keys(model, list(entries), key_mapping, hf_quantizer, shapes)
        quantization.check_scales_are_used(checkpoint.index, hf_quantizer, plan.unexpected)
        # What no checkpoint tensor fills is made by the model's own init, as a normal load makes it: transformers
        # computes some (Marian's sinusoidal positions) and initializes the rest randomly (a new task head, a pooler
        # the checkpoint never had), with its load report. They stay real, outside the budget.
        computed = compat.missing_keys(model, plan)
        _refuse_mostly_missing(model, computed - compat.computed_keys(model, computed))
        compat.materialize_computed(model, computed)
        dtype_of = compat.target_dtypes(model, dtype)

        device = stream_config.device or default_device()
        pool = stream_config.pool
        if pool is None and stream_config.budget_bytes is None and max_memory is None:
            pool = get_default_pool()
        table = collect_specs(model, checkpoint.index, plan, dtype_of, computed)
        expert_layers = (
            build_expert_layers(model, table, checkpoint.index, stream_config.coalesce_gap)
            if stream_config.experts == "routed"
            else []
        )
        units = build_units(
            model, checkpoint.index, table, stream_config.coalesce_gap, hold_out=held_out_names(expert_layers)
        )
        all_units = units + [unit for layer in expert_layers for unit in layer.units]
        # Hub streaming fetches ahead in this order (no-op for local files). Routed experts only when every byte is
        # fetched anyway (a prefill routes to most of them); else only what the model reads: the experts it routes to.
        checkpoint.plan_fetches(all_units if stream_config.complete_download else units)
        model_bytes = sum(full_bytes(u) for u in all_units)
        limits = memory_limits(device)  # what this process may really use: cgroups, RLIMIT_AS, the GPU, the host
        if device.type == "cpu" and model_bytes > limits.available and return_freed_memory_promptly():
            log.logger.info(
                "The model (%s bytes) does not fit in the %s bytes this process may use: freed blocks of %s bytes "
                "and more now go back to the system at once (glibc's M_MMAP_THRESHOLD)",
                f"{model_bytes:,}",
                f"{limits.available:,}",
                f"{FREED_AT_ONCE_BYTES:,}",
            )
        sized_here = pool is None and stream_config.budget_bytes is None and max_memory is None
        if pool is None:
            budget = stream_config.budget_bytes or _budget_from_max_memory(max_memory, device)
            # No budget given: sized below, once the engine knows what the model needs at once.
            pool = WeightPool(budget or 2 * model_bytes, device=device, num_workers=stream_config.num_workers)
        elif max_memory is not None:
            raise StreamConfigError("Pass either max_memory= or a StreamConfig pool, not both.")

        engine = StreamEngine(
            model,
            units,
            checkpoint.source,
            pool,
            device,
            policy=stream_config.policy,
            lookahead=stream_config.lookahead,
            label=f"{name}#{next(_labels)}",
            expert_layers=expert_layers,
        )
        if sized_here:  # what the model needs at once (an MoE call's experts included) is known from the engine
            pool.budget = _default_budget(engine.minimum_budget(), model_bytes, limits)
        engine.check_budget()
        engine.reader, engine.io_reason = choose_reader(
            checkpoint.source,
            stream_config.io,
            device=device,
            budget=pool.budget,
            model_bytes=model_bytes,
            limits=limits,
            max_in_flight=stream_config.num_workers,
        )
        engine.checkpoint = checkpoint
        engine.quantization = quantization.describe(hf_quantizer)
        if hf_quantizer is not None:
            compat.finish_quantized(model, hf_quantizer)
        if device.type != "cpu":
            _move_real_tensors(model, device)
        attach(model, engine)
        for module in model.modules():
            if isinstance(module, PreTrainedModel):
                module.__dict__[_ATTR] = engine
        # A torch.device, not the string "cpu": peft (PeftModel.from_pretrained, AutoPeftModelFor*) takes a map with
        # "cpu" or "disk" for accelerate's CPU offload, removes every accelerate hook (the streaming hooks too) and
        # dispatches the model again, which failed. Pipelines and accelerate take a torch.device as well.
        model.hf_device_map = {"": device}
        _bind_device_methods(model, engine)
        _dedupe_tied_walks(model, engine)
        log.log_load(model, engine, log.budget_origin(stream_config, max_memory, get_default_pool()))

        if model.can_generate() and hasattr(model, "adjust_generation_fn"):
            generation_kwargs = {k: v for k, v in download_kwargs.items()}
            name_for_generation = str(Path(name)) if local else name
            model.adjust_generation_fn(
                generation_config,
                from_auto,
                from_pipeline,
                name_for_generation,
                **generation_kwargs,
                trust_remote_code=trust_remote_code,
            )
        info = compat.report_load(model, name, computed, set(plan.unexpected))
        if adapter_path is not None:
            if download_kwargs.get("token") is not None:
                adapter_kwargs["token"] = download_kwargs["token"]
            info = model.load_adapter(adapter_path, adapter_name=adapter_name, adapter_kwargs=adapter_kwargs)
    except BaseException:
        checkpoint.source.close()
        raise

    if output_loading_info:
        return model, info.to_dict()
    return model


MAX_INITIALIZED_SHARE = 0.1  # of the model's bytes: more is a checkpoint that does not match, not a new head


def _refuse_mostly_missing(model: torch.nn.Module, initialized: set[str]) -> None:
    """Refuse a checkpoint that lacks much of the model: a normal load would initialize it all randomly, in memory,
    which is what streaming is there to avoid; it is the wrong checkpoint for this class far more often than not."""
    if not initialized:
        return
    tensors = {id(t): (name, t) for name, t in model.state_dict(keep_vars=True).items()}
    total = sum(t.numel() * t.element_size() for _, t in tensors.values())
    missing = sum(t.numel() * t.element_size() for name, t in tensors.values() if name in initialized)
    if missing <= MAX_INITIALIZED_SHARE * total:
        return
    shown = ", ".join(sorted(initialized)[:8]) + (" ..." if len(initialized) > 8 else "")
    raise CheckpointError(
        f"The checkpoint has no tensor for {len(initialized)} weight(s) the model needs: {shown} "
        f"({missing / total:.0%} of its bytes). A normal from_pretrained would initialize them with random values; "
        f"streaming does so only for up to {MAX_INITIALIZED_SHARE:.0%} of a model (a new task head), as they are "
        "held in memory outside the budget. Check that the checkpoint matches the model class/config."
    )


def _default_budget(need: int, model_bytes: int, limits: MemoryLimits) -> int:
    """The budget when none was given: a share of the tightest limit's room, at most twice the model.

    More than the model leaves room for what loads next to resident weights: a cast unit's raw bytes, the
    stacked copy of an MoE call's routed experts. ``need``, the engine's `minimum_budget`, may exceed twice a
    small model (a cast unit's raw and cast bytes, a call routed to every expert): it is then the cap.
    """
    chosen = default_budget(max(2 * model_bytes, need), limits)
    if chosen.bytes < need:
        raise BudgetError(
            f"This process may use too little memory to stream this model: {chosen.explain()}, but the model needs "
            f"{need:,} bytes at once (its largest unit while it loads, or an MoE call routed to every expert). Free "
            "memory or raise the limit; a budget given with StreamConfig(budget=...) or max_memory= is used as given."
        )
    return chosen.bytes


def _move_real_tensors(
    model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype | None = None,
    origins: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Move what the model holds for real (non-persistent buffers, weights computed on load, tensors the user put in
    place of streamed ones) to ``device`` and ``dtype``; parameters in place, as ``nn.Module._apply`` does, so a
    tied parameter stays one tensor.

    Buffers are cast from ``origins``, (module, name) -> (the buffer as first seen, the one made from it), while the
    module still holds the one made: the streamed weights are read from the checkpoint again at each change, so a
    round trip (``.half().float()``) is lossless for them, and must be for the buffers computed with them (rotary
    frequencies) too.
    """
    seen: set[int] = set()
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is None or buf.device.type == "meta":
                continue
            key = (id(module), name)
            origin, made = origins.get(key, (buf, buf)) if origins is not None else (buf, buf)
            source = origin if made is buf else buf  # a buffer the model replaced since is cast from itself
            cast = (dtype or buf.dtype) if buf.is_floating_point() else None
            module._buffers[name] = source.to(device=device, dtype=cast)
            if origins is not None:
                origins[key] = (source, module._buffers[name])
        for param in module._parameters.values():
            if param is None or param.device.type == "meta" or is_placeholder(param) or id(param) in seen:
                continue
            seen.add(id(param))
            cast = dtype if dtype is not None and param.is_floating_point() else param.dtype
            if param.device != device or param.dtype != cast:
                param.data = param.data.to(device=device, dtype=cast)


def retarget(model: Any, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
    """Change where (and in which dtype) a streamed model computes; weights are re-read on next use."""
    if dtype is not None and not (dtype.is_floating_point or dtype.is_complex):
        raise TypeError(f"nn.Module.to only accepts floating point or complex dtypes, but got desired dtype={dtype}")
    if device is not None and device.type == "meta":
        raise StreamingRuntimeError(META_DEVICE)
    engine = engine_of(model)
    engine.retarget(device, dtype)
    model.hf_device_map = {"": engine.device}
    _move_real_tensors(model, engine.device, dtype, engine.buffer_origins)
    return model


def _bind_device_methods(model: Any, engine: StreamEngine) -> None:
    """``to``/``cuda``/``cpu``/``half``... retarget the execution device instead of moving weights."""

    def to(*args: Any, **kwargs: Any) -> Any:
        device, dtype, _non_blocking, _memory_format = torch._C._nn._parse_to(*args, **kwargs)
        return retarget(model, device, dtype)

    def cuda(device: Any = None) -> Any:
        index = device if isinstance(device, int) else None
        target = torch.device(device) if isinstance(device, (str, torch.device)) else torch.device("cuda", index)
        return retarget(model, target)

    def refuse_copy(*_args: Any) -> Any:
        raise not_copyable(f"This {type(model).__name__}")

    model.to = to
    model.cuda = cuda
    model._apply = functools.partial(_apply_from_parent, model, model._apply)
    for name, module in _streaming_submodules(model, engine):
        module._apply = functools.partial(_apply_to_part, model, name, module, module._apply)
    model.__deepcopy__ = model.__reduce_ex__ = refuse_copy  # copy.copy goes through __reduce_ex__ too
    # Saving and state_dict stream unit by unit (saving.py): the weights are not in memory to hand over at once.
    model.save_pretrained = functools.partial(saving.save_pretrained, model)
    model.state_dict = functools.partial(saving.state_dict, model)
    model.cpu = lambda: retarget(model, torch.device("cpu"))
    model.half = lambda: retarget(model, None, torch.float16)
    model.float = lambda: retarget(model, None, torch.float32)
    model.bfloat16 = lambda: retarget(model, None, torch.bfloat16)
    model.double = lambda: retarget(model, None, torch.float64)


def _apply_from_parent(model: Any, torch_apply: Any, fn: Any, recurse: bool = True) -> Any:
    """``nn.Module._apply`` of the model, which a parent module's ``.to()``/``.half()``/``.cuda()`` reaches (a
    SentenceTransformer, a PeftModel or any ``nn.Module`` holding the model): the model's own ``to`` is not called
    then. ``fn`` is tried on empty tensors: when it changes their device or dtype, the model retargets, as its own
    ``.to()`` does. Else (``.to()`` to where it already is, ``share_memory()``) torch's own runs.

    Before, torch's own ran for every call: the placeholders answered ``fn`` by reading their weights, every one of
    which was then kept in memory outside the budget (the whole model), and ``.to()`` to the execution device raised
    a TypeError.
    """
    engine = model.__dict__[_ATTR]
    device, dtype = _what_apply_changes(fn, engine.device, (torch.float16, torch.float32))
    if dtype is not None and not dtype.is_floating_point:
        dtype = None
    if device is not None or dtype is not None:
        return retarget(model, device, dtype)
    return torch_apply(fn, recurse)


def _what_apply_changes(fn: Any, device: torch.device, dtypes: Any) -> tuple[torch.device | None, torch.dtype | None]:
    """The device and dtype ``fn`` (what ``nn.Module._apply`` maps over a module's tensors) gives tensors on
    ``device`` in each of ``dtypes``, tried on empty ones instead of the weights; None for what it leaves as is."""
    new_device, new_dtype = None, None
    for dtype in dtypes:
        probe = torch.empty(0, dtype=dtype, device=device)
        out = fn(probe)
        if not isinstance(out, torch.Tensor) or out is probe:
            continue
        if out.device != probe.device:
            new_device = out.device
        if out.dtype != dtype:
            new_dtype = out.dtype
    return new_device, new_dtype


def _streaming_submodules(model: torch.nn.Module, engine: StreamEngine) -> list[tuple[str, torch.nn.Module]]:
    """The model's submodules that hold streamed weights, or contain one that does."""
    holders = {id(slot.module) for unit in engine.units for spec in unit.specs for slot in spec.slots}
    names = {name for name, module in model.named_modules() if name and id(module) in holders}
    within = {".".join(parts[:i]) for name in names for parts in [name.split(".")] for i in range(1, len(parts) + 1)}
    return [(name, module) for name, module in model.named_modules() if name in within]


def _apply_to_part(
    model: Any, name: str, part: torch.nn.Module, torch_apply: Any, fn: Any, recurse: bool = True
) -> Any:
    """``nn.Module._apply`` of a submodule with streamed weights: a move or cast of that part alone is refused.

    torch's own would read the part's weights and keep the results in memory outside the budget, and the units
    it caught resident would be cast while the others are read in the model's dtype (``model.model.half()`` left
    a model that computed in two dtypes). What changes none of the part's streamed weights (``.to()`` to where it
    is, as Bark's forward does; ``.float()`` of a float32 part) runs as torch's own."""
    engine = model.__dict__[_ATTR]
    inside = {id(module) for module in part.modules()}
    dtypes = {
        spec.dtype
        for unit in engine.units
        for spec in unit.specs
        if spec.dtype.is_floating_point and any(id(slot.module) in inside for slot in spec.slots)
    }
    changes = _what_apply_changes(fn, engine.device, sorted(dtypes or {torch.float32}, key=str))
    if any(change is not None for change in changes):
        target = ", ".join(str(change) for change in changes if change is not None)
        raise StreamingRuntimeError(
            f"Moving or casting {name} alone (to {target}) is not possible on a streamed "
            f"{type(model).__name__}: its weights are read from the checkpoint on use, in the model's dtype "
            "onto its execution device. Move or cast the whole model instead (model.to(...), model.half(), "
            "or from_pretrained(..., dtype=...)); it re-reads its weights so."
        )
    return torch_apply(fn, recurse)


def _dedupe_tied_walks(model: torch.nn.Module, engine: StreamEngine) -> None:
    """``named_parameters()``/``parameters()`` yield a tied weight once, as on a plain model, also when reading
    values in the loop makes its unit resident or evicts it between its places.

    torch deduplicates by object, and installing or evicting a unit puts another object in every place of a weight
    (the resident ``Parameter``, the placeholder): a loop printing each weight's mean yielded ``lm_head.weight``
    after ``model.embed_tokens.weight`` it is tied to. Every module holding two places of one weight has its walk
    see, at the second place, the object it met at the first, which torch then skips. A place the user filled with
    a tensor of their own is not the weight's any more (`StreamEngine.adopt`) and is left as it is.
    """
    paths = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    places: dict[tuple[int, str], tuple[Unit, TensorSpec, Slot]] = {}
    owners: set[str] = set()
    for unit in engine.units:
        for spec in unit.specs:
            if len(spec.slots) < 2:
                continue
            for slot in spec.slots:
                places[(id(slot.module), slot.attr)] = (unit, spec, slot)
            held = [paths[id(slot.module)].split(".") for slot in spec.slots]
            for path in held:  # the module itself and every module above it
                for depth in range(len(path) + 1):
                    prefix = path[:depth]
                    if sum(other[:depth] == prefix for other in held) > 1:
                        owners.add(".".join(prefix))
    for name in owners:
        module = model.get_submodule(name)
        module._named_members = functools.partial(_walk_tied_once, module._named_members, engine, places)


def _walk_tied_once(
    walk: Any,
    engine: StreamEngine,
    places: dict[tuple[int, str], tuple[Unit, TensorSpec, Slot]],
    get_members_fn: Any,
    *args: Any,
    **kwargs: Any,
) -> Any:
    first: dict[int, Any] = {}  # id(spec) -> what the walk met at the weight's first place

    def members(module: torch.nn.Module) -> Any:
        for key, value in get_members_fn(module):
            place = places.get((id(module), key))
            if place is not None and engine.fills(*place, value):
                value = first.setdefault(id(place[1]), value)
            yield key, value

    return walk(members, *args, **kwargs)
