"""OSF against HF PEFT, on numbers: the SVD split and default targets, checkpoints both ways
(only U_low / S_low / V_low travel; the initial factors are the base weight's SVD again), merge
verbs, training with the projected gradients step for step as PEFT's, errors, and the slot
tensors of both forms (``dense`` at PEFT's default rank, ``lora`` of rank 2r at a high
effective_rank; fp32, <= 1e-5). Cases: ``method_cases/osf.py`` (Llama, Linear only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_cases.osf import CASES
from tiny_models import (
    TOL,
    assert_merge_verbs,
    assert_round_trip,
    changed_since,
    max_diff,
    peft_and_ours,
    run,
    saved_keys,
    snapshot,
    tiny_gpt2,
    tiny_llama,
    token_ids,
    train_steps,
)

import onnx_peft
from onnx_peft.checkpoint import load_adapter_weights
from onnx_peft.errors import AdapterConfigError, IncompatibleAdapterError
from onnx_peft.methods.base import method_for
from onnx_peft.methods.osf import OSFConfig
from onnx_peft.tuners.osf import OSFLayer

peft = pytest.importorskip("peft")

METHOD = method_for("OSF")
DEFAULT = CASES["osf-llama"]["kwargs"]
HIGH = CASES["osf-llama-high-rank"]["kwargs"]


def _pair(kwargs: dict, seed: int = 0, scale: float = 0.1):
    """(PEFT's, ours) holding one perturbed adapter (fresh OSF is a no-op)."""
    theirs, ours = peft_and_ours(tiny_llama, peft.OSFConfig(**kwargs), OSFConfig(**kwargs), seed, scale=scale)
    return theirs.eval(), ours.eval()


def _layers(model) -> dict[str, OSFLayer]:
    return {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, OSFLayer)}


# -- the split -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, module, frozen", [
    (DEFAULT, "model.layers.0.self_attn.q_proj", 16), (HIGH, "model.layers.0.self_attn.q_proj", 25),
    (HIGH, "model.layers.1.mlp.down_proj", 28), (dict(effective_rank=5, target_modules=["k_proj", "gate_proj"]),
                                                 "model.layers.0.mlp.gate_proj", 5),
])
def test_layers_split_the_weight_and_keep_the_buffers_peft_keeps(kwargs, module, frozen):
    theirs, ours = _pair(kwargs)

    layers = _layers(ours)
    assert layers
    for path, layer in layers.items():
        peft_layer = theirs.base_model.model.get_submodule(path)
        assert layer.effective_rank == peft_layer.effective_rank
        for attr in ("_osf_U_low_init", "_osf_S_low_init", "_osf_V_low_init", "_osf_U_high", "_osf_V_high"):
            assert set(getattr(layer, attr).keys()) == set(getattr(peft_layer, attr).keys())
            for name in getattr(layer, attr).keys():
                assert torch.equal(getattr(layer, attr)[name], getattr(peft_layer, attr)[name])
    layer = layers[module]
    assert layer.effective_rank["default"] == frozen
    assert layer.osf_svd_params["default"]["S_low"].shape == (32 - frozen,)


def test_default_targets_are_pefts():
    theirs = peft.get_peft_model(tiny_llama(), peft.OSFConfig())
    ours = onnx_peft.get_peft_model(tiny_llama(), OSFConfig())

    expected = {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "osf_svd_params")}
    assert set(_layers(ours)) == expected and len(expected) == 14


def test_init_weights_true_is_a_no_op_and_false_is_not():
    base = run(tiny_llama(), token_ids())

    fresh = onnx_peft.get_peft_model(tiny_llama(), OSFConfig(**DEFAULT))
    random = onnx_peft.get_peft_model(tiny_llama(), OSFConfig(**DEFAULT, init_weights=False))

    assert max_diff(run(fresh, token_ids()), base) <= 1e-6
    assert max_diff(run(random, token_ids()), base) > 1e-2


def test_forward_equals_peft():
    for kwargs in (DEFAULT, HIGH):
        theirs, ours = _pair(kwargs, seed=3)
        assert max_diff(run(ours, token_ids()), run(theirs, token_ids())) <= TOL
        assert max_diff(run(ours, token_ids()), run(tiny_llama(), token_ids())) > 1e-2


