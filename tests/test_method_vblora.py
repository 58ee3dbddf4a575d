"""VB-LoRA against HF PEFT on the tiny models: checkpoints both ways (logits and PEFT's
save_only_topk_weights layout), merging, training, errors and the ``lora`` slot tensors the ONNX
graph uses (fp32, <= 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_cases.vblora import CASES
from tiny_models import (
    TOL,
    assert_merge_verbs,
    assert_numpy_merge_equals_torch,
    assert_round_trip,
    changed_since,
    max_diff,
    perturb_trainable,
    run,
    snapshot,
    tiny_gpt2,
    tiny_llama,
    token_ids,
    train_steps,
)

import onnx_peft
from onnx_peft.checkpoint import load_adapter_weights
from onnx_peft.convert import PeftAdapter
from onnx_peft.errors import AdapterConfigError, CheckpointError, OnnxPeftError
from onnx_peft.tuners.vblora import VBLoRALayer, logits_tensors

peft = pytest.importorskip("peft")

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
LOGITS_CASE = "vblora-llama"
TOPK_CASE = "vblora-gpt2"      # Conv1D; saved with save_only_topk_weights where a test says TOPK
TOPK = dict(save_only_topk_weights=True)


def _peft(case: str, **overrides):
    spec = CASES[case]
    model = peft.get_peft_model(BUILDERS[spec["model"]](), peft.VBLoRAConfig(**{**spec["kwargs"], **overrides}))
    perturb_trainable(model, 0, 0.5)
    return model


def _ours(case: str, **overrides):
    spec = CASES[case]
    config = onnx_peft.VBLoRAConfig(**{**spec["kwargs"], **overrides})
    model = onnx_peft.get_peft_model(BUILDERS[spec["model"]](), config)
    perturb_trainable(model, 0, 0.5)
    return model


# -- (a) checkpoints both ways -------------------------------------------------------------------
def test_peft_saved_adapter_loads_here_with_same_logits(tmp_path):
    spec = CASES[LOGITS_CASE]
    assert_round_trip(_peft(LOGITS_CASE), tmp_path, onnx_peft.PeftModel.from_pretrained,
                      BUILDERS[spec["model"]], token_ids(), changes_by=1e-2)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("topk", [False, True])
def test_adapter_saved_here_loads_in_peft_with_same_logits_and_keys(case, topk, tmp_path):
    _peft(case, save_only_topk_weights=topk).save_pretrained(tmp_path / "theirs")

    assert_round_trip(_ours(case, save_only_topk_weights=topk), tmp_path / "ours", peft.PeftModel.from_pretrained,
                      BUILDERS[CASES[case]["model"]], token_ids(), same_keys_as=tmp_path / "theirs")


def test_topk_checkpoint_is_written_in_peft_layout_with_peft_dtypes(tmp_path):
    _peft(TOPK_CASE, **TOPK).save_pretrained(tmp_path / "theirs")
    _ours(TOPK_CASE, **TOPK).save_pretrained(tmp_path / "ours")

    theirs, ours = (load_adapter_weights(tmp_path / d) for d in ("theirs", "ours"))

    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    assert any(k.endswith("vblora_logits_A_topk_indices") for k in ours)
    assert ours["base_model.vblora_vector_bank"].shape == (16, 16)


def test_peft_topk_checkpoint_becomes_logits_with_the_same_forward(tmp_path):
    theirs = _peft(TOPK_CASE, **TOPK)
    theirs.save_pretrained(tmp_path)
    stored = {k: torch.from_numpy(v.copy()) for k, v in load_adapter_weights(tmp_path).items()}
    ours = onnx_peft.get_peft_model(tiny_gpt2(), onnx_peft.VBLoRAConfig(**CASES[TOPK_CASE]["kwargs"], **TOPK))
    names = {k.replace(".default", ""): k for k in ours.state_dict()}

    loaded = logits_tensors(ours.peft_config["default"], stored)
    ours.load_state_dict({names[k]: v for k, v in loaded.items()}, strict=False)

    x = token_ids()
    assert sum(k.endswith("_topk_indices") for k in stored) == 8 and not any("topk" in k for k in loaded)
    assert max_diff(run(ours.eval(), x), run(theirs, x)) <= TOL
    ours.train()
    with pytest.raises(OnnxPeftError, match="save_only_topk_weights"):
        ours(input_ids=x, labels=x)


def test_peft_topk_checkpoint_merges_in_numpy_like_peft(tmp_path):
    theirs = _peft(TOPK_CASE, **TOPK)
    theirs.save_pretrained(tmp_path)
    adapter = PeftAdapter.read("a", tmp_path)
    module = "transformer.h.0.mlp.c_fc"
    layer = theirs.base_model.model.get_submodule(module)
    weight = layer.get_base_layer().weight.detach().T.numpy()                  # [out, in]

    merged, _ = adapter.merged_weight(module, weight, None)

    expected = weight + layer.get_delta_weight("default").detach().T.numpy()
    assert np.abs(merged - expected).max() <= TOL


def test_two_adapters_keep_their_own_banks(tmp_path):
    first = _peft(LOGITS_CASE)
    first.save_pretrained(tmp_path / "a")
    second = peft.get_peft_model(tiny_llama(), peft.VBLoRAConfig(r=2, num_vectors=8, vector_length=16,
                                                                 target_modules=["k_proj"]))
    perturb_trainable(second, 1, 0.5)
    second.save_pretrained(tmp_path / "b")
    x = token_ids()

    ours = onnx_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    ours.load_adapter(tmp_path / "b", "b")
    logits_a = run(ours, x)
    ours.set_adapter("b")

    assert max_diff(logits_a, run(first, x)) <= TOL
    assert max_diff(run(ours, x), run(second, x)) <= TOL
    ours.delete_adapter("b")
    assert "b" not in ours.base_model.vblora_vector_bank


# -- (b) merging ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward(case):
    assert_merge_verbs(_ours(case), token_ids(), VBLoRALayer)


@pytest.mark.parametrize("case", sorted(CASES))
def test_numpy_merged_weight_equals_the_torch_merged_weight(case, tmp_path):
    ours = _ours(case)
    ours.save_pretrained(tmp_path)
    assert_numpy_merge_equals_torch(ours, tmp_path, VBLoRALayer, TOL)


# -- (c) training --------------------------------------------------------------------------------
def test_a_few_training_steps_lower_the_loss_and_touch_only_logits_and_bank():
    model = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.VBLoRAConfig(**CASES[LOGITS_CASE]["kwargs"]))
    before = snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)

    model.train()
    losses = train_steps(model, token_ids(), optimizer, steps=6)

    changed = changed_since(model, before)
    assert losses[-1] < losses[0] - 0.05
    assert "base_model.vblora_vector_bank.default" in changed
    assert changed and all(".vblora_logits_" in k or "vblora_vector_bank" in k for k in changed)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "vblora_" in n}


# -- (d) errors ----------------------------------------------------------------------------------
def test_an_embedding_target_is_refused_naming_the_module():
    with pytest.raises(AdapterConfigError, match=r"model\.embed_tokens .*Embedding.*VB-LoRA.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_llama(), onnx_peft.VBLoRAConfig(
            r=4, num_vectors=8, vector_length=8, target_modules=["embed_tokens", "q_proj"]))


def test_a_vector_length_not_dividing_the_layer_is_refused_naming_both():
    with pytest.raises(AdapterConfigError, match=r"q_proj: in_features=32 .*vector_length=12"):
        onnx_peft.get_peft_model(tiny_llama(), onnx_peft.VBLoRAConfig(
            r=4, num_vectors=8, vector_length=12, target_modules=["q_proj"]))


@pytest.mark.parametrize("field, value", [("r", 0), ("topk", 0), ("num_vectors", -1), ("bias", "lora_only"),
                                          ("vblora_dropout", 1.5), ("init_vector_bank_bound", -0.1)])
def test_a_bad_config_field_is_refused_naming_it(field, value):
    with pytest.raises(AdapterConfigError, match=f"VBLoRAConfig.{field}"):
        onnx_peft.VBLoRAConfig(target_modules=["q_proj"], **{field: value})


def test_a_checkpoint_missing_logits_is_refused_naming_the_module(tmp_path):
    _peft(LOGITS_CASE).save_pretrained(tmp_path)
    tensors = load_adapter_weights(tmp_path)
    del tensors["base_model.model.model.layers.0.mlp.down_proj.vblora_logits_B"]

    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.down_proj has neither vblora_logits_B"):
        onnx_peft.methods.base.method_for("VBLORA").group(tensors)


# -- (e) the lora slots --------------------------------------------------------------------------
@pytest.mark.parametrize("case, module, topk", [(LOGITS_CASE, "model.layers.0.mlp.down_proj", False),
                                                (TOPK_CASE, "transformer.h.1.attn.c_attn", False),
                                                (TOPK_CASE, "transformer.h.1.mlp.c_fc", True)])
def test_lora_slots_reproduce_the_peft_layer_output(case, module, topk, tmp_path):
    theirs = _peft(case, save_only_topk_weights=topk)
    theirs.save_pretrained(tmp_path)
    layer = theirs.base_model.model.get_submodule(module)
    weight = layer.get_base_layer().weight.detach()
    weight = (weight.T if layer.fan_in_fan_out else weight).numpy()            # [out, in]
    bias = layer.get_base_layer().bias
    x = torch.randn(2, 5, weight.shape[1], generator=torch.Generator().manual_seed(3))

    slots = PeftAdapter.read("a", tmp_path).slot_tensors(module, lambda: weight)

    a, b = slots["lora"]["lora_A.weight"], slots["lora"]["lora_B.weight"]
    assert a.shape == (weight.shape[1], 4) and b.shape == (4, weight.shape[0])
    y = x.numpy() @ weight.T + (x.numpy() @ a) @ b
    if bias is not None:
        y = y + bias.detach().numpy()
    with torch.no_grad():
        expected = layer(x).numpy()
    assert np.abs(y - expected).max() <= TOL


def test_peft_topk_checkpoint_loads_in_peftmodel(tmp_path):
    """PEFT's save_only_topk_weights layout (uint8 indices, k-1 weights) loads through
    PeftModel.from_pretrained with PEFT's logits."""
    import peft as hf_peft
    import torch
    from tiny_models import TOL, perturb_trainable, tiny_llama

    import onnx_peft

    kwargs = dict(target_modules=["q_proj", "v_proj"], vector_length=8, num_vectors=16, r=4, topk=2,
                  save_only_topk_weights=True)
    theirs = hf_peft.get_peft_model(tiny_llama(), hf_peft.VBLoRAConfig(**kwargs))
    perturb_trainable(theirs)
    theirs.save_pretrained(tmp_path)
    reloaded = hf_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    ours = onnx_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert (ours(input_ids=ids).logits - reloaded(input_ids=ids).logits).abs().max() <= TOL
