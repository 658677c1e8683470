"""Transformers' model zoo in miniature: every architecture of its auto mappings, built tiny from its config.

transformers' own test suite (which has a hand-written tiny config per model) is not installed, so the tiny
configs are derived here, generically: each config class's defaults, with every size shrunk (hidden sizes,
heads, layers, vocabulary, experts, vision/audio sub-configs) while keeping the relations between them (head
counts that divide, per-layer lists as long as the layers, special token ids inside the vocabulary).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
import transformers.models.auto.modeling_auto as auto
from transformers import CONFIG_MAPPING

VOCAB = 256
HIDDEN = 64
LAYERS = 2
HEADS = 4
HEAD_DIM = 16
FFN = 96
EXPERTS = 4
TOP_K = 2

# Which auto mapping, i.e. which kind of model (and inputs) each architecture is tested as.
TASKS = {  # task: (auto mapping, Auto class)
    "causal_lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    "seq2seq_lm": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    "encoder": ("MODEL_FOR_TEXT_ENCODING_MAPPING_NAMES", "AutoModelForTextEncoding"),
    "image_text_to_text": ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText"),
    "multimodal_lm": ("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "AutoModelForMultimodalLM"),
    "speech_seq2seq": ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "AutoModelForSpeechSeq2Seq"),
}


@dataclass(frozen=True)
class Arch:
    """One model class of one auto mapping."""

    task: str
    model_type: str
    class_name: str

    @property
    def id(self) -> str:
        return f"{self.task}:{self.model_type}"

    @property
    def auto_class(self) -> Any:
        return getattr(transformers, TASKS[self.task][1])

    @property
    def model_class(self) -> Any:
        return getattr(transformers, self.class_name)


def architectures() -> list[Arch]:
    """Every (model class, config class) pair of the mappings, once, under the first task that lists it.

    Several model types can share both (``gpt-sw3`` is a GPT-2): the one named like its config is kept.
    """
    chosen: dict[tuple[str, str], Arch] = {}
    for task, (mapping, _auto_class) in TASKS.items():
        for model_type, class_name in sorted(getattr(auto, mapping).items()):
            if isinstance(class_name, (tuple, list)):
                class_name = class_name[0]
            config_class = CONFIG_MAPPING[model_type]
            key = (class_name, config_class.__name__)
            if key not in chosen or (chosen[key].task == task and model_type == config_class.model_type):
                chosen[key] = Arch(task, model_type, class_name)
    return list(chosen.values())


# ------------------------------------------------------------------------------------------- shrinking rules
_WIDTH = {
    "hidden_size", "d_model", "n_embd", "n_embed", "embed_dim", "dim", "model_dim", "hidden_dim", "d_embed",
    "word_embed_proj_dim", "embedding_size", "emb_dim", "text_hidden_size", "encoder_hidden_size",
    "decoder_hidden_size", "out_hidden_size", "projector_hidden_size", "projection_dim", "output_dim",
    "attention_hidden_size", "hidden_size_global", "cross_hidden_size", "pooler_hidden_size",
    "vision_output_dim", "projection_hidden_dim", "patch_embed_hidden_size", "adapter_out_dim",
    "adapter_in_dim", "adapter_input_size", "image_text_hidden_size", "ple_embed_dim", "unit_embed_dim",
    "downsample_hidden_size", "text_config_hidden_size",
}  # fmt: skip
_FFN = {
    "intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner", "inner_dim",
    "moe_intermediate_size", "shared_expert_intermediate_size", "ffn_hidden_size", "mlp_dim", "dim_ff",
    "intermediate_size_mlp", "dense_intermediate_size", "shared_intermediate_size",
    "moe_shared_expert_intermediate_size", "shared_experts_intermediate_size", "decoder_intermediate_size",
    "speech_encoder_intermediate_size", "t2u_encoder_ffn_dim", "t2u_decoder_ffn_dim", "alignment_intermediate_size",
    "dff",
}  # fmt: skip
_LAYERS = {
    "num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers",
    "num_decoder_layers", "num_encoder_layers", "depth", "speech_encoder_layers", "t2u_encoder_layers",
    "t2u_decoder_layers", "decoder_num_layers", "layers", "num_blocks",
}  # fmt: skip
_HEADS = {
    "num_attention_heads", "n_head", "encoder_attention_heads", "decoder_attention_heads", "num_heads", "n_heads",
    "attention_heads", "speech_encoder_attention_heads", "t2u_encoder_attention_heads", "t2u_decoder_attention_heads",
    "swa_num_attention_heads", "cross_num_attention_heads", "resampler_n_heads", "resampler_heads",
    "linear_num_value_heads", "linear_num_heads",
}  # fmt: skip
_KV_HEADS = {"num_key_value_heads", "swa_num_key_value_heads", "cross_num_key_value_heads", "linear_num_key_heads"}
_HEAD_DIM = {
    "head_dim", "d_kv", "qk_head_dim", "swa_head_dim", "cross_head_dim", "resampler_head_dim", "dim_head",
    "linear_key_head_dim", "linear_value_head_dim", "linear_head_dim", "attention_head_dim", "kv_channels",
    "index_head_dim", "resampler_dim_head",
}  # fmt: skip
_EXPERTS = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"}
_TOP_K = {"num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_k", "top_k", "moe_top_k"}
_VOCAB = {"vocab_size", "vocab_size_per_layer_input"}  # and every other "*vocab*" size, see _limit
_RANK = {"kv_lora_rank", "q_lora_rank", "o_lora_rank", "laurel_rank", "hc_lowrank", "loop_gate_rank"}
_STAGE_DEPTH = {"depths", "num_res_blocks", "layers_per_block"}  # blocks per stage of a convolutional tower
# Anything else that reads as a width is shrunk too, unless it is a count, a length or a geometry.
_WIDTH_LIKE = re.compile(r"hidden|intermediate|ffn|embed|_dim$|^dim|_dims?_|rank|channel|width|_size$")
_NOT_WIDTH = re.compile(
    r"vocab|image|patch|position|window|chunk|kernel|stride|rate|bucket|max_|pool|^num_|per_layer|codebook_size|"
    r"sampling|hop|n_fft|frame|sample|length|seq|grid|merge|temporal|spatial|crop|resolution|scale|factor|block_size|"
    r"group|^n_|_num_|segment|types|cache|ngram|label"
)
_OTHER_MODULE = re.compile(r"out|text|proj|adapter|encoder|decoder|cross|vision|audio")
_LIMITS: list[tuple[set[str], int]] = [
    (_WIDTH, HIDDEN),
    (_FFN, FFN),
    (_HEADS, HEADS),
    (_HEAD_DIM, HEAD_DIM),
    (_EXPERTS, EXPERTS),
    (_TOP_K, TOP_K),
    (_VOCAB, VOCAB),
    (_RANK, 32),
    (_STAGE_DEPTH, 1),
]


def _limit(key: str) -> int | None:
    for keys, limit in _LIMITS:
        if key in keys:
            return limit
    if "vocab" in key and "offset" not in key:
        return VOCAB
    if key.endswith("heads") and "kv" not in key and "key_value" not in key:
        return HEADS
    if key.endswith(("head_dim", "_d_head", "head_size")):
        return HEAD_DIM
    if key == "num_filters":  # convolutional codecs double it at every stage
        return 4
    if key == "max_source_positions":  # audio encoders take exactly 2x this many frames (Whisper: 3000)
        return 32
    if _WIDTH_LIKE.search(key) and not _NOT_WIDTH.search(key):
        return HIDDEN
    return None


def _is_token_key(key: Any) -> bool:
    if not isinstance(key, str):
        return False
    if key in {"bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id"}:
        return True
    return "token" in key and key.endswith(("_id", "_index", "_ids"))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_ids(d: dict, out: set[int]) -> None:
    for key, value in d.items():
        if isinstance(value, dict):
            _token_ids(value, out)
        elif _is_token_key(key):
            out.update(v for v in (value if isinstance(value, (list, tuple)) else [value]) if _is_int(v))


def _layer_count(d: dict, default: int) -> int:
    """Layers to keep: enough for every kind in a per-layer pattern (``layer_types``...) to appear once."""
    wanted = LAYERS
    for value in d.values():
        if isinstance(value, list) and len(value) == default and default > 0:
            seen = list(map(repr, value))
            wanted = max(wanted, max(seen.index(kind) for kind in set(seen)) + 1)
    return min(default, wanted)


def _shrink(d: dict, remap: dict[int, int]) -> dict:
    out = dict(d)
    layers: dict[int, int] = {}  # original layer count -> kept
    for key, value in d.items():
        if isinstance(value, dict):
            out[key] = _shrink(value, remap)
        elif _is_token_key(key):
            if isinstance(value, list):
                out[key] = [remap.get(v, v) for v in value]
            elif _is_int(value):
                out[key] = remap.get(value, value)
        elif not isinstance(key, str):
            continue
        elif key in _LAYERS and _is_int(value) and value > 0:
            out[key] = layers[value] = _layer_count(d, value)
        elif (limit := _limit(key)) is not None:
            if _is_int(value) and value > 0:
                out[key] = min(value, limit)
            elif isinstance(value, list) and value and all(_is_int(v) and v > 0 for v in value):
                out[key] = [min(v, limit) for v in value]
    # Key/value heads: grouped stays grouped (2 of 4), multi-head stays multi-head, multi-query stays 1.
    for key in _KV_HEADS & d.keys():
        kv, heads = d[key], d.get("num_attention_heads")
        if _is_int(kv) and _is_int(heads):
            out[key] = out["num_attention_heads"] if kv == heads else (1 if kv == 1 else 2)
    # Per-layer lists follow the layer count they were written for.
    for original, kept in layers.items():
        for key, value in d.items():
            if isinstance(value, list) and len(value) == original and original != kept:
                out[key] = out[key][:kept]
            elif isinstance(value, dict) and value and all(_layer_index(k) is not None for k in value):
                out[key] = {k: v for k, v in out[key].items() if _layer_index(k) < kept}  # overrides by layer
    _relations(out, d)
    return out


def _layer_index(key: Any) -> int | None:
    if _is_int(key):
        return key
    return int(key) if isinstance(key, str) and key.isdigit() else None


def _scaled(parts: list[int], total: int) -> list[int]:
    """``parts`` rescaled to sum to ``total`` (each at least 1), e.g. an M-RoPE section split."""
    out = [max(1, p * total // sum(parts)) for p in parts]
    out[0] += total - sum(out)
    return out


def _relations(d: dict, base: dict) -> None:
    """Re-establish the relations between sizes that the rules above shrank independently.

    ``base`` is the same (sub-)config before shrinking: a relation is kept where it held there.
    """
    width_key = next((k for k in ("hidden_size", "d_model", "n_embd") if _is_int(base.get(k))), None)
    if width_key is None or not _is_int(d.get(width_key)):
        return
    hidden, base_hidden = d[width_key], base[width_key]
    heads = d.get("num_attention_heads", d.get("n_head"))
    # Widths of this module that were a small multiple or fraction of its hidden size stay so (Zamba's attention
    # width); widths that must match another module (adapter outputs, projections) keep the common HIDDEN.
    for key, value in base.items():
        own = isinstance(key, str) and key.endswith("hidden_size") and not _OTHER_MODULE.search(key)
        if own and key != width_key and _is_int(value) and value:
            if value % base_hidden == 0 and value // base_hidden <= 4:
                d[key] = hidden * (value // base_hidden)
            elif base_hidden % value == 0 and base_hidden // value <= 8:
                d[key] = max(1, hidden // (base_hidden // value))
    # Defaults left as None that every real checkpoint sets.
    if "head_dim" in d and d["head_dim"] is None and _is_int(heads):
        d["head_dim"] = hidden // heads
    if "num_key_value_heads" in d and d["num_key_value_heads"] is None and _is_int(heads):
        d["num_key_value_heads"] = heads
    experts = next((d[k] for k in _EXPERTS if _is_int(d.get(k))), None)
    if _is_int(d.get("moe_intermediate_size")) and d.get("n_routed_experts", 0) is None:
        d["n_routed_experts"] = experts = EXPERTS
        if d.get("n_shared_experts", 0) is None:
            d["n_shared_experts"] = 1
    for key in _TOP_K:
        if key in d and d[key] is None and experts:
            d[key] = TOP_K
    # Expert groups divide the experts; the routed groups are among them.
    for key in ("n_group", "num_expert_group", "num_group"):
        if _is_int(d.get(key)) and experts:
            d[key] = 2 if d[key] > 1 and experts % 2 == 0 else 1
            if _is_int(d.get("topk_group")):
                d["topk_group"] = 1
    for key in ("vision_feature_layer", "vision_feature_layers"):  # layers of a shrunk tower: count from the end
        if isinstance(d.get(key), list) and all(_is_int(v) and v >= 0 for v in d[key]):
            d[key] = [-1 - i for i in range(len(d[key]))]
    # Hybrid stacks: keep the layers where attention (or experts) first appear.
    layers_key = next((k for k in ("num_hidden_layers", "num_layers") if _is_int(d.get(k))), None)
    if layers_key:
        for period, offset in (
            ("attn_layer_period", "attn_layer_offset"),
            ("expert_layer_period", "expert_layer_offset"),
        ):  # noqa: E501
            if _is_int(d.get(period)) and _is_int(d.get(offset)):
                d[layers_key] = max(d[layers_key], d[offset] + 1)
        # A hybrid whose default has no attention layer at all, which no checkpoint has: the last one attends.
        if "attn_layer_indices" in d and base.get("attn_layer_indices") is None:
            d["attn_layer_indices"] = [d[layers_key] - 1]
        if isinstance(d.get("layer_types"), list) and set(d["layer_types"]) == {"linear_attention"}:
            d["layer_types"] = d["layer_types"][:-1] + ["full_attention"]
        for key in ("block_types",):  # a repeated pattern of block kinds: each kind once
            if isinstance(d.get(key), list) and len(d[key]) < base.get(layers_key, 0):
                d[layers_key] = max(d[layers_key], len(d[key]))
    if all(_is_int(d.get(k)) for k in ("num_layers_per_stack", "H_cycles", "L_cycles")):  # HRM: a stack per cycle
        d["num_layers_per_stack"] = 1
        d["num_hidden_layers"] = d["H_cycles"] * (d["L_cycles"] + 1)
    sliding = "sliding_attention" in (d.get("layer_types") or ()) or "num_sliding_attention_heads" in d
    if "sliding_window" in d and not d["sliding_window"] and sliding:
        d["sliding_window"] = 4  # shorter than the test prompts, so the window matters
    # Mamba-2 mixers: heads x head width == expand x hidden; the groups divide the heads.
    for heads_key, dim_key, expand_key in (
        ("mamba_n_heads", "mamba_d_head", "mamba_expand"),
        ("mamba_num_heads", "mamba_head_dim", "expand"),
        ("num_heads", "head_dim", "expand"),
        ("n_mamba_heads", "mamba_headdim", "mamba_expand"),
    ):
        if all(_is_int(d.get(k)) for k in (heads_key, dim_key, expand_key)):
            d[dim_key] = d[expand_key] * hidden // d[heads_key]
            if _is_int(d.get("mamba_d_ssm")):
                d["mamba_d_ssm"] = d[expand_key] * hidden
    for key in ("n_groups", "mamba_n_groups", "mamba_ngroups"):
        if _is_int(d.get(key)):
            d[key] = min(d[key], 2)
    if _is_int(d.get("d_head")) and _is_int(heads):  # XLNet
        d["d_head"] = hidden // heads
    zamba_attention = base.get("attention_hidden_size") == base.get("attention_head_dim", -1) * base.get(
        "num_attention_heads", 0
    )
    if zamba_attention and _is_int(heads):  # Zamba: attention width / heads
        d["attention_head_dim"] = d["attention_hidden_size"] // heads
    # Latent attention (DeepSeek, Mistral 4, LongCat): head widths that were sums or copies of others stay so.
    for total, parts in (("qk_head_dim", ("qk_nope_head_dim", "qk_rope_head_dim")),):
        if all(_is_int(base.get(k)) for k in (total, *parts)) and base[total] == sum(base[p] for p in parts):
            d[total] = sum(d[p] for p in parts)
    for copy, source in (("head_dim", "qk_head_dim"), ("head_dim", "qk_rope_head_dim")):
        if _is_int(base.get(copy)) and base.get(copy) == base.get(source):
            d[copy] = d[source]
    head_dim = d.get("head_dim") if _is_int(d.get("head_dim")) else hidden // heads if _is_int(heads) else None
    if _is_int(d.get("rotary_dim")) and head_dim:  # partial rotary stays partial
        d["rotary_dim"] = min(d["rotary_dim"], head_dim // 2)
    rope = d.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("mrope_section"), list) and head_dim:
        rope["mrope_section"] = _scaled(rope["mrope_section"], head_dim // 2)
    if isinstance(d.get("axial_pos_embds_dim"), list):  # Reformer: the axial factors add up to the width
        d["axial_pos_embds_dim"] = _scaled(d["axial_pos_embds_dim"], hidden)
    if _is_int(d.get("upsample_groups")):  # Mimi: depthwise upsampling, one group per channel
        d["upsample_groups"] = hidden


def _fix_apertus1p5(d: dict, base: dict) -> None:
    # The image and audio codebooks are ranges of the text vocabulary, back to back.
    d["vision_config"]["codebook_size"] = d["audio_config"]["codebook_size"] = 32
    d.update(image_token_offset=VOCAB - 128, audio_token_offset=VOCAB - 96)


def _fix_fun_asr_nano(d: dict, base: dict) -> None:
    d["adaptor_config"]["intermediate_size"] = d["text_config"]["hidden_size"] // 4


def _fix_dots3_note(d: dict, base: dict) -> None:
    for layer in d.get("text_config", d)["per_layer_config"].values():  # sliding layers: no latent split
        if "qk_nope_head_dim" in layer:
            layer["head_dim"] = layer["qk_nope_head_dim"] + layer.get("qk_rope_head_dim", HEAD_DIM)


def _fix_dbrx(d: dict, base: dict) -> None:
    # Read by the attention but absent from the default config; DBRX checkpoints set both.
    d["attn_config"].update(rope_theta=10000.0, clip_qkv=8.0)


def _fix_dory(d: dict, base: dict) -> None:
    # Input, recurrent and output stacks of one layer each; serialized as (attention, mlp) blocks, so doubled.
    attention = ["sliding_attention", "sliding_attention", "full_attention"]
    layer_types = [block for kind in attention for block in (kind, "mlp")]
    d.update(n_input_layers=2, n_recurrent_layers=2, n_output_layers=2, num_hidden_layers=6, layer_types=layer_types)


def _fix_kolibri1_1(d: dict, base: dict) -> None:
    # Its indexer scores keys with some of the query heads that share key head 0: no more than there are.
    d["index_num_heads"] = max(1, d["num_attention_heads"] // d["num_key_value_heads"])


def _fix_zamba(d: dict, base: dict) -> None:
    # The shared transformer block is tied across hybrid layers: keep two of them (layers 2 and 8).
    d.update(num_hidden_layers=9, layers_block_type=base["layers_block_type"][:9])


def _fix_ernie4_5_vl_moe(d: dict, base: dict) -> None:
    d["text_config"]["rope_parameters"]["mrope_section"] = [3, 3, 2]  # height, width (equal), time: head_dim / 2


def _mrope(default: list[int]) -> Any:
    """Multimodal RoPE whose default sections (in the modeling code, for 128-wide heads) must fit tiny heads."""

    def fix(d: dict, base: dict) -> None:
        text = d["text_config"]
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        rope = text.setdefault("rope_parameters", {})
        rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
        rope["mrope_section"] = _scaled(rope.get("mrope_section") or default, rotary // 2)

    return fix


def _fix_gemma3n(d: dict, base: dict) -> None:
    # The last layers reuse the key/values of the last earlier layer of their kind: keep one full pattern of each.
    text, base_text = d.get("text_config", d), base.get("text_config", base)
    for key, value in base_text.items():
        if isinstance(value, list) and len(value) == base_text["num_hidden_layers"]:
            text[key] = [min(v, FFN) if _is_int(v) else v for v in value[:10]]
    text.update(num_hidden_layers=10, num_kv_shared_layers=5)


def _fix_xlstm(d: dict, base: dict) -> None:
    # The config rounds the query/key width up to a multiple of 64 where the modules do not: 128 * 0.5 agrees.
    d.update(hidden_size=128, embedding_dim=128)


# What the generic rules cannot know: relations across sub-configs, or counts a model needs more of.
FIXES = {
    "apertus1p5": _fix_apertus1p5,
    "dbrx": _fix_dbrx,
    "dory": _fix_dory,
    "dots3_note": _fix_dots3_note,
    "dots3_note_text": _fix_dots3_note,
    "ernie4_5_vl_moe": _fix_ernie4_5_vl_moe,
    "fun_asr_nano": _fix_fun_asr_nano,
    "gemma3n_text": _fix_gemma3n,
    "kolibri1_1": _fix_kolibri1_1,  # transformers 5.25
    "glm46v": _mrope([8, 12, 12]),
    "glm4v": _mrope([8, 12, 12]),
    "glm4v_moe": _mrope([8, 12, 12]),
    "glm_ocr": _mrope([8, 12, 12]),
    "glmga": _mrope([8, 12, 12]),
    "hunyuan_vl": _mrope([16, 24, 24]),
    "paddleocr_vl": _mrope([16, 24, 24]),
    "qwen2_5_vl": _mrope([16, 24, 24]),
    "qwen2_vl": _mrope([16, 24, 24]),
    "xlstm": _fix_xlstm,
    "zamba": _fix_zamba,
}


def tiny_config(arch: Arch) -> Any:
    """The config class's defaults, shrunk (see module docstring), as ``arch``'s model class takes it."""
    cls = CONFIG_MAPPING[arch.model_type]
    base = cls().to_dict()
    ids: set[int] = set()
    _token_ids(base, ids)
    high = sorted(i for i in ids if i >= VOCAB - 32)
    remap = {old: VOCAB - 1 - i for i, old in enumerate(high)}
    shrunk = _shrink(base, remap)
    shrunk.pop("transformers_version", None)
    if arch.model_type in FIXES:
        FIXES[arch.model_type](shrunk, base)
    if shrunk.get("is_encoder_decoder") and shrunk.get("decoder_start_token_id") is None:
        shrunk["decoder_start_token_id"] = shrunk.get("pad_token_id") or 0  # as real T5-style checkpoints set it
    if arch.task == "causal_lm" and "is_decoder" in shrunk:
        shrunk["is_decoder"] = True  # an encoder architecture used as a causal LM (BERT, RoBERTa, Reformer...)
    config = cls.from_dict(shrunk)
    return _for_class(config, arch.model_class)


def _for_class(config: Any, model_class: type) -> Any:
    """The config ``model_class`` takes: the composite itself, or the sub-config of its class (Emu3, MusicGen)."""
    wanted = getattr(model_class, "config_class", None)
    if wanted is None or isinstance(config, wanted):
        return config
    for name in config.sub_configs:
        sub = getattr(config, name, None)
        if isinstance(sub, wanted):
            return sub
    return config


def special_ids(config: Any) -> set[int]:
    ids: set[int] = set()
    _token_ids(config.to_dict(), ids)
    return ids


def prompt_ids(config: Any, count: int, seed: int = 0) -> list[int]:
    """``count`` ordinary token ids: inside the vocabulary, never a special (image, audio, pad...) id."""
    specials = special_ids(config)
    usable = [i for i in range(3, VOCAB - 32) if i not in specials]
    step = max(1, int(math.sqrt(len(usable))))
    return [usable[(seed + k * step) % len(usable)] for k in range(count)]


# ------------------------------------------------------------------------------------------- the comparison
BUDGET_FRACTION = 0.35
MAX_NEW_TOKENS = 4


@dataclass
class Outcome:
    """What happened to one architecture."""

    # "identical": forward, generation and every tensor bit for bit; "weights": every tensor bit for bit (no
    # generic inputs for its forward); "refused": a clear error at load time. (transformers failing to build or
    # save the model raises PlainLoadFails instead.)
    status: str
    detail: str = ""
    units: int = 0
    model_bytes: int = 0
    budget: int = 0
    checks: list[str] = field(default_factory=list)


class PlainLoadFails(Exception):
    """transformers itself cannot build, save, load or run this architecture (not a streaming problem)."""


def build_and_save(arch: Arch, folder: Path) -> Any:
    """The tiny model with fixed random weights, saved as sharded safetensors; returns its config."""
    try:
        config = tiny_config(arch)
        torch.manual_seed(0)
        model = arch.model_class._from_config(config)
        model.save_pretrained(folder, max_shard_size="200KB")
    except Exception as err:  # noqa: BLE001 - any failure of transformers' own path is reported as such
        raise PlainLoadFails(f"build/save: {type(err).__name__}: {err}") from err
    return config


def _text_inputs(config: Any, batch: int = 2, length: int = 8) -> dict[str, torch.Tensor]:
    """A left-padded batch: the second row is 3 pad tokens shorter."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    pad = text.pad_token_id if _is_int(getattr(text, "pad_token_id", None)) else 0
    ids = torch.tensor([prompt_ids(config, length, seed=row) for row in range(batch)])
    mask = torch.ones_like(ids)
    if batch > 1:
        ids[1, :3] = pad
        mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def model_inputs(model: Any) -> dict[str, torch.Tensor]:
    """Text inputs for ``model``: a left-padded batch, plus what an encoder-decoder's decoder starts from."""
    config = model.config
    inputs = _text_inputs(config)
    codebooks = getattr(config, "num_codebooks", None)
    if _is_int(codebooks) and not getattr(config, "is_encoder_decoder", False):  # MusicGen: a row per codebook
        inputs = {"input_ids": inputs["input_ids"].repeat_interleave(codebooks, dim=0)}
    if getattr(config, "is_encoder_decoder", False) and hasattr(model, "generation_config"):
        start = model.generation_config.decoder_start_token_id
        start = start if _is_int(start) else prompt_ids(config, 1)[0]
        inputs["decoder_input_ids"] = torch.tensor([[start] + prompt_ids(config, 2, seed=5)] * 2)
    return inputs


