"""graph/io.py: safe, lazy loading and atomic saving of ONNX models."""

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from onnx_peft.errors import ModelFileError, UnsafePathError
from onnx_peft.graph.io import load_model, save_model


def _linear_model(folder: Path, external: bool = True, name: str = "m.onnx") -> Path:
    """y = x @ W, W [4, 3] stored as external data in m.onnx.data."""
    weight = np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [onnx.numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / name
    onnx.save(model, path, save_as_external_data=external, all_tensors_to_one_file=True,
              location=name + ".data", size_threshold=0)
    return path


def _set_location(path: Path, location: str) -> None:
    model = onnx.load(path, load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(model, path)


def test_load_keeps_weights_external_and_save_round_trips(tmp_path):
    path = _linear_model(tmp_path)
    model = load_model(path)
    assert isinstance(model.graph.initializers["W"].const_value, ir.ExternalTensor)
    out = tmp_path / "out" / "copy.onnx"
    out.parent.mkdir()
    save_model(model, out)
    assert sorted(os.listdir(out.parent)) == ["copy.onnx", "copy.onnx.data"]  # no temp leftovers
    again = load_model(out)
    np.testing.assert_array_equal(again.graph.initializers["W"].const_value.numpy(),
                                  np.arange(12, dtype=np.float32).reshape(4, 3))


def test_save_inline_when_asked(tmp_path):
    model = load_model(_linear_model(tmp_path))
    save_model(model, tmp_path / "inline.onnx", external_data=False)
    assert not (tmp_path / "inline.onnx.data").exists()
    onnx.checker.check_model(str(tmp_path / "inline.onnx"))


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage\xff\xff\xff", b"not onnx at all"])
def test_corrupt_file_names_the_file(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="bad.onnx"):
        load_model(path)


def test_missing_and_truncated_files(tmp_path):
    with pytest.raises(ModelFileError, match="nothere.onnx"):
        load_model(tmp_path / "nothere.onnx")
    path = _linear_model(tmp_path)
    data = tmp_path / "m.onnx.data"
    data.write_bytes(data.read_bytes()[:10])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model(path)
    data.unlink()
    with pytest.raises(ModelFileError, match="missing"):
        load_model(path)


@pytest.mark.parametrize("location", ["../m.onnx.data", "/etc/passwd", "sub/../../m.onnx.data"])
def test_external_data_outside_the_folder_is_refused(tmp_path, location):
    path = _linear_model(tmp_path)
    _set_location(path, location)
    with pytest.raises(UnsafePathError, match="outside"):
        load_model(path)


def test_symlinked_external_data_is_refused(tmp_path):
    path = _linear_model(tmp_path)
    (tmp_path / "link.data").symlink_to(tmp_path / "m.onnx.data")
    _set_location(path, "link.data")
    with pytest.raises(UnsafePathError, match="symlink"):
        load_model(path)


def test_output_equal_to_input_is_refused_and_input_unchanged(tmp_path):
    path = _linear_model(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model = load_model(path)
    with pytest.raises(UnsafePathError):
        save_model(model, path)
    with pytest.raises(UnsafePathError):
        save_model(model, tmp_path / "m.onnx")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_failed_save_leaves_no_partial_output(tmp_path):
    model = load_model(_linear_model(tmp_path))

    def boom() -> ir.TensorProtocol:
        raise OSError("No space left on device")

    value = model.graph.initializers["W"]
    value.const_value = ir.LazyTensor(boom, dtype=ir.DataType.FLOAT, shape=ir.Shape([4, 3]))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelFileError, match="could not write"):
        save_model(model, out / "new.onnx")
    assert list(out.iterdir()) == []
