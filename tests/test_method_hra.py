"""HRA (Householder reflections on the weight) against HF PEFT, on numbers.

Covers: checkpoints both ways (same logits, keys, shapes), several active adapters composing
as W R_a R_b, merge / unmerge / merge_and_unload, the numpy merged weight, training, errors,
and the ``lora`` slots (the reflections in compact WY form, folded with W) against PEFT's layer.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from method_cases.hra import CASES as ONNX_CASES
from tiny_models import (
    TOL,
    assert_round_trip,
    changed_since,
    image_batch,
    max_diff,
    perturb_trainable,
    run,
    snapshot,
    tiny_cnn,
    tiny_gpt2,
    tiny_llama,
    token_ids,
    train_steps,
)

import onnx_peft
from onnx_peft.errors import AdapterConfigError, IncompatibleAdapterError
from onnx_peft.methods.base import method_for
from onnx_peft.tuners.hra import HraLayer

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# name -> (base builder, inputs, HRAConfig kwargs shared by both libraries)
CASES = {
    "llama": (tiny_llama, token_ids, dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-gs-all-linear": (tiny_llama, token_ids, dict(r=4, apply_GS=True, target_modules="all-linear")),
    "llama-odd-r-layers": (tiny_llama, token_ids, dict(r=3, target_modules=["k_proj", "up_proj"],
                                                       layers_to_transform=[1], layers_pattern="layers")),
    "cnn-conv2d": (tiny_cnn, image_batch, dict(r=2, target_modules=["conv1", "conv2", "fc"])),
    "cnn-bias-hra-only": (tiny_cnn, image_batch, dict(r=2, bias="hra_only", target_modules=["conv1", "fc"])),
    **{name: (tiny_llama, token_ids, case["kwargs"]) for name, case in ONNX_CASES.items()},
}


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Random ``hra_u`` (PEFT's init pairs equal vectors: R = I, a no-op that hides bugs)."""
    perturb_trainable(model, seed, scale, select=("hra_u",))


def hra_layers(model: torch.nn.Module) -> dict[str, HraLayer]:
    """Module path (as in the base model) -> HRA layer."""
    root = model.get_base_model() if isinstance(model, onnx_peft.PeftModel) else model
    return {name: m for name, m in root.named_modules() if isinstance(m, HraLayer)}


# -- (a) checkpoints both ways -----------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoints_move_both_ways_with_the_same_logits(case, tmp_path):
    build, inputs, kwargs = CASES[case]
    x = inputs()
    theirs = peft.get_peft_model(build(), peft.HRAConfig(**kwargs))
    perturb(theirs, seed=0)
    assert max_diff(run(theirs, x), run(build(), x)) > 1e-3  # the adapter does something
    assert_round_trip(theirs, tmp_path / "peft", onnx_peft.PeftModel.from_pretrained, build, x)

    ours = onnx_peft.get_peft_model(build(), onnx_peft.HRAConfig(**kwargs))
    perturb(ours, seed=1)
    assert_round_trip(ours, tmp_path / "ours", peft.PeftModel.from_pretrained, build, x,
                      same_keys_as=tmp_path / "peft")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["apply_GS"]) == ("HRA", kwargs["r"], kwargs.get("apply_GS", False))


def test_a_fresh_adapter_with_even_r_is_the_identity():
    model = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.HRAConfig(r=4, target_modules=["q_proj"]))
    assert max_diff(run(model, token_ids()), run(tiny_llama(), token_ids())) <= TOL


