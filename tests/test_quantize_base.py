"""QuantizeBase: a 4-bit ONNX base (MatMulBnb4 nf4/fp4, MatMulNBits int4) equals PyTorch with the
same dequantized weights, and adapters insert, swap and merge on top of it.

One tiny Llama (hidden 32) is exported once per module; block sizes divide every Linear.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from tiny_models import tiny_llama  # noqa: E402

from onnx_peft import export  # noqa: E402
from onnx_peft.graph.branch import BRANCH_KEY  # noqa: E402
from onnx_peft.graph.contract import read_contract  # noqa: E402
from onnx_peft.graph.io import load_model, save_model  # noqa: E402
from onnx_peft.graph.modules import find_linear_sites  # noqa: E402
from onnx_peft.passes.insert_adapters import insert_adapters  # noqa: E402
from onnx_peft.passes.merge_adapters import MergeAdapters  # noqa: E402
from onnx_peft.passes.quantize_base import QUANTIZATION_KEY, QuantizeBase  # noqa: E402
from onnx_peft.quant.formats import QuantizationError, dequantize_4bit, quantize_4bit  # noqa: E402
from onnx_peft.runtime import AdapterSession  # noqa: E402

TOL = 1e-4
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    folder = tmp_path_factory.mktemp("quantize_base")
    base = tiny_llama()
    base.save_pretrained(folder / "base")
    export(folder / "base", folder / "onnx", task="causal-lm", quiet=True)
    torch.manual_seed(3)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                init_lora_weights=False))
    peft_model.save_pretrained(str(folder / "adapter"))
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 7)).astype(np.int64)
    return {"folder": folder, "onnx": folder / "onnx" / "model.onnx", "ids": ids, "base": base}


def _quantize(case, name: str, quantize: QuantizeBase, source=None):
    model = load_model(source or case["onnx"])
    result = quantize(model)
    return save_model(result.model, case["folder"] / name / "model.onnx"), result


def _dequantized(path) -> dict[str, np.ndarray]:
    """{module: W [out, in]} of every 4-bit Linear, read back from the graph."""
    return {m: np.array(s.weight_out_in()) for m, s in find_linear_sites(load_model(path)).items()
            if s.quantized is not None}


def _torch_logits(case, weights: dict[str, np.ndarray], adapter: bool = False) -> np.ndarray:
    model = copy.deepcopy(case["base"])
    modules = dict(model.named_modules())
    with torch.no_grad():
        for module, weight in weights.items():
            modules[module].weight.copy_(torch.from_numpy(weight))
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(case["folder"] / "adapter")).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(case["ids"]),
                     attention_mask=torch.ones(case["ids"].shape, dtype=torch.long)).logits.numpy()


def _ort_logits(path, ids, adapter_file=None) -> np.ndarray:
    session = AdapterSession(path)
    if adapter_file is not None:
        session.load_adapter("a", adapter_file)
    return session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)},
                       adapter="a" if adapter_file else None)[0]


def _ops(path) -> list[str]:
    return [node.op_type for node in load_model(path).graph]


@pytest.mark.parametrize("quant_type,block_size,double_quant",
                         [("nf4", 32, False), ("fp4", 64, True), ("int4", 32, False)])
def test_quantized_base_equals_torch_with_dequantized_weights(case, quant_type, block_size, double_quant):
    path, result = _quantize(case, f"q_{quant_type}", QuantizeBase(quant_type, block_size, double_quant))

    ops = _ops(path)
    op = "MatMulNBits" if quant_type == "int4" else "MatMulBnb4"
    assert result.modified and ops.count(op) == 14          # 7 Linears x 2 layers; lm_head skipped
    assert json.loads(load_model(path).metadata_props[QUANTIZATION_KEY])["quant_type"] == quant_type
    weights = _dequantized(path)
    assert sorted(weights) == sorted(m for m in dict(case["base"].named_modules()) if "layers." in m
                                     and m.endswith("_proj"))
    if quant_type != "int4":  # the codes bitsandbytes would write, bit for bit
        w = case["base"].model.layers[1].mlp.down_proj.weight.detach().numpy()
        expected = dequantize_4bit(quantize_4bit(w, quant_type, block_size, double_quant))
        assert np.array_equal(weights["model.layers.1.mlp.down_proj"], expected)
    assert np.abs(_ort_logits(path, case["ids"]) - _torch_logits(case, weights)).max() <= TOL


def test_from_states_writes_given_codes_exactly(case):
    layer = case["base"].model.layers[0]
    states = {"model.layers.0.self_attn.q_proj": quantize_4bit(layer.self_attn.q_proj.weight.detach().numpy(),
                                                                "nf4", 64, double_quant=True),
              "model.layers.0.mlp.up_proj": quantize_4bit(layer.mlp.up_proj.weight.detach().numpy(), "fp4", 32)}
    path, _ = _quantize(case, "from_states", QuantizeBase.from_states(states))

    model = load_model(path)
    for module, state in states.items():
        packed = model.graph.initializers[f"{module}.weight.q4"].const_value.numpy()
        assert np.array_equal(packed, state.packed)
    weights = _dequantized(path)
    assert sorted(weights) == sorted(states)
    assert all(np.array_equal(weights[m], dequantize_4bit(s)) for m, s in states.items())
    assert np.abs(_ort_logits(path, case["ids"]) - _torch_logits(case, weights)).max() <= TOL


def test_lora_inserted_on_4bit_base_swaps_like_peft(case):
    q_path, _ = _quantize(case, "q_insert", QuantizeBase("nf4", 32))
    out = insert_adapters(q_path, {"a": case["folder"] / "adapter"}, case["folder"] / "q_insert_slots")
    weights = _dequantized(out)

    assert _ops(out).count("MatMulBnb4") == 14
    with_adapter = _ort_logits(out, case["ids"], out.parent / "adapters" / "a.onnx_adapter")
    assert np.abs(with_adapter - _torch_logits(case, weights, adapter=True)).max() <= TOL
    assert np.abs(_ort_logits(out, case["ids"]) - _torch_logits(case, weights)).max() <= TOL


def test_quantizing_a_slot_model_keeps_slots_and_branches_float(case):
    slots = insert_adapters(case["onnx"], {"a": case["folder"] / "adapter"}, case["folder"] / "float_slots")
    before = load_model(slots)
    branch_nodes = sum(BRANCH_KEY in n.metadata_props for n in before.graph)
    path, _ = _quantize(case, "q_slots", QuantizeBase("int4", 32), source=slots)

    model = load_model(path)
    assert sum(BRANCH_KEY in n.metadata_props and n.op_type != "MatMulNBits" for n in model.graph) == branch_nodes
    assert read_contract(model.metadata_props).slots == read_contract(before.metadata_props).slots
    weights = _dequantized(path)
    with_adapter = _ort_logits(path, case["ids"], slots.parent / "adapters" / "a.onnx_adapter")
    assert np.abs(with_adapter - _torch_logits(case, weights, adapter=True)).max() <= TOL


@pytest.mark.parametrize("quant_type", ["nf4", "int4"])
def test_merge_onto_4bit_base_requantizes_and_reports_error(case, quant_type):
    q_path, _ = _quantize(case, f"q_merge_{quant_type}", QuantizeBase(quant_type, 32))
    base_weights = _dequantized(q_path)
    model = load_model(q_path)
    merge = MergeAdapters(adapter_dir=case["folder"] / "adapter")
    merge(model)
    out = save_model(model, case["folder"] / f"merged_{quant_type}" / "model.onnx")

    merged_modules = {m for m in base_weights if m.rsplit(".", 1)[-1] in TARGETS}
    assert set(merge.requantization_errors) == merged_modules
    assert all(0 < e < 0.1 for e in merge.requantization_errors.values())
    assert _ops(out).count("MatMulNBits" if quant_type == "int4" else "MatMulBnb4") == 14
    merged = _dequantized(out)
    # the reported error is exactly what requantizing added to dequantized base + LoRA delta
    float_merge = _torch_weights_with_lora(case, base_weights)
    for module in merged_modules:
        added = np.abs(merged[module] - float_merge[module]).max()
        assert added == pytest.approx(merge.requantization_errors[module], rel=1e-5, abs=1e-7)
    assert np.abs(_ort_logits(out, case["ids"]) - _torch_logits(case, merged)).max() <= TOL


def _torch_weights_with_lora(case, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PEFT's own merge of the adapter into the dequantized base, per module [out, in]."""
    from peft import PeftModel

    model = copy.deepcopy(case["base"])
    modules = dict(model.named_modules())
    with torch.no_grad():
        for module, weight in weights.items():
            modules[module].weight.copy_(torch.from_numpy(weight))
    merged = PeftModel.from_pretrained(model, str(case["folder"] / "adapter")).merge_and_unload()
    modules = dict(merged.named_modules())
    return {m: modules[m].weight.detach().numpy() for m in weights}


