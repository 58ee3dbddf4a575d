"""passes/extract_adapters.py: adapters become optional slot inputs; ORT == PyTorch."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers_onnx import TOL, case, file_hashes, max_diff, run_onnx

from onnx_peft.cli import main
from onnx_peft.errors import NoAdapterSitesError, UnsafePathError
from onnx_peft.formats import load_adapter_file
from onnx_peft.graph.contract import read_contract
from onnx_peft.graph.io import load_model
from onnx_peft.graph.sites import find_adapter_branches
from onnx_peft.passes import ExtractAdapters, extract_adapters


@pytest.mark.parametrize("kind", ["llama_dyn", "llama_dyn_noopt", "gpt2_dyn", "stack_ts", "stack2d_ts",
                                  "bert_dora_ts", "bert_dora_dyn"])
def test_extracted_model_runs_as_adapter_and_as_base(kind, tmp_path):
    c = case(kind)
    before = file_hashes(c.path.parent)
    model_path, adapter_path = extract_adapters(c.path, tmp_path, save_format="npz")
    onnx.checker.check_model(str(model_path))
    tensors, fingerprint = load_adapter_file(adapter_path)
    assert max_diff(run_onnx(model_path, {**c.feeds, **tensors}), c.adapted) <= TOL
    assert max_diff(run_onnx(model_path, c.feeds), c.base) <= TOL
    contract = read_contract(load_model(model_path).metadata_props)
    assert contract.fingerprint == fingerprint and {s.name for s in contract.slots} == set(tensors)
    assert file_hashes(c.path.parent) == before


def test_slot_layout_and_graph_shape():
    c = case("llama_dyn")
    model = load_model(c.path)
    extract = ExtractAdapters()
    assert extract(model).modified
    name = "model.layers.0.self_attn.q_proj.lora_A.weight"
    inputs = {v.name: v for v in model.graph.inputs}
    assert [str(d) for d in inputs[name].shape] == ["32", "lora_r"]
    assert [str(d) for d in inputs[name.replace("lora_A", "lora_B")].shape] == ["lora_r", "32"]
    assert model.graph.initializers[name].const_value.shape == (32, 0)  # zero-rank default
    np.testing.assert_array_equal(extract.tensors[name].shape, (32, 4))
    assert not any(n.op_type in ("Transpose", "Mul") and "lora" in (n.name or "") for n in model.graph)
    branches = find_adapter_branches(model)  # the extracted form is still found, as inputs
    assert len(branches) == 6 and all(b.is_input for b in branches.values())


def test_dora_factor_slot_defaults_to_ones():
    model = load_model(case("bert_dora_dyn").path)
    extract = ExtractAdapters()
    extract(model)
    slot = "encoder.layer.0.attention.self.query.dora_factor"
    assert extract.contract.slot_map()[slot].method == "dora"
    np.testing.assert_array_equal(model.graph.initializers[slot].const_value.numpy(), np.ones(32, np.float32))


def test_onnx_adapter_file_works_with_ort_lora_adapter(tmp_path):
    c = case("stack_ts")
    model_path, adapter_path = extract_adapters(c.path, tmp_path)
    assert adapter_path.suffix == ".onnx_adapter"
    adapter = ort.LoraAdapter()
    adapter.Load(str(adapter_path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    assert max_diff(session.run(None, c.feeds, options)[0], c.adapted) <= TOL


def test_required_inputs_and_initializer_mode(tmp_path):
    c = case("stack_ts")
    model_path, adapter_path = extract_adapters(c.path, tmp_path / "req", optional_inputs=False, save_format="npz")
    model = onnx.load(str(model_path), load_external_data=False)
    assert "fc1.lora_A.weight" not in {i.name for i in model.graph.initializer}
    tensors, _ = load_adapter_file(adapter_path)
    assert max_diff(run_onnx(model_path, {**c.feeds, **tensors}), c.adapted) <= TOL
    model_path, _ = extract_adapters(c.path, tmp_path / "ext", make_inputs=False, external=True,
                                     save_format="safetensors")
    assert max_diff(run_onnx(model_path, c.feeds), c.adapted) <= TOL


def test_bad_inputs(tmp_path):
    c = case("stack_ts")
    with pytest.raises(NoAdapterSitesError):
        extract_adapters(c.base_path, tmp_path)
    with pytest.raises(UnsafePathError):
        extract_adapters(c.path, c.path.parent)


def test_cli_extract(tmp_path):
    c = case("stack_ts")
    assert main(["--quiet", "extract", str(c.path), "-o", str(tmp_path), "--format", "safetensors"]) == 0
    tensors, _ = load_adapter_file(tmp_path / "model.safetensors")
    assert max_diff(run_onnx(tmp_path / "model.onnx", {**c.feeds, **tensors}), c.adapted) <= TOL
    assert main(["--quiet", "extract", str(c.base_path), "-o", str(tmp_path / "b")]) == 1
