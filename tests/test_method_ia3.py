"""(IA)^3 against HF PEFT, on numbers: checkpoints both ways, merge verbs, training, errors, and the
``ia3_in`` / ``ia3_out`` slot tensors (fp32, <= 1e-5).

The cases are those of ``method_cases/ia3.py``: Llama (Linear, no bias) and GPT-2 (Conv1D, with
bias), each with an input-scaled (feedforward) module and output-scaled ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_cases.ia3 import CASES
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
from onnx_peft.errors import AdapterConfigError, IncompatibleAdapterError
from onnx_peft.methods.base import method_for
from onnx_peft.methods.ia3 import IA3Config
from onnx_peft.tuners.ia3 import IA3Layer

peft = pytest.importorskip("peft")



MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2_with_biases}
METHOD = method_for("IA3")


def _builder(case: str):
    return MODELS[CASES[case]["model"]]


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Give every ia3_l non-trivial values ``1 + 0.3 * noise`` (a fresh IA3 adapter is all ones)."""
    perturb_trainable(model, seed, select=("ia3_l",), around=1.0)


def _ours(case: str, seed: int = 0):
    model = onnx_peft.get_peft_model(_builder(case)(), IA3Config(**CASES[case]["kwargs"]))
    _perturb(model, seed)
    return model


def _peft(case: str, seed: int = 0):
    model = peft.get_peft_model(_builder(case)(), peft.IA3Config(**CASES[case]["kwargs"]))
    _perturb(model, seed)
    return model.eval()


def _ia3_layers(model) -> dict[str, IA3Layer]:
    return {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, IA3Layer)}


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
    assert all(k.endswith(".ia3_l") for k in keys)


def test_feedforward_vector_is_1_by_in_and_output_vector_out_by_1():
    keys = {k: v.shape for k, v in _ours("ia3-llama").state_dict().items() if "ia3_l" in k}

    assert keys["base_model.model.model.layers.0.mlp.down_proj.ia3_l.default"] == (1, 64)
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.ia3_l.default"] == (32, 1)
    assert keys["base_model.model.model.layers.0.self_attn.v_proj.ia3_l.default"] == (16, 1)


def test_fresh_adapter_is_a_no_op():
    model = onnx_peft.get_peft_model(tiny_llama(), IA3Config(**CASES["ia3-llama"]["kwargs"]))

    x = token_ids()
    assert max_diff(run(model, x), run(tiny_llama(), x)) == 0.0