# -- (a) checkpoints both ways -------------------------------------------------------------------
def test_peft_saved_adapter_loads_here_with_same_logits(tmp_path):
    theirs, _ = _pair(HIGH, seed=1)
    assert_round_trip(theirs, tmp_path, onnx_peft.PeftModel.from_pretrained, tiny_llama, token_ids(),
                      changes_by=1e-2)


def test_adapter_saved_here_loads_in_peft_with_same_logits(tmp_path):
    _, ours = _pair(DEFAULT, seed=2)
    assert_round_trip(ours, tmp_path, peft.PeftModel.from_pretrained, tiny_llama, token_ids(), changes_by=1e-2)


def test_saved_keys_and_shapes_equal_peft(tmp_path):
    theirs, ours = _pair(HIGH)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")

    keys = saved_keys(tmp_path / "ours")
    assert keys == saved_keys(tmp_path / "peft")
    assert {k.rsplit(".", 2)[-2] for k in keys} == {"osf_svd_params"}
    assert keys["base_model.model.model.layers.0.self_attn.v_proj.osf_svd_params.U_low"] == (16, 4)


# -- (b) merging ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [DEFAULT, HIGH])
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward(kwargs):
    theirs, ours = _pair(kwargs, seed=4)
    merged_by_peft = run(theirs.merge_and_unload(), token_ids())

    assert max_diff(run(ours, token_ids()), merged_by_peft) <= TOL
    assert_merge_verbs(ours, token_ids(), OSFLayer, restores_state_to=1e-6)


def test_method_merged_weight_on_numpy_equals_the_torch_merge():
    _, model = _pair(DEFAULT, seed=5)
    config = model.peft_config["default"]
    layers = _layers(model)
    before = {path: layer.weight.detach().numpy().copy() for path, layer in layers.items()}

    model.merge_adapter()

    for path, layer in layers.items():  # numpy: the initial factors from the base weight's SVD
        parts = {f"osf_svd_params.{k}": v.detach().numpy() for k, v in layer.osf_svd_params["default"].items()}
        w, b = METHOD.merged_weight(config, path, before[path], None, parts, {})
        assert isinstance(w, np.ndarray) and w.dtype == np.float32 and b is None
        assert np.abs(w - layer.weight.detach().numpy()).max() <= 1e-6
        assert np.abs(w - before[path]).max() > 1e-2


# -- (c) training --------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_training_steps_equal_pefts_and_lower_the_loss(optimizer):
    theirs, ours = _pair(DEFAULT, seed=6)
    before = snapshot(ours)
    ids = token_ids(batch=4, seq=8)
    losses = {}
    for name, model in (("peft", theirs), ("ours", ours)):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.5) if optimizer == "sgd" else torch.optim.AdamW(params, lr=1e-2)
        losses[name] = train_steps(model.train(), ids, opt, steps=5)

    assert losses["ours"][-1] < losses["ours"][0] - 1e-3
    assert np.abs(np.array(losses["ours"]) - losses["peft"]).max() <= TOL
    theirs_params = dict(theirs.named_parameters())
    trained = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert trained and all(".osf_svd_params." in n for n in trained)
    assert max(max_diff(p, theirs_params[n]) for n, p in trained.items()) <= TOL
    assert changed_since(ours, before) == {k for k in before if ".osf_svd_params." in k}


def test_projected_gradients_keep_the_trained_factors_off_the_frozen_subspace():
    """From the SVD init, SGD moves U_low only within the complement of U_high (and V_low of
    V_high): the frozen directions stay exactly what the base model had."""
    model = onnx_peft.get_peft_model(tiny_llama(), OSFConfig(**DEFAULT)).train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    before = snapshot(model)

    train_steps(model, token_ids(batch=4, seq=8), opt, steps=3)

    assert changed_since(model, before)
    for layer in _layers(model).values():
        w = layer.base_layer.weight.detach().double()
        u, _, vt = torch.linalg.svd(w, full_matrices=False)
        k = layer.effective_rank["default"]
        params = layer.osf_svd_params["default"]
        assert (u[:, :k].T @ params["U_low"].detach().double()).abs().max() <= 1e-5
        assert (params["V_low"].detach().double() @ vt[:k].T).abs().max() <= 1e-5


