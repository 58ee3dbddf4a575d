"""graph/modules.py + graph/sites.py: Linear sites and adapter branches found by structure."""

import onnx_ir as ir
import pytest
from helpers_onnx import case

from onnx_peft.graph.io import load_model
from onnx_peft.graph.modules import find_linear_sites, module_path_of, normalize_module_path
from onnx_peft.graph.sites import find_adapter_branches

LLAMA_TARGETS = {f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.v_proj",
                                                                        "mlp.down_proj")}


@pytest.mark.parametrize("kind, targets, method, layouts", [
    ("llama_dyn", LLAMA_TARGETS, "lora", ("in_r", "r_out")),
    ("llama_dyn_noopt", LLAMA_TARGETS, "lora", ("r_in", "out_r")),
    ("gpt2_dyn", {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")}, "lora",
     ("in_r", "r_out")),
    ("stack_ts", {"fc1", "fc2", "fc3"}, "lora", ("in_r", "r_out")),
    ("stack2d_ts", {"fc1", "fc2", "fc3"}, "lora", ("in_r", "r_out")),
    ("bert_dora_ts", None, "dora", ("in_r", "r_out")),
    ("bert_dora_dyn", None, "dora", ("in_r", "r_out")),
])
def test_branches_found_by_structure(kind, targets, method, layouts):
    model = load_model(case(kind).path)
    branches = find_adapter_branches(model)
    if targets is None:  # BERT: query, value and the three "dense" layers of each of 2 layers
        assert len(branches) == 10 and all(m.startswith("encoder.layer.") for m in branches)
    else:
        assert set(branches) == targets
    for _module, branch in branches.items():
        assert branch.method == method
        assert (branch.lora_A_layout, branch.lora_B_layout) == layouts
        assert branch.scale == pytest.approx(2.0 if kind != "gpt2_dyn" else 4.0)
        assert branch.a_matrix().shape == (4, branch.base.in_features)
        assert branch.b_matrix().shape == (branch.base.out_features, 4)
        assert branch.add in branch.nodes and branch.base.node not in branch.nodes


def test_linear_sites_skip_adapter_matmuls_and_name_modules():
    sites = find_linear_sites(load_model(case("llama_dyn").path))
    assert len(sites) == 15  # 7 projections x 2 layers + lm_head
    q = sites["model.layers.0.self_attn.q_proj"]
    assert (q.in_features, q.out_features, q.weight_layout) == (32, 32, "in_out")
    assert sites["model.layers.0.self_attn.k_proj"].out_features == 16
    assert not any("lora" in m for m in sites)
    assert set(find_linear_sites(load_model(case("stack_ts").path))) == {"fc1", "fc2", "fc3"}


def test_gemm_sites_and_bias_outputs():
    sites = find_linear_sites(load_model(case("stack2d_ts").path))
    assert sites["fc1"].node.op_type == "Gemm" and sites["fc1"].weight_layout == "out_in"
    assert sites["fc1"].bias is not None and sites["fc2"].bias is None
    sites3 = find_linear_sites(load_model(case("stack_ts").path))
    assert sites3["fc1"].output.producer().op_type == "Add"  # MatMul + bias Add


def test_names_are_hints_in_trust_order():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 4] x) => (float[2, 3] y) <float[4, 3] w = {0,0,0,0,0,0,0,0,0,0,0,0}> {
        y = MatMul(x, w)
    }"""
    model = ir.from_onnx_text(text)
    node = model.graph.node(0)
    weight = model.graph.initializers["w"]
    node.name = "/model/layers.0/mlp/up_proj/MatMul"
    assert module_path_of(node, weight) == "model.layers.0.mlp.up_proj"
    weight.name = "base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"
    assert module_path_of(node, weight) == "model.layers.0.mlp.up_proj"
    node.metadata_props["pkg.torch.onnx.name_scopes"] = "['', 'base_model.model.model.layers.1.mlp.gate_proj', 'linear']"
    assert module_path_of(node, weight) == "model.layers.1.mlp.gate_proj"
    assert normalize_module_path("m.base_model.model.x.q.lora_A.default") == "x.q.lora_A"


def test_plain_model_has_no_branches():
    assert find_adapter_branches(load_model(case("llama_dyn").base_path)) == {}