def test_bad_options_and_states_fail_clearly(case):
    with pytest.raises(QuantizationError, match="unknown quant type 'int3'"):
        QuantizeBase("int3")
    with pytest.raises(QuantizationError, match="power-of-two block size"):
        QuantizeBase("int4", 24)
    with pytest.raises(QuantizationError, match="model.layers.0.self_attn.q_proj: block size 4096 does not divide"):
        QuantizeBase("nf4", 4096)(load_model(case["onnx"]))
    state = quantize_4bit(np.zeros((32, 32), np.float32), "nf4", 64)
    with pytest.raises(QuantizationError, match="model.layers.9.mlp.gate_proj matches no Linear"):
        QuantizeBase.from_states({"model.layers.9.mlp.gate_proj": state})(load_model(case["onnx"]))
    with pytest.raises(QuantizationError, match="up_proj: its 4-bit state has shape"):
        QuantizeBase.from_states({"model.layers.0.mlp.up_proj": state})(load_model(case["onnx"]))


def test_second_run_reports_not_modified(case):
    model = load_model(case["onnx"])
    assert QuantizeBase("nf4", 32)(model).modified
    assert not QuantizeBase("nf4", 32, strict=False)(model).modified
    assert isinstance(model, ir.Model)


def test_cli_export_quantize_inputs_mode_swaps_adapter_on_4bit_base(case):
    from onnx_peft.cli import main

    out = case["folder"] / "cli_q"
    assert main(["--quiet", "export", str(case["folder"] / "base"), "-o", str(out), "--task", "causal-lm",
                 "--adapter", f"a={case['folder'] / 'adapter'}", "--mode", "inputs",
                 "--quantize", "nf4", "--block-size", "32", "--double-quant"]) == 0

    path = out / "model.onnx"
    assert _ops(path).count("MatMulBnb4") == 14
    info = json.loads((out / "export_info.json").read_text())
    assert info["quantize"] == {"quant_type": "nf4", "block_size": 32, "double_quant": True}
    weights = _dequantized(path)
    w = case["base"].model.layers[0].self_attn.v_proj.weight.detach().numpy()
    assert np.array_equal(weights["model.layers.0.self_attn.v_proj"],
                          dequantize_4bit(quantize_4bit(w, "nf4", 32, double_quant=True)))
    with_adapter = _ort_logits(path, case["ids"], out / "adapters" / "a.onnx_adapter")
    assert np.abs(with_adapter - _torch_logits(case, weights, adapter=True)).max() <= TOL
    assert np.abs(_ort_logits(path, case["ids"]) - _torch_logits(case, weights)).max() <= TOL


def test_export_rejects_bad_quantize_options_before_loading(case):
    with pytest.raises(QuantizationError, match="unknown quant type 'nf5'"):
        export(case["folder"] / "missing", case["folder"] / "never", quantize="nf5")
