"""The method seam itself: the registry, the branch forms (plain and per row, exact no-op
defaults), graft/ungraft, and the errors a wrong adapter gets."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnx_peft
from onnx_peft.config import AdapterConfig
from onnx_peft.convert import PeftAdapter
from onnx_peft.errors import AdapterConfigError, CheckpointError, IncompatibleAdapterError
from onnx_peft.graph.branch import BRANCH_KEY, graft, ungraft
from onnx_peft.graph.modules import find_linear_sites
from onnx_peft.methods.base import all_methods, method_for
from onnx_peft.methods.forms import FORMS, default_array

IN, OUT = 8, 6
PEFT_CONFIG_NAMES = {"LoraConfig", "IA3Config", "LoHaConfig", "LoKrConfig", "OFTConfig", "BOFTConfig", "HRAConfig",
                     "VeraConfig", "AdaLoraConfig", "FourierFTConfig", "MissConfig", "BoneConfig"}


def test_every_method_is_registered_under_peft_names_and_importable_from_the_package():
    names = {m.config_class.__name__ for m in all_methods().values()}
    assert PEFT_CONFIG_NAMES <= names
    for name in PEFT_CONFIG_NAMES:
        config_class = getattr(onnx_peft, name)
        assert method_for(config_class.peft_type).config_class is config_class


def test_unknown_method_names_the_supported_ones():
    with pytest.raises(AdapterConfigError, match="NOT_A_METHOD.*supports:.*IA3.*LORA"):
        AdapterConfig.from_dict({"peft_type": "NOT_A_METHOD"})


def _linear_model(bias: bool) -> ir.Model:
    """x [b, s, IN] -> MatMul(fc.weight [IN, OUT]) (+ fc.bias) -> y; the module is "fc"."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((IN, OUT)).astype(np.float32), "fc.weight")]
    nodes = [helper.make_node("MatMul", ["x", "fc.weight"], ["h" if bias else "y"])]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(OUT).astype(np.float32), "fc.bias"))
        nodes.append(helper.make_node("Add", ["h", "fc.bias"], ["y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", IN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", OUT])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 9
    return ir.from_proto(proto)


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], feeds)[0]


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array, np.float32), name=name))
    graph.register_initializer(value)
    return value


def _example(form: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"lora": {"lora_A.weight": rng.standard_normal((IN, 3)), "lora_B.weight": rng.standard_normal((3, OUT))},
            "dense": {"delta.weight": rng.standard_normal((IN, OUT))},
            "dora": {"dora_factor": 1 + rng.random(OUT)},
            "ia3_out": {"ia3_l.out": rng.random(OUT)}, "ia3_in": {"ia3_l.in": rng.random(IN)},
            "rotate_in": {"rotation.weight": rng.standard_normal((2, 4, 4))},
            "rotate_out": {"rotate_out.cos": rng.standard_normal((3, 2)), "rotate_out.sin": rng.standard_normal((3, 2))},
            }[form]


