"""Adapter files: ``.onnx_adapter`` (ONNX Runtime's AdapterFormat), ``.safetensors``, ``.npz``.

An adapter file holds slot tensors, MatMul-ready (``<module>.lora_A.weight`` = A^T ``[in, r]``,
``<module>.lora_B.weight`` = (s B)^T ``[r, out]``), plus the fingerprint of the base weights it
was converted against, so that loading it into another base fails with a clear error.

Where the fingerprint lives, per format:

* safetensors: the header metadata, key ``onnx_peft.fingerprint``.
* npz: an extra 0-d string entry ``__onnx_peft_fingerprint__`` (loads with allow_pickle=False).
* onnx_adapter: AdapterFormat has no string metadata, only int32 ``model_version`` /
  ``adapter_version``, and an extra parameter would be fed to the session ("Invalid input
  name"). We store a 31-bit digest of the fingerprint as ``model_version`` (the field is meant
  to say which base model the adapter belongs to) and return it as ``"ort31:<8 hex>"``;
  :func:`fingerprints_match` compares it with a full fingerprint.

Also :func:`read_peft_adapter`: a PEFT adapter dir read with numpy only (no torch), including
bf16 safetensors (via the checkpoint module's numpy reader).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from .checkpoint import (
    atomic_write_bytes,
    load_adapter_weights,
    read_safetensors,
    read_safetensors_header,
    write_safetensors,
)
from .config import CONFIG_NAME, AdapterConfig
from .errors import CheckpointError, OnnxPeftError, OutputError, require_onnxruntime
from .npz import read_npz
from .safe_write import honour_umask, open_temp_file, refuse_folders_in_the_way

AdapterFileFormat = Literal["onnx_adapter", "safetensors", "npz"]

FINGERPRINT_META = "onnx_peft.fingerprint"
NPZ_FINGERPRINT_KEY = "__onnx_peft_fingerprint__"
SHORT_PREFIX = "ort31:"
# adapter_version we write into .onnx_adapter files: "written by onnx-peft, slot layout v1".
ADAPTER_VERSION = 1

_SUFFIXES: dict[str, AdapterFileFormat] = {
    ".onnx_adapter": "onnx_adapter",
    ".safetensors": "safetensors",
    ".npz": "npz",
}
ADAPTER_FILE_SUFFIXES = tuple(_SUFFIXES)


def suffix_for(format: str) -> str:
    """The file suffix of an adapter file format: ``"npz"`` -> ``".npz"``."""
    return next(suffix for suffix, name in _SUFFIXES.items() if name == format_for_path("", format))


def format_for_path(path: str | os.PathLike, format: str | None = None) -> AdapterFileFormat:
    """The adapter file format named by ``format`` or, when None, by the file suffix."""
    if format is not None:
        key = format.lower().lstrip(".").replace("-", "_")
        key = {"ort": "onnx_adapter", "onnx": "onnx_adapter", "st": "safetensors"}.get(key, key)
        if key not in _SUFFIXES.values():
            raise OnnxPeftError(
                f"unknown adapter file format {format!r}; use onnx_adapter, safetensors or npz"
            )
        return key  # type: ignore[return-value]
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise OnnxPeftError(
            f"{path}: cannot tell the adapter format from suffix {suffix!r}; name the file "
            "*.onnx_adapter, *.safetensors or *.npz, or pass format="
        )
    return _SUFFIXES[suffix]


# -- fingerprints ------------------------------------------------------------------------------
def short_fingerprint(fingerprint: str) -> int:
    """31-bit digest of a hex fingerprint, as stored in an .onnx_adapter's model_version (0 = none)."""
    if not fingerprint:
        return 0
    if fingerprint.startswith(SHORT_PREFIX):
        return int(fingerprint[len(SHORT_PREFIX):], 16)
    try:
        value = int(fingerprint[:8], 16) & 0x7FFFFFFF
    except ValueError:  # not hex: hash it so any string still round-trips consistently
        import hashlib

        value = int(hashlib.sha256(fingerprint.encode()).hexdigest()[:8], 16) & 0x7FFFFFFF
    return value or 1


def fingerprints_match(file_fingerprint: str, model_fingerprint: str) -> bool:
    """True unless both are known and differ (a short ``ort31:`` form matches its full form)."""
    if not file_fingerprint or not model_fingerprint:
        return True
    if SHORT_PREFIX in (file_fingerprint[:6], model_fingerprint[:6]):
        return short_fingerprint(file_fingerprint) == short_fingerprint(model_fingerprint)
    return file_fingerprint == model_fingerprint


def resolve_fingerprint(file_fingerprint: str, model_fingerprint: str) -> str:
    """The fingerprint to hand to ``check_adapter``: the model's when the file's short form matches."""
    if file_fingerprint and fingerprints_match(file_fingerprint, model_fingerprint):
        return model_fingerprint or file_fingerprint
    return file_fingerprint


