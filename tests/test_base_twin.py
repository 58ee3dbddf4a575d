"""base_session (runtime/base_twin.py): with strategy "slots", runs without an adapter go to a
twin session over the base graph that shares the slot session's weights, so they launch exactly
the base's kernels. On by default with CUDA; forced on here so the CPU lane covers it."""

from __future__ import annotations

import numpy as np
import pytest
from test_merge_strategy import _kernels
from test_runtime import DIMS, MODULES, build_slot_model, make_adapter, reference

from onnx_peft.runtime import AdapterSession


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_slot_model(tmp_path_factory.mktemp("twin") / "tiny.onnx")


@pytest.fixture()
def x() -> np.ndarray:
    return np.random.default_rng(5).standard_normal((3, 4, DIMS[0])).astype(np.float32)


def test_no_adapter_runs_launch_the_base_kernels_and_adapters_still_swap(model_path, x, ort_device, tmp_path):
    counts = _kernels(model_path, {"x": x}, ort_device, tmp_path / "t", base_session=True)
    assert counts["none"] == 2 * len(MODULES) - 1
    assert counts["adapter"] > counts["none"]
    session = AdapterSession(model_path, device=ort_device, base_session=True)
    assert session._base is not None
    a = make_adapter(4, 1)
    session.load_adapter("a", a)
    for name, tensors in [(None, None), ("a", a), (None, None)]:
        (out,) = session.run(None, {"x": x}, adapter=name)
        assert np.abs(out - reference(x, tensors)).max() <= 1e-5, name
    # a slot fed by hand still goes to the slot session
    (fed,) = session.run(None, {"x": x, **a})
    assert np.abs(fed - reference(x, a)).max() <= 1e-5


def test_default_is_off_on_cpu_and_on_for_cuda_with_the_sessions_own_options(model_path, ort_device):
    import onnxruntime as ort

    session = AdapterSession(model_path, device=ort_device)
    assert (session._base is not None) == (ort_device == "cuda")
    # a caller's options are never given shared weights unasked (they may serve another model)
    assert AdapterSession(model_path, device=ort_device, session_options=ort.SessionOptions())._base is None


def test_multi_adapter_batch_of_base_rows_runs_on_the_twin(model_path, x, ort_device, tmp_path):
    from onnx_peft.passes.multi_adapter import multi_adapter

    multi = multi_adapter(model_path, tmp_path / "multi")
    session = AdapterSession(multi, device=ort_device, base_session=True)
    assert session._base is not None
    a = make_adapter(4, 1)
    session.load_adapter("a", a)
    (base,) = session.run(None, {"x": x}, adapter=[None, None, None])
    assert np.abs(base - reference(x)).max() <= 1e-5
    (mixed,) = session.run(None, {"x": x}, adapter=["a", None, "a"])
    assert np.abs(mixed[1] - reference(x[1:2])[0]).max() <= 1e-5
    assert np.abs(mixed[0] - reference(x[:1], a)[0]).max() <= 1e-5
    (by_ids,) = session.run(None, {"x": x, "adapter_ids": np.zeros(3, np.int64)})
    assert np.array_equal(by_ids, base)
