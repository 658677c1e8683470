"""Two models under one memory budget: a shared ``WeightPool`` evicts one model's weights to run the other.

    python examples/model_switching.py [MODEL_A [MODEL_B]]

Each model is loaded with ``StreamConfig(pool=pool)``, so the pool's budget covers both. The budget here is
about one and a half models: switching from A to B evicts A's least recently used weights, and switching back
reads them again. ``pool.stats()`` shows the totals and each model's own figures. Without arguments two tiny
random Llamas are built; with one argument it is loaded twice (two instances still compete for the pool).
"""

from __future__ import annotations

import json
import sys

from _tiny import model_from_argv
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_weightstream


def main() -> None:
    path_a = model_from_argv(1, seed=0, layers=2)
    path_b = model_from_argv(2, seed=1, layers=3) if len(sys.argv) != 2 else path_a

    # Loading reads headers only: probe the sizes first to size the pool for the demonstration.
    sizes = []
    for path in (path_a, path_b):
        probe = AutoModelForCausalLM.from_pretrained(
            path, device_map="stream", stream_config=hf_weightstream.StreamConfig(budget="1TB")
        )
        sizes.append(hf_weightstream.stats(probe)["model_bytes"])
    pool = hf_weightstream.WeightPool(budget=int(1.5 * max(sizes)))

    config = hf_weightstream.StreamConfig(pool=pool)
    models = {
        name: (
            AutoModelForCausalLM.from_pretrained(path, device_map="stream", stream_config=config),
            AutoTokenizer.from_pretrained(path),
        )
        for name, path in (("A", path_a), ("B", path_b))
    }
    for name in ("A", "B", "A"):
        model, tokenizer = models[name]
        inputs = tokenizer("the capital of france is", return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        print(f"model {name}: {tokenizer.decode(output[0], skip_special_tokens=True)!r}")
        stats = pool.stats()
        print(
            f"  pool holds {stats['resident_bytes']:,} of {stats['budget_bytes']:,} bytes; evictions so far "
            f"{stats['evictions']}"
        )

    stats = pool.stats()
    print("pool.stats():")
    print(json.dumps({k: v for k, v in stats.items() if k != "models"}, indent=2))
    for label, model_stats in stats["models"].items():
        keys = ("model_bytes", "bytes_read", "hits", "misses", "evictions")
        print(f"  {label}: " + ", ".join(f"{k} {model_stats[k]:,}" for k in keys))


if __name__ == "__main__":
    main()
