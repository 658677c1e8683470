"""Tiny random-weight models and a tokenizer, saved the way users' checkpoints are (several shards)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "ran",
    "far",
    "away",
    "big",
    "small",
    "red",
    "blue",
    "green",
    "tree",
    "house",
    "river",
    "sun",
    "moon",
]
VOCAB = 128


def _common() -> dict:
    return dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def llama(tied: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
        **_common(),
    )
    return LlamaForCausalLM(config)


def qwen2_tied() -> Qwen2ForCausalLM:
    config = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        **_common(),
    )
    return Qwen2ForCausalLM(config)


def gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(n_embd=64, n_layer=3, n_head=4, n_positions=128, **_common())
    return GPT2LMHeadModel(config)


def qwen3_moe() -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
        **_common(),
    )
    return Qwen3MoeForCausalLM(config)


def bert() -> BertModel:
    config = BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB
    )
    return BertModel(config)


BUILDERS = {
    "llama": llama,
    "llama_tied": lambda: llama(tied=True),
    "qwen2_tied": qwen2_tied,
    "gpt2": gpt2,
    "qwen3_moe": qwen3_moe,
    "bert": bert,
}


def tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<s>", "</s>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        padding_side="left",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def save(kind: str, folder: Path, max_shard_size: str = "40KB", seed: int = 0, **save_kwargs) -> Path:
    """Build ``kind`` with fixed random weights and save it, with a tokenizer, as sharded safetensors."""
    torch.manual_seed(seed)
    model = BUILDERS[kind]()
    model.save_pretrained(folder, max_shard_size=max_shard_size, **save_kwargs)
    tokenizer().save_pretrained(folder)
    return folder
