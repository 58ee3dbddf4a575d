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
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _bfloat16() -> Any:
    import ml_dtypes

    return ml_dtypes.bfloat16


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of a safetensors file as numpy arrays (bf16 via ml_dtypes), plus metadata.

    Validates the header and every tensor's byte range, so a truncated or corrupt file raises
    CheckpointError naming it instead of returning garbage.
    """
    path = Path(path)
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if raw.size < 8:
        raise CheckpointError(f"{path}: truncated safetensors file (no header); save the adapter again")
    (header_len,) = struct.unpack("<Q", raw[:8].tobytes())
    if header_len > raw.size - 8:
        raise CheckpointError(f"{path}: truncated safetensors file (header says {header_len} bytes)")
    try:
        header = json.loads(raw[8:8 + header_len].tobytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from exc
    metadata = header.pop("__metadata__", None) or {}
    body = raw[8 + header_len:]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        dtype_name = info.get("dtype")
        dtype = _bfloat16() if dtype_name == "BF16" else _ST_DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end > body.size or end - start != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
            raise CheckpointError(
                f"{path}: tensor {name!r} lies outside the file; the file is truncated or corrupt"
            )
        tensors[name] = np.array(body[start:end].view(dtype).reshape(shape))
    return tensors, metadata


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
    """Write ``adapter_model.safetensors`` then ``adapter_config.json``, each atomically.

    The weights are serialised before anything touches the disk, so a bad tensor writes nothing.
    """
    directory = Path(directory)
    payload = safetensors_bytes(tensors, {"format": "pt"})
    config_bytes = (json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n").encode()
    atomic_write_bytes(directory / WEIGHTS_NAME, payload)
    atomic_write_bytes(directory / "adapter_config.json", config_bytes)
    return directory
