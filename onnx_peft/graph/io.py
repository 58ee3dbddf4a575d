"""Load and save ONNX models safely and without holding all weights in memory.

Why this module exists: every pass reads a model and writes another, and the files are big
(> 2 GB) and come from strangers. So:

* :func:`load_model` keeps external weights lazy (``ir.ExternalTensor`` memory-maps a tensor on
  its first ``.numpy()``) and refuses external-data locations that leave the model's folder
  (``..``, absolute paths, symlinks, hard links to a file elsewhere) or point past the end of
  their file. Every tensor is checked: initializers and Constant/attribute tensors of the main
  graph, of its subgraphs (If/Loop/Scan bodies) and of model-local functions (:func:`iter_tensors`).
* :func:`save_model` writes into a temporary folder next to the output and renames the finished
  files into place together (onnx_peft.safe_write), so a failure (disk full, a bad tensor) or a
  kill leaves no partial output, and a later save deletes a killed run's temporaries; it refuses
  to overwrite any file the model reads. ``ir.save`` streams tensors one at a time, which
  is what makes ``LazyTensor`` merged weights cheap.
* :func:`save_model_with_side_data` does the same but stores some initializers (extracted
  adapter tensors) in a side data file of their own, for runtimes that swap them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import weakref
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from ..errors import ModelFileError, OnnxPeftError, UnsafePathError
from ..safe_write import (
    install_files,
    make_temp_dir,
    refuse_folders_in_the_way,
    refuse_overwriting_inputs,
)

_TWO_GB = 2**31
# Models whose tensors add up to more than this are always saved with external data.
AUTO_EXTERNAL_BYTES = 1 << 30

# model object -> the file it was loaded from (so save_model can refuse to overwrite it)
_SOURCES: weakref.WeakKeyDictionary[ir.Model, Path] = weakref.WeakKeyDictionary()


def iter_graphs(model: ir.Model) -> Iterator[ir.Graph]:
    """The main graph, its subgraphs (If/Loop/Scan bodies), and the body of every model-local
    function with its subgraphs."""
    yield from model.graphs()
    for function in model.functions.values():
        yield function.graph
        yield from function.graph.subgraphs()


def iter_tensors(model: ir.Model) -> Iterator[ir.TensorProtocol]:
    """All tensors of ``model``: initializers and Constant/attribute tensors of every graph of
    :func:`iter_graphs` (subgraphs and functions included)."""
    for graph in iter_graphs(model):
        for value in graph.initializers.values():
            if value.const_value is not None:
                yield value.const_value
        for node in graph:
            for attr in node.attributes.values():
                if attr.is_ref():
                    continue
                if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                    yield attr.value
                elif attr.type == ir.AttributeType.TENSORS and attr.value is not None:
                    yield from attr.value


def source_path(model: ir.Model) -> Path | None:
    """The file ``model`` was loaded from by :func:`load_model`, if any."""
    return _SOURCES.get(model)


def external_files(model: ir.Model) -> set[Path]:
    """The files the external tensors of ``model`` read (resolved)."""
    return {Path(t.path).resolve() for t in iter_tensors(model) if isinstance(t, ir.ExternalTensor)}


def _check_external(tensor: ir.ExternalTensor, model_path: Path) -> None:
    """Refuse a location that escapes the model folder, is a symlink or a hard link (a name in
    the folder for a file that may live anywhere), or is too short."""
    location = str(tensor.location)
    folder = model_path.parent.resolve()
    parts = Path(location.replace("\\", "/")).parts
    if os.path.isabs(location) or Path(location).is_absolute() or location.startswith(("/", "\\")) \
            or (len(location) > 1 and location[1] == ":") or ".." in parts:
        raise UnsafePathError(
            f"{model_path}: tensor {tensor.name!r} stores its data at {location!r}, outside the "
            "model's folder; external data must be a relative path inside that folder"
        )
    data_path = folder / location
    probe = folder
    for part in parts:
        probe = probe / part
        if probe.is_symlink():
            raise UnsafePathError(
                f"{model_path}: external data {location!r} of tensor {tensor.name!r} is a symlink "
                f"({probe}); copy the real file next to the model instead"
            )
    if not data_path.is_file():
        raise ModelFileError(
            f"{model_path}: external data file {location!r} of tensor {tensor.name!r} is missing; "
            "copy it next to the model"
        )
    need = (tensor.offset or 0) + (tensor.length if tensor.length is not None else tensor.nbytes)
    if data_path.stat().st_nlink > 1:
        raise UnsafePathError(
            f"{model_path}: external data {location!r} of tensor {tensor.name!r} is a hard link (the file "
            "has other names, possibly outside the model's folder); copy the real file next to the model instead"
        )
    if data_path.stat().st_size < need:
        raise ModelFileError(
            f"{model_path}: external data file {location!r} is truncated: tensor {tensor.name!r} "
            f"needs bytes up to {need}, the file has {data_path.stat().st_size}; re-export the model"
        )


def load_model(path: str | os.PathLike) -> ir.Model:
    """Read an ONNX model; external weights stay on disk until a pass reads them.

    Raises ModelFileError (missing, unreadable, corrupt or truncated file, missing external
    data) and UnsafePathError (external data outside the model's folder).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such ONNX model file; check the path")
    try:
        model = ir.load(path)
    except Exception as exc:  # protobuf DecodeError, OSError, ...
        raise ModelFileError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc}); the file is corrupt "
            "or truncated, export it again"
        ) from exc
    if model.graph is None or (len(model.graph) == 0 and not model.graph.outputs):
        raise ModelFileError(f"{path}: the file holds no ONNX graph (corrupt or not an ONNX model)")
    for tensor in iter_tensors(model):
        if isinstance(tensor, ir.ExternalTensor):
            _check_external(tensor, path)
            # ir.load sets the folder of the main graph's tensors only; a function's Constant
            # would otherwise be read relative to the working directory
            tensor.base_dir = str(path.parent)
        else:
            _check_in_file(tensor, path)
    _SOURCES[model] = path.resolve()
    return model


