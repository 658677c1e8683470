"""Every private transformers API we rely on, in one place.

Streaming must build a model exactly as ``from_pretrained`` does (same init contexts, same dtype rules, same
non-persistent buffers, same key renaming and weight converters) without reading its weights. transformers
offers no public hook for that, so we call the same internals its loader calls. Should one of them move or
change shape, ``tests/test_transformers_compat.py`` fails loudly naming it, instead of models loading wrong.
"""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    SkipParameters,
    WeightConverter,
    WeightRenaming,
    build_glob_alternation,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)
from transformers.dynamic_module_utils import custom_object_save
from transformers.initialization import no_init_weights
from transformers.modeling_utils import _get_dtype, remove_tied_weights_from_state_dict
from transformers.modeling_utils import logger as modeling_logger
from transformers.monkey_patching import patch_output_recorders
from transformers.quantizers.auto import AutoHfQuantizer, get_hf_quantizer
from transformers.utils.generic import ContextManagers
from transformers.utils.loading_report import LoadStateDictInfo, log_state_dict_report

from .errors import CheckpointError

__all__ = [
    "AutoHfQuantizer",
    "ConversionGroup",
    "KeyPlan",
    "LoadStateDictInfo",
    "build_skeleton",
    "finish_quantized",
    "make_quantizer",
    "custom_object_save",
    "materialize_computed",
    "remove_tied_weights",
    "report_load",
    "revert_weight_conversion",
    "plan_checkpoint_keys",
    "resolve_dtype",
    "target_dtypes",
]


def make_quantizer(config: Any, quantization_config: Any) -> Any:
    """transformers' quantizer for this load (``get_hf_quantizer``), as ``from_pretrained`` makes it: it merges a
    user's ``quantization_config`` into the checkpoint's, and decides, for this machine, whether pre-quantized
    weights are dequantized at load (no kernel for the format here) or kept quantized. Updates ``config``."""
    hf_quantizer, _config, _device_map = get_hf_quantizer(config, quantization_config, None, True, {})
    return hf_quantizer


def resolve_dtype(
    dtype: Any, config: Any, checkpoint_dtype: torch.dtype | None, hf_quantizer: Any = None
) -> tuple[Any, torch.dtype]:
    """transformers' own dtype rules (``"auto"`` reads the config, then the checkpoint); updates ``config``."""
    if dtype is None:
        dtype = "auto"
    sharded_metadata = {"dtype": str(checkpoint_dtype or torch.float32).removeprefix("torch.")}
    return _get_dtype(dtype, None, config, sharded_metadata, None, True, hf_quantizer)


def build_skeleton(
    cls: type[PreTrainedModel], config: Any, dtype: torch.dtype, model_kwargs: dict, hf_quantizer: Any = None
) -> Any:
    """The model with every parameter on the meta device, and real non-persistent buffers.

    Uses the very init contexts of ``from_pretrained`` (default dtype, no weight tying during init, meta device)
    and, for a quantized checkpoint, its quantizer's module replacement, then materialises non-persistent buffers
    (rotary ``inv_freq``...) the way its finalisation step does, so they are bit-identical to a normal load.
    """
    config = copy.deepcopy(config)
    # Parameters stay on meta and are never initialised, so skip the init functions (a third of the build time).
    contexts = [*_init_contexts(cls, config, dtype, hf_quantizer is not None), no_init_weights()]

    with ContextManagers(contexts):
        model = cls(config, **model_kwargs)
        patch_output_recorders(model)
        if hf_quantizer is not None:
            hf_quantizer.preprocess_model(
                model=model, dtype=dtype, device_map=None, checkpoint_files=None, use_kernels=False
            )
    for param in model.parameters():
        param._is_hf_initialized = True
        # Loading a weight makes it a new Parameter(requires_grad=is_floating_point()); a model's _init_weights
        # may then change the flag (HRM freezes z_L_init), and runs below just as after a normal load.
        param.requires_grad_(param.is_floating_point())
    model._move_missing_keys_from_meta_to_device(set(), {"": "cpu"}, None, None)
    model._initialize_missing_keys(False)
    model.tie_weights(recompute_mapping=False)
    model.eval()
    return model