def test_two_active_adapters_compose_as_in_peft(tmp_path):
    x = token_ids()
    theirs = peft.get_peft_model(tiny_llama(), peft.HRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    theirs.add_adapter("other", peft.HRAConfig(r=3, apply_GS=True, target_modules=["q_proj"]))
    perturb(theirs)
    theirs.save_pretrained(tmp_path)
    theirs.base_model.set_adapter(["default", "other"])
    expected = run(theirs, x)

    ours = onnx_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ours.load_adapter(tmp_path / "other", "other")
    ours.set_adapter(["default", "other"])
    assert max_diff(run(ours, x), expected) <= TOL
    ours.merge_adapter()
    assert max_diff(run(ours, x), expected) <= TOL
    ours.unmerge_adapter()
    assert max_diff(run(ours, x), expected) <= TOL


# -- (b) merging -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["llama", "llama-gs-all-linear", "cnn-conv2d"])
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward(case):
    build, inputs, kwargs = CASES[case]
    x, base = inputs(), build()
    model = onnx_peft.get_peft_model(build(), onnx_peft.HRAConfig(**kwargs))
    perturb(model)
    expected = run(model, x)
    path, layer = next(iter(hra_layers(model).items()))
    base_weight = base.get_submodule(path).weight.detach()

    model.merge_adapter()
    assert max_diff(run(model, x), expected) <= TOL
    merged = layer.base_layer.weight.detach().clone()
    numpy_merged, bias = method_for("HRA").merged_weight(
        model.peft_config["default"], path, base_weight.numpy(), None,
        {"hra_u": layer.hra_u["default"].detach().numpy()}, {})
    assert bias is None and np.abs(numpy_merged - merged.numpy()).max() <= TOL
    model.unmerge_adapter()
    assert max_diff(layer.base_layer.weight, base_weight) <= TOL
    assert max_diff(run(model, x), expected) <= TOL

    plain = model.merge_and_unload()
    assert not hra_layers(plain)
    assert max_diff(run(plain, x), expected) <= TOL


# -- (c) training ------------------------------------------------------------------------------
def test_a_few_training_steps_lower_the_loss_and_change_only_hra_u():
    model = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.HRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    before = snapshot(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = train_steps(model, token_ids(), optimizer, steps=6)
    assert losses[-1] < losses[0] - 1e-3
    changed = changed_since(model, before)
    trainable = {n for n, p in model.named_parameters() if "hra_u" in n}
    assert changed == trainable and len(trainable) == 4


# -- (d) errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field", [
    (dict(r=0), "HRAConfig.r"),
    (dict(r=2.5), "HRAConfig.r"),
    (dict(apply_GS="yes"), "HRAConfig.apply_GS"),
    (dict(bias="everything"), "HRAConfig.bias"),
    (dict(target_modules=".*q_proj", layers_to_transform=[0]), "HRAConfig.layers_to_transform"),
    (dict(layers_pattern="layers"), "HRAConfig.layers_pattern"),
])
def test_a_bad_config_field_is_named(kwargs, field):
    with pytest.raises(AdapterConfigError, match=field):
        onnx_peft.HRAConfig(**kwargs)


@pytest.mark.parametrize("build, target, kind", [
    (tiny_llama, "embed_tokens", "Embedding"),
    (tiny_gpt2, "c_attn", "Conv1D"),
    (tiny_cnn, "conv1d", "Conv1d"),
])
def test_an_unsupported_module_type_is_named(build, target, kind):
    with pytest.raises(AdapterConfigError, match=rf"{target} \({kind}\) cannot take an HRA adapter; supported: nn.Linear"):
        onnx_peft.get_peft_model(build(), onnx_peft.HRAConfig(r=2, target_modules=[target]))


def test_slots_of_a_checkpoint_that_does_not_fit_raise():
    method, config = method_for("HRA"), onnx_peft.HRAConfig(r=4)
    weight = np.zeros((8, 6), np.float32)
    with pytest.raises(IncompatibleAdapterError, match="r=4"):
        method.slot_tensors(config, "m", {"hra_u": np.ones((6, 3), np.float32)}, {}, lambda: weight)
    with pytest.raises(IncompatibleAdapterError, match="5 rows"):
        method.slot_tensors(config, "m", {"hra_u": np.ones((5, 4), np.float32)}, {}, lambda: weight)


# -- (e) the lora slots are exact --------------------------------------------------------------
# Not GS + fresh: Gram-Schmidt of PEFT's paired vectors normalises rounding noise (ill-defined).
@pytest.mark.parametrize("apply_GS, fresh", [(False, False), (True, False), (False, True)])
def test_lora_slots_reproduce_peft_layer_output(apply_GS, fresh):
    config = onnx_peft.HRAConfig(r=4, apply_GS=apply_GS, target_modules=["q_proj"])
    theirs = peft.get_peft_model(tiny_llama(), peft.HRAConfig(r=4, apply_GS=apply_GS, target_modules=["q_proj"]))
    if not fresh:  # fresh: PEFT's paired init, R = I through dependent reflection vectors
        perturb(theirs)
    path = "model.layers.1.self_attn.q_proj"
    layer = theirs.base_model.model.get_submodule(path)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = layer(x).numpy()
    weight = layer.base_layer.weight.detach().numpy()
    u = layer.hra_u["default"].detach().numpy()
    slots = method_for("HRA").slot_tensors(config, path, {"hra_u": u}, {}, lambda: weight)
    assert set(slots) == {"lora"}
    a, b = slots["lora"]["lora_A.weight"], slots["lora"]["lora_B.weight"]
    assert a.shape == (32, 4) and b.shape == (4, 32) and a.dtype == b.dtype == np.float32
    xn = x.numpy()
    got = xn @ weight.T + (xn @ a) @ b
    assert np.abs(got - expected).max() <= TOL
    update = np.abs(a @ b).max()  # fresh: R = I, so the slots' product vanishes
    assert update <= TOL if fresh else update > 1e-2


def test_the_conformance_cases_are_valid_configs():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for case in ONNX_CASES.values():
            assert getattr(onnx_peft, case["config"])(**case["kwargs"]).peft_type == "HRA"
