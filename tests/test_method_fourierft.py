"""FourierFT against HF PEFT, on numbers: the replayed frequency positions, checkpoints both ways,
merge verbs, training, errors, and the ``dense`` slot tensor (fp32, <= 1e-5).

The cases are those of ``method_cases/fourierft.py``: Llama (Linear, a per-module n_frequency)
and GPT-2 (Conv1D, with bias, another seed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_cases.fourierft import CASES
from tiny_models import (
    TOL,
    assert_merge_verbs,
    assert_round_trip,
    assert_training_changes_only,
    max_diff,
    perturb_trainable,
    run,
    saved_keys,
    tiny_gpt2_with_biases,
    tiny_llama,
    token_ids,
)

import onnx_peft
from onnx_peft.checkpoint import load_adapter_weights
from onnx_peft.errors import AdapterConfigError, IncompatibleAdapterError
from onnx_peft.methods.base import method_for
from onnx_peft.methods.fourierft import FourierFTConfig, fourier_delta_weight, frequency_indices
from onnx_peft.tuners.fourierft import FourierFTLayer

peft = pytest.importorskip("peft")

METHOD = method_for("FOURIERFT")


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2_with_biases}


def _builder(case: str):
    return MODELS[CASES[case]["model"]]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Seeded spectra (PEFT draws them from the global RNG, so two libraries would differ)."""
    perturb_trainable(model, seed, 1.0, select=("fourierft_spectrum",), around=0.0)


def _ours(case: str, seed: int = 0, **overrides):
    config = FourierFTConfig(**{**CASES[case]["kwargs"], **overrides})
    model = onnx_peft.get_peft_model(_builder(case)(), config)
    _perturb(model, seed)
    return model


def _peft(case: str, seed: int = 0):
    model = peft.get_peft_model(_builder(case)(), peft.FourierFTConfig(**CASES[case]["kwargs"]))
    _perturb(model, seed)
    return model.eval()


def _layers(model) -> dict[str, FourierFTLayer]:
    return {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, FourierFTLayer)}


