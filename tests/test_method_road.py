"""RoAd against HF PEFT, on numbers: checkpoints both ways (all three variants), merge verbs on
weight and bias, training, errors, and the ``rotate_out`` slot tensors (fp32, <= 1e-5).

The cases of ``method_cases/road.py`` run on Llama (Linear, no bias); BERT's Linears (with
seeded biases) show that the rotation moves the bias too (merged ``b' = R b``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from method_cases.road import CASES
from tiny_models import (
    TOL,
    assert_merge_verbs,
    assert_round_trip,
    assert_training_changes_only,
    max_diff,
    perturb_trainable,
    run,
    saved_keys,
    tiny_bert_cls,
    tiny_llama,
    token_ids,
)

import onnx_peft
from onnx_peft.checkpoint import load_adapter_weights
from onnx_peft.errors import AdapterConfigError, IncompatibleAdapterError
from onnx_peft.methods.base import method_for
from onnx_peft.methods.road import RoadConfig
from onnx_peft.tuners.road import RoadLayer

peft = pytest.importorskip("peft")

METHOD = method_for("ROAD")


def tiny_bert_with_biases() -> torch.nn.Module:
    """tiny_bert_cls with seeded non-zero biases (BERT starts them at zero, which would hide
    whether the rotation reaches the bias)."""
    model = tiny_bert_cls()
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith(".bias"):
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model


BERT = dict(variant="road_2", group_size=8, target_modules=["query", "value", "output.dense"])
SETUPS = {**{name: (tiny_llama, case["kwargs"]) for name, case in CASES.items()},
          "road2-bert": (tiny_bert_with_biases, BERT)}
# how far the adapter moves the logits at least: BERT's fresh classifier gives logits ~1e-2
MOVES = {"road2-bert": 1e-4}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Angles ~ 0.3 N(0, 1) and scales ~ 1 + 0.3 N(0, 1) (a fresh RoAd adapter is the identity)."""
    perturb_trainable(model, seed, select=("road_theta",), around=0.0)
    perturb_trainable(model, seed + 100, select=("road_alpha",), around=1.0)


def _ours(setup: str, seed: int = 0):
    build, kwargs = SETUPS[setup]
    model = onnx_peft.get_peft_model(build(), RoadConfig(**kwargs))
    _perturb(model, seed)
    return model


def _peft(setup: str, seed: int = 0):
    build, kwargs = SETUPS[setup]
    model = peft.get_peft_model(build(), peft.RoadConfig(**kwargs))
    _perturb(model, seed)
    return model.eval()


def _layers(model) -> dict[str, RoadLayer]:
    return {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, RoadLayer)}


# -- (a) checkpoints both ways ---------------------------------------------------------------
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_peft_saved_adapter_loads_here_with_same_logits(setup, tmp_path):
    assert_round_trip(_peft(setup, seed=1), tmp_path, onnx_peft.PeftModel.from_pretrained, SETUPS[setup][0],
                      token_ids(), changes_by=MOVES.get(setup, 1e-3))


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_adapter_saved_here_loads_in_peft_with_same_logits(setup, tmp_path):
    assert_round_trip(_ours(setup, seed=2), tmp_path, peft.PeftModel.from_pretrained, SETUPS[setup][0],
                      token_ids(), changes_by=MOVES.get(setup, 1e-3))


@pytest.mark.parametrize("variant, size", [("road_1", 16), ("road_2", 32), ("road_4", 64)])
def test_saved_keys_and_shapes_equal_peft_for_every_variant(variant, size, tmp_path):
    kwargs = dict(variant=variant, group_size=8, target_modules=["q_proj", "down_proj"])
    onnx_peft.get_peft_model(tiny_llama(), RoadConfig(**kwargs)).save_pretrained(tmp_path / "ours")
    peft.get_peft_model(tiny_llama(), peft.RoadConfig(**kwargs)).save_pretrained(tmp_path / "peft")

    keys = saved_keys(tmp_path / "ours")
    assert keys == saved_keys(tmp_path / "peft")
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.road_theta"] == (size,)  # q_proj: 32 outputs
    assert len(keys) == 8


@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_every_variant_gives_peft_logits(variant):
    kwargs = dict(variant=variant, group_size=8, target_modules=["q_proj", "v_proj", "up_proj"])
    theirs = peft.get_peft_model(tiny_llama(), peft.RoadConfig(**kwargs)).eval()
    _perturb(theirs, seed=5)
    ours = onnx_peft.get_peft_model(tiny_llama(), RoadConfig(**kwargs))
    ours.load_state_dict(theirs.state_dict())

    x = token_ids()
    assert max_diff(run(ours, x), run(theirs, x)) <= TOL
    assert max_diff(run(ours, x), run(tiny_llama(), x)) > 1e-3


def test_fresh_adapter_is_a_no_op():
    model = onnx_peft.get_peft_model(tiny_llama(), RoadConfig(**CASES["road-llama"]["kwargs"]))

    x = token_ids()
    assert max_diff(run(model, x), run(tiny_llama(), x)) == 0.0


