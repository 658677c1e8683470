"""Fail loudly, naming the API, when a private transformers/torch internal we rely on moves or changes shape.

Private transformers APIs live in hf_weightstream/_transformers_compat.py; the private huggingface_hub helpers
that write Hub cache entries exactly as hf_hub_download does are imported in hf_weightstream/hub/_hf_compat.py
(all of them are checked, with what they do, in tests/test_hub_private_apis.py).
"""

from __future__ import annotations

import inspect

import tiny
import torch
import transformers
from transformers import PreTrainedModel
from transformers.core_model_loading import WeightConverter, WeightRenaming

from hf_weightstream import _transformers_compat as compat


def params(func) -> list[str]:
    return list(inspect.signature(func).parameters)


def test_private_transformers_apis_keep_their_shape():
    version = transformers.__version__
    assert params(compat._get_dtype)[:7] == [
        "dtype",
        "checkpoint_files",
        "config",
        "sharded_metadata",
        "state_dict",
        "weights_only",
        "hf_quantizer",
    ], f"transformers {version}: modeling_utils._get_dtype changed"
    assert params(compat.rename_source_key)[:5] == [
        "source_key",
        "weight_renamings",
        "weight_converters",
        "base_model_prefix",
        "meta_state_dict",
    ], f"transformers {version}: core_model_loading.rename_source_key changed"
    assert params(compat.get_model_conversion_mapping)[:3] == ["model", "key_mapping", "hf_quantizer"]
    # transformers 5.25 added ``config`` (it applies the config's runtime fusions there): build_skeleton passes it.
    assert params(PreTrainedModel.get_init_context) in (
        ["dtype", "is_quantized", "_is_ds_init_called", "allow_all_kernels"],
        ["dtype", "is_quantized", "_is_ds_init_called", "allow_all_kernels", "config"],
    ), f"transformers {version}: PreTrainedModel.get_init_context changed"
    assert params(PreTrainedModel._move_missing_keys_from_meta_to_device)[1:] == [
        "missing_keys",
        "device_map",
        "device_mesh",
        "hf_quantizer",
    ]
    assert params(PreTrainedModel._initialize_missing_keys)[1:] == ["is_quantized"]
    assert params(PreTrainedModel._get_dtype_plan)[1:] == ["dtype"]
    assert params(WeightConverter.convert)[1:] == ["layer_name", "model", "config", "hf_quantizer", "loading_info"]
    assert params(WeightConverter.add_tensor)[1:] == ["target_key", "source_key", "source_pattern", "future"]
    assert issubclass(WeightRenaming, compat.WeightRenaming)
    assert set(compat.LoadStateDictInfo.__dataclass_fields__) >= {"missing_keys", "unexpected_keys", "error_msgs"}
    assert callable(compat.patch_output_recorders) and callable(compat.build_glob_alternation)
    keys = ["experts.10.w", "experts.2.w", "experts.1.w"]
    assert sorted(keys, key=compat.dot_natural_key) == ["experts.1.w", "experts.2.w", "experts.10.w"], (
        f"transformers {version}: core_model_loading.dot_natural_key no longer orders keys naturally"
    )


def test_private_peft_integration_api_keeps_its_shape():
    from transformers.integrations.peft import maybe_load_adapters

    assert params(maybe_load_adapters)[:2] == ["pretrained_model_name_or_path", "download_kwargs"], (
        f"transformers {transformers.__version__}: integrations.peft.maybe_load_adapters changed"
    )


def test_private_apis_of_saving_and_computed_weights_keep_their_shape():
    version = transformers.__version__
    assert params(compat.remove_tied_weights_from_state_dict) == ["state_dict", "model"], (
        f"transformers {version}: modeling_utils.remove_tied_weights_from_state_dict changed"
    )
    assert params(compat.revert_weight_conversion) == ["model", "state_dict"], (
        f"transformers {version}: core_model_loading.revert_weight_conversion changed"
    )
    assert params(compat.custom_object_save)[:3] == ["obj", "folder", "config"]
    assert callable(PreTrainedModel.initialize_weights) and hasattr(PreTrainedModel, "_keys_to_ignore_on_save")
    assert hasattr(PreTrainedModel, "_keys_to_ignore_on_load_missing")
    assert params(PreTrainedModel._adjust_missing_and_unexpected_keys)[1:] == ["loading_info"], (
        f"transformers {version}: PreTrainedModel._adjust_missing_and_unexpected_keys changed"
    )
    assert params(compat.log_state_dict_report) == [
        "model",
        "pretrained_model_name_or_path",
        "ignore_mismatched_sizes",
        "loading_info",
        "logger",
    ], f"transformers {version}: loading_report.log_state_dict_report changed"
    assert params(PreTrainedModel.tie_weights)[1:3] == ["missing_keys", "recompute_mapping"]
    tied = tiny.llama(tied=True)
    assert set(tied.all_tied_weights_keys) == {"lm_head.weight"}, (
        f"transformers {version}: PreTrainedModel.all_tied_weights_keys changed"
    )
    assert tied.get_parameter_or_buffer("lm_head.weight") is tied.model.embed_tokens.weight


