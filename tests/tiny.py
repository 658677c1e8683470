"""Tiny random-weight models and a tokenizer, saved the way users' checkpoints are (several shards)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    FalconMambaConfig,
    FalconMambaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    Llama4Config,
    Llama4TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
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


def qwen3_moe(num_experts: int = 4, top_k: int = 2, hidden: int = 64, expert_width: int = 32) -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        moe_intermediate_size=expert_width,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        **_common(),
    )
    return Qwen3MoeForCausalLM(config)


def qwen3_dense_fp8_shapes(
    hidden: int = 256, intermediate: int = 384, head_dim: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2
) -> Qwen3ForCausalLM:
    """Dense Qwen3 whose linear weights span several 128x128 FP8 blocks (k/v: 128 x 256, MLP: 384 x 256); other
    sizes put block edges elsewhere."""
    config = Qwen3Config(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=False,
        **_common(),
    )
    return Qwen3ForCausalLM(config)


def llama4_text_config() -> Llama4TextConfig:
    """Llama 4's text model, whose experts run densely (every expert on every token)."""
    return Llama4Config(
        text_config=dict(
            hidden_size=32,
            intermediate_size=16,
            intermediate_size_mlp=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            num_local_experts=4,
            vocab_size=64,
        )
    ).text_config


def mamba() -> MambaForCausalLM:
    config = MambaConfig(
        hidden_size=64, state_size=8, num_hidden_layers=3, intermediate_size=128, time_step_rank=8, **_common()
    )
    return MambaForCausalLM(config)


def falcon_mamba() -> FalconMambaForCausalLM:
    config = FalconMambaConfig(
        hidden_size=64, state_size=8, num_hidden_layers=3, intermediate_size=128, time_step_rank=8, **_common()
    )
    return FalconMambaForCausalLM(config)


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
    # Real MoE sizes where they matter: 128 experts, 8 routed (Qwen3-30B-A3B's routing), ids past 10 and 100.
    "qwen3_moe128": lambda: qwen3_moe(num_experts=128, top_k=8, hidden=32, expert_width=16),
    "qwen3_dense_fp8_shapes": qwen3_dense_fp8_shapes,
    "qwen3_moe_fp8_shapes": lambda: qwen3_moe(num_experts=16, top_k=4, hidden=256, expert_width=128),
    "mamba": mamba,
    "falcon_mamba": falcon_mamba,
    "bert": bert,
}
# The Auto class that loads each kind (everything else is a causal LM).
AUTO_CLASS = {"bert": AutoModel}


def auto_class(kind: str):
    return AUTO_CLASS.get(kind, AutoModelForCausalLM)


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