def _check_in_file(tensor: ir.TensorProtocol, model_path: Path) -> None:
    """Refuse a tensor stored in the protobuf whose data does not fill its shape and dtype (a
    header lie that a pass would otherwise re-emit or trip over later). ``raw_data`` is only
    measured; typed fields (small tensors) are decoded once."""
    try:
        if isinstance(tensor, ir.StringTensor):  # one string_data entry per element
            held = len(np.asarray(tensor.raw, dtype=object).reshape(-1))
            if held == tensor.size:
                return
            problem = f"is a string tensor of {tensor.size} elements holding {held} strings"
        elif not isinstance(tensor, ir.serde.TensorProtoTensor):
            return
        elif tensor.raw.HasField("raw_data"):
            if len(tensor.raw.raw_data) == tensor.nbytes:
                return
            problem = f"holds {len(tensor.raw.raw_data)} bytes, its shape and dtype need {tensor.nbytes}"
        else:
            tensor.numpy()
            return
    except Exception as exc:  # an unknown dtype, a count that does not fit the shape
        problem = f"cannot be read ({type(exc).__name__}: {str(exc)[:120]})"
    raise ModelFileError(f"{model_path}: tensor {tensor.name!r} (shape {tensor.shape}, {tensor.dtype}) {problem}; "
                         "the model file is corrupt, export it again")


def _proto_tensors(nodes: Any, initializers: Any = (), sparse: Any = ()) -> Iterator[Any]:
    """Every TensorProto of a graph's (sparse) initializers and nodes, subgraphs included."""
    yield from initializers
    for tensor in sparse:
        yield from (tensor.values, tensor.indices)
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for tensor in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
                yield from (tensor.values, tensor.indices)
            for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _proto_tensors(graph.node, graph.initializer, graph.sparse_initializer)