# -- (d) errors ----------------------------------------------------------------------------------
def test_unsupported_module_type_raises_naming_module_and_types():
    with pytest.raises(AdapterConfigError, match=r"model\.embed_tokens \(Embedding\).*OSF.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_llama(), OSFConfig(target_modules=["embed_tokens"]))
    with pytest.raises(AdapterConfigError, match=r"transformer\.h\.0\.attn\.c_attn \(Conv1D\).*OSF.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_gpt2(), OSFConfig())


def test_an_effective_rank_that_freezes_nothing_raises_naming_the_module():
    with pytest.raises(AdapterConfigError, match=r"effective_rank.*model\.layers\.0\.self_attn\.q_proj"):
        onnx_peft.get_peft_model(tiny_llama(), OSFConfig(effective_rank=0.01, target_modules=["q_proj"]))


@pytest.mark.parametrize("kwargs, field", [
    (dict(effective_rank=0), "effective_rank"), (dict(effective_rank=-0.5), "effective_rank"),
    (dict(effective_rank="half"), "effective_rank"), (dict(effective_rank=True), "effective_rank"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern"), (dict(init_weights="no"), "init_weights"),
    (dict(target_svd_config={"q.weight": "8"}), "target_svd_config"),
])
def test_bad_config_field_raises_naming_it(kwargs, field):
    with pytest.raises(AdapterConfigError, match=f"OSFConfig.{field}"):
        OSFConfig(**kwargs)


def test_checkpoint_that_does_not_fit_the_layer_or_config_is_refused():
    config = OSFConfig(target_modules=["q_proj"])  # q_proj 32x32: r = 16
    parts = {"osf_svd_params.U_low": np.ones((32, 8), np.float32), "osf_svd_params.S_low": np.ones(8, np.float32),
             "osf_svd_params.V_low": np.ones((8, 32), np.float32)}

    with pytest.raises(IncompatibleAdapterError, match=r"q_proj.*effective_rank 16.*\[32, 16\]"):
        METHOD.slot_tensors(config, "model.layers.0.self_attn.q_proj", parts, {}, lambda: np.eye(32))
    with pytest.raises(IncompatibleAdapterError, match="q_proj"):
        METHOD.merged_weight(OSFConfig(effective_rank=24), "model.layers.0.self_attn.q_proj", np.eye(32, 16),
                             None, parts, {})


# -- (e) slot tensors ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, module, form", [
    (DEFAULT, "model.layers.1.mlp.down_proj", "dense"), (DEFAULT, "model.layers.0.self_attn.v_proj", "dense"),
    (HIGH, "model.layers.1.mlp.down_proj", "lora"), (HIGH, "model.layers.0.self_attn.v_proj", "lora"),
    (HIGH, "model.layers.0.mlp.up_proj", "lora"),
])
def test_slot_tensors_reproduce_the_peft_layer_output(kwargs, module, form, tmp_path):
    theirs, _ = _pair(kwargs, seed=7)
    theirs.save_pretrained(tmp_path)
    config = onnx_peft.AdapterConfig.from_pretrained(tmp_path)
    grouped = METHOD.group(load_adapter_weights(tmp_path))
    layer = theirs.base_model.model.get_submodule(module)
    weight = layer.get_base_layer().weight.detach().numpy()
    out_features, in_features = weight.shape
    x = torch.randn(2, 5, in_features, generator=torch.Generator().manual_seed(0))

    slots = METHOD.slot_tensors(config, module, grouped.modules[module], grouped.shared, lambda: weight)

    assert list(slots) == [form]
    xn = x.numpy()
    if form == "dense":
        d = slots["dense"]["delta.weight"]
        assert d.dtype == np.float32 and d.shape == (in_features, out_features)
        ours = xn @ weight.T + xn @ d
    else:
        a, b = slots["lora"]["lora_A.weight"], slots["lora"]["lora_B.weight"]
        r = layer.osf_svd_params["default"]["S_low"].shape[0]
        assert a.shape == (in_features, 2 * r) and b.shape == (2 * r, out_features)
        assert 2 * r * (in_features + out_features) <= in_features * out_features
        ours = xn @ weight.T + (xn @ a) @ b
    with torch.no_grad():
        expected = layer(x).numpy()
    assert np.abs(ours - expected).max() <= TOL
    assert np.abs(ours - xn @ weight.T).max() > 1e-3
