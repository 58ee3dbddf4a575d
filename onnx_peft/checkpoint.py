"""Read and write PEFT adapter directories, safely.

Format (Hugging Face PEFT's, both ways): ``adapter_config.json`` +
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.lora_A.weight`` (no
adapter name). Safetensors are parsed here with numpy alone, so a deploy box without torch
can read them; ``adapter_model.bin`` (pickle) is refused unless ``allow_pickle=True``.

Every write goes to a temporary file in the target folder and is renamed into place, so a
failure (disk full, bad tensor) never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

# What a safetensors header may claim before we parse it: adapters hold at most a few thousand
# tensors (a header of KBs); the safetensors library itself stops at 100 MB.
MAX_HEADER_BYTES = 16 * 2**20
MAX_TENSORS = 100_000

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _bfloat16() -> Any:
    import ml_dtypes

    return ml_dtypes.bfloat16


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder + rename, with the
    umask's permissions (safe_write). A failure (disk full, read-only folder) leaves ``path`` as
    it was and raises OutputError (an OSError) naming it."""
    from .errors import OnnxPeftError, OutputError
    from .safe_write import honour_umask, open_temp_file, refuse_folders_in_the_way

    path = Path(path)
    refuse_folders_in_the_way([path])
    fd, tmp = open_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, OnnxPeftError):
            raise OutputError(f"{path}: could not write it ({exc.strerror or exc}); free some space or "
                              "choose another output path") from exc
        raise
    return path


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a safetensors file as numpy arrays (bf16 via ml_dtypes), plus metadata.

    Validates the header and every tensor's byte range, so a truncated or corrupt file raises
    CheckpointError naming it instead of returning garbage.
    """
    path = Path(path)
    raw, entries, metadata = _open_safetensors(path)
    body = raw[8 + _header_len(raw):]
    tensors = {name: np.array(body[start:end].view(dtype).reshape(shape))
               for name, (dtype, shape, start, end) in entries.items()}
    return tensors, metadata


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    """``{name: (shape, dtype name)}`` and the metadata of a safetensors file, without reading tensor data
    (so shapes and dtypes can be checked against a model's contract first)."""
    _, entries, metadata = _open_safetensors(Path(path))
    return {name: (shape, np.dtype(dtype).name) for name, (dtype, shape, _, _) in entries.items()}, metadata


def _header_len(raw: np.ndarray) -> int:
    return struct.unpack("<Q", raw[:8].tobytes())[0]


def _open_safetensors(path: Path) -> tuple[np.ndarray, dict[str, tuple[Any, tuple[int, ...], int, int]], dict[str, str]]:
    """(the memory-mapped file, {name: (dtype, shape, start, end)}, metadata), every entry checked:
    a known dtype, a shape of non-negative ints, ``itemsize * numel == end - start``, ranges inside
    the data and not overlapping one another. The header size and entry count are capped before
    the JSON is parsed."""
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from exc
    if raw.size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file (no header); save the adapter again")
    header_len = _header_len(raw)
    if header_len > raw.size - 8:
        raise CheckpointError(f"{path}: truncated safetensors file (header says {header_len} bytes)")
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: safetensors header of {header_len} bytes exceeds the limit of "
                              f"{MAX_HEADER_BYTES}; this is not an adapter file")
    try:
        header = json.loads(raw[8:8 + header_len].tobytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, deep nesting
        raise CheckpointError(f"{path}: corrupt safetensors header ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header ('__metadata__' must map strings to strings)")
    if len(header) > MAX_TENSORS:
        raise CheckpointError(f"{path}: safetensors header lists {len(header)} tensors, more than the limit of "
                              f"{MAX_TENSORS}; this is not an adapter file")
    body_size = raw.size - 8 - header_len
    entries = {name: _entry(path, name, info, body_size) for name, info in header.items()}
    previous_end, previous = 0, ""
    for name, (_, _, start, end) in sorted(entries.items(), key=lambda item: (item[1][2], item[1][3])):
        if start < previous_end:
            raise CheckpointError(f"{path}: tensors {previous!r} and {name!r} share bytes (data_offsets overlap); "
                                  "the file is corrupt")
        if end > start:
            previous_end, previous = end, name
    return raw, entries, metadata


def _entry(path: Path, name: str, info: Any, body_size: int) -> tuple[Any, tuple[int, ...], int, int]:
    """One header entry as (numpy dtype, shape, start, end), or CheckpointError naming the key."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{path}: tensor {name!r}: header entry must be an object, got {type(info).__name__}")
    dtype_name = info.get("dtype")
    if not isinstance(dtype_name, str):
        raise CheckpointError(f"{path}: tensor {name!r}: 'dtype' must be a string, got {dtype_name!r:.60}")
    dtype = _bfloat16() if dtype_name == "BF16" else _ST_DTYPES.get(dtype_name)
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name[:40]}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r}: 'shape' must be a list of non-negative integers, "
                              f"got {shape!r:.60}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise CheckpointError(f"{path}: tensor {name!r}: 'data_offsets' must be [start, end], got {offsets!r:.60}")
    start, end = offsets
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if start > end or end - start != nbytes:
        raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {offsets} hold {end - start} bytes but "
                              f"{dtype_name}{shape} needs {nbytes}; the file is corrupt")
    if end > body_size:
        raise CheckpointError(f"{path}: tensor {name!r} lies outside the file; the file is truncated or corrupt")
    return dtype, tuple(shape), start, end


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def safetensors_bytes(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise numpy arrays or torch tensors to safetensors bytes."""
    if tensors and all(hasattr(t, "detach") for t in tensors.values()):
        from safetensors.torch import save

        return save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=dict(metadata or {}))
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=dict(metadata or {}))


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> Path:
    return atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def load_adapter_weights(directory: str | os.PathLike, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The tensors of a PEFT adapter directory, keyed exactly as stored, as numpy arrays."""
    directory = Path(directory)
    safetensors_path = directory / WEIGHTS_NAME
    if safetensors_path.is_file():
        return read_safetensors(safetensors_path)[0]
    pickle_path = directory / PICKLE_WEIGHTS_NAME
    if pickle_path.is_file():
        if not allow_pickle:
            raise CheckpointError(
                f"{pickle_path}: pickled checkpoints can run arbitrary code and are refused; "
                "convert it to safetensors, or pass allow_pickle=True if you trust the file"
            )
        from .errors import require_torch

        torch = require_torch()
        try:
            state = torch.load(pickle_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{pickle_path}: cannot load ({exc})") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{pickle_path}: not a state dict of tensors")
        return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in state.items()}
    raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} found; is this a PEFT adapter directory?")


LABELS_NAME = "labels.json"


def read_label_names(directory: str | os.PathLike) -> list[str] | None:
    """The class names a classification adapter was trained with (``labels.json``, written by
    ``onnx_peft.train``: ``{"id2label": {"0": name, ...}, "label2id": ...}``), in id order."""
    path = Path(directory) / LABELS_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        id2label = data["id2label"] if isinstance(data, dict) else dict(enumerate(data))
        return [id2label[key] for key in sorted(id2label, key=int)]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not a labels file ({exc}); expected {{\"id2label\": {{\"0\": ...}}}}") from exc


def save_adapter_dir(directory: str | os.PathLike, config: Any, tensors: Mapping[str, Any]) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` together: both are staged
    in a temporary folder and renamed in as one step (safe_write.install_files), so the folder
    never pairs new weights with an old config.

    The weights are serialised before anything touches the disk, so a bad tensor writes nothing.
    """
    import shutil

    from .errors import OnnxPeftError, OutputError
    from .safe_write import install_files, make_temp_dir

    directory = Path(directory)
    payload = safetensors_bytes(tensors, {"format": "pt"})
    config_bytes = (json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n").encode()
    staged = make_temp_dir(directory, "adapter")
    try:
        for name, data in ((WEIGHTS_NAME, payload), ("adapter_config.json", config_bytes)):
            atomic_write_bytes(staged / name, data)
        install_files([(staged / name, directory / name) for name in (WEIGHTS_NAME, "adapter_config.json")],
                      aside=staged)
    except OSError as exc:
        if isinstance(exc, OnnxPeftError):
            raise
        raise OutputError(f"{directory}: could not save the adapter ({exc.strerror or exc}); free some space "
                          "or choose another folder") from exc
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return directory
