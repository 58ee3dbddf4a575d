"""The IO-binding path (every run on CUDA; on any device with ``device_outputs``): slot feeds,
banks, strategy merge and the base twin, bound as OrtValues, give the plain run's numbers. On the
CPU lane this is the code CUDA runs, minus the device."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from test_runtime import DIMS, build_slot_model, make_adapter, reference

from onnx_peft.errors import RuntimeSessionError
from onnx_peft.runtime import AdapterSession


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return build_slot_model(tmp_path_factory.mktemp("bind") / "tiny.onnx")


@pytest.fixture()
def x() -> np.ndarray:
    return np.random.default_rng(11).standard_normal((3, 4, DIMS[0])).astype(np.float32)


@pytest.mark.parametrize("kwargs", [{}, {"strategy": "merge"}, {"base_session": True}],
                         ids=["slots", "merge", "twin"])
def test_device_outputs_equal_host_outputs(model_path, x, ort_device, kwargs):
    session = AdapterSession(model_path, device=ort_device, **kwargs)
    a = make_adapter(4, 1)
    session.load_adapter("a", a)
    for adapter, tensors in [(None, None), ("a", a)]:
        (bound,) = session.run(["logits"], {"x": x}, adapter=adapter, device_outputs=["logits"])
        assert isinstance(bound, ort.OrtValue) and bound.device_name().lower() == ort_device
        assert np.abs(bound.numpy() - reference(x, tensors)).max() <= 1e-5
        (fed_back,) = session.run(["logits"], {"x": ort.OrtValue.ortvalue_from_numpy(x)}, adapter=adapter)
        assert np.array_equal(fed_back, bound.numpy())


def test_multi_adapter_rows_through_binding(model_path, x, ort_device, tmp_path):
    from onnx_peft.passes.multi_adapter import multi_adapter

    session = AdapterSession(multi_adapter(model_path, tmp_path / "multi"), device=ort_device)
    a, b = make_adapter(4, 1), make_adapter(2, 2)
    session.load_adapter("a", a)
    session.load_adapter("b", b)
    (bound,) = session.run(["logits"], {"x": x}, adapter=["a", None, "b"], device_outputs=["logits"])
    for i, tensors in enumerate([a, None, b]):
        assert np.abs(bound.numpy()[i] - reference(x[i:i + 1], tensors)[0]).max() <= 1e-5


def test_device_outputs_must_be_asked_for(model_path, x):
    session = AdapterSession(model_path, device="cpu")
    with pytest.raises(RuntimeSessionError, match="device_outputs \\['nope'\\]"):
        session.run(["logits"], {"x": x}, device_outputs=["nope"])