def check_external_data(path: str | os.PathLike) -> None:
    """Run :func:`load_model`'s external-data check on a model another reader will load (ONNX
    Runtime, which accepts hard links), reading only the protobuf, never the weights.

    Covers the tensors of the main graph, its subgraphs and the model-local functions. Raises
    ModelFileError / UnsafePathError as load_model does.
    """
    import onnx

    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc}); the file is "
                             "corrupt or truncated, export it again") from exc
    graph = proto.graph
    tensors = [*_proto_tensors(graph.node, graph.initializer, graph.sparse_initializer),
               *(t for function in proto.functions for t in _proto_tensors(function.node))]
    for tensor in tensors:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        try:
            external = ir.serde.deserialize_tensor(tensor, str(path.parent))
        except Exception as exc:  # no location, a bad offset: the model is corrupt
            raise ModelFileError(f"{path}: tensor {tensor.name!r} has unreadable external data information "
                                 f"({type(exc).__name__}: {exc}); export the model again") from exc
        if isinstance(external, ir.ExternalTensor):
            _check_external(external, path)


def _total_bytes(model: ir.Model) -> int:
    total = 0
    for tensor in iter_tensors(model):
        try:
            total += int(tensor.nbytes)
        except Exception:  # unknown size: count nothing, "auto" then decides on the rest
            pass
    return total


def _refuse_overwriting_inputs(model: ir.Model, path: Path, *names: str) -> None:
    """Refuse outputs ``path`` and ``path.parent / name`` that are the file the model was
    loaded from or one its weights are read from (resolved, symlinked or hard-linked)."""
    outputs = [path, *(path.parent / name for name in names)]
    refuse_overwriting_inputs(outputs, [source_path(model), *external_files(model)])
    refuse_folders_in_the_way(outputs)