def _sub(config: Any, *names: str) -> Any:
    for name in names:
        sub = getattr(config, name, None)
        if sub is not None and not isinstance(sub, (int, str, list)):
            return sub
    return None


def _first_int(config: Any, *names: str, default: int | None = None) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and value and _is_int(value[0]):
            value = value[0]
        if _is_int(value):
            return value
    return default


def _random(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def image_candidates(config: Any, batch: int = 2) -> list[dict[str, torch.Tensor]]:
    """Pixel inputs in the layouts vision towers take: square images, or flattened patches with a grid (Qwen-VL)."""
    vision = _sub(config, "vision_config", "encoder", "vision_tower_config") or config
    channels = _first_int(vision, "num_channels", "in_channels", "in_chans", default=3)
    patch = _first_int(vision, "patch_size", default=14)
    size = _first_int(vision, "image_size", default=224)
    if size > 448:  # towers that take any size (Pixtral: 1540): a few patches are enough, and 100x faster
        size = 16 * patch
    out = []
    temporal = _first_int(vision, "temporal_patch_size")
    merge = _first_int(vision, "spatial_merge_size", default=2)
    if temporal:
        side = 2 * merge  # a 4x4 patch grid: 4 tokens after merging
        grid = torch.tensor([[1, side, side]] * batch)
        pixels = _random(batch * side * side, channels * temporal * patch * patch)
        out.append({"pixel_values": pixels, "image_grid_thw": grid})
    pixels = _random(batch, channels, size, size)
    out.append({"pixel_values": pixels})
    out.append({"pixel_values": pixels, "image_sizes": torch.tensor([[size, size]] * batch)})
    out.append({"pixel_values": pixels[:, None]})  # (batch, images, C, H, W): Idefics
    return out


def audio_candidates(config: Any, batch: int = 2) -> list[dict[str, torch.Tensor]]:
    """Log-mel inputs for the usual (mels x frames) and (frames x features) layouts."""
    audio = _sub(config, "audio_config", "encoder_config", "encoder") or config
    mels = _first_int(audio, "num_mel_bins", "feature_size", "input_feat_per_channel", "n_mels", default=80)
    positions = _first_int(audio, "max_source_positions")
    lengths = ([2 * positions] if positions else []) + [64]
    out = []
    for frames in lengths:
        features = _random(batch, mels, frames)
        out.append({"input_features": features})
        out.append({"input_features": features, "input_features_mask": torch.ones(batch, frames, dtype=torch.long)})
        out.append({"input_features": features.transpose(1, 2).contiguous()})
    out.append({"input_values": _random(batch, 16000)})
    return out


def _image_token(config: Any) -> int | None:
    for holder in (config, _sub(config, "text_config")):
        value = _first_int(holder, "image_token_id", "image_token_index") if holder is not None else None
        if value is not None:
            return value
    return None


def _count_features(features: Any, batch: int) -> int | None:
    """Tokens per image from whatever ``get_image_features`` returns (a tensor, a tuple, an output object)."""
    if hasattr(features, "pooler_output") and isinstance(features.pooler_output, (torch.Tensor, list, tuple)):
        features = features.pooler_output
    elif hasattr(features, "last_hidden_state"):
        features = features.last_hidden_state
    if isinstance(features, (list, tuple)):
        if not features or not isinstance(features[0], torch.Tensor):
            return None
        features = torch.cat([f.reshape(-1, f.shape[-1]) for f in features])
    if not isinstance(features, torch.Tensor) or features.dim() < 2:
        return None
    total = features.reshape(-1, features.shape[-1]).shape[0]
    return total // batch if total % batch == 0 else None


def _call(model: Any, method: str, kwargs: dict) -> Any:
    with torch.no_grad():
        return getattr(model, method)(**kwargs)


def media_inputs(reference: Any) -> tuple[dict[str, torch.Tensor] | None, list[tuple[str, dict]]]:
    """Forward inputs that feed the vision/audio tower through the model, and direct tower calls to compare.

    Found by trying each candidate layout on the plain model: returns (forward inputs or None, [(method, kwargs)])
    for the calls the plain model accepts.
    """
    config = reference.config
    towers: list[tuple[str, dict]] = []
    forward: dict[str, torch.Tensor] | None = None
    main = getattr(reference, "main_input_name", "input_ids")
    text = model_inputs(reference)
    for method, candidates in (("get_image_features", image_candidates), ("get_audio_features", audio_candidates)):
        if not hasattr(reference, method):
            continue
        for candidate in candidates(config):
            try:
                features = _call(reference, method, candidate)
            except Exception:  # noqa: BLE001 - not this layout
                continue
            towers.append((method, candidate))
            per_image = _count_features(features, 2) if method == "get_image_features" else None
            token = _image_token(config)
            if forward is None and per_image and token is not None:
                ids = torch.tensor([prompt_ids(config, 3, seed=row) + [token] * per_image + prompt_ids(config, 2)
                                    for row in range(2)])  # fmt: skip
                attempt = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **candidate}
                try:
                    _call(reference, "forward", attempt)
                    forward = attempt
                except Exception:  # noqa: BLE001 - this model wants more than image tokens (boi/eoi, sizes...)
                    pass
            break
    if main != "input_ids":  # the pixels or the audio are the main input (BLIP, Whisper, Pix2Struct...)
        extra = {k: v for k, v in text.items() if k != "attention_mask" or "input_ids" in text}
        if main in ("pixel_values", "flattened_patches"):
            candidates = image_candidates(config)
        else:
            candidates = audio_candidates(config)
        for candidate in candidates:
            if main == "flattened_patches":
                pixels = candidate["pixel_values"]
                candidate = {"flattened_patches": _random(2, 16, pixels.shape[1] * 16 * 16 + 2)}
            for with_text in (extra, {k: v for k, v in extra.items() if k.startswith("decoder_")}):
                attempt = {**with_text, **candidate}
                try:
                    _call(reference, "forward", attempt)
                    return attempt, towers
                except Exception:  # noqa: BLE001 - not this layout
                    continue
    return forward, towers