def _init_contexts(cls: type[PreTrainedModel], config: Any, dtype: torch.dtype, quantized: bool) -> list:
    """``from_pretrained``'s init contexts, with the runtime fusions a config asks for (``fusion_config``).

    transformers 5.25 applies those fusions in the init contexts themselves when given the config; before, its
    ``from_pretrained`` registered them globally just before building the model, and so must we.
    """
    if "config" in inspect.signature(cls.get_init_context).parameters:
        return cls.get_init_context(dtype, quantized, False, False, config)
    if fusion_config := getattr(config, "fusion_config", None):
        from transformers.fusion_mapping import register_fusion_patches

        register_fusion_patches(cls, config, fusion_config)
    return cls.get_init_context(dtype, quantized, False, False)


def finish_quantized(model: Any, hf_quantizer: Any) -> None:
    """What ``from_pretrained`` does after loading a quantized model (a dequantizing load drops the config)."""
    model.hf_quantizer = hf_quantizer
    hf_quantizer.postprocess_model(model)


def converter_input_dtype(
    hf_quantizer: Any, converter: WeightConverter, stored: torch.dtype, target: torch.dtype
) -> torch.dtype | None:
    """The dtype transformers casts a checkpoint tensor to before a converter runs on it (None: as stored).

    Without a pre-quantized checkpoint, the target's; with one, the quantizer decides (``get_new_dtype``): a
    converter that dequantizes gets the stored bytes, since a cast first would round FP8 values or scales."""
    if hf_quantizer is None or not hf_quantizer.pre_quantized:
        return target
    return hf_quantizer.get_new_dtype(converter, torch.empty(0, dtype=stored, device="meta"), target)


