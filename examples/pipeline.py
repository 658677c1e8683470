"""Use a streamed model through transformers' ``pipeline``: ``device_map="stream"`` is all it takes.

    python examples/pipeline.py [MODEL]

The pipeline passes ``device_map`` and ``model_kwargs`` on to ``from_pretrained``, so streaming options travel
in ``model_kwargs={"stream_config": ...}``. Without MODEL a tiny random Llama is built (gibberish text).
"""

from __future__ import annotations

from _tiny import model_from_argv
from transformers import pipeline

import hf_weightstream


def main() -> None:
    path = model_from_argv()
    generator = pipeline(
        "text-generation",
        model=path,
        device_map="stream",
        model_kwargs={"stream_config": hf_weightstream.StreamConfig(budget="150MB")},
    )
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    result = generator(messages, max_new_tokens=20, do_sample=False)
    print("answer:", result[0]["generated_text"][-1]["content"])
    stats = hf_weightstream.stats(generator.model)
    print(
        f"read {stats['bytes_read']:,} bytes of weights; peak resident {stats['peak_resident_bytes']:,} bytes"
    )


if __name__ == "__main__":
    main()