# -- the frequency positions ---------------------------------------------------------------------
@pytest.mark.parametrize("out_features, in_features, n, seed", [
    (32, 32, 64, 777), (64, 32, 1, 0), (3, 5, 15, 12), (96, 32, 500, 2**32 + 9), (1024, 2048, 300, 777),
])
def test_frequency_indices_replay_torch_randperm(out_features, in_features, n, seed):
    generator = torch.Generator().manual_seed(seed)
    flat = torch.randperm(out_features * in_features, generator=generator)[:n].numpy()

    rows, cols = frequency_indices(out_features, in_features, n, seed)

    np.testing.assert_array_equal(rows, flat // in_features)
    np.testing.assert_array_equal(cols, flat % in_features)


@pytest.mark.parametrize("out_features, in_features", [(32, 32), (96, 32), (16, 64)])
def test_delta_weight_equals_ifft2_in_numpy_and_torch(out_features, in_features):
    spectrum = np.random.default_rng(0).standard_normal(40).astype(np.float32)
    rows, cols = frequency_indices(out_features, in_features, 40, 777)
    dense = np.zeros((out_features, in_features))
    dense[rows, cols] = spectrum
    expected = np.fft.ifft2(dense).real * 30.0

    from_numpy = fourier_delta_weight(spectrum, out_features, in_features, 30.0, 777)
    from_torch = fourier_delta_weight(torch.from_numpy(spectrum), out_features, in_features, 30.0, 777)

    assert from_numpy.dtype == np.float32 and from_numpy.shape == (out_features, in_features)
    assert np.abs(from_numpy - expected).max() <= 1e-6
    assert isinstance(from_torch, torch.Tensor)
    assert np.abs(from_torch.numpy() - expected).max() <= 1e-6


@pytest.mark.parametrize("case", sorted(CASES))
def test_layers_place_frequencies_where_peft_does(case):
    ours, theirs = _ours(case), _peft(case)

    for path, layer in _layers(ours).items():
        assert torch.equal(layer.indices["default"], theirs.base_model.model.get_submodule(path).indices["default"])


# -- (a) checkpoints both ways ---------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_loads_here_with_same_logits(case, tmp_path):
    # changes_by: the adapter really changes the output
    assert_round_trip(_peft(case, seed=1), tmp_path, onnx_peft.PeftModel.from_pretrained, _builder(case),
                      token_ids(), changes_by=1e-3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_saved_here_loads_in_peft_with_same_logits(case, tmp_path):
    assert_round_trip(_ours(case, seed=2), tmp_path, peft.PeftModel.from_pretrained, _builder(case), token_ids())


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_keys_and_shapes_equal_peft(case, tmp_path):
    _ours(case).save_pretrained(tmp_path / "ours")
    _peft(case).save_pretrained(tmp_path / "peft")

    keys = saved_keys(tmp_path / "ours")
    assert keys == saved_keys(tmp_path / "peft")
    assert all(k.endswith(".fourierft_spectrum") for k in keys)


def test_n_frequency_pattern_sets_the_spectrum_length_per_module():
    keys = {k: v.shape for k, v in _ours("fourierft-llama").state_dict().items() if "spectrum" in k}

    assert keys["base_model.model.model.layers.0.mlp.down_proj.fourierft_spectrum.default"] == (96,)
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.fourierft_spectrum.default"] == (64,)


def test_init_weights_true_is_a_no_op():
    model = onnx_peft.get_peft_model(tiny_llama(), FourierFTConfig(init_weights=True, **CASES["fourierft-llama"]["kwargs"]))

    x = token_ids()
    assert max_diff(run(model, x), run(tiny_llama(), x)) == 0.0


# -- (b) merging -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward(case):
    assert_merge_verbs(_ours(case), token_ids(), FourierFTLayer, restores_state_to=1e-6)


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
        parts = {"fourierft_spectrum": layer.fourierft_spectrum["default"].detach().numpy()}
        w, b = METHOD.merged_weight(config, path, weight, None, parts, {})
        assert isinstance(w, np.ndarray) and b is None
        assert np.abs((w.T if conv1d else w) - layer.weight.detach().numpy()).max() <= 1e-6
        assert np.abs(w - weight).max() > 1e-3


# -- (c) training ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_lowers_the_loss_and_changes_only_spectra(case):
    assert_training_changes_only(lambda: _ours(case), (".fourierft_spectrum.",))


# -- (d) errors --------------------------------------------------------------------------------
def test_unsupported_module_type_raises_naming_module_and_types():
    with pytest.raises(AdapterConfigError, match=r"model\.embed_tokens \(Embedding\).*FourierFT.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_llama(), FourierFTConfig(target_modules=["embed_tokens"]))


def test_n_frequency_above_the_layer_size_raises_naming_the_module():
    config = FourierFTConfig(n_frequency=64 * 32 + 1, target_modules=["down_proj"])

    with pytest.raises(AdapterConfigError, match=r"n_frequency=2049.*model\.layers\.0\.mlp\.down_proj"):
        onnx_peft.get_peft_model(tiny_llama(), config)


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_frequency=0), "n_frequency"),
    (dict(n_frequency_pattern={"q_proj": -3}), "n_frequency_pattern"),
    (dict(bias="lora_only"), "bias"),
    (dict(random_loc_seed=None), "random_loc_seed"),
    (dict(scaling="high"), "scaling"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), "layers_pattern"),
    (dict(target_modules=".*q_proj", layers_to_transform=[0]), "layers_to_transform"),
])
def test_bad_config_field_raises_naming_it(kwargs, field):
    with pytest.raises(AdapterConfigError, match=f"FourierFTConfig.{field}"):
        FourierFTConfig(**kwargs)


def test_checkpoint_whose_spectrum_disagrees_with_n_frequency_is_refused():
    config = FourierFTConfig(n_frequency=64, target_modules=["q_proj"])
    parts = {"fourierft_spectrum": np.ones(50, np.float32)}

    with pytest.raises(IncompatibleAdapterError, match="q_proj.*n_frequency=64"):
        METHOD.slot_tensors(config, "model.layers.0.self_attn.q_proj", parts, {}, lambda: np.zeros((32, 32)))


# -- (e) slot tensors --------------------------------------------------------------------------
@pytest.mark.parametrize("case, module", [
    ("fourierft-llama", "model.layers.1.mlp.down_proj"),
    ("fourierft-llama", "model.layers.0.self_attn.v_proj"),
    ("fourierft-gpt2", "transformer.h.0.attn.c_attn"),
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