def _float_outputs(output: Any) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of a forward's output, by name (logits, hidden states, encoder outputs...)."""
    out = {}

    def walk(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                out[name] = value
        elif isinstance(value, dict) or hasattr(value, "items"):
            for key, item in value.items():
                walk(f"{name}.{key}", item)
        elif isinstance(value, (tuple, list)):
            for i, item in enumerate(value):
                walk(f"{name}[{i}]", item)

    walk("out", output)
    return out


def _same(expected: Any, got: Any, what: str) -> None:
    a, b = _float_outputs(expected), _float_outputs(got)
    if isinstance(expected, torch.Tensor) and not expected.is_floating_point():
        a, b = {"out": expected}, {"out": got}
    assert a.keys() == b.keys(), f"{what}: outputs {sorted(a)} vs {sorted(b)}"
    for name in a:
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype or not _bitwise_equal(x, y):
            diff = (x.double() - y.double()).abs().max().item() if x.shape == y.shape else "shapes differ"
            raise AssertionError(f"{what}: {name} differs from the plain load (max abs diff {diff})")


def _bitwise_equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit for bit, so NaNs in the same places (XLNet's unused positions) count as equal and -0.0 != 0.0."""
    if not x.is_floating_point():
        return torch.equal(x, y)
    return torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8))