def remove_tied_weights(state_dict: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """The state dict without tied copies, keeping the name transformers keeps (what ``save_pretrained`` writes)."""
    return remove_tied_weights_from_state_dict(dict(state_dict), model)


def missing_keys(model: Any, plan: KeyPlan) -> set[str]:
    """Weights of the model that no checkpoint tensor fills (a tied alias of a filled weight is not missing)."""
    filled = set(plan.renamed) | {t for group in plan.groups for t in expected_targets(group, model)}
    by_identity: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_identity.setdefault(id(tensor), []).append(name)
    return {name for names in by_identity.values() if not filled & set(names) for name in names}


def computed_keys(model: Any, missing: set[str]) -> set[str]:
    """The missing weights transformers itself computes on load instead of reading them (not random values).

    Those are the keys a model never saves (``_keys_to_ignore_on_save``: Marian's sinusoidal positions) or
    declares as expected-missing (``_keys_to_ignore_on_load_missing``); a normal load initialises them with the
    model's own ``_init_weights``, which is what `materialize_computed` runs.
    """
    patterns = set(model._keys_to_ignore_on_load_missing or ()) | {
        re.escape(key) + "$" for key in model._keys_to_ignore_on_save or ()
    }
    if not patterns:
        return set()
    regex = re.compile("|".join(f"({p})" for p in patterns))
    return {key for key in missing if regex.search(key)}


def materialize_computed(model: Any, keys: set[str]) -> None:
    """Give ``keys`` real values on the CPU the way a normal load does: off meta, then the model's init.

    Not with ``_move_missing_keys_from_meta_to_device``: it also makes every non-persistent buffer anew, empty,
    and the init then skips their modules (already initialized): a BERT's ``position_ids`` became garbage.
    """
    if not keys:
        return
    for key in set(keys) - model.all_tied_weights_keys.keys():  # tied ones are tied again below, as transformers does
        owner, _, attr = key.rpartition(".")
        module = model.get_submodule(owner)
        value = torch.empty_like(model.get_parameter_or_buffer(key), device="cpu")
        if attr in module._parameters:
            value = torch.nn.Parameter(value, requires_grad=value.is_floating_point())
        setattr(module, attr, value)
        module._is_hf_initialized = False  # its init runs again; its other tensors keep their flag and are skipped
    model.initialize_weights()
    model.tie_weights(missing_keys=set(keys), recompute_mapping=False)


def report_load(model: Any, name: str, missing: set[str], unexpected: set[str]) -> LoadStateDictInfo:
    """transformers' load report, as a normal load logs it (weights initialized because the checkpoint has none,
    checkpoint tensors the model does not use), less what the model says to ignore; returned for
    ``output_loading_info``."""
    info = LoadStateDictInfo(set(missing), set(unexpected), set(), [], {}, set())
    model._adjust_missing_and_unexpected_keys(info)
    log_state_dict_report(
        model=model,
        pretrained_model_name_or_path=name,
        ignore_mismatched_sizes=False,
        loading_info=info,
        logger=modeling_logger,
    )
    return info


@dataclass
class ConversionGroup:
    """Checkpoint tensors that transformers turns into one or more parameters with a `WeightConverter`."""

    first_target: str
    template: WeightConverter
    sources: list[tuple[str, str]] = field(default_factory=list)  # (checkpoint key, source pattern)
    quantizer: Any = None  # a pre-quantized checkpoint's HfQuantizer: its load operations are in ``template``
    # Target name -> the shape this group produces, where it is not the model's parameter's (one expert's slice).
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def input_dtype(self, stored: torch.dtype, target: torch.dtype) -> torch.dtype | None:
        return converter_input_dtype(self.quantizer, self.template, stored, target)

    def convert(self, tensors: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
        """Run transformers' converter on already-read tensors; returns parameter name -> tensor."""
        converter = copy.deepcopy(self.template)
        for key, pattern in self.sources:
            converter.add_tensor(self.first_target, key, pattern, tensors[key])
        info = LoadStateDictInfo(set(), set(), set(), [], {}, set())
        if self.shapes:
            model = _SlicedParameters(model, self.shapes)
        try:
            out = converter.convert(
                self.first_target, model=model, config=model.config, hf_quantizer=self.quantizer, loading_info=info
            )
        except (ValueError, RuntimeError, AssertionError, SkipParameters) as err:  # e.g. a scale grid that does not fit
            # the weight. transformers records what went wrong in ``info`` and raises a bare SkipParameters.
            keys = ", ".join(key for key, _ in self.sources)
            reason = _last_lines(info.conversion_errors) if isinstance(err, SkipParameters) else err
            raise CheckpointError(
                f"transformers could not convert the checkpoint tensors {keys} into {self.first_target}: {reason}"
            ) from err
        if info.conversion_errors:
            raise CheckpointError(
                f"transformers could not convert the checkpoint tensors for {self.first_target}: "
                f"{info.conversion_errors}"
            )
        return {name: value[0] if isinstance(value, list) else value for name, value in out.items()}


def _last_lines(errors: dict[str, str]) -> str:
    """transformers' conversion errors without their tracebacks: the message and what it was converting."""
    if not errors:
        return "(transformers gave no reason)"
    return "; ".join(" ".join(message.strip().splitlines()[-2:]) for message in errors.values())


class _SlicedParameters:
    """The model as a converter run on one expert's slice must see it: ops that compare the tensors they get with
    the model's parameter (``Transpose(check_dims=True)`` transposes only what does not match it) are shown the
    slice's shape; everything else is the model's."""

    def __init__(self, model: Any, shapes: dict[str, tuple[int, ...]]):
        self._model = model
        self._shapes = shapes

    def get_parameter(self, name: str) -> torch.Tensor:
        parameter = self._model.get_parameter(name)
        if name in self._shapes:
            return torch.empty(self._shapes[name], dtype=parameter.dtype, device="meta")
        return parameter

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


@dataclass
class KeyPlan:
    """How checkpoint keys become parameters: plain renames, and groups that need a converter."""

    renamed: dict[str, str]  # parameter/buffer name -> checkpoint key
    groups: list[ConversionGroup]
    unexpected: list[str]


def plan_checkpoint_keys(
    model: Any,
    keys: list[str],
    key_mapping: dict[str, str] | None,
    hf_quantizer: Any = None,
    stored_shapes: dict[str, tuple[int, ...]] | None = None,
) -> KeyPlan:
    """Apply transformers' renamings and converters to checkpoint keys, as its loader does, without tensors.

    ``stored_shapes`` (checkpoint key -> shape) lets a quantized checkpoint's unquantized weights read as plain
    tensors (see ``_stored_unquantized``).
    """
    mapping = get_model_conversion_mapping(model, key_mapping, hf_quantizer)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    pattern_to_converter = {p: c for c in converters for p in c.source_patterns}
    meta_state = model.state_dict()
    prefix = model.base_model_prefix

    renamed: dict[str, str] = {}
    groups: dict[str, ConversionGroup] = {}
    unexpected: list[str] = []
    # transformers feeds converters in natural key order, so per-expert tensors stack as experts 0, 1, 2, ..., 10
    # (string order would put 10 before 2 and silently permute the experts of any MoE with more than 10).
    for key in sorted(keys, key=dot_natural_key):
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if target not in meta_state and key in meta_state:
            target, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=meta_state)
        if target not in meta_state:
            unexpected.append(key)
        elif pattern is None:
            renamed[target] = key
        else:
            group = groups.setdefault(target, ConversionGroup(target, pattern_to_converter[pattern], [], hf_quantizer))
            group.sources.append((key, pattern))
    dequantizers = (
        {tuple(c.source_patterns) for c in hf_quantizer.get_weight_conversions()} if hf_quantizer is not None else set()
    )
    for target, group in list(groups.items()):
        if _stored_unquantized(group, dequantizers, meta_state[target], stored_shapes):
            renamed[target] = group.sources[0][0]
            del groups[target]
    return KeyPlan(renamed, list(groups.values()), unexpected)


def _stored_unquantized(
    group: ConversionGroup, dequantizers: set[tuple[str, ...]], parameter: torch.Tensor, stored_shapes: dict | None
) -> bool:
    """Whether the quantizer's converter would only cast this tensor: the checkpoint stores it unquantized.

    FP8 checkpoints keep embeddings, norms and the head in bf16, yet their keys end in ``weight`` and so match the
    dequantizer, which, given a weight without its ``weight_scale_inv``, returns ``weight.to(dtype)``
    (``Fp8Dequantize.convert``). A plain rename does the same cast, and lets the bytes be used as views and an
    embedding be read row by row. Only a lone tensor of the converter's first pattern, stored in the parameter's
    own shape, qualifies: packed formats store another shape.
    """
    if stored_shapes is None or len(group.sources) != 1:
        return False
    key, pattern = group.sources[0]
    patterns = tuple(group.template.source_patterns)
    if patterns not in dequantizers or len(patterns) < 2 or pattern != patterns[0]:
        return False  # the model's own converter (fusing, transposing) does more than cast
    return tuple(stored_shapes.get(key, ())) == tuple(parameter.shape)


def expected_targets(group: ConversionGroup, model: Any) -> list[str]:
    """Parameter names a converter group will produce, from its target patterns (without running it)."""
    names = set(model.state_dict().keys())
    first_pattern = group.template.target_patterns[0]
    out = []
    for pattern in group.template.target_patterns:
        candidate = group.first_target.replace(first_pattern, pattern)
        if candidate in names:
            out.append(candidate)
    return out or [group.first_target]


def target_dtypes(model: Any, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The dtype each tensor is loaded in: the ``keep_in_fp32`` plan where it applies, else the placeholder's."""
    plan = model._get_dtype_plan(dtype)
    pattern, group_to_glob = (build_glob_alternation(list(plan))[:2]) if plan else (None, {})
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        match = pattern.search(name) if pattern is not None else None
        out[name] = plan[group_to_glob[match.lastgroup]] if match else tensor.dtype
    return out


def maybe_load_adapters(name: Any, download_kwargs: dict, adapter_kwargs: dict) -> tuple[Any, Any, dict]:
    """(the PEFT adapter to load after the model or None, the base model to load, the adapter's download options),
    as ``PreTrainedModel.from_pretrained`` finds them (``integrations.peft.maybe_load_adapters``)."""
    from transformers.integrations.peft import maybe_load_adapters as find

    return find(name, download_kwargs, **adapter_kwargs)