def _make_output_folder(path: Path) -> None:
    """Create the output's folder (as ``mkdir -p``), or say why it cannot be."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot create the output folder {path.parent} ({exc.strerror or exc})") from exc


def _temp_dir(path: Path) -> Path:
    try:
        return make_temp_dir(path.parent, path.name)
    except OnnxPeftError as exc:
        raise ModelFileError(str(exc)) from exc


@contextlib.contextmanager
def _inline_attribute_tensors(model: ir.Model) -> Iterator[None]:
    """Read external attribute tensors (Constant values, in any graph or function) into memory
    for the duration of a save, then put the originals back.

    Why: ``ir.save`` moves initializers into the output's data file but serialises attribute
    tensors as they are, so an external one would keep its location, now resolved against the
    output's folder: a missing file, or another file's bytes. Inline they travel with the model.
    """
    swapped: list[tuple[ir.Node, str, ir.Attr]] = []
    for graph in iter_graphs(model):
        for node in graph:
            for name, attr in list(node.attributes.items()):
                if attr.is_ref() or attr.value is None:
                    continue
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    value = ir.Tensor(attr.value.numpy(), name=attr.value.name)
                elif attr.type == ir.AttributeType.TENSORS and any(
                        isinstance(t, ir.ExternalTensor) for t in attr.value):
                    value = [ir.Tensor(t.numpy(), name=t.name) if isinstance(t, ir.ExternalTensor) else t
                             for t in attr.value]
                else:
                    continue
                swapped.append((node, name, attr))
                node.attributes[name] = ir.Attr(name, attr.type, value, doc_string=attr.doc_string)
    try:
        yield
    finally:
        for node, name, attr in swapped:
            node.attributes[name] = attr


@contextlib.contextmanager
def _tensor_progress(path: Path) -> Iterator[Any]:
    """A tqdm bar over the tensors ``ir.save`` writes (lazy merged weights are computed then)."""
    from tqdm.auto import tqdm

    from ..progress import quiet

    bar = tqdm(desc=f"writing {path.name}", unit="tensor", leave=False,
               disable=quiet() or not sys.stderr.isatty())

    def callback(tensor: Any, info: Any) -> None:
        bar.total = info.total
        bar.update(1)

    try:
        yield callback
    finally:
        bar.close()


def save_model(model: ir.Model, path: str | os.PathLike,
               external_data: bool | Literal["auto"] = "auto") -> Path:
    """Write ``model`` to ``path`` (and ``<name>.data`` next to it) atomically.

    ``external_data``: True always writes the weights to ``<file name>.data``; False keeps them
    inside the .onnx file (refused above 2 GB); "auto" uses external data when the input had
    any or the weights exceed 1 GB. Tensors are written one at a time, so lazy tensors are
    computed one by one. Returns the path written.
    """
    path = Path(path)
    data_name = path.name + ".data"
    _refuse_overwriting_inputs(model, path, data_name)
    _make_output_folder(path)
    total = _total_bytes(model)
    if external_data == "auto":
        has_external = any(isinstance(t, ir.ExternalTensor) for t in iter_tensors(model))
        external_data = has_external or total > AUTO_EXTERNAL_BYTES
    if not external_data and total >= _TWO_GB:
        raise ModelFileError(
            f"{path}: the weights take {total} bytes, over protobuf's 2 GB limit; save with external data"
        )
    tmp_dir = _temp_dir(path)
    try:
        tmp_model = tmp_dir / path.name
        with _inline_attribute_tensors(model):
            if external_data:
                with _tensor_progress(path) as callback:
                    ir.save(model, tmp_model, external_data=data_name, callback=callback)
            else:
                ir.save(model, tmp_model)
        tmp_data = tmp_dir / data_name
        # a stale .data from an earlier save would be mistaken for this model's: removed with it
        install_files([(tmp_data if tmp_data.exists() else None, path.parent / data_name),
                       (tmp_model, path)], aside=tmp_dir)
    except UnsafePathError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{path}: could not write the model ({type(exc).__name__}: {exc})") from exc
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def save_model_with_side_data(model: ir.Model, path: str | os.PathLike, side_names: Collection[str],
                              side_data_name: str, size_threshold_bytes: int = 256) -> Path:
    """Like ``save_model(model, path, external_data=True)``, but the initializers named in
    ``side_names`` get their data in ``side_data_name`` (a plain file name next to the model), not in
    ``<name>.data``; each is stored there whatever its size.

    Why: a runtime that swaps those initializers (ORT's ``SessionOptions.add_external_initializers``)
    needs them apart from the base weights, and the side file can be replaced on its own. The
    files are written in a temporary folder and renamed into place; ``model`` is left unchanged.
    """
    path = Path(path)
    data_name = path.name + ".data"
    if Path(side_data_name).name != side_data_name or side_data_name in ("", ".", "..", data_name, path.name):
        raise UnsafePathError(
            f"{path}: side data file {side_data_name!r} must be a plain file name next to the model, "
            f"other than {data_name!r}"
        )
    _refuse_overwriting_inputs(model, path, data_name, side_data_name)
    _make_output_folder(path)
    side_names = set(side_names)
    side, rest, small = [], [], []
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            if graph is model.graph and value.name in side_names:
                side.append(value)
            elif tensor.nbytes > size_threshold_bytes:
                rest.append(value)
            elif isinstance(tensor, ir.ExternalTensor):
                small.append(value)
    missing = side_names - {v.name for v in side}
    if missing:
        raise ModelFileError(f"{path}: no initializer named {sorted(missing)[0]!r} to store in {side_data_name}")
    originals = {id(v): (v, v.const_value) for v in (*side, *rest, *small)}
    tmp_dir = _temp_dir(path)
    try:
        for values, name in ((rest, data_name), (side, side_data_name)):
            if values:
                written = ir.external_data.convert_tensors_to_external([v.const_value for v in values], tmp_dir, name)
                for value, tensor in zip(values, written):
                    value.const_value = tensor
        for value in small:
            value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)
        with _inline_attribute_tensors(model):
            ir.save(model, tmp_dir / path.name)
        # a data file this save did not write is stale (an earlier save's): removed with the rest
        install_files([*(((tmp_dir / name) if (tmp_dir / name).exists() else None, path.parent / name)
                         for name in (data_name, side_data_name)),
                       (tmp_dir / path.name, path)], aside=tmp_dir)
    except UnsafePathError:
        raise
    except Exception as exc:
        raise ModelFileError(f"{path}: could not write the model ({type(exc).__name__}: {exc})") from exc
    finally:
        for value, tensor in originals.values():
            value.const_value = tensor
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path
