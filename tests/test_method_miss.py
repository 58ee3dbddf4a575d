"""MiSS (balance, mini, bat) and Bone checkpoints against HF PEFT, on numbers.

Covers: checkpoints both ways (same logits, keys, shapes); Bone checkpoints, which PEFT 0.21
no longer reads, loading with MiSS's math and saving as Bone; merge / unmerge /
merge_and_unload and the numpy merged weight; training; errors; and the slots (``lora`` for
balance/mini, ``dense`` for bat) against PEFT's layer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from method_cases.miss import CASES as ONNX_CASES
from safetensors.torch import load_file, save_file
from tiny_models import (
    TOL,
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
from onnx_peft.errors import AdapterConfigError, IncompatibleAdapterError
from onnx_peft.methods.base import method_for
from onnx_peft.tuners.miss import MissLayer

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# name -> MissConfig kwargs shared by both libraries (all on tiny_llama: q/k/v/o 32->32|16, mlp 32<->64)
CASES = {
    "balance-padded": dict(r=5, target_modules=["q_proj", "v_proj", "down_proj"]),
    "mini": dict(r=4, mini_r=8, init_weights="mini", target_modules=["q_proj", "k_proj", "up_proj"]),
    "bat": dict(r=8, init_weights="bat", target_modules=["q_proj", "k_proj", "down_proj", "gate_proj"]),
    "dropout-all-linear": dict(r=8, miss_dropout=0.1, target_modules="all-linear"),
    **{name: case["kwargs"] for name, case in ONNX_CASES.items()},
}


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Random blocks (MiSS's default init is zeros: a no-op that hides bugs)."""
    perturb_trainable(model, seed, scale, select=("miss_block", "bone_block"))


def miss_layers(model: torch.nn.Module) -> dict[str, MissLayer]:
    """Module path (as in the base model) -> MiSS layer."""
    root = model.get_base_model() if isinstance(model, onnx_peft.PeftModel) else model
    return {name: m for name, m in root.named_modules() if isinstance(m, MissLayer)}


def peft_miss(kwargs: dict, seed: int = 0) -> torch.nn.Module:
    """A PEFT MiSS adapter with random blocks."""
    theirs = peft.get_peft_model(tiny_llama(), peft.MissConfig(**kwargs)).eval()  # eval: no miss_dropout
    perturb(theirs, seed)
    return theirs


def rename_checkpoint(src, dst, peft_type: str, old: str, new: str, drop=()) -> None:
    """PEFT's scripts/convert-bone-to-miss.py, both ways: type, ``.bone_`` <-> ``.miss_`` keys."""
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    config = {k: v for k, v in config.items() if k not in drop} | {"peft_type": peft_type}
    (dst / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file({k.replace(old, new): v for k, v in tensors.items()}, str(dst / "adapter_model.safetensors"))


# -- (a) checkpoints both ways -----------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoints_move_both_ways_with_the_same_logits(case, tmp_path):
    kwargs, x = CASES[case], token_ids()
    theirs = peft_miss(kwargs)
    assert max_diff(run(theirs, x), run(tiny_llama(), x)) > 1e-3  # the adapter does something
    assert_round_trip(theirs, tmp_path / "peft", onnx_peft.PeftModel.from_pretrained, tiny_llama, x)

    ours = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.MissConfig(**kwargs)).eval()
    perturb(ours, seed=1)
    assert_round_trip(ours, tmp_path / "ours", peft.PeftModel.from_pretrained, tiny_llama, x,
                      same_keys_as=tmp_path / "peft")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["init_weights"]) == ("MISS", kwargs.get("init_weights", True))


def test_peft_0_21_no_longer_reads_bone_configs(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "BONE", "r": 8}))
    with pytest.raises((KeyError, ValueError)):
        peft.PeftConfig.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("case", ["balance-padded", "bat"])