def _plain(what: str, fn: Any) -> Any:
    try:
        return fn()
    except Exception as err:  # noqa: BLE001
        raise PlainLoadFails(f"{what}: {type(err).__name__}: {str(err)[:300]}") from err


def plain_load(arch: Arch, folder: Path, **load_kwargs: Any) -> Any:
    """transformers' own ``from_pretrained`` of the saved folder (`PlainLoadFails` if it cannot).

    A load whose report lists missing weights did not load the checkpoint: transformers filled those weights
    with random values (its save and load disagree on their names), which streaming rightly refuses to do.
    """
    model, info = _plain(
        "plain load", lambda: arch.model_class.from_pretrained(folder, output_loading_info=True, **load_kwargs)
    )
    if info["missing_keys"]:
        missing = sorted(info["missing_keys"])
        raise PlainLoadFails(
            f"plain load: transformers' own save/load round trip loses {len(missing)} weights (it initializes them "
            f"randomly), e.g. {missing[0]}"
        )
    return model


def compare(arch: Arch, folder: Path, **load_kwargs: Any) -> Outcome:
    """Load ``folder`` normally and streamed under a budget below the model; compare everything bit for bit.

    ``load_kwargs`` go to both loads (``dtype``, ``experts_implementation``...). Raises `PlainLoadFails` when the
    normal load itself fails (then streaming has nothing to match), and AssertionError on any difference.
    """
    from equivalence import assert_units_match_plain_load

    import hf_weightstream
    from hf_weightstream import StreamConfig
    from hf_weightstream.errors import StreamingUnsupportedError
    from hf_weightstream.units import full_bytes

    cls = arch.model_class
    reference = plain_load(arch, folder, **load_kwargs)
    prepare(reference)
    media, towers = media_inputs(reference)
    inputs = model_inputs(reference) if getattr(reference, "main_input_name", "input_ids") == "input_ids" else media
    try:
        if inputs is None:
            raise PlainLoadFails(f"plain forward: no input layout found for {reference.main_input_name}")
        with torch.no_grad():
            expected = _plain("plain forward", lambda: reference(**inputs))
    except PlainLoadFails as err:
        # The model loads but the zoo has no inputs its plain forward accepts (BLIP-2's Q-Former ids, UDOP's
        # boxes, a default config transformers cannot run): check its weights, unit by unit, instead.
        return _weights_only(cls, folder, reference, str(err), **load_kwargs)
    try:
        probe = cls.from_pretrained(folder, device_map="stream", **load_kwargs)
    except StreamingUnsupportedError as err:
        return Outcome("refused", str(err))
    # The budget is a fraction of what the forwards use (a text-only forward of a vision-language model never
    # touches its vision tower), and never below what the model needs at once.
    prepare(probe)
    with torch.no_grad():
        for call in (inputs, media if media is not inputs else None):
            if call is not None:
                probe(**call)
    for method, kwargs in towers:
        _call(probe, method, kwargs)
    engine = probe._hf_weightstream
    used = {id(u): u for u in engine.schedule}.values()
    used_bytes = sum(full_bytes(u) for u in used)
    budget = max(int(used_bytes * BUDGET_FRACTION), engine.minimum_budget())
    units, model_bytes = len(engine.units), engine.model_bytes
    del probe, engine
    streamed = cls.from_pretrained(
        folder, device_map="stream", stream_config=StreamConfig(budget=budget), **load_kwargs
    )
    prepare(streamed)
    outcome = Outcome("identical", units=units, model_bytes=model_bytes, budget=budget)
    with torch.no_grad():
        _same(expected, streamed(**inputs), "forward")
    outcome.checks.append("forward")
    if reference.can_generate():
        outcome.checks += _compare_generate(reference, streamed, inputs)
    if media is not None and media is not inputs:
        with torch.no_grad():
            _same(reference(**media), streamed(**media), "forward with media")
        outcome.checks.append("forward with media")
    for method, kwargs in towers:
        _same(_call(reference, method, kwargs), _call(streamed, method, kwargs), method)
        outcome.checks.append(method)
    stats = hf_weightstream.stats(streamed)
    assert stats["peak_resident_bytes"] <= budget, f"peak {stats['peak_resident_bytes']} over budget {budget}"
    if budget < used_bytes:
        assert stats["evictions"] > 0, "the budget is below what the forward uses, yet nothing was evicted"
        outcome.checks.append("evictions")
    # The guard reads every unit whole, row-lookup tables included: a values check, run with room for them.
    streamed._hf_weightstream.pool.budget = max(2 * model_bytes, streamed._hf_weightstream.minimum_budget())
    assert_units_match_plain_load(streamed, reference)
    outcome.checks.append("units")
    return outcome


