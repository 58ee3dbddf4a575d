"""SHiRA against HF PEFT, on numbers: the random mask positions, checkpoints both ways (the
int32 positions travel with the adapter), merge verbs, training, errors, and the ``dense`` slot
tensor (fp32, <= 1e-5). The case is that of ``method_cases/shira.py`` (Llama, Linear only).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_cases.shira import CASES
from tiny_models import (
    TOL,
    assert_merge_verbs,
    assert_round_trip,
    assert_training_changes_only,
    max_diff,
    perturb_trainable,
    run,
    saved_keys,
    tiny_gpt2,
    tiny_llama,
    token_ids,
)

import onnx_peft
from onnx_peft.checkpoint import load_adapter_weights
from onnx_peft.errors import AdapterConfigError, IncompatibleAdapterError
from onnx_peft.methods.base import method_for
from onnx_peft.methods.shira import ShiraConfig, sparse_delta
from onnx_peft.tuners.shira import ShiraLayer

peft = pytest.importorskip("peft")

METHOD = method_for("SHIRA")
KWARGS = CASES["shira-llama"]["kwargs"]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    perturb_trainable(model, seed, 0.3, select=("shira_weight",), around=0.0)


def _ours(seed: int = 0, **overrides):
    model = onnx_peft.get_peft_model(tiny_llama(), ShiraConfig(**{**KWARGS, **overrides}))
    _perturb(model, seed)
    return model


def _peft(seed: int = 0, **overrides):
    model = peft.get_peft_model(tiny_llama(), peft.ShiraConfig(**{**KWARGS, **overrides}))
    _perturb(model, seed)
    return model.eval()


def _layers(model) -> dict[str, ShiraLayer]:
    return {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, ShiraLayer)}


# -- the mask ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [11, None])
def test_layers_draw_the_mask_peft_draws(seed):
    ours, theirs = _ours(random_seed=seed), _peft(random_seed=seed)

    layers = _layers(ours)
    assert len(layers) == 6
    for path, layer in layers.items():
        expected = theirs.base_model.model.get_submodule(path).shira_indices["default"]
        assert torch.equal(layer.shira_indices["default"], expected)
        assert layer.shira_weight["default"].shape == (2 * (layer.in_features + layer.out_features),)


def test_sparse_delta_sums_repeated_positions_in_numpy_and_torch():
    values = np.array([1.0, 2.0, 4.0], np.float32)
    indices = np.array([[0, 2, 0], [1, 0, 1]])

    from_numpy = sparse_delta(values, indices, 3, 2)
    from_torch = sparse_delta(torch.from_numpy(values), torch.from_numpy(indices), 3, 2)

    expected = np.array([[0, 5], [0, 0], [2, 0]], np.float32)
    np.testing.assert_array_equal(from_numpy, expected)
    np.testing.assert_array_equal(from_torch.numpy(), expected)


# -- (a) checkpoints both ways -------------------------------------------------------------------
def test_peft_saved_adapter_loads_here_with_same_logits(tmp_path):
    loaded = assert_round_trip(_peft(seed=1), tmp_path, onnx_peft.PeftModel.from_pretrained, tiny_llama,
                               token_ids(), changes_by=1e-3)
    assert all(layer.shira_indices["default"].dtype == torch.int32 for layer in _layers(loaded).values())


def test_adapter_saved_here_loads_in_peft_with_same_logits(tmp_path):
    assert_round_trip(_ours(seed=2), tmp_path, peft.PeftModel.from_pretrained, tiny_llama, token_ids())


def test_saved_keys_shapes_and_index_dtype_equal_peft(tmp_path):
    from safetensors.numpy import load_file

    _ours().save_pretrained(tmp_path / "ours")
    _peft().save_pretrained(tmp_path / "peft")

    keys = saved_keys(tmp_path / "ours")
    assert keys == saved_keys(tmp_path / "peft")
    assert {k.rsplit(".", 1)[1] for k in keys} == {"shira_weight", "shira_indices"}
    ours, theirs = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "peft"))
    for key in keys:
        assert ours[key].dtype == theirs[key].dtype
        if key.endswith("shira_indices"):
            np.testing.assert_array_equal(ours[key], theirs[key])


def test_a_custom_mask_loads_from_the_checkpoint(tmp_path):
    """PEFT trains with any user mask function; its positions are in the checkpoint, so a
    mask_type onnx-peft cannot draw still loads (and cannot start a new adapter)."""
    config = peft.ShiraConfig(r=2, target_modules=["q_proj"], mask_type="first_rows")
    config.mask_fn = lambda base, r, **_: (torch.arange(base.weight.numel()).view_as(base.weight)
                                           < r * sum(base.weight.shape)).to(base.weight)
    theirs = peft.get_peft_model(tiny_llama(), config)
    _perturb(theirs, 3)

    assert_round_trip(theirs.eval(), tmp_path, onnx_peft.PeftModel.from_pretrained, tiny_llama, token_ids(),
                      changes_by=1e-3)
    fresh = onnx_peft.get_peft_model(tiny_llama(), ShiraConfig(r=2, target_modules=["q_proj"], mask_type="first_rows"))
    with pytest.raises(AdapterConfigError, match=r"mask_type='first_rows'.*from_pretrained"):
        run(fresh, token_ids())


def test_init_weights_true_is_a_no_op():
    model = onnx_peft.get_peft_model(tiny_llama(), ShiraConfig(**KWARGS))

    assert max_diff(run(model, token_ids()), run(tiny_llama(), token_ids())) == 0.0


# -- (b) merging ---------------------------------------------------------------------------------
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward():
    assert_merge_verbs(_ours(), token_ids(), ShiraLayer, restores_state_to=1e-6)


def test_method_merged_weight_on_numpy_equals_the_torch_merge():
    model = _ours()
    config = model.peft_config["default"]
    layers = _layers(model)
    before = {path: layer.weight.detach().numpy().copy() for path, layer in layers.items()}

    model.merge_adapter()

    for path, layer in layers.items():
        parts = {"shira_weight": layer.shira_weight["default"].detach().numpy(),
                 "shira_indices": layer.shira_indices["default"].numpy()}
        w, b = METHOD.merged_weight(config, path, before[path], None, parts, {})
        assert isinstance(w, np.ndarray) and b is None
        assert np.abs(w - layer.weight.detach().numpy()).max() <= 1e-6
        assert np.abs(w - before[path]).max() > 1e-2


# -- (c) training --------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_changes_only_shira_weights():
    assert_training_changes_only(_ours, (".shira_weight.",))


# -- (d) errors ----------------------------------------------------------------------------------
def test_unsupported_module_type_raises_naming_module_and_types():
    with pytest.raises(AdapterConfigError, match=r"model\.embed_tokens \(Embedding\).*SHiRA.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_llama(), ShiraConfig(target_modules=["embed_tokens"]))
    with pytest.raises(AdapterConfigError, match=r"transformer\.h\.0\.attn\.c_attn \(Conv1D\).*SHiRA.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_gpt2(), ShiraConfig(r=2, target_modules=["c_attn"]))


def test_r_above_the_layer_size_raises_naming_the_module():
    with pytest.raises(AdapterConfigError, match=r"r=32 .*model\.layers\.0\.self_attn\.q_proj"):
        onnx_peft.get_peft_model(tiny_llama(), ShiraConfig(r=32, target_modules=["q_proj"]))


@pytest.mark.parametrize("kwargs, field", [
    (dict(r=0), "r"), (dict(r=2.5), "r"), (dict(mask_type=""), "mask_type"),
    (dict(random_seed=-1), "random_seed"), (dict(init_weights="no"), "init_weights"),
])
def test_bad_config_field_raises_naming_it(kwargs, field):
    with pytest.raises(AdapterConfigError, match=f"ShiraConfig.{field}"):
        ShiraConfig(**kwargs)


@pytest.mark.parametrize("parts, message", [
    ({"shira_weight": np.ones(100, np.float32), "shira_indices": np.zeros((2, 100), np.int32)}, r"r=2.*\[128\]"),
    ({"shira_weight": np.ones(128, np.float32), "shira_indices": np.full((2, 128), 40, np.int32)}, "outside"),
])
def test_checkpoint_that_does_not_fit_the_layer_is_refused(parts, message):
    config = ShiraConfig(r=2, target_modules=["q_proj"])

    with pytest.raises(IncompatibleAdapterError, match=f"q_proj.*{message}"):
        METHOD.slot_tensors(config, "model.layers.0.self_attn.q_proj", parts, {}, lambda: np.zeros((32, 32)))


# -- (e) slot tensors ----------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.v_proj"])
def test_dense_slot_reproduces_the_peft_layer_output(module, tmp_path):
    theirs = _peft(seed=4)
    theirs.save_pretrained(tmp_path)
    config = onnx_peft.AdapterConfig.from_pretrained(tmp_path)
    grouped = METHOD.group(load_adapter_weights(tmp_path))
    layer = theirs.base_model.model.get_submodule(module)
    weight = layer.get_base_layer().weight.detach().numpy()
    x = torch.randn(2, 5, weight.shape[1], generator=torch.Generator().manual_seed(0))

    slots = METHOD.slot_tensors(config, module, grouped.modules[module], grouped.shared, lambda: weight)

    assert list(slots) == ["dense"]
    dense = slots["dense"]["delta.weight"]
    assert dense.dtype == np.float32 and dense.shape == (weight.shape[1], weight.shape[0])  # [in, out]
    xn = x.numpy()
    ours = xn @ weight.T + xn[..., : dense.shape[0]] @ dense
    with torch.no_grad():
        expected = layer(x).numpy()
    assert np.abs(ours - expected).max() <= TOL
    assert np.abs(ours - xn @ weight.T).max() > 1e-3
