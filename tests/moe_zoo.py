"""Tiny random MoE models of the families whose experts module follows transformers' experts contract.

Realistic routing shape where it matters: 128 experts, 4 routed per token (ids past 10 and 100, and a prompt of
a few tokens touches a third of a layer's experts, not all of them). Checkpoints are written by
``save_pretrained``, so per-expert families (Qwen, Mixtral, DeepSeek, GLM, OLMoE) carry one tensor per expert
that transformers fuses on load, and gpt-oss carries fused ``[E, ...]`` tensors with biases.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

EXPERTS, TOP_K = 128, 4
_COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
FAMILIES: dict[str, dict] = {
    "qwen3_moe": dict(intermediate_size=64, moe_intermediate_size=16, num_experts=EXPERTS, num_experts_per_tok=TOP_K),
    "qwen2_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
    ),
    "mixtral": dict(intermediate_size=16, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K),
    "olmoe": dict(intermediate_size=16, num_experts=EXPERTS, num_experts_per_tok=TOP_K),
    "deepseek_v3": dict(
        num_key_value_heads=4,
        intermediate_size=64,
        moe_intermediate_size=16,
        n_routed_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        n_group=8,
        topk_group=4,
        first_k_dense_replace=0,
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_shared_experts=1,
    ),
    "glm4_moe": dict(
        intermediate_size=64,
        moe_intermediate_size=16,
        n_routed_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=0,
        head_dim=8,
    ),
    "gpt_oss": dict(
        intermediate_size=16,
        num_local_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        head_dim=8,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=16,
    ),
    "qwen3_next": dict(
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        shared_expert_intermediate_size=16,
        layer_types=["linear_attention", "full_attention"],
        linear_num_value_heads=4,
        linear_num_key_heads=2,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        head_dim=8,
    ),
}


def save(family: str, folder: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**_COMMON, **FAMILIES[family], **overrides})
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="200KB")
    return folder


def max_routed(model, *calls) -> int:
    """The most distinct experts any single experts call of ``model`` routes to while running ``calls``."""
    seen: list[int] = []

    def record(module, args):
        ids = args[1]
        seen.append(int(ids[ids < module.num_experts].unique().numel()))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if hasattr(m, "_is_expert_parallel")]
    try:
        with torch.no_grad():
            for call in calls:
                call()
    finally:
        for hook in hooks:
            hook.remove()
    return max(seen)
