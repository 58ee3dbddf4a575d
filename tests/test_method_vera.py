"""VeRA against HF PEFT on the tiny models: checkpoints both ways, merging, training, errors and
the ``lora`` slot tensors the ONNX graph uses (fp32, <= 1e-5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_cases.vera import CASES
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
from onnx_peft.methods.vera import vera_projections
from onnx_peft.tuners.vera import VeraLayer

peft = pytest.importorskip("peft")

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Seeded noise on every trainable tensor (a fresh VeRA adapter is a no-op: lambda_b = 0)."""
    perturb_trainable(model, seed, 0.5)


def _peft(case: str, **overrides):
    spec = CASES[case]
    model = peft.get_peft_model(BUILDERS[spec["model"]](), peft.VeraConfig(**{**spec["kwargs"], **overrides}))
    _perturb(model)
    return model


def _peft_saved(case: str, path, **overrides):
    model = _peft(case, **overrides)
    model.save_pretrained(path)
    return model


def _ours(case: str, **overrides):
    spec = CASES[case]
    model = onnx_peft.get_peft_model(BUILDERS[spec["model"]](), onnx_peft.VeraConfig(**{**spec["kwargs"], **overrides}))
    _perturb(model)
    return model


# -- the projections -----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, -3])
def test_projections_are_peft_draws_bit_for_bit(seed):
    from peft.tuners.vera.model import _kaiming_init

    generator = torch.Generator().manual_seed(seed)
    expected_A = _kaiming_init((5, 48), generator=generator)
    expected_B = _kaiming_init((40, 5), generator=generator)

    vera_A, vera_B = vera_projections(5, 48, 40, seed)

    assert np.array_equal(vera_A, expected_A.numpy()) and np.array_equal(vera_B, expected_B.numpy())


def test_projections_are_sized_for_the_largest_layer_like_peft():
    spec = CASES["vera-llama"]
    theirs = peft.get_peft_model(tiny_llama(), peft.VeraConfig(**spec["kwargs"]))

    ours = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.VeraConfig(**spec["kwargs"]))

    for name in ("vera_A", "vera_B"):
        assert torch.equal(getattr(ours.base_model, name)["default"], getattr(theirs.base_model, name)["default"])
    assert tuple(ours.base_model.vera_A["default"].shape) == (4, 64)   # down_proj: 64 inputs


# -- (a) checkpoints both ways -------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_loads_here_with_same_logits(case, tmp_path):
    assert_round_trip(_peft(case), tmp_path, onnx_peft.PeftModel.from_pretrained, BUILDERS[CASES[case]["model"]],
                      token_ids(), changes_by=1e-2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_saved_here_loads_in_peft_with_same_logits_and_keys(case, tmp_path):
    _peft_saved(case, tmp_path / "theirs")

    assert_round_trip(_ours(case), tmp_path / "ours", peft.PeftModel.from_pretrained, BUILDERS[CASES[case]["model"]],
                      token_ids(), same_keys_as=tmp_path / "theirs")


def test_checkpoint_without_projections_is_redrawn_from_the_key(tmp_path):
    theirs = _peft_saved("vera-llama", tmp_path / "theirs", save_projection=False, projection_prng_key=11)
    x = token_ids()

    ours = onnx_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")

    assert max_diff(run(ours, x), run(theirs, x)) <= TOL
    assert "base_model.vera_A" not in saved_keys(tmp_path / "theirs")
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "theirs")


def test_checkpoint_without_projections_is_refused_by_the_onnx_path(tmp_path):
    _peft_saved("vera-llama", tmp_path, save_projection=False)

    with pytest.raises(CheckpointError, match="save_projection=False"):
        PeftAdapter.read("a", tmp_path)


def test_two_peft_adapters_of_different_rank_load_side_by_side(tmp_path):
    first = _peft_saved("vera-llama", tmp_path / "a")
    second = peft.get_peft_model(tiny_llama(), peft.VeraConfig(r=6, target_modules=["k_proj", "up_proj"]))
    _perturb(second, seed=1)
    second.save_pretrained(tmp_path / "b")
    x = token_ids()

    ours = onnx_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    ours.load_adapter(tmp_path / "b", "b")
    logits_a = run(ours, x)
    ours.set_adapter("b")

    assert max_diff(logits_a, run(first, x)) <= TOL
    assert max_diff(run(ours, x), run(second, x)) <= TOL


def test_vera_only_bias_trains_and_is_saved_like_peft(tmp_path):
    kwargs = dict(r=4, fan_in_fan_out=True, bias="vera_only", target_modules=["c_attn"])
    theirs = peft.get_peft_model(tiny_gpt2(), peft.VeraConfig(**kwargs))
    _perturb(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    x = token_ids()

    ours = onnx_peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "theirs", is_trainable=True)
    ours.save_pretrained(tmp_path / "ours")

    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert any(n.endswith("c_attn.base_layer.bias") for n in trainable)
    assert saved_keys(tmp_path / "ours") == saved_keys(tmp_path / "theirs")
    assert max_diff(run(ours, x), run(theirs, x)) <= TOL


# -- (b) merging ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward(case):
    assert_merge_verbs(_ours(case), token_ids(), VeraLayer)


@pytest.mark.parametrize("case", sorted(CASES))
def test_numpy_merged_weight_equals_the_torch_merged_weight(case, tmp_path):
    _peft_saved(case, tmp_path)
    ours = onnx_peft.PeftModel.from_pretrained(BUILDERS[CASES[case]["model"]](), tmp_path)
    assert_numpy_merge_equals_torch(ours, tmp_path, VeraLayer, TOL)


# -- (c) training --------------------------------------------------------------------------------
def test_a_few_training_steps_lower_the_loss_and_touch_only_vera_lambdas():
    spec = CASES["vera-llama"]
    model = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.VeraConfig(**spec["kwargs"]))
    before = snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)

    model.train()
    losses = train_steps(model, token_ids(), optimizer, steps=6)

    changed = changed_since(model, before)
    assert losses[-1] < losses[0] - 0.05
    assert changed and all(".vera_lambda_" in k for k in changed)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".vera_lambda_" in n}


# -- (d) errors ----------------------------------------------------------------------------------
def test_an_embedding_target_is_refused_naming_the_module():
    with pytest.raises(AdapterConfigError, match=r"model\.embed_tokens .*Embedding.*VeRA.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_llama(), onnx_peft.VeraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))


@pytest.mark.parametrize("field, value", [("r", 0), ("bias", "lora_only"), ("vera_dropout", 1.5),
                                          ("projection_prng_key", "zero")])
def test_a_bad_config_field_is_refused_naming_it(field, value):
    with pytest.raises(AdapterConfigError, match=f"VeraConfig.{field}"):
        onnx_peft.VeraConfig(target_modules=["q_proj"], **{field: value})


def test_adapters_with_different_prng_keys_are_refused():
    model = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.VeraConfig(r=4, target_modules=["q_proj"]))

    with pytest.raises(AdapterConfigError, match="projection_prng_key"):
        model.add_adapter("other", onnx_peft.VeraConfig(r=4, target_modules=["q_proj"], projection_prng_key=1))


# -- (e) the lora slots --------------------------------------------------------------------------
@pytest.mark.parametrize("case, module", [("vera-llama", "model.layers.0.self_attn.v_proj"),
                                          ("vera-gpt2", "transformer.h.1.attn.c_attn")])
def test_lora_slots_reproduce_the_peft_layer_output(case, module, tmp_path):
    theirs = _peft_saved(case, tmp_path)
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
