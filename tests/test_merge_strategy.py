"""strategy="merge" (runtime/merging.py): the active adapter folded into device-resident weights
by ONNX Runtime on swap; every run executes the base graph's kernels; runs in flight keep the
weights they started with; the base comes back exactly. Every method against PEFT is in
tests/test_conformance.py (test_merge_strategy_*); here, the session's behaviour on the tiny
hand-built slot model of test_runtime.py (numpy reference)."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from test_runtime import DIMS, MODULES, build_slot_model, make_adapter, reference

from onnx_peft.errors import IncompatibleAdapterError, RuntimeSessionError
from onnx_peft.runtime import AdapterSession


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_slot_model(tmp_path_factory.mktemp("merge") / "tiny.onnx")


@pytest.fixture()
def x() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((2, 4, DIMS[0])).astype(np.float32)


def _kernels(model_path, feeds, ort_device, tmp_path, **kwargs) -> dict[str, int]:
    """Kernel launches of one run per adapter choice (a fresh session each, every session it
    owns profiled), from ONNX Runtime's profiler."""
    import onnxruntime as ort

    counts = {}
    for label, adapter in (("none", None), ("adapter", "a")):
        (tmp_path / label).mkdir(parents=True)
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(tmp_path / label / "prof")
        session = AdapterSession(model_path, session_options=options, device=ort_device, **kwargs)
        session.load_adapter("a", make_adapter(4, 1))
        session.run(None, feeds, adapter=adapter)
        counts[label] = 0
        for owned in (session._session, session._base):
            if owned is None:
                continue
            events = json.loads(open(owned.end_profiling()).read())
            counts[label] += sum(1 for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"))
    return counts


def test_runs_match_numpy_and_the_base_is_restored_exactly(model_path, x, ort_device):
    session = AdapterSession(model_path, device=ort_device, strategy="merge")
    assert session.strategy == "merge" and session.input_names == ["x"]
    a, b = make_adapter(4, 1), make_adapter(8, 2, modules=MODULES[:2])
    session.load_adapter("a", a)
    session.load_adapter("b", b)
    (base,) = session.run(None, {"x": x})
    assert np.abs(base - reference(x)).max() <= 1e-5
    for name, tensors in [("a", a), ("b", b), (None, None), ("a", a), ("a", a)]:
        (out,) = session.run(None, {"x": x}, adapter=name)
        assert np.abs(out - reference(x, tensors)).max() <= 1e-5, name
        if name is None:
            assert np.array_equal(out, base)  # the original tensors, not W + 0
    assert session.active_adapter == "a"


def test_no_adapter_and_adapter_runs_launch_exactly_the_base_kernels(model_path, x, ort_device, tmp_path):
    merged = _kernels(model_path, {"x": x}, ort_device, tmp_path / "m", strategy="merge")
    slots = _kernels(model_path, {"x": x}, ort_device, tmp_path / "s")
    base_nodes = 2 * len(MODULES) - 1  # MatMul per module, Relu between
    assert merged == {"none": base_nodes, "adapter": base_nodes}
    assert slots["adapter"] > base_nodes  # the slot model pays its branch kernels


def test_activate_swaps_ahead_and_unload_drops_the_merged_weights(model_path, x, ort_device):
    session = AdapterSession(model_path, device=ort_device, strategy="merge")
    a = make_adapter(4, 1)
    session.load_adapter("a", a)
    session.activate("a")
    assert session.active_adapter == "a"
    session.unload_adapter("a")
    assert session.active_adapter is None
    session.load_adapter("a", make_adapter(2, 5))  # same name, other tensors: merged anew
    (out,) = session.run(None, {"x": x}, adapter="a")
    assert np.abs(out - reference(x, make_adapter(2, 5))).max() <= 1e-5
    with pytest.raises(RuntimeSessionError, match="no adapter named 'zz'"):
        session.activate("zz")
    with pytest.raises(RuntimeSessionError, match="activate\\(\\) applies to strategy 'merge'"):
        AdapterSession(model_path, device=ort_device).activate("a")


def test_one_adapter_per_run_and_bad_strategy(model_path, x, ort_device):
    session = AdapterSession(model_path, device=ort_device, strategy="merge")
    session.load_adapter("a", make_adapter(4, 1))
    session.load_adapter("b", make_adapter(4, 2))
    with pytest.raises(RuntimeSessionError, match="one adapter at a time"):
        session.run(None, {"x": x}, adapter=["a", "b"])
    (same,) = session.run(None, {"x": x}, adapter=["a", "a"])  # one adapter for every row is fine
    assert np.abs(same - reference(x, make_adapter(4, 1))).max() <= 1e-5
    with pytest.raises(RuntimeSessionError, match="strategy must be one of auto, slots, merge"):
        AdapterSession(model_path, strategy="fold")


def test_runs_in_flight_finish_on_their_weights_while_others_swap(model_path, ort_device):
    """4 threads x 30 runs, each thread its own adapter (or none): every swap happens while
    other runs are in flight, and no run ever returns another adapter's output."""
    session = AdapterSession(model_path, device=ort_device, strategy="merge")
    adapters = {"a": make_adapter(4, 1), "b": make_adapter(2, 2), "c": make_adapter(8, 3)}
    for name, tensors in adapters.items():
        session.load_adapter(name, tensors)
    x = np.random.default_rng(9).standard_normal((8, 16, DIMS[0])).astype(np.float32)
    expected = {name: reference(x, adapters.get(name)) for name in [*adapters, None]}
    wrong: list[str] = []

    def worker(name):
        for _ in range(30):
            (out,) = session.run(None, {"x": x}, adapter=name)
            if np.abs(out - expected[name]).max() > 1e-5:
                wrong.append(str(name))

    threads = [threading.Thread(target=worker, args=(name,)) for name in [*adapters, None]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_external_mode_model_merges_its_held_adapter_and_others(tmp_path, ort_device):
    """``export --mode external``: the slots' initializers hold the exported adapter, the merge
    graph's defaults are the no-op, so no adapter is the base and each adapter merges alone."""
    torch = pytest.importorskip("torch")
    from tiny_models import tiny_llama

    from onnx_peft import export
    from onnx_peft.methods.lora import LoraConfig
    from onnx_peft.model import get_peft_model

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    torch.manual_seed(4)
    tuned = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)).eval()
    tuned.save_pretrained(tmp_path / "a")
    out = export(tmp_path / "base", tmp_path / "ext", adapters={"a": tmp_path / "a"}, task="causal-lm",
                 mode="external", quiet=True)
    ids = np.random.default_rng(1).integers(1, 60, size=(2, 5)).astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    slots = AdapterSession(out, device=ort_device)
    merge = AdapterSession(out, device=ort_device, strategy="merge")
    for session in (slots, merge):
        session.load_adapter("a", tmp_path / "a")
    for adapter in (None, "a", None):
        want = slots.run(["logits"], feeds, adapter=adapter)[0]
        assert np.abs(merge.run(["logits"], feeds, adapter=adapter)[0] - want).max() <= 1e-5, adapter


def test_multi_adapter_models_are_refused_with_the_way_out(model_path, tmp_path):
    from onnx_peft.passes.multi_adapter import multi_adapter

    multi = multi_adapter(model_path, tmp_path / "multi")
    with pytest.raises(IncompatibleAdapterError, match="MultiAdapter model.*strategy 'slots'"):
        AdapterSession(multi, strategy="merge")