# -- (b) merging -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward(case):
    # unmerging divides the scales back out of weights and biases
    assert_merge_verbs(_ours(case), token_ids(), IA3Layer, restores_state_to=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_merged_weight_on_numpy_equals_the_torch_merge(case):
    model = _ours(case)
    config = model.peft_config["default"]
    layers = _ia3_layers(model)
    before = {path: (layer.weight.detach().numpy().copy(), layer.bias.detach().numpy().copy()
                     if layer.bias is not None else None) for path, layer in layers.items()}

    model.merge_adapter()

    for path, layer in layers.items():
        weight, bias = before[path]
        conv1d = layer.fan_in_fan_out
        parts = {"ia3_l": layer.ia3_l["default"].detach().numpy()}
        w, b = METHOD.merged_weight(config, path, weight.T if conv1d else weight, bias, parts, {})
        assert isinstance(w, np.ndarray)
        assert np.abs((w.T if conv1d else w) - layer.weight.detach().numpy()).max() <= 1e-6
        if bias is None:
            assert b is None
        else:
            assert np.abs(b - layer.bias.detach().numpy()).max() <= 1e-6
            if not layer.is_feedforward:
                assert np.abs(b - bias).max() > 1e-3  # output scaling rescales the bias too


def test_merging_two_active_adapters_equals_their_product():
    model = _ours("ia3-gpt2", seed=0)
    model.add_adapter("other", IA3Config(**CASES["ia3-gpt2"]["kwargs"]))
    _perturb(model, seed=3)
    model.set_adapter(["default", "other"])
    x = token_ids()
    both = run(model, x)

    model.merge_adapter()

    assert max_diff(run(model, x), both) <= TOL
    assert max_diff(both, run(_ours("ia3-gpt2"), x)) > 1e-3


# -- (c) training ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_lowers_the_loss_and_changes_only_ia3_vectors(case):
    changed = assert_training_changes_only(lambda: _ours(case), (".ia3_l.",))
    assert changed and all(".ia3_l." in k for k in changed)


# -- (d) errors --------------------------------------------------------------------------------
def test_unsupported_module_type_raises_naming_module_and_types():
    config = IA3Config(target_modules=["embed_tokens"], feedforward_modules=[])

    with pytest.raises(AdapterConfigError, match=r"model\.embed_tokens \(Embedding\).*IA3.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_llama(), config)


@pytest.mark.parametrize("kwargs, field", [
    (dict(target_modules=["q_proj"], feedforward_modules=["down_proj"]), "feedforward_modules"),
    (dict(target_modules=["q_proj"], feedforward_modules=[], init_ia3_weights="yes"), "init_ia3_weights"),
    (dict(target_modules=3, feedforward_modules=[]), "target_modules"),
])
def test_bad_config_field_raises_naming_it(kwargs, field):
    with pytest.raises(AdapterConfigError, match=f"IA3Config.{field}"):
        IA3Config(**kwargs)


def test_missing_feedforward_modules_is_refused_rather_than_guessed():
    with pytest.raises(AdapterConfigError, match="feedforward_modules is required"):
        onnx_peft.get_peft_model(tiny_llama(), IA3Config(target_modules=["q_proj", "down_proj"]))


def test_checkpoint_whose_shape_disagrees_with_feedforward_modules_is_refused():
    config = IA3Config(target_modules=["q_proj"], feedforward_modules=[])
    vector = np.ones((1, 32), np.float32)  # [1, in]: a feedforward vector, but q_proj scales its output

    with pytest.raises(IncompatibleAdapterError, match="q_proj.*feedforward_modules"):
        METHOD.slot_tensors(config, "model.layers.0.self_attn.q_proj", {"ia3_l": vector}, {}, lambda: None)


# -- (e) slot tensors --------------------------------------------------------------------------
@pytest.mark.parametrize("case, module, form", [
    ("ia3-llama", "model.layers.1.mlp.down_proj", "ia3_in"),
    ("ia3-llama", "model.layers.0.self_attn.v_proj", "ia3_out"),
    ("ia3-gpt2", "transformer.h.1.mlp.c_proj", "ia3_in"),
    ("ia3-gpt2", "transformer.h.0.attn.c_attn", "ia3_out"),
])
def test_slot_tensors_reproduce_the_peft_layer_output(case, module, form, tmp_path):
    theirs = _peft(case, seed=4)
    theirs.save_pretrained(tmp_path)
    config = onnx_peft.AdapterConfig.from_pretrained(tmp_path)
    from onnx_peft.checkpoint import load_adapter_weights

    grouped = METHOD.group(load_adapter_weights(tmp_path))
    layer = theirs.base_model.model.get_submodule(module)
    base = layer.get_base_layer()
    weight = base.weight.detach().numpy()
    weight = weight.T if type(base).__name__ == "Conv1D" else weight  # [out, in]
    bias = base.bias.detach().numpy() if base.bias is not None else 0.0
    x = torch.randn(2, 5, weight.shape[1], generator=torch.Generator().manual_seed(0))

    slots = METHOD.slot_tensors(config, module, grouped.modules[module], grouped.shared, lambda: weight)

    assert list(slots) == [form]
    xn = x.numpy()
    if form == "ia3_in":
        ours = (xn * slots["ia3_in"]["ia3_l.in"]) @ weight.T + bias
    else:
        ours = (xn @ weight.T + bias) * slots["ia3_out"]["ia3_l.out"]
    with torch.no_grad():
        expected = layer(x).numpy()
    assert np.abs(ours - expected).max() <= TOL
    assert np.abs(ours - (xn @ weight.T + bias)).max() > 1e-3