# -- (b) merging -------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward(setup):
    # unmerging applies each 2x2 block's closed-form inverse, to weight and bias
    assert_merge_verbs(_ours(setup), token_ids(), RoadLayer, restores_state_to=1e-5)


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_method_merged_weight_on_numpy_equals_the_torch_and_peft_merge(setup):
    model, theirs = _ours(setup, seed=3), _peft(setup, seed=3)
    config = model.peft_config["default"]
    layers = _layers(model)
    before = {path: (layer.weight.detach().numpy().copy(),
                     None if layer.bias is None else layer.bias.detach().numpy().copy()) for path, layer in layers.items()}

    model.merge_adapter()
    theirs.merge_adapter()

    for path, layer in layers.items():
        weight, bias = before[path]
        parts = {k: getattr(layer, k)["default"].detach().numpy() for k in ("road_theta", "road_alpha")}
        w, b = METHOD.merged_weight(config, path, weight, bias, parts, {})
        peft_base = theirs.base_model.model.get_submodule(path).get_base_layer()
        assert isinstance(w, np.ndarray)
        assert np.abs(w - layer.weight.detach().numpy()).max() <= 1e-6
        assert np.abs(w - peft_base.weight.detach().numpy()).max() <= 1e-6
        if bias is None:
            assert b is None
        else:
            assert np.abs(b - layer.bias.detach().numpy()).max() <= 1e-6
            assert np.abs(b - peft_base.bias.detach().numpy()).max() <= 1e-6
            assert np.abs(b - bias).max() > 1e-3  # the rotation moves the bias too


def test_two_active_adapters_rotate_in_turn_and_merge_to_the_same_output():
    model = _ours("road-llama", seed=0)
    model.add_adapter("other", RoadConfig(**CASES["road-llama"]["kwargs"]))
    _perturb(model, seed=6)
    model.set_adapter(["default", "other"])
    x = token_ids()
    both = run(model, x)

    model.merge_adapter()

    assert max_diff(run(model, x), both) <= TOL
    assert max_diff(both, run(_ours("road-llama"), x)) > 1e-3


# -- (c) training ------------------------------------------------------------------------------
@pytest.mark.parametrize("setup", ["road-llama", "road4-llama"])
def test_training_lowers_the_loss_and_changes_only_road_vectors(setup):
    assert_training_changes_only(lambda: _ours(setup), (".road_theta.", ".road_alpha."))


# -- (d) errors --------------------------------------------------------------------------------
def test_unsupported_module_type_raises_naming_module_and_types():
    with pytest.raises(AdapterConfigError, match=r"model\.embed_tokens \(Embedding\).*RoAd.*nn\.Linear"):
        onnx_peft.get_peft_model(tiny_llama(), RoadConfig(group_size=8, target_modules=["embed_tokens"]))


def test_group_size_that_does_not_divide_the_outputs_names_the_module():
    with pytest.raises(AdapterConfigError, match=r"self_attn\.v_proj has 16 outputs.*group_size=32"):
        onnx_peft.get_peft_model(tiny_llama(), RoadConfig(group_size=32, target_modules=["v_proj"]))


@pytest.mark.parametrize("kwargs, field", [
    (dict(variant="road_3"), "variant"),
    (dict(group_size=7), "group_size"),
    (dict(group_size=0), "group_size"),
    (dict(init_weights="yes"), "init_weights"),
])
def test_bad_config_field_raises_naming_it(kwargs, field):
    with pytest.raises(AdapterConfigError, match=f"RoadConfig.{field}"):
        RoadConfig(target_modules=["q_proj"], **kwargs)


def test_checkpoint_whose_size_disagrees_with_the_variant_is_refused():
    config = RoadConfig(variant="road_2", group_size=8, target_modules=["q_proj"])
    parts = {"road_theta": np.zeros(16, np.float32), "road_alpha": np.ones(16, np.float32)}  # road_1's size

    with pytest.raises(IncompatibleAdapterError, match=r"q_proj has road_theta of shape \[16\].*road_2.*\[32\]"):
        METHOD.merged_weight(config, "model.layers.0.self_attn.q_proj", np.zeros((32, 32), np.float32), None, parts, {})


# -- (e) slot tensors --------------------------------------------------------------------------
def _rotate_out(y: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """The ``rotate_out`` form: ``y [.., n g]`` as ``[.., n, 2, g/2]``; ``y C + swap(y) S``."""
    n, size = cos.shape
    groups = y.reshape(*y.shape[:-1], n, 2, size // 2)
    out = groups * cos.reshape(n, 2, -1) + groups[..., ::-1, :] * sin.reshape(n, 2, -1)
    return out.reshape(y.shape)


@pytest.mark.parametrize("setup, module", [
    ("road-llama", "model.layers.1.self_attn.v_proj"),
    ("road4-llama", "model.layers.0.mlp.up_proj"),
    ("road2-bert", "bert.encoder.layer.0.attention.self.query"),
])
def test_rotate_out_slots_reproduce_the_peft_layer_output(setup, module, tmp_path):
    theirs = _peft(setup, seed=4)
    theirs.save_pretrained(tmp_path)
    config = onnx_peft.AdapterConfig.from_pretrained(tmp_path)
    grouped = METHOD.group(load_adapter_weights(tmp_path))
    layer = theirs.base_model.model.get_submodule(module)
    base = layer.get_base_layer()
    weight = base.weight.detach().numpy()
    bias = base.bias.detach().numpy() if base.bias is not None else 0.0
    x = torch.randn(2, 5, weight.shape[1], generator=torch.Generator().manual_seed(0))

    slots = METHOD.slot_tensors(config, module, grouped.modules[module], grouped.shared, lambda: weight)

    assert set(slots) == {"rotate_out"}
    cos, sin = slots["rotate_out"]["rotate_out.cos"], slots["rotate_out"]["rotate_out.sin"]
    assert cos.shape == sin.shape == (weight.shape[0] // config.group_size, config.group_size)
    y = x.numpy() @ weight.T + bias
    with torch.no_grad():
        expected = layer(x).numpy()
    assert np.abs(_rotate_out(y, cos, sin) - expected).max() <= TOL
    assert np.abs(y - expected).max() > 1e-3