def _weights_only(cls: type, folder: Path, reference: Any, why: str, **load_kwargs: Any) -> Outcome:
    from equivalence import assert_units_match_plain_load

    from hf_weightstream import StreamConfig
    from hf_weightstream.errors import StreamingUnsupportedError

    try:
        probe = cls.from_pretrained(folder, device_map="stream", **load_kwargs)
    except StreamingUnsupportedError as err:
        return Outcome("refused", str(err))
    # A values check: room for every unit, tables read whole (a cast unit holds its raw and cast bytes at once).
    budget = max(2 * probe._hf_weightstream.model_bytes, probe._hf_weightstream.minimum_budget())
    streamed = cls.from_pretrained(
        folder, device_map="stream", stream_config=StreamConfig(budget=budget), **load_kwargs
    )
    engine = streamed._hf_weightstream
    assert_units_match_plain_load(streamed, reference)
    return Outcome("weights", why, len(engine.units), engine.model_bytes, budget, ["units"])


def prepare(model: Any) -> None:
    """What a user calls before the first forward of a few models (X-MOD's language adapters)."""
    if hasattr(model, "set_default_language") and getattr(model.config, "languages", None):
        model.set_default_language(list(model.config.languages)[0])


def _compare_generate(reference: Any, streamed: Any, inputs: dict[str, torch.Tensor]) -> list[str]:
    gen_inputs = {k: v for k, v in inputs.items() if not k.startswith("decoder_")}
    checks = []
    for name, kwargs in (
        ("greedy", dict(do_sample=False)),
        ("greedy again", dict(do_sample=False)),
        ("beam search", dict(do_sample=False, num_beams=2)),
    ):
        kwargs.update(max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS)
        try:
            expected = reference.generate(**gen_inputs, **kwargs)
        except Exception:  # noqa: BLE001 - this generation mode is not supported by the model itself
            continue
        _same(expected, streamed.generate(**gen_inputs, **kwargs), name)
        checks.append(name)
    return checks


