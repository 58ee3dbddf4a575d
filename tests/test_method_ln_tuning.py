"""LN Tuning against HF PEFT, on numbers: checkpoints both ways, merge verbs, training, errors, the
``norm`` slot tensors, and the ``norm`` form on a norm site of a small graph (plain and per row,
ungraft restoring the base) (fp32, <= 1e-5).

The cases are those of ``method_cases/ln_tuning.py``: Llama's RMSNorms (scale only) and GPT-2's
LayerNorms (scale and shift).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from method_cases.ln_tuning import CASES
from tiny_models import (
    TOL,
    assert_merge_verbs,
    assert_round_trip,
    changed_since,
    max_diff,
    perturb_trainable,
    run,
    saved_keys,
    snapshot,
    tiny_gpt2_with_biases,
    tiny_llama,
    token_ids,
    train_steps,
)

import onnx_peft
from onnx_peft.errors import AdapterConfigError, IncompatibleAdapterError, OnnxPeftError
from onnx_peft.graph.branch import BRANCH_KEY, graft, ungraft
from onnx_peft.graph.op_sites import find_norm_sites
from onnx_peft.methods.base import method_for
from onnx_peft.methods.forms import FORMS, default_array
from onnx_peft.methods.ln_tuning import LNTuningConfig
from onnx_peft.tuners.ln_tuning import LNTuningLayer

peft = pytest.importorskip("peft")

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2_with_biases}
METHOD = method_for("LN_TUNING")
H = 8


def _builder(case: str):
    return MODELS[CASES[case]["model"]]


def _ours(case: str, seed: int = 0):
    model = onnx_peft.get_peft_model(_builder(case)(), LNTuningConfig(**CASES[case]["kwargs"]))
    perturb_trainable(model, seed)
    return model


def _peft(case: str, seed: int = 0):
    model = peft.get_peft_model(_builder(case)(), peft.LNTuningConfig(**CASES[case]["kwargs"]))
    perturb_trainable(model, seed)
    return model.eval()


def _layers(model) -> dict[str, LNTuningLayer]:
    return {name: m for name, m in model.base_model.model.named_modules() if isinstance(m, LNTuningLayer)}


# -- (a) checkpoints both ways ---------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_saved_adapter_loads_here_with_same_logits(case, tmp_path):
    assert_round_trip(_peft(case, seed=1), tmp_path, onnx_peft.PeftModel.from_pretrained, _builder(case),
                      token_ids(), changes_by=1e-3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapter_saved_here_loads_in_peft_with_same_logits(case, tmp_path):
    assert_round_trip(_ours(case, seed=2), tmp_path, peft.PeftModel.from_pretrained, _builder(case), token_ids(),
                      changes_by=1e-3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_saved_keys_and_shapes_equal_peft(case, tmp_path):
    _ours(case).save_pretrained(tmp_path / "ours")
    _peft(case).save_pretrained(tmp_path / "peft")

    keys = saved_keys(tmp_path / "ours")
    assert keys == saved_keys(tmp_path / "peft")
    assert all(".ln_tuning_layers." in k and shape == (32,) for k, shape in keys.items())
    assert any(k.endswith(".bias") for k in keys) == (case == "ln_tuning-gpt2")


def test_fresh_adapter_is_a_no_op():
    model = onnx_peft.get_peft_model(tiny_llama(), LNTuningConfig(**CASES["ln_tuning-llama"]["kwargs"]))

    x = token_ids()
    assert max_diff(run(model, x), run(tiny_llama(), x)) == 0.0
    assert len(_layers(model)) == 5  # 2 layers x 2 norms + the final norm


# -- (b) merging -------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_unmerge_and_merge_and_unload_equal_the_unmerged_forward(case):
    assert_merge_verbs(_ours(case), token_ids(), LNTuningLayer, restores_state_to=0.0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_method_merged_weight_on_numpy_equals_the_torch_merge(case):
    model = _ours(case)
    config = model.peft_config["default"]
    layers = _layers(model)
    trained = {path: {k: v.detach().numpy().copy() for k, v in layer.ln_tuning_layers["default"].named_parameters()}
               for path, layer in layers.items()}
    bases = {path: (layer.base_layer.weight.detach().numpy().copy(),
                    None if getattr(layer.base_layer, "bias", None) is None else layer.base_layer.bias.detach().numpy().copy())
             for path, layer in layers.items()}

    model.merge_adapter()

    for path, layer in layers.items():
        parts = {f"ln_tuning_layers.{k}": v for k, v in trained[path].items()}
        w, b = METHOD.merged_weight(config, path, *bases[path], parts, {})
        assert isinstance(w, np.ndarray)
        assert np.abs(w - layer.base_layer.weight.detach().numpy()).max() == 0.0
        assert np.abs(w - bases[path][0]).max() > 1e-3
        if b is not None:
            assert np.abs(b - layer.base_layer.bias.detach().numpy()).max() == 0.0


def test_two_active_adapters_are_refused_as_in_peft():
    model = _ours("ln_tuning-llama")
    model.add_adapter("other", LNTuningConfig(**CASES["ln_tuning-llama"]["kwargs"]))
    model.set_adapter(["default", "other"])

    with pytest.raises(OnnxPeftError, match="one adapter at a time"):
        run(model, token_ids())


def test_switching_adapters_runs_each_copy():
    model = _ours("ln_tuning-gpt2", seed=0)
    model.add_adapter("other", LNTuningConfig(**CASES["ln_tuning-gpt2"]["kwargs"]))
    perturb_trainable(model, seed=4, select=(".other.",))
    x = token_ids()
    first = run(model, x)
    model.set_adapter("other")

    assert max_diff(run(model, x), first) > 1e-3
    model.set_adapter("default")
    assert max_diff(run(model, x), first) == 0.0


# -- (c) training ------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_training_lowers_the_loss_and_changes_only_the_norm_copies(case):
    torch.manual_seed(0)
    model = _ours(case).train()
    before = snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)

    losses = train_steps(model, token_ids(batch=4, seq=8), optimizer, steps=6)

    changed = changed_since(model, before)
    assert losses[-1] < losses[0] - 1e-3
    assert changed == {k for k in before if ".ln_tuning_layers." in k}


# -- (d) errors --------------------------------------------------------------------------------
def test_unsupported_module_type_raises_naming_module_and_types():
    with pytest.raises(AdapterConfigError, match=r"model\.layers\.0\.self_attn\.q_proj \(Linear\).*LN Tuning.*LayerNorm"):
        onnx_peft.get_peft_model(tiny_llama(), LNTuningConfig(target_modules=["q_proj"]))


@pytest.mark.parametrize("value", [3, {"a": 1}])
def test_bad_config_field_raises_naming_it(value):
    with pytest.raises(AdapterConfigError, match="LNTuningConfig.target_modules"):
        LNTuningConfig(target_modules=value)


def test_checkpoint_for_another_width_is_refused():
    with pytest.raises(IncompatibleAdapterError, match="model.norm.*size 16.*32 features"):
        METHOD.slot_tensors(LNTuningConfig(target_modules=["norm"]), "model.norm",
                            {"ln_tuning_layers.weight": np.ones(16, np.float32)}, {}, lambda: np.ones((1, 32)))


# -- (e) slot tensors --------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
def test_norm_slots_are_exact_against_the_peft_layer(case):
    model = _peft(case, seed=3)
    path, layer = next((n, m) for n, m in model.base_model.model.named_modules() if type(m).__name__ == "LNTuningLayer")
    base = layer.base_layer
    copy_ = layer.ln_tuning_layers["default"]
    parts = {f"ln_tuning_layers.{k}": v.detach().numpy() for k, v in copy_.named_parameters()}
    affine = np.stack([p.detach().numpy() for p in base.parameters()])  # [scale, shift?]
    x = np.random.default_rng(0).standard_normal((2, 5, 32)).astype(np.float32)

    slots = METHOD.slot_tensors(model.peft_config["default"], path, parts, {}, lambda: affine)["norm"]

    eps = getattr(base, "eps", getattr(base, "variance_epsilon", None))
    if len(affine) == 1:  # RMSNorm: x / rms(x) * (w + dw)
        x_hat = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
        expected = x_hat * (affine[0] + slots["ln_delta.weight"])
    else:                 # LayerNorm: (x - mean) / std * (w + dw) + (b + db)
        x_hat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
        expected = x_hat * (affine[0] + slots["ln_delta.weight"]) + affine[1] + slots["ln_delta.bias"]
    with torch.no_grad():
        actual = layer(torch.from_numpy(x)).numpy()
    assert np.abs(expected - actual).max() <= TOL
    assert np.abs(actual - base(torch.from_numpy(x)).detach().numpy()).max() > 1e-3


# -- (f) the norm form on its own site ---------------------------------------------------------
def _norm_model(kind: str) -> ir.Model:
    """x [b, s, H] -> LayerNormalization(x, w, b) | x * rsqrt(mean(x^2) + eps) * w -> y; module "ln"."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((1 + 0.1 * rng.standard_normal(H)).astype(np.float32), "ln.weight"),
             numpy_helper.from_array((0.1 * rng.standard_normal(H)).astype(np.float32), "ln.bias"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps")]
    if kind == "layernorm":
        nodes = [helper.make_node("LayerNormalization", ["x", "ln.weight", "ln.bias"], ["y"], name="/ln/LayerNorm",
                                  epsilon=1e-5)]
    else:
        nodes = [helper.make_node("Mul", ["x", "x"], ["sq"]),
                 helper.make_node("ReduceMean", ["sq", "axes"], ["ms"]),
                 helper.make_node("Add", ["ms", "eps"], ["mse"]),
                 helper.make_node("Sqrt", ["mse"], ["rms"]),
                 helper.make_node("Reciprocal", ["rms"], ["inv"]),
                 helper.make_node("Mul", ["x", "inv"], ["x_hat"]),
                 helper.make_node("Mul", ["ln.weight", "x_hat"], ["y"], name="/ln/Mul_1")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", H])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", H])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 9
    return ir.from_proto(proto)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array, np.float32), name=name))
    graph.register_initializer(value)
    return value


