"""Adapter files round-trip tensors and the base fingerprint; PEFT dirs read without torch."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_peft.errors import CheckpointError, OnnxPeftError
from onnx_peft.formats import (
    fingerprints_match,
    format_for_path,
    load_adapter_file,
    read_peft_adapter,
    save_adapter_file,
)
from onnx_peft.methods.lora import LoraConfig

FINGERPRINT = "0123456789abcdef0123456789abcdef"


def _slots(dtype=np.float32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"fc.lora_A.weight": rng.normal(size=(4, 2)).astype(dtype),
            "fc.lora_B.weight": rng.normal(size=(2, 3)).astype(dtype)}


@pytest.mark.parametrize("suffix", [".onnx_adapter", ".safetensors", ".npz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip_keeps_tensors_and_fingerprint(tmp_path, suffix, dtype):
    path = save_adapter_file(tmp_path / f"a{suffix}", _slots(dtype), FINGERPRINT)
    tensors, fingerprint = load_adapter_file(path)
    assert set(tensors) == set(_slots())
    for name, want in _slots(dtype).items():
        assert tensors[name].dtype == dtype and np.array_equal(tensors[name], want)
    assert fingerprints_match(fingerprint, FINGERPRINT)
    assert not fingerprints_match(fingerprint, "f" * 32)
    assert [p.name for p in tmp_path.iterdir()] == [f"a{suffix}"]  # no temp files left


def test_onnx_adapter_stores_a_short_fingerprint_and_no_extra_tensor(tmp_path):
    tensors, fingerprint = load_adapter_file(save_adapter_file(tmp_path / "a.onnx_adapter", _slots(), FINGERPRINT))
    assert fingerprint.startswith("ort31:") and set(tensors) == set(_slots())
    assert load_adapter_file(save_adapter_file(tmp_path / "b.onnx_adapter", _slots()))[1] == ""


def test_format_override_and_unknown_suffix(tmp_path):
    assert format_for_path(tmp_path / "x.bin", "npz") == "npz"
    path = save_adapter_file(tmp_path / "x.weights", _slots(), format="safetensors")
    with pytest.raises(OnnxPeftError, match="suffix"):
        load_adapter_file(path)
    with pytest.raises(OnnxPeftError, match="suffix '.weights'"):
        save_adapter_file(tmp_path / "y.weights", _slots())


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(OnnxPeftError, match="reserved"):
        save_adapter_file(tmp_path / "a.npz", {"__onnx_peft_fingerprint__": np.zeros(1)})
    assert list(tmp_path.iterdir()) == []


def test_onnx_adapter_file_feeds_ort_lora_adapter(tmp_path):
    """The file loads in onnxruntime.LoraAdapter and fills optional slots of a session."""
    ort = pytest.importorskip("onnxruntime")
    a = helper.make_tensor_value_info("fc.lora_A.weight", TensorProto.FLOAT, [4, "r"])
    b = helper.make_tensor_value_info("fc.lora_B.weight", TensorProto.FLOAT, ["r", 3])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    nodes = [helper.make_node("MatMul", ["x", "fc.lora_A.weight"], ["xa"]),
             helper.make_node("MatMul", ["xa", "fc.lora_B.weight"], ["y"])]
    defaults = [numpy_helper.from_array(np.zeros((4, 0), np.float32), "fc.lora_A.weight"),
                numpy_helper.from_array(np.zeros((0, 3), np.float32), "fc.lora_B.weight")]
    graph = helper.make_graph(nodes, "g", [x, a, b], [y], defaults)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(model, tmp_path / "m.onnx")
    path = save_adapter_file(tmp_path / "a.onnx_adapter", _slots(), FINGERPRINT)

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    adapter = ort.LoraAdapter()
    adapter.Load(str(path))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    xs = np.arange(8, dtype=np.float32).reshape(2, 4)
    got = session.run(None, {"x": xs}, options)[0]
    slots = _slots()
    assert np.abs(got - xs @ slots["fc.lora_A.weight"] @ slots["fc.lora_B.weight"]).max() <= 1e-5
    assert not session.run(None, {"x": xs})[0].any()  # no adapter: zero-rank defaults


# -- PEFT directories -------------------------------------------------------------------------
def _peft_dir(folder, config: dict | None = None):
    from safetensors.numpy import save_file

    folder.mkdir()
    rng = np.random.default_rng(0)
    save_file({"base_model.model.fc.lora_A.weight": rng.normal(size=(2, 4)).astype(np.float32),
               "base_model.model.fc.lora_B.weight": rng.normal(size=(3, 2)).astype(np.float32)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        config or {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["fc"]}))
    return folder


def test_read_peft_adapter_with_numpy(tmp_path):
    config, tensors = read_peft_adapter(_peft_dir(tmp_path / "a"))
    assert isinstance(config, LoraConfig) and config.r == 2
    assert tensors["base_model.model.fc.lora_A.weight"].shape == (2, 4)


def test_truncated_safetensors_is_a_checkpoint_error_naming_the_file(tmp_path):
    folder = _peft_dir(tmp_path / "a")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        read_peft_adapter(folder)
    broken = tmp_path / "b.safetensors"
    broken.write_bytes(b"\x05")
    with pytest.raises(CheckpointError, match="b.safetensors"):
        load_adapter_file(broken)


def test_pickled_checkpoint_is_refused_without_opt_in(tmp_path):
    folder = _peft_dir(tmp_path / "a")
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        read_peft_adapter(folder)


def test_missing_config_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        read_peft_adapter(tmp_path)