def _reference(form: str, t: dict[str, np.ndarray], x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Each form's math in numpy, straight from the forms table."""
    if form == "ia3_in":
        return (x * t["ia3_l.in"]) @ w + b
    if form == "rotate_in":
        r = t["rotation.weight"]
        rotated = np.einsum("...nk,nkc->...nc", x.reshape(*x.shape[:-1], 2, 4), r).reshape(x.shape)
        return rotated @ w + b
    y = x @ w + b
    if form == "rotate_out":  # groups of 2: each output pairs with its neighbour
        pairs = y.reshape(*y.shape[:-1], 3, 2, 1)
        cos, sin = (t[k].reshape(3, 2, 1) for k in ("rotate_out.cos", "rotate_out.sin"))
        return (pairs * cos + pairs[..., ::-1, :] * sin).reshape(y.shape)
    if form == "lora":
        return y + (x @ t["lora_A.weight"]) @ t["lora_B.weight"]
    if form == "dense":
        return y + x @ t["delta.weight"]
    if form == "dora":
        return (y - b) * t["dora_factor"] + b
    return y * t["ia3_l.out"]


LINEAR_FORMS = sorted(f for f in FORMS if FORMS[f].site_kinds == ("linear",))  # norm/tokens: their own tests


@pytest.mark.parametrize("form", LINEAR_FORMS)
def test_each_form_computes_its_math_and_ungraft_restores_the_base(form):
    rng = np.random.default_rng(1)
    model = _linear_model(bias=True)
    x = rng.standard_normal((2, 5, IN)).astype(np.float32)
    base = _run(model, {"x": x})
    graph = model.graph
    w, b = (graph.initializers[n].const_value.numpy() for n in ("fc.weight", "fc.bias"))
    tensors = _example(form, rng)
    site = find_linear_sites(model)["fc"]
    graft(graph, site, [(FORMS[form], {k: _const(graph, f"fc.{k}", v) for k, v in tensors.items()})])
    assert sum(n.metadata_props.get(BRANCH_KEY) == "fc" for n in graph) == len(graph) - 2  # all but the base
    expected = _reference(form, {k: v.astype(np.float32) for k, v in tensors.items()}, x, w, b)
    assert np.abs(_run(model, {"x": x}) - expected).max() <= 1e-5
    assert ungraft(graph, "fc") > 0
    assert [n.op_type for n in graph] == ["MatMul", "Add"]
    np.testing.assert_array_equal(_run(model, {"x": x}), base)


@pytest.mark.parametrize("form", [f for f in LINEAR_FORMS if FORMS[f].per_row])
def test_per_row_form_gives_each_row_its_own_slot_values_and_defaults_are_no_ops(form):
    rng = np.random.default_rng(2)
    model = _linear_model(bias=True)
    graph = model.graph
    w, b = (graph.initializers[n].const_value.numpy() for n in ("fc.weight", "fc.bias"))
    tensors = _example(form, rng)
    specs = FORMS[form].slot_specs("fc", IN, OUT, tensors)
    values = {}
    for spec in specs:
        fixed = tuple(tensors[spec.suffix].shape)
        no_op = default_array(tuple(d if isinstance(d, int) else fixed[i] for i, d in enumerate(spec.shape)),
                              spec.default, np.float32)
        rows = np.stack([no_op, tensors[spec.suffix].astype(np.float32)])  # row 0: the default
        values[spec.suffix] = _const(graph, f"fc.{spec.suffix}.rows", rows)
    site = find_linear_sites(model)["fc"]
    graft(graph, site, [(FORMS[form], values)], batched=True)
    x = rng.standard_normal((2, 5, IN)).astype(np.float32)
    out = _run(model, {"x": x})
    assert np.abs(out[0] - (x[0] @ w + b)).max() <= 1e-5  # the default row is the base
    expected = _reference(form, {k: v.astype(np.float32) for k, v in tensors.items()}, x[1:], w, b)
    assert np.abs(out[1:] - expected).max() <= 1e-5


def test_stray_and_missing_checkpoint_keys_are_named(tmp_path):
    config = onnx_peft.IA3Config(target_modules=["q"], feedforward_modules=[])
    method = method_for(config)
    with pytest.raises(IncompatibleAdapterError, match="'base_model.model.q.lora_A.weight'"):
        method.group({"base_model.model.q.ia3_l": np.ones((4, 1)), "base_model.model.q.lora_A.weight": np.ones((2, 4))})
    lora = method_for("LORA")
    with pytest.raises(CheckpointError, match="module q has no lora_B.weight"):
        lora.group({"base_model.model.q.lora_A.weight": np.ones((2, 4))})


def test_adapter_trained_on_another_layer_size_is_refused_before_grafting(tmp_path):
    from onnx_peft.passes.insert_adapters import InsertAdapters

    config = onnx_peft.LoraConfig(r=2, target_modules=["fc"])
    adapter = PeftAdapter.from_tensors("a", "adapter 'a'", config, {
        "base_model.model.fc.lora_A.weight": np.ones((2, IN + 1), np.float32),
        "base_model.model.fc.lora_B.weight": np.ones((OUT, 2), np.float32)})
    model = _linear_model(bias=False)
    with pytest.raises(IncompatibleAdapterError, match=f"module fc was trained on a {IN + 1} -> {OUT} layer"):
        InsertAdapters({"a": adapter})(model)
    assert not any(n.metadata_props.get(BRANCH_KEY) for n in model.graph)
    assert json.loads(json.dumps(config.to_dict()))["peft_type"] == "LORA"
