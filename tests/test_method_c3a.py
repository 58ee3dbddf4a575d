"""C3A against HF PEFT, on numbers: the block-circulant matrix, checkpoints both ways, merge
verbs, training, errors, and the ``dense`` slot tensor (fp32, <= 1e-5). The case is that of
``method_cases/c3a.py`` (Llama, Linear only, a per-module block size).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from method_cases.c3a import CASES
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
from onnx_peft.methods.c3a import C3AConfig, circulant_delta
from onnx_peft.tuners.c3a import C3ALayer, block_circular_correlation

peft = pytest.importorskip("peft")

METHOD = method_for("C3A")
KWARGS = CASES["c3a-llama"]["kwargs"]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Seeded kernels (PEFT draws its xavier init from the global RNG)."""
    perturb_trainable(model, seed, 0.3, select=("c3a_kernel",), around=0.0)


def _ours(seed: int = 0, **overrides):
    model = onnx_peft.get_peft_model(tiny_llama(), C3AConfig(**{**KWARGS, **overrides}))
    _perturb(model, seed)
    return model


def _peft(seed: int = 0):
    model = peft.get_peft_model(tiny_llama(), peft.C3AConfig(**KWARGS))
    _perturb(model, seed)
    return model.eval()


def _layers(model) -> dict[str, C3ALayer]:
    return {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, C3ALayer)}


# -- the math ------------------------------------------------------------------------------------
@pytest.mark.parametrize("m, n, b", [(3, 2, 4), (1, 4, 8), (2, 2, 1)])
def test_circulant_delta_equals_the_fft_convolution_and_peft(m, n, b):
    from peft.tuners.c3a.utils import get_circulant_fast

    kernel = torch.randn(m, n, b, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, n * b, generator=torch.Generator().manual_seed(1))

    from_numpy = circulant_delta(kernel.numpy(), n * b)
    from_torch = circulant_delta(kernel, n * b)

    assert from_numpy.dtype == np.float32 and from_numpy.shape == (m * b, n * b)
    np.testing.assert_array_equal(from_numpy, from_torch.numpy())
    assert np.abs(from_numpy - get_circulant_fast(kernel).numpy() / (n * b)).max() <= 1e-6
    by_fft = block_circular_correlation(x, kernel) / (n * b)
    assert np.abs(x.numpy() @ from_numpy.T - by_fft.numpy()).max() <= 1e-5


def test_kernel_shapes_follow_block_size_and_pattern():
    shapes = {k: tuple(v.shape) for k, v in _ours().state_dict().items() if "c3a_kernel" in k}

    assert shapes["base_model.model.model.layers.0.self_attn.q_proj.c3a_kernel.default"] == (2, 2, 16)
    assert shapes["base_model.model.model.layers.0.self_attn.v_proj.c3a_kernel.default"] == (1, 2, 16)
    assert shapes["base_model.model.model.layers.1.mlp.down_proj.c3a_kernel.default"] == (1, 2, 32)


@pytest.mark.parametrize("init, bound", [("xavier_uniform", math.sqrt(6 / 64)), (False, math.sqrt(6 / 64)),
                                         ("kaiming_uniform", math.sqrt(1 / 32))])
def test_uniform_inits_use_peft_bounds(init, bound):
    model = onnx_peft.get_peft_model(tiny_llama(), C3AConfig(block_size=8, target_modules=["q_proj"], init_weights=init))
    kernel = model.base_model.model.model.layers[0].self_attn.q_proj.c3a_kernel["default"]

    assert kernel.dtype == torch.float32
    assert bound * 0.8 < kernel.abs().max().item() <= bound


def test_init_weights_true_is_a_no_op():
    model = onnx_peft.get_peft_model(tiny_llama(), C3AConfig(**{**KWARGS, "init_weights": True}))

    assert max_diff(run(model, token_ids()), run(tiny_llama(), token_ids())) == 0.0


# -- (a) checkpoints both ways -------------------------------------------------------------------
def test_peft_saved_adapter_loads_here_with_same_logits(tmp_path):
    assert_round_trip(_peft(seed=1), tmp_path, onnx_peft.PeftModel.from_pretrained, tiny_llama, token_ids(),
                      changes_by=1e-3)