def _reference(kind: str, x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    if kind == "layernorm":
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * w + b
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6) * w


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_form_plain_and_per_row_on_a_norm_site_and_ungraft_restores_it(kind):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, H)).astype(np.float32)
    model = _norm_model(kind)
    base = _run(model, x)
    w, b = (model.graph.initializers[n].const_value.numpy() for n in ("ln.weight", "ln.bias"))
    site = find_norm_sites(model)["ln"]
    assert site.fused == (kind == "layernorm") and (site.bias is not None) == (kind == "layernorm")
    delta = {"ln_delta.weight": 0.3 * rng.standard_normal(H)}
    if kind == "layernorm":
        delta["ln_delta.bias"] = 0.3 * rng.standard_normal(H)
    shift = delta.get("ln_delta.bias", 0.0)
    expected = _reference(kind, x, w + delta["ln_delta.weight"], b + shift)

    graft(model.graph, site, [(FORMS["norm"], {k: _const(model.graph, f"ln.{k}", v) for k, v in delta.items()})])
    assert np.abs(_run(model, x) - expected).max() <= TOL
    assert ungraft(model.graph, "ln") > 0
    np.testing.assert_array_equal(_run(model, x), base)

    rows = {k: _const(model.graph, f"ln.{k}.rows", np.stack([default_array(v.shape, "zeros", np.float32), v]))
            for k, v in delta.items()}
    graft(model.graph, find_norm_sites(model)["ln"], [(FORMS["norm"], rows)], batched=True)
    out = _run(model, x)
    assert np.abs(out[0] - base[0]).max() <= TOL  # row 0: the no-op default
    assert np.abs(out[1] - expected[1]).max() <= TOL
    assert any(n.metadata_props.get(BRANCH_KEY) == "ln" for n in model.graph)


def test_target_modules_default_as_peft():
    import peft

    theirs = peft.get_peft_model(tiny_llama(), peft.LNTuningConfig())
    ours = onnx_peft.get_peft_model(tiny_llama(), onnx_peft.LNTuningConfig())
    assert sorted(ours.peft_config["default"].target_modules) == sorted(theirs.peft_config["default"].target_modules)
