"""Shared by the examples: a tiny random Llama and its tokenizer, so each example runs offline in seconds.

Its weights are random, so its text is gibberish; what the examples show (bytes read, hits, misses, the pool)
works the same on a real model. Each example takes a model folder or Hub repo id as its first argument
instead, or ``demo`` for the offline demo model (SmolLM2-135M-Instruct, prepared once in about 20 s).
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from pathlib import Path

SENTENCES = [
    "user : assistant : system :",
    "the quick brown fox jumps over the lazy dog .",
    "weights stream from disk into memory just before each layer runs .",
    "a budget keeps the resident weights small , and prefetching hides the reads .",
    "what is the capital of france ? paris is the capital of france .",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def build_tiny_model(folder: Path, *, seed: int = 0, layers: int = 2) -> Path:
    """Save a random Llama (many small shards, so streaming has work to do) and a tokenizer in ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=backend.get_vocab_size(),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Writing model shards" bar would clutter the example's output
    try:
        model.save_pretrained(folder, max_shard_size="40KB")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return folder


def model_from_argv(position: int = 1, *, seed: int = 0, layers: int = 2) -> str:
    """``sys.argv[position]`` if given (``demo``: the demo model), else a tiny model in a temporary folder."""
    if len(sys.argv) > position:
        if sys.argv[position] == "demo":
            from hf_weightstream.demo_model import prepare_demo_model

            return str(prepare_demo_model())
        return sys.argv[position]
    folder = Path(tempfile.mkdtemp(prefix="hf_weightstream-example-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return str(build_tiny_model(folder, seed=seed, layers=layers))
