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

The fused ``[E, ...]`` parameters of an experts module read per expert (experts.py) hold a `StreamedExperts` between
calls: the full parameter's metadata, and reading it assembles every expert, one resident at a time.

Writing into a streamed weight is refused: the bytes come from the checkpoint file and an in-place change would
be lost at the next eviction. Replacing it is not: ``weight.data = tensor`` (what ``resize_token_embeddings`` does)
hands every place the weight fills to that tensor, which is the user's from then on (``StreamEngine.adopt``).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from .errors import StreamingRuntimeError, not_copyable
from .experts import assemble

if TYPE_CHECKING:
    from .engine import StreamEngine
    from .experts import ExpertLayer
    from .units import TensorSpec, Unit

# Ops that only make another handle on the same (absent) weight: answered with a placeholder, nothing is read.
_HANDLE_OPS = {torch.ops.aten.detach.default, torch.ops.aten.alias.default}


class StreamedTensor(torch.Tensor):
    """A weight of a streamed model that is not resident (see module docstring)."""

    unit: Unit
    spec: TensorSpec
    weight_name: str

    # Results of ops are plain tensors: only dispatch is intercepted, not the Python-level torch function layer.
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, unit: Unit, spec: TensorSpec, device: torch.device, requires_grad: bool = False) -> StreamedTensor:
        tensor = torch.Tensor._make_wrapper_subclass(
            cls, spec.shape, dtype=spec.dtype, device=device, requires_grad=requires_grad
        )
        tensor.unit = unit
        tensor.spec = spec
        tensor.weight_name = spec.name
        return tensor

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        # repr must not read the weight (debuggers and error messages call it); str() or print(t.sum()) do.
        return (
            f"StreamedTensor({self.spec.name}, shape={list(self.shape)}, dtype={self.dtype}, device={self.device}, "
            "not resident: reading it loads its unit)"
        )

    def _set_data(self, value: torch.Tensor) -> None:
        """``weight.data = tensor``, as ``resize_token_embeddings`` does: ``tensor`` replaces the streamed weight in
        every place it fills and stays the user's (engine.adopt); this handle reads it from now on too."""
        if value is self:  # nn.Module._apply of ``.to()`` where the weight already is: nothing changes
            return
        if not isinstance(value, torch.Tensor) or isinstance(value, StreamedTensor):
            raise TypeError(f"{self.weight_name}.data can only be set to a tensor, not {type(value).__name__}")
        self.unit.engine.take_data(self, value)
        torch._C.TensorBase.data.__set__(self, value)
        self.adopted = value

    data = property(torch._C.TensorBase.data.__get__, _set_data)
    adopted: torch.Tensor | None = None  # the tensor set with ``.data =``: no longer a streamed weight

    def __deepcopy__(self, memo: dict) -> Any:
        raise not_copyable(f"Weight {self.weight_name}", "Copy its values with .detach().clone().")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise not_copyable(f"Weight {self.weight_name}", "Copy its values with .detach().clone().")

    def share_memory_(self) -> Any:  # torch's own crashes the process (SIGSEGV) on a tensor without storage
        raise not_copyable(f"Weight {self.weight_name}", "Copy its values with .detach().clone().")

    # Conversions that leave torch (its own refuse tensor subclasses): the values, as for any other read.
    def numpy(self, *, force: bool = False) -> Any:
        return self.clone().numpy(force=force)

    def tolist(self) -> Any:
        return self.clone().tolist()

    def handle(self) -> torch.Tensor:
        """Another placeholder for the same absent weight (``detach``, ``alias``): nothing is read."""
        if self.adopted is not None:
            return self.adopted.detach()
        return StreamedTensor(self.unit, self.spec, self.device)

    def open(self, held: contextlib.ExitStack) -> Any:
        """Make the weight readable until ``held`` closes; what `value` then reads it from."""
        if self.adopted is not None:
            return None
        serve(self.unit.engine, self.unit)
        held.callback(self.unit.engine.release, self.unit)
        return self.unit

    def value(self, opened: Any) -> torch.Tensor:
        return self.adopted if self.adopted is not None else opened.tensors[self.spec.name]

    def source_key(self) -> tuple[int, str | None]:
        """Placeholders with the same key are served by one `open` (the specs of one unit share its read)."""
        return id(self.unit), None if self.adopted is None else str(id(self))

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _HANDLE_OPS:
            (source,) = args
            return source.handle()
        for position, argument in enumerate(func._schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                target = args[position] if position < len(args) else kwargs.get(argument.name)
                if isinstance(target, StreamedTensor) and target.adopted is None:
                    raise StreamingRuntimeError(
                        f"{func} writes into {target.weight_name}, a streamed weight: streamed weights are read "
                        "from the checkpoint and are read-only (a change would be lost when the weight is evicted). "
                        "Load the model without device_map='stream' to modify its weights."
                    )
        leaves, _ = tree_flatten((args, kwargs))
        with contextlib.ExitStack() as held:
            opened: dict[tuple[int, str | None], Any] = {}
            for leaf in leaves:
                if isinstance(leaf, StreamedTensor) and leaf.source_key() not in opened:
                    opened[leaf.source_key()] = leaf.open(held)

            def real(value: Any) -> Any:
                return value.value(opened[value.source_key()]) if isinstance(value, StreamedTensor) else value

            return func(*tree_map(real, args), **tree_map(real, kwargs))


class StreamedExperts(StreamedTensor):
    """A fused ``[E, ...]`` experts parameter between calls of its module (experts.py splits it into per-expert
    units, and its hook installs only the routed experts for a call).

    Reading it outside a call assembles all ``E`` experts into a new full tensor, one expert unit resident at a
    time under the budget; the result is a plain tensor the caller owns, as a ``state_dict()`` value is.
    """

    layer: ExpertLayer
    weight_name: str

    @staticmethod
    def __new__(
        cls, layer: ExpertLayer, weight_name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device
    ) -> StreamedExperts:
        tensor = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)
        tensor.layer = layer
        tensor.weight_name = weight_name
        return tensor

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return (
            f"StreamedExperts({self.weight_name}, shape={list(self.shape)}, dtype={self.dtype}, device={self.device}, "
            f"not resident: reading it assembles its {self.layer.num_experts} experts)"
        )

    def _set_data(self, value: torch.Tensor) -> None:
        raise StreamingRuntimeError(
            f"{self.weight_name} holds the experts of an MoE layer that are streamed one by one; replacing them "
            "with .data = is not supported. Load the model without device_map='stream' to change its weights."
        )

    data = property(torch._C.TensorBase.data.__get__, _set_data)

    def handle(self) -> StreamedExperts:
        return StreamedExperts(self.layer, self.weight_name, self.shape, self.dtype, self.device)

    def open(self, held: contextlib.ExitStack) -> Any:
        return assemble(self.layer, [self.weight_name])[self.weight_name]

    def value(self, opened: Any) -> torch.Tensor:
        return opened

    def source_key(self) -> tuple[int, str | None]:
        return id(self.layer), self.weight_name


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
                    slot.store[slot.attr] = placeholder


def install_experts(layers: list[ExpertLayer], device: torch.device, dtype: torch.dtype | None = None) -> None:
    """Full-size placeholders for the fused parameters of every experts module (after load, and after a change of
    device or dtype); the experts hook swaps them for the routed experts during a call and puts them back after."""
    for layer in layers:
        for attr, old in layer.placeholders.items():
            cast = dtype if dtype is not None and old.is_floating_point() else old.dtype
            tensor = StreamedExperts(layer, layer.full_names[attr], old.shape, cast, device)
            layer.placeholders[attr] = layer.module._parameters[attr] = nn.Parameter(tensor, old.requires_grad)


def is_placeholder(tensor: Any) -> bool:
    return isinstance(tensor, StreamedTensor)
