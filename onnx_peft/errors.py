"""Every user-facing failure of onnx-peft is an :class:`OnnxPeftError`.

Messages name the file, module or tensor at fault and say what to do about it, so the CLI can
print them as one line and callers can catch one base class.
"""

from __future__ import annotations


class OnnxPeftError(Exception):
    """Base class of all onnx-peft errors."""


class MissingDependencyError(OnnxPeftError, ImportError):
    """An optional dependency (torch, onnxruntime, ...) is needed for this feature."""


class AdapterConfigError(OnnxPeftError, ValueError):
    """An adapter config is invalid: unknown peft_type, missing or ill-typed field."""


class CheckpointError(OnnxPeftError):
    """An adapter checkpoint cannot be read or does not fit the model."""


class IncompatibleAdapterError(OnnxPeftError):
    """An adapter does not fit a model: missing/extra slot, shape, dtype or other base model."""


class ModelFileError(OnnxPeftError):
    """An ONNX model file is missing, corrupt, or refers to unsafe external data."""


class ExportError(OnnxPeftError):
    """Exporting a model to ONNX failed or gave outputs that differ from PyTorch."""


class NoAdapterSitesError(OnnxPeftError):
    """A graph pass found no adapter site where it needed one."""


class UnsafePathError(OnnxPeftError):
    """A path escapes its folder, or an output would overwrite an input."""


class OutputError(OnnxPeftError, OSError):
    """An output cannot be written: disk full, read-only file system, no permission."""


class RecipeError(OnnxPeftError, ValueError):
    """A pass recipe names an unknown pass type or option."""


class RuntimeSessionError(OnnxPeftError):
    """AdapterSession misuse: unknown adapter, bad feeds, adapter ids out of range."""


class DataError(OnnxPeftError, ValueError):
    """Training data is missing a field, empty, or has labels that do not match."""


def require_torch():
    """Import torch or raise a MissingDependencyError that says how to install it."""
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - exercised in a torch-free subprocess
        raise MissingDependencyError(
            "this feature needs PyTorch: pip install onnx-peft[torch]"
        ) from exc
    return torch


def require_onnxruntime():
    """Import onnxruntime or raise a MissingDependencyError that says how to install it."""
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover
        raise MissingDependencyError(
            "this feature needs ONNX Runtime: pip install onnx-peft[cpu] (or onnx-peft[gpu])"
        ) from exc
    return onnxruntime
