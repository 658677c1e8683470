"""Run a model whose weights do not fit the budget: blocks are read, used and evicted every token.

    python examples/larger_than_budget.py [MODEL]

The budget is set to under half the model (and at least what its largest unit needs while loading). The first
forward pass traces the execution order; from then on the engine keeps a fixed set of units resident and
streams the rest through a small prefetch window (the running unit and ``lookahead`` more), so most accesses
hit units read ahead of time. The stats show
it: bytes read per token close to the size of the streamed part, hits from prefetching, and a peak resident
size that never passes the budget. Without MODEL a tiny random Llama is built (gibberish text).
"""

from __future__ import annotations

from _tiny import model_from_argv
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_weightstream

FRACTION = 0.45  # of the model size: small units stay resident, every decoder layer streams


def stream(path: str, budget: int | str) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(
        path, device_map="stream", stream_config=hf_weightstream.StreamConfig(budget=budget, lookahead=2)
    )


def main() -> None:
    path = model_from_argv(layers=8)
    # Loading reads headers only, so a first load with a generous budget costs nothing and tells us the sizes.
    probe = stream(path, "1TB")
    model_bytes = hf_weightstream.stats(probe)["model_bytes"]
    largest = max(unit.charge_bytes for unit in probe._hf_weightstream.units)
    budget = max(int(FRACTION * model_bytes), int(1.2 * largest))
    del probe

    model = stream(path, budget)
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer("the quick brown fox", return_tensors="pt")
    new_tokens = 16
    output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    print("text:", tokenizer.decode(output[0], skip_special_tokens=True))

    stats = hf_weightstream.stats(model)
    forwards = new_tokens  # one forward pass per new token (the first also processes the prompt)
    print(f"model {model_bytes:,} bytes, budget {budget:,} bytes ({budget / model_bytes:.0%} of the model)")
    print(f"kept resident: {stats['kept_resident_units']} of {stats['units']} units")
    print(f"read {stats['bytes_read']:,} bytes, about {stats['bytes_read'] // forwards:,} per token")
    print(
        f"hits {stats['hits']}, misses {stats['misses']}, late prefetches {stats['late_prefetches']}, "
        f"evictions {stats['evictions']} (hit rate {stats['hit_rate']:.0%})"
    )
    print(f"peak resident {stats['peak_resident_bytes']:,} bytes <= budget {stats['budget_bytes']:,} bytes")
    assert stats["peak_resident_bytes"] <= budget


if __name__ == "__main__":
    main()