def test_a_bone_checkpoint_runs_with_miss_math_and_saves_as_bone(case, tmp_path):
    x, kwargs = token_ids(), CASES[case]
    theirs = peft_miss(kwargs)
    theirs.save_pretrained(tmp_path / "miss")
    expected = run(theirs, x)
    rename_checkpoint(tmp_path / "miss", tmp_path / "bone", "BONE", ".miss_", ".bone_", drop=("miss_dropout", "mini_r"))
    bone = onnx_peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "bone")
    assert type(bone.peft_config["default"]).__name__ == "BoneConfig"
    assert max_diff(run(bone, x), expected) <= TOL

    bone.save_pretrained(tmp_path / "ours")
    keys = saved_keys(tmp_path / "ours")
    assert keys == {k.replace(".miss_", ".bone_"): v for k, v in saved_keys(tmp_path / "miss").items()}
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BONE" and "mini_r" not in config and "miss_dropout" not in config
    rename_checkpoint(tmp_path / "ours", tmp_path / "converted", "MISS", ".bone_", ".miss_")
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "converted")
    assert max_diff(run(back, x), expected) <= TOL


# -- (b) merging -------------------------------------------------------------------------------
@pytest.mark.parametrize("config_name, kwargs", [
    ("MissConfig", CASES["balance-padded"]), ("MissConfig", CASES["mini"]), ("MissConfig", CASES["bat"]),
    ("BoneConfig", dict(r=8, init_weights="bat", target_modules=["v_proj", "up_proj"])),
])
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward(config_name, kwargs):
    x, base = token_ids(), tiny_llama()
    config = getattr(onnx_peft, config_name)(**kwargs)
    model = onnx_peft.get_peft_model(tiny_llama(), config)
    perturb(model)
    expected = run(model, x)
    path, layer = next(iter(miss_layers(model).items()))
    base_weight = base.get_submodule(path).weight.detach()

    model.merge_adapter()
    assert max_diff(run(model, x), expected) <= TOL
    method = method_for(config)
    numpy_merged, bias = method.merged_weight(model.peft_config["default"], path, base_weight.numpy(), None,
                                              {method.block: layer.block("default").detach().numpy()}, {})
    assert bias is None and np.abs(numpy_merged - layer.base_layer.weight.detach().numpy()).max() <= TOL
    model.unmerge_adapter()
    assert max_diff(layer.base_layer.weight, base_weight) <= TOL
    assert max_diff(run(model, x), expected) <= TOL

    plain = model.merge_and_unload()
    assert not miss_layers(plain)
    assert max_diff(run(plain, x), expected) <= TOL


def test_balance_and_bat_adapters_active_together_fold_in_order():
    x = token_ids()
    model = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.MissConfig(r=5, target_modules=["q_proj"]))
    model.add_adapter("bat", onnx_peft.MissConfig(r=8, init_weights="bat", target_modules=["q_proj"]))
    perturb(model)
    model.set_adapter(["default", "bat"])
    expected = run(model, x)
    model.merge_adapter()
    assert max_diff(run(model, x), expected) <= TOL


# -- (c) training ------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(r=4), dict(r=8, init_weights="bat")])
def test_a_few_training_steps_lower_the_loss_and_change_only_the_blocks(kwargs):
    model = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.MissConfig(target_modules=["q_proj", "v_proj"], **kwargs))
    model.train()
    before = snapshot(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    losses = train_steps(model, token_ids(), optimizer, steps=6)
    assert losses[-1] < losses[0] - 1e-3
    changed = changed_since(model, before)
    trainable = {n for n, p in model.named_parameters() if "miss_block" in n}
    assert changed == trainable and len(trainable) == 4


# -- (d) errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("config_name, kwargs, field", [
    ("MissConfig", dict(r=0), "MissConfig.r"),
    ("MissConfig", dict(init_weights="pissa"), "MissConfig.init_weights"),
    ("MissConfig", dict(miss_dropout=1.5), "MissConfig.miss_dropout"),
    ("MissConfig", dict(mini_r=0), "MissConfig.mini_r"),
    ("MissConfig", dict(bias="everything"), "MissConfig.bias"),
    ("MissConfig", dict(target_modules=".*q_proj", layers_to_transform=[0]), "MissConfig.layers_to_transform"),
    ("BoneConfig", dict(init_weights="mini"), "BoneConfig.init_weights"),
    ("BoneConfig", dict(r=-1), "BoneConfig.r"),
])
def test_a_bad_config_field_is_named(config_name, kwargs, field):
    with pytest.raises(AdapterConfigError, match=field):
        getattr(onnx_peft, config_name)(**kwargs)