# ------------------------------------------------------------------------------------------- the report
def run_all(root: Path, only: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every architecture through build, save and `compare`; what happened to each, with its time."""
    import time
    import traceback

    results = {}
    for arch in architectures():
        if only and arch.id not in only and arch.model_type not in only:
            continue
        start = time.perf_counter()
        try:
            build_and_save(arch, root / arch.id.replace(":", "_"))
            outcome = compare(arch, root / arch.id.replace(":", "_"))
            result = {"status": outcome.status, "detail": outcome.detail[:300], "checks": outcome.checks,
                      "units": outcome.units, "model_bytes": outcome.model_bytes, "budget": outcome.budget}  # fmt: skip
        except PlainLoadFails as err:
            result = {"status": "skipped", "detail": str(err)[:300]}
        except AssertionError as err:
            result = {"status": "different", "detail": str(err)[:300]}
        except Exception as err:  # noqa: BLE001 - a crash is a result here
            frames = [line for line in traceback.format_exc().splitlines() if "hf_weightstream" in line][-2:]
            result = {"status": "crashed", "detail": f"{type(err).__name__}: {str(err)[:300]}", "where": frames}
        result["seconds"] = round(time.perf_counter() - start, 2)
        results[arch.id] = result
        print(arch.id, result["status"], result["seconds"], flush=True)
    return results


def write_report(results: dict[str, dict[str, Any]], out: Path, command: str, seconds: float) -> None:
    import collections
    import json

    counts = collections.Counter(r["status"] for r in results.values())
    buildable = len(results) - counts["skipped"]
    streams = counts["identical"] + counts["weights"]
    out.with_suffix(".json").write_text(json.dumps({"command": command, "seconds": seconds, "results": results},
                                                   indent=1) + "\n")  # fmt: skip
    lines = [
        f"# The architecture zoo: {len(results)} architectures of transformers {transformers.__version__}",
        "",
        f"Command: `{command}` ({seconds / 60:.1f} min on this project's 2-CPU machine, shared with other work).",
        "",
        "| outcome | architectures |",
        "|---|---:|",
        f"| streams bit for bit: forward, generation (greedy twice, beam), towers, every tensor | "
        f"{counts['identical']} |",
        f"| streams, every tensor bit for bit (no generic inputs for its forward) | {counts['weights']} |",
        f"| refused at load time with the reason and what to do | {counts['refused']} |",
        f"| differs or crashes (known failures, listed in tests/test_zoo.py) | "
        f"{counts['different'] + counts['crashed']} |",
        f"| transformers itself cannot build or save it (skip list) | {counts['skipped']} |",
        "",
        f"**{streams} of {buildable} buildable architectures stream ({100 * streams / buildable:.1f}%).**",
        "",
        "| architecture | outcome | checks | units | seconds | detail |",
        "|---|---|---|---:|---:|---|",
    ]
    for arch_id, r in results.items():
        detail = r.get("detail", "").replace("|", "/").replace("\n", " ")[:160]
        checks = ", ".join(r.get("checks", []))
        lines.append(f"| {arch_id} | {r['status']} | {checks} | {r.get('units', '')} | {r['seconds']} | {detail} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    import argparse
    import sys
    import tempfile
    import time
    import warnings

    sys.path.insert(0, str(Path(__file__).parent))  # equivalence.py
    parser = argparse.ArgumentParser(description="Run the whole zoo and write its report (.md and .json).")
    parser.add_argument("--out", type=Path, required=True, help="report path without suffix")
    parser.add_argument("only", nargs="*", help="architecture ids or model types (default: all)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hfws-zoo-") as tmp:
        found = run_all(Path(tmp), args.only)
    write_report(found, args.out, "python tests/zoo.py --out " + str(args.out), time.perf_counter() - began)