def test_adapter_saved_here_loads_in_peft_with_same_logits(tmp_path):
    assert_round_trip(_ours(seed=2), tmp_path, peft.PeftModel.from_pretrained, tiny_llama, token_ids())


def test_saved_keys_and_shapes_equal_peft(tmp_path):
    _ours().save_pretrained(tmp_path / "ours")
    _peft().save_pretrained(tmp_path / "peft")

    keys = saved_keys(tmp_path / "ours")
    assert keys == saved_keys(tmp_path / "peft")
    assert len(keys) == 6 and all(k.endswith(".c3a_kernel") for k in keys)


# -- (b) merging ---------------------------------------------------------------------------------
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward():
    assert_merge_verbs(_ours(), token_ids(), C3ALayer, restores_state_to=1e-6)


def test_method_merged_weight_on_numpy_equals_the_torch_merge():
    model = _ours()
    config = model.peft_config["default"]
    layers = _layers(model)
    before = {path: layer.weight.detach().numpy().copy() for path, layer in layers.items()}

    model.merge_adapter()

    for path, layer in layers.items():
        parts = {"c3a_kernel": layer.c3a_kernel["default"].detach().numpy()}
        w, b = METHOD.merged_weight(config, path, before[path], None, parts, {})
        assert isinstance(w, np.ndarray) and b is None
        assert np.abs(w - layer.weight.detach().numpy()).max() <= 1e-6
        assert np.abs(w - before[path]).max() > 1e-3


# -- (c) training --------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_changes_only_kernels():
    assert_training_changes_only(_ours, (".c3a_kernel.",))


# -- (d) errors ----------------------------------------------------------------------------------
def test_unsupported_module_type_raises_naming_module_and_types():
    with pytest.raises(AdapterConfigError, match=r"model\.embed_tokens \(Embedding\).*C3A.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_llama(), C3AConfig(target_modules=["embed_tokens"]))
    with pytest.raises(AdapterConfigError, match=r"transformer\.h\.0\.attn\.c_attn \(Conv1D\).*C3A.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_gpt2(), C3AConfig(block_size=16, target_modules=["c_attn"]))


def test_block_size_that_does_not_divide_the_layer_raises_naming_it():
    with pytest.raises(AdapterConfigError, match=r"block_size=12 .*in_features=32.*model\.layers\.0\.self_attn\.q_proj"):
        onnx_peft.get_peft_model(tiny_llama(), C3AConfig(block_size=12, target_modules=["q_proj"]))


@pytest.mark.parametrize("kwargs, field", [
    (dict(block_size=0), "block_size"), (dict(block_size=2.0), "block_size"),
    (dict(block_size_pattern={"q_proj": -4}), "block_size_pattern"), (dict(bias="lora_only"), "bias"),
    (dict(init_weights="orthogonal"), "init_weights"), (dict(init_weights=None), "init_weights"),
    (dict(target_modules=".*q_proj", layers_to_transform=[0]), "layers_to_transform"),
])
def test_bad_config_field_raises_naming_it(kwargs, field):
    with pytest.raises(AdapterConfigError, match=f"C3AConfig.{field}"):
        C3AConfig(**kwargs)


def test_checkpoint_whose_kernel_disagrees_with_block_size_is_refused():
    config = C3AConfig(block_size=16, target_modules=["q_proj"])
    parts = {"c3a_kernel": np.ones((4, 4, 8), np.float32)}

    with pytest.raises(IncompatibleAdapterError, match=r"q_proj.*\[4, 4, 8\].*block_size=16.*\[2, 2, 16\]"):
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
    assert METHOD.features(config, module, grouped.modules[module]) == (weight.shape[1], weight.shape[0])
    dense = slots["dense"]["delta.weight"]
    assert dense.dtype == np.float32 and dense.shape == (weight.shape[1], weight.shape[0])  # [in, out]
    xn = x.numpy()
    ours = xn @ weight.T + xn[..., : dense.shape[0]] @ dense
    with torch.no_grad():
        expected = layer(x).numpy()
    assert np.abs(ours - expected).max() <= TOL
    assert np.abs(ours - xn @ weight.T).max() > 1e-3
