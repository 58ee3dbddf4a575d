"""Adapter directories: safe reading, typed errors naming the problem, atomic writes.

A bad checkpoint must raise an onnx_peft error that names the file / key / shape at fault,
leave the caller's model as it was, and a failed save must leave nothing on disk.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import (
    max_diff,
    randomize_adapters,
    run,
    tiny_bert_cls,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)

import onnx_peft.checkpoint as checkpoint
from onnx_peft import LoraConfig, PeftModel, get_peft_model
from onnx_peft.checkpoint import load_adapter_weights, read_safetensors, write_safetensors
from onnx_peft.errors import AdapterConfigError, CheckpointError, OnnxPeftError
from onnx_peft.tuners.base import ModulesToSaveWrapper
from onnx_peft.tuners.lora import LoraLayer

WEIGHTS = "adapter_model.safetensors"
CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def saved(tmp_path):
    """A saved random adapter of the tiny Llama, and the outputs it gives."""
    model = get_peft_model(tiny_llama(), LoraConfig(**CONFIG))
    randomize_adapters(model, seed=1)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", run(model, token_ids())


def _is_wrapped(model) -> bool:
    return any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in model.modules())


def _rewrite_weights(directory, edit) -> None:
    tensors = load_file(str(directory / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(directory / WEIGHTS))


# -- round trip ---------------------------------------------------------------------------------
def test_save_writes_peft_layout_and_reload_gives_same_outputs(saved):
    directory, expected = saved

    loaded = PeftModel.from_pretrained(tiny_llama(), directory)

    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", WEIGHTS]
    assert all(".default." not in key for key in load_file(str(directory / WEIGHTS)))
    assert max_diff(run(loaded, token_ids()), expected) == 0.0


def test_is_trainable_false_loads_with_nothing_trainable(saved):
    loaded = PeftModel.from_pretrained(tiny_llama(), saved[0])

    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.peft_config["default"].inference_mode is True


def test_is_trainable_true_loads_with_only_adapter_tensors_trainable(saved):
    loaded = PeftModel.from_pretrained(tiny_llama(), saved[0], is_trainable=True)

    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_load_adapter_adds_a_second_adapter_under_its_name(saved):
    directory, expected = saved
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj"]))

    model.load_adapter(directory, adapter_name="loaded")
    model.set_adapter("loaded")

    assert max_diff(run(model, token_ids()), expected) == 0.0


def test_save_pretrained_puts_non_default_adapters_in_subfolders(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(r=3, target_modules=["v_proj"]))

    model.save_pretrained(tmp_path)

    assert (tmp_path / WEIGHTS).is_file() and (tmp_path / "other" / WEIGHTS).is_file()
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["r"] == 3


def test_saved_config_is_peft_json_in_inference_mode(saved):
    data = json.loads((saved[0] / "adapter_config.json").read_text())

    assert data["peft_type"] == "LORA"
    assert data["inference_mode"] is True
    assert (data["r"], data["lora_alpha"]) == (4, 8)
    assert sorted(data["target_modules"]) == ["q_proj", "v_proj"]


def test_bf16_checkpoint_loads_into_fp32_model(saved, tmp_path):
    directory, expected = saved
    _rewrite_weights(directory, lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))

    loaded = PeftModel.from_pretrained(tiny_llama(), directory)

    assert max_diff(run(loaded, token_ids()), expected) < 0.05  # bf16 rounding of the adapter only


# -- pickle -------------------------------------------------------------------------------------
def _as_pickle(directory) -> None:
    tensors = load_file(str(directory / WEIGHTS))
    torch.save(tensors, directory / "adapter_model.bin")
    (directory / WEIGHTS).unlink()


def test_pickled_checkpoint_is_refused_by_default(saved):
    directory, _ = saved
    _as_pickle(directory)
    model = tiny_llama()

    with pytest.raises(CheckpointError, match="adapter_model.bin.*allow_pickle=True"):
        PeftModel.from_pretrained(model, directory)
    assert not _is_wrapped(model)


def test_pickled_checkpoint_loads_with_allow_pickle(saved):
    directory, expected = saved
    _as_pickle(directory)

    loaded = PeftModel.from_pretrained(tiny_llama(), directory, allow_pickle=True)

    assert max_diff(run(loaded, token_ids()), expected) == 0.0


# -- bad checkpoints ----------------------------------------------------------------------------
def test_truncated_safetensors_is_a_typed_error_naming_the_file(saved):
    directory, _ = saved
    path = directory / WEIGHTS
    path.write_bytes(path.read_bytes()[:-100])
    model = tiny_llama()

    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors.*truncated"):
        PeftModel.from_pretrained(model, directory)
    assert not _is_wrapped(model)


@pytest.mark.parametrize("payload", [b"", b"\x01\x02", b"\xff" * 8 + b"{}", b"\x08\x00\x00\x00\x00\x00\x00\x00{not json"])
def test_garbage_safetensors_is_a_checkpoint_error(tmp_path, payload):
    path = tmp_path / WEIGHTS
    path.write_bytes(payload)

    with pytest.raises(CheckpointError, match=str(path.name)):
        read_safetensors(path)


def test_key_matching_no_module_is_a_typed_error_naming_the_key(saved):
    directory, _ = saved
    bogus = "base_model.model.model.layers.0.mlp.nope.lora_A.weight"
    _rewrite_weights(directory, lambda t: t.update({bogus: torch.zeros(4, 32)}))
    model = tiny_llama()

    with pytest.raises(CheckpointError, match=bogus.replace(".", r"\.")):
        PeftModel.from_pretrained(model, directory)
    assert not _is_wrapped(model)


def test_shape_mismatch_names_key_expected_and_found_shapes(saved):
    directory, _ = saved
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _rewrite_weights(directory, lambda t: t.update({key: torch.zeros(16, 3)}))

    with pytest.raises(CheckpointError) as info:
        PeftModel.from_pretrained(tiny_llama(), directory)

    message = str(info.value)
    assert key in message and "[16, 3]" in message and "[16, 4]" in message


def test_missing_tensor_is_a_typed_error_naming_it(saved):
    directory, _ = saved
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    _rewrite_weights(directory, lambda t: t.pop(key))

    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        PeftModel.from_pretrained(tiny_llama(), directory)


def test_adapter_for_a_wider_base_model_is_refused_with_a_hint(saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    wider = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))

    with pytest.raises(CheckpointError, match="another base model"):
        PeftModel.from_pretrained(wider, saved[0])
    assert not _is_wrapped(wider)


def test_adapter_for_another_architecture_is_a_typed_error(saved):
    gpt2 = tiny_gpt2()

    with pytest.raises(OnnxPeftError, match="q_proj"):
        PeftModel.from_pretrained(gpt2, saved[0])
    assert not _is_wrapped(gpt2)


def test_failed_load_adapter_leaves_the_model_as_it_was(saved):
    directory, _ = saved
    _rewrite_weights(directory, lambda t: t.update({"base_model.model.bogus.lora_A.weight": torch.zeros(1)}))
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj"]))
    names = sorted(n for n, _ in model.named_parameters())

    with pytest.raises(CheckpointError, match="bogus"):
        model.load_adapter(directory, adapter_name="broken")

    assert list(model.peft_config) == ["default"]
    assert model.active_adapters == ["default"]
    assert sorted(n for n, _ in model.named_parameters()) == names


def test_failed_from_pretrained_with_saved_head_hands_back_the_original_model(tmp_path):
    model = get_peft_model(tiny_bert_cls(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    model.save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.update({"base_model.model.bogus.weight": torch.zeros(1)}))
    fresh = tiny_bert_cls()
    head = fresh.classifier

    with pytest.raises(CheckpointError):
        PeftModel.from_pretrained(fresh, tmp_path)

    assert not _is_wrapped(fresh)
    assert fresh.classifier is head


def test_failed_pissa_load_restores_the_base_weights(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    model.save_pretrained(tmp_path)
    _rewrite_weights(tmp_path, lambda t: t.update({"base_model.model.bogus.weight": torch.zeros(1)}))
    fresh, reference = tiny_llama(), tiny_llama()

    with pytest.raises(CheckpointError):
        PeftModel.from_pretrained(fresh, tmp_path)

    for (name, value), expected in zip(fresh.state_dict().items(), reference.state_dict().values()):
        assert max_diff(value, expected) <= 1e-5, name


def test_pissa_adapter_reloads_to_the_trained_outputs(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="olora"))
    randomize_adapters(model, seed=2)
    model.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)

    assert max_diff(run(loaded, token_ids()), run(model, token_ids())) <= 1e-5


def test_directory_without_weights_is_a_typed_error(saved):
    (saved[0] / WEIGHTS).unlink()

    with pytest.raises(CheckpointError, match="no adapter_model.safetensors"):
        load_adapter_weights(saved[0])


def test_directory_without_config_is_a_typed_error(tmp_path):
    with pytest.raises(AdapterConfigError, match="no adapter config"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


# -- atomic writes ------------------------------------------------------------------------------
def test_failed_save_writes_nothing(tmp_path, monkeypatch):
    model = get_peft_model(tiny_llama(), LoraConfig(**CONFIG))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "out")

    assert list((tmp_path / "out").iterdir()) == []


def test_unknown_selected_adapter_writes_nothing(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(**CONFIG))

    with pytest.raises(OnnxPeftError, match="'nope'"):
        model.save_pretrained(tmp_path / "out", selected_adapters=["nope"])

    assert not (tmp_path / "out").exists()


def test_saving_over_an_adapter_replaces_it_and_leaves_no_temp_files(saved):
    directory, _ = saved
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["k_proj"]))

    model.save_pretrained(directory)

    assert sorted(p.name for p in directory.iterdir()) == ["adapter_config.json", WEIGHTS]
    assert all(".k_proj." in k for k in load_file(str(directory / WEIGHTS)))


def test_numpy_safetensors_round_trip_without_torch(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, dtype=np.float16)}

    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "np"})
    loaded, metadata = read_safetensors(tmp_path / "x.safetensors")

    assert metadata == {"format": "np"}
    assert all(np.array_equal(loaded[k], tensors[k]) and loaded[k].dtype == tensors[k].dtype for k in tensors)
