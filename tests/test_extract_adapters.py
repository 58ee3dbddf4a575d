"""passes/extract_adapters.py: adapters become optional slot inputs (plain or packed) or
external initializers; ORT == PyTorch."""

import copy
import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import peft
import pytest
import torch
from helpers_onnx import TOL, Stack, case, file_hashes, max_diff, run_onnx

from onnx_peft.cli import main
from onnx_peft.errors import (
    IncompatibleAdapterError,
    NoAdapterSitesError,
    OnnxPeftError,
    UnsafePathError,
)
from onnx_peft.formats import load_adapter_file
from onnx_peft.graph.contract import rank_dim, read_contract
from onnx_peft.graph.io import load_model
from onnx_peft.graph.sites import find_adapter_branches
from onnx_peft.passes import ExtractAdapters, extract_adapters
from onnx_peft.passes.extract_adapters import (
    EXTERNAL_KEY,
    adapter_data_name,
    pack_adapter_tensors,
    read_packing,
    unpack_adapter_tensors,
)

PACKED = ("packed_adapters.float32", "packed_adapters.float32.sizes")


@pytest.fixture(scope="module")
def rank_pattern(tmp_path_factory):
    """Stack with rank_pattern (fc1 r=2, fc2 r=4, fc3 r=6), TorchScript export; references for the
    full adapter and for fc1 + fc3 only (fc2's B zeroed = fc2 not adapted)."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "fc3"],
                             rank_pattern={"fc1": 2, "fc3": 6}, init_lora_weights=False)
    model = peft.get_peft_model(Stack(), config).eval()
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(1))
    path = tmp_path_factory.mktemp("rank_pattern") / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["out"])
    with torch.no_grad():
        full = model(x).numpy()
        without_fc2 = copy.deepcopy(model)
        without_fc2.base_model.model.fc2.lora_B["default"].weight.zero_()
        partial = without_fc2(x).numpy()
    return path, {"x": x.numpy()}, full, partial


def _input_dims(model_path):
    model = onnx.load(str(model_path), load_external_data=False)
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


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
    rank = "lora_r.model.layers.0.self_attn.q_proj"
    assert [str(d) for d in inputs[name].shape] == ["32", rank]
    assert [str(d) for d in inputs[name.replace("lora_A", "lora_B")].shape] == [rank, "32"]
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


def test_each_module_has_its_own_rank_dim_so_mixed_ranks_run(rank_pattern, tmp_path):
    path, feeds, full, partial = rank_pattern
    model_path, adapter_path = extract_adapters(path, tmp_path, save_format="npz")
    onnx.checker.check_model(str(model_path))
    dims = _input_dims(model_path)
    assert dims["fc1.lora_A.weight"] == [16, rank_dim("fc1")] and dims["fc3.lora_B.weight"] == [rank_dim("fc3"), 8]
    tensors, _ = load_adapter_file(adapter_path)
    assert [tensors[f"fc{i}.lora_A.weight"].shape[1] for i in (1, 2, 3)] == [2, 4, 6]
    assert max_diff(run_onnx(model_path, {**feeds, **tensors}), full) <= TOL
    # fc2 left at its rank-0 default while fc1/fc3 run ranks 2/6: one shared lora_r crashed ORT here
    without_fc2 = {n: t for n, t in tensors.items() if not n.startswith("fc2.")}
    assert max_diff(run_onnx(model_path, {**feeds, **without_fc2}), partial) <= TOL


@pytest.mark.parametrize("kind", ["llama_dyn", "bert_dora_ts"])
def test_packed_inputs_run_as_adapter_and_as_base(kind, tmp_path):
    c = case(kind)
    model_path, adapter_path = extract_adapters(c.path, tmp_path, pack_inputs=True, save_format="npz")
    onnx.checker.check_model(str(model_path))
    packed, fingerprint = load_adapter_file(adapter_path)
    assert set(packed) == set(PACKED)
    dims = _input_dims(model_path)
    assert dims[PACKED[0]] == ["packed_adapters.float32.size"] and not any("lora_" in n for n in dims)
    assert max_diff(run_onnx(model_path, {**c.feeds, **packed}), c.adapted) <= TOL
    assert max_diff(run_onnx(model_path, c.feeds), c.base) <= TOL  # defaults: packed zero-rank slots
    model = load_model(model_path)
    contract = read_contract(model.metadata_props)
    assert contract.fingerprint == fingerprint
    assert read_packing(model.metadata_props)["float32"]["slots"] == [s.name for s in contract.slots]
    slots = unpack_adapter_tensors(contract, packed)
    assert set(slots) == {s.name for s in contract.slots}
    repacked = pack_adapter_tensors(contract, slots)
    assert all(np.array_equal(repacked[n], packed[n]) for n in PACKED)


def test_packed_inputs_take_partial_adapters_of_mixed_ranks(rank_pattern, tmp_path):
    path, feeds, full, partial = rank_pattern
    model_path, adapter_path = extract_adapters(path, tmp_path, pack_inputs=True)
    model = load_model(model_path)
    contract = read_contract(model.metadata_props)
    adapter = ort.LoraAdapter()  # the .onnx_adapter file feeds the packed inputs as it is
    adapter.Load(str(adapter_path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    assert max_diff(session.run(None, feeds, options)[0], full) <= TOL
    slots = unpack_adapter_tensors(contract, load_adapter_file(adapter_path)[0])
    without_fc2 = pack_adapter_tensors(contract, {n: t for n, t in slots.items() if not n.startswith("fc2.")})
    assert without_fc2[PACKED[1]].tolist() == [16 * 2, 2 * 32, 0, 0, 32 * 6, 6 * 8]
    assert max_diff(session.run(None, {**feeds, **without_fc2})[0], partial) <= TOL
    assert set(unpack_adapter_tensors(contract, without_fc2)) == {n for n in slots if not n.startswith("fc2.")}
    with pytest.raises(IncompatibleAdapterError, match="fc1.lora_B.weight"):
        pack_adapter_tensors(contract, {**slots, "fc1.lora_B.weight": np.zeros((3, 32), np.float32)})
    with pytest.raises(IncompatibleAdapterError, match="sizes"):
        unpack_adapter_tensors(contract, {**without_fc2, PACKED[1]: np.array([1, 2], np.int64)})


def test_external_initializers_live_beside_the_model_and_are_supplied_at_session_creation(tmp_path):
    c = case("llama_dyn")
    model_path, adapter_path = extract_adapters(c.path, tmp_path, make_inputs=False, external=True,
                                                save_format="safetensors")
    onnx.checker.check_model(str(model_path))
    side = tmp_path / adapter_data_name(model_path)
    assert side.name == "model.onnx.adapter.data"
    model = load_model(model_path)
    names = [s.name for s in read_contract(model.metadata_props).slots]
    assert names == json.loads(model.metadata_props[EXTERNAL_KEY])
    proto = onnx.load(str(model_path), load_external_data=False)
    location = {t.name: {e.key: e.value for e in t.external_data}.get("location") for t in proto.graph.initializer}
    assert {location[n] for n in names} == {side.name}  # the adapter, alone in its own file
    assert side.name not in {loc for n, loc in location.items() if n not in names}
    assert "model.onnx.data" in location.values()
    overridable = {i.name for i in proto.graph.input} & set(location)  # ORT takes them as feeds too
    assert overridable == set(names)
    tensors, _ = load_adapter_file(adapter_path)  # the adapter file holds the same tensors
    assert sorted(tensors) == sorted(names)
    assert side.stat().st_size == sum(t.nbytes for t in tensors.values())
    for name in names:
        np.testing.assert_array_equal(model.graph.initializers[name].const_value.numpy(), tensors[name])
    assert max_diff(run_onnx(model_path, c.feeds), c.adapted) <= TOL  # runs as written

    def run_with(supplied):
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in supplied.values()]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_external_initializers(list(supplied), values)
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        return session.run(None, c.feeds)[0]

    off = {n: np.zeros_like(t) if n.endswith("lora_B.weight") else t for n, t in tensors.items()}
    assert max_diff(run_with(off), c.base) <= TOL
    side.unlink()  # as with Olive's placeholder: the runtime supplies every adapter tensor
    assert max_diff(run_with(tensors), c.adapted) <= TOL


def test_bad_options():
    with pytest.raises(OnnxPeftError, match="make_inputs"):
        ExtractAdapters(make_inputs=False, pack_inputs=True)
    with pytest.raises(OnnxPeftError, match="not both"):
        ExtractAdapters(make_inputs=True, external=True)


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
    assert main(["--quiet", "extract", str(c.path), "-o", str(tmp_path / "p"), "--pack-inputs",
                 "--no-optional-inputs", "--format", "npz"]) == 0
    packed, _ = load_adapter_file(tmp_path / "p" / "model.npz")
    assert set(packed) == set(PACKED)
    assert PACKED[0] not in {i.name for i in onnx.load(str(tmp_path / "p" / "model.onnx")).graph.initializer}
    onnx.checker.check_model(str(tmp_path / "p" / "model.onnx"))
    assert max_diff(run_onnx(tmp_path / "p" / "model.onnx", {**c.feeds, **packed}), c.adapted) <= TOL
    assert main(["--quiet", "extract", str(c.path), "-o", str(tmp_path / "e"), "--external"]) == 0
    assert (tmp_path / "e" / "model.onnx.adapter.data").is_file() and (tmp_path / "e" / "model.onnx_adapter").is_file()
    onnx.checker.check_model(str(tmp_path / "e" / "model.onnx"))
    assert max_diff(run_onnx(tmp_path / "e" / "model.onnx", c.feeds), c.adapted) <= TOL
    assert main(["--quiet", "extract", str(c.path), "-o", str(tmp_path / "x"), "--external", "--pack-inputs"]) == 1


def test_lora_on_2d_linear_exported_as_gemm_is_extracted(tmp_path):
    """torch.onnx dynamo exports Linear on a 2-D input as Gemm(transB=1), LoRA's A and B too."""
    import peft
    import torch

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 8)).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"],
                                                      init_lora_weights=False)).eval()
    x = torch.randn(3, 16)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=True, input_names=["x"])
    with torch.no_grad():
        adapted = model(x).numpy()
        with model.disable_adapter():
            plain = model(x).numpy()
    out_model, adapter_file = extract_adapters(tmp_path / "m.onnx", tmp_path / "out")
    tensors, _ = load_adapter_file(adapter_file)
    feeds = {"x": x.numpy()}
    assert max_diff(run_onnx(out_model, feeds), plain) <= TOL
    assert max_diff(run_onnx(out_model, {**feeds, **tensors}), adapted) <= TOL
