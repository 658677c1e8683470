"""Accelerate hooks that make each unit's weights resident just before it runs.

Each streaming unit's entry module(s) get a `StreamHook`, an accelerate `ModelHook`: accelerate's
``add_hook_to_module`` wraps ``forward``, and transformers' ``@force_accelerate_hooks`` (modules that read a
child's weights without calling it) calls the same ``pre_forward``/``post_forward`` pair, so one interface
serves both.

The root model also gets a forward session, registered with torch's own module hooks because accelerate's
wrapper has no ``finally``: with ``always_call=True`` the session ends even when a forward raises (a bad input
in a notebook), so no unit stays pinned and the model keeps working.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from torch import nn

from .errors import StreamingRuntimeError, not_copyable
from .experts import ExpertsHook

if TYPE_CHECKING:
    from .engine import StreamEngine
    from .units import Unit


class StreamHook(ModelHook):
    """Pins a unit's weights for the duration of its module's forward."""

    def __init__(self, engine: StreamEngine, unit: Unit):
        self.engine = engine
        self.unit = unit
        self.gathering = False

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        unit = self.unit
        # An embedding whose table is not resident fetches only the rows of the ids and looks up renumbered ids.
        self.gathering = module is unit.gather_from and (unit.gather or unit.state != "resident")
        if self.gathering:
            ids = self.engine.gather(unit, args[0] if args else kwargs["input"])
            if ids is not None:
                return ((ids, *args[1:]), kwargs) if args else (args, {**kwargs, "input": ids})
            self.gathering = False  # most of the table is looked up: it is read whole
        self.engine.acquire(unit)
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self.gathering:
            self.engine.end_gather(self.unit)
        else:
            self.engine.release(self.unit)
        return output

    def __repr__(self) -> str:
        return f"StreamHook(unit={self.unit.name!r})"

    def __deepcopy__(self, memo: dict) -> StreamHook:
        raise not_copyable(f"Module(s) {self.unit.name!r}")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise not_copyable(f"Module(s) {self.unit.name!r}")


BACKWARD_MESSAGE = (
    "hf_weightstream: backward() through a streamed model is not possible: streamed models are for inference, and "
    "their forward ran as under torch.no_grad() (autograd would keep every streamed weight alive past the budget). "
    "Load the model without device_map='stream' to train or to take gradients."
)


class _InferenceOnly(torch.autograd.Function):
    """Identity whose backward explains itself (the forward behind it recorded no graph)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise StreamingRuntimeError(BACKWARD_MESSAGE)


def _inference_only(output: Any) -> Any:
    """The output with its floating tensors (logits, loss, each of ``hidden_states``...) made to refuse backward()
    clearly. A cache object is left as it is: the next call reads it."""

    def mark(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point() and not value.requires_grad:
                return _InferenceOnly.apply(value.detach().requires_grad_())
            return value
        if isinstance(value, dict):  # transformers' ModelOutput: setting an item sets the attribute too
            for key, item in list(value.items()):
                value[key] = mark(item)
            return value
        if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
            return type(value)(mark(item) for item in value)
        return value

    return mark(output)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor) and value.device != device:
        return value.to(device)
    return value


def attach(model: nn.Module, engine: StreamEngine) -> None:
    """Hook every unit's entry modules and open/close a forward session around the root."""
    for unit in engine.units:
        for module in unit.modules:
            add_hook_to_module(module, StreamHook(engine, unit), append=True)
    for layer in engine.expert_layers:
        add_hook_to_module(layer.module, ExpertsHook(engine, layer), append=True)
    # Per thread, per nested root call: the grad mode to restore, or None while the session has not begun. torch
    # runs `end` also when `begin` raised (a shard that failed its sha256 is reported there), and begin_forward has
    # then undone itself: ending it again drove the session depth below zero, after which no pass ended its session.
    calls = threading.local()

    def begin(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        modes = calls.__dict__.setdefault("modes", [])
        modes.append(None)
        engine.begin_forward()
        # Autograd would keep every evicted weight alive until backward, far past the budget: a streamed forward
        # always runs as under torch.no_grad(). Users are told once (see StreamEngine.note_grad_forward).
        grad_was_enabled = torch.is_grad_enabled()
        modes[-1] = grad_was_enabled
        if grad_was_enabled:
            engine.note_grad_forward()
            torch.set_grad_enabled(False)
        # Like accelerate's dispatched models: tensors given on another device follow the model.
        device = engine.device
        return tuple(_to_device(a, device) for a in args), {k: _to_device(v, device) for k, v in kwargs.items()}

    def end(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        modes = calls.__dict__.get("modes")
        grad_was_enabled = modes.pop() if modes else None
        if grad_was_enabled is None:
            return None  # the session did not begin
        failed = calls.__dict__.pop("failed", False)
        try:
            torch.set_grad_enabled(grad_was_enabled)
            if grad_was_enabled:  # a later backward() must say why it cannot run, not fail obscurely
                return _inference_only(output)
            return None
        finally:
            engine.end_forward(encoder=module is not model, failed=failed)

    # An encoder-decoder's generate() calls the encoder itself, once, then the model per token: the encoder's
    # calls are sessions too, so they are traced and prefetched as the schedule's prefix (engine.end_forward).
    encoder = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else None
    roots = [model] + ([encoder] if isinstance(encoder, nn.Module) and encoder is not model else [])
    for root in roots:
        root.register_forward_pre_hook(begin, with_kwargs=True)
        root.register_forward_hook(end, with_kwargs=True, always_call=True)
        _end_on_interrupt(root, end, calls)
    streamed = [module for unit in engine.units for module in unit.modules]
    _eager_under_compile(model, streamed + [layer.module for layer in engine.expert_layers])


def _end_on_interrupt(root: nn.Module, end: Callable[..., Any], calls: threading.local) -> None:
    """Close the session when a ``KeyboardInterrupt`` (Ctrl-C in a notebook) or ``SystemExit`` leaves the forward,
    and tell the session's end that the pass did not complete (``calls.failed``).

    torch runs ``always_call`` hooks for an ``Exception`` only: after a Ctrl-C the forward lock stayed held (a call
    from another thread then waited forever), the interrupted unit pinned, and grad mode off for the thread.
    """
    inner = root.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        try:
            return inner(*args, **kwargs)
        except Exception:
            calls.failed = True
            raise  # torch's always_call hook ends the session
        except BaseException:
            calls.failed = True
            end(root, args, kwargs, None)
            raise

    root.forward = forward


def _eager_under_compile(model: nn.Module, streamed: list[nn.Module]) -> None:
    """Keep ``torch.compile`` out of the streaming: what it traces runs with fake tensors and cannot follow weights
    made resident during the call (it crashed, seeing a weight viewed from a byte buffer with the wrong shape).

    A compiled model (``torch.compile(model)``, ``model.compile()``) runs eagerly, as it said once. Where only the
    forward is compiled (``model.forward = torch.compile(model.forward)``, what transformers' docs show), each
    streamed module's call is left out of the graph: what runs between them is compiled.
    """
    for module in streamed:
        module.forward = torch.compiler.disable(module.forward)
    eager = torch.compiler.disable(model._call_impl)

    def call(*args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            _warn_compiled()
        return eager(*args, **kwargs)

    model._call_impl = call


@functools.cache
def _warn_compiled() -> None:
    warnings.warn(
        "hf_weightstream: torch.compile has no effect on a streamed model, which runs eagerly: its weights are "
        "made resident during each call, which a compiled graph cannot follow.",
        UserWarning,
        stacklevel=2,
    )
