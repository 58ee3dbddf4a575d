"""RandLoRA against HF PEFT on the tiny models: the bases bit for bit, checkpoints both ways,
merging, training, errors and the ``lora`` slot tensors the ONNX graph uses (fp32, <= 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_cases.randlora import CASES
from tiny_models import (
    TOL,
    assert_merge_verbs,
    assert_numpy_merge_equals_torch,
    assert_round_trip,
    changed_since,
    max_diff,
    perturb_trainable,
    run,
    saved_keys,
    snapshot,
    tiny_gpt2,
    tiny_llama,
    token_ids,
    train_steps,
)

import onnx_peft
from onnx_peft.convert import PeftAdapter
from onnx_peft.errors import AdapterConfigError, CheckpointError
from onnx_peft.tuners.randlora import RandLoraLayer

peft = pytest.importorskip("peft")

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _peft(case: str, **overrides):
    spec = CASES[case]
    model = peft.get_peft_model(BUILDERS[spec["model"]](), peft.RandLoraConfig(**{**spec["kwargs"], **overrides}))
    perturb_trainable(model, 0, 0.5)  # a fresh adapter is a no-op: lambda = 0
    return model


def _ours(case: str, **overrides):
    spec = CASES[case]
    config = onnx_peft.RandLoraConfig(**{**spec["kwargs"], **overrides})
    model = onnx_peft.get_peft_model(BUILDERS[spec["model"]](), config)
    perturb_trainable(model, 0, 0.5)
    return model


# -- the bases -----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides", [dict(), dict(sparse=True), dict(very_sparse=True), dict(projection_prng_key=9)])
def test_bases_are_peft_draws_bit_for_bit(overrides):
    kwargs = {**CASES["randlora-llama"]["kwargs"], **overrides}
    theirs = peft.get_peft_model(tiny_llama(), peft.RandLoraConfig(**kwargs))

    ours = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.RandLoraConfig(**kwargs))

    for name in ("randlora_A", "randlora_B"):
        assert torch.equal(getattr(ours.base_model, name)["default"], getattr(theirs.base_model, name)["default"])
    assert tuple(ours.base_model.randlora_B["default"].shape) == (64, 4, 8)   # max 64, ceil(32 / 8) bases


# -- (a) checkpoints both ways -------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_loads_here_with_same_logits(case, tmp_path):
    assert_round_trip(_peft(case), tmp_path, onnx_peft.PeftModel.from_pretrained, BUILDERS[CASES[case]["model"]],
                      token_ids(), changes_by=1e-2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_saved_here_loads_in_peft_with_same_logits_and_keys(case, tmp_path):
    _peft(case).save_pretrained(tmp_path / "theirs")

    assert_round_trip(_ours(case), tmp_path / "ours", peft.PeftModel.from_pretrained, BUILDERS[CASES[case]["model"]],
                      token_ids(), same_keys_as=tmp_path / "theirs")
    assert "base_model.randlora_A" in saved_keys(tmp_path / "ours")


def test_checkpoint_without_bases_is_redrawn_here_and_refused_by_the_onnx_path(tmp_path):
    theirs = _peft("randlora-llama", save_projection=False, projection_prng_key=11)
    theirs.save_pretrained(tmp_path / "theirs")
    x = token_ids()

    ours = onnx_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")

    assert max_diff(run(ours, x), run(theirs, x)) <= TOL
    assert not any("randlora_A" in k for k in saved_keys(tmp_path / "theirs"))
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "theirs")
    with pytest.raises(CheckpointError, match="save_projection=False"):
        PeftAdapter.read("a", tmp_path / "theirs")


def test_two_peft_adapters_load_side_by_side_and_delete_cleanly(tmp_path):
    first = _peft("randlora-llama")
    first.save_pretrained(tmp_path / "a")
    second = peft.get_peft_model(tiny_llama(), peft.RandLoraConfig(r=4, randlora_alpha=4, target_modules=["k_proj"]))
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
    assert not any(k.endswith("randlora_A.b") for k in ours.state_dict())


# -- (b) merging ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward(case):
    assert_merge_verbs(_ours(case), token_ids(), RandLoraLayer)


@pytest.mark.parametrize("case", sorted(CASES))
def test_numpy_merged_weight_equals_the_torch_merged_weight(case, tmp_path):
    _peft(case).save_pretrained(tmp_path)
    ours = onnx_peft.PeftModel.from_pretrained(BUILDERS[CASES[case]["model"]](), tmp_path)
    assert_numpy_merge_equals_torch(ours, tmp_path, RandLoraLayer, TOL)


# -- (c) training --------------------------------------------------------------------------------
def test_a_few_training_steps_lower_the_loss_and_touch_only_lambda_and_gamma():
    model = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.RandLoraConfig(**CASES["randlora-llama"]["kwargs"]))
    before = snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.02)

    model.train()
    losses = train_steps(model, token_ids(), optimizer, steps=6)

    changed = changed_since(model, before)
    assert losses[-1] < losses[0] - 0.05
    assert changed and all(".randlora_lambda." in k or ".randlora_gamma." in k for k in changed)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".randlora_lambda." in n or ".randlora_gamma." in n}


# -- (d) errors ----------------------------------------------------------------------------------
def test_an_embedding_target_is_refused_naming_the_module():
    with pytest.raises(AdapterConfigError, match=r"model\.embed_tokens .*Embedding.*RandLoRA.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_llama(), onnx_peft.RandLoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))


@pytest.mark.parametrize("field, value", [("r", 0), ("bias", "lora_only"), ("randlora_dropout", 1.5),
                                          ("projection_prng_key", "zero")])
def test_a_bad_config_field_is_refused_naming_it(field, value):
    with pytest.raises(AdapterConfigError, match=f"RandLoraConfig.{field}"):
        onnx_peft.RandLoraConfig(target_modules=["q_proj"], **{field: value})


def test_adapters_with_different_prng_keys_are_refused():
    model = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.RandLoraConfig(r=4, target_modules=["q_proj"]))

    with pytest.raises(AdapterConfigError, match="projection_prng_key"):
        model.add_adapter("other", onnx_peft.RandLoraConfig(r=4, target_modules=["q_proj"], projection_prng_key=1))


# -- (e) the lora slots --------------------------------------------------------------------------
@pytest.mark.parametrize("case, module", [("randlora-llama", "model.layers.0.self_attn.v_proj"),   # in > out
                                          ("randlora-llama", "model.layers.1.mlp.down_proj"),
                                          ("randlora-gpt2", "transformer.h.1.attn.c_attn")])        # in < out
def test_lora_slots_reproduce_the_peft_layer_output(case, module, tmp_path):
    theirs = _peft(case)
    theirs.save_pretrained(tmp_path)
    layer = theirs.base_model.model.get_submodule(module)
    weight = layer.get_base_layer().weight.detach()
    weight = (weight.T if layer.fan_in_fan_out else weight).numpy()            # [out, in]
    bias = layer.get_base_layer().bias
    x = torch.randn(2, 5, weight.shape[1], generator=torch.Generator().manual_seed(3))

    slots = PeftAdapter.read("a", tmp_path).slot_tensors(module, lambda: weight)

    a, b = slots["lora"]["lora_A.weight"], slots["lora"]["lora_B.weight"]
    rank = CASES[case]["kwargs"]["r"] * -(-min(weight.shape) // CASES[case]["kwargs"]["r"])
    assert a.shape == (weight.shape[1], rank) and b.shape == (rank, weight.shape[0])
    y = x.numpy() @ weight.T + (x.numpy() @ a) @ b
    if bias is not None:
        y = y + bias.detach().numpy()
    with torch.no_grad():
        expected = layer(x).numpy()
    assert np.abs(y - expected).max() <= TOL