def test_private_torch_apis_of_placeholders_keep_their_shape():
    import torch
    from torch.utils._pytree import tree_flatten, tree_map

    assert callable(torch.Tensor._make_wrapper_subclass), "torch: Tensor._make_wrapper_subclass is gone"
    assert callable(torch._C._disabled_torch_function_impl), "torch: _C._disabled_torch_function_impl is gone"
    assert tree_map(lambda x: x + 1, ([1], {"a": 2})) == ([2], {"a": 3}) and tree_flatten([1, (2,)])[0] == [1, 2]
    schema = torch.ops.aten.mul_.Tensor._schema
    assert schema.arguments[0].alias_info.is_write and schema.arguments[1].alias_info is None, (
        "torch: an op schema no longer says which arguments it writes (placeholders refuse writes by it)"
    )


def test_private_huggingface_hub_helpers_keep_their_shape():
    from huggingface_hub import file_download

    expected = {
        "_cache_commit_hash_for_specific_revision": ["storage_folder", "revision", "commit_hash"],
        "_check_disk_space": ["expected_size", "target_dir"],
        "_chmod_and_move": ["src", "dst"],
        "_create_symlink": ["src", "dst", "new_blob"],
    }
    for name, parameters in expected.items():
        assert params(getattr(file_download, name)) == parameters, f"huggingface_hub.file_download.{name} changed"
    assert callable(file_download.repo_folder_name) and file_download.REGEX_COMMIT_HASH.match("a" * 40)


def test_a_converter_on_one_experts_slice_sees_the_slices_shape():
    """Transpose(check_dims=True) compares what it gets with ``model.get_parameter``: it must be shown the slice."""
    from torch import nn
    from transformers.core_model_loading import Transpose

    model = nn.Module()
    model.experts = nn.Module()
    model.experts.gate_up_proj = nn.Parameter(torch.empty(8, 6, 4, device="meta"))
    one = torch.arange(24.0).view(1, 4, 6)  # one expert, stored [1, H, 2I]
    sliced = compat._SlicedParameters(model, {"experts.gate_up_proj": (1, 6, 4)})
    out = Transpose(1, 2, check_dims=True).convert(
        {"gate_up_proj": one}, ["gate_up_proj"], ["gate_up_proj"], model=sliced, full_layer_name="experts.gate_up_proj"
    )
    assert next(iter(out.values())).shape == (1, 6, 4), f"transformers {transformers.__version__}: Transpose changed"


def test_torch_storage_use_count_counts_the_tensors_sharing_a_storage():
    """Direct reads recycle a buffer only when no tensor outside the engine views it (_torch_compat)."""
    import mmap

    from hf_weightstream._torch_compat import storage_users

    base = torch.frombuffer(mmap.mmap(-1, 1 << 16), dtype=torch.uint8)
    assert storage_users(base) == 1, f"torch {torch.__version__}: torch._C._storage_Use_Count changed meaning"
    views = [base[:10], base[100:200].view(torch.int32)]
    assert storage_users(base) == 3
    del views
    assert storage_users(base) == 1


def test_fp8_dequantizer_casts_a_weight_stored_without_scale():
    """An FP8 checkpoint's bf16 weights are planned as plain renames (compat._stored_unquantized) because
    transformers' dequantizer only casts a weight that comes without its ``weight_scale_inv``."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    weight = torch.randn(4, 8, dtype=torch.bfloat16)
    out = Fp8Dequantize(None).convert({"weight": weight}, full_layer_name="x.weight")
    assert torch.equal(out["x.weight"], weight), f"transformers {transformers.__version__}: Fp8Dequantize changed"
