"""AdapterSession: contract checks, swapping adapters, bad input, threads, ORT LoraAdapter interop.

The tiny models here are built by hand in the slot layout (the same one extract/insert write):
three Linear sites ``x [batch, seq, 8] -> 16 -> 16 -> 4`` each with optional inputs
``<module>.lora_A.weight [in, lora_r]`` and ``<module>.lora_B.weight [lora_r, out]`` whose
defaults are zero-rank tensors, plus the contract in metadata_props. The numpy reference is
``y = x W + (x A) B`` per site, Relu between sites. Every session test runs once per ONNX Runtime
device (``ort_device`` in conftest.py: CPU, and CUDA where onnxruntime-gpu has it).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_peft.errors import (
    CheckpointError,
    IncompatibleAdapterError,
    OnnxPeftError,
    RuntimeSessionError,
)
from onnx_peft.graph.contract import Contract, Slot, weight_fingerprint, write_contract
from onnx_peft.runtime import AdapterSession
from onnx_peft.runtime.providers import CPU, CUDA

DIMS = [8, 16, 16, 4]
MODULES = ["model.l0", "model.l1", "model.l2"]


def base_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """module -> W^T [in, out] (MatMul orientation)."""
    rng = np.random.default_rng(seed)
    return {m: (rng.standard_normal((DIMS[i], DIMS[i + 1])) / np.sqrt(DIMS[i])).astype(np.float32)
            for i, m in enumerate(MODULES)}


def build_slot_model(path: Path, seed: int = 0, seq: bool = True) -> Path:
    """The tiny slot model; ``seq=False`` makes x ``[batch, 8]`` (rank 2) instead of 3."""
    weights = base_weights(seed)
    lead = ["batch", "seq"] if seq else ["batch"]
    nodes, inits, inputs, slots = [], [], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [*lead, DIMS[0]])], []
    h = "x"
    for i, module in enumerate(MODULES):
        d_in, d_out = DIMS[i], DIMS[i + 1]
        a, b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        inits += [numpy_helper.from_array(weights[module], f"{module}.weight"),
                  numpy_helper.from_array(np.zeros((d_in, 0), np.float32), a),
                  numpy_helper.from_array(np.zeros((0, d_out), np.float32), b)]
        inputs += [helper.make_tensor_value_info(a, TensorProto.FLOAT, [d_in, "lora_r"]),
                   helper.make_tensor_value_info(b, TensorProto.FLOAT, ["lora_r", d_out])]
        slots += [Slot(a, "float32", (d_in, "lora_r"), module), Slot(b, "float32", ("lora_r", d_out), module)]
        out = "logits" if i == len(MODULES) - 1 else f"h{i}"
        nodes += [helper.make_node("MatMul", [h, f"{module}.weight"], [f"{module}/base"]),
                  helper.make_node("MatMul", [h, a], [f"{module}/lora_a"]),
                  helper.make_node("MatMul", [f"{module}/lora_a", b], [f"{module}/lora_b"]),
                  helper.make_node("Add", [f"{module}/base", f"{module}/lora_b"], [out if i == len(MODULES) - 1 else f"{module}/sum"])]
        if i < len(MODULES) - 1:
            nodes.append(helper.make_node("Relu", [f"{module}/sum"], [out]))
        h = out
    graph = helper.make_graph(nodes, "tiny", inputs,
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [*lead, DIMS[-1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    contract = Contract(slots=slots, fingerprint=weight_fingerprint({m: w.T for m, w in weights.items()}))
    props: dict[str, str] = {}
    write_contract(props, contract)
    helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def make_adapter(rank: int, seed: int, modules=MODULES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + seed)
    out = {}
    for i, module in enumerate(MODULES):
        if module in modules:
            out[f"{module}.lora_A.weight"] = (rng.standard_normal((DIMS[i], rank)) * 0.3).astype(np.float32)
            out[f"{module}.lora_B.weight"] = (rng.standard_normal((rank, DIMS[i + 1])) * 0.3).astype(np.float32)
    return out


def reference(x: np.ndarray, adapter: dict[str, np.ndarray] | None = None, seed: int = 0) -> np.ndarray:
    weights, h = base_weights(seed), x.astype(np.float64)
    for i, module in enumerate(MODULES):
        y = h @ weights[module]
        a = (adapter or {}).get(f"{module}.lora_A.weight")
        if a is not None:
            y = y + (h @ a) @ adapter[f"{module}.lora_B.weight"]
        h = np.maximum(y, 0) if i < len(MODULES) - 1 else y
    return h


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    return build_slot_model(tmp_path_factory.mktemp("rt") / "tiny.onnx")


@pytest.fixture()
def x() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((3, 5, DIMS[0])).astype(np.float32)


def test_base_and_swapped_adapters_match_numpy(model_path, x, ort_device):
    session = AdapterSession(model_path, device=ort_device)
    a, b = make_adapter(4, 1), make_adapter(8, 2, modules=MODULES[:2])
    session.load_adapter("a", a)
    session.load_adapter("b", b)
    assert session.adapters == ["a", "b"]
    assert session.device == ort_device and session.provider == {"cpu": CPU, "cuda": CUDA}[ort_device]
    for name, tensors in [(None, None), ("a", a), ("b", b), (None, None), ("a", a)]:
        (out,) = session.run(["logits"], {"x": x}, adapter=name)
        assert np.abs(out - reference(x, tensors)).max() <= 1e-5
    # the base output is bit-identical to a run with no adapter at all
    assert np.array_equal(session.run(None, {"x": x})[0], session.run(None, {"x": x}, adapter=None)[0])
    session.unload_adapter("a")
    assert session.adapters == ["b"]


def test_files_load_and_fingerprint_guards_base(model_path, tmp_path, x, ort_device):
    from onnx_peft.formats import save_adapter_file

    session = AdapterSession(model_path, device=ort_device)
    tensors = make_adapter(4, 3)
    for suffix in ["onnx_adapter", "safetensors"]:
        path = save_adapter_file(tmp_path / f"a.{suffix}", tensors, session.contract.fingerprint)
        session.load_adapter(suffix, path)
        assert np.abs(session.run(None, {"x": x}, adapter=suffix)[0] - reference(x, tensors)).max() <= 1e-5
    other = save_adapter_file(tmp_path / "other.onnx_adapter", tensors, "0123456789abcdef" * 2)
    with pytest.raises(IncompatibleAdapterError, match="another base model"):
        session.load_adapter("other", other)
    corrupt = tmp_path / "corrupt.onnx_adapter"
    corrupt.write_bytes(b"not an adapter" * 8)
    with pytest.raises(CheckpointError, match="corrupt.onnx_adapter"):
        session.load_adapter("corrupt", corrupt)
    assert session.adapters == ["onnx_adapter", "safetensors"]
    assert np.abs(session.run(None, {"x": x}, adapter="safetensors")[0] - reference(x, tensors)).max() <= 1e-5


@pytest.mark.parametrize("change, match", [
    (lambda t: {**t, "model.l9.lora_A.weight": t["model.l0.lora_A.weight"]}, "model.l9.lora_A.weight"),
    (lambda t: {k: v for k, v in t.items() if k != "model.l1.lora_B.weight"}, "missing tensor 'model.l1.lora_B.weight'"),
    (lambda t: {**t, "model.l0.lora_A.weight": t["model.l0.lora_A.weight"][:4]}, r"shape \[4, 4\]"),
    (lambda t: {**t, "model.l2.lora_B.weight": t["model.l2.lora_B.weight"].astype(np.float16)}, "float16"),
    (lambda t: {**t, "model.l0.lora_B.weight": np.zeros((8, 16), np.float32)}, "lora_r=8"),
])
def test_incompatible_adapter_names_first_mismatch(model_path, x, change, match, ort_device):
    session = AdapterSession(model_path, device=ort_device)
    with pytest.raises(IncompatibleAdapterError, match=match):
        session.load_adapter("bad", change(make_adapter(4, 4)))
    assert session.adapters == []
    assert np.abs(session.run(None, {"x": x})[0] - reference(x)).max() <= 1e-5


def test_bad_runs_raise_typed_errors_and_session_stays_usable(model_path, x, ort_device):
    session = AdapterSession(model_path, device=ort_device)
    session.load_adapter("a", make_adapter(4, 5))
    session.load_adapter("b", make_adapter(4, 6))
    with pytest.raises(RuntimeSessionError, match=r"'nope'.*loaded: a, b"):
        session.run(None, {"x": x}, adapter="nope")
    with pytest.raises(RuntimeSessionError, match="'x' has dtype float64"):
        session.run(None, {"x": x.astype(np.float64)}, adapter="a")
    with pytest.raises(RuntimeSessionError, match=r"'x' has shape \[3, 5, 7\]"):
        session.run(None, {"x": x[..., :7]})
    with pytest.raises(RuntimeSessionError, match="missing input"):
        session.run(None, {})
    with pytest.raises(RuntimeSessionError, match="'y' is not an input"):
        session.run(None, {"x": x, "y": x})
    with pytest.raises(RuntimeSessionError, match="MultiAdapter"):
        session.run(None, {"x": x}, adapter=["a", "b", None])
    with pytest.raises(RuntimeSessionError, match="2 entries but the batch has 3"):
        session.run(None, {"x": x}, adapter=["a", "a"])
    with pytest.raises(RuntimeSessionError, match="already loaded"):
        session.load_adapter("a", make_adapter(4, 5))
    with pytest.raises(RuntimeSessionError, match="no adapter named 'zz'"):
        session.unload_adapter("zz")
    with pytest.raises(OnnxPeftError):
        session.run(["nope"], {"x": x})
    # the same adapter for every row is fine on a single-adapter model
    same = session.run(None, {"x": x}, adapter=["a", "a", "a"])[0]
    assert np.array_equal(same, session.run(None, {"x": x}, adapter="a")[0])


def test_unload_waits_for_runs_in_flight_or_times_out(model_path, x, ort_device):
    session = AdapterSession(model_path, device=ort_device)
    session.load_adapter("a", make_adapter(4, 7))
    with session._using(["a"]):  # a run of "a" in flight
        with pytest.raises(RuntimeSessionError, match="still used by 1 run"):
            session.unload_adapter("a", timeout=0.05)
        assert session.adapters == ["a"]
        done = threading.Event()
        worker = threading.Thread(target=lambda: (session.unload_adapter("a"), done.set()))
        worker.start()
        assert not done.wait(0.1)
        with pytest.raises(RuntimeSessionError, match="no adapter named 'a'"):
            session.run(None, {"x": x}, adapter="a")  # refused while unloading
    worker.join(5)
    assert done.is_set() and session.adapters == []


def test_threads_never_see_another_adapters_output(model_path, ort_device):
    session = AdapterSession(model_path, device=ort_device)
    adapters = {f"a{i}": make_adapter(4 + 2 * i, 10 + i) for i in range(4)}
    for name, tensors in adapters.items():
        session.load_adapter(name, tensors)
    x = np.random.default_rng(3).standard_normal((2, 3, DIMS[0])).astype(np.float32)
    expected = {name: reference(x, t) for name, t in adapters.items()} | {None: reference(x)}
    errors: list[str] = []

    def worker(k: int) -> None:
        rng = np.random.default_rng(k)
        for _ in range(40):
            name = [None, "a0", "a1", "a2", "a3"][rng.integers(5)]
            try:
                out = session.run(None, {"x": x}, adapter=name)[0]
            except RuntimeSessionError:
                continue  # a3 comes and goes
            if np.abs(out - expected[name]).max() > 1e-5:
                errors.append(f"{name}: wrong output")

    def churn() -> None:
        for _ in range(20):
            session.unload_adapter("a3")
            session.load_adapter("a3", adapters["a3"])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)] + [threading.Thread(target=churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert sorted(session.adapters) == ["a0", "a1", "a2", "a3"]


def test_onnx_adapter_file_works_in_ort_lora_adapter(model_path, tmp_path, x, ort_device, ort_providers):
    import onnxruntime as ort

    from onnx_peft.formats import save_adapter_file

    tensors = make_adapter(8, 9)
    path = save_adapter_file(tmp_path / "a.onnx_adapter", tensors, "")
    lora = ort.LoraAdapter()
    lora.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    plain = ort.InferenceSession(str(model_path), providers=ort_providers)
    (theirs,) = plain.run(None, {"x": x}, options)
    session = AdapterSession(model_path, device=ort_device)
    session.load_adapter("a", path)
    (ours,) = session.run(None, {"x": x}, adapter="a")
    assert np.abs(theirs - ours).max() <= 1e-6
    assert np.abs(ours - reference(x, tensors)).max() <= 1e-5


def test_session_serves_packed_models_from_packed_files_and_peft_dirs(tmp_path, ort_device):
    """A model extracted with pack_inputs: the session unpacks, checks slot by slot, packs once."""
    from helpers_onnx import TOL, case
    from helpers_onnx import max_diff as diff

    from onnx_peft.passes.extract_adapters import extract_adapters

    c = case("llama_dyn")
    model_path, packed_file = extract_adapters(c.path, tmp_path / "packed", pack_inputs=True)
    session = AdapterSession(model_path, device=ort_device)
    session.load_adapter("packed", packed_file)
    session.load_adapter("peft", c.adapter_dir)
    assert diff(session.run(None, c.feeds)[0], c.base) <= TOL
    assert diff(session.run(None, c.feeds, adapter="packed")[0], c.adapted) <= TOL
    assert diff(session.run(None, c.feeds, adapter="peft")[0], c.adapted) <= TOL
    assert not any(name.startswith("packed_adapters") for name in session.input_names)
