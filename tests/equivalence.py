"""The guard against silently wrong weights: every tensor a streamed model installs equals the plain load's.

A short forward can hide a wrong mapping (two experts swapped that the prompt never routes to, a scale that is
ignored where values happen to be small, a flag that changes a kernel only for some shapes). So this compares
each unit's materialized tensors with the plain ``from_pretrained`` model's ``state_dict(keep_vars=True)``, one
by one: same values bit for bit (``torch.equal``), same dtype, same shape, same ``requires_grad``, same kind
(parameter or buffer); and every tensor of the plain load is covered by a unit or by a real buffer.

Routed experts (per-expert units) are compared slice by slice: expert ``e``'s ``[1, ...]`` tensors against
``reference[name][e:e+1]``.

Use it for any fixture (and the architecture zoo): ``assert_units_match_plain_load(streamed, reference)``.
"""

from __future__ import annotations

import torch
from torch import nn


def _describe(tensor: torch.Tensor) -> str:
    kind = "Parameter" if isinstance(tensor, nn.Parameter) else "buffer"
    return f"{kind} {tensor.dtype} {list(tensor.shape)} requires_grad={tensor.requires_grad}"


def _compare(name: str, got: torch.Tensor, expected: torch.Tensor, problems: list[str]) -> None:
    if (
        isinstance(got, nn.Parameter) != isinstance(expected, nn.Parameter)
        or got.dtype != expected.dtype
        or got.shape != expected.shape
        or got.requires_grad != expected.requires_grad
    ):
        problems.append(f"{name}: streamed {_describe(got)} vs plain {_describe(expected)}")
    elif not torch.equal(got.detach().cpu(), expected.detach().cpu()):
        diff = (got.detach().cpu().double() - expected.detach().cpu().double()).abs().max().item()
        problems.append(f"{name}: values differ (max abs diff {diff:.3g})")


def unit_tensors(engine, unit) -> dict[str, torch.Tensor]:
    """What ``unit`` installs, by every state-dict name it covers (tied names included), read from the model."""
    out = {}
    for spec in unit.specs:
        for alias, slot in zip(spec.aliases, spec.slots, strict=True):
            table = slot.module._parameters if slot.is_param else slot.module._buffers
            out[alias] = table[slot.attr]
    return out


def assert_units_match_plain_load(streamed: nn.Module, reference: nn.Module) -> int:
    """Materialize every unit of ``streamed`` in turn and compare it with ``reference``; returns tensors checked."""
    engine = streamed._hf_weightstream
    expected = reference.state_dict(keep_vars=True)
    problems: list[str] = []
    covered: set[str] = set()
    experts_seen: dict[str, set[int]] = {}
    for unit in engine.units:
        if unit.expert is not None:  # one expert's [1, ...] slice of each fused parameter, stacked per call
            engine.acquire_many([unit])
            try:
                for name, tensor in unit.tensors.items():
                    e = unit.expert_id
                    full = expected[name]
                    if tensor.dtype != full.dtype or tensor.shape != full[e : e + 1].shape:
                        problems.append(f"{name}[{e}]: streamed {_describe(tensor)} vs plain {_describe(full)}")
                    elif not torch.equal(tensor.cpu(), full[e : e + 1].detach().cpu()):
                        problems.append(f"{name}: values differ for expert {e}")
                    experts_seen.setdefault(name, set()).add(e)
            finally:
                engine.release_many([unit])
            continue
        engine.acquire(unit)
        try:
            for name, tensor in unit_tensors(engine, unit).items():
                if name not in expected:
                    problems.append(f"{name}: installed by unit {unit.name!r} but absent from the plain load")
                    continue
                _compare(name, tensor, expected[name], problems)
                covered.add(name)
        finally:
            engine.release(unit)
    for name, tensor in streamed.state_dict(keep_vars=True).items():
        # real buffers built with the skeleton
        if name not in covered and tensor.device.type != "meta" and name in expected:
            _compare(name, tensor, expected[name], problems)
            covered.add(name)
    for name, seen in experts_seen.items():
        if seen == set(range(expected[name].shape[0])):
            covered.add(name)
        if not expected[name].is_floating_point() or not expected[name].requires_grad:
            problems.append(f"{name}: stacked experts get requires_grad=True, the plain load has False")
    missing = sorted(set(expected) - covered)
    if missing:
        problems.append(f"never materialized by any unit: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    assert not problems, "streamed tensors differ from a plain load:\n  " + "\n  ".join(problems[:20])
    return len(covered)