@pytest.mark.parametrize("build, target, kind", [(tiny_llama, "embed_tokens", "Embedding"), (tiny_gpt2, "c_attn", "Conv1D")])
def test_an_unsupported_module_type_is_named(build, target, kind):
    with pytest.raises(AdapterConfigError, match=rf"{target} \({kind}\) cannot take a MISS adapter; supported: nn.Linear"):
        onnx_peft.get_peft_model(build(), onnx_peft.MissConfig(r=2, target_modules=[target]))


@pytest.mark.parametrize("kwargs, problem", [
    (dict(r=40), "r=40 is larger than in_features=32"),
    (dict(r=5, init_weights="bat"), "divisible by r=5"),
    (dict(r=4, mini_r=5, init_weights="mini"), "divisible by mini_r=5"),
])
def test_a_layer_that_cannot_take_the_config_is_named(kwargs, problem):
    with pytest.raises(AdapterConfigError, match=rf"layers\.0\.self_attn\.q_proj: MissConfig: .*{problem}"):
        onnx_peft.get_peft_model(tiny_llama(), onnx_peft.MissConfig(target_modules=["q_proj"], **kwargs))


def test_slots_of_a_block_that_does_not_fit_raise():
    method, weight = method_for("MISS"), np.zeros((16, 32), np.float32)
    with pytest.raises(IncompatibleAdapterError, match=r"miss_block has shape \[4, 8\], expected \[4, 16\]"):
        method.slot_tensors(onnx_peft.MissConfig(r=4), "m", {"miss_block": np.ones((4, 8), np.float32)}, {},
                            lambda: weight)


# -- (e) the slots are exact -------------------------------------------------------------------
@pytest.mark.parametrize("case, path, form", [
    ("balance-padded", "model.layers.1.mlp.down_proj", "lora"),   # in 64, r 5: a partial last shard
    ("mini", "model.layers.1.self_attn.k_proj", "lora"),
    ("bat", "model.layers.1.mlp.gate_proj", "dense"),
])
def test_slots_reproduce_peft_layer_output(case, path, form):
    kwargs = CASES[case]
    theirs = peft.get_peft_model(tiny_llama(), peft.MissConfig(**kwargs))
    perturb(theirs)
    layer = theirs.base_model.model.get_submodule(path)
    weight = layer.base_layer.weight.detach().numpy()
    x = torch.randn(2, 5, weight.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = layer(x).numpy()
    block = layer.miss_block["default"].detach().numpy()
    slots = method_for("MISS").slot_tensors(onnx_peft.MissConfig(**kwargs), path, {"miss_block": block}, {},
                                            lambda: weight)
    assert list(slots) == [form]
    xn = x.numpy()
    if form == "lora":
        a, b = slots["lora"]["lora_A.weight"], slots["lora"]["lora_B.weight"]
        assert a.shape == (weight.shape[1], kwargs["r"]) and b.shape == (kwargs["r"], weight.shape[0])
        assert set(np.unique(a)) == {0.0, 1.0} and (a.sum(1) == 1).all()
        got = xn @ weight.T + (xn @ a) @ b
    else:
        d = slots["dense"]["delta.weight"]
        assert d.shape == (weight.shape[1], weight.shape[0]) and d.dtype == np.float32
        got = xn @ weight.T + xn @ d
    assert np.abs(got - expected).max() <= TOL


def test_the_conformance_cases_are_valid_configs():
    for case in ONNX_CASES.values():
        config = getattr(onnx_peft, case["config"])(**case["kwargs"])
        assert config.peft_type == "MISS"
        assert case["per_row"] == (config.init_weights != "bat")  # bat's dense slots have no per-row form
