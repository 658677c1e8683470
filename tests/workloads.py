"""The workload outputs are compared on: a left-padded batch's logits, greedy decoding of the batch, beam search
and seeded sampling on one prompt (what users run, and where padding, caches and beams could go wrong)."""

from __future__ import annotations

import torch

BATCH = torch.tensor([[1, 7, 8, 9, 10, 11, 12], [0, 0, 0, 5, 6, 7, 3]])
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1]])
PROMPT = BATCH[:1]


def workload(model) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        out["logits"] = model(BATCH, attention_mask=MASK).logits
    out["greedy"] = model.generate(BATCH, attention_mask=MASK, max_new_tokens=5, do_sample=False)
    out["beam"] = model.generate(PROMPT, max_new_tokens=4, num_beams=3, do_sample=False)
    torch.manual_seed(7)
    out["sample"] = model.generate(PROMPT, max_new_tokens=5, do_sample=True, top_k=20)
    return out


def assert_same_outputs(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], what: str) -> None:
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{what}: {name} differs"
