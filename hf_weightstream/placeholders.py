"""What a streamed weight is while it is not resident: a tensor with the real one's metadata that loads on use.

Between forwards, a unit's parameter slots hold a `StreamedTensor`: it has the real weight's shape, dtype,
device (the execution device) and ``requires_grad``, and no storage. Reading its metadata costs nothing, which
is what most code does with a weight outside the module that owns it (``input_ids.to(self.embed_tokens.weight
.device)`` in Llama 4, ``weight.dtype`` checks). Anything that needs its values (a matmul in a parent module that
uses a child's weight directly, tied heads computed by hand as in FSMT or ProphetNet, ``print(weight)``,
``torch.equal``) goes through ``__torch_dispatch__``, which acquires the unit from the engine exactly as its hook
would (charged to the budget, traced into the schedule on the first pass, prefetched on later ones), runs the
op on the real tensor and releases the unit. So a weight touched outside its module's forward is served, never
a meta-tensor crash and never a silent wrong value.

Writing into a streamed weight is refused: the bytes come from the checkpoint file and an in-place change would
be lost at the next eviction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .errors import StreamingRuntimeError

if TYPE_CHECKING:
    from .engine import StreamEngine
    from .units import TensorSpec, Unit

# Ops that only make another handle on the same (absent) weight: answered with a placeholder, nothing is read.
_HANDLE_OPS = {torch.ops.aten.detach.default, torch.ops.aten.alias.default}


class StreamedTensor(torch.Tensor):
    """A weight of a streamed model that is not resident (see module docstring)."""

    unit: Unit
    spec: TensorSpec

    # Results of ops are plain tensors: only dispatch is intercepted, not the Python-level torch function layer.
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(
        cls, unit: Unit, spec: TensorSpec, device: torch.device, requires_grad: bool = False
    ) -> StreamedTensor:
        tensor = torch.Tensor._make_wrapper_subclass(
            cls, spec.shape, dtype=spec.dtype, device=device, requires_grad=requires_grad
        )
        tensor.unit = unit
        tensor.spec = spec
        return tensor

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        # repr must not read the weight (debuggers and error messages call it); str() or print(t.sum()) do.
        return (
            f"StreamedTensor({self.spec.name}, shape={list(self.shape)}, dtype={self.dtype}, device={self.device}, "
            "not resident: reading it loads its unit)"
        )

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _HANDLE_OPS:
            (source,) = args
            return StreamedTensor(source.unit, source.spec, source.device, requires_grad=False)
        for position, argument in enumerate(func._schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                target = args[position] if position < len(args) else kwargs.get(argument.name)
                if isinstance(target, StreamedTensor):
                    raise StreamingRuntimeError(
                        f"{func} writes into {target.spec.name}, a streamed weight: streamed weights are read "
                        "from the checkpoint and are read-only (a change would be lost when the weight is evicted). "
                        "Load the model without device_map='stream' to modify its weights."
                    )
        leaves, _ = tree_flatten((args, kwargs))
        units = list({id(t.unit): t.unit for t in leaves if isinstance(t, StreamedTensor)}.values())
        acquired: list[Unit] = []
        try:
            for unit in units:
                serve(unit.engine, unit)
                acquired.append(unit)

            def real(value: Any) -> Any:
                return value.unit.tensors[value.spec.name] if isinstance(value, StreamedTensor) else value

            return func(*tree_map(real, args), **tree_map(real, kwargs))
        finally:
            for unit in acquired:
                unit.engine.release(unit)


def serve(engine: StreamEngine, unit: Unit) -> None:
    """Acquire ``unit`` for a read outside its module's forward.

    An embedding table that only ever served row lookups is read whole from then on (``engine.acquire`` charges it
    to the budget like any unit): something reads it other than through its own forward.
    """
    engine.acquire(unit)


def make(unit: Unit, spec: TensorSpec, device: torch.device) -> torch.Tensor:
    """The placeholder for ``spec``'s slots: a parameter where the model has a parameter, else a buffer."""
    if spec.slots[0].is_param:
        grad = spec.requires_grad if spec.requires_grad is not None else spec.dtype.is_floating_point
        return nn.Parameter(StreamedTensor(unit, spec, device), requires_grad=grad)
    return StreamedTensor(unit, spec, device)


def install(units: list[Unit], device: torch.device) -> None:
    """Put a placeholder in every slot of every unit (after load, and after a change of device or dtype)."""
    for unit in units:
        for spec in unit.specs:
            if not spec.slots:  # one expert of a fused experts parameter: experts.py installs the whole
                continue
            placeholder = make(unit, spec, device)
            for slot in spec.slots:
                slot.placeholder = placeholder
                if not (unit.installed or (unit.rows is not None and unit.rows.installed)):
                    (slot.module._parameters if slot.is_param else slot.module._buffers)[slot.attr] = placeholder


def is_placeholder(tensor: Any) -> bool:
    return isinstance(tensor, StreamedTensor)