# -- atomic output -----------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path``; rename it over ``path`` (with the umask's permissions)
    only if the block succeeds. A failure of the block or the rename leaves ``path`` as it was;
    one that is not an OnnxPeftError becomes an OutputError naming ``path``."""
    path = Path(path)
    refuse_folders_in_the_way([path])
    fd, tmp = open_temp_file(path)
    os.close(fd)
    try:
        yield tmp
        honour_umask(tmp)
        os.replace(tmp, path)
    except OnnxPeftError:
        raise
    except Exception as exc:  # OSError (disk full), onnxruntime's RuntimeError on a failed write
        raise OutputError(f"{path}: could not write it ({type(exc).__name__}: {str(exc)[:200]}); free some "
                          "space or choose another output path") from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# -- write -------------------------------------------------------------------------------------
def save_adapter_file(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], fingerprint: str = "",
                      format: AdapterFileFormat | str | None = None) -> Path:
    """Write slot tensors (name -> array) and the base fingerprint to ``path`` atomically.

    ``format`` defaults to the suffix. ``.onnx_adapter`` files load in
    ``onnxruntime.LoraAdapter().Load(path)`` and feed a run via ``RunOptions.add_active_adapter``.
    """
    path = Path(path)
    kind = format_for_path(path, format)
    arrays = {name: np.ascontiguousarray(np.asarray(value)) for name, value in tensors.items()}
    if kind == "safetensors":
        return write_safetensors(path, arrays, {FINGERPRINT_META: fingerprint, "format": "np"})
    if kind == "npz":
        if NPZ_FINGERPRINT_KEY in arrays:
            raise OnnxPeftError(f"{path}: tensor name {NPZ_FINGERPRINT_KEY!r} is reserved")
        buffer = io.BytesIO()
        np.savez(buffer, **arrays, **{NPZ_FINGERPRINT_KEY: np.array(fingerprint)})
        return atomic_write_bytes(path, buffer.getvalue())
    ort = require_onnxruntime()
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(ADAPTER_VERSION)
    adapter.set_model_version(short_fingerprint(fingerprint))
    adapter.set_parameters({n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()})
    with atomic_output(path) as tmp:
        adapter.export_adapter(str(tmp))
    return path


# -- read --------------------------------------------------------------------------------------
def load_adapter_file(path: str | os.PathLike,
                      check: Callable[[dict[str, tuple[tuple[int, ...], str]]], None] | None = None
                      ) -> tuple[dict[str, np.ndarray], str]:
    """Read an adapter file written by us (or ``olive convert-adapters``): (tensors, fingerprint).

    The fingerprint is "" when the file records none; ``"ort31:..."`` for .onnx_adapter files.
    ``check`` (e.g. ``lambda header: check_adapter(contract, header, source=path)``) sees
    ``{name: (shape, dtype name)}`` before tensor data is read (npz, safetensors), so a file that
    claims a huge tensor the model has no room for is refused without inflating it. Arrays come
    back in native byte order. Every failure is a CheckpointError (or what ``check`` raises).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such adapter file")
    kind = format_for_path(path)
    if kind == "safetensors":
        header, metadata = read_safetensors_header(path)
        if check is not None:
            check(header)
        tensors, metadata = read_safetensors(path)
        fingerprint = metadata.get(FINGERPRINT_META, "")
    elif kind == "npz":
        tensors = read_npz(path, string_keys=(NPZ_FINGERPRINT_KEY,), check=check)
        fingerprint = tensors.pop(NPZ_FINGERPRINT_KEY, np.array(""))
        if fingerprint.dtype.kind not in "US" or fingerprint.ndim != 0:
            raise CheckpointError(f"{path}: entry {NPZ_FINGERPRINT_KEY!r} must be a 0-d string")
        fingerprint = str(fingerprint)
    else:
        tensors, fingerprint = _read_onnx_adapter(path)
        if check is not None:
            check({name: (tuple(a.shape), a.dtype.name) for name, a in tensors.items()})
    if not tensors:
        raise CheckpointError(f"{path}: holds no adapter tensors; convert the adapter again")
    refuse_non_finite(tensors, path)
    return tensors, fingerprint


def refuse_non_finite(tensors: Mapping[str, np.ndarray], source: str | os.PathLike) -> None:
    """A NaN or infinite weight turns every output it touches into NaN: refuse the file, naming
    the tensor, instead of serving (or converting, or merging) it."""
    for name, array in tensors.items():
        if (array.dtype.kind in "fc" or array.dtype.name == "bfloat16") and not np.isfinite(array).all():
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            raise CheckpointError(f"{source}: tensor {name!r} holds {bad} NaN or infinite values; the adapter "
                                  "is damaged or its training diverged, save it again from a good checkpoint")


def _read_onnx_adapter(path: Path) -> tuple[dict[str, np.ndarray], str]:
    ort = require_onnxruntime()
    try:
        adapter = ort.AdapterFormat.read_adapter(str(path))
        tensors = {str(name): np.array(value.numpy()) for name, value in adapter.get_parameters().items()}
        version = int(adapter.get_model_version())
    except Exception as exc:  # onnxruntime raises RuntimeError / its own Fail for unparsable files
        raise CheckpointError(f"{path}: not a readable .onnx_adapter file ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from exc
    return tensors, f"{SHORT_PREFIX}{version:08x}" if version else ""


def read_peft_adapter(directory: str | os.PathLike, allow_pickle: bool = False
                      ) -> tuple[AdapterConfig, dict[str, np.ndarray]]:
    """(config, tensors) of a PEFT adapter dir, keys as PEFT writes them (``base_model.model.*``).

    Reads ``adapter_model.safetensors`` with numpy. ``adapter_model.bin`` is a pickle and is
    refused unless ``allow_pickle=True`` (then read with ``torch.load(weights_only=True)``).
    """
    directory = Path(directory)
    if not (directory / CONFIG_NAME).is_file():
        raise CheckpointError(
            f"{directory}: no {CONFIG_NAME}; expected a PEFT adapter directory "
            "(adapter_config.json + adapter_model.safetensors)"
        )
    config = AdapterConfig.from_pretrained(directory)
    tensors = load_adapter_weights(directory, allow_pickle=allow_pickle)
    if not tensors:  # (PeftModel.from_pretrained reads X-LoRA dirs, which may be empty, without this check)
        raise CheckpointError(f"{directory}: the adapter weights hold no tensors; the adapter was saved empty "
                              "or truncated, save it again")
    refuse_non_finite(tensors, directory)
    return config, tensors
