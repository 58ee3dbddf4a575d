"""WaveFT against HF PEFT, on numbers: the Daubechies filters and the inverse wavelet
transform, checkpoints both ways, merge verbs, training, errors, and the ``dense`` slot tensor
(fp32, <= 1e-5). The cases are those of ``method_cases/waveft.py``: Llama (Linear, db3, a
per-module n_frequency) and GPT-2 (Conv1D, Haar, another seed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_cases.waveft import CASES
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
from onnx_peft.methods.waveft import WAVELETS, WaveFTConfig, daubechies_filters, wavelet_delta
from onnx_peft.tuners.waveft import WaveFTLayer

peft = pytest.importorskip("peft")

METHOD = method_for("WAVEFT")
MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    perturb_trainable(model, seed, 0.3, select=("waveft_spectrum",), around=0.0)


def _ours(case: str, seed: int = 0, **overrides):
    model = onnx_peft.get_peft_model(MODELS[CASES[case]["model"]](), WaveFTConfig(**{**CASES[case]["kwargs"], **overrides}))
    _perturb(model, seed)
    return model


def _peft(case: str, seed: int = 0, **overrides):
    config = peft.WaveFTConfig(**{**CASES[case]["kwargs"], **overrides})
    model = peft.get_peft_model(MODELS[CASES[case]["model"]](), config)
    _perturb(model, seed)
    return model.eval()


def _layers(model) -> dict[str, WaveFTLayer]:
    return {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, WaveFTLayer)}


# -- the transform -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", WAVELETS)
def test_daubechies_filters_equal_pywavelets_tables(name):
    from peft.tuners.waveft.wavelet import Wavelet

    lo, hi = daubechies_filters(name)

    assert np.abs(lo - np.array(Wavelet(name).rec_lo)).max() <= 1e-10
    assert np.abs(hi - np.array(Wavelet(name).rec_hi)).max() <= 1e-10


@pytest.mark.parametrize("family, use_idwt, shape", [
    ("db1", True, (32, 32)), ("db2", True, (96, 32)), ("db5", True, (33, 17)), ("db10", True, (16, 64)),
    ("db4", False, (32, 64)),
])
def test_wavelet_delta_equals_peft_layer_in_numpy_and_torch(family, use_idwt, shape):
    out_features, in_features = shape
    config = peft.WaveFTConfig(n_frequency=40, scaling=3.0, wavelet_family=family, use_idwt=use_idwt,
                               target_modules=["x"])
    reference = peft.tuners.waveft.layer.WaveFTLinear(torch.nn.Linear(in_features, out_features), "a", config, 40)
    spectrum = torch.randn(40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference.waveft_spectrum["a"].copy_(spectrum)
        expected = reference.get_delta_weight("a").numpy()
    ours = WaveFTConfig(n_frequency=40, scaling=3.0, wavelet_family=family, use_idwt=use_idwt)

    from_numpy = wavelet_delta(spectrum.numpy(), out_features, in_features, ours)
    from_torch = wavelet_delta(spectrum, out_features, in_features, ours)

    assert from_numpy.dtype == np.float32 and from_numpy.shape == shape
    assert np.abs(from_numpy - expected).max() <= 1e-5
    assert np.abs(from_torch.numpy() - expected).max() <= 1e-5


def test_proportional_parameters_split_the_budget_as_peft():
    ours = _ours("waveft-llama", proportional_parameters=True)
    theirs = _peft("waveft-llama", proportional_parameters=True)

    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items() if "spectrum" in k}
    assert shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items() if "spectrum" in k}
    assert len(set(shapes.values())) == 3  # q [32x32], v [16x32], down_proj [32x64]: n by size


def test_init_weights_true_is_a_no_op():
    model = onnx_peft.get_peft_model(tiny_llama(), WaveFTConfig(**CASES["waveft-llama"]["kwargs"]))

    assert max_diff(run(model, token_ids()), run(tiny_llama(), token_ids())) == 0.0


# -- (a) checkpoints both ways -------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_loads_here_with_same_logits(case, tmp_path):
    assert_round_trip(_peft(case, seed=1), tmp_path, onnx_peft.PeftModel.from_pretrained,
                      MODELS[CASES[case]["model"]], token_ids(), changes_by=1e-3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_saved_here_loads_in_peft_with_same_logits(case, tmp_path):
    assert_round_trip(_ours(case, seed=2), tmp_path, peft.PeftModel.from_pretrained, MODELS[CASES[case]["model"]],
                      token_ids())


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_keys_and_shapes_equal_peft(case, tmp_path):
    _ours(case).save_pretrained(tmp_path / "ours")
    _peft(case).save_pretrained(tmp_path / "peft")

    keys = saved_keys(tmp_path / "ours")
    assert keys == saved_keys(tmp_path / "peft")
    assert keys and all(k.endswith(".waveft_spectrum") for k in keys)


# -- (b) merging ---------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward(case):
    assert_merge_verbs(_ours(case), token_ids(), WaveFTLayer, restores_state_to=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_merged_weight_on_numpy_equals_the_torch_merge(case):
    model = _ours(case)
    config = model.peft_config["default"]
    layers = _layers(model)
    before = {path: layer.weight.detach().numpy().copy() for path, layer in layers.items()}

    model.merge_adapter()

    for path, layer in layers.items():
        conv1d = layer.fan_in_fan_out
        weight = before[path].T if conv1d else before[path]
        parts = {"waveft_spectrum": layer.waveft_spectrum["default"].detach().numpy()}
        w, b = METHOD.merged_weight(config, path, weight, None, parts, {})
        assert isinstance(w, np.ndarray) and b is None
        assert np.abs((w.T if conv1d else w) - layer.weight.detach().numpy()).max() <= 1e-6
        assert np.abs(w - weight).max() > 1e-3


# -- (c) training --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_lowers_the_loss_and_changes_only_spectra(case):
    assert_training_changes_only(lambda: _ours(case), (".waveft_spectrum.",))


# -- (d) errors ----------------------------------------------------------------------------------
def test_unsupported_module_type_raises_naming_module_and_types():
    with pytest.raises(AdapterConfigError, match=r"model\.embed_tokens \(Embedding\).*WaveFT.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_llama(), WaveFTConfig(target_modules=["embed_tokens"]))


def test_n_frequency_above_the_layer_size_raises_naming_the_module():
    with pytest.raises(AdapterConfigError, match=r"n_frequency=1025.*model\.layers\.0\.self_attn\.q_proj"):
        onnx_peft.get_peft_model(tiny_llama(), WaveFTConfig(n_frequency=1025, target_modules=["q_proj"]))


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_frequency=0), "n_frequency"), (dict(n_frequency_pattern={"q_proj": -3}), "n_frequency_pattern"),
    (dict(wavelet_family="sym4"), "wavelet_family"), (dict(wavelet_family="haar"), "wavelet_family"),
    (dict(bias="lora_only"), "bias"), (dict(random_loc_seed=None), "random_loc_seed"),
    (dict(scaling="high"), "scaling"), (dict(use_idwt="yes"), "use_idwt"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), "layers_pattern"),
])
def test_bad_config_field_raises_naming_it(kwargs, field):
    with pytest.raises(AdapterConfigError, match=f"WaveFTConfig.{field}"):
        WaveFTConfig(**kwargs)


def test_checkpoint_whose_spectrum_disagrees_with_n_frequency_is_refused():
    config = WaveFTConfig(n_frequency=64, target_modules=["q_proj"])

    with pytest.raises(IncompatibleAdapterError, match=r"q_proj.*\[50\].*n_frequency=64"):
        METHOD.slot_tensors(config, "model.layers.0.self_attn.q_proj", {"waveft_spectrum": np.ones(50, np.float32)},
                            {}, lambda: np.zeros((32, 32)))


# -- (e) slot tensors ----------------------------------------------------------------------------
@pytest.mark.parametrize("case, module", [
    ("waveft-llama", "model.layers.1.mlp.down_proj"),
    ("waveft-llama", "model.layers.0.self_attn.v_proj"),
    ("waveft-gpt2", "transformer.h.0.attn.c_attn"),
])
def test_dense_slot_reproduces_the_peft_layer_output(case, module, tmp_path):
    theirs = _peft(case, seed=4)
    theirs.save_pretrained(tmp_path)
    config = onnx_peft.AdapterConfig.from_pretrained(tmp_path)
    grouped = METHOD.group(load_adapter_weights(tmp_path))
    layer = theirs.base_model.model.get_submodule(module)
    base = layer.get_base_layer()
    weight = base.weight.detach().numpy()
    weight = weight.T if type(base).__name__ == "Conv1D" else weight  # [out, in]
    bias = base.bias.detach().numpy() if base.bias is not None else 0.0
    x = torch.randn(2, 5, weight.shape[1], generator=torch.Generator().manual_seed(0))

    slots = METHOD.slot_tensors(config, module, grouped.modules[module], grouped.shared, lambda: weight)

    assert list(slots) == ["dense"]
    dense = slots["dense"]["delta.weight"]
    assert dense.dtype == np.float32 and dense.shape == (weight.shape[1], weight.shape[0])  # [in, out]
    xn = x.numpy()
    ours = xn @ weight.T + bias + xn[..., : dense.shape[0]] @ dense
    with torch.no_grad():
        expected = layer(x).numpy()
    assert np.abs(ours - expected).max() <= TOL
    assert np.abs(ours - (xn @ weight.T + bias)).max() > 1e-3
